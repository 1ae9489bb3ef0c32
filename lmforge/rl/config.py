"""Typed configs of online RL: the rollout, the policy loss's independent choices, the reward
functions (each its own typed arguments, picked by `kind`), and the GRPO stage that composes
them. Kept beside the rest of rl/ (lmforge/config.py holds the shared parts they build on).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from lmforge.config import (
    Cfg,
    LoraCfg,
    ModelCfg,
    OptimCfg,
    PrefEvalCfg,
    SandboxCfg,
    SyntheticTaskCfg,
    TrainingCfg,
)


class RolloutCfg(Cfg):
    # hf: the KV-cached sampler over the trained module; vllm: a colocated vLLM engine fed the
    # merged weights after each step; unsloth: the vLLM engine Unsloth starts inside the policy
    # (train.backend=unsloth), sharing its base weights, fed the adapter only
    backend: Literal["hf", "vllm", "unsloth"] = "hf"
    group_size: int = Field(8, ge=1)  # G completions per prompt (GRPO: at least 2)
    prompts_per_step: int = Field(8, ge=1)  # groups in each optimizer step's batch
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(1.0, gt=0)  # the trainer scores with the same temperature
    top_p: float = Field(1.0, gt=0, le=1)  # not reflected in the log-probs: keep 1 for RL
    top_k: int = Field(0, ge=0)  # 0: off; as top_p
    batch_size: int = Field(64, ge=1)  # rows sampled together
    # vllm only: the share of GPU memory the colocated engine may take, and its dtype
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1)
    vllm_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # the KV cache's size outright (vllm on CPU reads gpu_memory_utilization as a share of
    # RAM: 0.3 of a 24 GiB box is 7 GiB); None: vLLM sizes it from the share above
    vllm_kv_cache_gb: float | None = Field(None, gt=0)


class PolicyLossCfg(Cfg):
    """Each choice is its own field (DESIGN rule 11); see losses/policy.py for the math."""

    ratio_level: Literal["token", "sequence"] = "token"  # sequence: GSPO
    clip_low: float = Field(0.2, gt=0, lt=1)
    clip_high: float = Field(0.2, gt=0)  # > clip_low: DAPO's clip-higher
    aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "token_mean"
    kl: Literal["k1", "k2", "k3", "none"] = "k3"
    beta: float = Field(0.0, ge=0)  # KL weight; 0: no reference is needed at all
    entropy_coef: float = Field(0.0, ge=0)
    # truncated importance sampling against the rollout engine's log-probs: auto = on when
    # the engine is not the trained module itself (vllm); the gap is logged either way
    is_correction: Literal["auto", "on", "off"] = "auto"
    is_cap: float = Field(2.0, ge=1)


class AdvantageCfg(Cfg):
    # group_std: GRPO's (r - mean) / std; group_mean: Dr. GRPO's r - mean; rloo: leave-one-out
    kind: Literal["group_std", "group_mean", "rloo"] = "group_std"
    whiten: bool = False  # then whitened over the whole batch


# --------------------------------------------------------------------------- rewards


class CodeRewardCfg(Cfg):
    """The answer's program run with the problem's tests in the sandbox: 1 when all pass
    (all_pass), or the fraction of tests that pass, each test in its own program (fraction)."""

    kind: Literal["code"] = "code"
    weight: float = 1.0
    mode: Literal["all_pass", "fraction"] = "all_pass"


class FormatRewardCfg(Cfg):
    """1 when the answer has the shape the task reads: code that parses (not run: parsing is
    not execution) and defines the entry point; a GSM8K answer with a final number."""

    kind: Literal["format"] = "format"
    weight: float = 0.1


class AnswerRewardCfg(Cfg):
    """GSM8K: 1 when the final number equals the reference's."""

    kind: Literal["answer"] = "answer"
    weight: float = 1.0


