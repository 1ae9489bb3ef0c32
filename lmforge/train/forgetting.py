"""Forgetting: measure it (perplexity on held-out general text) and limit it (replay rows,
a KL penalty to the base model, L2-SP / EWC anchors).

Fine-tuning on a narrow task moves weights the general distribution depends on. The monitor
makes that cost visible at every eval; the controls trade some task fit for less of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from lmforge.data.pack import TokenWindows, pack_corpus
from lmforge.losses.lm import causal_lm_loss, token_mean
from lmforge.losses.regularizers import anchor_penalty

Batch = dict[str, torch.Tensor]


@dataclass
class GeneralText:
    """A corpus stage's splits packed with the fine-tuning tokenizer."""

    train: TokenWindows
    val: TokenWindows

    @classmethod
    def from_corpus(cls, corpus: Path, tokenizer: PreTrainedTokenizerBase, out: Path,
                    seq_len: int) -> GeneralText:
        pack_corpus(corpus, tokenizer.backend_tokenizer, len(tokenizer), tokenizer.eos_token_id,
                    out, None)
        return cls(TokenWindows.from_manifest(out, "train", seq_len),
                   TokenWindows.from_manifest(out, "val", seq_len))

    def replay_rows(self, seed: int, step: int, n: int) -> Batch:
        """`n` rows of general text in the SFT batch layout, every target counted."""
        w = self.train.batch(seed + 7919, step, n)  # (n, T+1); its own stream, not pretrain's
        T = w.size(1) - 1
        return {"input_ids": w[:, :-1], "targets": w[:, 1:],
                "loss_mask": torch.ones(n, T, dtype=torch.long),
                "position_ids": torch.arange(T).expand(n, T).clone(),
                "valid": torch.ones(n, T, dtype=torch.long)}


def merge_rows(a: Batch, b: Batch, pad_id: int) -> Batch:
    """Stack two batches' rows, right-padding the shorter (positions continue, mask 0)."""
    T = max(a["input_ids"].size(1), b["input_ids"].size(1))

    def pad(x: Batch) -> Batch:
        n = T - x["input_ids"].size(1)
        if n == 0:
            return x
        out = {}
        for k, v in x.items():
            fill = {"input_ids": pad_id}.get(k, 0)
            extra = torch.full((v.size(0), n), fill, dtype=v.dtype)
            if k == "position_ids":
                extra = v[:, -1:] + 1 + torch.arange(n).expand(v.size(0), n)
            out[k] = torch.cat([v, extra], 1)
        return out

    pa, pb = pad(a), pad(b)
    return {k: torch.cat([pa[k], pb[k]], 0) for k in pa}


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: TokenWindows, n_batches: int, micro: int,
               device: torch.device) -> float:
    """Token-weighted perplexity over fixed windows of `windows` (the same ones every call),
    with dropout off; the model's mode is restored after."""

    def loss_of(b: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        b = b.to(device)
        return causal_lm_loss(model(input_ids=b[:, :-1], use_cache=False).logits, b[:, 1:])

    was_training = model.training
    model.eval()
    try:
        return math.exp(token_mean(windows.eval_batches(n_batches, micro), loss_of))
    finally:
        model.train(was_training)


def fisher_diagonal(model: torch.nn.Module, params: list[torch.Tensor], windows: TokenWindows,
                    n: int, seed: int, device: torch.device) -> list[torch.Tensor]:
    """Diagonal empirical Fisher: mean over `n` single-sequence batches of the squared
    gradient of their loss. Normalized to mean 1 over all entries, so `ewc_coef` means the
    same as `l2sp_coef` on average and only the spread across weights differs."""
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    was_training = model.training
    model.eval()
    for i in range(n):
        w = windows.batch(seed + 104729, i, 1).to(device)  # (1, T+1)
        model.zero_grad(set_to_none=True)
        loss, _ = causal_lm_loss(model(input_ids=w[:, :-1], use_cache=False).logits, w[:, 1:])
        loss.backward()
        for f, p in zip(fisher, params):
            if p.grad is not None:
                f += p.grad.float().pow(2) / n
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    mean = sum(float(f.sum()) for f in fisher) / max(sum(f.numel() for f in fisher), 1)
    return [f / mean for f in fisher] if mean > 0 else fisher


@dataclass
class Anchor:
    """The starting weights (and, for EWC, their Fisher) a penalty pulls back toward."""

    params: list[torch.Tensor]
    start: list[torch.Tensor]
    fisher: list[torch.Tensor] | None
    coef: float

    @classmethod
    def of(cls, model: torch.nn.Module, coef: float,
           fisher: list[torch.Tensor] | None = None) -> Anchor:
        params = [p for p in model.parameters() if p.requires_grad]
        return cls(params, [p.detach().clone() for p in params], fisher, coef)

    def penalty(self) -> tuple[torch.Tensor, dict[str, float]]:
        pen, m = anchor_penalty(self.params, self.start, self.fisher)
        return self.coef * pen, m
