"""`lmforge plan`'s formulas against what a real run holds, on this machine.

Measured here, in fp32 on the CPU:
- activations: every tensor autograd saves for backward in one training forward of the
  `nano` and `tiny` presets (each storage counted once, weights excluded), with and without
  activation checkpointing, at several sequence lengths and micro-batches;
- model state after one AdamW step: the bytes of the weights, the gradients and the
  optimizer's state tensors, for full fine-tuning and for LoRA r16 on every linear layer;
- the same per rank on 2 processes (gloo), under DDP (ZeRO-0: all replicated) and under FSDP2
  as the loop applies it (ZeRO-3: each rank holds its shards), measured on each rank's local
  tensors after the step (the larger rank's).

Prints one table with the error of each formula; exit 1 when any error exceeds --tolerance.

    python bench/plan_vs_measured.py            # ~30 s
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402
from lmforge import plan  # noqa: E402
from lmforge.config import ModelCfg  # noqa: E402
from lmforge.models import preset_config  # noqa: E402


def model_of(preset: str, vocab: int) -> tuple[Any, plan.Shape]:
    from transformers import AutoModelForCausalLM

    cfg = preset_config(ModelCfg(preset=preset), vocab, None, None, None)  # type: ignore[arg-type]
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).train(), plan.shape_of_config(cfg)


def activation_rows(vocab: int) -> list[tuple[str, str, float, float]]:
    rows = []
    for preset in ("nano", "tiny"):
        model, shape = model_of(preset, vocab)
        for ckpt in (False, True):
            if ckpt:
                model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
            for seq, batch in ((256, 8), (512, 2), (64, 16)):
                parts = plan.activation_parts(shape, seq, batch, checkpointing=ckpt, act_bytes=4.0)
                # what the forward saves; the block rebuilt in backward is not among it
                want = parts["blocks"] + parts["head"]
                got = plan.saved_bytes(model, torch.randint(0, vocab, (batch, seq)))
                rows.append((f"activations, {'checkpointed' if ckpt else 'all kept'}",
                             f"{preset}, seq {seq} x {batch}", want, got))
    return rows


def _local_bytes(t: torch.Tensor) -> int:
    """A tensor's bytes on this rank: a sharded one's (DTensor) local shard only."""
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def state_bytes(model: Any, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    weights = sum(_local_bytes(p) for p in model.parameters())
    grads = sum(_local_bytes(p.grad) for p in model.parameters() if p.grad is not None)
    opt = sum(_local_bytes(t) for st in optimizer.state.values()
              for t in st.values() if torch.is_tensor(t) and t.dim() > 0)  # m, v; not `step`
    return {"weights": weights, "grads": grads, "optimizer": opt}


def state_rows(vocab: int) -> list[tuple[str, str, float, float]]:
    from peft import LoraConfig, get_peft_model

    rows = []
    for method in ("full", "lora"):
        model, shape = model_of("tiny", vocab)
        trainable = None
        if method == "lora":
            model = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear"))
            trainable = shape.lora_params(16)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        x = torch.randint(0, vocab, (2, 32))
        model(input_ids=x, labels=x, use_cache=False).loss.backward()
        optimizer.step()
        got = state_bytes(model, optimizer)
        want = plan.model_state(shape.params, method=method, trainable=trainable,  # type: ignore[arg-type]
                                weights="fp32", grads="fp32")
        for part in ("weights", "grads", "optimizer"):
            rows.append((f"model state: {part}", f"tiny, {method}", getattr(want, part), got[part]))
    return rows


def _rank(rank: int, world: int, out: str, parallel: str, vocab: int) -> None:
    """One rank: the tiny preset wrapped as the loop wraps it, one AdamW step, its state."""
    import torch.distributed as dist

    from lmforge.train import distributed

    dist.init_process_group("gloo", init_method=f"file://{out}.rdzv", rank=rank, world_size=world)
    try:
        model, _ = model_of("tiny", vocab)
        if parallel == "ddp":
            distributed.replicate(model)
        else:
            distributed.fully_shard_blocks(model, True, None)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randint(0, vocab, (2, 32))
        model(input_ids=x, labels=x, use_cache=False).loss.backward()
        optimizer.step()
        Path(f"{out}.{rank}").write_text(json.dumps(state_bytes(model, optimizer)))
    finally:
        dist.destroy_process_group()


def rank_rows(vocab: int) -> list[tuple[str, str, float, float]]:
    import torch.multiprocessing as mp

    rows = []
    _, shape = model_of("tiny", vocab)
    with tempfile.TemporaryDirectory() as tmp:
        for parallel, zero in (("ddp", 0), ("fsdp", 3)):
            out = f"{tmp}/{parallel}"
            mp.spawn(_rank, args=(2, out, parallel, vocab), nprocs=2, join=True)
            got = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
            want = plan.model_state(shape.params, zero=zero, gpus=2, weights="fp32", grads="fp32")
            for part in ("weights", "grads", "optimizer"):
                rows.append((f"per rank, 2 ranks: {part}", f"tiny, {parallel} (ZeRO-{zero})",
                             getattr(want, part), max(g[part] for g in got)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--tolerance", type=float, default=0.01, help="largest relative error allowed")
    a = ap.parse_args()
    rows = activation_rows(a.vocab) + state_rows(a.vocab) + rank_rows(a.vocab)
    lines = ["| quantity | model, setting | formula | measured | error |", "|---|---|---:|---:|---:|"]
    worst = 0.0
    for what, setting, want, got in rows:
        err = got / want - 1 if want else float(got != 0)
        worst = max(worst, abs(err))
        lines.append(f"| {what} | {setting} | {want / 1e6:,.3f} MB | {got / 1e6:,.3f} MB | "
                     f"{err:+.4%} |")
    print(f"{machine()}; fp32, torch {torch.__version__}\n")
    print("\n".join(lines))
    print(f"\nlargest error {worst:.4%} (tolerance {a.tolerance:.2%})")
    if worst > a.tolerance:
        sys.exit(1)


if __name__ == "__main__":
    main()
