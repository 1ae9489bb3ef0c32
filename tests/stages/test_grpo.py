"""The grpo stage on the tiny pipeline's DPO model and the synthetic task: the first step's loss
is the policy gradient worked from the logged rollouts, dynamic sampling keeps only groups with
signal, SIGTERM + resume repeats an uninterrupted run exactly (one pass per batch, and
mid-batch with several), and bad settings are one line with exit 2."""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.config import RmCfg, load_config
from lmforge.io import read_jsonl
from lmforge.rl.config import GrpoCfg
from lmforge.stages import run_stage
from tests.conftest import ROOT, run_cli, spawn

# keys that measure time or memory, not what was computed
TIMING = ("time/", "tokens_per_s", "peak_mem_mb", "step_s")


def grpo(tiny_run: Path, out: Path, *over: str) -> dict:
    cfg = load_config(GrpoCfg, ROOT / "configs/grpo/tiny.yaml",
                      [f"model.path={tiny_run / 'dpo'}", f"run.dir={out}", "log.progress=off",
                       "eval.task=null", *over])
    return run_stage("grpo", cfg)


def _rows(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)}
            for r in read_jsonl(run / "metrics.jsonl")]


def _same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_pipeline_grpo_outputs(tiny_run: Path) -> None:
    s = json.loads((tiny_run / "grpo" / "summary.json").read_text())
    assert s["steps"] == 3 and s["rollouts"]["per_step"] == 8
    assert set(s["time_per_step_s"]) == {"gen", "reward", "train", "sync"}
    assert s["after"]["pass_at_1"]["n_per_group"] == {"d1": 4, "d2": 4, "d3": 4, "d4": 4, "unseen": 4}
    row = read_jsonl(tiny_run / "grpo" / "metrics.jsonl")[0]
    for k in ("reward/mean", "reward/std", "reward/code/mean", "reward/format/mean", "pass_rate",
              "kl", "clip_frac", "entropy", "completion/len", "is/gap", "time/gen_s",
              "time/reward_s", "time/train_s", "groups/dropped"):
        assert k in row, k
    report = (tiny_run / "report.md").read_text()
    assert "## Online RL" in report and "| grpo |" in report


def test_first_step_is_the_policy_gradient(tiny_run: Path, tmp_path: Path) -> None:
    """At step 1 the policy is the sampler (ratio exp(0) = 1, no clipping) and the reference
    (KL 0), so token_mean's loss is -sum_i A_i n_i / sum_i n_i over the logged rollouts
    (A_i the group-normalized reward, n_i the completion's tokens). fp32 sums of 8 terms of
    order 1: a few ulps; 1e-5 bounds that and catches any misweighted sequence (>= 1e-2).
    The reward is a reward model's (a few steps of the rm stage on the tiny pairs): a scalar
    that tells every answer apart, so every group has signal, on any CPU's draws."""
    rm = run_stage("rm", load_config(RmCfg, ROOT / "configs/rm/tiny.yaml", [
        f"model.path={tiny_run / 'sft'}", f"data.train={tiny_run / 'pairs'}",
        f"run.dir={tmp_path / 'rm'}", "train.max_steps=2", "train.eval_every=0",
        "log.progress=off"]))
    grpo(tiny_run, tmp_path / "g", "train.max_steps=1",
         f"rewards=[{{kind: reward_model, path: {rm['final_dir']}}}]")
    rows = [r for r in read_jsonl(tmp_path / "g" / "rollouts.jsonl") if r["step"] == 1]
    adv = torch.tensor([r["advantage"] for r in rows], dtype=torch.float64)
    n = torch.tensor([r["tokens"] for r in rows], dtype=torch.float64)
    rewards = torch.tensor([r["reward"] for r in rows], dtype=torch.float64).view(-1, 4)
    want_adv = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).flatten()
    torch.testing.assert_close(adv, want_adv, atol=1e-6, rtol=0)
    assert bool((adv != 0).any()), "the check needs a group whose rewards differ"
    m = read_jsonl(tmp_path / "g" / "metrics.jsonl")[0]
    assert m["ratio/mean"] == 1.0 and m["clip_frac"] == 0.0 and abs(m["kl"]) < 1e-5
    assert abs(m["pg_loss"] - float(-(adv * n).sum() / n.sum())) < 1e-5


