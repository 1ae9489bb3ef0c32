"""Pretraining throughput on this machine: the real training loop against a plain PyTorch peer.

For each preset x precision it times `Trainer.train_step()` (the one loop, fed by the pretrain
stage's own `lm_task` over random tokens: no corpus, no tokenizer) and, interleaved with it, a
hand-written step on an identical model and batch (forward, F.cross_entropy, backward,
torch.optim.AdamW), so the loop's own cost shows as a ratio. Achieved GFLOP/s
(`flops_per_token` x tokens/s) is judged against matmuls of the same dtype timed in the same
run, between the same steps: an n x n square (the roofline the loop's MFU uses) and the
model's own GEMM mix (every Linear's forward, input-grad and weight-grad shape at B*T rows,
weighted by how often a step runs it), which is what the step actually multiplies.

Every figure is best-of-N: on a small shared CPU another process stretches a step at random
(an OpenMP region waits for its slowest thread), so the least-disturbed sample is the signal;
the median column shows how much disturbance there was.

    python bench/pretrain_throughput.py                 # tiny + small, fp32 (+ bf16 where fast)
    python bench/pretrain_throughput.py --presets small --precisions bf16 --micro-batch-size 4
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, PreTrainedModel

from lmforge.config import DataCfg, LogCfg, ModelCfg, PretrainCfg, RunCfg, TrainCfg
from lmforge.data.pack import TokenWindows
from lmforge.models import count_params, flops_per_token, preset_config
from lmforge.stages.pretrain import lm_task
from lmforge.train.loop import Trainer
from lmforge.train.precision import DTYPES, choose, cpu_features

VOCAB = 8192
# Achieved / same-dtype matmul on `small` the loop should reach (square-n figure).
TARGETS = {("small", "fp32"): 0.60, ("small", "bf16"): 0.40}


@dataclass(frozen=True)
class Setup:
    preset: str
    precision: str  # fp32 | bf16 (autocast; weights and optimizer state stay fp32)
    seq_len: int
    micro_batch_size: int
    attn: str  # sdpa | eager


@dataclass
class Gemm:
    """One matmul shape, (m, k) x (k, n), with its best time per call so far."""

    a: torch.Tensor
    b: torch.Tensor
    count: int = 1  # how many times one training step runs this shape
    best_s: float = math.inf

    @property
    def flops(self) -> float:
        return 2.0 * self.a.size(0) * self.a.size(1) * self.b.size(1)


@dataclass
class Timing:
    loop_s: list[float]  # one entry per timed step
    peer_s: list[float]
    square: list[Gemm]  # the n x n roofline, sampled between each pair of steps
    model: list[Gemm]  # the model's own GEMM mix, likewise


def build_model(preset: str, attn: str, seed: int = 0) -> PreTrainedModel:
    """A fresh llama preset at an 8k vocab, built the way `lmforge.models.build_model` does."""
    conf = preset_config(ModelCfg(preset=preset), vocab_size=VOCAB, bos_id=0, eos_id=1, pad_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(conf, attn_implementation=attn)
    return model.train()


def random_windows(tmp: Path, seq_len: int, n_tokens: int = 1 << 20) -> TokenWindows:
    """A packed split of uniform random tokens, in the uint16 memmap format `pack_corpus` writes."""
    path = tmp / "train.bin"
    rng = np.random.default_rng(0)
    rng.integers(0, VOCAB, size=n_tokens, dtype=np.uint16).tofile(path)
    return TokenWindows(path, "uint16", seq_len)


def make_trainer(model: PreTrainedModel, windows: TokenWindows, s: Setup, run_dir: Path,
                 threads: int) -> Trainer:
    cfg = PretrainCfg(
        run=RunCfg(dir=run_dir), model=ModelCfg(preset=s.preset), data=DataCfg(seq_len=s.seq_len),
        # max_steps far away: the cosine schedule stays near peak lr during the timed steps
        train=TrainCfg(max_steps=10_000, micro_batch_size=s.micro_batch_size,
                       precision=s.precision, resume="never", threads=threads),
        log=LogCfg(progress="off"),
    )
    task = lm_task(model, windows, windows, cfg, torch.device("cpu"),
                   flops_per_token(model, s.seq_len))
    return Trainer(cfg.train, cfg.optim, cfg.log, run_dir, model, task)


def peer_step(model: PreTrainedModel, batch: torch.Tensor, precision: str,
              lr: float) -> Callable[[], None]:
    """The step a plain PyTorch user writes: no accumulation, clipping, guard or metrics."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    inputs, targets = batch[:, :-1], batch[:, 1:]  # (B, T)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(input_ids=inputs).logits  # (B, T, V)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        loss.backward()
        opt.step()
        float(loss.detach())  # the loop reads the loss every step too

    return step


