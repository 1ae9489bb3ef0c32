"""The `unsloth` rollout backend: GRPO's sampling through the vLLM engine that Unsloth starts
inside the policy (`FastLanguageModel.from_pretrained(fast_inference=True)`), with the policy's
current LoRA adapter attached to every request.

How it differs from the `vllm` backend (vllm_engine.py), and why:
- One copy of the base weights. Unsloth builds the trained model's base layers on vLLM's own
  weight tensors, so the frozen base exists once on the GPU, shared by trainer and sampler;
  the `vllm` backend holds a second, merged copy and rewrites all of it after every step.
- A sync is the adapter only: `model.load_lora(dir, load_tensors=True)` (Unsloth's API) wraps
  the live LoRA A/B tensors in a new vLLM `LoRARequest` (a new id, so vLLM loads it afresh
  rather than reusing the cached adapter of the previous step); nothing is merged or copied
  through disk but the adapter's small config file, written once.
- So only what a vLLM LoRA can carry may be trained: LoRA/QLoRA (not DoRA, not full), and no
  new token rows (vLLM 0.32 rejects `trainable_token_indices` weights and the engine dies):
  the template's tokens must already be in the base vocabulary (a GRPO run usually starts
  from an SFT model, whose rows were trained there). Both are checked at load, in
  unsloth_backend.py.
- Log-probs: the `vllm` backend asks vLLM for `processed_logprobs` (after temperature), as the
  `hf` engine reports them. Unsloth starts its engine itself, with vLLM's default, which is
  read back here: `raw_logprobs` are those of the T=1 distribution, equal to what the trainer
  scores only at rollout.temperature 1; another temperature is refused rather than fed to the
  importance-sampling correction as wrong numbers.
Sampling itself (seeds, stops, the rollouts' layout) is the `vllm` backend's, inherited."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lmforge.errors import UserError
from lmforge.rl.rollout import Rollouts, SamplingCfg
from lmforge.rl.vllm_engine import VllmEngine

PROCESSED = "processed_logprobs"


def logprobs_mode(llm: Any) -> str:
    """What the engine's log-probs are of; vLLM's default where the engine does not say."""
    config = getattr(getattr(llm, "llm_engine", None), "model_config", None)
    return str(getattr(config, "logprobs_mode", "raw_logprobs"))


class UnslothVllmEngine(VllmEngine):
    """The `Engine` of rollout.py on Unsloth's in-model vLLM (see the module docstring)."""

    name = "unsloth"

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                 stop_ids: Sequence[int], pad_id: int) -> None:
        # not VllmEngine.__init__: the engine exists already, started by Unsloth with the model
        self.llm = getattr(model, "vllm_engine", None)
        if self.llm is None or not callable(getattr(model, "load_lora", None)):
            raise UserError("rollout.backend=unsloth samples through the vLLM engine that Unsloth "
                            "starts with the policy: set train.backend=unsloth with lora.method "
                            "lora or qlora (or use rollout.backend=vllm)")
        self.tokenizer, self.stop_ids, self.pad_id = tokenizer, list(stop_ids), pad_id
        self.logprobs_mode = logprobs_mode(self.llm)
        self._dir = tempfile.TemporaryDirectory(prefix="lmforge-unsloth-lora-")
        self.sync(model)

    def sync(self, model: nn.Module) -> None:
        """The adapter's current tensors as a new LoRA request; the base is shared, unchanged."""
        self.lora_request = model.load_lora(self._dir.name, load_tensors=True)  # type: ignore[operator]

    def generate(self, prompts: list[list[int]], cfg: SamplingCfg,
                 generator: torch.Generator) -> Rollouts:
        if self.logprobs_mode != PROCESSED and cfg.temperature != 1:
            raise UserError(f"rollout.temperature={cfg.temperature}: Unsloth's vLLM engine reports "
                            f"{self.logprobs_mode} (those of temperature 1), which the trainer's "
                            "log-probs equal only at rollout.temperature=1; set it, or use "
                            "rollout.backend=vllm")
        return super().generate(prompts, cfg, generator)
