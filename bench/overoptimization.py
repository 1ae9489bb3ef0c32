"""Reward over-optimization, measured (Gao et al. 2023): as a policy is pushed against a proxy
reward model, the proxy score keeps rising while the true quality first rises, then falls.

The proxy: reward models (`lmforge rm`) trained on a small share of the demo's execution-judged
pairs. The gold score: the sandbox's verdict on the very same rollouts (the fraction whose
program passes its tests), computed every step as a reward of weight 0, so it is logged and
never optimized. Each run is one `lmforge ppo` or `lmforge grpo` process from the demo's SFT
model with a high learning rate (pushed hard on purpose), its rows read from metrics.jsonl:

- ppo, KL 0.05 / KL 0: the penalty's effect on how far the policy drifts;
- ppo, length-normalized RM: the reward model trained with `length_normalize` (its
  length slope subtracted at scoring);
- ppo, ensemble mean / ensemble min: three reward models trained with different seeds,
  combined per answer (Coste et al. 2023);
- grpo, KL 0.04 on the same proxy.

Prints one table (per run: the sequence KL, proxy and gold at the start and end, and the
gold's peak and where it was) and writes overoptimization.png (proxy and gold against KL) and
report.md to --out. Needs the demo's SFT model and pairs (`make demo`); --quick runs a few
steps per run to check the plumbing.

    python bench/overoptimization.py                  # ~10 min on 2 CPU cores (6 runs)
    python bench/overoptimization.py --quick --runs ppo-kl,ppo-nokl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine, write_report  # noqa: E402
from lmforge.io import read_jsonl  # noqa: E402

GOLD = {"kind": "code", "weight": 0.0}  # logged as reward/code/mean, never optimized


def proxy(paths: list[str], combine: str = "mean") -> dict[str, Any]:
    return {"kind": "reward_model", "path": paths if len(paths) > 1 else paths[0],
            "combine": combine, "batch_size": 64}


def lmforge(args: list[str], log: Path) -> float:
    """One CLI process; its output to `log`; seconds. A failure is one line and exit 1."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        r = subprocess.run([sys.executable, "-m", "lmforge.cli", *args], stdout=f,
                           stderr=subprocess.STDOUT, cwd=ROOT, env=os.environ)
    if r.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        sys.exit(f"{args[0]} failed (exit {r.returncode}): {tail[0]}; log {log}")
    return time.perf_counter() - t0


def train_rms(a: argparse.Namespace, out: Path) -> dict[str, str]:
    """The proxies: three seeds on the same few pairs, and one with its length slope fitted."""
    rms = {}
    for name, extra in (("rm-s0", ["length_normalize=false"]),
                        ("rm-s1", ["length_normalize=false", "train.seed=1"]),
                        ("rm-s2", ["length_normalize=false", "train.seed=2"]),
                        ("rm-len", ["length_normalize=true"])):
        run = out / name
        if a.report_only and not (run / "summary.json").exists():
            sys.exit(f"--report-only: {run} has no finished reward model; run the bench first")
        if not (run / "summary.json").exists():
            s = lmforge(["rm", "configs/rm/tiny.yaml", f"model.path={a.policy}",
                         f"data.train={a.pairs}", f"data.limit={a.rm_pairs}",
                         "data.val_fraction=0.25", f"train.max_steps={a.rm_steps}",
                         "train.eval_every=0", f"run.dir={run}", "log.progress=off",
                         "data.max_length=256", *extra], out / f"{name}.log")
            print(f"{name}: trained in {s:.0f}s", flush=True)
        rms[name] = str(run / "final")
    return rms


def runs(rms: dict[str, str]) -> dict[str, tuple[str, list[str], dict[str, Any]]]:
    """name -> (stage, overrides, the proxy reward)."""
    ens = [rms["rm-s0"], rms["rm-s1"], rms["rm-s2"]]
    return {
        "ppo-kl": ("ppo", ["kl.coef=0.05"], proxy([rms["rm-s0"]])),
        "ppo-nokl": ("ppo", ["kl.coef=0"], proxy([rms["rm-s0"]])),  # KL measured, not penalized
        "ppo-lennorm": ("ppo", ["kl.coef=0.05"], proxy([rms["rm-len"]])),
        "ppo-ens-mean": ("ppo", ["kl.coef=0.05"], proxy(ens, "mean")),
        "ppo-ens-min": ("ppo", ["kl.coef=0.05"], proxy(ens, "min")),
        "grpo-kl": ("grpo", ["loss.beta=0.04"], proxy([rms["rm-s0"]])),
    }


def run_rl(a: argparse.Namespace, out: Path, name: str, stage: str, over: list[str],
           reward: dict[str, Any]) -> Path:
    run = out / name
    rewards = json.dumps([reward, GOLD])
    common = [f"model.path={a.policy}", f"run.dir={run}", "log.progress=off", "eval.task=null",
              f"rewards={rewards}", f"train.max_steps={a.steps}", f"optim.lr={a.lr}",
              "rollout.max_new_tokens=64", "task.n_train=4000", "task.n_eval=200",
              "train.precision=auto", "log.every=1", "train.save_every=0"]
    shape = (["rollout.group_size=1", "rollout.prompts_per_step=16", "train.micro_batch_size=16",
              "mu=2"] if stage == "ppo" else
             ["rollout.group_size=4", "rollout.prompts_per_step=4", "train.micro_batch_size=16"])
    s = lmforge([stage, f"configs/{stage}/tiny.yaml", *common, *shape, *over], out / f"{name}.log")
    print(f"{name}: {a.steps} steps in {s:.0f}s", flush=True)
    return run


