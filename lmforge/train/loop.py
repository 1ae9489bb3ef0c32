"""THE training loop. A stage supplies a `Task` (micro-batch -> (loss, metrics), the batches of
each step, an optional evaluation); the loop owns everything else: accumulation, precision,
clipping, the schedule, evaluation and early stopping, checkpoints and exact resume, the
non-finite guard, signals, metrics.jsonl and progress.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmforge.config import LogCfg, OptimCfg, TrainCfg
from lmforge.errors import Interrupted, TrainingError, UserError
from lmforge.io import append_jsonl, atomic_dir, read_jsonl
from lmforge.models import save_hf
from lmforge.train import checkpoint as ckpt
from lmforge.train import distributed
from lmforge.train.precision import DTYPES, Precision, make_precision, peak_flops
from lmforge.train.progress import ProgressLog
from lmforge.train.runtime import Signals, keep_freed_memory, peak_memory_mb
from lmforge.train.schedules import lr_at

Batch = Any


@dataclass
class Task:
    """What a stage hands the loop. `step` returns the MEAN loss of a micro-batch; `weight`
    says how much that micro-batch counts (e.g. its number of loss tokens), so the step's
    gradient is the weighted mean over all its micro-batches however they are split."""

    step: Callable[[Batch], tuple[torch.Tensor, dict[str, float]]]
    batches: Callable[[int], list[Batch]]  # optimizer step -> its grad_accum micro-batches
    weight: Callable[[Batch], float] = lambda b: 1.0
    tokens: Callable[[Batch], int] = lambda b: 0  # for tokens/s
    evaluate: Callable[[], dict[str, float]] | None = None  # must return "val_loss"
    flops_per_token: float = 0.0
    # writes a loadable HF dir of the weights `model` holds (best/, final/); None: save_hf.
    # Adapter runs use it to write the merged model next to the adapter. The loop passes the
    # model it trains, or under FSDP an unsharded copy that rank 0 filled from the shards.
    export: Callable[[torch.nn.Module, Path], None] | None = None
    # run after each optimizer step, inside its timing: where a rollout engine receives the
    # new weights; what it returns joins the step's metrics row (e.g. the step's time split)
    after_step: Callable[[], dict[str, float]] | None = None
    # what an exact resume needs besides weights, optimizer, RNG and the step (RL: the batch
    # of rollouts a run with several passes per batch is in the middle of); in every checkpoint
    state: Callable[[], dict[str, Any]] | None = None
    load_state: Callable[[dict[str, Any]], None] | None = None
    # micro-batches a step holds when it is not train.grad_accum, and what sets it (RL: the
    # rollouts a round samples over train.micro_batch_size): what ranks must split evenly
    micro_batches: tuple[int, str] | None = None


@dataclass
class Result:
    steps: int
    tokens: int
    stopped: str  # max_steps | time_budget | early_stop | time_limit
    final_dir: Path
    last: dict[str, float] = field(default_factory=dict)
    best_val_loss: float | None = None
    nonfinite_skipped: int = 0
    train_time_s: float = 0.0  # all sessions of the run, resumed ones included
    precision: dict[str, str] = field(default_factory=dict)  # what ran, what was asked, why
    planned_steps: int = 0  # the schedule's length (< max_steps when the time budget cut it)
    budget: dict[str, float] = field(default_factory=dict)  # how the plan was made

    def facts(self) -> dict[str, Any]:
        """What every training stage's summary.json says about its run."""
        return {"steps": self.steps, "planned_steps": self.planned_steps, "stopped": self.stopped,
                "tokens": self.tokens, "train_time_s": round(self.train_time_s, 2),
                "tokens_per_s": round(self.tokens / max(self.train_time_s, 1e-9), 1),
                "precision": self.precision, "time_budget": self.budget or None}


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: decaying norms' gains and biases pulls them toward 0, not toward
    'simpler', and hurts small models (GPT-3 appendix B; nanoGPT does the same)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class _State:
    """Everything besides weights and optimizer that an exact resume must restore."""

    step: int = 0
    tokens: int = 0
    best_val: float | None = None
    evals_since_best: int = 0
    nonfinite_in_row: int = 0
    nonfinite_total: int = 0
    train_time_s: float = 0.0  # summed over sessions, so tokens/s survives a resume
    planned_steps: int | None = None  # fixed once by the time budget; None: max_steps
    budget: dict[str, float] | None = None  # the measurements the plan came from