def test_dynamic_sampling_keeps_only_groups_with_signal(tiny_run: Path, tmp_path: Path) -> None:
    """Kept groups all have signal; only when none was found does the step fall back to the
    last draw, whose groups then all lack it. Every step's rows say which happened."""
    grpo(tiny_run, tmp_path / "d", "dynamic_sampling_rounds=3", "train.max_steps=2")
    for r in read_jsonl(tmp_path / "d" / "metrics.jsonl"):
        want = 0 if r["groups/kept"] > 0 else 2  # 2 = rollout.prompts_per_step
        assert r["groups/zero_signal"] == want, r
        assert r["groups/refills"] <= 3 and r["groups/kept"] <= 2


def _wait_for_step(run: Path, step: int, proc, timeout: float = 240) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        rows = read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []
        if any(r.get("step", 0) >= step for r in rows):
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    raise AssertionError("the run did not reach the step")


def test_sigterm_then_resume_is_exact(tiny_run: Path, tmp_path: Path) -> None:
    """Killed with SIGTERM after step 1, resumed: the same rows (rewards, losses, KL) and the
    same final weights, bit for bit, as a run never interrupted: rollout RNG and the prompt
    stream are functions of (seed, step), the weights and optimizer come from the checkpoint."""
    over = ["train.max_steps=3", "optim.lr=1e-3", "loss.entropy_coef=0.01"]
    grpo(tiny_run, tmp_path / "straight", *over)
    run = tmp_path / "split"
    args = [sys.executable, "-m", "lmforge.cli", "grpo", str(ROOT / "configs/grpo/tiny.yaml"),
            f"model.path={tiny_run / 'dpo'}", f"run.dir={run}", "log.progress=off",
            "eval.task=null", *over]
    proc = spawn(args, cwd=tmp_path)
    _wait_for_step(run, 1, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err[-2000:]
    assert len(read_jsonl(run / "metrics.jsonl")) < 3  # it did stop before the end
    r = run_cli(*args[3:], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _rows(run) == _rows(tmp_path / "straight")
    assert _same_weights(tmp_path / "straight" / "final", run / "final")


def test_resume_mid_batch_with_several_passes(tiny_run: Path, tmp_path: Path) -> None:
    """mu = 2: a checkpoint after the first pass over a batch carries the batch; the resumed
    run's second pass uses it (not fresh rollouts from the updated policy)."""
    over = ["mu=2", "train.max_steps=4", "train.save_every=1", "train.keep_last=4",
            "optim.lr=1e-3", "loss.entropy_coef=0.01"]
    grpo(tiny_run, tmp_path / "straight", *over)
    shutil.copytree(tmp_path / "straight/checkpoints/step-1", tmp_path / "split/checkpoints/step-1")
    grpo(tiny_run, tmp_path / "split", *over)
    assert _rows(tmp_path / "split") == _rows(tmp_path / "straight")[1:]
    assert _same_weights(tmp_path / "straight/final", tmp_path / "split/final")
    rows = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    assert rows[0]["ratio/mean"] == 1.0 and rows[1]["ratio/mean"] != 1.0  # pass 2 is off-policy


@pytest.mark.parametrize("over, needle", [
    (["rewards=[{kind: nope}]"], "nope"),
    (["rewards=[{kind: answer}]"], "answer"),
    (["loss.beta=0.1", "ref.kind=none"], "beta"),
    (["rollout.group_size=1"], "group_size"),
    (["train.grad_accum=2"], "grad_accum"),
    (["data.train=gsm8k:/nonexistent/gsm8k.jsonl", "rewards=[{kind: answer}]"], "gsm8k"),
])
def test_bad_settings_are_one_line(tiny_run: Path, tmp_path: Path, over: list[str], needle: str) -> None:
    r = run_cli("grpo", str(ROOT / "configs/grpo/tiny.yaml"), f"model.path={tiny_run / 'dpo'}",
                f"run.dir={tmp_path / 'out'}", *over, cwd=tmp_path)
    assert r.returncode == 2, (over, r.stderr[-800:])
    assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr


@pytest.mark.parametrize("over", [["lora.method=lora"], ["ref.kind=frozen"]])
def test_reference_is_the_starting_policy(tiny_run: Path, tmp_path: Path, over: list[str]) -> None:
    """Under LoRA the reference is the adapter-disabled base (no second model), else a frozen
    copy: either way it equals the policy at step 1 (LoRA's B starts at 0), so the k3 KL there
    is 0 up to fp32 rounding of identical forwards (~1e-7 per token; 1e-5 bounds it)."""
    s = grpo(tiny_run, tmp_path / "r", "train.max_steps=1", *over)
    assert ("adapter-disabled" in s["reference"]) == (over == ["lora.method=lora"])
    assert abs(read_jsonl(tmp_path / "r" / "metrics.jsonl")[0]["kl"]) < 1e-5
