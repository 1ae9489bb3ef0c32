"""Typed configs: shared parts composed into one model per stage, loaded from YAML + `a.b=c`.

Every error names the key path (and the YAML line when it came from a file): a typo in a
config must cost the user one glance, not a run.
"""

from __future__ import annotations

import difflib
import json
import types
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from lmforge.errors import UserError


def _unwrap(ann: Any) -> Any:
    while get_origin(ann) is Annotated:
        ann = get_args(ann)[0]
    return ann


def _is_union(ann: Any) -> bool:
    return get_origin(ann) in (Union, types.UnionType)


def _admits(ann: Any, kinds: tuple[type, ...]) -> bool:
    """Does the type `ann` take a scalar of one of `kinds` as such (not by conversion)?"""
    ann = _unwrap(ann)
    if ann is Any:
        return True
    if _is_union(ann):
        return any(_admits(a, kinds) for a in get_args(ann))
    if get_origin(ann) is Literal:
        return any(isinstance(v, kinds) for v in get_args(ann))
    return isinstance(ann, type) and issubclass(ann, kinds)


def _bool_as_number(value: Any, ann: Any) -> bool:
    """True when `value` holds a bool where `ann` wants a number and no bool: pydantic's lax
    mode would read it as 1 or 0. Containers are checked item by item; sub-configs check
    their own fields."""
    ann = _unwrap(ann)
    if isinstance(value, bool):
        return _admits(ann, (int, float)) and not _admits(ann, (bool,))
    if _is_union(ann):
        return any(_bool_as_number(value, a) for a in get_args(ann))
    origin, args = get_origin(ann), get_args(ann)
    if isinstance(value, (list, tuple)) and origin in (list, tuple, set, frozenset):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return any(_bool_as_number(v, a) for v, a in zip(value, args))
        return bool(args) and any(_bool_as_number(v, args[0]) for v in value)
    if isinstance(value, dict) and origin is dict and len(args) == 2:
        return any(_bool_as_number(v, args[1]) for v in value.values())
    return False


