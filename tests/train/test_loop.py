"""The loop's invariances: accumulation, exact resume, atomic checkpoints, loss scaling, guards."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import pytest
import torch

from lmforge.config import OptimCfg
from lmforge.errors import Interrupted, TrainingError, UserError
from lmforge.io import read_jsonl
from lmforge.train import checkpoint as ckpt
from lmforge.train.loop import Task, Trainer
from lmforge.train.precision import make_precision
from lmforge.train.schedules import lr_at
from tests.conftest import OPTIM, QUIET, lm_task, micro_llama, train_cfg


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_grad_accumulation_matches_one_big_batch(tmp_path: Path, windows) -> None:
    """Micro-batch 1 x 8 accumulation steps == micro-batch 8 x 1: gradients, losses and the
    updated weights, in float64 so the bounds measure the loop, not one CPU's fp32 rounding.

    Why the bounds: the two ways sum the same 8 per-sequence gradients in a different order, so
    they differ by summation rounding, ~8 * 2^-53 * |g| < 1e-14 for |g| <= 1: grads and losses
    are held to 1e-12. Adam divides by sqrt(v) + eps, so a gradient difference d moves a weight
    by at most lr * d / eps = 1e-3 * 1e-14 / 1e-8 = 1e-9 per step; 3 steps: < 1e-8. (In fp32
    the same arithmetic gives 1e-3 * 1e-7 / 1e-8 = 1e-5 per step: an fp32 bound would have to
    be that loose, and weights were seen 2e-5 apart on one CPU.)"""
    grads, results = [], []
    for micro, accum in ((8, 1), (1, 8)):
        model = micro_llama().double()
        cfg = train_cfg(max_steps=3, micro_batch_size=micro, grad_accum=accum)
        tr = Trainer(cfg, OptimCfg(lr=1e-3), QUIET, tmp_path / f"m{micro}", model,
                     lm_task(model, windows, micro, accum))
        tr._micro_steps(tr.task.batches(0))
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
        tr.optimizer.zero_grad(set_to_none=True)
        tr.run()
        rows = [r for r in read_jsonl(tmp_path / f"m{micro}" / "metrics.jsonl") if "loss" in r]
        results.append(([r["loss"] for r in rows], _weights(model)))
    assert _max_diff(*grads) < 1e-12
    (loss_a, w_a), (loss_b, w_b) = results
    assert len(loss_a) == 3
    assert loss_a == pytest.approx(loss_b, abs=1e-12)
    assert _max_diff(w_a, w_b) < 1e-8


def test_sigterm_then_resume_equals_uninterrupted(tmp_path: Path, windows) -> None:
    """SIGTERM at step k -> checkpoint + exit 143; resuming gives the same metrics after k and
    the same final weights as a run that was never interrupted. Both runs do the same float64
    operations in the same order on restored state, so they agree to the last bit; 1e-12
    leaves room only for a kernel that reduces in a thread-dependent order."""
    cfg = train_cfg(max_steps=8, micro_batch_size=4, grad_accum=2)
    ref_model = micro_llama().double()
    Trainer(cfg, OPTIM, QUIET, tmp_path / "ref", ref_model, lm_task(ref_model, windows, 4, 2)).run()

    k = 3

    def kill_at(n: int) -> None:  # step n's batches are fetched at the start of step n+1
        if n == k - 1:
            os.kill(os.getpid(), signal.SIGTERM)

    model = micro_llama().double()
    run = tmp_path / "cut"
    with pytest.raises(Interrupted) as exc:
        Trainer(cfg, OPTIM, QUIET, run, model, lm_task(model, windows, 4, 2, on_step=kill_at)).run()
    assert exc.value.exit_code == 143
    assert ckpt.latest_checkpoint(run / "checkpoints").name == f"step-{k}"

    fresh = micro_llama(seed=123).double()  # different init: all must come from the checkpoint
    Trainer(cfg, OPTIM, QUIET, run, fresh, lm_task(fresh, windows, 4, 2)).run()
    keys = ("step", "loss", "lr", "grad_norm")
    ref_rows = [[r[x] for x in keys] for r in read_jsonl(tmp_path / "ref" / "metrics.jsonl") if "loss" in r]
    got_rows = [[r[x] for x in keys] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert [r[0] for r in got_rows] == list(range(1, 9))
    for a, b in zip(ref_rows[k:], got_rows[k:], strict=True):
        assert a == pytest.approx(b, abs=1e-12)
    assert _max_diff(_weights(ref_model), _weights(fresh)) < 1e-12


def test_checkpoint_interrupted_mid_write_is_never_picked(tmp_path: Path, windows, monkeypatch) -> None:
    cfg = train_cfg(max_steps=2, save_every=2)
    model = micro_llama()
    tr = Trainer(cfg, OPTIM, QUIET, tmp_path, model, lm_task(model, windows, 8, 1))
    tr.run()
    root = tmp_path / "checkpoints"
    assert ckpt.latest_checkpoint(root).name == "step-2"

    # a crash while writing step 4's trainer state: the temp dir stays, nothing is published
    tr.state.step = 4

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        tr.save()
    monkeypatch.undo()
    assert (root / ".tmp-step-4").exists() and not (root / "step-4").exists()
    # a step dir without the COMPLETE mark (e.g. copied by hand, or a foreign tool) is ignored
    (root / "step-6").mkdir()
    (root / "step-6" / "model.safetensors").write_bytes(b"\0" * 10)
    assert ckpt.latest_checkpoint(root).name == "step-2"

    model2 = micro_llama(seed=5)
    tr2 = Trainer(train_cfg(max_steps=3), OPTIM, QUIET, tmp_path, model2, lm_task(model2, windows, 8, 1))
    assert tr2.resume() == root / "step-2"
    assert tr2.state.step == 2
    with pytest.raises(UserError, match="not a complete checkpoint"):
        ckpt.load_checkpoint(root / "step-6", model2)


def _linear_task(p: torch.nn.Linear, inject: dict) -> Task:
    def step(b: torch.Tensor):
        with torch.autocast("cpu", dtype=torch.float16):
            y = p(b)
        return (y.float() ** 2).mean(), {}

    def hook(g: torch.Tensor) -> torch.Tensor:
        return g * float("inf") if inject["on"] else g  # what an fp16 overflow looks like

    p.weight.register_hook(hook)
    return Task(step=step, batches=lambda n: [torch.ones(2, 4)])


def test_fp16_loss_scale_grows_then_halves_and_skips_on_overflow(tmp_path: Path) -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    inject = {"on": False}
    cfg = train_cfg(max_steps=10, precision="fp16", clip_grad=None)
    tr = Trainer(cfg, OptimCfg(lr=1e-3, schedule="constant"), QUIET, tmp_path, lin,
                 _linear_task(lin, inject))
    tr.precision = make_precision("fp16", "cpu", growth_interval=2)
    s0 = tr.precision.scaler.get_scale()
    rows = [tr.train_step() for _ in range(2)]
    assert rows[1]["loss_scale"] == 2 * s0  # grew after 2 clean steps
    before = lin.weight.detach().clone()
    inject["on"] = True
    row = tr.train_step()
    assert row["loss_scale"] == s0  # halved
    assert row.get("skipped") == 1
    assert torch.equal(lin.weight, before)  # the overflowing step changed nothing
    inject["on"] = False
    row = tr.train_step()
    assert "skipped" not in row and not torch.equal(lin.weight, before)


def test_nonfinite_loss_is_skipped_and_counted_then_aborts(tmp_path: Path) -> None:
    lin = torch.nn.Linear(2, 1)
    bad = {"steps": {1}}

    def step(b):
        loss = lin(b).pow(2).mean()
        return (loss * float("nan") if tr.state.step in bad["steps"] else loss), {}

    tr = Trainer(train_cfg(max_steps=4, max_nonfinite=3), OPTIM, QUIET, tmp_path, lin,
                 Task(step=step, batches=lambda n: [torch.ones(3, 2)]))
    rows = [tr.train_step() for _ in range(3)]
    assert rows[1].get("skipped") == 1 and math.isnan(rows[1]["loss"])
    assert tr.state.nonfinite_total == 1 and tr.state.nonfinite_in_row == 0
    bad["steps"] = set(range(100))
    with pytest.raises(TrainingError, match="non-finite for 3 steps in a row"):
        for _ in range(3):
            tr.train_step()


def test_early_stopping_keeps_the_best(tmp_path: Path, windows) -> None:
    model = micro_llama()
    vals = iter([3.0, 2.0, 2.5, 2.6, 2.7, 9.0])
    task = lm_task(model, windows, 8, 1)
    task.evaluate = lambda: {"val_loss": next(vals)}
    cfg = train_cfg(max_steps=20, eval_every=1, patience=2, final="best")
    res = Trainer(cfg, OPTIM, QUIET, tmp_path, model, task).run()
    assert res.stopped == "early_stop" and res.steps == 4 and res.best_val_loss == 2.0
    best = (tmp_path / "best" / "model.safetensors").read_bytes()
    assert (tmp_path / "final" / "model.safetensors").read_bytes() == best


def test_weight_decay_only_on_matrices(tmp_path: Path, windows) -> None:
    model = micro_llama()
    tr = Trainer(train_cfg(), OptimCfg(weight_decay=0.3), QUIET, tmp_path, model,
                 lm_task(model, windows, 8, 1))
    decay, no_decay = tr.optimizer.param_groups
    assert decay["weight_decay"] == 0.3 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])


def test_schedules_closed_form() -> None:
    cos = OptimCfg(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(0, cos, 110) == pytest.approx(0.1)  # (0+1)/10
    assert lr_at(9, cos, 110) == pytest.approx(1.0)
    assert lr_at(60, cos, 110) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: cos(pi/2) = 0
    assert lr_at(110, cos, 110) == pytest.approx(0.1)
    # a run shorter than twice its warmup warms up over half of it, then anneals: 8 steps,
    # warmup 30 -> 4: lr 0.25, ..., 1.0 at step 3, then cosine to 0.1 at step 8
    assert [lr_at(k, cos.model_copy(update={"warmup_steps": 30}), 8) for k in (0, 3)] == \
        pytest.approx([0.25, 1.0])
    assert lr_at(6, cos.model_copy(update={"warmup_steps": 30}), 8) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 2 / 4)))
    lin = OptimCfg(lr=2.0, schedule="linear", min_lr_ratio=0.0)
    assert lr_at(25, lin, 100) == pytest.approx(1.5)
    assert lr_at(77, OptimCfg(lr=0.5, schedule="constant"), 100) == 0.5


def test_resume_into_a_different_model_is_a_user_error(tmp_path: Path, windows) -> None:
    model = micro_llama()
    Trainer(train_cfg(max_steps=1), OPTIM, QUIET, tmp_path, model, lm_task(model, windows, 8, 1)).run()
    other = micro_llama(vocab=80)
    tr = Trainer(train_cfg(max_steps=2), OPTIM, QUIET, tmp_path, other, lm_task(other, windows, 8, 1))
    with pytest.raises(UserError, match=r"does not match the model \(size mismatch.*train.resume=never"):
        tr.resume()
