"""Preference data: (prompt, chosen, rejected) pairs for DPO-style losses and reward models,
unpaired (prompt, completion, label) rows for KTO; reading, tokenizing and batching them.

Formats (`fmt="auto"` picks one from the first object row's keys):

- `pairs`: `{"prompt": str | messages, "chosen": str | messages, "rejected": str | messages,
  "margin"?: number}`. A string prompt is one user turn; a message prompt must end with a user
  turn. Chosen/rejected given as messages contribute their one assistant message. Without a
  prompt, chosen and rejected may be two whole conversations: the prompt is their longest shared
  message prefix, which must end with a user turn and leave one assistant message on each side.
  Other keys are ignored (`lmforge synth pairs` adds its own).
- `hh`: Anthropic HH-RLHF, `{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}`.
  The prompt is the dialogue before the last "Assistant:" turn, which must be the same text in
  both; turn text is stripped (the spaces around the markers are the format's, not content).
- `unpaired`: `{"prompt": str | messages, "completion": str | messages, "label": bool}`.

HH-RLHF has rows whose prompts differ between chosen and rejected, rows with chosen ==
rejected and rows with an empty answer (9, 2 and 4 of helpful-base test's 2,354). They are a
property of the data, not an input mistake, so the `hh` reader drops and counts them (`Dropped`)
even without `skip_invalid`. In `pairs` and `unpaired` rows the same faults are errors.

Sources: what `chat_rows.iter_rows` reads (.jsonl, .json, a hub id), plus `.jsonl.gz` and a
`lmforge synth pairs` directory (its pairs.jsonl). Errors name `file:line` and the key.

Tokens come from the tokenizer's chat template: the prompt is what `prompt_ids` gives (with the
assistant header), the completion is the rest of the rendered conversation (the end-of-turn
token and whatever the template puts after it included).
"""

from __future__ import annotations

import gzip
import json
import math
import re
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from lmforge.chat import Rendered, prompt_ids
from lmforge.data.chat_rows import (
    InvalidRow,
    _bad,
    _check_assistant,
    _string,
    _type_name,
    iter_rows,
    message_list,
    require_rows,
)
from lmforge.data.sft import Batch, collate, pack_rows
from lmforge.data.sources import invalid_json, jsonl_lines
from lmforge.errors import UserError

Message = dict[str, str]
FORMATS = ("pairs", "hh", "unpaired")
_EXPECTED_KEYS = "prompt, chosen, rejected | chosen, rejected | prompt, completion, label"
# Reasons beyond chat_rows.REASONS (keys of PrefStats.skipped).
IDENTICAL = "identical chosen and rejected"
PROMPT_END = "prompt not ending with a user turn"
NOT_ONE_ANSWER = "not one assistant message"
NO_SHARED_PROMPT = "no shared prompt"
PROMPTS_DIFFER = "prompts differ"
NO_ASSISTANT_TURN = "no assistant turn"
NOT_HH = "not an hh dialogue"


@dataclass(frozen=True)
class PrefPair:
    prompt: tuple[Message, ...]  # the conversation so far; ends with a user turn
    chosen: str
    rejected: str
    margin: float | None = None
    where: str = ""  # "file:line"


@dataclass(frozen=True)
class Unpaired:
    prompt: tuple[Message, ...]
    completion: str
    desirable: bool
    where: str = ""


@dataclass
class PrefStats:
    source: str
    format: str = ""  # the format used, detected or given
    rows: int = 0  # rows read, valid or not (up to where `limit` stopped the read)
    kept: int = 0  # items returned
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count (hh drops included)


class Dropped(InvalidRow):
    """A row the format itself says to leave out (counted, never raised)."""


# --------------------------------------------------------------------------- rows