def curve(run: Path, stage: str) -> list[dict[str, float]]:
    """Per logged step: sequence KL to the reference, proxy score, gold pass rate."""
    out = []
    for r in read_jsonl(run / "metrics.jsonl"):
        if "reward/code/mean" not in r:
            continue
        if stage == "ppo":
            kl = r.get("kl/seq", 0.0)
        else:  # GRPO logs the per-token k3 estimate: times the mean length, a sequence KL
            kl = r.get("kl", 0.0) * r.get("completion/len", 0.0)
        out.append({"step": r["step"], "kl": kl, "proxy": r["reward/reward_model/mean"],
                    "gold": r["reward/code/mean"]})
    return out


def window(rows: list[dict[str, float]]) -> int:
    """Steps per block: a sixth of the run, at least 5 (one step's 16 rollouts are noisy)."""
    return max(5, len(rows) // 6)


def smooth(rows: list[dict[str, float]], key: str) -> list[float]:
    """A trailing mean over a block of steps."""
    v, w = [r[key] for r in rows], window(rows)
    return [sum(v[max(0, i - w + 1): i + 1]) / len(v[max(0, i - w + 1): i + 1]) for i in range(len(v))]


def blocks(rows: list[dict[str, float]], key: str) -> list[float]:
    """Means over consecutive blocks of steps: the first is the start, the last the end."""
    w = window(rows)
    return [sum(r[key] for r in rows[i:i + w]) / len(rows[i:i + w]) for i in range(0, len(rows), w)]


def table(curves: dict[str, list[dict[str, float]]]) -> str:
    lines = ["| run | steps | KL (nats/seq) first -> last block | proxy first -> last | gold first "
             "-> last | gold best block (steps) | gold last - best |", "|---|---:|---|---|---|---:|---:|"]
    for name, rows in curves.items():
        if not rows:
            continue
        kl, p, g, w = blocks(rows, "kl"), blocks(rows, "proxy"), blocks(rows, "gold"), window(rows)
        best = max(range(len(g)), key=g.__getitem__)
        lines.append(f"| {name} | {len(rows)} | {kl[0]:.2f} -> {kl[-1]:.2f} | {p[0]:.3f} -> "
                     f"{p[-1]:.3f} | {g[0]:.1%} -> {g[-1]:.1%} | {g[best]:.1%} "
                     f"({best * w + 1}-{min(len(rows), (best + 1) * w)}) | {g[-1] - g[best]:+.1%} |")
    return "\n".join(lines)


def plot(curves: dict[str, list[dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in curves.items():
        kl = smooth(rows, "kl")  # one step's KL is noisy too: the same trailing mean
        axes[0].plot(kl, smooth(rows, "proxy"), label=name)
        axes[1].plot(kl, smooth(rows, "gold"), label=name)
    for ax, title in zip(axes, ("proxy reward (RM score)", "gold (sandbox pass rate)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("KL to the reference (nats per completion, trailing block mean)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", type=Path, default=ROOT / "runs/demo/sft")
    ap.add_argument("--pairs", type=Path, default=ROOT / "runs/demo/pairs")
    ap.add_argument("--rm-pairs", type=int, default=96, help="pairs the proxy RMs train on")
    ap.add_argument("--rm-steps", type=int, default=40)
    ap.add_argument("--steps", type=int, default=60, help="RL steps per run")
    ap.add_argument("--lr", type=float, default=1e-4, help="high on purpose: push the proxy")
    ap.add_argument("--runs", help="comma list (default: all)")
    ap.add_argument("--quick", action="store_true", help="4 RL steps, 10 RM steps: plumbing only")
    ap.add_argument("--report-only", action="store_true",
                    help="rebuild the table and plot from the runs already in --out")
    ap.add_argument("--out", type=Path, default=ROOT / "runs/bench-overoptimization")
    a = ap.parse_args()
    for p, what in ((a.policy, "the demo's SFT model"), (a.pairs, "the demo's pairs")):
        if not p.exists():
            sys.exit(f"{p} missing: {what} (run `make demo` first, or pass --policy/--pairs)")
    if a.quick:
        a.steps, a.rm_steps = 4, 10
    a.out.mkdir(parents=True, exist_ok=True)
    rms = train_rms(a, a.out)  # trained ones are reused
    todo = runs(rms)
    names = [n.strip() for n in a.runs.split(",")] if a.runs else list(todo)
    if bad := [n for n in names if n not in todo]:
        sys.exit(f"--runs: unknown {bad}; choose from {list(todo)}")
    curves = {}
    for name in names:
        stage, over, reward = todo[name]
        run = a.out / name if a.report_only else run_rl(a, a.out, name, stage, over, reward)
        curves[name] = curve(run, stage)
    head = (f"{machine()}; policy {a.policy}; proxies trained on {a.rm_pairs} pairs "
            f"({a.rm_steps} steps); {a.steps} RL steps at lr {a.lr:g}; blocks of a sixth of the "
            "run (at least 5 steps)")
    plot(curves, a.out / "overoptimization.png")
    write_report(a.out, "Reward over-optimization", head, table(curves), "overoptimization.png",
                 "proxy and gold against KL")


if __name__ == "__main__":
    main()