class Cfg(BaseModel):
    """Base of every config: unknown keys are errors, and nothing mutates after validation.

    Two of pydantic's lax conversions are refused for every field of every config: a boolean
    where a number is expected (`max_steps: true` would train 1 step) and a non-finite float
    (`lr: .inf` would validate against `gt=0` and wreck the run at step 1); no setting has a
    meaning for inf or nan, "no limit" is spelled `null`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=(),
                              allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and _bool_as_number(value, field.annotation):
            raise ValueError("a boolean is not a number here; write the number")
        return value


# --------------------------------------------------------------------------- shared parts


class RunCfg(Cfg):
    dir: Path = Path("runs/default")  # the stage writes config.yaml, metrics, final/ here


class ModelCfg(Cfg):
    path: str | None = None  # a local HF directory or a hub id; wins over `preset`
    preset: Literal["nano", "tiny", "small", "gpt2-124m"] | None = "tiny"  # build from scratch
    arch: Literal["llama", "gpt2"] = "llama"  # family used by `preset` (gpt2-124m is gpt2)
    max_position_embeddings: int = Field(1024, ge=16)
    tie_embeddings: bool = True
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False  # off unless the user turns it on (DESIGN rule 5)


class DataCfg(Cfg):
    corpus: Path | None = None  # a corpus stage dir (train.jsonl + val.jsonl)
    tokenizer: Path | None = None  # a tokenizer dir (AutoTokenizer loads it) or stage dir
    seq_len: int = Field(256, ge=8)


class OptimCfg(Cfg):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)  # applied to matrices only (not norms, biases)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine/linear decay to lr * this


class TrainCfg(Cfg):
    max_steps: int = Field(100, ge=1)
    seed: int = 0
    resume: str = "auto"  # auto | never | a checkpoint path
    micro_batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    # auto: bf16 where its matmuls are really fast on this device, else fp32 (train/precision.py)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    clip_grad: float | None = Field(1.0, gt=0)
    eval_every: int = Field(0, ge=0)  # 0: evaluate only at the end
    eval_batches: int = Field(8, ge=1)
    patience: int = Field(0, ge=0)  # evals without improvement before stopping; 0: never
    final: Literal["best", "last"] = "best"  # which weights final/ holds when evals ran
    save_every: int = Field(0, ge=0)  # 0: checkpoint only at the end (and on a signal)
    keep_last: int = Field(2, ge=1)
    max_nonfinite: int = Field(5, ge=1)  # this many non-finite losses in a row abort
    # a wall-clock budget the schedule respects: the loop times its first steps and fixes the
    # number of steps (<= max_steps) so that training, evaluations included, fits and the
    # learning rate still anneals to its end (recorded in the checkpoint: resume stays exact)
    time_budget_s: float | None = Field(None, gt=0)
    time_limit_s: float | None = Field(None, gt=0)  # hard guard: stop cleanly mid-schedule after
    threads: int | None = Field(None, ge=1)  # torch intra-op threads; None: torch's default
    # how SFT, DPO/KTO and GRPO load the policy: hf (transformers + peft) or unsloth
    # (FastLanguageModel: its 4-bit load, LoRA kernels and offloaded checkpointing; CUDA only)
    backend: Literal["hf", "unsloth"] = "hf"
    # under torchrun: ddp (every rank holds the model; gradients all-reduced) or fsdp (FSDP2
    # fully_shard per block, then the root: weights, gradients and AdamW states sharded, ZeRO-3)
    parallel: Literal["ddp", "fsdp"] = "ddp"
    # fsdp: free each block's gathered weights after its forward (ZeRO-3) or keep them until
    # backward (false: ZeRO-2-like, one all-gather per step instead of two, more memory)
    reshard_after_forward: bool = True

    @field_validator("resume")
    @classmethod
    def _resume(cls, v: str) -> str:
        if v not in ("auto", "never") and not Path(v).exists():
            raise ValueError(f"checkpoint path {v!r} does not exist (or use auto | never)")
        return v


class LogCfg(Cfg):
    every: int = Field(10, ge=1)
    progress: Literal["auto", "rich", "plain", "off"] = "auto"  # auto: rich on a TTY


# --------------------------------------------------------------------------- stages


class SourceCfg(Cfg):
    path: Path  # a file or a directory
    glob: str = "**/*"  # inside a directory
    text_field: str = "text"  # for .jsonl
    exclude_dirs: list[str] = []  # directory names skipped anywhere below `path`


class DecontaminateCfg(Cfg):
    """Drop corpus documents sharing an n-gram of normalised words with an evaluation item."""

    against: list[Path] = []  # .jsonl/.json evaluation files; empty: off
    n: int = Field(13, ge=1)  # GPT-3 / PaLM: 13 words
    min_words: int = Field(8, ge=1)  # shorter items are not checked; < n words: the whole item
    fields: list[str] | None = None  # row fields to check; None: the usual content fields


class CorpusCfg(Cfg):
    run: RunCfg = RunCfg()
    # empty: the running interpreter's standard library (no site-packages, no tests)
    sources: list[SourceCfg] = []
    extensions: list[str] = [".txt", ".md", ".py", ".jsonl"]
    normalize: Literal["NFC", "NFKC", "none"] = "NFC"
    min_chars: int = Field(200, ge=0)
    max_chars: int = Field(200_000, ge=1)
    near_dedup: bool = True
    jaccard_threshold: float = Field(0.8, gt=0, le=1)
    num_perm: int = Field(128, ge=16)
    shingle_words: int = Field(5, ge=1)
    val_fraction: float = Field(0.05, gt=0, lt=1)
    seed: int = 0  # salts the MinHash permutations and the split hash
    decontaminate: DecontaminateCfg = DecontaminateCfg()


class TokenizerCfg(Cfg):
    run: RunCfg = RunCfg()
    corpus: Path | None = None  # corpus stage dir
    vocab_size: int = Field(8192, ge=300, le=1_000_000)
    min_frequency: int = Field(2, ge=1)
    bos_token: str = "<|bos|>"
    eos_token: str = "<|endoftext|>"
    pad_token: str = "<|pad|>"
    # chat role markers used by later stages' templates
    extra_special_tokens: list[str] = [
        "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
    ]
    max_train_bytes: int | None = Field(None, ge=1)  # cap on text the trainer sees


class TrainingCfg(Cfg):
    """The parts every stage that runs the training loop shares."""

    run: RunCfg = RunCfg()
    model: ModelCfg = ModelCfg()
    optim: OptimCfg = OptimCfg()
    train: TrainCfg = TrainCfg()
    log: LogCfg = LogCfg()


class PretrainCfg(TrainingCfg):
    data: DataCfg = DataCfg()


class LoraCfg(Cfg):
    """How much of the model trains: all of it, or low-rank adapters through `peft`."""

    method: Literal["full", "lora", "dora", "qlora"] = "full"
    r: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)  # scale alpha/r (alpha/sqrt(r) with rslora)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    rslora: bool = False  # rank-stabilized scaling (Kalajdzievski 2023)
    # the template's special tokens were never seen in pretraining, so their embeddings are
    # untrained; an adapter on the linear layers alone cannot fix that, this trains those rows
    train_new_tokens: bool = True
    quant_type: Literal["nf4", "fp4"] = "nf4"  # qlora: the 4-bit base's data type
    double_quant: bool = True  # qlora: quantize the quantization constants too
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # qlora: dtype of the matmuls


class ChatDataCfg(Cfg):
    train: str | None = None  # .jsonl/.json, hub id, "synthetic_code", or "mbpp[:PATH|HUB_ID]" (split data.split; as data.val: validation)
    val: str | None = None  # same kinds; None: `val_fraction` of train, split by hash
    val_fraction: float = Field(0.02, ge=0, lt=1)
    format: Literal["auto", "messages", "prompt_completion", "alpaca"] = "auto"
    split: str = "train"  # hub datasets only
    template: str = "auto"  # auto | tokenizer | chatml | llama3 | alpaca | plain | lmforge | a .jinja
    train_on_prompt: bool = False
    max_length: int = Field(512, ge=8)
    truncation: Literal["left", "drop"] = "left"  # left never cuts the last answer
    packing: bool = True
    skip_invalid: bool = False  # count and skip bad rows instead of stopping at the first
    limit: int | None = Field(None, ge=1)
    tokenizer: Path | None = None  # only for a model built from a preset


class ForgettingCfg(Cfg):
    general: Path | None = None  # a corpus stage dir: val -> the monitor; train -> replay, Fisher
    seq_len: int = Field(256, ge=8)
    eval_batches: int = Field(8, ge=1)
    replay_fraction: float = Field(0.0, ge=0, lt=1)  # share of each micro-batch's rows
    kl_coef: float = Field(0.0, ge=0)  # KL(model || base) on the batch's real tokens
    l2sp_coef: float = Field(0.0, ge=0)  # 1/2 c |theta - theta0|^2
    ewc_coef: float = Field(0.0, ge=0)  # 1/2 c sum F (theta - theta0)^2, F mean-normalized
    fisher_batches: int = Field(16, ge=1)


class SyntheticTaskCfg(Cfg):
    seed: int = 0
    n_train: int = Field(4000, ge=1)
    n_eval: int = Field(200, ge=1)  # per difficulty, and for unseen compositions


class TaskEvalCfg(Cfg):
    task: Literal["synthetic_code"] | None = None  # pass@1 before and after training
    batch_size: int = Field(64, ge=1)
    max_new_tokens: int = Field(160, ge=1)
    timeout_s: float = Field(5.0, gt=0)
    workers: int = Field(2, ge=1)
    before: bool = True  # also measure the base model
    # problems per group for the base model: one that cannot answer yet shows ~0% on a few
    # as clearly as on all, and its answers run to the length cap, so each one is costly
    before_n: int | None = Field(40, ge=1)
    after_n: int | None = Field(None, ge=1)  # problems per group after training; None: all
    signature_prefill: bool = True  # the answer starts at `def name(arg):` (HumanEval-style)


class SftCfg(TrainingCfg):
    model: ModelCfg = ModelCfg(preset=None)  # fine-tuning starts from model.path
    optim: OptimCfg = OptimCfg(lr=1e-4, weight_decay=0.0)
    data: ChatDataCfg = ChatDataCfg()
    lora: LoraCfg = LoraCfg()
    forgetting: ForgettingCfg = ForgettingCfg()
    task: SyntheticTaskCfg = SyntheticTaskCfg()
    eval: TaskEvalCfg = TaskEvalCfg()


class SandboxCfg(Cfg):
    timeout_s: float = Field(10.0, gt=0)  # wall clock per program
    memory_mb: int = Field(2048, ge=64)  # address space per program
    workers: int = Field(2, ge=1)  # programs run at once


class JudgeCfg(Cfg):
    judge: str | None = None  # a local HF dir, or an OpenAI-compatible endpoint URL (http...)
    judge_model: str | None = None  # the model name an endpoint serves
    baseline: str | None = None  # the model compared against (HF dir), answering the same prompts
    prompts: Path | None = None  # .jsonl with a "prompt" field per row
    limit: int = Field(50, ge=1)
    max_new_tokens: int = Field(256, ge=1)


class ContaminationCfg(Cfg):
    train: list[Path] = []  # training text: corpus stage dirs, .jsonl/.json/.txt files
    n: int = Field(13, ge=1)


EVAL_TASKS = ("synthetic-code", "mbpp", "mbpp-sanitized", "humaneval", "gsm8k")


class EvalCfg(Cfg):
    run: RunCfg = RunCfg(dir=Path("runs/eval"))
    model: ModelCfg = ModelCfg(preset=None)  # model.path: an HF dir, stage dir or hub id
    tasks: list[str] = ["synthetic-code"]  # EVAL_TASKS, or perplexity:PATH (text to score)
    k: list[int] = [1]  # pass@k for each k (needs n >= k)
    n: int = Field(1, ge=1)  # samples per task
    temperature: float = Field(0.0, ge=0)  # 0: greedy
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(512, ge=1)
    limit: int | None = Field(None, ge=1)  # items per task (the first ones)
    chat: Literal["auto", "on", "off"] = "auto"  # auto: on when the tokenizer has a template
    sources: dict[str, str] = {}  # task -> a file, directory or hub id (default: the hub's)
    split: str = "test"
    n_shot: int | None = Field(None, ge=0)  # few-shot examples (default: the task's own)
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # autocast of generation and scoring
    # what samples the answers: hf (the model itself, batched) or vllm (an extra: the rollout
    # engine of lmforge/rl/vllm_engine.py, in this precision's dtype); scoring is the same
    backend: Literal["hf", "vllm"] = "hf"
    synthetic: SyntheticTaskCfg = SyntheticTaskCfg(n_eval=50)
    signature_prefill: bool = True  # synthetic-code answers start at `def name(arg):`
    sandbox: SandboxCfg = SandboxCfg()
    judge: JudgeCfg = JudgeCfg()
    contamination: ContaminationCfg = ContaminationCfg()


# --------------------------------------------------------------------------- preference


class PrefDataCfg(Cfg):
    """Preference rows: (prompt, chosen, rejected) pairs, or (prompt, completion, label) rows."""

    # a .jsonl/.json(.gz) file, a hub dataset id, or a `pairs` stage dir (its pairs.jsonl)
    train: str | None = None
    val: str | None = None  # same kinds; None: `val_fraction` of train, split by hash
    val_fraction: float = Field(0.05, ge=0, lt=1)
    # auto: told from the first row. pairs: prompt/chosen/rejected (text or chat messages, or
    # two whole conversations split at their shared prefix); hh: HH-RLHF "\n\nHuman: ..."
    # dialogues split at the last shared "Assistant:"; unpaired: prompt/completion/label (KTO)
    format: Literal["auto", "pairs", "hh", "unpaired"] = "auto"
    split: str = "train"  # hub datasets only
    template: str = "auto"  # as in sft: auto | tokenizer | chatml | ... | a .jinja
    max_length: int = Field(512, ge=8)  # prompt + completion tokens of one sequence
    truncation: Literal["left", "drop"] = "left"  # left: the prompt loses its oldest tokens
    packing: bool = True  # chosen and rejected packed padding-free into rows of max_length
    skip_invalid: bool = False  # count and skip bad rows instead of stopping at the first
    limit: int | None = Field(None, ge=1)
    tokenizer: Path | None = None  # only for a model built from a preset


class RefCfg(Cfg):
    """The reference policy of DPO-style losses (unused by the reference-free simpo/orpo)."""

    model: str | None = None  # an HF dir or hub id; None: the model training starts from
    # log-probs computed in one pass before training and cached on disk (keyed by the
    # reference's weights, the chat template and the data): no reference in memory while
    # training, and a rerun or resume reads them back. false: computed every step, by the
    # adapter-disabled base (LoRA without ref.model) or by a frozen reference model
    precompute: bool = True
    cache_dir: Path | None = None  # None: <run.dir>/ref_cache


class PrefEvalCfg(TaskEvalCfg):
    """Held-out pass@1 after preference training; the starting policy's (`before`) is usually
    the SFT stage's `after`, already measured on the same problems."""

    before: bool = False