@dataclass
class _Interval:
    """What happened since the last log row. A logged row reports the interval's mean loss
    and its tokens/s, so a curve drawn from every `log.every`-th row is not a curve of single
    noisy steps; the step's own loss stays in the row as `loss_step`."""

    steps: int = 0
    loss: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0
    skipped: int = 0

    def add(self, row: dict[str, Any], keys: list[str]) -> None:
        self.tokens += row["step_tokens"]
        self.seconds += row["step_s"]
        self.skipped += row.get("skipped", 0)
        if not math.isfinite(row["loss"]):  # a skipped step must not turn the mean into nan
            return
        self.steps += 1
        self.loss += row["loss"]
        for k in keys:
            self.metrics[k] = self.metrics.get(k, 0.0) + float(row[k])

    def row(self, last: dict[str, Any], keys: list[str]) -> dict[str, Any]:
        n = max(self.steps, 1)
        out = {k: v for k, v in last.items() if k not in ("step_s", "step_tokens", "skipped")}
        out.update({"loss": self.loss / n if self.steps else last["loss"],
                    "loss_step": last["loss"], **{k: self.metrics.get(k, 0.0) / n for k in keys},
                    "tokens_per_s": self.tokens / self.seconds if self.seconds > 0 else 0.0})
        if self.skipped:
            out["skipped"] = self.skipped
        return out


