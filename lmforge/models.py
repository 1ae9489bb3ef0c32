"""Models: build from scratch via transformers configs, load HF checkpoints, save portable dirs.

A saved `final/` must load as is in transformers 5.x and 4.4x, vLLM and lm-evaluation-harness,
so `save_hf` writes the config keys both generations read (see `_portable_config`) and the
tokenizer files both read (`save_portable`); an adapter's directory gets the same treatment
and a base it loads on (`export_peft`). Every directory lmforge writes lists its files
(`WRITTEN`), so a later write may replace it knowing it destroys nothing anyone else wrote.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
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

from lmforge.config import LoraCfg, ModelCfg
from lmforge.errors import UserError
from lmforge.io import atomic_dir, check_local_or_hub
from lmforge.tokenizer import load_tokenizer, save_portable

if TYPE_CHECKING:
    from peft import PeftModel

# per-shard load/save bars drown the loop's own progress on small models
hf_logging.disable_progress_bar()
# bitsandbytes (imported by peft) warns on every import that it cannot fetch an optional CPU
# kernel from the hub; its fallback is what runs, so the warning says nothing actionable
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


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


def disable_dropout(model: nn.Module) -> int:
    """Set every dropout probability to 0 (GPT-2 ships 0.1); returns how many were on.
    Losses that compare the policy with a reference (DPO, KTO, a reward margin) would
    otherwise see dropout noise as a difference between the two."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.Dropout) and m.p > 0:
            m.p, n = 0.0, n + 1
        if isinstance(getattr(m, "attention_dropout", None), float) and m.attention_dropout > 0:
            m.attention_dropout, n = 0.0, n + 1  # llama-style attention keeps a float, no module
    for key in ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout",
                "dropout"):
        if isinstance(getattr(model.config, key, None), float):  # functional dropout reads these
            setattr(model.config, key, 0.0)
    return n


def resolve_model_dir(path: str | Path) -> str:
    """A model dir, or a stage dir whose `final/` holds one (so pipelines can say `uses`)."""
    p = Path(path)
    if p.is_dir() and not (p / "config.json").exists() and (p / "final" / "config.json").exists():
        return str(p / "final")
    return str(path)


def load_model(path: str | Path, trust_remote_code: bool = False,
               dtype: torch.dtype | None = None) -> PreTrainedModel:
    path = resolve_model_dir(path)
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
    except SafetensorError as e:
        raise UserError(_damaged_weights(p, e)) from None


def _damaged_weights(d: Path, e: Exception) -> str:
    """Name the shard that does not read. safetensors' error names no file, and its header
    check (sizes against the file's length) is what catches a truncated copy or download."""
    why = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
    for f in sorted(d.glob("*.safetensors")) if d.is_dir() else []:
        try:
            with safe_open(str(f), "pt"):
                pass
        except (SafetensorError, OSError) as err:
            return f"{f} is truncated or corrupt ({str(err).splitlines()[0][:160]})"
    return f"the weights of {d} are truncated or corrupt ({why})"


def save_hf(model: PreTrainedModel, out: Path,
            tokenizer: PreTrainedTokenizerBase | None = None, kind: str = "model",
            extra: dict[str, str] | None = None) -> None:
    """Write an HF directory atomically (temp dir, then rename): safetensors + portable config,
    plus `extra` text files (name -> content), all in the directory's list of written files."""
    with atomic_dir(out) as tmp:
        _write_hf(model, tmp, tokenizer)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        record_written(tmp, kind)


def _write_hf(model: PreTrainedModel, d: Path, tokenizer: PreTrainedTokenizerBase | None) -> None:
    model.save_pretrained(d, safe_serialization=True)
    _portable_config(d / "config.json")
    if tokenizer is not None:
        save_portable(tokenizer, d)


# The list of files lmforge wrote into a directory (relative path -> [size, mtime_ns]), written
# last. A directory that holds exactly these, unchanged, can be replaced without losing anything
# a person put there or edited; any other file, or a changed one, makes it theirs.
WRITTEN = ".lmforge-files.json"


