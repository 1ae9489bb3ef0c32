"""Capacity planning before a run: what a compute budget buys, what one GPU must hold, what
parallelism costs. Pure arithmetic on a model's shape; every formula is worked by hand in
tests/test_plan.py.

- Chinchilla (Hoffmann et al. 2022): training costs C = 6 N D FLOPs (N parameters, D tokens),
  and the compute-optimal point has D ~ 20 N, so N = sqrt(C / 120) and D = 20 N.
- Model state per GPU (Rajbhandari et al. 2019, "ZeRO"): weights, gradients, optimizer state
  (AdamW's two moments) and, with mixed precision, an fp32 master copy. DDP replicates all of
  it; ZeRO-1 shards the optimizer state and master copy over the data-parallel ranks, ZeRO-2
  the gradients too, ZeRO-3 (FSDP's full sharding) the weights too. LoRA trains only the
  adapters, so gradients and optimizer state are the adapters'; QLoRA also stores the frozen
  linear layers in 4 bits (NF4 with one fp32 absmax per 64 weights: 4.5 bits a weight).
- Activations, per token and layer, for a pre-norm block (Korthikanti et al. 2022 counted the
  same for GPT): the tensors autograd saves for backward, in bytes of the activation dtype;
  attention scores add heads x seq per token unless a fused kernel (flash / SDPA) recomputes
  them. Full activation checkpointing keeps each block's input and rebuilds one block at a
  time. bench/plan_vs_measured.py counts the saved tensors of a real model against it.
- Pipeline bubble (GPipe / 1F1B): with F stages and m micro-batches, (F - 1) / (m + F - 1) of
  the time is idle.
- Tensor parallelism (Megatron-LM): each layer all-reduces its attention and MLP outputs, in
  forward and again in backward, 4 all-reduces of seq x batch x hidden values a layer; a ring
  all-reduce moves 2 (t - 1) / t of the data through each of the t GPUs.
- Token storage: uint16 ids while the vocabulary fits in 16 bits, else uint32.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from lmforge.errors import UserError

GB = 1e9  # decimal: GPU and cluster memory are quoted in GB
TOKENS_PER_PARAM = 20.0  # Chinchilla's compute-optimal ratio
BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "nf4": 4.5 / 8}
Method = Literal["full", "lora", "qlora"]


# --------------------------------------------------------------------------- Chinchilla


def chinchilla(compute: float) -> tuple[float, float]:
    """(parameters, tokens) at the compute-optimal point for `compute` training FLOPs."""
    if compute <= 0:
        raise UserError(f"compute must be > 0 FLOPs, got {compute:g}")
    params = math.sqrt(compute / (6 * TOKENS_PER_PARAM))
    return params, TOKENS_PER_PARAM * params


def chinchilla_compute(params: float) -> tuple[float, float]:
    """The reverse: (FLOPs, tokens) that train `params` parameters compute-optimally."""
    if params <= 0:
        raise UserError(f"parameters must be > 0, got {params:g}")
    tokens = TOKENS_PER_PARAM * params
    return 6 * params * tokens, tokens


# --------------------------------------------------------------------------- the model's shape


@dataclass(frozen=True)
class Shape:
    """What the formulas need of a decoder-only transformer."""

    params: float
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    gated: bool = True  # SwiGLU (Llama): gate and up projections; GPT-2's MLP is not gated
    fused_qkv: bool = False  # GPT-2: q, k and v come from one linear layer (one adapter)

    @property
    def kv_hidden(self) -> int:
        return self.hidden * self.kv_heads // self.heads

    def linear_params(self) -> float:
        """Weights of the blocks' linear layers: what LoRA on every linear layer adapts."""
        attn = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_hidden
        mlp = (3 if self.gated else 2) * self.hidden * self.ffn
        return float(self.layers * (attn + mlp))

    def lora_params(self, rank: int) -> float:
        """LoRA's A (r x in) and B (out x r) on every linear layer of every block."""
        h, kv, f = self.hidden, self.kv_hidden, self.ffn
        qkv = (h + h + 2 * kv) if self.fused_qkv else (h + h) + (h + kv) * 2
        attn = qkv + (h + h)  # in + out per adapter; o last
        mlp = (h + f) * (3 if self.gated else 2)
        return float(self.layers * rank * (attn + mlp))