class RewardModelCfg(Cfg):
    """An `lmforge rm` model's score; or an ensemble's (several paths): each member's score
    standardized by its own training scores (the rm stage's reward_stats.json), then
    combined per answer by `combine`: mean, or min (the worst case, which resists
    over-optimization of any one member: Coste et al. 2023)."""

    kind: Literal["reward_model"] = "reward_model"
    weight: float = 1.0
    path: str | list[str]  # an `lmforge rm` final/ dir, or several
    combine: Literal["mean", "min"] = "mean"
    batch_size: int = Field(16, ge=1)
    # a reward model whose tokenizer is not the policy's is refused at start unless this is
    # on: answers then reach it as text, re-rendered with its own chat template
    other_tokenizer: bool = False

    @field_validator("path")
    @classmethod
    def _some(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("give at least one reward model")
        return v

    @property
    def paths(self) -> list[str]:
        """One model or an ensemble's members, as a list."""
        return [self.path] if isinstance(self.path, str) else list(self.path)


class LengthRewardCfg(Cfg):
    """DAPO's soft overlong penalty: 0 up to `max_tokens - buffer` tokens, falling linearly to
    -1 at `max_tokens` and beyond (the weight scales it)."""

    kind: Literal["length"] = "length"
    weight: float = 1.0
    max_tokens: int = Field(128, ge=1)
    buffer: int = Field(32, ge=1)


RewardCfg = CodeRewardCfg | FormatRewardCfg | AnswerRewardCfg | RewardModelCfg | LengthRewardCfg
REWARD_KINDS: dict[str, type[Cfg]] = {"code": CodeRewardCfg, "format": FormatRewardCfg,
                                      "answer": AnswerRewardCfg,
                                      "reward_model": RewardModelCfg, "length": LengthRewardCfg}


# --------------------------------------------------------------------------- the stage


class PromptDataCfg(Cfg):
    # synthetic_code (its train split), "mbpp[:PATH|HUB_ID]" or "gsm8k[:PATH|HUB_ID]"
    train: str = "synthetic_code"
    split: str = "train"  # mbpp / gsm8k split the prompts come from
    limit: int | None = Field(None, ge=1)  # prompts (the first ones)
    template: str = "auto"  # the chat template: auto | tokenizer | ... (as in sft)
    tokenizer: Path | None = None  # only for a model built from a preset
    signature_prefill: bool = True  # code answers start at `def name(arg):`


class GrpoRefCfg(Cfg):
    # auto: the adapter-disabled base under LoRA, else a frozen copy of the starting policy
    # (a second model in memory); none: no reference (needs loss.beta = 0 ... or kl none)
    kind: Literal["auto", "frozen", "none"] = "auto"
    model: str | None = None  # an explicit reference (HF dir or hub id) instead


class OnlineRlCfg(TrainingCfg):
    """What every online-RL stage shares: the policy, its prompts, the rollout engine, the
    reward functions, the reference, the sandbox and the held-out evaluation."""

    model: ModelCfg = ModelCfg(preset=None)  # the policy starts from model.path
    optim: OptimCfg = OptimCfg(lr=1e-6, weight_decay=0.0, warmup_steps=0, schedule="constant")
    data: PromptDataCfg = PromptDataCfg()
    lora: LoraCfg = LoraCfg()
    rollout: RolloutCfg = RolloutCfg()
    rewards: list[RewardCfg] = [CodeRewardCfg()]
    mu: int = Field(1, ge=1)  # optimization passes over each batch of rollouts
    ref: GrpoRefCfg = GrpoRefCfg()
    sandbox: SandboxCfg = SandboxCfg(timeout_s=5.0)
    task: SyntheticTaskCfg = SyntheticTaskCfg()
    eval: PrefEvalCfg = PrefEvalCfg()  # held-out pass@1 of the trained policy

    @field_validator("rewards", mode="before")
    @classmethod
    def _by_kind(cls, v: Any) -> Any:
        """Each entry validated as the class its `kind` names, so an error speaks of that
        reward's fields (a plain union would list every class's complaints)."""
        if not isinstance(v, list):
            return v
        out = []
        for i, r in enumerate(v):
            if isinstance(r, dict):
                kind = r.get("kind")
                if kind not in REWARD_KINDS:
                    raise ValueError(f"rewards[{i}].kind: {kind!r} is not one of "
                                     f"{', '.join(REWARD_KINDS)}")
                r = REWARD_KINDS[kind].model_validate(r)
            out.append(r)
        return out

    @field_validator("rewards")
    @classmethod
    def _rewards(cls, v: list[RewardCfg]) -> list[RewardCfg]:
        if not v:
            raise ValueError("give at least one reward function")
        kinds = [r.kind for r in v]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"each reward kind at most once, got {kinds}")
        return v

    def _check_shared(self) -> None:
        kinds = {r.kind for r in self.rewards}
        code = self.data.train.split(":")[0] in ("synthetic_code", "mbpp")
        if "code" in kinds and not code:
            raise ValueError(f"rewards: kind=code needs code prompts, not data.train="
                             f"{self.data.train}")
        if "answer" in kinds and code:
            raise ValueError("rewards: kind=answer scores GSM8K answers; data.train is code")
        if self.rollout.backend == "unsloth" and (self.train.backend != "unsloth" or
                                                  self.lora.method not in ("lora", "qlora")):
            raise ValueError("rollout.backend=unsloth samples through the vLLM engine Unsloth "
                             "starts with a LoRA policy: it needs train.backend=unsloth and "
                             f"lora.method lora or qlora (not {self.train.backend}, "
                             f"{self.lora.method})")
        if self.train.grad_accum != 1:
            raise ValueError("train.grad_accum: a step trains on all its rollouts, cut into "
                             "micro-batches of train.micro_batch_size; leave grad_accum at 1")
        if self.train.micro_batch_size > self.rollout.group_size * self.rollout.prompts_per_step:
            raise ValueError("train.micro_batch_size is more sequences than a step samples "
                             "(rollout.group_size * rollout.prompts_per_step)")