def record_written(d: Path, kind: str = "model") -> None:
    """`kind` says what wrote it: "merge" outputs are the only ones `lmforge merge` replaces
    without --force (a stage's final/ or best/ is a trained model, never scratch space)."""
    files = {}
    for root, _, names in os.walk(d):
        for name in names:
            f = Path(root) / name
            st = f.lstat()
            files[f.relative_to(d).as_posix()] = [st.st_size, st.st_mtime_ns]
    (d / WRITTEN).write_text(json.dumps({"written_by": "lmforge", "kind": kind, "files": files},
                                        indent=1) + "\n")


def written_kind(d: Path) -> str | None:
    """The kind recorded in `d`'s file list, or None when there is no readable list."""
    try:
        return str(json.loads((d / WRITTEN).read_text(encoding="utf-8")).get("kind", "model"))
    except (OSError, ValueError, AttributeError):
        return None


def foreign_entries(d: Path) -> list[str]:
    """What in directory `d` lmforge did not write (or what changed since): [] for an empty
    directory or one lmforge wrote and nobody touched."""
    try:
        rec = json.loads((d / WRITTEN).read_text(encoding="utf-8"))
        files = {k: tuple(v) for k, v in rec["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        files = {}  # no list, or a damaged one: nothing here is known to be lmforge's
    parents = {q.as_posix() for k in files for q in Path(k).parents if q != Path(".")}
    foreign = []
    for root, dirs, names in os.walk(d):
        for name in [*dirs, *names]:
            f = Path(root) / name
            rel, st = f.relative_to(d).as_posix(), f.lstat()
            if rel == WRITTEN and files:
                continue
            if f.is_symlink():
                ours = False
            elif f.is_dir():
                ours = rel in parents
            else:
                ours = files.get(rel) == (st.st_size, st.st_mtime_ns)
            if not ours:
                foreign.append(rel)
        dirs[:] = [x for x in dirs if (Path(root) / x).relative_to(d).as_posix() in parents]
    return sorted(foreign)


def listing(names: list[str], first: int = 3) -> str:
    """The first few names and how many more: an error line stays one line."""
    return ", ".join(names[:first]) + (f" and {len(names) - first} more" if len(names) > first else "")


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


# architectures whose causal-LM logits are exactly output_layer(body(x)): a caller may run
# the output layer on the positions it needs only (others scale or cap logits in forward)
PLAIN_HEAD = frozenset({"llama", "gpt2", "mistral", "qwen2", "qwen3"})


def body_of(model: nn.Module) -> nn.Module:
    """The transformer body of an HF model or its peft wrapper. A PeftModel's `base_model`
    is peft's LoraModel, not the body: `get_base_model()` is the wrapped model (adapters
    injected in place), whose `base_model_prefix` names its body (`model`, `transformer`)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, inner.base_model_prefix)  # type: ignore[no-any-return]


def final_hidden(model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """(R, T, d) the body's last hidden states (after its final norm), for a head applied apart
    (logits in chunks, a score on chosen positions). Through the model's own forward, not the
    body's: under DDP and FSDP the root's forward hooks are what make the backward average
    gradients over the ranks and gather the root's weights. Its own head runs on one position
    only (logits_to_keep), where the model supports it."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(inner.forward).parameters else {}
    out = model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                output_hidden_states=True, **keep)
    return out.hidden_states[-1]  # type: ignore[no-any-return]


def plain_head(model: nn.Module) -> nn.Module | None:
    """The output layer when the logits are nothing but it applied to the body's output."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(inner.config, "model_type", None) not in PLAIN_HEAD:
        return None
    return inner.get_output_embeddings()  # type: ignore[no-any-return]


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), tied weights counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel() * (2 if type(p).__name__ == "Params4bit" else 1)  # 4-bit: 2 per byte
        total += n
        trainable += n if p.requires_grad else 0
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


# --------------------------------------------------------------------------- new tokens, PEFT


def add_rows_for_new_tokens(model: PreTrainedModel, n_vocab: int) -> int:
    """Grow the embedding (and an untied head) to `n_vocab` rows, each new row the mean of the
    old ones: a token the model has never seen starts where an average token is, so the first
    steps' logits stay sane. Deterministic (transformers' default samples around the mean), so
    `lmforge merge` can rebuild the same base from the saved tokenizer alone. Returns the
    number of rows added."""
    old = model.get_input_embeddings().weight.size(0)
    if n_vocab <= old:
        return 0
    model.resize_token_embeddings(n_vocab, mean_resizing=False)
    with torch.no_grad():
        for emb in {id(e): e for e in (model.get_input_embeddings(), model.get_output_embeddings())
                    if e is not None}.values():
            emb.weight[old:] = emb.weight[:old].mean(0, keepdim=True)
    return n_vocab - old


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct last names of the layers LoRA can adapt (Linear and GPT-2's Conv1D)."""
    from transformers.pytorch_utils import Conv1D

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
             if isinstance(m, (nn.Linear, Conv1D)) or type(m).__name__ == "Linear4bit"}
    return sorted(names)


