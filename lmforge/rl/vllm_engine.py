"""The `vllm` rollout backend: a vLLM engine in the trainer's own process (colocated), fed the
policy's weights after every optimizer step.

How it is built, and why:
- vLLM starts from the policy's config and tokenizer (written once to a temp dir) with
  `load_format="dummy"`, and its weights come from `sync(model)` right away: the first load
  and every later one take the same path, and no checkpoint is written to disk for it (verl
  starts its rollout engine the same way).
- In-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): the weights are handed to vLLM's model as
  tensors, by `LLM.apply_model(lambda m: m.load_weights(...))`, with no copy through a pipe
  (TRL's `vllm_mode="colocate"` and OpenRLHF/verl call the same `load_weights`). The names are
  the HF checkpoint's, which is what vLLM's `load_weights` maps from when it reads a
  checkpoint (fused qkv, transposed GPT-2 Conv1D, tied heads). The prefix cache holds keys and
  values of the old weights, so it is reset after each load.
- A peft model is merged on the fly (`policy_weights`): base + scale * B @ A per LoRA layer
  (DoRA through peft's own variant code), trained token rows, modules_to_save; the trained
  module is not touched, and the result equals `merge_and_unload()`'s state dict (tested).
- Log-probs are vLLM's `logprobs_mode="processed_logprobs"`: those of the distribution after
  temperature (and top-k/top-p), as the `hf` engine reports with both off, the RL default.
  With top-k or top-p on, vLLM's are of the truncated, renormalized distribution, which the
  `hf` engine does not report (see rollout.py). Greedy (temperature 0) reports the T=1
  distribution, as `hf` does.
- Each prompt is one request (n=1) with its own seed drawn from the caller's generator: a
  step's rollouts are a function of (seed, step, weights) as with `hf`, up to the engine's
  batching, which vLLM schedules itself (continuous batching over all prompts at once;
  `SamplingCfg.batch_size` is not used here). Stops are exactly the `stop_ids` given
  (`ignore_eos`, so the checkpoint's EOS is not added), and stop strings are vLLM's own.
- What vLLM sets process-wide on start (the global RNG seed; on CPU a patched, no-op
  `torch.set_num_threads` and one intra-op thread) is put back afterwards: the trainer shares
  the process.
- Memory: `gpu_memory_utilization` is the share of the GPU vLLM takes (weights + KV cache);
  the trainer's model, optimizer and activations live in the rest. On the CPU backend vLLM
  reads it as the share of RAM it reserves (`kv_cache_memory_bytes` overrides it). Sleep mode
  (freeing vLLM's memory during the optimizer step) is not used: it needs CUDA, and the fixed
  share is what TRL's colocate mode uses by default.

vLLM is an extra with its own pins (transformers, torch): `make vllm` builds `.venv-vllm`.
"""

from __future__ import annotations

import copy
import os
import random
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmforge.errors import UserError
from lmforge.rl.rollout import Finish, Rollouts, SamplingCfg, StopText
from lmforge.tokenizer import save_portable

INSTALL = "run `make vllm` (a separate .venv-vllm: vLLM pins its own torch and transformers)"


def import_vllm() -> ModuleType:
    try:
        import vllm
    except ImportError as e:
        raise UserError(f"rollout.backend=vllm needs vLLM, which is not importable here "
                        f"({e}): {INSTALL}") from None
    return vllm


# --------------------------------------------------------------------------- weights


def policy_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights as a plain HF model's state dict would name and hold them, one
    tensor at a time: for a peft model, the merged weights (what `merge_and_unload()` would
    give), computed without modifying `model`. Only merged layers are new tensors; every other
    tensor is the module's own (detached), so a full model costs no copy."""
    from peft import PeftModel

    root = model.get_base_model() if isinstance(model, PeftModel) else model
    yield from _walk(root, "")


def _walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    from peft.tuners.lora import LoraLayer
    from peft.tuners.trainable_tokens import TrainableTokensLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper, TrainableTokensWrapper

    if isinstance(module, ModulesToSaveWrapper):
        active = module.active_adapters
        inner = module.modules_to_save[active[0]] if active and not module.disable_adapters \
            else module.original_module
        yield from _walk(inner, prefix)
        return
    if isinstance(module, TrainableTokensWrapper):
        module = module.token_adapter
    if isinstance(module, TrainableTokensLayer):
        base = module.get_base_layer()
        w = base.weight if module.disable_adapters else \
            module.get_merged_weights(module.active_adapters)
        yield prefix + "weight", w.detach()
        yield from _own(base, prefix, skip={"weight"})
        return
    if isinstance(module, LoraLayer):
        yield from _merged_lora(module, prefix)
        return
    if isinstance(module, BaseTunerLayer):
        raise UserError(f"the vllm backend cannot merge a {type(module).__name__} adapter "
                        f"layer ({prefix.rstrip('.')}); use rollout.backend=hf")
    yield from _own(module, prefix)
    for name, child in module.named_children():
        yield from _walk(child, f"{prefix}{name}.")


