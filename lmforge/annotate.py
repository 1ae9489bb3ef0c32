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
import time
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
SESSION, ITEMS = "session.json", "items.jsonl"  # what `lmforge annotate` prepares
MODES = ("pairs", "thumbs")
PAIR_CHOICES = ("left", "right", "tie", "both_bad", "skip")
THUMB_CHOICES = ("up", "down", "skip")


@dataclass(frozen=True)
class Item:
    id: str
    prompt: str | list[dict[str, str]]  # text, or the conversation so far (relabelled files)
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
    """The annotator's comparisons in order: every pair of models on every item whose answers
    differ (thumbs: every response), shuffled and sided by a generator seeded with (seed,
    annotator), so that it is the same list every time they come back."""
    rng = random.Random(f"{seed}/{annotator}")
    shown: list[Shown] = []
    for it in items:
        if thumbs:
            shown += [Shown(it.id, m, None) for m in sorted(it.responses)]
            continue
        for a, b in combinations(sorted(it.responses), 2):
            if it.responses[a] == it.responses[b]:
                continue  # nothing to prefer, and a pair the preference stages drop anyway
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
    out["left_counts"] = (firsts, firsts + seconds)  # (left won, decided): its interval
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


def thumbs_report(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Thumbs mode: each model's share of thumbs up, with its Wilson interval."""
    ups: dict[str, Counter[str]] = {}
    for r in rows:
        if r["right"] is None and r["choice"] in ("up", "down"):
            ups.setdefault(r["left"], Counter())[r["choice"]] += 1
    return {m: vars(win_rate(c["up"], c["down"])) for m, c in sorted(ups.items())}


# --------------------------------------------------------------------------- sessions


@dataclass(frozen=True)
class Session:
    """A directory to label: items.jsonl (prompts and responses) and session.json (mode,
    seed, where the responses came from), written once by `lmforge annotate`; the labels and
    the files made from them are added beside them as people work."""

    root: Path
    mode: str  # pairs | thumbs
    seed: int
    source: str
    items: list[Item]

    @property
    def models(self) -> list[str]:
        return sorted({m for it in self.items for m in it.responses})

    def order(self, annotator: str) -> list[Shown]:
        return schedule(self.items, annotator, self.seed, self.mode == "thumbs")

    def record(self) -> Record:
        return Record(self.root, self.items)


def load_session(root: Path) -> Session:
    meta_path, items_path = root / SESSION, root / ITEMS
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{root}: not an annotation session (no {SESSION}; make one with "
                        "`lmforge annotate`)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{meta_path}: {str(e).splitlines()[0]}") from None
    if not isinstance(meta, dict) or meta.get("mode") not in MODES \
            or not isinstance(meta.get("seed"), int):
        raise UserError(f"{meta_path}: expected an object with mode ({' or '.join(MODES)}) "
                        "and an integer seed")
    try:
        lines = items_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{items_path}: {str(e).splitlines()[0]}") from None
    items = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            items.append(Item(str(row["id"]), row["prompt"], dict(row["responses"])))
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{items_path}:{n}: not an item ({type(e).__name__}: {e})") from None
    return Session(root, meta["mode"], meta["seed"], str(meta.get("source", "")), items)


def write_session(out: Path, items: list[Item], mode: str, seed: int, source: str) -> Session:
    """items.jsonl, then session.json (the mark of a complete session). An existing session
    is never overwritten: its labels are someone's work."""
    if mode not in MODES:
        raise UserError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    refuse_existing(out)
    need = 1 if mode == "thumbs" else 2
    kept = [it for it in items if len(it.responses) >= need]
    if not kept or not schedule(kept, "", seed, mode == "thumbs"):
        raise UserError(f"{source}: nothing to label (no item has {need} different answers)")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / ITEMS, _jsonl(
        {"id": it.id, "prompt": it.prompt, "responses": it.responses} for it in kept))
    meta = {"mode": mode, "seed": seed, "source": source, "items": len(kept),
            "models": sorted({m for it in kept for m in it.responses})}
    atomic_write_text(out / SESSION, json.dumps(meta, indent=2) + "\n")
    return Session(out, mode, seed, source, kept)


def refuse_existing(out: Path) -> None:
    """A session directory already in use is never written over: its labels are someone's
    work."""
    if (out / SESSION).exists() or (out / LABELS).exists():
        raise UserError(f"{out} already holds an annotation session; choose another directory")