def check_targets(model: nn.Module, targets: list[str] | str) -> None:
    """Each target must name (as peft matches: whole name or last parts) a layer LoRA adapts:
    a linear layer or an embedding. A block such as `mlp` is not one."""
    from transformers.pytorch_utils import Conv1D

    if targets == "all-linear":
        return
    adaptable = [n for n, m in model.named_modules()
                 if isinstance(m, (nn.Linear, Conv1D, nn.Embedding)) or type(m).__name__ == "Linear4bit"]
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in adaptable):
            raise UserError(f"lora.target_modules: {t!r} matches no module; linear layers are: "
                            f"{', '.join(linear_module_names(model))}")


def bnb_config(bits: int, what: str, *, quant_type: str = "nf4", double_quant: bool = False,
               compute_dtype: torch.dtype = torch.float32, int8_threshold: float = 6.0) -> Any:
    """The BitsAndBytesConfig of every bitsandbytes load (QLoRA's base, `lmforge quantize`):
    8-bit is LLM.int8() (Dettmers et al. 2022), activation columns above `int8_threshold` kept
    in fp16; 4-bit is NF4/FP4 with blockwise constants, optionally quantized again (double
    quantization). `what` names the setting that asked, for the missing-extra line."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(f"{what} needs bitsandbytes: pip install 'lmforge[quant]'") from None
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=int8_threshold)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute_dtype)


def load_quantized(path: str, lora: LoraCfg, trust_remote_code: bool = False) -> PreTrainedModel:
    """A 4-bit base for QLoRA (Dettmers et al. 2023): NF4 weights, optionally double-quantized
    constants, matmuls in `compute_dtype`. Everything not quantized is kept in fp32."""
    from lmforge.train.precision import DTYPES, choose

    device = "cuda" if torch.cuda.is_available() else "cpu"
    choice = choose(lora.compute_dtype, device)  # auto: bf16 only where it is fast here
    print(f"qlora compute dtype: {choice.line()}")
    q = bnb_config(4, "lora.method=qlora", quant_type=lora.quant_type,
                   double_quant=lora.double_quant, compute_dtype=DTYPES[choice.name])
    check_local_or_hub(path, "model")
    return AutoModelForCausalLM.from_pretrained(  # type: ignore[no-any-return]
        path, quantization_config=q, dtype=torch.float32, trust_remote_code=trust_remote_code)


def apply_lora(model: PreTrainedModel, lora: LoraCfg, new_token_ids: list[int],
               gradient_checkpointing: bool = False) -> PreTrainedModel:
    """Wrap `model` in LoRA/DoRA adapters (peft); the base is frozen."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    check_targets(model, lora.target_modules)
    if lora.method == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing)
    conf = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=lora.target_modules, use_rslora=lora.rslora,
        use_dora=lora.method == "dora", task_type="CAUSAL_LM",
        trainable_token_indices=sorted(new_token_ids) if lora.train_new_tokens and new_token_ids else None,
    )
    return get_peft_model(model, conf)  # type: ignore[return-value]