class DpoCfg(TrainingCfg):
    model: ModelCfg = ModelCfg(preset=None)  # the policy starts from model.path
    optim: OptimCfg = OptimCfg(lr=5e-6, weight_decay=0.0, warmup_steps=10)
    data: PrefDataCfg = PrefDataCfg()
    lora: LoraCfg = LoraCfg()
    ref: RefCfg = RefCfg()
    # sigmoid: DPO; ipo; cdpo: conservative DPO (label_smoothing); robust: robust DPO
    # (label_smoothing); hinge: SLiC; simpo and orpo: reference-free
    loss: Literal["sigmoid", "ipo", "cdpo", "robust", "hinge", "simpo", "orpo"] = "sigmoid"
    beta: float = Field(0.1, gt=0)  # KL strength (DPO family); SimPO's reward scale
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, validate_default=True)  # cdpo / robust: assumed label-flip rate
    simpo_gamma: float = Field(0.5, ge=0)  # SimPO's target reward margin
    orpo_lambda: float = Field(0.1, gt=0)  # ORPO: weight of the odds-ratio term next to NLL
    rpo_alpha: float = Field(0.0, ge=0)  # RPO: + alpha * NLL of the chosen completions
    task: SyntheticTaskCfg = SyntheticTaskCfg()
    eval: PrefEvalCfg = PrefEvalCfg()  # held-out pass@1 of the trained policy

    @field_validator("label_smoothing")
    @classmethod
    def _smoothing(cls, v: float, info: ValidationInfo) -> float:
        loss = info.data.get("loss")
        if loss in ("cdpo", "robust") and v == 0:
            raise ValueError(f"loss={loss} models label noise: set it > 0 (e.g. 0.1), or use "
                             "loss=sigmoid")
        if loss not in ("cdpo", "robust", None) and v:
            raise ValueError(f"only loss=cdpo or robust reads it, not loss={loss}")
        return v

    @field_validator("rpo_alpha")
    @classmethod
    def _rpo(cls, v: float, info: ValidationInfo) -> float:
        if v and info.data.get("loss") == "orpo":
            raise ValueError("orpo has its own NLL term (orpo_lambda weighs the other); set 0")
        return v


