"""What every online-RL stage (GRPO, PPO) builds its steps from: the prompt stream, a round
(P prompts x G completions from the rollout engine, scored by the reward functions, logged,
packed into micro-batches), the trainer's log-probs of a completion, the round a step is on
(carried by checkpoints: exact resume), the reference, and the sampling set-up.

A round is a function of (seed, round index, the policy's weights): its prompts come from an
epoch-seeded stream and its sampling generator from (seed, round, attempt). `Rounds._batch`
computes GRPO's group advantages; PPO's rounds override it with the critic and GAE.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from lmforge import sandbox
from lmforge.chat import Rendered
from lmforge.data.sft import collate, lm_logits, pack_rows
from lmforge.errors import UserError
from lmforge.eval.harness import Generator
from lmforge.losses.lm import token_logps
from lmforge.losses.policy import token_entropy
from lmforge.models import final_hidden, load_model, plain_head
from lmforge.rl.advantages import group_advantages, rloo_advantages, whiten
from lmforge.rl.config import OnlineRlCfg
from lmforge.rl.log import ROLLOUTS
from lmforge.rl.rewards import Answer, Env, check_reward_models, score_rollouts
from lmforge.rl.rollout import Engine, Rollouts, SamplingCfg, make_engine
from lmforge.train import distributed
from lmforge.train.reference import live_reference

Batch = dict[str, torch.Tensor]
ADVANTAGES = {
    "group_std": lambda r, g: group_advantages(r, g, scale="std"),
    "group_mean": lambda r, g: group_advantages(r, g, scale="none"),
    "rloo": rloo_advantages,
}

# --------------------------------------------------------------------------- prompts


def load_items(cfg: OnlineRlCfg) -> list[Any]:
    """Training prompts only: a held-out problem here would inflate every later evaluation."""
    kind, _, source = cfg.data.train.partition(":")
    d = cfg.data
    if kind == "synthetic_code":
        from lmforge.tasks.synthetic_code import make_splits, to_code_items

        t = cfg.task
        items = to_code_items(make_splits(t.seed, t.n_train, t.n_eval).train[:d.limit],
                              signature_prefill=d.signature_prefill)
    elif kind == "mbpp":
        from lmforge.tasks.mbpp import load_mbpp

        items = load_mbpp(source or None, split=d.split, n_shot=0, limit=d.limit)
    elif kind == "gsm8k":
        from lmforge.tasks.gsm8k import load_gsm8k

        items = load_gsm8k(source or None, split=d.split, n_shot=0, limit=d.limit)
    else:
        raise UserError(f"data.train: {cfg.data.train!r} is not synthetic_code, "
                        "mbpp[:PATH|HUB_ID] or gsm8k[:PATH|HUB_ID]")
    if d.split == "test" and kind != "synthetic_code":
        print("warning: data.split=test is what evaluations measure; training on it "
              "contaminates them")
    if not items:
        raise UserError(f"data.train: no prompts ({cfg.data.train}, split {d.split})")
    return items


# --------------------------------------------------------------------------- a round

@dataclass
class Group:
    """One prompt's G rollouts with their total rewards and each reward function's values."""

    item: int
    ro: Rollouts
    rewards: list[float]
    parts: dict[str, list[float]]

    @property
    def signal(self) -> bool:  # equal rewards give every rollout advantage 0
        return max(self.rewards) != min(self.rewards)


@dataclass
class Round:
    index: int
    batches: list[Batch]  # the micro-batches, each a packed batch + its rollout tensors
    metrics: dict[str, float] = field(default_factory=dict)


class Rounds:
    """Round k's rollouts, rewards, advantages and micro-batches, as a function of
    (seed, k, the policy's weights)."""

    def __init__(self, cfg: OnlineRlCfg, items: list[Any], prompts: list[list[int]],
                 engine: Engine, env: Env, pad_id: int) -> None:
        self.cfg, self.items, self.prompts, self.engine, self.env = cfg, items, prompts, engine, env
        self.pad_id = pad_id
        self.log_path = cfg.run.dir / ROLLOUTS
        r = cfg.rollout
        self.sampling = SamplingCfg(r.max_new_tokens, r.temperature, r.top_k, r.top_p,
                                    tuple(items[0].stop), r.batch_size)

    def item_at(self, i: int) -> int:
        """The i-th prompt of the stream: epoch after epoch, each in its own seeded order."""
        n = len(self.items)
        perm = np.random.default_rng([self.cfg.train.seed, i // n]).permutation(n)
        return int(perm[i % n])

    def make(self, k: int) -> Round:
        cfg, P = self.cfg, self.cfg.rollout.prompts_per_step
        t_gen = t_rew = 0.0
        kept: list[Group] = []
        last: list[Group] = []
        dropped = refills = 0
        picks = [self.item_at(k * P + j) for j in range(P)]
        refill_rng = random.Random(f"{cfg.train.seed}/{k}/refill")
        extra = getattr(cfg, "dynamic_sampling_rounds", 0)  # GRPO's; PPO samples once
        for attempt in range(1 + extra):
            last, dt_gen, dt_rew = self._draw(k, attempt, picks)
            t_gen, t_rew = t_gen + dt_gen, t_rew + dt_rew
            for group in last:
                if extra and not group.signal:
                    dropped += 1
                else:
                    kept.append(group)
            if len(kept) >= P or attempt == extra:
                break
            refills += 1
            picks = refill_rng.sample(range(len(self.items)), min(P - len(kept), len(self.items)))
        groups = kept[:P] or last  # nothing had signal: train on the last draw (its KL only)
        rnd = self._batch(k, groups)
        rnd.metrics.update({"time/gen_s": t_gen, "time/reward_s": t_rew,
                            "groups/dropped": float(dropped), "groups/refills": float(refills),
                            "groups/kept": float(len(kept[:P]) if kept else 0)})
        return rnd

    def _draw(self, k: int, attempt: int, picks: list[int]) -> tuple[list[Group], float, float]:
        """G rollouts of each picked prompt, scored: (groups in `picks` order, generation
        seconds, reward seconds). Under torchrun each rank samples and scores its own share of
        the prompts (its seed also its rank's) and every rank receives all the groups, so
        advantages and micro-batches are the same on every rank."""
        G, d = self.cfg.rollout.group_size, distributed.current()
        mine = distributed.part(picks, d)  # one process: all of them
        t0 = time.perf_counter()
        seed = np.random.SeedSequence([self.cfg.train.seed, k, attempt, *([d.rank] if d.active else [])])
        g = torch.Generator().manual_seed(int(seed.generate_state(1)[0]))
        groups: list[Group] = []
        t1 = t0
        if mine:
            ro = self.engine.generate([self.prompts[i] for i in mine for _ in range(G)],
                                      self.sampling, g)
            t1 = time.perf_counter()
            answers = [Answer(self.items[mine[j // G]], ro.texts[j], int(ro.mask[j].sum()))
                       for j in range(len(ro.texts))]
            total, parts = score_rollouts(self.cfg.rewards, answers, self.env)
            groups = [Group(item, ro.rows(range(q * G, (q + 1) * G)), total[q * G:(q + 1) * G],
                            {kk: v[q * G:(q + 1) * G] for kk, v in parts.items()})
                      for q, item in enumerate(mine)]
        t2 = time.perf_counter()
        if d.active:
            groups = distributed.gather(groups)
        return groups, t1 - t0, t2 - t1

    def _batch(self, k: int, groups: list[Group]) -> Round:
        cfg, G = self.cfg, self.cfg.rollout.group_size
        ro = Rollouts.cat([g.ro for g in groups], self.pad_id)
        rewards = torch.tensor([r for g in groups for r in g.rewards], dtype=torch.float64)  # (N,)
        adv = ADVANTAGES[cfg.advantage.kind](rewards, G)
        if cfg.advantage.whiten:
            adv = whiten(adv)
        self._log(k, groups, ro, rewards, adv)
        micro = cfg.train.micro_batch_size
        batches = [rollout_batch(ro.rows(range(s, min(s + micro, len(rewards)))),
                                 adv[s:s + micro], self.pad_id, seed=cfg.train.seed + k)
                   for s in range(0, len(rewards), micro)]
        return Round(k, batches, round_metrics(cfg, ro, rewards, groups))

    def _log(self, k: int, groups: list[Group], ro: Rollouts, rewards: torch.Tensor,
             adv: torch.Tensor) -> None:
        """Every rollout of the round, for reading what the policy wrote and what it earned
        (rank 0 writes: every rank holds every rollout)."""
        if not distributed.current().main:
            return
        G = self.cfg.rollout.group_size
        with self.log_path.open("a", encoding="utf-8") as f:
            for j in range(len(rewards)):
                g = groups[j // G]
                f.write(json.dumps({
                    "step": k * self.cfg.mu + 1, "round": k, "task_id": self.items[g.item].task_id,
                    "text": ro.texts[j], "tokens": int(ro.mask[j].sum()), "finish": ro.finish[j],
                    "reward": float(rewards[j]), "rewards": {kk: v[j % G] for kk, v in g.parts.items()},
                    "advantage": float(adv[j])}) + "\n")



def rollout_batch(ro: Rollouts, adv: torch.Tensor, pad_id: int, seed: int) -> Batch:
    """Prompt + completion of each rollout packed padding-free into rows (each sequence its
    own positions from 0, as sampled), with its completion tensors."""
    seqs = [Rendered(p + ro.completion(i), [0] * len(p) + [1] * int(ro.mask[i].sum()))
            for i, p in enumerate(ro.prompts)]
    lengths = [len(s.ids) - 1 for s in seqs]
    # rows of twice the longest: best-fit pairs short sequences, so padding stays a few %
    b = collate(seqs, pack_rows(lengths, 2 * max(lengths), seed), pad_id,
                seq_ids=list(range(len(seqs))))
    b.update({"completion_mask": ro.mask, "rollout_logps": ro.logps, "advantages": adv.float()})
    return b


def round_metrics(cfg: OnlineRlCfg, ro: Rollouts, rewards: torch.Tensor,
                   groups: list[Group]) -> dict[str, float]:
    m = {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()) if len(rewards) > 1 else 0.0,
         "groups/zero_signal": float(sum(not g.signal for g in groups)),
         "completion/len": float(ro.lengths.float().mean()),
         "completion/truncated": sum(f == "length" for f in ro.finish) / max(len(ro.finish), 1)}
    for kind in groups[0].parts:
        v = torch.tensor([x for g in groups for x in g.parts[kind]], dtype=torch.float64)
        m[f"reward/{kind}/mean"] = float(v.mean())
        m[f"reward/{kind}/std"] = float(v.std()) if len(v) > 1 else 0.0
    if "code" in groups[0].parts:  # all tests passed, whichever mode the reward used
        m["pass_rate"] = float((torch.tensor([x for g in groups for x in g.parts["code"]]) == 1).double().mean())
    return m



# --------------------------------------------------------------------------- the trainer's side


def completion_logps(model: torch.nn.Module, b: Batch, temperature: float,
                     entropy: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(n, L) log-probs of each rollout's completion tokens under `model` at `temperature`
    (the sampling distribution's), aligned with `completion_mask`; and their entropies
    (entropy=True: with a graph, for a bonus; False: without, as a metric; None: not at all)."""
    sel = b["seq_ids"] >= 0
    order = torch.argsort(b["seq_ids"][sel], stable=True)  # sequence by sequence, in order
    head = plain_head(model)
    if head is not None:  # the output layer on completion positions only (~40% are prompt)
        hidden = final_hidden(model, b["input_ids"], b["position_ids"])  # (R, T, d)
        flat = head(hidden[sel][order])  # (n_tokens, V)
    else:
        flat = lm_logits(model, b)[sel][order]  # (n_tokens, V): completion positions only
    if temperature != 1.0:
        flat = flat / temperature
    mask = b["completion_mask"].bool()
    out = torch.zeros(mask.shape, dtype=torch.float32, device=flat.device)
    out = out.masked_scatter(mask, token_logps(flat, b["targets"][sel][order]).float())
    if entropy is None:
        return out, None
    with torch.set_grad_enabled(entropy and torch.is_grad_enabled()):
        ent = torch.zeros_like(out).masked_scatter(mask, token_entropy(flat).float())
    return out, ent



class Cursor:
    """Which round an optimizer step trains on, shared by the online-RL stages: round k is
    made at its first of `mu` steps and kept for the rest; a checkpoint taken between them
    carries it (with mu = 1 nothing needs carrying), so a resume trains on the same batch.
    `prepare(round)` runs once on a new round (e.g. the policy's log-probs before pass 1)."""

    def __init__(self, rounds: Rounds, mu: int, prepare: Callable[[Round], None] | None = None) -> None:
        self.rounds, self.mu, self.prepare = rounds, mu, prepare
        self.round: Round | None = None
        self.ready = 0.0
        self.fresh = True

    def batches(self, step: int) -> list[Batch]:
        if self.fresh:  # not resumed: nothing an earlier run logged may mix in
            if distributed.current().main:
                self.rounds.log_path.unlink(missing_ok=True)
            self.fresh = False
        k = step // self.mu
        if self.round is None or self.round.index != k:
            self.round = self.rounds.make(k)
            if self.prepare is not None:
                self.prepare(self.round)
        else:
            self.round.metrics.update({"time/gen_s": 0.0, "time/reward_s": 0.0})
        self.ready = time.perf_counter()
        return self.round.batches

    def after_step(self, policy: torch.nn.Module) -> dict[str, float]:
        """The engine gets the new weights; the step's row gets the round's metrics."""
        t0 = time.perf_counter()
        self.rounds.engine.sync(policy)
        assert self.round is not None
        return {**self.round.metrics, "time/train_s": t0 - self.ready,
                "time/sync_s": time.perf_counter() - t0}

    def save(self) -> dict[str, Any]:
        if self.mu == 1 or self.round is None:
            return {}
        return {"index": self.round.index, "batches": self.round.batches,
                "metrics": self.round.metrics}

    def load(self, st: dict[str, Any]) -> None:
        self.fresh = False
        if "index" in st:
            self.round = Round(st["index"], st["batches"], st["metrics"])



def micro_batches(cfg: OnlineRlCfg) -> tuple[int, str]:
    """A step's micro-batches (its rollouts over train.micro_batch_size) and what sets them:
    the count ranks must split evenly (Task.micro_batches)."""
    r = cfg.rollout
    n = -(-r.prompts_per_step * r.group_size // cfg.train.micro_batch_size)
    return n, f"rollout.prompts_per_step x group_size / train.micro_batch_size = {n}"


def on_device(b: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in b.items()}



# --------------------------------------------------------------------------- set-up


def reference(cfg: OnlineRlCfg, model: PreTrainedModel, needed: bool) -> tuple[Any, str]:
    """The KL term's reference, or none when it is not `needed` (a KL weight of 0): then
    nothing is computed or held."""
    if not needed or cfg.ref.kind == "none":
        return None, "none (no KL term)"
    explicit = load_model(cfg.ref.model, cfg.model.trust_remote_code) if cfg.ref.model else None
    if explicit is not None:
        explicit.to(next(model.parameters()).device)
    adapters = cfg.lora.method != "full" and cfg.ref.kind == "auto"
    T = cfg.rollout.temperature
    fn, how = live_reference(model, explicit, adapters,
                             score=lambda m, b: completion_logps(m, b, T)[0])
    return fn, how


def sampling(cfg: OnlineRlCfg, model: PreTrainedModel, tokenizer: Any, precision: Any
             ) -> tuple[list[Any], list[list[int]], Engine, Env, int]:
    """(items, their prompt ids, the rollout engine, the reward environment, the pad id): what
    a `Rounds` samples and scores with, for any online-RL stage."""
    check_reward_models(cfg.rewards, tokenizer)
    items = load_items(cfg)
    gen = Generator(model, tokenizer, chat=True)
    room = gen.context - cfg.rollout.max_new_tokens
    if room < 1:
        raise UserError(f"rollout.max_new_tokens={cfg.rollout.max_new_tokens} leaves no room "
                        f"for a prompt in the model's {gen.context}-token context")
    prompts = [gen.prompt_ids(it.prompt, getattr(it, "head", ""))[-room:] for it in items]
    engine = make_engine(cfg.rollout.backend, model, tokenizer, gen.stop_ids, gen.pad,
                         precision.autocast, vllm_args(cfg))
    limits = sandbox.Limits(timeout_s=cfg.sandbox.timeout_s, memory_mb=cfg.sandbox.memory_mb)
    return items, prompts, engine, Env(limits, cfg.sandbox.workers), gen.pad



def vllm_args(cfg: OnlineRlCfg) -> dict[str, Any]:
    r = cfg.rollout
    kv = None if r.vllm_kv_cache_gb is None else int(r.vllm_kv_cache_gb * 2**30)
    return {"gpu_memory_utilization": r.gpu_memory_utilization, "dtype": r.vllm_dtype,
            "max_model_len": None, "seed": cfg.train.seed, "kv_cache_memory_bytes": kv}