def merge_adapter(adapter_dir: Path, base: str | Path) -> PreTrainedModel:
    """Base (full precision) + adapter -> one plain model. The base gets the rows of any tokens
    the adapter's tokenizer added, built as in training (`add_rows_for_new_tokens`). For a
    QLoRA adapter the base is the original weights, not their 4-bit version: the merged model
    differs from the trained one by the base's quantization error, and gains its precision."""
    model = load_model(base)
    if (adapter_dir / "tokenizer_config.json").exists():
        add_rows_for_new_tokens(model, len(load_tokenizer(adapter_dir)))
    return _attach_adapter(model, adapter_dir, base).merge_and_unload()  # type: ignore[no-any-return]


def _attach_adapter(model: PreTrainedModel, adapter_dir: Path, base: str | Path) -> PeftModel:
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter_dir))
    except (ValueError, OSError) as e:
        raise UserError(f"cannot load adapter {adapter_dir}: {str(e).splitlines()[0]}") from None
    except SafetensorError as e:
        raise UserError(_damaged_weights(adapter_dir, e)) from None
    except (RuntimeError, IndexError) as e:  # shapes or token ids that the base does not have
        raise UserError(f"adapter {adapter_dir} does not fit base {base}: "
                        f"{str(e).splitlines()[0][:200]}") from None


def adapter_export(method: str, path: str | Path | None,
                   tokenizer: PreTrainedTokenizerBase, adapters: list[str] | None = None) -> Any:
    """What writes an adapter run's final/ (and best/) from the model the loop hands it:
    `export_peft` from the base at `path`; None for full fine-tuning, whose model the loop
    saves as it is."""
    if method == "full":
        return None
    base = resolve_model_dir(path)  # type: ignore[arg-type]
    return lambda model, out: export_peft(model, out, tokenizer, base, adapters)


def export_peft(model: nn.Module, out: Path, tokenizer: PreTrainedTokenizerBase, base: str,
                adapters: list[str] | None = None) -> None:
    """final/ of an adapter run, written at once (temp dir, then rename):
    - the merged model: a plain HF directory that loads anywhere, as is;
    - adapter/: the adapter, its tokenizer (template included) and a README with the load;
    - base/, only when training added token rows: the base as trained on (its weights plus
      those rows). The original base lacks the rows the adapter's token ids point into, so
      peft cannot load the adapter on it; adapter_config.json names this one instead."""
    where = out.resolve()  # recorded paths are absolute: clients load them from any directory
    with atomic_dir(out) as tmp:
        # `adapters`: which of several to export (PPO's shared critic is not the policy)
        model.save_pretrained(tmp / "adapter", selected_adapters=adapters)
        save_portable(tokenizer, tmp / "adapter")
        base_model = load_model(base)
        added = add_rows_for_new_tokens(base_model, len(tokenizer))
        recorded = str(Path(base).resolve()) if Path(base).exists() else base
        if added:
            _write_hf(base_model, tmp / "base", tokenizer)  # before the merge writes into it
            recorded = str(where / "base")
        _record_base(tmp / "adapter", recorded)
        _write_adapter_readme(tmp / "adapter", where / "adapter", recorded, base,
                              tokenizer.convert_ids_to_tokens(range(len(tokenizer) - added, len(tokenizer))))
        merged = _attach_adapter(base_model, tmp / "adapter", base).merge_and_unload()
        merged.generation_config = model.generation_config
        _write_hf(merged, tmp, tokenizer)
        record_written(tmp)


def _record_base(adapter_dir: Path, base: str) -> None:
    path = adapter_dir / "adapter_config.json"
    conf = json.loads(path.read_text(encoding="utf-8"))
    conf["base_model_name_or_path"] = base
    path.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_adapter_readme(d: Path, adapter: Path, base: str, original: str, added: list[str]) -> None:
    """Replaces peft's empty model-card template with the one load that works."""
    grown = (f"`{base}` is `{original}` with {len(added)} embedding rows added for the tokens "
             f"training added ({', '.join(f'`{t}`' for t in added)}); peft cannot load this "
             "adapter on the original, which lacks those rows.\n\n") if added else ""
    (d / "README.md").write_text(
        "# Adapter (lmforge)\n\n"
        "`..` holds the same model with this adapter merged in: a plain Hugging Face directory.\n"
        "To load the adapter on its base (transformers + peft):\n\n"
        "```python\n"
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f"base = AutoModelForCausalLM.from_pretrained({base!r})\n"
        f"model = PeftModel.from_pretrained(base, {str(adapter)!r})\n"
        f"tokenizer = AutoTokenizer.from_pretrained({str(adapter)!r})\n"
        "```\n\n" + grown +
        f"To write the merged model elsewhere: `lmforge merge {adapter} --out DIR`.\n",
        encoding="utf-8")


