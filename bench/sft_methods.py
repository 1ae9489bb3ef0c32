"""Full fine-tuning vs LoRA vs QLoRA on the demo's model at an equal wall-clock budget: one
table of held-out pass@1 per difficulty (synthetic code task, greedy).

    python bench/sft_methods.py [--base runs/demo/pretrain] [--seconds 90] [--n-eval 100]

Every run is the demo's SFT config with a constant learning rate (after warmup) and a time
limit instead of a step count, so each method gets the same seconds and no method's schedule
is cut short mid-decay. LoRA rows vary what the question "method or tuning?" needs: the
learning rate, and whether the chat template's special tokens (never seen in pretraining,
so their embeddings are untrained) may train.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUNS = {
    "full, lr 3e-3": ["lora.method=full", "optim.lr=3e-3"],
    "lora r32, lr 3e-3, template tokens frozen": ["lora.method=lora", "lora.r=32", "lora.alpha=64",
                                                  "optim.lr=3e-3", "lora.train_new_tokens=false"],
    "lora r32, lr 3e-3": ["lora.method=lora", "lora.r=32", "lora.alpha=64", "optim.lr=3e-3"],
    "lora r32, lr 5e-3": ["lora.method=lora", "lora.r=32", "lora.alpha=64", "optim.lr=5e-3"],
    "lora r32, lr 1e-2": ["lora.method=lora", "lora.r=32", "lora.alpha=64", "optim.lr=1e-2"],
    "qlora r32, lr 3e-3": ["lora.method=qlora", "lora.r=32", "lora.alpha=64", "optim.lr=3e-3"],
    "qlora r32, lr 1e-2": ["lora.method=qlora", "lora.r=32", "lora.alpha=64", "optim.lr=1e-2"],
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base", default="runs/demo/pretrain")
    p.add_argument("--corpus", default="runs/demo/corpus")
    p.add_argument("--seconds", type=float, default=90)
    p.add_argument("--n-eval", type=int, default=100)
    p.add_argument("--out", default="runs/bench-sft")
    p.add_argument("--only", nargs="*", help="run only these row names")
    a = p.parse_args()
    rows = []
    for name, extra in RUNS.items():
        if a.only and name not in a.only:
            continue
        out = Path(a.out) / name.replace(" ", "_").replace(",", "")
        cmd = [sys.executable, "-m", "lmforge.cli", "sft", "configs/sft/demo.yaml",
               f"model.path={a.base}", f"forgetting.general={a.corpus}", f"run.dir={out}",
               "train.max_steps=100000", f"train.time_limit_s={a.seconds}", "train.eval_every=0",
               "train.resume=never", "optim.schedule=constant", "eval.before=false",
               f"task.n_eval={a.n_eval}", "log.progress=off", *extra]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if r.returncode != 0:
            rows.append((name, None, r.stderr.strip().splitlines()[-1:]))
            continue
        rows.append((name, json.loads((out / "summary.json").read_text()), None))
        print(f"done: {name}", file=sys.stderr, flush=True)
    groups = ["d1", "d2", "d3", "d4", "unseen"]
    print(f"\nequal wall-clock: {a.seconds:.0f}s of training each; pass@1 on {a.n_eval} held-out "
          f"problems per group; base {a.base}\n")
    print("| method | trainable | steps | train loss | val loss | general ppl | "
          + " | ".join(groups) + " |")
    print("|---|---:|---:|---:|---:|---:|" + "---:|" * len(groups))
    for name, s, err in rows:
        if s is None:
            print(f"| {name} | error: {err} |")
            continue
        pa = s["after"]["pass_at_1"]
        print(f"| {name} | {s['trainable_params']:,} | {s['steps']} | {s['final_train_loss']:.3f} | "
              f"{s['final_val_loss']:.3f} | {s['after'].get('general_ppl', float('nan')):.1f} | "
              + " | ".join(f"{pa[g]:.0%}" for g in groups) + " |")


if __name__ == "__main__":
    main()