class KtoCfg(TrainingCfg):
    model: ModelCfg = ModelCfg(preset=None)
    optim: OptimCfg = OptimCfg(lr=5e-6, weight_decay=0.0, warmup_steps=10)
    data: PrefDataCfg = PrefDataCfg()  # unpaired rows; pairs give one row of each label
    lora: LoraCfg = LoraCfg()
    ref: RefCfg = RefCfg()
    beta: float = Field(0.1, gt=0)
    desirable_weight: float = Field(1.0, gt=0)  # lambda_D; raise it when desirable rows are rare
    undesirable_weight: float = Field(1.0, gt=0)  # lambda_U
    task: SyntheticTaskCfg = SyntheticTaskCfg()
    eval: PrefEvalCfg = PrefEvalCfg()


class RmCfg(TrainingCfg):
    model: ModelCfg = ModelCfg(preset=None)  # a causal LM; a scalar head is put on it
    optim: OptimCfg = OptimCfg(lr=1e-5, weight_decay=0.0, warmup_steps=10)
    data: PrefDataCfg = PrefDataCfg()
    lora: LoraCfg = LoraCfg()
    margin: bool = False  # Bradley-Terry with each row's "margin" field (rows without: 0)
    # fit reward ~ a + b * completion_tokens on the training pairs and save b with the model,
    # so scoring can subtract the part of the reward that only measures length
    length_normalize: bool = False