def _own(module: nn.Module, prefix: str, skip: set[str] | None = None
         ) -> Iterator[tuple[str, torch.Tensor]]:
    """A module's own parameters and persistent buffers, in state-dict order."""
    for name, p in module._parameters.items():
        if p is not None and name not in (skip or ()):
            yield prefix + name, p.detach()
    for name, b in module._buffers.items():
        if b is not None and name not in module._non_persistent_buffers_set:
            yield prefix + name, b.detach()


def _merged_lora(layer: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """W + the deltas of the active, not yet merged adapters, as peft's `merge` would write
    it (in place in W's dtype), into a new tensor."""
    from peft.utils.integrations import dequantize_module_weight

    base = layer.get_base_layer()
    w = base.weight.detach()
    if not w.is_floating_point():  # a 4-bit/8-bit base (QLoRA): merge onto its dequantized values
        w = dequantize_module_weight(base).detach()
    bias = base.bias.detach() if getattr(base, "bias", None) is not None else None
    todo = [] if layer.disable_adapters else \
        [a for a in layer.active_adapters if a in layer.lora_A and a not in layer.merged_adapters]
    with torch.no_grad():
        for a in todo:
            if a in layer.lora_variant:  # DoRA & co: their own merge, on a copy of W
                w = layer.lora_variant[a].merge_safe(layer, a, w.clone())
                layer._cache_pop(f"{a}-weight_norm")  # merge_safe caches it for an unmerge
            else:
                w = torch.add(w, layer.get_delta_weight(a)).to(w.dtype)
            if layer.lora_bias[a]:
                b = layer.lora_B[a].bias * layer.scaling[a]
                bias = torch.add(bias, b).to(bias.dtype)  # type: ignore[arg-type]
    yield prefix + "weight", w
    if bias is not None:
        yield prefix + "bias", bias
    yield from _own(base, prefix, skip={"weight", "bias"})


# --------------------------------------------------------------------------- engine


class VllmEngine:
    """The `Engine` of rollout.py on a colocated vLLM `LLM` (see the module docstring)."""

    name = "vllm"
    lora_request: Any = None  # every request's adapter (the Unsloth engine sets one; see there)

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 stop_ids: Sequence[int], pad_id: int, *, gpu_memory_utilization: float = 0.3,
                 dtype: str = "auto", max_model_len: int | None = None, seed: int = 0,
                 kv_cache_memory_bytes: int | None = None,
                 enforce_eager: bool | None = None) -> None:
        vllm = import_vllm()
        self.tokenizer, self.stop_ids, self.pad_id = tokenizer, list(stop_ids), pad_id
        device = next(model.parameters()).device
        if device.type == "cpu":
            _check_cpu_head_size(_hf_model(model).config)
        self._dir = tempfile.TemporaryDirectory(prefix="lmforge-vllm-")
        hf = _hf_model(model)
        config = copy.deepcopy(hf.config)
        config.architectures = [type(hf).__name__]  # what vLLM picks its model class by
        if getattr(config, "quantization_config", None) is not None:
            config.quantization_config = None  # a QLoRA base: vLLM gets the merged fp weights
        config.save_pretrained(self._dir.name)
        save_portable(tokenizer, Path(self._dir.name))
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # colocated: the engine in this process
        with _process_state_kept():
            self.llm = vllm.LLM(
                self._dir.name, dtype=_dtype(dtype, model, device), seed=seed,
                gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                load_format="dummy", logprobs_mode="processed_logprobs", generation_config="vllm",
                # CPU: no CUDA graphs to capture, and vLLM's torch.compile costs minutes at start
                enforce_eager=device.type != "cuda" if enforce_eager is None else enforce_eager,
                **({} if kv_cache_memory_bytes is None
                   else {"kv_cache_memory_bytes": kv_cache_memory_bytes}),
            )
        # an older vLLM, without the in-place reload, gets the weights through its loader
        self._reload = self.llm.collective_rpc(lambda w: hasattr(w, "reload_weights"))[0]
        self.sync(model)

    def sync(self, model: nn.Module) -> None:
        """Load `model`'s current (merged) weights into vLLM, then drop the prefix cache."""
        weights = policy_weights(model)
        if self._reload:  # in place, then the loader's post-processing (e.g. kernel layouts)
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights,
                                                              "is_checkpoint_format": True})
        else:
            self.llm.apply_model(lambda m: m.load_weights(weights))
        self.llm.reset_prefix_cache()

    def generate(self, prompts: list[list[int]], cfg: SamplingCfg,
                 generator: torch.Generator) -> Rollouts:
        from vllm import SamplingParams

        cfg.check()
        if any(not p for p in prompts):
            raise UserError("a prompt is empty: sampling needs at least one prompt token")
        if cfg.temperature > 2:
            raise UserError(f"rollout.temperature={cfg.temperature}: the vllm backend samples at "
                            f"temperatures up to 2 (vLLM's limit); use rollout.backend=hf")
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),), generator=generator).tolist()
        params = [SamplingParams(
            n=1, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
            max_tokens=cfg.max_new_tokens, stop=[s for s in cfg.stop if s] or None,
            stop_token_ids=self.stop_ids, ignore_eos=True, logprobs=0, seed=s,
            skip_special_tokens=False,  # stop strings are looked for in the text StopText sees
        ) for s in seeds]
        # vLLM's sampler also draws from the global RNGs (seeded rows are then redrawn from
        # their own): the trainer's RNG stream must not depend on it
        with _global_rng_kept():
            outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params,
                                     use_tqdm=False, lora_request=self.lora_request)
        return self._rollouts(prompts, [o.outputs[0] for o in outs], StopText(self.tokenizer, cfg.stop))

    def _rollouts(self, prompts: list[list[int]], outs: list[Any], stop_text: StopText) -> Rollouts:
        N, L = len(outs), max((len(o.token_ids) for o in outs), default=0)
        tokens = torch.full((N, L), self.pad_id, dtype=torch.long)
        logps = torch.zeros((N, L), dtype=torch.float32)
        mask = torch.zeros((N, L), dtype=torch.long)
        texts: list[str] = []
        finish: list[Finish] = []
        for i, o in enumerate(outs):
            ids = list(o.token_ids)
            n = len(ids)
            tokens[i, :n] = torch.tensor(ids, dtype=torch.long)
            logps[i, :n] = torch.tensor([lp[t].logprob for t, lp in zip(ids, o.logprobs)])
            mask[i, :n] = 1
            texts.append(stop_text.cut(self.tokenizer.decode(ids, skip_special_tokens=True)))
            finish.append(_finish(o))
        return Rollouts(list(prompts), tokens, logps, mask, texts, finish)


