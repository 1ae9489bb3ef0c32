"""Precision policies: bf16 autocast, fp16 autocast + dynamic loss scaling, fp32; `auto`, which
picks what is fast on the device at hand and says why; and the matmul peak that MFU and the
throughput benchmark are measured against.

Why `auto` measures: whether bf16 pays depends on the silicon, not on torch. A CPU with
AVX512-BF16/AMX runs bf16 matmuls faster than fp32, one with AVX2 only emulates them ~100x
slower, and some with AVX512-BF16 still run them at half fp32's speed. A fixed default is wrong
somewhere, so the decision is a short micro-benchmark (cached per process), skipped where the
CPU declares no bf16 instructions at all.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# bf16 must beat fp32 by this much to be worth its rounding (8 mantissa bits vs 23)
MIN_SPEEDUP = 1.3
# a representative matmul of the small models CPUs train: big enough to reach each dtype's
# kernel, small enough that an emulated bf16 path measures in well under a second
PROBE_N = 512
_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16",
              "asimd", "sve", "bf16")  # the last three: aarch64's names
_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}
_WARNED: set[str] = set()


@dataclass(frozen=True)
class Choice:
    """The precision a run uses, what was asked for, and why: logged and kept in summaries."""

    name: str  # fp32 | bf16 | fp16
    requested: str  # auto | fp32 | bf16 | fp16
    reason: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)

    def line(self) -> str:
        head = self.name if self.requested == self.name else f"{self.requested} -> {self.name}"
        return f"precision {head}: {self.reason}"


@dataclass
class Precision:
    choice: Choice  # what runs, what was asked for, and why
    device_type: str
    scaler: torch.amp.GradScaler | None  # fp16 only: fp16 gradients underflow without it

    @property
    def name(self) -> str:
        return self.choice.name

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.name == "fp32":
            yield
            return
        with torch.autocast(self.device_type, dtype=DTYPES[self.name]):
            yield


def cpu_features() -> list[str]:
    """The CPU's declared vector features that matter for dtype speed (Linux /proc/cpuinfo),
    plus the kernel level torch dispatches to (which ATEN_CPU_CAPABILITY can lower)."""
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):  # x86, aarch64
                flags = set(line.split(":", 1)[1].split())
                break
    found = [f for f in _CPU_FLAGS if f in flags]
    with contextlib.suppress(Exception):
        found.append(f"torch:{torch.backends.cpu.get_cpu_capability().lower()}")
    return found


def cpu_name() -> str:
    """The CPU's model name, as lscpu prints it (every table that times something says where)."""
    import platform

    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _best_flops(a: torch.Tensor, b: torch.Tensor, samples: int, seconds: float) -> float:
    """Best-of-`samples` FLOP/s of a @ b, each sample at least one call and `seconds` long:
    another process can halve any single sample, so the best is the machine's speed."""
    a @ b  # the first call pays for kernel selection and page faults
    flops = 2.0 * a.size(0) * a.size(1) * b.size(1)
    best = 0.0
    for _ in range(samples):
        iters, t0 = 0, time.perf_counter()
        while (dt := time.perf_counter() - t0) < seconds or iters == 0:
            a @ b
            iters += 1
            if a.is_cuda:
                torch.cuda.synchronize()
        best = max(best, flops * iters / dt)
    return best


@lru_cache(maxsize=8)
def matmul_speedup(dtype: torch.dtype, n: int = PROBE_N) -> float:
    """Throughput of an n x n CPU matmul in `dtype` over fp32's, measured now (cached)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    fp32 = _best_flops(a, b, 3, 0.02)
    low = _best_flops(a.to(dtype), b.to(dtype), 3, 0.02)
    return low / fp32


def _cpu_auto() -> Choice:
    feats = cpu_features()
    shown = ", ".join(feats) or "none declared"
    declared = any(not f.startswith("torch:") for f in feats)  # else: not Linux, measure
    if declared and not _BF16_FLAGS & set(feats):
        return Choice("fp32", "auto", f"CPU declares no bf16 instructions ({shown}): bf16 would "
                                      "be emulated, far slower than fp32")
    r = matmul_speedup(torch.bfloat16)
    verdict = "bf16" if r >= MIN_SPEEDUP else "fp32"
    why = "faster" if verdict == "bf16" else f"not >= {MIN_SPEEDUP}x faster"
    return Choice(verdict, "auto", f"measured bf16 matmul ({PROBE_N}^3) at {r:.2f}x fp32 on this "
                                   f"CPU, {why} ({shown})")


def choose(requested: str, device_type: str) -> Choice:
    """Resolve `auto` for this device; an explicit choice is kept, with a warning on stderr
    when it is measurably slow here (it still runs: the user may have reasons)."""
    if requested == "auto":
        if device_type == "cuda":
            # not emulation: an sm_70/75 GPU "supports" bf16 only by running it slowly
            if torch.cuda.is_bf16_supported(including_emulation=False):
                return Choice("bf16", "auto", f"{torch.cuda.get_device_name()} supports bf16")
            return Choice("fp32", "auto", f"{torch.cuda.get_device_name()} has no bf16 "
                                          "(fp16 + loss scaling is train.precision=fp16)")
        if device_type == "cpu":
            return _cpu_auto()
        return Choice("fp32", "auto", f"device {device_type}: fp32 is the safe default")
    choice = Choice(requested, requested, "set in the config")
    if device_type == "cpu" and requested in ("bf16", "fp16"):
        r = matmul_speedup(DTYPES[requested])
        if r < 1.0 and requested not in _WARNED:
            _WARNED.add(requested)  # once per process: the SFT stage and its loop both ask
            print(f"lmforge: warning: precision {requested} on this CPU: its matmuls measured "
                  f"{r:.3g}x fp32's speed ({1 / r:.0f}x slower); precision auto would choose "
                  "fp32", file=sys.stderr, flush=True)
        if r < 1.0:
            choice = Choice(requested, requested, f"set in the config; measured {r:.3g}x fp32 here")
    return choice


def make_precision(name: str, device_type: str, growth_interval: int = 2000) -> Precision:
    """Weights and optimizer state stay fp32 in every mode; autocast runs matmuls low.
    `name` may be `auto`: resolved by `choose` for this device."""
    choice = choose(name, device_type)
    scaler = None
    if choice.name == "fp16":
        scaler = torch.amp.GradScaler(device_type, init_scale=2.0**16, growth_factor=2.0,
                                      backoff_factor=0.5, growth_interval=growth_interval)
    return Precision(choice, device_type, scaler)


@lru_cache(maxsize=8)
def peak_flops(dtype: torch.dtype, device: str = "cpu", samples: int = 3,
               seconds: float = 0.05) -> float:
    """The matmul roofline a training step is judged against (MFU), measured on this machine
    now: the best FLOP/s over several square shapes and repeats, since a single shape can miss
    the kernel's sweet spot and a single sample can meet another process. A vendor's peak says
    little about a 2-core CPU. Larger shapes are skipped once one call takes over 0.2 s."""
    best = 0.0
    for n in (256, 512, 1024, 2048):
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        t0 = time.perf_counter()
        a @ b
        slow = time.perf_counter() - t0 > 0.2
        best = max(best, _best_flops(a, b, samples, seconds))
        if slow:
            break
    return best