def items_from_file(source: str, thumbs: bool, limit: int | None = None) -> list[Item]:
    """Items from a preference file to relabel: a pair's answers are named `chosen` and
    `rejected` (what the file said, so the humans' win rate of `chosen` is their agreement
    with it); an unpaired (KTO) row is one answer named `desirable` or `undesirable`, for
    thumbs mode."""
    from lmforge.data.preference import PrefPair, load_any

    rows, stats = load_any(source, limit=limit)
    skipped = "".join(f", {n} {why}" for why, n in stats.skipped.items())
    print(f"annotate: {source}: {stats.rows} {stats.format} rows read, {stats.kept} kept{skipped}")
    if stats.format == "unpaired" and not thumbs:
        raise UserError(f"{source}: unpaired rows hold one answer per prompt; relabel them "
                        "with thumbs up/down (--thumbs)")
    items = []
    for n, r in enumerate(rows):
        prompt: str | list[dict[str, str]] = (r.prompt[0]["content"] if len(r.prompt) == 1
                                              else [dict(m) for m in r.prompt])
        if isinstance(r, PrefPair):
            items.append(Item(f"r{n:05d}", prompt, {"chosen": r.chosen, "rejected": r.rejected}))
        else:
            name = "desirable" if r.desirable else "undesirable"
            items.append(Item(f"r{n:05d}", prompt, {name: r.completion}))
    return items


def generate_items(prompts: list[str], models: dict[str, str], max_new_tokens: int,
                   temperature: float, top_p: float, seed: int) -> list[Item]:
    """Each model's answer to each prompt through lmforge's generation path (a model whose
    tokenizer carries a chat template gets the prompt as a user turn in it)."""
    from lmforge.generate import SampleCfg, generate
    from lmforge.models import load_model
    from lmforge.tokenizer import load_tokenizer

    cfg = SampleCfg(max_new_tokens, temperature, None, top_p, (), seed)
    cfg.check()
    answers: dict[str, list[str]] = {}
    for name, path in models.items():
        print(f"annotate: {name} ({path}) answering {len(prompts)} prompts ...", flush=True)
        start = time.perf_counter()
        model, tokenizer = load_model(path), load_tokenizer(path)
        model.eval()
        chat = bool(getattr(tokenizer, "chat_template", None))
        answers[name] = generate(model, tokenizer, prompts, cfg, chat=chat)
        print(f"annotate: {name} ({path}) answered {len(prompts)} prompts "
              f"{'in its chat template ' if chat else ''}in {time.perf_counter() - start:.1f}s")
        del model
    return [Item(f"p{i:05d}", p, {m: answers[m][i] for m in models})
            for i, p in enumerate(prompts)]


def annotate_cli(ns: Any) -> None:
    """`lmforge annotate OUT (--prompts FILE --model NAME=CKPT ... | --relabel FILE)`."""
    from lmforge.data.chat_rows import load_prompts

    out = Path(ns.out)
    refuse_existing(out)  # before minutes of generation, not after
    mode = "thumbs" if ns.thumbs else "pairs"
    if bool(ns.relabel) == bool(ns.prompts):
        raise UserError("give --prompts FILE with two or more --model NAME=CKPT, or --relabel FILE")
    if ns.relabel:
        if ns.model:
            raise UserError("--relabel labels the file's own answers: --model is not used")
        items = items_from_file(ns.relabel, ns.thumbs, ns.limit)
        source = f"relabel {ns.relabel}"
    else:
        models: dict[str, str] = {}
        for spec in ns.model:
            name, sep, path = (x.strip() for x in spec.partition("="))
            if not sep or not name or not path or name in models:
                raise UserError(f"--model {spec!r}: expected a unique NAME=CHECKPOINT")
            models[name] = path
        if len(models) < (1 if ns.thumbs else 2):
            raise UserError("pairs mode compares two or more --model NAME=CKPT (thumbs: one or more)")
        prompts = load_prompts(Path(ns.prompts), ns.limit)
        items = generate_items(prompts, models, ns.max_new_tokens, ns.temperature, ns.top_p,
                               ns.seed)
        source = f"generated for {ns.prompts} by " + ", ".join(f"{k}={v}" for k, v in models.items())
    s = write_session(out, items, mode, ns.seed, source)
    per = len(s.order("anyone"))
    print(f"annotate: {out}: {len(s.items)} items, {mode} mode, {per} decisions per annotator; "
          f"open it with `lmforge ui --labels {out.parent}`")
