"""`train.backend: unsloth`: the policy of SFT, DPO/KTO and GRPO loaded and adapted through
Unsloth's `FastLanguageModel` (its 4-bit loading, LoRA kernels and offloaded gradient
checkpointing); everything after the load (data, loss, the one loop, export) is lmforge's own.

Unsloth runs on a GPU only (importing it without one raises), so `check_unsloth` is called at
the top of each stage's main, before data or a model is loaded, and turns "no GPU" and "not
installed" into one line each.

Import order. Unsloth asks to be imported before transformers: it patches some libraries at
import. lmforge's stages import transformers at module import, so here Unsloth always comes
second, and Unsloth warns "Unsloth should be imported before [transformers, ...]". What that
costs, read from Unsloth's source: the model kernels (attention, MLP, RoPE, the LoRA fast
paths) are installed by `FastLanguageModel.from_pretrained` on the model classes themselves
(`FastLlamaModel.pre_patch` assigns `LlamaAttention.forward` etc.), so they apply whatever the
order; the import-time patches that a late import can miss reach code that captured
transformers objects earlier, chiefly the HF/TRL trainers and their fused loss, none of which
lmforge uses (one loop, its own chunked loss on logits; no `labels` are passed, so Unsloth's
forward returns logits). So that one warning is replaced by a one-line note, not hidden.
To have Unsloth first anyway: `python -c "import unsloth, sys; from lmforge.cli import main;
sys.exit(main())" sft CONFIG.yaml train.backend=unsloth`.

Full fine-tuning goes through the same call: `from_pretrained(full_finetuning=True)` is
Unsloth's documented switch for it (no adapter, 16-bit weights).
GRPO's generation is `rollout.backend`'s: hf (the KV-cached sampler over this model), vllm
(a second, colocated engine), or unsloth: Unsloth's own vLLM integration, started here by
`from_pretrained(fast_inference=True)` and sampled by rl/unsloth_engine.py."""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any

import torch
from transformers import PreTrainedModel

from lmforge.config import LoraCfg
from lmforge.errors import UserError

INSTALL = "pip install 'lmforge[unsloth]'"
_LATE_IMPORT = "Unsloth should be imported before"  # the start of Unsloth's warning


def check_unsloth(what: str) -> None:
    """One line, before anything loads, when `train.backend=unsloth` cannot run here."""
    if not torch.cuda.is_available():
        raise UserError(f"{what}: train.backend=unsloth needs an NVIDIA GPU (CUDA); this machine "
                        "has none: use train.backend=hf")
    # find_spec, not import: importing unsloth has side effects (patches, GPU probing)
    if importlib.util.find_spec("unsloth") is None:
        raise UserError(f"{what}: train.backend=unsloth needs unsloth: {INSTALL}")