def _object(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise InvalidRow("not an object", f"{where}: not an object (expected a JSON object, "
                                          f"got {_type_name(row)})")
    return row


def _text_or_messages(row: dict[str, Any], key: str, where: str) -> str | list[Message]:
    value = row.get(key)
    if value is None:
        keys = ", ".join(sorted(map(str, row))) or "none"
        raise _bad(where, key, "missing field", f"keys found: {keys}")
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return message_list(value, where, key)
    raise _bad(where, key, "wrong type",
               f"expected a string or a list of messages, got {_type_name(value)}", value)


def _prompt(row: dict[str, Any], where: str) -> tuple[Message, ...]:
    value = _text_or_messages(row, "prompt", where)
    if isinstance(value, str):
        return ({"role": "user", "content": value},)
    if not value or value[-1]["role"] != "user":
        roles = ", ".join(m["role"] for m in value) or "none"
        raise _bad(where, "prompt", PROMPT_END, f"roles: {roles}")
    return tuple(value)


def _answer(row: dict[str, Any], key: str, where: str) -> str:
    value = _text_or_messages(row, key, where)
    if isinstance(value, list):
        answers = [m["content"] for m in value if m["role"] == "assistant"]
        if len(answers) != 1:
            raise _bad(where, key, NOT_ONE_ANSWER, f"found {len(answers)}")
        value = answers[0]
    _check_assistant(value, where, key)
    return value


def _margin(row: dict[str, Any], where: str) -> float | None:
    value = row.get("margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(where, "margin", "wrong type", "expected a finite number", value)
    return float(value)


def _split_conversations(row: dict[str, Any], where: str) -> tuple[tuple[Message, ...], str, str]:
    """Two whole conversations -> (shared prompt, chosen answer, rejected answer)."""
    sides = []
    for key in ("chosen", "rejected"):
        value = _text_or_messages(row, key, where)
        if not isinstance(value, list):
            raise _bad(where, key, "wrong type", "without a prompt, expected a list of messages")
        sides.append(value)
    c, r = sides
    if c == r:
        raise _bad(where, "rejected", IDENTICAL)
    n = 0
    while n < min(len(c), len(r)) and c[n] == r[n]:
        n += 1
    if not (n and c[n - 1]["role"] == "user" and len(c) == len(r) == n + 1
            and c[n]["role"] == r[n]["role"] == "assistant"):
        raise _bad(where, "chosen", NO_SHARED_PROMPT,
                   f"{n} shared messages, then {len(c) - n} and {len(r) - n}; expected a shared "
                   "prefix ending with a user turn, then one assistant message each")
    return tuple(c[:n]), c[n]["content"], r[n]["content"]


def _pair_row(row: Any, where: str) -> PrefPair:
    row = _object(row, where)
    margin = _margin(row, where)
    if row.get("prompt") is None and isinstance(row.get("chosen"), list):
        prompt, chosen, rejected = _split_conversations(row, where)
    else:
        prompt = _prompt(row, where)
        chosen, rejected = _answer(row, "chosen", where), _answer(row, "rejected", where)
    if chosen == rejected:
        raise _bad(where, "rejected", IDENTICAL)
    return PrefPair(prompt, chosen, rejected, margin, where)


_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")


def _hh_messages(text: str, where: str, key: str) -> list[Message]:
    parts = _HH_TURN.split(text)  # [before, role, text, role, text, ...]
    if parts[0].strip():
        raise _bad(where, key, NOT_HH, "text before the first \\n\\nHuman: turn", parts[0])
    role = {"Human": "user", "Assistant": "assistant"}
    return [{"role": role[parts[i]], "content": parts[i + 1].strip()}
            for i in range(1, len(parts), 2)]


def _hh_row(row: Any, where: str) -> PrefPair:
    row = _object(row, where)
    texts = [_string(row, "chosen", where), _string(row, "rejected", where)]
    if texts[0] == texts[1]:
        raise Dropped(IDENTICAL, f"{where}: {IDENTICAL}")
    cuts = []
    for key, text in zip(("chosen", "rejected"), texts):
        turns = list(_HH_TURN.finditer(text))
        last = turns[-1] if turns else None
        if last is None or last.group(1) != "Assistant":
            raise Dropped(NO_ASSISTANT_TURN, f"{where}: {key}: {NO_ASSISTANT_TURN} at its end")
        cuts.append(last)
    if texts[0][:cuts[0].start()] != texts[1][:cuts[1].start()]:
        raise Dropped(PROMPTS_DIFFER, f"{where}: {PROMPTS_DIFFER}")
    prompt = _hh_messages(texts[0][:cuts[0].start()], where, "chosen")
    if not prompt or prompt[-1]["role"] != "user":
        raise Dropped(PROMPT_END, f"{where}: {PROMPT_END}")
    answers = [t[m.end():].strip() for t, m in zip(texts, cuts)]
    for key, answer in zip(("chosen", "rejected"), answers):
        if not answer:
            raise Dropped("empty assistant message", f"{where}: {key}: empty assistant message")
    if answers[0] == answers[1]:
        raise Dropped(IDENTICAL, f"{where}: {IDENTICAL}")
    return PrefPair(tuple(prompt), answers[0], answers[1], None, where)


def _unpaired_row(row: Any, where: str) -> Unpaired:
    row = _object(row, where)
    prompt = _prompt(row, where)
    completion = _answer(row, "completion", where)
    label = row.get("label")
    if label is None:
        raise _bad(where, "label", "missing field", "expected true (desirable) or false")
    if not isinstance(label, bool):
        raise _bad(where, "label", "wrong type", f"expected a boolean, got {_type_name(label)}",
                   label)
    return Unpaired(prompt, completion, label, where)


_PARSERS = {"pairs": _pair_row, "hh": _hh_row, "unpaired": _unpaired_row}


def detect_format(row: dict[str, Any], where: str) -> str:
    if "completion" in row and "label" in row:
        return "unpaired"
    if "chosen" in row or "rejected" in row:
        # HH rows are two whole dialogues as text; everything else with chosen is `pairs`
        return "pairs" if "prompt" in row or not isinstance(row.get("chosen"), str) else "hh"
    keys = ", ".join(sorted(map(str, row))) or "none"
    raise InvalidRow("missing field", f"{where}: no known preference format: keys found: "
                                      f"{keys}; expected {_EXPECTED_KEYS}")


# --------------------------------------------------------------------------- sources


def _iter_gz(path: Path) -> Iterator[tuple[str, Any]]:
    """A gzip'd JSON Lines file (HH-RLHF ships so), located `path:line` like a plain one."""
    if Path(path.stem).suffix.lower() != ".jsonl":
        raise UserError(f"{path}: compressed input must be JSON Lines (.jsonl.gz)")
    try:
        text = gzip.decompress(path.read_bytes()).decode("utf-8-sig")
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise UserError(f"{path}: cannot read as gzip ({e})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not valid UTF-8") from None
    for lineno, row in jsonl_lines(text):
        where = f"{path}:{lineno}"
        yield where, (InvalidRow("invalid json", invalid_json(where, row))
                      if isinstance(row, json.JSONDecodeError) else row)


def _rows(source: str, split: str) -> Iterator[tuple[str, Any]]:
    path = Path(source)
    if path.is_dir():
        # a `synth pairs` run dir: its other files (summary.json, config) are not rows
        if not (path / "pairs.jsonl").is_file():
            raise UserError(f"{path}: a directory source must hold pairs.jsonl "
                            "(what `lmforge synth pairs` writes)")
        return iter_rows(path / "pairs.jsonl")
    if path.is_file() and path.suffix.lower() == ".gz":
        return _iter_gz(path)
    return iter_rows(source, split)


def _read(source: str, fmt: str, split: str, skip_invalid: bool,
          limit: int | None) -> tuple[list[Any], PrefStats]:
    if fmt != "auto" and fmt not in FORMATS:
        raise UserError(f"unknown preference format {fmt!r} (expected auto, {', '.join(FORMATS)})")
    if limit is not None and limit < 1:
        raise UserError(f"limit must be at least 1, got {limit}")
    stats = PrefStats(str(source), "" if fmt == "auto" else fmt)
    out: list[Any] = []
    first_error: InvalidRow | None = None
    for where, row in _rows(source, split):
        stats.rows += 1
        try:
            if isinstance(row, InvalidRow):
                raise row
            if not stats.format:
                stats.format = detect_format(_object(row, where), where)
            out.append(_PARSERS[stats.format](row, where))
        except InvalidRow as e:
            if not (skip_invalid or isinstance(e, Dropped)):
                raise
            first_error = first_error or e
            stats.skipped[e.reason] = stats.skipped.get(e.reason, 0) + 1
            continue
        if limit is not None and len(out) >= limit:
            break
    stats.kept = len(out)
    require_rows(out, source, stats.skipped, first_error)
    return out, stats


def load_pairs(source: str, fmt: str = "auto", *, split: str = "train",
               skip_invalid: bool = False, limit: int | None = None
               ) -> tuple[list[PrefPair], PrefStats]:
    """The pairs of a source and what was read, kept and skipped (by reason)."""
    pairs, stats = _read(source, fmt, split, skip_invalid, limit)
    if stats.format == "unpaired":
        raise UserError(f"{source}: unpaired rows (prompt, completion, label) hold no pairs; "
                        "train them with kto, or give pairs (prompt, chosen, rejected)")
    return pairs, stats


def load_unpaired(source: str, fmt: str = "auto", *, split: str = "train",
                  skip_invalid: bool = False, limit: int | None = None
                  ) -> tuple[list[Unpaired], PrefStats]:
    """Unpaired rows; a pair source gives each pair as a desirable and an undesirable row
    (`limit` then counts pairs)."""
    items, stats = _read(source, fmt, split, skip_invalid, limit)
    if stats.format != "unpaired":
        items = [Unpaired(p.prompt, text, good, p.where) for p in items
                 for text, good in ((p.chosen, True), (p.rejected, False))]
        stats.kept = len(items)
    labels = {u.desirable for u in items}
    if len(labels) < 2:
        which = "desirable (label true)" if True in labels else "undesirable (label false)"
        raise UserError(f"{source}: every row is {which}; KTO needs both desirable and "
                        "undesirable rows")
    return items, stats


def load_any(source: str, *, limit: int | None = None
             ) -> tuple[list[PrefPair] | list[Unpaired], PrefStats]:
    """The rows of a preference source as they are, pairs or unpaired (a file to relabel):
    invalid rows are skipped and counted."""
    return _read(source, "auto", "train", True, limit)


T = TypeVar("T", PrefPair, Unpaired)


def hash_split(items: list[T], fraction: float) -> tuple[list[T], list[T]]:
    """Deterministic (train, val) split by a hash of each item's prompt: stable across runs and
    row orders, and every item of one prompt lands on the same side, so no validation prompt
    is trained on (synth pairs gives several pairs per prompt, KTO two rows per pair)."""
    train, val = [], []
    for item in items:
        key = "\x00".join(m["role"] + "\x01" + m["content"] for m in item.prompt).encode()
        (val if zlib.crc32(key) / 2**32 < fraction else train).append(item)
    return train, val


# --------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class PairExample:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    margin: float = 0.0


@dataclass(frozen=True)
class UnpairedExample:
    prompt: list[int]
    completion: list[int]
    desirable: bool


def _stats() -> dict[str, int]:
    keys = ("examples", "boundary_merged", "truncated", "dropped_overlong", "dropped_empty",
            "dropped_identical")
    return dict.fromkeys(keys, 0)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _encode(tokenizer: PreTrainedTokenizerBase, prompt: tuple[Message, ...],
            completions: list[str], st: dict[str, int]) -> tuple[list[int], list[list[int]]] | None:
    """(prompt ids, completion ids each) through the chat template, or None (counted)."""
    p = prompt_ids(tokenizer, list(prompt))
    fulls = []
    for text in completions:
        out: Any = tokenizer.apply_chat_template(
            [*prompt, {"role": "assistant", "content": text}], tokenize=True, return_dict=True,
            add_generation_prompt=False)
        fulls.append(list(out["input_ids"]))
    # A BPE merge across the prompt/answer boundary, or a template that renders earlier turns
    # differently once an answer follows, leaves the prompt ids no prefix of the full ids; the
    # cut goes where they agree, so every sequence is still exactly the template's tokens.
    k = min(_common_prefix(p, f) for f in fulls)
    if k < len(p):
        st["boundary_merged"] += 1
    comps = [f[k:] for f in fulls]
    if k == 0 or not all(comps):  # a first token is never a target: it needs a prompt token
        st["dropped_empty"] += 1
        return None
    return p[:k], comps


def _fit(prompt: list[int], comps: list[list[int]], max_length: int, truncation: str,
         st: dict[str, int]) -> tuple[list[int], list[list[int]]] | None:
    """Make prompt + each completion at most `max_length` tokens: `left` cuts the prompt's
    oldest tokens (one always stays), then the completions' ends; `drop` drops. Counted."""
    if truncation not in ("left", "drop"):
        raise UserError(f"truncation must be left or drop, got {truncation!r}")
    longest = max(len(c) for c in comps)
    if len(prompt) + longest <= max_length:
        return prompt, comps
    if truncation == "drop":
        st["dropped_overlong"] += 1
        return None
    st["truncated"] += 1
    prompt = prompt[-max(1, max_length - longest):]
    return prompt, [c[:max_length - len(prompt)] for c in comps]


def tokenize_pairs(tokenizer: PreTrainedTokenizerBase, pairs: list[PrefPair], max_length: int,
                   truncation: str) -> tuple[list[PairExample], dict[str, int]]:
    """Pairs -> token examples; `examples` counts pairs in, the rest what happened to them."""
    st = _stats()
    out: list[PairExample] = []
    for pair in pairs:
        st["examples"] += 1
        enc = _encode(tokenizer, pair.prompt, [pair.chosen, pair.rejected], st)
        fit = _fit(*enc, max_length, truncation, st) if enc else None
        if not fit:
            continue
        prompt, (chosen, rejected) = fit
        if chosen == rejected:  # e.g. texts differing only past the truncation point
            st["dropped_identical"] += 1
            continue
        out.append(PairExample(prompt, chosen, rejected, pair.margin or 0.0))
    return out, st


def tokenize_unpaired(tokenizer: PreTrainedTokenizerBase, rows: list[Unpaired], max_length: int,
                      truncation: str) -> tuple[list[UnpairedExample], dict[str, int]]:
    st = _stats()
    out: list[UnpairedExample] = []
    for row in rows:
        st["examples"] += 1
        enc = _encode(tokenizer, row.prompt, [row.completion], st)
        fit = _fit(*enc, max_length, truncation, st) if enc else None
        if fit:
            out.append(UnpairedExample(fit[0], fit[1][0], row.desirable))
    return out, st


# --------------------------------------------------------------------------- batches


def _seq(prompt: list[int], completion: list[int]) -> Rendered:
    return Rendered(prompt + completion, [0] * len(prompt) + [1] * len(completion))


class _Batches(ABC):
    """What paired and unpaired batches share: each epoch visits the examples in a fresh
    seeded order, so `micro_batches(step, ...)` is a pure function of its arguments (exact
    resume). A micro-batch's sequences go in one forward pass, packed or one per row."""

    def __init__(self, n: int, max_length: int, packing: bool, seed: int, pad_id: int) -> None:
        if n == 0:
            raise UserError("no preference examples to batch")
        self.n, self.max_length, self.packing = n, max_length, packing
        self.seed, self.pad_id = seed, pad_id

    def _ids(self, start: int, count: int) -> list[int]:
        out, cache = [], {}
        for k in range(start, start + count):
            epoch, pos = divmod(k, self.n)
            if epoch not in cache:
                cache[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            out.append(int(cache[epoch][pos]))
        return out

    @abstractmethod
    def _sequences(self, ids: list[int]) -> tuple[list[Rendered], Batch]:
        """The micro-batch's sequences, in `seq_ids` order, and its extra (P,) tensors."""

    def _collate(self, ids: list[int]) -> Batch:
        seqs, extra = self._sequences(ids)
        if self.packing:  # best-fit; log-probs do not depend on the grouping, only fill does
            rows = pack_rows([len(s.ids) for s in seqs], self.max_length, self.seed)
        else:
            rows = [[i] for i in range(len(seqs))]
        batch = collate(seqs, rows, self.pad_id, seq_ids=range(len(seqs)))
        batch["index"] = torch.tensor(ids, dtype=torch.long)  # (P,)
        return {**batch, **extra}

    def micro_batches(self, step: int, micro: int, accum: int) -> list[Batch]:
        """`accum` micro-batches of `micro` examples (pairs) each for optimizer step `step`."""
        ids = self._ids(step * micro * accum, micro * accum)
        return [self._collate(ids[i:i + micro]) for i in range(0, len(ids), micro)]

    def eval_batches(self, micro: int) -> list[Batch]:
        """Every example once, in dataset order (validation, reference log-probs)."""
        return [self._collate(list(range(i, min(i + micro, self.n))))
                for i in range(0, self.n, micro)]

    def epochs(self, steps: int, micro: int, accum: int) -> float:
        return steps * micro * accum / self.n


class PairBatches(_Batches):
    """Pair j of a micro-batch is sequences 2j (prompt + chosen) and 2j + 1 (prompt +
    rejected); `seq_ids` (R, T) marks their completion targets, `index` (P,) the pairs'
    positions in `examples`, `margin` (P,) their margins."""

    def __init__(self, examples: list[PairExample], max_length: int, packing: bool, seed: int,
                 pad_id: int) -> None:
        super().__init__(len(examples), max_length, packing, seed, pad_id)
        self.examples = examples

    def _sequences(self, ids: list[int]) -> tuple[list[Rendered], Batch]:
        seqs = []
        for i in ids:
            e = self.examples[i]
            seqs += [_seq(e.prompt, e.chosen), _seq(e.prompt, e.rejected)]
        margin = torch.tensor([self.examples[i].margin for i in ids], dtype=torch.float32)
        return seqs, {"margin": margin}  # (P,)


class UnpairedBatches(_Batches):
    """Example j of a micro-batch is sequence j; sequence P + j is its KL sequence, example
    j's prompt followed by the completion of `partner[j]`. `partner` is a seeded derangement
    fixed here, so a KL sequence is a function of (examples, seed) and its reference log-prob
    can be computed once and cached under `index`. `desirable` (P,) bool."""

    def __init__(self, examples: list[UnpairedExample], max_length: int, packing: bool,
                 seed: int, pad_id: int) -> None:
        super().__init__(len(examples), max_length, packing, seed, pad_id)
        self.examples = examples
        # one seeded cycle through all examples: nobody is their own partner (n >= 2)
        cycle = np.random.default_rng([seed, 1 << 30]).permutation(self.n).tolist()
        self.partner = [0] * self.n
        for a, b in zip(cycle, cycle[1:] + cycle[:1]):
            self.partner[a] = b

    def _sequences(self, ids: list[int]) -> tuple[list[Rendered], Batch]:
        own = [_seq(self.examples[i].prompt, self.examples[i].completion) for i in ids]
        kl = []
        for i in ids:
            prompt = self.examples[i].prompt
            other = self.examples[self.partner[i]].completion
            kl.append(_seq(prompt, other[:self.max_length - len(prompt)]))
        desirable = torch.tensor([self.examples[i].desirable for i in ids], dtype=torch.bool)
        return own + kl, {"desirable": desirable}  # (P,)