def make_gemm(m: int, k: int, n: int, dtype: torch.dtype, count: int = 1) -> Gemm:
    g = Gemm(torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype), count)
    g.a @ g.b  # first call pays for kernel selection and page faults
    return g


def model_gemms(model: PreTrainedModel, rows: int, dtype: torch.dtype) -> list[Gemm]:
    """Every nn.Linear GEMM of a training step at `rows` = B*T tokens: forward y = x W^T,
    input grad dx = dy W and weight grad dW = dy^T x (attention's QK^T and AV left out)."""
    counts: Counter[tuple[int, int, int]] = Counter()
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            k, n = mod.in_features, mod.out_features
            counts[(rows, k, n)] += 1
            counts[(rows, n, k)] += 1
            counts[(n, rows, k)] += 1
    return [make_gemm(m, k, n, dtype, c) for (m, k, n), c in counts.items()]


def sample_gemms(gemms: list[Gemm], seconds: float) -> None:
    """Time each shape for about seconds / len(gemms); keep its best time per call."""
    for g in gemms:
        iters, t0 = 0, time.perf_counter()
        while True:
            g.a @ g.b
            iters += 1
            dt = time.perf_counter() - t0
            if dt >= seconds / len(gemms):
                break
        g.best_s = min(g.best_s, dt / iters)


def gemm_gflops(gemms: list[Gemm]) -> float:
    """GFLOP/s of the whole set run as often as its counts say: total FLOPs / total time."""
    return sum(g.count * g.flops for g in gemms) / sum(g.count * g.best_s for g in gemms) / 1e9


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(s: Setup, args: argparse.Namespace, tmp: Path) -> tuple[Timing, PreTrainedModel]:
    """Warm both steps up, then interleave loop step, peer step and the two roofline samples."""
    model = build_model(s.preset, s.attn)
    peer_model = copy.deepcopy(model)
    windows = random_windows(tmp, s.seq_len)
    trainer = make_trainer(model, windows, s, tmp / "run", args.threads)
    batch = windows.batch(0, 0, s.micro_batch_size)  # (B, T+1)
    peer = peer_step(peer_model, batch, s.precision, trainer.optim_cfg.lr)
    dtype, n = DTYPES[s.precision], args.matmul_size
    t = Timing([], [], [make_gemm(n, n, n, dtype)],
               model_gemms(model, s.micro_batch_size * s.seq_len, dtype))
    for _ in range(args.warmup):
        trainer.train_step()
        peer()
    for i in range(args.steps):
        # alternate who goes first, so neither always runs right after the matmul samples
        pair = [(t.loop_s, trainer.train_step), (t.peer_s, peer)]
        for times, fn in pair if i % 2 == 0 else pair[::-1]:
            times.append(timed(fn))
        sample_gemms(t.square, args.matmul_seconds)
        sample_gemms(t.model, args.matmul_seconds)
    return t, model


