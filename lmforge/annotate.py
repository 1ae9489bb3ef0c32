"""Human preference labels, kept so that none is lost: what is shown to whom, in which order,
labels appended durably as they are given, resume, the files `lmforge dpo`, `lmforge rm` and
`lmforge kto` read, and the agreement report.

- An item is a prompt and the responses of two or more models. Each pair of models on an item
  is one comparison. Every annotator sees the comparisons in their own seeded order, and the
  sides in their own seeded positions, so the position a label was given in is known (and the
  humans' left-bias measurable).
- `labels.jsonl` is the record: one line per decision, flushed and fsynced before the answer
  is acknowledged, so a server killed mid-session loses nothing that was confirmed. A final
  line cut off by a crash is ignored (it was never acknowledged).
- `preferences.jsonl` (pairs: prompt, chosen, rejected, plus who and where) and, in thumbs
  mode, `kto.jsonl` (prompt, completion, label) are rebuilt from the record after each label,
  written whole (temp file, then rename).
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

from lmforge.errors import UserError
from lmforge.eval.agreement import (
    bradley_terry,
    cohen_kappa,
    elo_ratings,
    fleiss_kappa,
    position_bias,
    win_rate,
)
from lmforge.io import atomic_write_text

LABELS, PREFERENCES, KTO = "labels.jsonl", "preferences.jsonl", "kto.jsonl"
PAIR_CHOICES = ("left", "right", "tie", "both_bad", "skip")
THUMB_CHOICES = ("up", "down", "skip")


@dataclass(frozen=True)
class Item:
    id: str
    prompt: str
    responses: dict[str, str]  # model name -> its response


@dataclass(frozen=True)
class Shown:
    """One comparison as one annotator sees it: `right` is None in thumbs mode."""

    item: str
    left: str
    right: str | None

    @property
    def key(self) -> str:  # the same comparison whatever side each model was shown on
        return f"{self.item}|{'|'.join(sorted(m for m in (self.left, self.right) if m))}"


def schedule(items: list[Item], annotator: str, seed: int, thumbs: bool = False) -> list[Shown]:
    """The annotator's comparisons in order: every pair of models on every item (thumbs: every
    response), shuffled and sided by a generator seeded with (seed, annotator), so that it is
    the same list every time they come back."""
    rng = random.Random(f"{seed}/{annotator}")
    shown: list[Shown] = []
    for it in items:
        if thumbs:
            shown += [Shown(it.id, m, None) for m in sorted(it.responses)]
            continue
        for a, b in combinations(sorted(it.responses), 2):
            shown.append(Shown(it.id, a, b) if rng.random() < 0.5 else Shown(it.id, b, a))
    rng.shuffle(shown)
    return shown


class Record:
    """The labels of a session directory: appended durably, read back for resume and exports."""

    def __init__(self, root: Path, items: list[Item]) -> None:
        self.root, self.items = root, {it.id: it for it in items}
        self.path = root / LABELS

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        lines = self.path.read_text(encoding="utf-8").split("\n")
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                if n == len(lines):  # no newline: a write a crash cut off, never acknowledged
                    continue
                raise UserError(f"{self.path}:{n}: not a JSON line; the label record is "
                                "damaged (fix or remove that line)") from None
        return out

    def done(self, annotator: str) -> set[str]:
        return {r["key"] for r in self.rows() if r["annotator"] == annotator}

    def next_index(self, annotator: str, order: list[Shown]) -> int:
        """Where the annotator resumes: the first comparison of their order they have not
        labelled (len(order) when they are through)."""
        done = self.done(annotator)
        return next((i for i, s in enumerate(order) if s.key not in done), len(order))

    def add(self, annotator: str, shown: Shown, choice: str, reason: str = "") -> dict[str, Any]:
        """Append one decision and make it durable, then rebuild the training files."""
        allowed = THUMB_CHOICES if shown.right is None else PAIR_CHOICES
        if choice not in allowed:
            raise UserError(f"choice {choice!r}: expected one of {', '.join(allowed)}")
        if not annotator.strip():
            raise UserError("an annotator needs a name")
        if shown.item not in self.items:
            raise UserError(f"no item {shown.item!r} in this session")
        row = {"annotator": annotator, "item": shown.item, "key": shown.key, "left": shown.left,
               "right": shown.right, "choice": choice, "reason": reason}
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.export()
        return row

    def export(self) -> dict[str, int]:
        """preferences.jsonl from the decided pair labels, kto.jsonl from thumbs: every row
        carries its annotator and the position the chosen answer was shown in."""
        pairs, kto = [], []
        for r in self.rows():
            it = self.items.get(r["item"])
            if it is None:
                continue
            if r["right"] is None and r["choice"] in ("up", "down"):
                kto.append({"prompt": it.prompt, "completion": it.responses[r["left"]],
                            "label": r["choice"] == "up", "model": r["left"],
                            "annotator": r["annotator"]})
            elif r["choice"] in ("left", "right"):
                win, lose = _decided(r)
                pairs.append({"prompt": it.prompt, "chosen": it.responses[win],
                              "rejected": it.responses[lose], "chosen_model": win,
                              "rejected_model": lose, "chosen_position": r["choice"],
                              "annotator": r["annotator"], "reason": r["reason"]})
        atomic_write_text(self.root / PREFERENCES, _jsonl(pairs))
        if kto:
            atomic_write_text(self.root / KTO, _jsonl(kto))
        return {"pairs": len(pairs), "kto": len(kto)}


def _decided(r: dict[str, Any]) -> tuple[str, str]:
    """(winner, loser) of a label that chose a side."""
    return (r["left"], r["right"]) if r["choice"] == "left" else (r["right"], r["left"])


def _jsonl(rows: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def report(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What the pair labels say: agreement between annotators on the comparisons they share
    (Cohen's kappa for two, Fleiss' for more, on the winner as a model name or tie/both bad),
    each model's win rate with its Wilson interval (a tie: half a win; both bad: a loss for
    both), the humans' left-bias, and Bradley-Terry / Elo ratings when three or more models
    meet and each has won and lost."""
    pair_rows = [r for r in rows if r["right"] is not None and r["choice"] != "skip"]
    out: dict[str, Any] = {"labels": len(pair_rows),
                           "annotators": sorted({r["annotator"] for r in pair_rows})}
    record: dict[str, Counter[str]] = {}
    for r in pair_rows:
        for me, side in ((r["left"], "left"), (r["right"], "right")):
            c = record.setdefault(me, Counter())
            c["wins" if r["choice"] == side else "ties" if r["choice"] == "tie"
              else "losses"] += 1
    out["win_rates"] = {m: vars(win_rate(c["wins"], c["losses"], c["ties"])) for m, c in record.items()}
    firsts = sum(r["choice"] == "left" for r in pair_rows)
    seconds = sum(r["choice"] == "right" for r in pair_rows)
    out["left_wins"] = position_bias(firsts, seconds)
    out["agreement"] = _agreement(pair_rows)
    if len(record) >= 3:
        wins: Counter[tuple[str, str]] = Counter()
        for r in pair_rows:
            if r["choice"] in ("left", "right"):
                wins[_decided(r)] += 1
        try:
            out["elo"] = elo_ratings(bradley_terry(dict(wins)))
        except UserError as e:  # a model that never won or never lost: said, not rated
            out["elo"] = str(e)
    return out


def _agreement(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Kappa on the comparisons every annotator labelled (their verdict as the winning model's
    name, or tie / both_bad, so that swapped sides still agree)."""
    verdict: dict[str, dict[str, str]] = {}
    for r in rows:
        v = r[r["choice"]] if r["choice"] in ("left", "right") else r["choice"]
        verdict.setdefault(r["annotator"], {})[r["key"]] = v
    names = sorted(verdict)
    if len(names) < 2:
        return None
    shared = sorted(set.intersection(*(set(v) for v in verdict.values())))
    if not shared:
        return {"annotators": names, "shared": 0, "kappa": None}
    if len(names) == 2:
        a, b = (verdict[n] for n in names)
        return {"annotators": names, "shared": len(shared), "kind": "cohen",
                "kappa": cohen_kappa([a[k] for k in shared], [b[k] for k in shared])}
    cats = sorted({verdict[n][k] for n in names for k in shared})
    counts = [[sum(verdict[n][k] == c for n in names) for c in cats] for k in shared]
    return {"annotators": names, "shared": len(shared), "kind": "fleiss",
            "kappa": fleiss_kappa(counts)}
