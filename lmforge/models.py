"""Models: build from scratch via transformers configs, load HF checkpoints, save portable dirs.

A saved `final/` must load as is in transformers 5.x and 4.4x, vLLM and lm-evaluation-harness,
so `save_hf` writes the config keys both generations read (see `_portable_config`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from lmforge.config import ModelCfg
from lmforge.errors import UserError
from lmforge.io import atomic_dir, check_local_or_hub
from lmforge.tokenizer import make_portable

# per-shard load/save bars drown the loop's own progress on small models
hf_logging.disable_progress_bar()


@dataclass(frozen=True)
class Preset:
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int  # llama MLP width (SwiGLU: ~8/3 d, rounded to a multiple of 16)


# Sizes at an 8k vocab with tied embeddings: nano ~3.3M, tiny ~5.3M params, small ~29M.
PRESETS: dict[str, Preset] = {
    "nano": Preset(d_model=192, n_layers=4, n_heads=4, d_ff=512),
    "tiny": Preset(d_model=256, n_layers=4, n_heads=4, d_ff=688),
    "small": Preset(d_model=512, n_layers=8, n_heads=8, d_ff=1376),
    "gpt2-124m": Preset(d_model=768, n_layers=12, n_heads=12, d_ff=3072),
}


def preset_config(cfg: ModelCfg, vocab_size: int, bos_id: int | None, eos_id: int | None,
                  pad_id: int | None) -> PretrainedConfig:
    if cfg.preset is None:
        raise UserError("model: set model.path (HF dir or hub id) or model.preset")
    p = PRESETS[cfg.preset]
    arch = "gpt2" if cfg.preset == "gpt2-124m" else cfg.arch
    common: dict[str, Any] = dict(
        vocab_size=vocab_size, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
        tie_word_embeddings=cfg.tie_embeddings,
    )
    if arch == "gpt2":
        # no dropout: tiny from-scratch runs are data-starved, not overfit, and it keeps
        # training bit-reproducible (resume tests compare weights exactly)
        return GPT2Config(
            n_embd=p.d_model, n_layer=p.n_layers, n_head=p.n_heads, n_inner=p.d_ff,
            n_positions=cfg.max_position_embeddings, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, **common,
        )
    return LlamaConfig(
        hidden_size=p.d_model, num_hidden_layers=p.n_layers, num_attention_heads=p.n_heads,
        num_key_value_heads=p.n_heads, intermediate_size=p.d_ff,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=1e-5, **common,
    )


def build_model(cfg: ModelCfg, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> PreTrainedModel:
    """A model from `cfg.path` if given, else a fresh `cfg.preset` sized to the tokenizer."""
    if cfg.path is not None:
        model = load_model(cfg.path, trust_remote_code=cfg.trust_remote_code)
    else:
        conf = preset_config(cfg, len(tokenizer), tokenizer.bos_token_id,
                             tokenizer.eos_token_id, tokenizer.pad_token_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # init depends on the seed alone, not on RNG history
            model = AutoModelForCausalLM.from_config(conf)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    return model


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Recompute activations in backward: ~1/3 more compute for memory ~ one layer's worth.
    transformers 5 renamed the switch; 4.x has only the old name."""
    fn = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    fn()
    model.config.use_cache = False


def load_model(path: str | Path, trust_remote_code: bool = False,
               dtype: torch.dtype | None = None) -> PreTrainedModel:
    p = Path(path)
    check_local_or_hub(path, "model")
    if p.exists() and not (p / "config.json").exists():
        raise UserError(f"{path} is not a Hugging Face model directory (no config.json)")
    try:
        return AutoModelForCausalLM.from_pretrained(  # type: ignore[no-any-return]
            str(path), trust_remote_code=trust_remote_code, dtype=dtype or torch.float32,
        )
    except OSError as e:
        raise UserError(f"cannot load model {str(path)!r}: {str(e).splitlines()[0]}") from None


def save_hf(model: PreTrainedModel, out: Path,
            tokenizer: PreTrainedTokenizerBase | None = None) -> None:
    """Write an HF directory atomically (temp dir, then rename): safetensors + portable config."""
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        _portable_config(tmp / "config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            make_portable(tmp)


def _portable_config(path: Path) -> None:
    """transformers 5 spells rope as `rope_parameters` and dtype as `dtype`; 4.x reads
    `rope_theta`/`rope_scaling` and `torch_dtype`. Write both spellings."""
    conf = json.loads(path.read_text())
    rope = conf.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        conf.setdefault("rope_theta", rope["rope_theta"])
        kind = rope.get("rope_type", "default")
        extra = {k: v for k, v in rope.items() if k not in ("rope_theta",)}
        conf.setdefault("rope_scaling", None if kind == "default" else {**extra, "type": kind})
    if "dtype" in conf:
        conf.setdefault("torch_dtype", conf["dtype"])
    path.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), tied weights counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def matmul_params(model: nn.Module) -> int:
    """Parameters that take part in matmuls (every Linear/Conv1D, the LM head included;
    the embedding lookup is free). This is the N in 6*N FLOPs per token."""
    n = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2 and not isinstance(m, nn.Embedding):
            n += w.numel()
    return n


def flops_per_token(model: PreTrainedModel, seq_len: int) -> float:
    """Training FLOPs per token: 6 N (forward + backward of every matmul) plus attention's
    12 * layers * T * d (QK^T and AV, forward + backward; PaLM appendix B's convention)."""
    c = model.config
    layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer", 0)
    d = getattr(c, "hidden_size", None) or getattr(c, "n_embd", 0)
    return 6.0 * matmul_params(model) + 12.0 * layers * seq_len * d


def config_summary(model: PreTrainedModel) -> dict[str, Any]:
    trainable, total = count_params(model)
    return {"model_type": model.config.model_type, "params": total, "trainable_params": trainable,
            "vocab_size": model.config.vocab_size}