class AnswerSamplingCfg(Cfg):
    """What the `synth` stages that judge a policy's own answers share: the policy, the code
    problems, n answers each and how they are sampled, the sandbox that runs them."""

    model: ModelCfg = ModelCfg(preset=None)  # the policy that answers (model.path)
    task: Literal["synthetic_code", "mbpp"] = "synthetic_code"
    source: str | None = None  # mbpp: a file, directory or hub id (default: the hub's)
    split: str = "train"  # mbpp split the problems come from
    synthetic: SyntheticTaskCfg = SyntheticTaskCfg()  # synthetic_code: its train problems
    limit: int | None = Field(None, ge=1)  # problems (the first ones)
    n: int = Field(8, ge=2)  # answers sampled per problem
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(160, ge=1)
    batch_size: int = Field(64, ge=1)
    signature_prefill: bool = True  # synthetic_code answers start at `def name(arg):`
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    sandbox: SandboxCfg = SandboxCfg()
    seed: int = 0


class PairsCfg(AnswerSamplingCfg):
    """`lmforge synth pairs`: sample n answers per problem, judge them, pair good with bad."""

    run: RunCfg = RunCfg(dir=Path("runs/pairs"))
    pairs_per_problem: int = Field(2, ge=1)
    # execution: passing answers chosen over failing ones, the reference solution chosen when
    # none passes; reward_model: best against worst of n by `reward_model`'s score
    judge: Literal["execution", "reward_model"] = "execution"
    reward_model: str | None = None  # an `lmforge rm` final/ dir
    reference_when_none_pass: bool = True


