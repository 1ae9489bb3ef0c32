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
    tr._plan(steps, 1.0, ProgressLog("off", 500, 10, ""))
    assert tr.state.planned_steps == 110 and tr.max_steps == 110
    assert tr.state.budget["step_s"] == pytest.approx(0.1)


def test_plan_arithmetic_with_evaluations(tmp_path: Path, windows, monkeypatch) -> None:
    """Worked numbers with evaluations: each takes 0.5 s (a fake clock), every 8 steps, plus
    the one timed now and the final one: 11 - 1 - 0.5 (now) - 0.5 (final) = 9 s left at
    0.125 + 0.5 / 8 = 0.1875 s per step -> 48 more steps: the plan is 58 (binary-exact
    numbers). The timing evaluation is neither logged nor kept as the best."""
    model = micro_llama()
    task = _sleepy_task(model, windows, 0.0)
    clock = [100.0]  # stands still except while evaluating

    def evaluate() -> dict[str, float]:
        clock[0] += 0.5
        return {"val_loss": 1.0}

    monkeypatch.setattr("lmforge.train.loop.time.perf_counter", lambda: clock[0])
    task.evaluate = evaluate
    tr = Trainer(train_cfg(max_steps=500, time_budget_s=11.0, eval_every=8), COS, QUIET,
                 tmp_path, model, task)
    tr.state.step = 10
    tr._plan([0.125] * 10, 1.0, ProgressLog("off", 500, 10, ""))
    assert tr.state.budget["eval_s"] == 0.5
    assert tr.state.planned_steps == 58
    assert not (tmp_path / "metrics.jsonl").exists() and tr.state.best_val is None


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
    tr.state.planned_steps, tr.state.budget = 37, {"budget_s": 1e6}  # as if the budget cut it
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
    # set aside, so it neither takes a keep_last slot nor is tried again
    assert (tmp_path / "checkpoints" / "step-4.damaged").is_dir()
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints").name == "step-2"
    out = capsys.readouterr().out
    assert "step-4/model.safetensors is truncated or corrupt" in out and "before it" in out
    # every checkpoint damaged: a one-line error that names the way out, not a fresh start
    w2 = tmp_path / "checkpoints" / "step-2" / "model.safetensors"
    assert w2.exists()
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


def test_plan_evaluation_does_not_count_toward_patience(tmp_path: Path, windows) -> None:
    """With eval_every on the planning step and patience 1, the plan's timing evaluation must
    not make the real one at the same step look like 'no improvement'."""
    model = micro_llama()
    task = lm_task(model, windows, 8, 1)
    vals = iter([2.0, 1.5, 1.0, 0.5])
    task.evaluate = lambda: {"val_loss": next(vals)}
    cfg = train_cfg(max_steps=CALIBRATION + 3, time_budget_s=1e6, eval_every=CALIBRATION + 1,
                    patience=1, final="last")
    res = Trainer(cfg, OPTIM, QUIET, tmp_path, model, task).run()
    assert res.stopped == "max_steps" and res.steps == CALIBRATION + 3
    evals = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "val_loss" in r]
    assert [(r["step"], r["val_loss"]) for r in evals] == [(CALIBRATION + 1, 1.5), (CALIBRATION + 3, 1.0)]


def test_a_changed_budget_drops_the_stored_plan(tmp_path: Path, windows, capsys) -> None:
    model = micro_llama()
    first = Trainer(train_cfg(max_steps=8, time_budget_s=30.0, final="last"), OPTIM, QUIET,
                    tmp_path, model, lm_task(model, windows, 8, 1))
    first.state.planned_steps, first.state.budget = 5, {"budget_s": 30.0}  # the budget cut it
    assert first.run().steps == 5
    again = Trainer(train_cfg(max_steps=8, final="last"), OPTIM,
                    QUIET.model_copy(update={"progress": "plain"}), tmp_path, model,
                    lm_task(model, windows, 8, 1))
    assert again.run().steps == 8  # no budget now: the plan made for 30 s no longer binds
    assert "stored plan of 5 steps is dropped" in capsys.readouterr().out


def test_a_too_short_run_says_the_budget_is_not_planned(tmp_path: Path, windows, capsys) -> None:
    model = micro_llama()
    cfg = train_cfg(max_steps=CALIBRATION, time_budget_s=5.0, final="last")
    res = Trainer(cfg, OPTIM, QUIET.model_copy(update={"progress": "plain"}), tmp_path, model,
                  lm_task(model, windows, 8, 1)).run()
    assert res.steps == CALIBRATION and res.budget == {}
    assert "not planned" in capsys.readouterr().out
