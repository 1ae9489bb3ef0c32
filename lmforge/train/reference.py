"""The reference policy of DPO-style losses, three ways.

1. Precomputed (the default): the reference's log-probs of every training and validation
   sequence are computed in one pass before training and cached on disk, keyed by the
   reference's weights, the chat template, the tokenized data and the precision. Training then
   holds no reference model at all, and a rerun or a resume reads the cache back.
2. The adapter-disabled base, live: with LoRA the frozen base *is* the reference, one
   `disable_adapter()` forward away, so no second copy of the weights exists.
3. An explicit reference model (`ref.model`), precomputed like 1 or held frozen and run live.

Every batch's sequences come in one of two layouts, told by `Layout`: pairs interleave chosen
and rejected (sequence 2j, 2j+1 of the micro-batch's pair j), unpaired rows put completions
first and their KL sequences second (j and P + j). A cache is a (N, 2) table per dataset:
column 0 chosen / completion, column 1 rejected / KL sequence.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save
from transformers import PreTrainedModel

from lmforge.data.sft import lm_logits
from lmforge.io import atomic_file
from lmforge.losses.preference import sequence_logps
from lmforge.train.progress import Ticker

Batch = dict[str, torch.Tensor]
Layout = Literal["interleaved", "halves"]


def to_table(logps: torch.Tensor, layout: Layout) -> torch.Tensor:
    """(2P,) log-probs in a batch's layout -> (P, 2): [chosen | completion, rejected | KL]."""
    if layout == "interleaved":
        return logps.view(-1, 2)
    return logps.view(2, -1).t()


def from_table(table: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The inverse of `to_table`."""
    if layout == "interleaved":
        return table.reshape(-1)
    return table.t().reshape(-1)


def batch_logps(model: torch.nn.Module, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs and completion lengths of every sequence of a batch."""
    logits = lm_logits(model, b)  # (R, T, V)
    n_seqs = 2 * b["index"].numel()
    return sequence_logps(logits, b["targets"], b["seq_ids"], n_seqs)


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes): the cache key's
    part for 'which reference'. ~1 s per GB; a reference is hashed once per run."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def data_digest(rows: Iterable[Iterable[list[int]]]) -> str:
    """sha256 of the tokenized data (every sequence's token ids, in order)."""
    h = hashlib.sha256()
    for row in rows:
        for ids in row:
            h.update(len(ids).to_bytes(4, "little"))
            h.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def compute_table(model: torch.nn.Module, batches: list[Batch], n: int, layout: Layout,
                  device: torch.device, autocast: Callable[[], Any], label: str) -> torch.Tensor:
    """(n, 2) reference log-probs of a dataset visited once through `batches`."""
    was_training = model.training
    model.eval()
    table = torch.full((n, 2), float("nan"), dtype=torch.float32)
    tick = Ticker(label, len(batches))
    try:
        for i, b in enumerate(batches):
            tick(i)
            b = {k: v.to(device) for k, v in b.items()}
            with autocast():
                logps, _ = batch_logps(model, b)
            table[b["index"].cpu()] = to_table(logps.float().cpu(), layout)
    finally:
        model.train(was_training)
    if torch.isnan(table).any():
        raise RuntimeError(f"{label}: {int(torch.isnan(table).any(1).sum())} rows were never visited")
    return table


@dataclass
class Reference:
    """Reference log-probs for a batch: `logps(batch, split)` -> (2P,) in the batch's layout."""

    layout: Layout
    tables: dict[str, torch.Tensor] | None = None  # precomputed: split -> (N, 2)
    live: Callable[[Batch], torch.Tensor] | None = None  # computed per batch
    how: str = ""  # one line for the log and the summary

    def logps(self, b: Batch, split: str = "train") -> torch.Tensor:
        if self.tables is not None:
            idx = b["index"].cpu()
            return from_table(self.tables[split][idx], self.layout).to(b["index"].device)
        assert self.live is not None
        with torch.no_grad():
            return self.live(b).detach()


def cached_tables(model: torch.nn.Module, datasets: dict[str, tuple[list[Batch], int, str]],
                  layout: Layout, cache_dir: Path, key_parts: dict[str, str],
                  device: torch.device, autocast: Callable[[], Any], say: Callable[[str], None]
                  ) -> dict[str, torch.Tensor]:
    """Reference tables for each split, read from `cache_dir` when a file with the same key
    exists, else computed in one pass and written there (atomically: a cache file is whole or
    absent). `datasets`: split -> (its batches, its size, its data digest)."""
    weights = key_parts.get("weights") or weights_digest(model)
    tables: dict[str, torch.Tensor] = {}
    for split, (batches, n, digest) in datasets.items():
        parts = {**key_parts, "weights": weights, "data": digest, "layout": layout}
        key = hashlib.sha256(repr(sorted(parts.items())).encode()).hexdigest()[:24]
        path = cache_dir / f"ref-{split}-{key}.safetensors"
        if path.exists():
            t = load_file(str(path))["logps"]
            if t.shape == (n, 2):
                say(f"reference log-probs ({split}, {n} rows) read from {path}")
                tables[split] = t
                continue
        t = compute_table(model, batches, n, layout, device, autocast, f"reference {split}")
        with atomic_file(path, "wb") as f:
            f.write(save({"logps": t.contiguous()}))
        say(f"reference log-probs ({split}, {n} rows) computed and cached in {path}")
        tables[split] = t
    return tables


def live_reference(policy: PreTrainedModel, explicit: PreTrainedModel | None, adapters: bool,
                   score: Callable[[torch.nn.Module, Batch], torch.Tensor] | None = None
                   ) -> tuple[Callable[[Batch], torch.Tensor], str]:
    """A per-batch reference: the explicit model, or the adapter-disabled base (LoRA), or a
    frozen copy of the starting policy (full fine-tuning: a second model in memory).
    `score(model, batch)` is what it computes (default: summed completion log-probs per
    sequence), without a graph and in the caller's precision context."""
    fn = score or (lambda m, b: batch_logps(m, b)[0])
    if explicit is not None:
        ref = explicit.eval().requires_grad_(False)
        return (lambda b: _run(ref, b, fn)), "ref.model, run live every step"
    if adapters:
        def base(b: Batch) -> torch.Tensor:
            with policy.disable_adapter():  # type: ignore[attr-defined]
                return _run(policy, b, fn)
        return base, "the adapter-disabled base, run live every step"
    frozen = copy.deepcopy(policy).eval().requires_grad_(False)
    return (lambda b: _run(frozen, b, fn)), "a frozen copy of the starting policy, run live"


def _run(model: torch.nn.Module, b: Batch,
         fn: Callable[[torch.nn.Module, Batch], torch.Tensor]) -> torch.Tensor:
    was_training = model.training
    model.eval()  # no dropout in the reference
    try:
        with torch.no_grad():
            return fn(model, b).float()
    finally:
        model.train(was_training)