def _fast_language_model() -> Any:
    """Unsloth's loader class, imported here and only here (see the module docstring)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("always", message=f".*{_LATE_IMPORT}")
        try:
            from unsloth import FastLanguageModel
        except ImportError as e:
            raise UserError(f"train.backend=unsloth: cannot import unsloth ({e}): {INSTALL}") from None
    for w in caught:
        if _LATE_IMPORT in str(w.message):
            print("unsloth: imported after transformers; its model kernels are installed at load "
                  "and apply, the trainer patches it would miss are unused by lmforge")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return FastLanguageModel


def lora_targets(model: PreTrainedModel, lora: LoraCfg) -> list[str]:
    """Unsloth takes target modules as a list of names (it iterates the argument, so peft's
    "all-linear" string would be read letter by letter): all-linear is spelled out as peft
    means it, every linear layer but the output head."""
    from lmforge.models import linear_module_names

    if lora.target_modules != "all-linear":
        return list(lora.target_modules)
    head = model.get_output_embeddings()
    head_names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is head}
    return [n for n in linear_module_names(model) if n not in head_names]


def load_unsloth(path: str | None, lora: LoraCfg, max_seq_length: int, *, n_vocab: int,
                 new_token_ids: list[int], stop_ids: list[int], pad_id: int, seed: int = 0,
                 trust_remote_code: bool = False, vllm_share: float | None = None) -> PreTrainedModel:
    """The policy as `load_sft_model` builds it (rows for the template's new tokens, the stop
    ids in its generation config, adapters training those rows), through Unsloth's API:
    `FastLanguageModel.from_pretrained` (4-bit NF4 for qlora, 16-bit otherwise, the whole
    model for full) and `FastLanguageModel.get_peft_model` with Unsloth's gradient
    checkpointing (activations offloaded to CPU RAM). With `vllm_share` (GRPO's
    rollout.backend=unsloth) Unsloth also starts its vLLM engine on that share of the GPU,
    sharing the base weights; vLLM's LoRA then carries the adapter, so no token rows are
    trained and none may be added."""
    from lmforge.models import add_rows_for_new_tokens, check_targets, resolve_model_dir

    check_unsloth("train.backend=unsloth")
    if path is None:
        raise UserError("train.backend=unsloth loads a pretrained model: set model.path")
    FastLanguageModel = _fast_language_model()
    full = lora.method == "full"
    fast = {} if vllm_share is None else {"fast_inference": True, "max_lora_rank": lora.r,
                                           "gpu_memory_utilization": vllm_share}
    model, _ = FastLanguageModel.from_pretrained(  # its tokenizer is unused: lmforge's has the template
        model_name=resolve_model_dir(path), max_seq_length=max_seq_length, dtype=None,
        load_in_4bit=lora.method == "qlora", full_finetuning=full, fix_tokenizer=False,
        trust_remote_code=trust_remote_code, random_state=seed, **fast)
    rows = model.get_input_embeddings().num_embeddings
    if fast and n_vocab > rows:
        raise UserError(f"rollout.backend=unsloth: the chat template needs {n_vocab - rows} new "
                        f"token rows ({rows} -> {n_vocab}), which vLLM's LoRA cannot carry: start "
                        "from a model trained with the template (an lmforge sft run) or use "
                        "rollout.backend=vllm")
    add_rows_for_new_tokens(model, n_vocab)
    # generation (HF, vLLM) stops at the template's end-of-turn token, saved with the model
    model.generation_config.eos_token_id = stop_ids
    model.generation_config.pad_token_id = pad_id
    if full:
        return model  # type: ignore[no-any-return]
    check_targets(model, lora.target_modules)
    train_rows = sorted(new_token_ids) if lora.train_new_tokens and new_token_ids else None
    if fast and train_rows:
        print("rollout.backend=unsloth: the template's token rows are not trained (vLLM's LoRA "
              "cannot carry them); they keep the model's values")
        train_rows = None
    # use_dora and trainable_token_indices are not named parameters of get_peft_model: Unsloth
    # passes its extra keywords on to peft's LoraConfig (DoRA layers take its slower path)
    return FastLanguageModel.get_peft_model(  # type: ignore[no-any-return]
        model, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=lora_targets(model, lora), use_gradient_checkpointing="unsloth",
        random_state=seed, use_rslora=lora.rslora, use_dora=lora.method == "dora",
        trainable_token_indices=train_rows)


def max_seq_length(cfg: Any) -> int:
    """The longest sequence the stage trains on: data.max_length (SFT, DPO); for GRPO, whose
    prompt and completion share the model's context, that context."""
    length = getattr(cfg.data, "max_length", None)
    if length is not None or cfg.model.path is None:  # no path: load_unsloth says so
        return int(length or 0)
    from transformers import AutoConfig

    from lmforge.models import resolve_model_dir

    conf = AutoConfig.from_pretrained(resolve_model_dir(cfg.model.path),
                                      trust_remote_code=cfg.model.trust_remote_code)
    return int(getattr(conf, "max_position_embeddings", None) or getattr(conf, "n_positions", 2048))


def vllm_share(cfg: Any) -> float | None:
    """The GPU share of the vLLM engine Unsloth starts with the policy: GRPO's
    rollout.gpu_memory_utilization under rollout.backend=unsloth; None for every other run."""
    rollout = getattr(cfg, "rollout", None)
    return rollout.gpu_memory_utilization if getattr(rollout, "backend", None) == "unsloth" else None


def training_device(stage: str, train: Any) -> torch.device:
    """Where a policy-training stage runs, after what each does first: the backend check
    (before anything loads, so no GPU or no unsloth is one line) and `train.threads`."""
    if train.backend == "unsloth":
        check_unsloth(stage)
    if train.threads:
        torch.set_num_threads(train.threads)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