class BestOfNCfg(AnswerSamplingCfg):
    """`lmforge synth best-of-n` (rejection sampling): n answers per problem, the best kept as
    SFT data; and best-of-k pass@1 for each k, the baseline an RL run has to beat."""

    run: RunCfg = RunCfg(dir=Path("runs/best-of-n"))
    # tests: the sandbox's verdict picks (a passing answer, the first); reward_model: the
    # highest score of `reward_model`, whose pick the tests then check
    select: Literal["tests", "reward_model"] = "tests"
    reward_model: str | None = None  # an `lmforge rm` final/ dir
    # which problems give a row: passing (the pick passed its tests) or best (the pick,
    # verified or not: what a reward model alone would keep)
    keep: Literal["passing", "best"] = "passing"
    ks: list[int] = [1, 2, 4, 8]  # best-of-k pass@1 reported for each (k <= n)

    @model_validator(mode="after")
    def _consistent(self) -> BestOfNCfg:
        if self.select == "reward_model" and not self.reward_model:
            raise ValueError("select=reward_model needs reward_model (an `lmforge rm` run's final/ dir)")
        if self.select == "tests" and self.keep == "best":
            raise ValueError("keep=best keeps unverified picks, which only select=reward_model "
                             "makes; with select=tests use keep=passing")
        if not self.ks or min(self.ks) < 1 or max(self.ks) > self.n:
            raise ValueError(f"ks: each k must be between 1 and n={self.n}, got {self.ks}")
        return self


class WriterCfg(Cfg):
    """A model that writes `synth` data: a local checkpoint, or a model at an OpenAI-compatible
    endpoint (vLLM, `lmforge serve`, a hosted API)."""

    path: str | None = None  # an HF dir (or a stage dir holding final/), a hub id, or http(s)://
    name: str | None = None  # the model an endpoint serves (an id its /v1/models lists)
    api_key_env: str = "OPENAI_API_KEY"  # the variable holding an endpoint's key (unset: none)
    timeout_s: float = Field(120.0, gt=0)  # per endpoint request
    workers: int = Field(4, ge=1)  # endpoint requests in flight
    batch_size: int = Field(16, ge=1)  # local generation batch
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    trust_remote_code: bool = False

    @property
    def remote(self) -> bool:
        from lmforge.endpoint import is_endpoint

        return is_endpoint(self.path)

    @model_validator(mode="after")
    def _endpoint_named(self) -> WriterCfg:
        if self.remote and not self.name:
            raise ValueError(f"an endpoint ({self.path}) needs name: the model it serves")
        return self


class GenCfg(Cfg):
    """How one kind of request is sampled."""

    temperature: float = Field(0.7, ge=0)  # 0: greedy
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(256, ge=1)


# Self-Instruct's filter (Wang et al. 2022): tasks a text-only model cannot do or check
BLOCKED_WORDS = ["image", "images", "graph", "graphs", "picture", "pictures", "file", "files",
                 "map", "maps", "draw", "plot", "go to", "video", "audio", "music",
                 "flowchart", "diagram"]


