"""PPO's critic: a one-output value head on a transformer, read at every completion token.

Two ways to hold it:
- a model of its own (`load_critic`): the policy's model.path or an `lmforge rm` model (its
  trained head) under the rm stage's loader: full, LoRA or DoRA. A second transformer.
- on the actor's frozen base (`SharedCritic`, `critic.share_base`): the actor is a LoRA
  model, the critic a second LoRA adapter ("critic") on the same base plus a linear head.
  One copy of the base serves actor, critic and (adapters off) the reference; the critic
  costs its adapter and head only. Its forward switches peft's active adapter for the call.
  peft's `set_adapter` also freezes the adapters it switches off, which would stop the
  actor's gradient mid-step (its forward ran before the critic's, its backward runs after),
  so what trained before the switch is made trainable again at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmforge.chat import ChatFormat
from lmforge.config import LoraCfg, ModelCfg, RmCfg, TrainCfg
from lmforge.errors import UserError
from lmforge.models import final_hidden
from lmforge.stages.rm import init_head, load_reward_model, score_head

Batch = dict[str, torch.Tensor]
ADAPTER = "critic"
HEAD_FILE = "critic_head.safetensors"


def load_critic(path: str, lora: LoraCfg, tokenizer: PreTrainedTokenizerBase, fmt: ChatFormat,
                model: ModelCfg, seed: int) -> PreTrainedModel:
    """`path` (a reward model: its trained head; or a causal LM: a new head) as the rm stage
    builds a reward model, with `lora` on it."""
    rm = RmCfg(model=ModelCfg(preset=None, path=path, trust_remote_code=model.trust_remote_code,
                              gradient_checkpointing=model.gradient_checkpointing),
               lora=lora, train=TrainCfg(seed=seed))
    return load_reward_model(rm, tokenizer, fmt)


@contextmanager
def adapter(peft_model: Any, name: str, trainable: list[nn.Parameter]) -> Iterator[None]:
    """`name` active for the block, the previous adapter after, and every parameter in
    `trainable` trainable throughout and after: peft's switches (set_adapter, and the
    reference's disable_adapter, which freezes every adapter and on exit unfreezes only the
    active one) would otherwise leave a forward's parameters frozen by its backward."""
    previous = peft_model.active_adapter
    peft_model.set_adapter(name)
    for p in trainable:
        p.requires_grad_(True)
    try:
        yield
    finally:
        peft_model.set_adapter(previous)
        for p in trainable:
            p.requires_grad_(True)


class SharedCritic(nn.Module):
    """The critic as a second LoRA adapter on the actor's base plus a value head."""

    def __init__(self, actor: Any, lora: LoraCfg, seed: int) -> None:
        from peft import LoraConfig

        super().__init__()
        if not hasattr(actor, "peft_config"):
            raise UserError("critic.share_base needs an adapter actor: set lora.method to lora or dora")
        if lora.method not in ("lora", "dora"):
            raise UserError(f"critic.share_base: the critic is an adapter on the actor's base; "
                            f"critic.lora.method must be lora or dora, not {lora.method}")
        actor.add_adapter(ADAPTER, LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=lora.target_modules, use_rslora=lora.rslora,
            use_dora=lora.method == "dora", task_type="CAUSAL_LM"))
        for name, p in actor.named_parameters():
            if f".{ADAPTER}." in name:
                p.requires_grad_(True)  # add_adapter leaves a non-active adapter frozen
        object.__setattr__(self, "peft", actor)  # not a submodule: its parameters are the actor's
        # what trains on the shared model (the actor's and this adapter's), fixed here
        object.__setattr__(self, "trainable", [p for p in actor.parameters() if p.requires_grad])
        self.head = nn.Linear(actor.config.hidden_size, 1, bias=False)
        init_head(self.head, seed)
        self.head.to(next(actor.parameters()).device)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().contiguous()
                for k, v in get_peft_model_state_dict(self.peft, adapter_name=ADAPTER).items()}

    def save_pretrained(self, out: str | Path, **_: Any) -> None:
        """The critic's adapter and head, one file (the base is the actor's)."""
        from safetensors.torch import save_file

        Path(out).mkdir(parents=True, exist_ok=True)
        tensors = {f"adapter.{k}": v for k, v in self.adapter_state().items()}
        tensors["head.weight"] = self.head.weight.detach().contiguous()
        save_file(tensors, str(Path(out) / HEAD_FILE))

    def restore(self, ckpt: Path) -> None:
        """What `save_pretrained` wrote, back in place (a resume)."""
        from peft import set_peft_model_state_dict

        from lmforge.train.checkpoint import read_safetensors

        f = ckpt / HEAD_FILE
        if not f.exists():
            raise UserError(f"checkpoint {ckpt} has no critic weights ({HEAD_FILE}); set "
                            "train.resume=never to start over")
        t = read_safetensors(f)
        set_peft_model_state_dict(self.peft, {k[len("adapter."):]: v for k, v in t.items()
                                              if k.startswith("adapter.")}, adapter_name=ADAPTER)
        with torch.no_grad():
            self.head.weight.copy_(t["head.weight"])


def completion_values(critic: nn.Module, b: Batch) -> torch.Tensor:
    """(n, L) the critic's V(s_t) for each completion token t, aligned with `completion_mask`:
    the head on the hidden state of the position that predicts t (the state before it)."""
    sel = b["seq_ids"] >= 0
    order = torch.argsort(b["seq_ids"][sel], stable=True)
    if isinstance(critic, SharedCritic):
        with adapter(critic.peft, ADAPTER, critic.trainable):
            hidden = final_hidden(critic.peft, b["input_ids"], b["position_ids"])  # (R, T, d)
        head: nn.Module = critic.head
    else:
        head = score_head(critic)
        hidden = final_hidden(critic, b["input_ids"], b["position_ids"])
    flat = head(hidden[sel][order]).squeeze(-1).float()  # (n_tokens,)
    mask = b["completion_mask"].bool()
    return torch.zeros(mask.shape, dtype=torch.float32, device=flat.device).masked_scatter(mask, flat)


def mib(tensors: Iterable[torch.Tensor]) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def size_mb(module: nn.Module | None) -> float:
    """Parameters and buffers held, in MiB (tied tensors once); a shared critic: its adapter
    and head only."""
    if module is None:
        return 0.0
    if isinstance(module, SharedCritic):
        return mib([*module.adapter_state().values(), module.head.weight])
    return mib({id(t): t for t in [*module.parameters(), *module.buffers()]}.values())