def shape_of_config(config: Any) -> Shape:
    """A Hugging Face config's shape; its parameters counted exactly by building the model on
    the meta device (no memory is allocated)."""
    import torch
    from transformers import AutoModelForCausalLM

    get = lambda *names: next((getattr(config, n) for n in names  # noqa: E731
                               if getattr(config, n, None) is not None), None)
    hidden, layers = get("hidden_size", "n_embd"), get("num_hidden_layers", "n_layer")
    heads = get("num_attention_heads", "n_head")
    if not (hidden and layers and heads):
        raise UserError(f"model config ({getattr(config, 'model_type', '?')}): no hidden size, "
                        "layer count or head count to plan with")
    gpt2 = getattr(config, "model_type", "") == "gpt2"
    ffn = get("intermediate_size", "n_inner") or 4 * hidden
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = float(sum(p.numel() for p in model.parameters()))
    return Shape(params, hidden, layers, heads, get("num_key_value_heads") or heads, ffn,
                 config.vocab_size, gated=not gpt2, fused_qkv=gpt2)


def shape_of_preset(name: str, vocab: int) -> Shape:
    from lmforge.config import ModelCfg
    from lmforge.models import PRESETS, preset_config

    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r} (expected {', '.join(PRESETS)})")
    return shape_of_config(preset_config(ModelCfg(preset=name), vocab, None, None, None))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- model state


@dataclass(frozen=True)
class State:
    """Bytes one GPU holds for the model's state, by part."""

    weights: float
    grads: float
    optimizer: float
    master: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.master

    def gb(self) -> dict[str, float]:
        return {k: v / GB for k, v in {**asdict(self), "total": self.total}.items()}


def model_state(params: float, *, method: Method = "full", zero: int = 0, gpus: int = 1,
                trainable: float | None = None, quantized: float | None = None,
                weights: str = "bf16", grads: str = "bf16", optimizer_bytes: float = 8.0,
                master: bool = True) -> State:
    """Bytes per GPU for `params` parameters.

    full: every parameter trains. lora / qlora: `trainable` adapter parameters train; the base
    is stored in `weights`, except (qlora) the `quantized` parameters in NF4 (bitsandbytes
    quantizes the linear layers, not embeddings or norms; default: all of them); the adapters
    in `weights`. optimizer_bytes:
    per trainable parameter (AdamW: m and v in fp32, 8). master: an fp32 copy of the trainable
    parameters when they are kept in 16 bits (mixed precision), sharded like the optimizer.
    zero: 0 (DDP: all replicated), 1 (optimizer + master sharded over `gpus`), 2 (+ grads),
    3 (+ weights)."""
    if zero not in (0, 1, 2, 3):
        raise UserError(f"zero must be 0 (DDP), 1, 2 or 3, got {zero}")
    if gpus < 1:
        raise UserError(f"gpus must be >= 1, got {gpus}")
    for name, dtype in (("weights", weights), ("grads", grads)):
        if dtype not in BYTES:
            raise UserError(f"{name} dtype {dtype!r}: expected one of {', '.join(BYTES)}")
    if method == "full":
        train, stored = params, params * BYTES[weights]
    else:
        if trainable is None:
            raise UserError(f"method {method}: give the adapters' trainable parameter count")
        q = (params if quantized is None else quantized) if method == "qlora" else 0.0
        train = trainable
        stored = q * BYTES["nf4"] + (params - q) * BYTES[weights] + trainable * BYTES[weights]
    copy = 4.0 * train if master and BYTES[weights] < 4 else 0.0
    shard = lambda x, stage: x / gpus if zero >= stage else x  # noqa: E731
    return State(weights=shard(stored, 3), grads=shard(train * BYTES[grads], 2),
                 optimizer=shard(train * optimizer_bytes, 1), master=shard(copy, 1))


# --------------------------------------------------------------------------- activations


def activation_bytes_per_token_layer(s: Shape, seq: int, act_bytes: float = 2.0,
                                     fused_attention: bool = True) -> float:
    """What one pre-norm block keeps for backward, per token, in bytes (the Hugging Face Llama
    block, counted tensor by tensor in bench/plan_vs_measured.py). Values: each of the two
    norms keeps its input, the normalized input (for the gain's backward) and the gained output
    (the next linear layer's input): 6 h; q (h), k and v (2 kv); the attention output, the
    output projection's input (h); the MLP's gate and up outputs, the activation and the
    product fed to the down projection (4 ffn; GPT-2: the fc output and the GELU output,
    2 ffn). In fp32: each norm's 1 / rms, and the fused attention's log-sum-exp per head.
    Unfused attention keeps its probabilities too (heads x seq)."""
    values = 6 * s.hidden + s.hidden + 2 * s.kv_hidden + s.hidden
    values += (4 if s.gated else 2) * s.ffn
    fp32 = 2 * 4.0  # the norms' 1 / rms
    if fused_attention:
        fp32 += s.heads * 4.0
    else:
        values += s.heads * seq
    return values * act_bytes + fp32


