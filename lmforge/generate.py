"""Sampling from any HF directory: temperature, top-k, top-p, max new tokens, stop strings."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmforge.errors import UserError
from lmforge.train.progress import Ticker


@dataclass(frozen=True)
class SampleCfg:
    max_new_tokens: int = 128
    temperature: float = 0.8  # 0: greedy
    top_k: int | None = 50
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0

    def check(self) -> None:
        check_sampling(self.max_new_tokens, self.temperature, self.top_p, self.top_k)


def check_sampling(max_new_tokens: int, temperature: float, top_p: float,
                   top_k: int | None) -> None:
    """Sampling settings every sampler accepts, or one line saying which is not."""
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    # nan passes every comparison test as False: `nan < 0` would let it through and
    # `nan > 0` would then decode greedily without a word
    if not math.isfinite(temperature) or temperature < 0:
        raise UserError(f"temperature must be a finite number >= 0, got {temperature}")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise UserError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 0:
        raise UserError(f"top_k must be >= 0, got {top_k}")


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """The text before the earliest stop string (generation may overshoot by a token)."""
    cut = min((i for s in stop if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


@torch.no_grad()
def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
             cfg: SampleCfg, chat: bool = False) -> list[str]:
    """Continue each prompt; returns only the new text. The prompt starts after an
    end-of-text token, as every document did in pretraining (GPT-2's convention too). With
    `chat`, each prompt is a user turn rendered with the tokenizer's chat template, and
    generation stops at the model's end-of-turn ids (its generation_config)."""
    cfg.check()
    device = next(model.parameters()).device
    start = tokenizer.eos_token_id
    outs = []
    for i, prompt in enumerate(prompts):
        if chat:  # the template the model was fine-tuned with, saved in its tokenizer files
            from lmforge.chat import prompt_ids

            ids = prompt_ids(tokenizer, [{"role": "user", "content": prompt}])
        else:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            ids = [start, *ids] if start is not None else ids
        x = torch.tensor([ids], device=device)
        torch.manual_seed(cfg.seed + i)  # HF sampling draws from the global generator
        sample = cfg.temperature > 0
        out = model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=cfg.max_new_tokens,
            do_sample=sample, temperature=cfg.temperature if sample else None,
            top_k=cfg.top_k if sample else None, top_p=cfg.top_p if sample else None,
            stop_strings=list(cfg.stop) or None, tokenizer=tokenizer if cfg.stop else None,
            pad_token_id=tokenizer.pad_token_id or start,
        )
        text = tokenizer.decode(out[0, x.size(1):], skip_special_tokens=True)
        outs.append(cut_at_stop(text, cfg.stop))
    return outs


def generate_cli(ns: argparse.Namespace) -> None:
    from lmforge.models import load_model
    from lmforge.tokenizer import load_tokenizer

    cfg = SampleCfg(ns.max_new_tokens, ns.temperature, ns.top_k or None, ns.top_p,
                    tuple(ns.stop), ns.seed)
    cfg.check()
    model = load_model(ns.model)
    model.eval()
    tokenizer = load_tokenizer(ns.model)
    if ns.chat and not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{ns.model}: --chat needs a chat template in the tokenizer files "
                        "(models from `lmforge sft` carry theirs)")
    prompts = ns.prompt or [""]
    for prompt, text in zip(prompts, generate(model, tokenizer, prompts, cfg, chat=ns.chat)):
        print(text if ns.chat else prompt + text)
        print("-" * 40)


@torch.no_grad()
def generate_batch(model: PreTrainedModel, prompts: list[list[int]], stop_ids: list[int],
                   pad_id: int, max_new_tokens: int, batch_size: int = 64, *,
                   temperature: float = 0.0, top_p: float = 1.0, stop: Sequence[str] = (),
                   tokenizer: PreTrainedTokenizerBase | None = None,
                   seed: int = 0, label: str = "generate") -> list[list[int]]:
    """Continuations of tokenized prompts (greedy at temperature 0), batched with left
    padding; each output ends before its first stop token. With `stop` strings (and the
    `tokenizer`), a row also stops once its text contains one; cut the decoded text with
    `cut_at_stop`. Prompts are batched by length so little compute is spent on padding;
    outputs come back in the input order. Batch b samples from seed `seed + b`."""
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outs: list[list[int]] = [[] for _ in prompts]
    sample = temperature > 0
    tick = Ticker(label, len(prompts))
    for b, s in enumerate(range(0, len(order), batch_size)):
        tick(s)
        idx = order[s:s + batch_size]
        T = max(len(prompts[i]) for i in idx)
        x = torch.full((len(idx), T), pad_id, dtype=torch.long)
        att = torch.zeros((len(idx), T), dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(prompts[i])
            x[row, T - n:] = torch.tensor(prompts[i])
            att[row, T - n:] = 1
        torch.manual_seed(seed + b)  # HF sampling draws from the global generator
        gen = model.generate(x.to(device), attention_mask=att.to(device), do_sample=sample,
                             max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
                             pad_token_id=pad_id, temperature=temperature if sample else None,
                             top_k=None, top_p=top_p if sample else None,
                             stop_strings=list(stop) or None,
                             tokenizer=tokenizer if stop else None)
        for row, i in enumerate(idx):
            new = gen[row, T:].tolist()
            cut = next((k for k, t in enumerate(new) if t in stop_ids), len(new))
            outs[i] = new[:cut]
    return outs
