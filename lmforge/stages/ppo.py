"""PPO, classical RLHF's four models, on the one loop: the actor (the policy trained), the critic
(a value head on a transformer, trained), the reward (a reward model from `lmforge rm`, or the
verifiable reward functions GRPO uses) and the frozen reference.

    lmforge ppo configs/ppo/tiny.yaml model.path=runs/tiny/dpo

A round: P prompts, G completions each (G = 1 by default: the critic, not a group, is the
baseline) from the rollout engine; each completion scored once; the actor's, the reference's
and the critic's per-token values computed without a graph; the KL penalty folded into the
reward, token by token (`kl_shaped_rewards`), with a fixed or adaptive coefficient; GAE over
those rewards and values; advantages whitened over the batch. Then `mu` epochs over the batch,
each one optimizer step of the clipped policy loss plus vf_coef times the clipped value loss.

The actor and critic train as one module for the loop (`Composite`): one optimizer, one
checkpoint with both, so a resume restores both. Exact resume as GRPO's: a round is a function
of (seed, round, weights), and what the next round depends on besides the weights (the
adaptive KL coefficient, the round a multi-epoch step is in the middle of) is checkpointed.

Memory: each model's size is printed at start. The reference is the adapter-disabled actor
under LoRA (no second copy) and a frozen copy under full fine-tuning; the critic is a second
transformer (LoRA on it: `critic.lora`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmforge.chat import ChatFormat
from lmforge.errors import UserError
from lmforge.io import read_jsonl
from lmforge.losses.policy import policy_loss, value_loss, weight_of
from lmforge.models import adapter_export, config_summary, resolve_model_dir, save_hf
from lmforge.rl.advantages import adaptive_kl_coef, gae, kl_shaped_rewards, whiten
from lmforge.rl.config import PpoCfg
from lmforge.rl.critic import SharedCritic, completion_values, load_critic, mib, size_mb
from lmforge.rl.log import curve, dedupe_rounds, time_split
from lmforge.rl.rollout import Rollouts
from lmforge.rl.rounds import (
    Batch,
    Cursor,
    Group,
    Round,
    Rounds,
    completion_logps,
    micro_batches,
    on_device,
    reference,
    rollout_batch,
    round_metrics,
    sampling,
)
from lmforge.stages.dpo import heldout_pass_at_1, load_policy
from lmforge.train import distributed
from lmforge.train.checkpoint import Composite
from lmforge.train.loop import Task, train
from lmforge.train.precision import make_precision
from lmforge.unsloth_backend import training_device

# --------------------------------------------------------------------------- a round


class PpoRounds(Rounds):
    """GRPO's rounds (prompts, sampling, scoring, logging), with PPO's batch: per-token
    rewards with the KL penalty, the critic's values, GAE."""

    def __init__(self, cfg: PpoCfg, *args: Any, actor: nn.Module, critic: nn.Module, ref: Any,
                 device: torch.device, autocast: Any) -> None:
        super().__init__(cfg, *args)
        self.actor, self.critic, self.ref, self.device, self.autocast = actor, critic, ref, device, autocast
        self.kl_coef = cfg.kl.coef

    def _batch(self, k: int, groups: list[Group]) -> Round:
        cfg = self.cfg
        ro = Rollouts.cat([g.ro for g in groups], self.pad_id)
        scores = torch.tensor([r for g in groups for r in g.rewards], dtype=torch.float64)  # (N,)
        N, micro = len(scores), cfg.train.micro_batch_size
        starts = range(0, N, micro)
        batches = [rollout_batch(ro.rows(range(s, min(s + micro, N))), torch.zeros(min(micro, N - s)),
                                 self.pad_id, seed=cfg.train.seed + k) for s in starts]
        old, ref, values = self._score(batches)  # (N, L) each
        rewards, kl = kl_shaped_rewards(scores, old.double(), ref.double(), ro.mask, self.kl_coef)
        adv, returns = gae(rewards, values.double(), ro.mask, cfg.gae.gamma, cfg.gae.lam)
        if cfg.whiten_advantages and int(ro.mask.sum()) > 1:
            adv = whiten(adv, ro.mask)
        for s, b in zip(starts, batches):
            rows = slice(s, s + len(b["completion_mask"]))
            b.update({"old_logps": old[rows], "old_values": values[rows],
                      "advantages": adv[rows].float(), "returns": returns[rows].float()})
        self._log(k, groups, ro, scores, adv[:, 0])
        seq_kl = float(kl.sum(-1).mean())
        # "kl": the mean per-token estimate (k1 here), the quantity GRPO logs under that name
        metrics = {**round_metrics(cfg, ro, scores, groups), "kl": float(kl.sum() / ro.mask.sum()),
                   "kl/seq": seq_kl, "kl/coef": self.kl_coef,
                   "reward/score": float(scores.mean()), "reward/shaped": float(rewards.sum(-1).mean()),
                   "value/returns": float((returns * ro.mask).sum() / ro.mask.sum())}
        if cfg.kl.target is not None:  # the next round's coefficient, from this round's KL
            self.kl_coef = adaptive_kl_coef(self.kl_coef, seq_kl, cfg.kl.target, cfg.kl.horizon, N)
        return Round(k, batches, metrics)

    def _score(self, batches: list[Batch]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The actor's (pi_old), the reference's log-probs and the critic's values, (N, L)."""
        T = self.cfg.rollout.temperature
        old, ref, val = [], [], []
        for b in batches:
            d = on_device(b, self.device)
            with torch.no_grad(), self.autocast():
                lp = completion_logps(self.actor, d, T)[0]
                old.append(lp.cpu())
                ref.append((self.ref(d) if self.ref is not None else lp).cpu())
                val.append(completion_values(self.critic, d).cpu())
        return torch.cat(old), torch.cat(ref), torch.cat(val)


# --------------------------------------------------------------------------- the step


def ppo_task(cfg: PpoCfg, models: Composite, rounds: PpoRounds, device: torch.device) -> Task:
    L = cfg.loss
    is_on = L.is_correction == "on" or (L.is_correction == "auto" and cfg.rollout.backend != "hf")
    T = cfg.rollout.temperature
    max_tokens = cfg.rollout.max_new_tokens if L.aggregation == "seq_mean_token_sum_norm" else None
    cursor = Cursor(rounds, cfg.mu)  # a round's batches carry pi_old's log-probs already

    def step(b: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        b = on_device(b, device)
        mask = b["completion_mask"]
        logps, ent = completion_logps(models.actor, b, T, entropy=L.entropy_coef > 0)
        pg, m = policy_loss(
            logps, b["old_logps"], b["advantages"], mask, clip_low=L.clip_low,
            clip_high=L.clip_high, aggregation=L.aggregation, max_tokens=max_tokens,
            entropies=ent, entropy_coef=L.entropy_coef, rollout_logps=b["rollout_logps"],
            is_cap=L.is_cap if is_on else None)
        vl, mv = value_loss(completion_values(models.critic, b), b["old_values"], b["returns"],
                            mask, clip=L.value_clip, aggregation=L.aggregation)
        loss = pg + L.vf_coef * vl
        return loss, {**m, **mv, "loss": float(loss.detach())}

    def load(st: dict[str, Any]) -> None:
        cursor.load(st)
        rounds.kl_coef = st.get("kl_coef", rounds.kl_coef)

    agg = L.aggregation
    return Task(step=step, batches=cursor.batches, micro_batches=micro_batches(cfg),
                weight=lambda b: weight_of(b["completion_mask"], agg),
                tokens=lambda b: int(b["valid"].sum()),
                after_step=lambda: cursor.after_step(models.actor),
                # the adaptive KL coefficient the next round starts from, in every checkpoint
                state=lambda: {**cursor.save(), "kl_coef": rounds.kl_coef}, load_state=load)


# --------------------------------------------------------------------------- main


@dataclass
class Setup:
    actor: PreTrainedModel
    critic: nn.Module
    tokenizer: PreTrainedTokenizerBase
    fmt: ChatFormat
    rounds: PpoRounds
    precision: Any
    device: torch.device
    reference: str  # how the reference is computed


def setup(cfg: PpoCfg) -> Setup:
    """The four models, the prompts and the rounds, as `main` trains them (tests build the
    same to check a round against its closed forms)."""
    device = training_device("ppo", cfg.train)
    actor, tokenizer, fmt = load_policy(cfg)  # type: ignore[arg-type]
    critic: nn.Module
    if cfg.critic.share_base:  # a second adapter on the actor's base, and a head
        critic = SharedCritic(actor, cfg.critic.lora, cfg.train.seed)
    else:
        critic = load_critic(cfg.critic.path or cfg.model.path, cfg.critic.lora, tokenizer, fmt,  # type: ignore[arg-type]
                             cfg.model, cfg.train.seed)
    if not cfg.critic.share_base and critic.get_input_embeddings().num_embeddings != \
            actor.get_input_embeddings().num_embeddings:
        raise UserError(f"critic.path {cfg.critic.path}: its vocabulary differs from the policy's; "
                        "the critic reads the policy's token ids (start both from one model)")
    actor.to(device)
    critic.to(device)
    precision = make_precision(cfg.train.precision, device.type)
    items, prompts, engine, env, pad = sampling(cfg, actor, tokenizer, precision)
    # held unless ref.kind is none: at kl.coef 0 the KL is still measured every round
    ref, how = reference(cfg, actor, True)
    rounds = PpoRounds(cfg, items, prompts, engine, env, pad, actor=actor, critic=critic,
                       ref=ref, device=device, autocast=precision.autocast)
    return Setup(actor, critic, tokenizer, fmt, rounds, precision, device, how)


def main(cfg: PpoCfg) -> dict[str, Any]:
    s = setup(cfg)
    memory = _memory(cfg, s.actor, s.critic, s.reference)
    info = config_summary(s.actor)
    r = cfg.rollout
    print(f"{cfg.run.dir.name}: {cfg.lora.method} actor on {info['model_type']}, trainable "
          f"{info['trainable_params']:,} of {info['params']:,}; critic {cfg.critic.lora.method} "
          f"from {cfg.critic.path or 'the policy'}; {len(s.rounds.items):,} prompts, "
          f"{r.prompts_per_step} x {r.group_size} rollouts per round ({r.backend}), {cfg.mu} "
          f"epochs each; kl coef {cfg.kl.coef:g} "
          f"({'adaptive, target ' + str(cfg.kl.target) if cfg.kl.target else 'fixed'}); "
          f"reference: {s.reference}")
    print("memory (MiB): " + ", ".join(f"{k} {v:,.1f}" for k, v in memory.items()))
    models = Composite(actor=s.actor, critic=s.critic)
    task = ppo_task(cfg, models, s.rounds, s.device)
    task.export = _exporter(cfg, s.tokenizer)
    res = train(cfg.train, cfg.optim, cfg.log, cfg.run.dir, models, task, s.tokenizer)  # type: ignore[arg-type]
    if distributed.current().main:
        _save_critic(s.critic, cfg.run.dir / "critic", s.tokenizer)
    dedupe_rounds(s.rounds.log_path)
    rows = [x for x in read_jsonl(cfg.run.dir / "metrics.jsonl") if "reward/mean" in x]
    L = cfg.loss
    variant = (f"clip ({L.clip_low}, {L.clip_high}), value clip {L.value_clip}, vf_coef "
               f"{L.vf_coef}, {L.aggregation}, gae (gamma {cfg.gae.gamma}, lambda {cfg.gae.lam}), "
               f"{cfg.mu} epochs per batch, whiten {cfg.whiten_advantages}, lr {cfg.optim.lr:g}")
    return {**info, "method": cfg.lora.method, **res.facts(), "reference": s.reference,
            "variant": variant,
            "memory_mb": memory,
            "kl": {"coef_start": cfg.kl.coef, "coef_end": s.rounds.kl_coef, "target": cfg.kl.target},
            "rollouts": {"prompts": len(s.rounds.items), "per_step": r.prompts_per_step * r.group_size,
                         "backend": r.backend},
            "curve": curve(rows), "time_per_step_s": time_split(rows),
            "final_dir": str(res.final_dir), "critic_dir": str(cfg.run.dir / "critic"),
            **heldout_pass_at_1(cfg, s.fmt, s.precision, res, s.device)}  # type: ignore[arg-type]


def _memory(cfg: PpoCfg, actor: nn.Module, critic: nn.Module, how: str) -> dict[str, float]:
    """What each of the four models holds: the reference only when it is a copy, a reward
    model by its weights on disk (the reward function loads it)."""
    actor_mb = size_mb(actor)
    if isinstance(critic, SharedCritic):  # its adapter lives in the actor's modules: once
        actor_mb -= mib(critic.adapter_state().values())
    out = {"actor": actor_mb, "critic": size_mb(critic),
           "reference": actor_mb if how.startswith("a frozen copy") else 0.0}
    for rw in cfg.rewards:
        if rw.kind == "reward_model":  # an ensemble: every member
            out["reward_model"] = sum(f.stat().st_size for p in rw.paths  # type: ignore[union-attr]
                                      for f in Path(resolve_model_dir(p)).glob("*.safetensors")) / 2**20
    return out


def _exporter(cfg: PpoCfg, tokenizer: PreTrainedTokenizerBase) -> Any:
    """final/ (and best/) hold the actor alone, the model later stages evaluate and serve (the
    loop's own save would write the actor-critic pair); a shared critic's adapter stays out."""
    export = (adapter_export(cfg.lora.method, cfg.model.path, tokenizer, ["default"])
              or (lambda m, out: save_hf(m, out, tokenizer)))
    return lambda models, out: export(models.actor, out)


def _save_critic(critic: nn.Module, out: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """The trained critic: a sequence-classification model (adapters merged), or a shared
    critic's adapter and head (its base is the actor's)."""
    from lmforge.stages.rm import export_merged

    if isinstance(critic, SharedCritic):
        critic.save_pretrained(out)
    elif hasattr(critic, "peft_config"):
        export_merged(critic, out, tokenizer)
    else:
        save_hf(critic, out, tokenizer)