def table_rows(s: Setup, t: Timing, model: PreTrainedModel) -> list[list[str]]:
    tokens = s.micro_batch_size * s.seq_len
    fpt = flops_per_token(model, s.seq_len)
    square, gemm = gemm_gflops(t.square), gemm_gflops(t.model)
    loop_tps, peer_tps = tokens / min(t.loop_s), tokens / min(t.peer_s)
    target = TARGETS.get((s.preset, s.precision))
    out = []
    for impl, times, tps in (("lmforge", t.loop_s, loop_tps), ("peer", t.peer_s, peer_tps)):
        achieved = fpt * tps / 1e9
        best, med = min(times), statistics.median(times)
        verdict = ""
        if target is not None and impl == "lmforge":
            ok = achieved / square >= target
            verdict = f">={target:.0%} {'PASS' if ok else 'FAIL'}"
        out.append([
            s.preset, s.precision, impl, f"{count_params(model)[1] / 1e6:.1f}M",
            f"{best * 1e3:.0f}", f"{med * 1e3:.0f}", f"{tps:,.0f}",
            f"{achieved:.1f}", f"{square:.0f}", f"{achieved / square:.0%}", f"{gemm:.0f}",
            f"{achieved / gemm:.0%}", f"{tps / peer_tps:.2f}", verdict,
        ])
    return out


def print_table(rows: list[list[str]], n: int) -> None:
    header = ["preset", "prec", "impl", "params", "best ms", "median ms", "tok/s", "GFLOP/s",
              f"mm{n} GF/s", f"% mm{n}", "model mm GF/s", "% model mm", "vs peer",
              f"target (% mm{n})"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", default="tiny,small", help="comma-separated: tiny,small")
    p.add_argument("--precisions", default=None,
                   help="comma-separated: fp32,bf16 (default: fp32, plus bf16 where precision "
                        "auto picks it on this CPU; slow bf16 is skipped unless asked for)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps per config (best-of)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per config first")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch intra-op threads (train.threads); default: torch's")
    p.add_argument("--matmul-size", type=int, default=1024, help="n of the n x n roofline")
    p.add_argument("--matmul-seconds", type=float, default=0.25,
                   help="seconds per roofline sample (one per timed step, each roofline)")
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    args = p.parse_args(argv)
    for name in args.presets.split(","):
        if name not in ("tiny", "small"):
            p.error(f"--presets: {name!r} is not tiny or small")
    for name in (args.precisions or "fp32").split(","):
        if name not in ("fp32", "bf16"):
            p.error(f"--precisions: {name!r} is not fp32 or bf16")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    auto = choose("auto", "cpu")
    print(f"CPU features: {', '.join(cpu_features()) or 'none declared'}")
    print(f"auto: {auto.line()}", flush=True)
    if args.precisions is None:
        args.precisions = "fp32,bf16" if auto.name == "bf16" else "fp32"
    load = os.getloadavg()[0]
    rows: list[list[str]] = []
    t_start = time.perf_counter()
    for preset in args.presets.split(","):
        for precision in args.precisions.split(","):
            s = Setup(preset, precision, args.seq_len, args.micro_batch_size, args.attn)
            with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as tmp:
                timing, model = measure(s, args, Path(tmp))
            rows.extend(table_rows(s, timing, model))
    print(f"pretrain throughput: llama, vocab {VOCAB}, seq_len {args.seq_len}, micro-batch "
          f"{args.micro_batch_size}, attn {args.attn}, {args.threads} threads, torch "
          f"{torch.__version__}; {args.warmup} warmup + {args.steps} timed steps")
    print_table(rows, args.matmul_size)
    print(f"tok/s and GFLOP/s (flops_per_token x tok/s) from the best step. mm{args.matmul_size}: "
          f"{args.matmul_size}^3 matmul; model mm: the model's Linear GEMMs (fwd, dx, dW at B*T "
          "rows, attention excluded); both same dtype, best time, sampled between the timed "
          "steps. vs peer: tok/s over the plain PyTorch step's (no clipping, for-loop AdamW). "
          f"Load average at start {load:.2f}; total {time.perf_counter() - t_start:.0f}s.")


if __name__ == "__main__":
    main()
