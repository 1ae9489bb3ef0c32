"""Dark knowledge, measured: one teacher, one student start, equal steps; the student trained
on the teacher's soft targets at T in {1, 2, 4} against the same student trained on the hard
labels alone, with held-out loss and pass@1 on the synthetic code task in one table.

    python bench/distill.py                           # after `make demo`: teacher runs/demo/sft
    python bench/distill.py --quick                   # 4 rows, fewer steps and problems
    python bench/distill.py --steps 300 --rows "hard labels" "soft T=2"

The claim (Hinton et al. 2015): a teacher's full next-token distribution says more per token
than the one label the data holds (which wrong answers are nearly right, how sure it is), so a
student matching it learns more from the same examples. Every row runs the same student start,
data order, schedule and number of steps; only the loss changes. "soft" rows are alpha = 1 (the
teacher's distribution alone, no hard labels), so the comparison isolates the targets; one row
mixes the two (alpha 0.5), and with --extra reverse KL, JSD and on-policy (GKD) rows follow.

The student is the teacher's layers 0 and 3 (of 4), embeddings and output layer included
(DistilBERT's start, Sanh et al. 2019): half the depth, 55% of the parameters. "val loss" is
the held-out hard cross-entropy on the answer tokens (the same measure for every row, whatever
its training loss); "agree" the share of held-out answer positions where the student's top
token is the teacher's; pass@1 is greedy on the held-out problems, code run in the sandbox.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmforge.compress.config import DistillCfg  # noqa: E402
from lmforge.config import load_config  # noqa: E402
from lmforge.io import read_jsonl  # noqa: E402
from lmforge.stages import run_stage  # noqa: E402
from lmforge.train.precision import cpu_features, cpu_name  # noqa: E402

SOFT = ["loss.kind=forward_kl", "loss.alpha=1"]
ROWS: dict[str, list[str]] = {
    "hard labels (alpha 0)": ["loss.alpha=0"],
    "soft T=1": [*SOFT, "loss.temperature=1"],
    "soft T=2": [*SOFT, "loss.temperature=2"],
    "soft T=4": [*SOFT, "loss.temperature=4"],
    "soft + hard, alpha 0.5, T=2": ["loss.kind=forward_kl", "loss.alpha=0.5", "loss.temperature=2"],
}
EXTRA: dict[str, list[str]] = {
    "reverse KL T=1": ["loss.kind=reverse_kl", "loss.alpha=1", "loss.temperature=1"],
    "JSD(0.5) T=1": ["loss.kind=jsd", "loss.alpha=1", "loss.temperature=1"],
    "on-policy 50%, JSD(0.5) T=1": ["loss.kind=jsd", "loss.alpha=1", "loss.temperature=1",
                                    "on_policy.fraction=0.5", "on_policy.max_new_tokens=96"],
}
QUICK = ["hard labels (alpha 0)", "soft T=1", "soft T=2", "soft T=4"]
GROUPS = ["d1", "d2", "d3", "d4", "unseen"]


def run_row(name: str, over: list[str], a: argparse.Namespace, teacher_eval: bool) -> dict[str, Any]:
    out = Path(a.out) / name.replace(" ", "_").replace(",", "").replace("=", "").replace("%", "")
    cfg = load_config(DistillCfg, ROOT / "configs/distill/demo.yaml", [
        f"teacher.path={a.teacher}", f"student_layers=[{a.layers}]", f"run.dir={out}",
        f"train.max_steps={a.steps}", "train.time_budget_s=null", "train.resume=never",
        "train.eval_every=0", "train.final=last",  # equal steps: the last weights, not the best
        f"train.threads={a.threads}", "eval.before=false", f"eval.teacher={str(teacher_eval).lower()}",
        f"eval.after_n={a.n_eval}", f"task.n_eval={a.n_eval}", f"task.n_train={a.n_train}",
        "log.progress=off", *over])
    t0 = time.perf_counter()
    s = run_stage("distill", cfg)
    val = [r for r in read_jsonl(out / "metrics.jsonl") if "val_loss" in r][-1]
    return {"name": name, "s": s, "val": val, "wall": time.perf_counter() - t0}


def pass_cells(p: dict[str, Any]) -> str:
    n = p["n_per_group"]
    total = sum(p[g] * n[g] for g in GROUPS) / sum(n[g] for g in GROUPS)
    return " | ".join(f"{p[g]:.0%}" for g in GROUPS) + f" | {total:.1%}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="runs/demo/sft")
    ap.add_argument("--layers", default="0,3", help="the teacher's layers the student keeps")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--n-eval", type=int, default=50, help="held-out problems per group")
    ap.add_argument("--n-train", type=int, default=4000,
                    help="training problems (fewer: the data-starved regime of Hinton et al.'s MNIST-3%%)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    ap.add_argument("--rows", nargs="*", help="run only these rows (names as printed)")
    ap.add_argument("--extra", action="store_true", help="also reverse KL, JSD and on-policy rows")
    ap.add_argument("--quick", action="store_true", help="4 rows, 60 steps, 20 problems per group")
    ap.add_argument("--out", default="runs/bench-distill")
    a = ap.parse_args()
    if a.quick:
        a.steps, a.n_eval = min(a.steps, 60), min(a.n_eval, 20)
    torch.set_num_threads(a.threads)
    table = {**ROWS, **(EXTRA if a.extra else {})}
    names = a.rows or (QUICK if a.quick else list(table))
    unknown = [n for n in names if n not in {**ROWS, **EXTRA}]
    if unknown:
        sys.exit(f"unknown row {unknown[0]!r}; rows: {', '.join({**ROWS, **EXTRA})}")
    t0 = time.perf_counter()
    results = [run_row(n, {**ROWS, **EXTRA}[n], a, teacher_eval=i == 0) for i, n in enumerate(names)]
    teacher = results[0]["s"]["teacher"]
    s0 = results[0]["s"]
    c = load_config(DistillCfg, ROOT / "configs/distill/demo.yaml")
    print(f"\nDistillation at equal steps ({a.steps} each, {c.train.micro_batch_size} packed rows "
          f"of {c.data.max_length} tokens, lr {c.optim.lr:g} {c.optim.schedule}, seed "
          f"{c.train.seed}; soft rows alpha 1). Teacher {a.teacher}: "
          f"{teacher['params']:,} params; student: its layers [{a.layers}], {s0['params']:,} params; "
          f"{a.n_train} training problems. "
          f"pass@1 greedy on {a.n_eval} held-out problems per group.\n"
          f"CPU: {cpu_name()} ({', '.join(cpu_features())}); torch {torch.__version__}; "
          f"{a.threads} thread(s); {time.perf_counter() - t0:.0f} s in all.\n")
    print("| run | val loss | agree | " + " | ".join(GROUPS) + " | all | train s | row s |")
    print("|---|---:|---:|" + "---:|" * len(GROUPS) + "---:|---:|---:|")
    print(f"| teacher | {teacher['val_loss']:.3f} | 100% | {pass_cells(teacher['pass_at_1'])} | | |")
    for r in results:
        s, v = r["s"], r["val"]
        print(f"| {r['name']} | {v['val_loss']:.3f} | {v['val_agree']:.1%} | "
              f"{pass_cells(s['after']['pass_at_1'])} | {s['train_time_s']:.0f} | {r['wall']:.0f} |")


if __name__ == "__main__":
    main()
