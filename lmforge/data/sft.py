"""Supervised fine-tuning batches: fit examples to `max_length`, pack them into rows, and cut
micro-batches as a pure function of (seed, step) so resume is exact.

A packed row holds several examples back to back. Their position ids restart at 0 at each
example's start; transformers (>= 5) reads those restarts as sequence boundaries and builds a
block-diagonal causal mask, so no token attends across examples and a packed example's loss and
gradient equal its unpacked ones (tests/data/test_sft.py checks this to 1e-5). Padding, at a
row's end only, continues the positions (no restart), so an unpacked batch keeps the plain
causal mask and its fast path.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from lmforge.chat import Rendered

Batch = dict[str, torch.Tensor]


@dataclass
class FitStats:
    examples: int = 0
    truncated: int = 0  # prompt cut from the left; the final answer kept whole
    dropped_overlong: int = 0  # the final answer alone did not fit
    dropped_no_loss: int = 0  # nothing left to learn from (e.g. empty after truncation)
    reasons: dict[str, int] = field(default_factory=dict)


def fit_length(examples: list[Rendered], max_length: int, truncation: str) -> tuple[list[Rendered], FitStats]:
    """Make every example at most `max_length` tokens. `truncation=left` cuts the oldest
    tokens, but only while the last assistant answer stays whole (never silently cut an
    answer's end, nor its beginning); `drop` drops any overlong example. Both are counted."""
    st = FitStats()
    kept: list[Rendered] = []
    for r in examples:
        st.examples += 1
        if sum(r.loss_mask[1:]) == 0:  # the first token is never a target
            st.dropped_no_loss += 1
            continue
        if len(r.ids) <= max_length:
            kept.append(r)
            continue
        if truncation == "left" and _last_answer_start(r.loss_mask) >= len(r.ids) - max_length + 1:
            cut = len(r.ids) - max_length
            kept.append(Rendered(r.ids[cut:], r.loss_mask[cut:]))
            st.truncated += 1
        else:
            st.dropped_overlong += 1
    return kept, st


def _last_answer_start(mask: list[int]) -> int:
    """Index where the last run of loss tokens begins."""
    i = len(mask) - 1
    while i >= 0 and mask[i] == 0:
        i -= 1
    while i > 0 and mask[i - 1] == 1:
        i -= 1
    return i


def pack_rows(lengths: list[int], capacity: int, seed: int) -> list[list[int]]:
    """Best-fit packing of examples (by index) into rows of `capacity` tokens, visiting them
    in a seeded random order. Best-fit leaves ~1-3% padding on typical length mixes while
    keeping rows a random mix of short and long examples (decreasing order would not)."""
    order = np.random.default_rng(seed).permutation(len(lengths))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row index), sorted
    for i in order.tolist():
        n = lengths[i]
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            space, r = free.pop(j)
            rows[r].append(i)
            if space - n > 1:
                bisect.insort(free, (space - n, r))
        else:
            rows.append([i])
            if capacity - n > 1:
                bisect.insort(free, (capacity - n, len(rows) - 1))
    return rows


def collate(examples: Sequence[Rendered], rows: list[list[int]], pad_id: int,
            seq_ids: Sequence[int] | None = None) -> Batch:
    """Rows of examples -> input_ids, targets, loss_mask, position_ids, valid, all (B, T),
    shifted so position t predicts targets[t]. A target counts where its loss_mask is 1;
    `valid` is 1 on every real (not padding) position. With `seq_ids`, also "seq_ids" (B, T):
    seq_ids[i] on example i's loss targets, -1 elsewhere, so a per-example sum (preference
    losses need one log-prob per sequence) is one index_add whatever the rows hold."""
    seqs = []
    for row in rows:
        ids: list[int] = []
        tgt: list[int] = []
        mask: list[int] = []
        pos: list[int] = []
        sid: list[int] = []
        for i in row:
            e = examples[i]
            ids += e.ids[:-1]
            tgt += e.ids[1:]
            mask += e.loss_mask[1:]
            pos += range(len(e.ids) - 1)
            if seq_ids is not None:
                sid += [seq_ids[i] if m else -1 for m in e.loss_mask[1:]]
        seqs.append((ids, tgt, mask, pos, sid))
    T = max(len(s[0]) for s in seqs)
    keys = ("input_ids", "targets", "loss_mask", "position_ids", "valid")
    out = {k: torch.zeros(len(seqs), T, dtype=torch.long) for k in keys}
    if seq_ids is not None:
        out["seq_ids"] = torch.full((len(seqs), T), -1, dtype=torch.long)
    for b, (ids, tgt, mask, pos, sid) in enumerate(seqs):
        n = len(ids)
        out["input_ids"][b, :n] = torch.tensor(ids)
        out["input_ids"][b, n:] = pad_id
        out["targets"][b, :n] = torch.tensor(tgt)
        out["loss_mask"][b, :n] = torch.tensor(mask)
        out["valid"][b, :n] = 1
        if seq_ids is not None:
            out["seq_ids"][b, :n] = torch.tensor(sid)
        # padding continues the last example's positions: no restart, so no extra segment
        start = pos[-1] + 1 if pos else 0
        out["position_ids"][b, :n] = torch.tensor(pos)
        out["position_ids"][b, n:] = torch.arange(start, start + T - n)
    return out


class SftBatches:
    """Examples -> rows (packed or one per row) once; each epoch visits the rows in a fresh
    seeded order. `micro_batches(step, ...)` is a pure function of its arguments."""

    def __init__(self, examples: list[Rendered], max_length: int, packing: bool, seed: int,
                 pad_id: int) -> None:
        self.examples, self.seed, self.pad_id = examples, seed, pad_id
        lengths = [len(e.ids) for e in examples]
        if packing:
            self.rows = pack_rows(lengths, max_length, seed)
        else:
            self.rows = [[i] for i in np.random.default_rng(seed).permutation(len(examples)).tolist()]
        self.fill = sum(lengths) / (len(self.rows) * max_length) if self.rows else 0.0

    def _row_ids(self, start: int, n: int) -> list[int]:
        R = len(self.rows)
        out, cache = [], {}
        for k in range(start, start + n):
            epoch, pos = divmod(k, R)
            if epoch not in cache:
                cache[epoch] = np.random.default_rng([self.seed, epoch]).permutation(R)
            out.append(int(cache[epoch][pos]))
        return out

    def micro_batches(self, step: int, micro: int, accum: int) -> list[Batch]:
        ids = self._row_ids(step * micro * accum, micro * accum)
        return [collate(self.examples, [self.rows[r] for r in ids[i:i + micro]], self.pad_id)
                for i in range(0, len(ids), micro)]

    def epochs(self, steps: int, micro: int, accum: int) -> float:
        return steps * micro * accum / max(len(self.rows), 1)

    def eval_batches(self, micro: int) -> list[Batch]:
        """Every row once, in order (validation)."""
        return [collate(self.examples, self.rows[i:i + micro], self.pad_id)
                for i in range(0, len(self.rows), micro)]


def lm_logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """(B, T, V) logits of a collated batch. `use_cache=False` matters beyond memory: with a
    cache object present transformers skips the packed-sequence detection, and examples in a
    row would attend to each other."""
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                 use_cache=False).logits