def _finish(out: Any) -> Finish:
    if out.finish_reason == "length":
        return "length"
    return "stop" if isinstance(out.stop_reason, str) else "eos"


def _hf_model(model: nn.Module) -> PreTrainedModel:
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model  # type: ignore[return-value]


def _check_cpu_head_size(config: Any) -> None:
    """vLLM's CPU attention kernel takes a few head sizes only, and says so at the first
    forward, deep in a generate call: say it before starting the engine."""
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
        sizes = CPUAttentionBackend.get_supported_head_sizes()
    except (ImportError, AttributeError):  # another vLLM layout: let vLLM say it
        return
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head not in sizes:
        raise UserError(f"vLLM's CPU attention takes head sizes {sizes}; this model's is {head}: "
                        f"use rollout.backend=hf on a CPU")


def _dtype(dtype: str, model: nn.Module, device: torch.device) -> str:
    """vLLM's `auto` turns an fp32 checkpoint into bf16/fp16 on a GPU (fast, and the engine's
    log-probs then differ from the trainer's by bf16 rounding: the IS correction's job); on
    a CPU the policy's own dtype is kept, so the two agree to float rounding."""
    if dtype != "auto" or device.type == "cuda":
        return dtype
    return str(next(model.parameters()).dtype).removeprefix("torch.")


@contextmanager
def _process_state_kept() -> Iterator[None]:
    """Undo what starting vLLM does to process-wide state the trainer relies on: it seeds the
    global RNGs and, on CPU, replaces `torch.set_num_threads` with a no-op and drops to one
    thread ("serving" settings for a process of its own)."""
    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        with _global_rng_kept():
            yield
    finally:
        torch.set_num_threads = set_threads  # type: ignore[assignment]
        set_threads(threads)


@contextmanager
def _global_rng_kept() -> Iterator[None]:
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