class SelfInstructCfg(Cfg):
    """`lmforge synth self-instruct`: new tasks and answers from a model, grown from seeds."""

    run: RunCfg = RunCfg(dir=Path("runs/self-instruct"))
    model: WriterCfg = WriterCfg()
    seeds: Path | None = None  # SFT rows (messages | prompt/completion | alpaca); None: shipped
    target: int = Field(64, ge=1)  # new tasks to keep; generation stops there
    max_requests: int = Field(256, ge=1)  # instruction-writing requests at most
    requests_per_round: int = Field(16, ge=1)  # one round: this many requests, then answers
    shots: int = Field(8, ge=1)  # example tasks shown per request
    machine_shots: int = Field(2, ge=0)  # of them, from the generated pool once it has some
    instructions: GenCfg = GenCfg(temperature=1.0, max_new_tokens=128)
    answers: GenCfg = GenCfg(temperature=0.7, max_new_tokens=256)
    min_words: int = Field(3, ge=1)
    max_words: int = Field(150, ge=1)
    blocked_words: list[str] = BLOCKED_WORDS
    rouge_threshold: float = Field(0.7, gt=0, le=1)  # drop at ROUGE-L F1 >= this to any kept
    # code: an answer's code runs in the sandbox and must run to its end; tests: and it must
    # hold an assert (its own tests); off: nothing runs
    execute: Literal["off", "code", "tests"] = "off"
    require_code: bool = False  # drop answers without code (a code-only dataset)
    sandbox: SandboxCfg = SandboxCfg(timeout_s=5.0)
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> SelfInstructCfg:
        if self.machine_shots >= self.shots:
            raise ValueError(f"machine_shots ({self.machine_shots}) must be below shots "
                             f"({self.shots}): every request shows a seed task")
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) is above max_words ({self.max_words})")
        return self


class ConstitutionalCfg(Cfg):
    """`lmforge synth constitutional`: responses critiqued and revised against principles
    (Bai et al. 2022), as SFT rows and preference pairs."""

    run: RunCfg = RunCfg(dir=Path("runs/constitutional"))
    model: WriterCfg = WriterCfg()  # writes the first responses
    critic: WriterCfg | None = None  # critiques, revises and judges; None: the model itself
    constitution: Path | None = None  # principles YAML; None: the shipped one
    prompts: Path | None = None  # .jsonl with a "prompt" per row; None: the shipped set
    limit: int | None = Field(None, ge=1)  # prompts (the first ones)
    revisions: int = Field(2, ge=1)  # critique -> revision rounds per prompt
    response: GenCfg = GenCfg(temperature=0.7, max_new_tokens=192)
    critique: GenCfg = GenCfg(temperature=0.7, max_new_tokens=128)
    revision: GenCfg = GenCfg(temperature=0.7, max_new_tokens=192)
    # revision: each final revision chosen over the first response; judged: the critic picks
    # between them under a sampled principle's `choose` question, asked in both orders (RLAIF)
    preferences: Literal["revision", "judged"] = "revision"
    seed: int = 0


class ReportCfg(Cfg):
    prompts: list[str] = ["def ", "import ", "class "]
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.8, ge=0)
    top_k: int | None = 50


class PipelineStageCfg(Cfg):
    name: str
    stage: str  # a stage name: corpus | tokenizer | pretrain | ...
    config: Path | None = None  # a base YAML for the stage (values below override it)
    uses: dict[str, str] = {}  # stage-config field -> name of an earlier stage (its dir)
    set: dict[str, Any] = {}  # dotted overrides: {"train.max_steps": 100}


class PipelineCfg(Cfg):
    name: str = "demo"
    dir: Path | None = None  # default runs/<name>
    stages: list[PipelineStageCfg]
    report: ReportCfg = ReportCfg()


C = TypeVar("C", bound=Cfg)