def activation_parts(s: Shape, seq: int, micro_batch: int, *, checkpointing: bool,
                     act_bytes: float = 2.0, fused_attention: bool = True,
                     logits_bytes: float = 4.0) -> dict[str, float]:
    """Activation bytes for one micro-batch on one GPU, by part: `blocks` (every block's
    saved tensors, or with checkpointing only each block's input; and once, the rotary cos and
    sin every block shares), `recompute` (checkpointing: the one block rebuilt at a time in
    backward), `head` (the final norm, 3 h a token, and the logits, in fp32 for the loss)."""
    tokens = seq * micro_batch
    block = activation_bytes_per_token_layer(s, seq, act_bytes, fused_attention) * tokens
    rotary = 2 * seq * (s.hidden // s.heads) * act_bytes if s.gated else 0.0  # Llama's rope
    if checkpointing:
        blocks, recompute = s.layers * s.hidden * act_bytes * tokens, block + rotary
    else:
        blocks, recompute = s.layers * block + rotary, 0.0
    return {"blocks": blocks, "recompute": recompute,
            "head": tokens * (3 * s.hidden * act_bytes + 4.0 + s.vocab * logits_bytes)}


def activations(s: Shape, seq: int, micro_batch: int, *, checkpointing: bool,
                act_bytes: float = 2.0, fused_attention: bool = True,
                logits_bytes: float = 4.0) -> float:
    """The peak of backward: every part of `activation_parts`."""
    return sum(activation_parts(s, seq, micro_batch, checkpointing=checkpointing,
                                act_bytes=act_bytes, fused_attention=fused_attention,
                                logits_bytes=logits_bytes).values())


def saved_bytes(model: Any, input_ids: Any) -> int:
    """What the activation formulas are checked against: the bytes of the distinct storages
    autograd saves for backward in one training forward of `model` (weights aside)."""
    import torch

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() and t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=input_ids, labels=input_ids, use_cache=False)
    return sum(saved.values())


# --------------------------------------------------------------------------- parallelism, storage


def pipeline_bubble(stages: int, micro_batches: int) -> float:
    """The idle fraction of a GPipe / 1F1B schedule: (F - 1) / (m + F - 1)."""
    if stages < 1 or micro_batches < 1:
        raise UserError(f"pipeline: stages and micro-batches must be >= 1, got {stages}, "
                        f"{micro_batches}")
    return (stages - 1) / (micro_batches + stages - 1)


def tp_bytes_per_step(s: Shape, seq: int, micro_batch: int, tp: int,
                      act_bytes: float = 2.0) -> float:
    """Bytes each GPU sends (and receives) for tensor parallelism per micro-batch: 4 ring
    all-reduces a layer (attention and MLP outputs, forward and backward) of seq x batch x
    hidden values, each moving 2 (t - 1) / t of its size through every GPU."""
    if tp < 1:
        raise UserError(f"tensor parallel size must be >= 1, got {tp}")
    size = seq * micro_batch * s.hidden * act_bytes
    return s.layers * 4 * size * 2 * (tp - 1) / tp


def token_storage(tokens: float, vocab: int) -> tuple[str, float]:
    """(dtype, bytes) of a packed token file, as `data/pack.py` writes it."""
    from lmforge.data.pack import ids_dtype

    dtype = ids_dtype(vocab)
    return dtype.name, tokens * dtype.itemsize


# --------------------------------------------------------------------------- `lmforge plan`

_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


def parse_count(text: str) -> float | None:
    """'7e9', '70B', '124M', '1.5t' -> a number; None when it is not one."""
    t = text.strip().lower().replace("_", "")
    scale = _SUFFIX.get(t[-1:], 1.0)
    try:
        value = float(t[:-1] if t[-1:] in _SUFFIX else t)
    except ValueError:
        return None
    return value * scale if value > 0 else None