class Trainer:
    def __init__(self, cfg: TrainCfg, optim: OptimCfg, log: LogCfg, run_dir: Path,
                 model: PreTrainedModel, task: Task,
                 tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        self.cfg, self.optim_cfg, self.log_cfg = cfg, optim, log
        self.run_dir, self.model, self.task, self.tokenizer = run_dir, model, task, tokenizer
        self.device = next(model.parameters()).device
        self.precision: Precision = make_precision(cfg.precision, self.device.type)
        # under torchrun: DDP or FSDP2 on the model (in place) before the optimizer sees it;
        # only rank 0 writes (metrics, exports), every rank trains its share of each step
        self.dist = distributed.current()
        self._skeleton = (distributed.parallelize(model, cfg, self.precision.name,
                                                  task.micro_batches)
                          if self.dist.active else None)
        # fused: one kernel per step instead of ~10 small ops per tensor (3x faster on CPU)
        self.optimizer = torch.optim.AdamW(
            param_groups(model, optim.weight_decay), lr=optim.lr, betas=optim.betas, eps=optim.eps,
            fused=self.device.type in ("cpu", "cuda"),
        )
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.state = _State()
        self.ckpt_root = run_dir / "checkpoints"
        self.metrics_path = run_dir / "metrics.jsonl"
        self._peak: float | None = None  # the MFU roofline, measured on first use
        # a custom export (adapter runs) writes paths of its own directory into what it
        # writes, so final/ must be exported, not copied from best/: the best trainable
        # weights are kept in memory for it (adapters: a small fraction of the model)
        self._best_trainable: dict[str, torch.Tensor] | None = None

    @property
    def max_steps(self) -> int:
        """The schedule's length: max_steps, or fewer when the time budget fixed a plan."""
        planned = self.state.planned_steps
        return min(planned, self.cfg.max_steps) if planned else self.cfg.max_steps

    # ------------------------------------------------------------------ checkpoints

    def _trainer_state(self) -> dict[str, Any]:
        s = self.state
        return {
            "step": s.step, "tokens": s.tokens, "best_val": s.best_val,
            "evals_since_best": s.evals_since_best, "nonfinite_in_row": s.nonfinite_in_row,
            "nonfinite_total": s.nonfinite_total, "train_time_s": s.train_time_s,
            "planned_steps": s.planned_steps, "budget": s.budget,
            # several ranks: the optimizer is in the checkpoint's shards, by parameter name
            "optimizer": None if self.dist.active else self.optimizer.state_dict(),
            "scaler": self.precision.scaler.state_dict() if self.precision.scaler else None,
            "rng": ckpt.rng_state(),
            "task": self.task.state() if self.task.state is not None else None,
        }

    def save(self) -> Path:
        """One process: an HF directory and the trainer state. Several ranks: every rank
        writes its shards of weights and optimizer (DCP), rank 0 the rest of the state."""
        if self.dist.active:
            return ckpt.save_sharded_checkpoint(
                self.ckpt_root, self.state.step,
                lambda d: distributed.save_sharded(d, self.model, self.optimizer),
                self._trainer_state(), self.cfg.keep_last, self.dist.main)
        return ckpt.save_checkpoint(self.ckpt_root, self.state.step, self.model,
                                    self._trainer_state(), self.cfg.keep_last)

    def _load(self, path: Path) -> None:
        if (path / ckpt.SHARDS).is_dir():  # written by several ranks: loads on any number
            ckpt.check_complete(path)
            st = ckpt.read_state(path)
            distributed.load_sharded(path / ckpt.SHARDS, self.model, self.optimizer)
        elif self._skeleton is not None:
            raise UserError(f"train.resume: {path} is a single-process checkpoint (its optimizer "
                            "state is by position), which sharded weights cannot load; resume it "
                            "with train.parallel=ddp or on one process")
        else:
            st = ckpt.load_checkpoint(path, self.model)
            self.optimizer.load_state_dict(st["optimizer"])
        if self.precision.scaler is not None and st["scaler"] is not None:
            self.precision.scaler.load_state_dict(st["scaler"])
        ckpt.set_rng_state(st["rng"])
        if st.get("task") is not None and self.task.load_state is not None:
            self.task.load_state(st["task"])
        self.state = _State(st["step"], st["tokens"], st["best_val"], st["evals_since_best"],
                            st["nonfinite_in_row"], st["nonfinite_total"],
                            st.get("train_time_s", 0.0), st.get("planned_steps"), st.get("budget"))

    def _load_latest(self, progress: ProgressLog) -> Path | None:
        """The newest checkpoint that loads; a damaged one (a disk that failed mid-write, a
        file truncated by hand) falls back to the one before it, said out loud."""
        found = ckpt.complete_checkpoints(self.ckpt_root)
        damaged: list[str] = []
        for _, path in reversed(found):
            try:
                self._load(path)
            except ckpt.CorruptCheckpoint as e:
                damaged.append(str(e))
                progress.message(f"{e}; trying the checkpoint before it")
                continue
            for _, bad in found[len(found) - len(damaged):]:  # out of keep_last's count, kept
                if not self.dist.main:
                    break  # rank 0 moves them aside
                aside = bad.with_name(bad.name + ".damaged")
                shutil.rmtree(aside, ignore_errors=True)
                bad.rename(aside)
            return path
        if damaged:
            raise UserError(f"no checkpoint in {self.ckpt_root} loads ({damaged[-1]}); set "
                            "train.resume=never to start over")
        return None

    def resume(self, progress: ProgressLog | None = None) -> Path | None:
        progress = progress or ProgressLog("off" if self.log_cfg.progress == "off" else "plain",
                                           0, 0, "")
        r = self.cfg.resume
        if r == "never":
            if self.dist.main:
                shutil.rmtree(self.ckpt_root, ignore_errors=True)
            path = None
        elif r == "auto":
            path = self._load_latest(progress)
        else:
            path = Path(r)
            if not path.exists():
                raise UserError(f"train.resume: checkpoint {path} does not exist")
            self._load(path)
        if path is None:  # a fresh start: nothing of an earlier run may leak into this one
            if self.dist.main:
                self.metrics_path.unlink(missing_ok=True)
                shutil.rmtree(self.run_dir / "best", ignore_errors=True)
            return None
        b = self.state.budget or {}
        if self.state.planned_steps is not None and b.get("budget_s") != self.cfg.time_budget_s:
            progress.message(f"train.time_budget_s changed ({b.get('budget_s')} -> "
                             f"{self.cfg.time_budget_s}): the stored plan of "
                             f"{self.state.planned_steps} steps is dropped")
            self.state.planned_steps, self.state.budget = None, None
        if self.state.step > self.cfg.max_steps:
            raise UserError(f"train.resume: checkpoint {path} is at step {self.state.step}, past "
                            f"train.max_steps={self.cfg.max_steps}; raise train.max_steps to "
                            "continue it, or set train.resume=never to start over")
        # rows logged after the checkpoint belong to a future this run will redo
        if self.dist.main:
            rows = [r for r in read_jsonl(self.metrics_path)
                    if r.get("step", 0) <= self.state.step]
            self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    # ------------------------------------------------------------------ one step

    def _micro_steps(self, micro: list[Batch]) -> tuple[float, dict[str, float], int]:
        weights = [float(self.task.weight(b)) for b in micro]
        total = sum(weights) or 1.0  # the global batch's: every rank sees every micro-batch
        ranks, real = 1.0, len(micro)
        if self.dist.active:  # this rank's share; x ranks undoes DDP's mean over them
            micro, weights, real = distributed.share(micro, weights, self.dist)
            ranks = float(self.dist.world)
        scaler = self.precision.scaler
        loss_sum: torch.Tensor | None = None  # summed on the device: one read per step
        metrics: dict[str, float] = {}
        tokens = 0
        for i, (b, w) in enumerate(zip(micro, weights)):
            with self.precision.autocast():
                loss, m = self.task.step(b)
            scaled = loss * (w / total)
            grad = scaled * ranks if ranks != 1.0 else scaled
            (scaler.scale(grad) if scaler is not None else grad).backward()
            loss_sum = scaled.detach() if loss_sum is None else loss_sum + scaled.detach()
            for k, v in m.items():
                metrics[k] = metrics.get(k, 0.0) + float(v) * w / total
            tokens += self.task.tokens(b) if i < real else 0  # not a pad's (see share)
        loss_f = float(loss_sum) if loss_sum is not None else 0.0
        if self.dist.active:  # each rank summed its share of the global weighted mean
            keys = sorted(metrics)
            sums = distributed.all_sum([loss_f, float(tokens), *(metrics[k] for k in keys)],
                                       self.device)
            loss_f, tokens = sums[0], int(sums[1])
            metrics = dict(zip(keys, sums[2:]))
        return loss_f, metrics, tokens

    def _optimizer_step(self) -> tuple[float, bool]:
        """Unscale, clip, step. Returns (grad norm, whether the update was applied)."""
        scaler = self.precision.scaler
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.clip_grad or math.inf,
                                              foreach=True)
        norm_f = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
        if scaler is not None:
            before = scaler.get_scale()
            scaler.step(self.optimizer)  # skipped inside when the grads hold inf/nan
            scaler.update()
            return norm_f, scaler.get_scale() >= before
        if not math.isfinite(norm_f):
            return norm_f, False
        self.optimizer.step()
        return norm_f, True

    def train_step(self) -> dict[str, Any]:
        """One optimizer step; the row holds this step's own values (`step_s`, `step_tokens`
        are turned into interval rates when a row is logged)."""
        s = self.state
        lr = lr_at(s.step, self.optim_cfg, self.max_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss, metrics, tokens = self._micro_steps(self.task.batches(s.step))
        if not math.isfinite(loss):
            s.nonfinite_in_row += 1
            s.nonfinite_total += 1
            self.optimizer.zero_grad(set_to_none=True)
            if s.nonfinite_in_row >= self.cfg.max_nonfinite:
                raise TrainingError(
                    f"loss was non-finite for {s.nonfinite_in_row} steps in a row at step "
                    f"{s.step + 1}; lower optim.lr, use train.precision=fp32/bf16, or check data")
            grad_norm, applied = float("nan"), False
        else:
            s.nonfinite_in_row = 0
            grad_norm, applied = self._optimizer_step()
        if self.task.after_step is not None:
            metrics.update(self.task.after_step())
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        s.step += 1
        s.tokens += tokens
        s.train_time_s += dt
        row: dict[str, Any] = {"step": s.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                               "tokens": s.tokens, "step_s": dt, "step_tokens": tokens, **metrics}
        if not applied:
            row["skipped"] = 1
        if self.precision.scaler is not None:
            row["loss_scale"] = self.precision.scaler.get_scale()
        return row

    def _log_row(self, interval: _Interval, last: dict[str, Any], keys: list[str],
                 progress: ProgressLog) -> dict[str, Any]:
        row = interval.row(last, keys)
        if self.task.flops_per_token:
            if self._peak is None:
                self._peak = peak_flops(DTYPES[self.precision.name], str(self.device))
            achieved = row["tokens_per_s"] * self.task.flops_per_token
            if achieved > self._peak:  # the roofline sample met a busy moment: say so, raise it
                progress.message(f"MFU: achieved {achieved / 1e9:.1f} GFLOP/s is above the measured "
                                 f"peak {self._peak / 1e9:.1f}; the peak estimate was low, "
                                 "raised to the achieved rate")
                self._peak = achieved
            row["flops_per_s"] = achieved
            row["mfu"] = achieved / self._peak
        row["peak_mem_mb"] = peak_memory_mb(self.device)
        return row

    def export(self, out: Path) -> None:
        """Every rank calls it: under FSDP the weights are gathered to rank 0, which writes."""
        model: torch.nn.Module = self.model
        if self._skeleton is not None:
            state = distributed.full_state(self.model)
            if self.dist.main:
                model = distributed.materialize(self._skeleton, state)
        if not self.dist.main:
            return
        if self.task.export is not None:
            self.task.export(model, out)
        else:
            save_hf(model, out, self.tokenizer)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ eval

    def _run_eval(self) -> dict[str, float]:
        """The task's evaluation with dropout off and no graph; the mode is restored after."""
        assert self.task.evaluate is not None
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.precision.autocast():
                return self.task.evaluate()
        finally:
            self.model.train(was_training)

    def evaluate(self, progress: ProgressLog) -> bool:
        """Run the task's evaluation, log it, keep the best. Returns True to stop early."""
        if self.task.evaluate is None:
            return False
        m = self._run_eval()
        val = float(m["val_loss"])
        row = {"step": self.state.step, **m, "val_ppl": math.exp(min(val, 50.0))}
        if self.dist.main:
            append_jsonl(self.metrics_path, row)
        progress.message(f"eval step {self.state.step}: val_loss {val:.4f} ppl {row['val_ppl']:.2f}")
        s = self.state
        if s.best_val is None or val < s.best_val:
            s.best_val, s.evals_since_best = val, 0
            if self.cfg.final == "best":
                self.export(self.run_dir / "best")
                if self.task.export is not None:
                    self._best_trainable = {n: p.detach().clone() for n, p in
                                            self.model.named_parameters() if p.requires_grad}
        else:
            s.evals_since_best += 1
        return bool(self.cfg.patience) and s.evals_since_best >= self.cfg.patience

    # ------------------------------------------------------------------ the time budget

    def _plan(self, step_times: list[float], elapsed: float, progress: ProgressLog) -> None:
        """Fix the schedule's length so that the rest of training, evaluations included, fits
        the budget and the learning rate still anneals to its end. One evaluation is run now
        to time it; it is not logged and keeps no weights, so the plan changes no outcome but
        the number of steps. `elapsed` counts earlier sessions' steps too."""
        cfg, s = self.cfg, self.state
        step_s = sorted(step_times)[len(step_times) // 2]  # median: robust to one slow step
        eval_s = 0.0
        if self.task.evaluate is not None:
            t0 = time.perf_counter()
            self._run_eval()
            eval_s = time.perf_counter() - t0
            elapsed += eval_s
        per_step = step_s + (eval_s / cfg.eval_every if cfg.eval_every else 0.0)
        left = cfg.time_budget_s - elapsed - eval_s  # type: ignore[operator]  # the final eval
        fit = s.step + max(0, int(left / per_step))
        s.planned_steps = max(s.step + 1, min(cfg.max_steps, fit))
        s.budget = {"budget_s": cfg.time_budget_s, "step_s": round(step_s, 4),
                    "eval_s": round(eval_s, 3), "calibration_steps": len(step_times) + 1}
        if self.dist.active:  # rank 0's plan: ranks stepping a different number of times hang
            s.planned_steps, s.budget = distributed.broadcast((s.planned_steps, s.budget))
        if s.planned_steps < cfg.max_steps:
            progress.message(
                f"time budget {cfg.time_budget_s:.0f}s: {s.planned_steps} of {cfg.max_steps} steps "
                f"fit ({step_s:.3f} s/step, evaluations {eval_s:.1f}s each); the schedule "
                f"anneals over {s.planned_steps} steps")
        else:
            est = elapsed + (cfg.max_steps - s.step) * per_step + eval_s
            progress.message(f"time budget {cfg.time_budget_s:.0f}s: all {cfg.max_steps} steps "
                             f"fit (~{est:.0f}s at {step_s:.3f} s/step)")
        progress.set_total(self.max_steps)

    # ------------------------------------------------------------------ the loop

    def run(self) -> Result:
        if self.device.type == "cpu":
            keep_freed_memory()
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        torch.manual_seed(self.cfg.seed)
        progress = ProgressLog(self.log_cfg.progress if self.dist.main else "off", self.max_steps,
                               0, self.run_dir.name)
        progress.message(self.precision.choice.line())
        try:
            resumed = self.resume(progress)
            if self.dist.active:  # rank 0's clean-up of an earlier run is done before step 1
                distributed.barrier()
            progress.restart(self.max_steps, self.state.step)
            if resumed is not None:
                progress.message(f"resumed from {resumed} at step {self.state.step}")
            self.model.train()
            stopped, last = "max_steps", {}
            with Signals().installed() as sig:
                stopped, last = self._loop(progress, sig, time.perf_counter())
        finally:
            progress.close()
        return self._finish(stopped, last)

    def _loop(self, progress: ProgressLog, sig: Signals, t_start: float) -> tuple[str, dict[str, Any]]:
        cfg, last, interval = self.cfg, {}, _Interval()
        keys: list[str] = []
        # the budget is planned after CALIBRATION steps, the first one (warm-up) untimed
        plan_at = self.state.step + CALIBRATION + 1 if self._must_plan(progress) else -1
        before = self.state.train_time_s  # a session resumed before the plan: its steps count
        step_times: list[float] = []
        while self.state.step < self.max_steps:
            row = self.train_step()
            keys = keys or [k for k in row if k not in _OWN_KEYS]
            last = row
            interval.add(row, keys)
            n = self.state.step
            if plan_at > 0 and n > plan_at - CALIBRATION:
                step_times.append(row["step_s"])
            log_now = n % self.log_cfg.every == 0 or n == self.max_steps or n == 1
            if log_now:
                logged = self._log_row(interval, row, keys, progress)
                if self.dist.main:
                    append_jsonl(self.metrics_path, logged)
                interval = _Interval()
                progress.update(n, logged, True)
            else:
                progress.update(n, row, False)
            if n == plan_at:
                self._plan(step_times, time.perf_counter() - t_start + before, progress)
            if cfg.eval_every and n % cfg.eval_every == 0 and n < self.max_steps:
                if self.evaluate(progress):
                    return "early_stop", last
            if sig.signum is not None:
                path = self.save()
                raise Interrupted(sig.signum, str(path))
            if cfg.save_every and n % cfg.save_every == 0:
                self.save()
            if cfg.time_limit_s and self._past(time.perf_counter() - t_start >= cfg.time_limit_s):
                progress.message(f"time limit {cfg.time_limit_s:.0f}s reached at step {n}")
                return "time_limit", last
        return ("time_budget" if self.max_steps < cfg.max_steps else "max_steps"), last

    def _past(self, limit_reached: bool) -> bool:
        """Whether to stop for the time limit: rank 0's clock decides for every rank."""
        return bool(distributed.broadcast(limit_reached)) if self.dist.active else limit_reached

    def _must_plan(self, progress: ProgressLog) -> bool:
        """A budget is planned once per run (resume keeps the plan), and only when the run
        is long enough for the calibration steps to leave something to plan."""
        c, s = self.cfg, self.state
        if c.time_budget_s is None or s.planned_steps is not None:
            return False
        if c.max_steps <= s.step + CALIBRATION + 1:
            progress.message(f"time budget {c.time_budget_s:.0f}s not planned: the run's "
                             f"{c.max_steps - s.step} steps are within the {CALIBRATION + 1} "
                             "it would time first")
            return False
        return True

    def _finish(self, stopped: str, last: dict[str, Any]) -> Result:
        found, first = distributed.nonfinite(self.model, self._skeleton is not None, self.device)
        if found:  # e.g. an lr so large the weights overflowed while the loss still read finite
            raise TrainingError(f"the trained weights hold non-finite values ({found} tensors, "
                                f"{first} among them); nothing was saved as final. Lower "
                                "optim.lr or set train.precision=fp32")
        if self.task.evaluate is not None and stopped != "early_stop":
            self.evaluate(ProgressLog("off", 0, 0, ""))
        self.save()
        final = self.run_dir / "final"
        best = self.run_dir / "best"
        if self.cfg.final == "best" and self._best_trainable is not None:
            with torch.no_grad():  # the best weights back in place, then the export's own paths
                for n, p in self.model.named_parameters():
                    if n in self._best_trainable:
                        p.copy_(self._best_trainable[n])
            self.export(final)
        elif self.cfg.final == "best" and best.exists():
            if self.dist.main:
                with atomic_dir(final) as tmp:
                    shutil.copytree(best, tmp, dirs_exist_ok=True)
        else:
            self.export(final)
        if self.dist.active:
            distributed.barrier()  # final/ is written before any rank returns
        s = self.state
        return Result(s.step, s.tokens, stopped, final, last, s.best_val, s.nonfinite_total,
                      s.train_time_s, self.precision.choice.as_dict(),
                      self.max_steps, dict(s.budget or {}))


CALIBRATION = 10  # timed steps before a time budget fixes the plan
# row keys the loop itself writes; the rest are the task's metrics, averaged per interval
_OWN_KEYS = {"step", "loss", "lr", "grad_norm", "tokens", "step_s", "step_tokens", "skipped",
             "loss_scale"}


def train(cfg: TrainCfg, optim: OptimCfg, log: LogCfg, run_dir: Path, model: PreTrainedModel,
          task: Task, tokenizer: PreTrainedTokenizerBase | None = None) -> Result:
    return Trainer(cfg, optim, log, run_dir, model, task, tokenizer).run()