# --------------------------------------------------------------------------- loading


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (["a", "b"], value), the value parsed as YAML so `3`, `1.5`, `true` are typed."""
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not p for p in key.split(".")):
        raise UserError(f"override {item!r}: expected key.path=value")
    if raw.lower() in ("on", "off", "yes", "no", "y", "n"):
        return key.split("."), raw  # YAML 1.1 would make these bools; let the schema decide
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw  # not YAML: keep the string and let the schema judge it
    else:
        if _cut_by_comment(raw):
            # `run.dir=/tmp/x #1`: YAML reads ` #1` as a comment and would silently drop it;
            # on a command line nobody writes comments, so the whole text is the value
            value = raw
    return key.split("."), value


def _cut_by_comment(raw: str) -> bool:
    """Does YAML stop reading `raw` before its end (the rest being a comment)?"""
    try:
        node = yaml.compose(raw)
    except yaml.YAMLError:
        return False
    end = node.end_mark.index if node is not None else 0
    return bool(raw[end:].strip())


def set_dotted(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    node = tree
    for k in keys[:-1]:
        child = node.get(k)
        if not isinstance(child, dict):
            child = {}
            node[k] = child
        node = child
    node[keys[-1]] = value


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path in a YAML document to its 1-based line, for error messages."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                p = (*path, str(k.value))
                lines[p] = k.start_mark.line + 1
                walk(v, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                lines[(*path, str(i))] = v.start_mark.line + 1
                walk(v, (*path, str(i)))

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def read_yaml(path: Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data_bytes = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror}") from None
    text = decode_config(data_bytes, path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of keys at the top level")
    return data, _key_lines(text)


def decode_config(data: bytes, path: Path) -> str:
    """A config file's text: UTF-8 (a BOM allowed); anything else is one line naming the file,
    its encoding where a BOM or NUL bytes give it away, and the first bad byte's position."""
    # UTF-16 (with or without its BOM) puts a NUL next to every ASCII character
    head = data[:64]
    wide = len(head) >= 4 and any(all(b == 0 for b in head[i::2]) and all(head[1 - i::2])
                                  for i in (0, 1))
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or wide:
        raise UserError(f"{path}: config file is UTF-16 (or another wide) encoded; save it as UTF-8")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: config file is not UTF-8 text (byte 0x{data[e.start]:02x} "
                        f"at offset {e.start}); save it as UTF-8") from None
    if "\x00" in text:
        line = text[:text.index("\x00")].count("\n") + 1
        raise UserError(f"{path}:{line}: config file holds NUL bytes (a binary file?)")
    return text.removeprefix("\ufeff")


def _fields_at(cls: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The valid keys of the sub-model that `loc` (minus its last part) points into."""
    model: Any = cls
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", None) or ()
        candidates = [ann, *args]
        model = next((a for a in candidates if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def format_validation_error(
    cls: type[BaseModel],
    err: ValidationError,
    source: str,
    lines: dict[tuple[str, ...], int],
    overridden: set[tuple[str, ...]],
) -> str:
    """One line for the first error: where it is, what is wrong, what would be right."""
    e = err.errors()[0]
    loc = tuple(e["loc"])
    path = ".".join(str(p) for p in loc)
    key = tuple(str(p) for p in loc)
    # the longest prefix decides: an override of `optim.betas` owns `optim.betas.1`, and a
    # value set by an override never came from the file, whatever line the file gave it
    prefixes = [key[:n] for n in range(len(key), 0, -1)]
    by_override = next((p for p in prefixes if p in overridden), None)
    by_line = next((p for p in prefixes if p in lines), None)
    if by_override is not None:
        where = f"override {'.'.join(by_override)}"
    elif by_line is not None:
        where = f"{source}:{lines[by_line]}"
    else:
        where = source
    if e["type"] == "extra_forbidden":
        valid = _fields_at(cls, loc)
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f" (did you mean {'.'.join(str(p) for p in (*loc[:-1], close[0]))!r}?)" if close else ""
        return f"{where}: unknown key {path!r}{hint}"
    if e["type"] == "missing":
        return f"{where}: missing required key {path!r}"
    got = json.dumps(e.get("input"), default=str)
    if len(got) > 60:
        got = got[:57] + "..."
    msg = e["msg"].removeprefix("Value error, ")
    return f"{where}: {path} = {got}: {msg}"


def load_config(
    cls: type[C],
    path: Path | str | None,
    overrides: list[str] | tuple[str, ...] = (),
    base: dict[str, Any] | None = None,
) -> C:
    """Build a validated `cls` from an optional YAML file, then `a.b=c` overrides on top."""
    data: dict[str, Any] = dict(base or {})
    lines: dict[tuple[str, ...], int] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        file_data, lines = read_yaml(path)
        data = _deep_merge(data, file_data)
        source = str(path)
    overridden: set[tuple[str, ...]] = set()
    for item in overrides:
        keys, value = parse_override(item)
        set_dotted(data, keys, value)
        overridden.add(tuple(keys))
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise UserError(format_validation_error(cls, err, source, lines, overridden)) from None


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def dump_config(cfg: Cfg, path: Path) -> None:
    """Write the resolved config (every default spelled out) next to the stage's outputs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    path.write_text(text, encoding="utf-8")