def resolve_model(spec: str, vocab: int) -> tuple[float, Shape | None, str]:
    """(parameters, shape or None, what it is) from a preset, a parameter count, or an HF
    model dir / config.json / hub id."""
    from pathlib import Path

    from lmforge.models import PRESETS

    if spec in PRESETS:
        s = shape_of_preset(spec, vocab)
        return s.params, s, f"preset {spec} at a {vocab:,}-token vocabulary"
    count = parse_count(spec)
    if count is not None:
        return count, None, "a parameter count (no shape, so no activations or LoRA sizes)"
    from transformers import AutoConfig

    path = Path(spec)
    try:
        config = AutoConfig.from_pretrained(str(path.parent if path.name == "config.json" else path))
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"model {spec!r}: not a preset ({', '.join(PRESETS)}), a parameter "
                        f"count (7e9, 70B) or a loadable config: {first}") from None
    s = shape_of_config(config)
    return s.params, s, f"{config.model_type} config {spec}"


def _size(x: float) -> str:
    """Bytes in GB, or MB below one GB (a small model's state is all below it)."""
    return f"{x / GB:,.2f} GB" if x >= GB else f"{x / 1e6:,.1f} MB"


def memory_table(params: float, shape: Shape | None, ns: Any) -> list[str]:
    methods = ["full", "lora", "qlora"] if ns.method == "all" else [ns.method]
    head = ("| method | parallel | weights | grads | optimizer | fp32 master | state | "
            "activations (ckpt / none) | total with ckpt | fits in " + f"{ns.gpu_mem:g} GB |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    act = (activations(shape, ns.seq, ns.micro_batch, checkpointing=True),
           activations(shape, ns.seq, ns.micro_batch, checkpointing=False)) if shape else None
    for method in methods:
        trainable = None
        if method != "full":
            if shape is None:
                lines.append(f"| {method} | - | needs the model's shape (a preset or config) "
                             "| | | | | | | |")
                continue
            trainable = shape.lora_params(ns.lora_rank)
        for zero, name in enumerate(("DDP", "ZeRO-1", "ZeRO-2", "ZeRO-3 / FSDP")):
            st = model_state(params, method=method, zero=zero, gpus=ns.gpus,  # type: ignore[arg-type]
                             trainable=trainable,
                             quantized=shape.linear_params() if shape else None)
            total = st.total + (act[0] if act else 0.0)
            acts = f"{_size(act[0])} / {_size(act[1])}" if act else "-"
            fits = ("yes" if total <= ns.gpu_mem * GB else "no") if act else "-"
            lines.append(f"| {method} | {name} | {_size(st.weights)} | {_size(st.grads)} | "
                         f"{_size(st.optimizer)} | {_size(st.master)} | {_size(st.total)} | {acts} | "
                         f"{_size(total) if act else '-'} | {fits} |")
    return lines


def plan_cli(ns: Any) -> None:
    """Print the plan for `ns.model` on `ns.gpus` GPUs of `ns.gpu_mem` GB."""
    params, shape, what = resolve_model(ns.model, ns.vocab)
    flops, tokens = chinchilla_compute(params)
    out = [f"model: {what}: {params:,.0f} parameters"]
    if shape is not None:
        out.append(f"  hidden {shape.hidden}, layers {shape.layers}, heads {shape.heads} "
                   f"(kv {shape.kv_heads}), ffn {shape.ffn}, vocab {shape.vocab:,}; LoRA r"
                   f"{ns.lora_rank} on every linear layer: {shape.lora_params(ns.lora_rank):,.0f} "
                   "trainable")
    out.append(f"Chinchilla: {tokens:,.0f} tokens ({TOKENS_PER_PARAM:g} per parameter) train it "
               f"compute-optimally, {flops:.3g} FLOPs (6 N D)")
    if ns.compute:
        n, d = chinchilla(ns.compute)
        out.append(f"  a budget of {ns.compute:.3g} FLOPs: {n:,.0f} parameters on {d:,.0f} tokens")
    dtype, size = token_storage(tokens, shape.vocab if shape else ns.vocab)
    out.append(f"token storage for those tokens: {dtype}, {_size(size)}")
    out.append(f"\nmemory per GPU ({ns.gpus} GPUs, seq {ns.seq}, micro-batch "
               f"{ns.micro_batch}; bf16 weights and grads, AdamW fp32 moments + fp32 master):")
    out += memory_table(params, shape, ns)
    out.append(f"\npipeline bubble with {ns.pp} stages and {ns.micro_batches} micro-batches: "
               f"{pipeline_bubble(ns.pp, ns.micro_batches):.1%} idle")
    if shape is not None and ns.tp > 1:
        tp = tp_bytes_per_step(shape, ns.seq, ns.micro_batch, ns.tp)
        out.append(f"tensor parallel x{ns.tp}: {_size(tp)} sent per GPU per micro-batch")
    print("\n".join(out))
