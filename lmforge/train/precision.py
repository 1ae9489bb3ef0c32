"""Precision policies: bf16 autocast, fp16 autocast + dynamic loss scaling, fp32; and the
matmul peak that MFU and the throughput benchmark are measured against."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Precision:
    name: str
    device_type: str
    scaler: torch.amp.GradScaler | None  # fp16 only: fp16 gradients underflow without it

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.name == "fp32":
            yield
            return
        with torch.autocast(self.device_type, dtype=DTYPES[self.name]):
            yield


def make_precision(name: str, device_type: str, growth_interval: int = 2000) -> Precision:
    """Weights and optimizer state stay fp32 in every mode; autocast runs matmuls low."""
    scaler = None
    if name == "fp16":
        scaler = torch.amp.GradScaler(device_type, init_scale=2.0**16, growth_factor=2.0,
                                      backoff_factor=0.5, growth_interval=growth_interval)
    return Precision(name, device_type, scaler)


@lru_cache(maxsize=8)
def matmul_flops(dtype: torch.dtype, device: str = "cpu", n: int = 1024, samples: int = 5,
                 seconds: float = 0.1) -> float:
    """Achieved FLOP/s of an n x n matmul in `dtype` on this machine, now: the roofline a
    training step is judged against (a vendor's peak says little about a 2-core CPU). Best of
    several short samples, since another process can halve any single one."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(samples):
        iters, t0 = 0, time.perf_counter()
        while (dt := time.perf_counter() - t0) < seconds or iters == 0:
            a @ b
            iters += 1
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        best = max(best, 2.0 * n**3 * iters / dt)
    return best
