"""`lmforge plan`'s formulas against what a real run holds, on this machine.

Measured here, in fp32 on the CPU:
- activations: every tensor autograd saves for backward in one training forward of the
  `nano` and `tiny` presets (each storage counted once, weights excluded), with and without
  activation checkpointing, at several sequence lengths and micro-batches;
- model state after one AdamW step: the bytes of the weights, the gradients and the
  optimizer's state tensors, for full fine-tuning and for LoRA r16 on every linear layer.

Not measurable on one CPU process: the per-rank state under DDP and FSDP (the formulas for
sharding are checked by hand in tests/test_plan.py). Prints one table with the error of each
formula; exit 1 when any error exceeds --tolerance.

    python bench/plan_vs_measured.py            # ~20 s
"""

from __future__ import annotations

import argparse
import sys
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


def state_bytes(model: Any, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()
                if p.grad is not None)
    opt = sum(t.numel() * t.element_size() for st in optimizer.state.values()
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--tolerance", type=float, default=0.01, help="largest relative error allowed")
    a = ap.parse_args()
    rows = activation_rows(a.vocab) + state_rows(a.vocab)
    lines = ["| quantity | model, setting | formula | measured | error |", "|---|---|---:|---:|---:|"]
    worst = 0.0
    for what, setting, want, got in rows:
        err = got / want - 1 if want else float(got != 0)
        worst = max(worst, abs(err))
        lines.append(f"| {what} | {setting} | {want / 1e6:,.3f} MB | {got / 1e6:,.3f} MB | "
                     f"{err:+.4%} |")
    print(f"{machine()}; fp32, torch {torch.__version__}\n")
    print("\n".join(lines))
    print(f"\nlargest error {worst:.4%} (tolerance {a.tolerance:.2%}); per-rank DDP / FSDP "
          "state is not measured in one process")
    if worst > a.tolerance:
        sys.exit(1)


if __name__ == "__main__":
    main()