class GrpoCfg(OnlineRlCfg):
    loss: PolicyLossCfg = PolicyLossCfg()
    advantage: AdvantageCfg = AdvantageCfg()
    # groups whose rewards are all equal have zero advantage and teach nothing (DAPO): drop
    # them and sample more prompts, up to this many extra rounds per step (0: keep them)
    dynamic_sampling_rounds: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> GrpoCfg:
        self._check_shared()
        if self.rollout.group_size < 2:
            raise ValueError("rollout.group_size: GRPO's advantages compare a prompt's "
                             "completions with each other, so it needs at least 2")
        if self.loss.beta > 0 and (self.loss.kl == "none" or self.ref.kind == "none"):
            raise ValueError("loss.beta > 0 needs a KL estimator (loss.kl) and a reference "
                             "(ref.kind); set loss.beta=0 to train without one")
        return self


# --------------------------------------------------------------------------- PPO


class CriticCfg(Cfg):
    # None: the policy's model.path under a new value head; or an `lmforge rm` final/ dir,
    # whose trained head is the usual start (InstructGPT initializes the critic from the RM)
    path: str | None = None
    lora: LoraCfg = LoraCfg()  # full by default; lora/dora train the body's adapters + the head
    # the critic as a second adapter on the actor's frozen base (lora/dora actor and critic):
    # one transformer in memory instead of two
    share_base: bool = False


class PpoLossCfg(Cfg):
    clip_low: float = Field(0.2, gt=0, lt=1)
    clip_high: float = Field(0.2, gt=0)
    value_clip: float | None = Field(0.2, gt=0)  # None: an unclipped value loss
    vf_coef: float = Field(0.1, ge=0)  # the value loss's weight next to the policy loss (TRL's)
    aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "token_mean"
    entropy_coef: float = Field(0.0, ge=0)
    is_correction: Literal["auto", "on", "off"] = "auto"  # as GRPO's
    is_cap: float = Field(2.0, ge=1)


class KlRewardCfg(Cfg):
    """The per-token KL penalty folded into the reward: coef * (logp - ref_logp)."""

    coef: float = Field(0.05, ge=0)  # the starting coefficient (TRL's default)
    # adaptive (Ziegler et al. 2019): steer the mean sequence KL towards `target` nats;
    # None: the coefficient stays fixed
    target: float | None = Field(None, gt=0)
    horizon: float = Field(10000, gt=0)  # in completions: how slowly the coefficient moves


class GaeCfg(Cfg):
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)


class PpoCfg(OnlineRlCfg):
    # one completion per prompt is PPO's usual draw: the critic, not the group, is the baseline
    rollout: RolloutCfg = RolloutCfg(group_size=1, prompts_per_step=16)
    mu: int = Field(4, ge=1)  # PPO epochs over each batch of rollouts (an optimizer step each)
    critic: CriticCfg = CriticCfg()
    loss: PpoLossCfg = PpoLossCfg()
    kl: KlRewardCfg = KlRewardCfg()
    gae: GaeCfg = GaeCfg()
    whiten_advantages: bool = True  # over the batch's valid tokens (TRL, OpenRLHF)

    @model_validator(mode="after")
    def _consistent(self) -> PpoCfg:
        self._check_shared()
        if self.kl.coef > 0 and self.ref.kind == "none":
            raise ValueError("kl.coef > 0 needs a reference (ref.kind); set kl.coef=0 to train "
                             "without the KL penalty")
        if self.critic.share_base and (self.lora.method not in ("lora", "dora") or
                                       self.critic.lora.method not in ("lora", "dora")):
            raise ValueError("critic.share_base puts the critic on the actor's frozen base as a "
                             "second adapter: lora.method and critic.lora.method must be lora or "
                             f"dora (got {self.lora.method}, {self.critic.lora.method})")
        if self.critic.lora.method == "qlora":
            raise ValueError("critic.lora.method=qlora is not supported (the critic's head "
                             "trains whole); use full, lora or dora")
        return self