def read_adapter_config(adapter: Path) -> dict[str, Any]:
    """adapter_config.json as a dict, or one line saying why it is not one."""
    path = adapter / "adapter_config.json"
    if not path.is_file():
        raise UserError(f"{adapter} is not an adapter directory (no adapter_config.json)")
    try:
        conf = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text, so not an adapter config") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(conf, dict):
        raise UserError(f"{path} must hold a JSON object, not {type(conf).__name__}")
    return conf


def _recorded_base(adapter: Path, conf: dict[str, Any]) -> str:
    """The base the adapter names; a final/ directory that was moved still has its base/ next
    to the adapter, while the recorded absolute path is the old place."""
    base = conf.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise UserError(f"{adapter / 'adapter_config.json'} names no base model; pass --base")
    moved = adapter.parent / "base"
    if (not Path(base).exists() and Path(base).is_absolute() and Path(base).name == "base"
            and (moved / "config.json").exists()):
        return str(moved)
    return base


def merge_target(out: Path, inputs: list[str | Path], force: bool) -> Path:
    """Where `lmforge merge` may write: a new path, an empty directory, or an earlier merge's
    output that nobody changed since; anything else only with `force`. Never the current directory or
    one above it, nor one holding an input: replacing it would delete what is being read."""
    target = Path(os.path.abspath(out))  # `.` and `..` resolved; a symlink itself stays
    real, cwd = target.resolve(), Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise UserError(f"--out {out}: refusing to replace the current directory or one above it; "
                        "name a new directory")
    for inp in inputs:
        p = Path(inp)
        if p.exists() and (p.resolve() == real or real in p.resolve().parents):
            raise UserError(f"--out {out} holds {inp}, which this merge reads; name another directory")
    above = next(a for a in target.parents if a.exists())
    if not above.is_dir():
        raise UserError(f"--out {out}: {above} is a file, so nothing can be written below it")
    if force or not (target.exists() or target.is_symlink()):
        return target
    if target.is_symlink() or not target.is_dir():
        raise UserError(f"--out {out} is an existing file or link, not a directory lmforge "
                        "wrote; pass --force to replace it")
    foreign = foreign_entries(target)
    if foreign:
        raise UserError(f"--out {out} is not empty and holds what lmforge did not write ({listing(foreign)}); "
                        "pass --force to replace it")
    kind = written_kind(target)
    if kind not in (None, "merge"):  # None here: an empty directory
        raise UserError(f"--out {out} holds a trained model lmforge wrote ({kind}), not an "
                        "earlier merge; pass --force to replace it")
    return target


def merge_cli(adapter: Path, base: str | None, out: Path, force: bool = False) -> None:
    """`lmforge merge ADAPTER [--base B] --out DIR [--force]`: a standalone HF dir from base +
    adapter. ADAPTER may also be an adapter run's final/ (its adapter/ is used)."""
    if not (adapter / "adapter_config.json").exists() and (adapter / "adapter" / "adapter_config.json").exists():
        adapter = adapter / "adapter"
    conf = read_adapter_config(adapter)
    base = base or _recorded_base(adapter, conf)
    target = merge_target(out, [adapter, base], force)  # before the slow part, not after
    merged = merge_adapter(adapter, base)
    tokenizer = load_tokenizer(adapter if (adapter / "tokenizer_config.json").exists() else base)
    try:
        if target.is_symlink() or target.is_file():  # only with force; the link, not its target
            target.unlink()
        save_hf(merged, target, tokenizer, kind="merge")
    except OSError as e:  # permissions, a full disk: the atomic write left nothing finished-looking
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    print(f"merged {adapter} into {base} -> {out}")
