"""Group relative policy optimisation and its modern variants (DAPO, Dr. GRPO, GSPO), on the
one loop, with verifiable rewards.

    lmforge grpo configs/grpo/tiny.yaml model.path=runs/demo/sft/final

A round: P prompts, G completions each from the rollout engine (token ids and the sampling
policy's log-probs, never re-tokenized), the reward functions (code runs only in the sandbox),
advantages within each group, then `mu` optimizer steps on that batch with the policy loss,
whose choices (ratio level, clipping, aggregation, KL estimator, importance correction) are
independent config fields. Groups whose rewards are all equal carry no signal: with
`dynamic_sampling_rounds` they are dropped and more prompts sampled in their place (counted).

Exact resume: a round's prompts and sampling seed are functions of (seed, round) alone, and a
round still being optimized on (mu > 1) is saved with the checkpoint, so an interrupted and
resumed run repeats the uninterrupted one's metrics and weights.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

from lmforge.io import read_jsonl
from lmforge.losses.policy import policy_loss, weight_of
from lmforge.models import adapter_export, config_summary
from lmforge.rl.config import GrpoCfg
from lmforge.rl.log import ROLLOUTS, curve, dedupe_rounds, time_split
from lmforge.rl.rounds import (
    Batch,
    Cursor,
    Round,
    Rounds,
    completion_logps,
    micro_batches,
    on_device,
    reference,
    sampling,
)
from lmforge.stages.dpo import heldout_pass_at_1, load_policy
from lmforge.train.loop import Task, train
from lmforge.train.precision import make_precision
from lmforge.unsloth_backend import training_device

# the rounds, the prompt stream, the trainer's log-probs and the reference: lmforge/rl/rounds.py


# --------------------------------------------------------------------------- the step


def grpo_task(cfg: GrpoCfg, model: PreTrainedModel, rounds: Rounds, ref: Any,
              device: torch.device, autocast: Any) -> Task:
    L = cfg.loss
    is_on = L.is_correction == "on" or (L.is_correction == "auto" and cfg.rollout.backend != "hf")
    T = cfg.rollout.temperature
    # Dr. GRPO divides each sequence's token sum by the longest a completion can be
    max_tokens = cfg.rollout.max_new_tokens if L.aggregation == "seq_mean_token_sum_norm" else None

    def old_logps(rnd: Round) -> None:
        """The ratio's denominator: the policy as it sampled, before pass 1, in the step's
        precision, so pass 1's ratio is 1 (with mu = 1 the step's own logps serve)."""
        for b in rnd.batches:
            with torch.no_grad(), autocast():
                b["old_logps"] = completion_logps(model, on_device(b, device), T)[0].cpu()

    cursor = Cursor(rounds, cfg.mu, old_logps if cfg.mu > 1 else None)

    def step(b: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        b = on_device(b, device)
        logps, ent = completion_logps(model, b, T, entropy=L.entropy_coef > 0)
        mask = b["completion_mask"]
        old = b["old_logps"] if "old_logps" in b else logps.detach()
        ref_logps = ref(b) if ref is not None else None
        loss, m = policy_loss(
            logps, old, b["advantages"], mask, ratio_level=L.ratio_level, clip_low=L.clip_low,
            clip_high=L.clip_high, aggregation=L.aggregation,
            max_tokens=max_tokens, ref_logps=ref_logps, kl=L.kl, beta=L.beta,
            entropies=ent, entropy_coef=L.entropy_coef,
            rollout_logps=b["rollout_logps"], is_cap=L.is_cap if is_on else None)
        return loss, m

    agg = L.aggregation
    return Task(step=step, batches=cursor.batches, micro_batches=micro_batches(cfg),
                weight=lambda b: weight_of(b["completion_mask"], agg),
                tokens=lambda b: int(b["valid"].sum()), after_step=lambda: cursor.after_step(model),
                state=cursor.save, load_state=cursor.load)



# --------------------------------------------------------------------------- main


def main(cfg: GrpoCfg) -> dict[str, Any]:
    device = training_device("grpo", cfg.train)
    model, tokenizer, fmt = load_policy(cfg)  # type: ignore[arg-type]
    model.to(device)
    precision = make_precision(cfg.train.precision, device.type)
    items, prompts, engine, env, pad = sampling(cfg, model, tokenizer, precision)
    rounds = Rounds(cfg, items, prompts, engine, env, pad)
    ref, how = reference(cfg, model, cfg.loss.beta != 0 and cfg.loss.kl != "none")
    info = config_summary(model)
    r = cfg.rollout
    L = cfg.loss
    variant = (f"ratio {L.ratio_level}, clip ({L.clip_low}, {L.clip_high}), {L.aggregation}, "
               f"kl {L.kl} x {L.beta}, advantages {cfg.advantage.kind}, mu {cfg.mu}, dynamic "
               f"sampling {cfg.dynamic_sampling_rounds} rounds, lr {cfg.optim.lr:g}")
    print(f"{cfg.run.dir.name}: {cfg.lora.method} on {info['model_type']}, trainable "
          f"{info['trainable_params']:,} of {info['params']:,}; {len(items):,} prompts, "
          f"{r.prompts_per_step} x {r.group_size} rollouts per round ({r.backend}); {variant}; "
          f"reference: {how}")
    task = grpo_task(cfg, model, rounds, ref, device, precision.autocast)
    task.export = adapter_export(cfg.lora.method, cfg.model.path, tokenizer)
    res = train(cfg.train, cfg.optim, cfg.log, cfg.run.dir, model, task, tokenizer)
    dedupe_rounds(cfg.run.dir / ROLLOUTS)
    rows = [x for x in read_jsonl(cfg.run.dir / "metrics.jsonl") if "reward/mean" in x]
    return {**info, "method": cfg.lora.method, **res.facts(), "reference": how, "variant": variant,
            "rollouts": {"prompts": len(items), "per_step": r.prompts_per_step * r.group_size,
                         "backend": r.backend},
            "curve": curve(rows), "time_per_step_s": time_split(rows),
            "final_dir": str(res.final_dir),
            **heldout_pass_at_1(cfg, fmt, precision, res, device)}  # type: ignore[arg-type]

