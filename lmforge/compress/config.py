"""Typed configs of the compression stages: quantize, prune, distill.

Torch-free (the CLI imports every config to build its parser). Each stage's math lives in
its own module: compress/quantize.py + compress/qbench.py, compress/prune.py, and the
distillation losses in losses/distill.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator

from lmforge.config import (
    Cfg,
    ChatDataCfg,
    LoraCfg,
    ModelCfg,
    OptimCfg,
    PrefEvalCfg,
    RunCfg,
    SyntheticTaskCfg,
    TrainingCfg,
)

# --------------------------------------------------------------------------- quantize

QuantMethod = Literal[
    "fp32", "bf16", "fp16",
    "bnb-int8",  # LLM.int8(): int8 weights, outlier features (> threshold) kept in fp16
    "bnb-nf4", "bnb-nf4-dq", "bnb-fp4", "bnb-fp4-dq",  # -dq: double quantization
    "torchao-int8wo", "torchao-int4wo",  # weight-only
    "torchao-int8dq",  # int8 weights, dynamic int8 activations
]
ALL_METHODS: tuple[str, ...] = QuantMethod.__args__  # type: ignore[attr-defined]


class QuantBenchCfg(Cfg):
    """What `bench quantize` measures, one row per method, each in a fresh process (so its
    peak RSS is its own). fp32 always runs first: its greedy tokens and next-token
    distributions are what every other row is compared with."""

    methods: list[QuantMethod] = list(ALL_METHODS)  # type: ignore[assignment]
    text: Path | None = None  # held-out text for perplexity and KL (.txt/.jsonl, corpus dir);
    # None: the synthetic code task's held-out problems, answered (embedded, always there)
    max_text_tokens: int = Field(4096, ge=16)
    # the fp32 reference keeps (positions x vocab) fp32 log-probs for the KL: positions are
    # cut so that it stays under this size (a 32k vocab at 256 MB: 2048 positions)
    max_reference_mb: int = Field(256, ge=1)
    prompts: list[str] = []  # greedy agreement prompts; []: held-out synthetic-code prompts
    n_prompts: int = Field(16, ge=1)
    agree_tokens: int = Field(32, ge=1)  # greedy tokens compared per prompt
    decode_tokens: int = Field(64, ge=2)  # tokens timed for decode tok/s (no early stop)
    batch_sizes: list[Annotated[int, Field(ge=1)]] = [1, 8]
    row_timeout_s: float = Field(900.0, gt=0)  # a row still running then is a failed row


class QuantizeCfg(Cfg):
    run: RunCfg = RunCfg(dir=Path("runs/quantize"))
    model: ModelCfg = ModelCfg(preset=None)  # model.path: an HF dir, stage dir or hub id
    method: QuantMethod | None = "bnb-int8"  # exported to run.dir/final; None: table only
    int8_threshold: float = Field(6.0, ge=0)  # LLM.int8 outlier threshold; 0: no outliers
    compute_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # 4-bit matmul dtype
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when there is one
    bench: QuantBenchCfg | None = None  # the comparison table; None: export only
    seed: int = 0  # of the synthetic task's held-out problems (prompts, default text)


# --------------------------------------------------------------------------- prune

PruneMethod = Literal["magnitude", "wanda", "2:4", "structured"]


class CalibrationCfg(Cfg):
    """Text whose activations weigh the weights (Wanda; and 2:4 / structured with scores=wanda):
    a corpus stage dir (its train split), a .txt file, or .jsonl/.json rows with a "text" field."""

    text: Path | None = None
    samples: int = Field(32, ge=1)  # windows of seq_len tokens, drawn at random offsets
    seq_len: int = Field(128, ge=8)
    # prune block by block, each block's activations measured with the blocks before it already
    # pruned (Wanda's own procedure: later scores see the error earlier pruning made); false:
    # every block scored on the dense model's activations, in one pass
    sequential: bool = True


class PruneEvalCfg(Cfg):
    """Held-out perplexity before and after pruning."""

    # .txt / .jsonl / .json, or a corpus stage dir (its val split); None: calibration.text's
    # val split when that is a corpus dir, else no perplexity
    text: Path | None = None
    max_bytes: int = Field(200_000, ge=100)  # text read (the first documents)
    max_length: int = Field(512, ge=8)  # sliding-window length (stride: half of it)


class PruneCfg(Cfg):
    run: RunCfg = RunCfg(dir=Path("runs/prune"))
    model: ModelCfg = ModelCfg(preset=None)  # model.path: an HF dir, stage dir or hub id
    method: PruneMethod = "magnitude"
    sparsity: float = Field(0.5, gt=0, lt=1)  # share of weights (or heads / neurons) removed
    scope: Literal["global", "layer"] = "layer"  # magnitude: one threshold, or one per matrix
    heads: float | None = Field(None, ge=0, lt=1)  # structured: share of heads; None: sparsity
    neurons: float | None = Field(None, ge=0, lt=1)  # structured: share of MLP neurons
    # what ranks weights (2:4) or heads and neurons (structured): |W|, or |W| x input norm;
    # None: wanda when calibration.text is set, else magnitude. magnitude and wanda fix their own
    scores: Literal["magnitude", "wanda"] | None = None
    calibration: CalibrationCfg = CalibrationCfg()
    eval: PruneEvalCfg = PruneEvalCfg()
    seed: int = 0

    @field_validator("method", mode="before")
    @classmethod
    def _unquoted_2_4(cls, v: object) -> object:
        # YAML 1.1 (PyYAML) reads an unquoted `method: 2:4` as the base-60 number 2*60 + 4
        return "2:4" if type(v) is int and v == 124 else v


# --------------------------------------------------------------------------- distill


class TeacherCfg(Cfg):
    path: str | None = None  # an HF dir, stage dir or hub id; must share the student's tokenizer
    trust_remote_code: bool = False


class DistillLossCfg(Cfg):
    kind: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    temperature: float = Field(2.0, gt=0)  # soft targets at T, scaled by T^2 (Hinton et al.)
    alpha: float = Field(0.5, ge=0, le=1)  # weight of the soft loss; 1 - alpha: hard labels
    jsd_beta: float = Field(0.5, gt=0, lt=1)  # jsd: the mixture's weight on the teacher
    chunk_rows: int = Field(256, ge=1)  # positions per vocab-sized chunk


class OnPolicyCfg(Cfg):
    """GKD (Agarwal et al. 2024): a share of batches are the student's own samples, scored by
    the teacher; the soft loss only (the hard labels there are the student's own tokens)."""

    fraction: float = Field(0.0, ge=0, le=1)  # lambda: share of on-policy batches; 0: off-policy
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(128, ge=1)


class DistillEvalCfg(PrefEvalCfg):
    """Held-out pass@1 on the synthetic task: the teacher's (once per run), the student's
    before (`before`, on `before_n` problems per group) and after training."""

    before: bool = True
    teacher: bool = True


class DistillCfg(TrainingCfg):
    # the student: model.path (its tokenizer must be the teacher's), model.preset from scratch
    # (with the teacher's tokenizer, or data.tokenizer), or student_layers
    model: ModelCfg = ModelCfg(preset=None)
    # the student as the teacher with only these decoder layers (0-based), embeddings, final
    # norm and output layer kept: DistilBERT's "one layer in two" start (Sanh et al. 2019),
    # depth pruning before distillation (Minitron, Muralidharan et al. 2024)
    student_layers: list[int] | None = None
    optim: OptimCfg = OptimCfg(lr=1e-4, weight_decay=0.0)
    teacher: TeacherCfg = TeacherCfg()
    data: ChatDataCfg = ChatDataCfg()
    lora: LoraCfg = LoraCfg()
    loss: DistillLossCfg = DistillLossCfg()
    on_policy: OnPolicyCfg = OnPolicyCfg()
    task: SyntheticTaskCfg = SyntheticTaskCfg()
    eval: DistillEvalCfg = DistillEvalCfg()
