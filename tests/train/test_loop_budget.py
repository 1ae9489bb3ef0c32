"""The loop's time budget, resume guards, logged means and finishing checks."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch

from lmforge.config import OptimCfg
from lmforge.errors import TrainingError, UserError
from lmforge.io import read_jsonl
from lmforge.train import checkpoint as ckpt
from lmforge.train.loop import CALIBRATION, Task, Trainer
from lmforge.train.progress import ProgressLog
from lmforge.train.schedules import lr_at
from tests.conftest import OPTIM, QUIET, lm_task, micro_llama, train_cfg

COS = OptimCfg(lr=1e-2, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)


def _sleepy_task(model: torch.nn.Module, windows, seconds: float) -> Task:
    """The pretrain task, each step made `seconds` slower: a slow machine, in miniature."""
    task = lm_task(model, windows, 2, 1)
    inner = task.step

    def step(b: torch.Tensor):
        time.sleep(seconds)
        return inner(b)

    task.step = step
    return task


def test_plan_arithmetic(tmp_path: Path, windows) -> None:
    """Worked numbers: 10 steps done in 1.0 s, median step 0.1 s, budget 11 s, no evaluation
    -> (11 - 1) / 0.1 = 100 more steps fit: the plan is 110 of max_steps 500."""
    model = micro_llama()
    tr = Trainer(train_cfg(max_steps=500, time_budget_s=11.0, final="last"), COS, QUIET,
                 tmp_path, model, _sleepy_task(model, windows, 0.0))
    tr.state.step = 10
    steps = [0.1] * 9 + [5.0]  # one slow outlier: the median ignores it
    assert tr._plan(steps, 1.0, ProgressLog("off", 500, 10, "")) is False
    assert tr.state.planned_steps == 110 and tr.max_steps == 110
    assert tr.state.budget["step_s"] == pytest.approx(0.1)
    # with evaluations: each costs what it took (timed now), every 10 steps, plus the final one
    tr.state.planned_steps = None
    tr.task.evaluate = lambda: (time.sleep(0.5), {"val_loss": 1.0})[1]
    tr.cfg = train_cfg(max_steps=500, time_budget_s=11.0, eval_every=10, final="last")
    tr._plan(steps, 1.0, ProgressLog("off", 500, 10, ""))
    eval_s = tr.state.budget["eval_s"]
    assert eval_s >= 0.5
    left = 11.0 - 1.0 - eval_s - eval_s  # the eval just run and the final one
    assert tr.state.planned_steps == 10 + int(left / (0.1 + eval_s / 10))


def test_budget_cuts_the_schedule_and_still_anneals(tmp_path: Path, windows) -> None:
    """A run that cannot do max_steps in its budget does fewer, and its learning rate ends at
    the schedule's end (min_lr), not wherever the clock ran out."""
    model = micro_llama()
    cfg = train_cfg(max_steps=10_000, time_budget_s=1.0)
    res = Trainer(cfg, COS, QUIET, tmp_path, model, _sleepy_task(model, windows, 0.02)).run()
    assert res.stopped == "time_budget"
    assert CALIBRATION < res.steps == res.planned_steps < 10_000
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "lr" in r]
    assert rows[-1]["step"] == res.steps
    assert rows[-1]["lr"] == pytest.approx(lr_at(res.steps - 1, COS, res.steps))
    assert lr_at(res.steps, COS, res.steps) == pytest.approx(COS.lr * COS.min_lr_ratio)
    assert res.budget["budget_s"] == 1.0


def test_the_plan_survives_resume(tmp_path: Path, windows) -> None:
    """The plan is stored in the checkpoint: a resumed run follows the same schedule (no
    second calibration), so resume stays exact even under a budget."""
    model = micro_llama()
    cfg = train_cfg(max_steps=400, time_budget_s=1e6, save_every=CALIBRATION + 2)
    tr = Trainer(cfg, OPTIM, QUIET, tmp_path, model, lm_task(model, windows, 8, 1))
    tr.state.planned_steps = 37  # as if the budget had cut it
    tr.run()
    assert tr.state.step == 37
    model2 = micro_llama(seed=3)
    tr2 = Trainer(cfg, OPTIM, QUIET, tmp_path, model2, lm_task(model2, windows, 8, 1))
    tr2.resume()
    assert tr2.state.planned_steps == 37 and tr2.max_steps == 37


def test_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path: Path, windows, capsys) -> None:
    model = micro_llama()
    cfg = train_cfg(max_steps=4, save_every=2, keep_last=3)
    Trainer(cfg, OPTIM, QUIET, tmp_path, model, lm_task(model, windows, 8, 1)).run()
    weights = tmp_path / "checkpoints" / "step-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated, as a full disk leaves it
    model2 = micro_llama(seed=9)
    tr = Trainer(cfg, OPTIM, QUIET, tmp_path, model2, lm_task(model2, windows, 8, 1))
    assert tr.resume(ProgressLog("plain", 4, 0, "")) == tmp_path / "checkpoints" / "step-2"
    assert tr.state.step == 2
    out = capsys.readouterr().out
    assert "step-4/model.safetensors is truncated or corrupt" in out and "before it" in out
    # every checkpoint damaged: a one-line error that names the way out, not a fresh start
    w2 = tmp_path / "checkpoints" / "step-2" / "model.safetensors"
    w2.write_bytes(b"\0" * 10)
    tr = Trainer(cfg, OPTIM, QUIET, tmp_path, micro_llama(), lm_task(model2, windows, 8, 1))
    with pytest.raises(UserError, match="no checkpoint .* loads .*train.resume=never"):
        tr.resume()


