"""What an RL run writes besides metrics.jsonl: every rollout (rollouts.jsonl), and the
summary's digest of its curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.io import atomic_write_text, read_jsonl
from lmforge.train import distributed

ROLLOUTS = "rollouts.jsonl"


def dedupe_rounds(path: Path) -> None:
    """Keep each round's last block of rows: a resumed run redraws the rounds made after its
    checkpoint, and those redraws (identical, by construction) replace the first ones. Under
    torchrun rank 0 alone rewrites the file it alone wrote."""
    if not path.exists() or not distributed.current().main:
        return
    blocks: dict[int, list[dict[str, Any]]] = {}
    current = None
    for r in read_jsonl(path):
        if r["round"] != current:
            current = r["round"]
            blocks[current] = []
        blocks[current].append(r)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for k in sorted(blocks) for r in blocks[k]))


def curve(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Reward, pass rate and KL (and a critic's loss and explained variance) at the start and
    the end (means of the first and last quarter of the logged rows), so a summary says
    whether RL moved anything; a key no row has is left out."""
    if not rows:
        return {}
    q = max(1, len(rows) // 4)

    def mean(rs: list[dict[str, Any]], key: str) -> float | None:
        v = [x[key] for x in rs if key in x]
        return round(sum(v) / len(v), 4) if v else None

    keys = [k for k in ("reward/mean", "pass_rate", "kl", "completion/len", "clip_frac", "entropy",
                        "vf_loss", "explained_variance") if any(k in x for x in rows)]
    return {"first": {k: mean(rows[:q], k) for k in keys}, "last": {k: mean(rows[-q:], k) for k in keys}}


def time_split(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean seconds per step generating, rewarding, training and syncing the engine (each
    logged row holds its interval's mean)."""
    keys = ("time/gen_s", "time/reward_s", "time/train_s", "time/sync_s")
    return {k.split("/")[1].removesuffix("_s"): round(sum(x.get(k, 0.0) for x in rows) / len(rows), 3)
            for k in keys} if rows else {}