def test_resume_past_max_steps_is_refused(tmp_path: Path, windows) -> None:
    model = micro_llama()
    Trainer(train_cfg(max_steps=4), OPTIM, QUIET, tmp_path, model, lm_task(model, windows, 8, 1)).run()
    tr = Trainer(train_cfg(max_steps=2), OPTIM, QUIET, tmp_path, model, lm_task(model, windows, 8, 1))
    with pytest.raises(UserError, match="at step 4, past train.max_steps=2"):
        tr.run()


def test_logged_loss_is_the_mean_since_the_last_row(tmp_path: Path, windows) -> None:
    """Same run logged every step and every 3 steps: each 3-step row's loss is the mean of the
    three per-step losses (float64: the mean of three floats, exact to 1e-12); the step's own
    loss is kept as loss_step, and tokens/s counts the whole interval."""
    rows = {}
    for every in (1, 3):
        model = micro_llama().double()
        log = QUIET.model_copy(update={"every": every})
        Trainer(train_cfg(max_steps=6), OPTIM, log, tmp_path / str(every), model,
                lm_task(model, windows, 8, 1)).run()
        rows[every] = [r for r in read_jsonl(tmp_path / str(every) / "metrics.jsonl") if "loss" in r]
    per_step = [r["loss"] for r in rows[1]]
    by3 = {r["step"]: r for r in rows[3]}
    assert sorted(by3) == [1, 3, 6]
    assert by3[3]["loss"] == pytest.approx((per_step[1] + per_step[2]) / 2, abs=1e-12)
    assert by3[6]["loss"] == pytest.approx(sum(per_step[3:6]) / 3, abs=1e-12)
    assert by3[6]["loss_step"] == pytest.approx(per_step[5], abs=1e-12)


def test_train_time_and_tokens_survive_resume(tmp_path: Path, windows) -> None:
    model = micro_llama()
    tr = Trainer(train_cfg(max_steps=3), OPTIM, QUIET, tmp_path, model, lm_task(model, windows, 8, 1))
    first = tr.run()
    tr2 = Trainer(train_cfg(max_steps=5), OPTIM, QUIET, tmp_path, model, lm_task(model, windows, 8, 1))
    res = tr2.run()
    assert res.tokens == 5 * 8 * 16
    assert res.train_time_s > first.train_time_s  # the first session's time is kept
    assert res.facts()["tokens_per_s"] == pytest.approx(res.tokens / res.train_time_s, rel=1e-2)


def test_nonfinite_weights_are_never_final(tmp_path: Path) -> None:
    lin = torch.nn.Linear(2, 1)

    def step(b: torch.Tensor):
        with torch.no_grad():
            lin.weight.fill_(math.inf)  # what an overflowing update leaves
        return lin.bias.sum() * 0 + 1.0, {}

    tr = Trainer(train_cfg(max_steps=2), OPTIM, QUIET, tmp_path, lin,
                 Task(step=step, batches=lambda n: [torch.ones(1, 2)]))
    with pytest.raises(TrainingError, match="non-finite values .*weight"):
        tr.run()
    assert not (tmp_path / "final").exists()
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints") is None


def test_evaluate_restores_the_mode_it_found(tmp_path: Path, windows) -> None:
    model = micro_llama()
    task = lm_task(model, windows, 8, 1)
    seen = []
    task.evaluate = lambda: (seen.append(model.training), {"val_loss": 1.0})[1]
    tr = Trainer(train_cfg(), OPTIM, QUIET, tmp_path, model, task)
    for mode in (False, True):
        model.train(mode)
        tr.evaluate(ProgressLog("off", 0, 0, ""))
        assert model.training is mode
    assert seen == [False, False]  # dropout off while evaluating


def test_mfu_never_above_one(tmp_path: Path, windows, capsys) -> None:
    model = micro_llama()
    task = lm_task(model, windows, 8, 1)
    task.flops_per_token = 1e6
    tr = Trainer(train_cfg(), OPTIM, QUIET, tmp_path, model, task)
    tr._peak = 1.0  # a roofline sampled at a bad moment
    row = tr.train_step()
    from lmforge.train.loop import _Interval

    iv = _Interval()
    iv.add(row, [])
    out = tr._log_row(iv, row, [], ProgressLog("plain", 1, 0, ""))
    assert out["mfu"] == 1.0 and out["flops_per_s"] == tr._peak
    assert "peak estimate was low" in capsys.readouterr().out
