"""Preference data: every format read from small files (and the real HH-RLHF file when
present), bad rows named by file:line or counted, the template boundary, truncation, batches
as a pure function of the step, and per-sequence log-probs that do not depend on packing."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lmforge.chat import install_format, prompt_ids, resolve_format
from lmforge.data.preference import (
    IDENTICAL,
    NO_SHARED_PROMPT,
    NOT_HH,
    NOT_ONE_ANSWER,
    PROMPT_END,
    PROMPTS_DIFFER,
    PairBatches,
    PairExample,
    PrefPair,
    Unpaired,
    UnpairedBatches,
    hash_split,
    load_pairs,
    load_unpaired,
    tokenize_pairs,
    tokenize_unpaired,
)
from lmforge.data.sft import lm_logits
from lmforge.errors import UserError
from tests.conftest import PAD_ID, micro_llama

HH = Path(__file__).resolve().parents[3] / "shared" / "data" / "hh-rlhf" / "helpful-base-test.jsonl.gz"
U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731


def write(path: Path, rows: list[Any]) -> Path:
    """JSON Lines; a str item is written as is (a broken line)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def hh(*turns: str) -> str:
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


@pytest.fixture
def tok(chat_tok):
    install_format(chat_tok, resolve_format(chat_tok, "lmforge"))
    return chat_tok


# --------------------------------------------------------------------------- formats


def test_pairs_rows_with_text_and_messages(tmp_path: Path) -> None:
    path = write(tmp_path / "p.jsonl", [
        {"prompt": "Add 2 and 3.", "chosen": "5", "rejected": "6", "margin": 2},
        {"prompt": [{"role": "system", "content": "Be brief."}, U("Now 4?")],
         "chosen": [U("Now 4?"), A("yes")], "rejected": [A("no")], "source": "ignored"},
    ])
    pairs, st = load_pairs(str(path))
    assert st.format == "pairs" and (st.rows, st.kept, st.skipped) == (2, 2, {})
    assert pairs[0] == PrefPair((U("Add 2 and 3."),), "5", "6", 2.0, f"{path}:1")
    assert pairs[1].prompt == ({"role": "system", "content": "Be brief."}, U("Now 4?"))
    assert (pairs[1].chosen, pairs[1].rejected, pairs[1].margin) == ("yes", "no", None)


def test_whole_conversations_split_at_their_shared_prefix(tmp_path: Path) -> None:
    shared = [U("Add 2 and 3."), A("5"), U("And 4?")]
    path = write(tmp_path / "c.jsonl", [{"chosen": [*shared, A("9")], "rejected": [*shared, A("8")]}])
    (pair,), st = load_pairs(str(path))
    assert st.format == "pairs"
    assert pair.prompt == tuple(shared) and (pair.chosen, pair.rejected) == ("9", "8")


def test_hh_rows_split_and_known_faults_dropped_and_counted(tmp_path: Path) -> None:
    good = {"chosen": hh("Hi", "Hello!", "Add 2 and 3.", "5"),
            "rejected": hh("Hi", "Hello!", "Add 2 and 3.", "  six ")}
    path = write(tmp_path / "hh.jsonl", [
        good,
        {"chosen": hh("Hi", "a", "b?", "c"), "rejected": hh("Hi", "X", "b?", "d")},  # prompts differ
        {"chosen": hh("Hi", "same"), "rejected": hh("Hi", "same")},  # identical
        {"chosen": hh("Hi", "a", "more?"), "rejected": hh("Hi", "a", "more?!")},  # ends with Human
        {"chosen": hh("Hi", "fine"), "rejected": hh("Hi", "") + " "},  # empty answer
    ])
    (pair,), st = load_pairs(str(path))  # no skip_invalid: these are the data's, not errors
    assert st.format == "hh" and (st.rows, st.kept) == (5, 1)
    assert st.skipped == {PROMPTS_DIFFER: 1, IDENTICAL: 1, "no assistant turn": 1,
                          "empty assistant message": 1}
    assert pair.prompt == (U("Hi"), A("Hello!"), U("Add 2 and 3."))
    assert (pair.chosen, pair.rejected) == ("5", "six")  # the markers' spaces are the format's


@pytest.mark.skipif(not HH.is_file(), reason="shared HH-RLHF data not present")
def test_real_hh_helpful_base_test() -> None:
    pairs, st = load_pairs(str(HH))
    # 2,354 rows: 9 whose prompts differ, 2 with chosen == rejected, 4 whose rejected answer is
    # empty (nothing after the last "Assistant:"); see ../shared/data/hh-rlhf/SOURCE.md
    assert (st.format, st.rows, st.kept, len(pairs)) == ("hh", 2354, 2339, 2339)
    assert st.skipped == {PROMPTS_DIFFER: 9, IDENTICAL: 2, "empty assistant message": 4}
    assert all(p.prompt[-1]["role"] == "user" and p.chosen != p.rejected for p in pairs)
    assert pairs[0].where == f"{HH}:1"
    rows, ust = load_unpaired(str(HH), limit=10)
    assert len(rows) == 20 and [r.desirable for r in rows[:2]] == [True, False]


def test_directory_gz_and_unpaired_sources(tmp_path: Path) -> None:
    run = tmp_path / "pairs_run"
    run.mkdir()
    write(run / "pairs.jsonl", [{"prompt": [U("q")], "chosen": "a", "rejected": "b", "passed": 3}])
    (run / "summary.json").write_text('{"pairs": 1}')  # not a row
    assert load_pairs(str(run))[0] == [PrefPair((U("q"),), "a", "b", None, f"{run / 'pairs.jsonl'}:1")]
    with pytest.raises(UserError, match="pairs.jsonl"):
        load_pairs(str(tmp_path))

    gz = tmp_path / "hh.jsonl.gz"
    gz.write_bytes(gzip.compress(b"\n" + json.dumps({"chosen": hh("q", "a"),
                                                      "rejected": hh("q", "b")}).encode()))
    (pair,), _ = load_pairs(str(gz))
    assert pair.where == f"{gz}:2" and pair.chosen == "a"

    path = write(tmp_path / "u.jsonl", [{"prompt": "q", "completion": "a", "label": True},
                                        {"prompt": [U("q")], "completion": [A("b")], "label": False}])
    rows, st = load_unpaired(str(path))
    assert st.format == "unpaired"
    assert rows == [Unpaired((U("q"),), "a", True, f"{path}:1"), Unpaired((U("q"),), "b", False, f"{path}:2")]
    with pytest.raises(UserError, match="hold no pairs"):
        load_pairs(str(path))
    rows, st = load_unpaired(str(run))  # a pair is one row of each label
    assert [(r.completion, r.desirable) for r in rows] == [("a", True), ("b", False)] and st.kept == 2


def test_unpaired_with_one_label_only_is_one_line_error(tmp_path: Path) -> None:
    path = write(tmp_path / "u.jsonl", [{"prompt": "q", "completion": c, "label": True} for c in "ab"])
    with pytest.raises(UserError, match="every row is desirable.*KTO needs both"):
        load_unpaired(str(path))


GOOD = {"pairs": [{"prompt": "q", "chosen": "a", "rejected": "b"}],
        "hh": [{"chosen": hh("q", "a"), "rejected": hh("q", "b")}],
        "unpaired": [{"prompt": "q", "completion": "a", "label": True},
                     {"prompt": "q", "completion": "b", "label": False}]}
BAD = [  # (format, row, key named in the message, reason counted)
    ("pairs", '{"prompt": "q",', "invalid JSON", "invalid json"),
    ("pairs", [1, 2], "not an object", "not an object"),
    ("pairs", {"prompt": "q", "rejected": "b"}, "chosen", "missing field"),
    ("pairs", {"prompt": "q", "chosen": 5, "rejected": "b"}, "chosen = 5", "wrong type"),
    ("pairs", {"prompt": 5, "chosen": "a", "rejected": "b"}, "prompt", "wrong type"),
    ("pairs", {"prompt": "q", "chosen": " ", "rejected": "b"}, "chosen", "empty assistant message"),
    ("pairs", {"prompt": "q", "chosen": "a", "rejected": "a"}, "rejected", IDENTICAL),
    ("pairs", {"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, "margin", "wrong type"),
    ("pairs", {"prompt": "q", "chosen": "a", "rejected": "b", "margin": True}, "margin", "wrong type"),
    ("pairs", {"prompt": [{"role": "robot", "content": "q"}], "chosen": "a", "rejected": "b"},
     "prompt[0].role", "unknown role"),
    ("pairs", {"prompt": [U("q"), A("a")], "chosen": "a", "rejected": "b"}, "prompt", PROMPT_END),
    ("pairs", {"prompt": "q", "chosen": [A("a"), A("b")], "rejected": "b"}, "chosen", NOT_ONE_ANSWER),
    ("pairs", {"chosen": [U("q"), A("a")], "rejected": [U("Q"), A("b")]}, "chosen", NO_SHARED_PROMPT),
    ("pairs", {"chosen": [U("q"), A("a"), U("r"), A("c")], "rejected": [U("q"), A("b")]},
     "chosen", NO_SHARED_PROMPT),
    ("pairs", {"chosen": [U("q"), A("a")], "rejected": "b"}, "rejected", "wrong type"),
    ("hh", {"chosen": 3, "rejected": hh("q", "b")}, "chosen", "wrong type"),
    ("hh", {"chosen": "preamble" + hh("q", "a"), "rejected": "preamble" + hh("q", "b")},
     "chosen", NOT_HH),
    ("unpaired", {"prompt": "q", "completion": "a", "label": "yes"}, "label", "wrong type"),
    ("unpaired", {"prompt": "q", "completion": "a", "label": 1}, "label", "wrong type"),
    ("unpaired", {"prompt": "q", "label": False}, "completion", "missing field"),
]


@pytest.mark.parametrize(("fmt", "row", "key", "reason"), BAD,
                         ids=[f"{f}-{r}-{k}" for f, _, k, r in BAD])
def test_bad_row_names_file_line_and_key_or_is_counted(tmp_path: Path, fmt: str, row: Any,
                                                       key: str, reason: str) -> None:
    good = GOOD[fmt]
    path = write(tmp_path / "d.jsonl", [*good, row])
    load = load_unpaired if fmt == "unpaired" else load_pairs
    with pytest.raises(UserError) as e:
        load(str(path), fmt)
    message = str(e.value)
    assert message.startswith(f"{path}:{len(good) + 1}: ") and key in message
    assert reason.lower() in message.lower() and "\n" not in message
    items, st = load(str(path), fmt, skip_invalid=True)
    assert len(items) == st.kept == len(good)
    assert st.skipped == {reason: 1} and st.rows == len(good) + 1


def test_auto_format_and_unknown_keys(tmp_path: Path) -> None:
    path = write(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(UserError, match=r"x.jsonl:1: no known preference format.*question"):
        load_pairs(str(path))
    with pytest.raises(UserError, match="unknown preference format"):
        load_pairs(str(path), "dpo")


def test_hash_split_is_by_prompt_and_deterministic() -> None:
    pairs = [PrefPair((U(f"q{i % 40}"),), f"a{i}", f"b{i}") for i in range(400)]
    train, val = hash_split(pairs, 0.25)
    assert len(train) + len(val) == 400 and 40 < len(val) < 160
    text = lambda ps: {p.prompt[0]["content"] for p in ps}  # noqa: E731
    assert not text(train) & text(val)  # each prompt on one side only
    assert hash_split(pairs[::-1], 0.25) == (train[::-1], val[::-1])


# --------------------------------------------------------------------------- tokens


def full_ids(tok, prompt: tuple, answer: str) -> list[int]:
    return list(tok.apply_chat_template([*prompt, A(answer)], tokenize=True, return_dict=True)["input_ids"])


def test_tokens_are_the_templates_and_the_boundary_is_counted(tok) -> None:
    pair = PrefPair((U("Add 2 and 3."),), "def add(a, b):", "Be brief.")
    (e,), st = tokenize_pairs(tok, [pair], 64, "left")
    assert e.prompt == prompt_ids(tok, list(pair.prompt))
    assert e.prompt + e.chosen == full_ids(tok, pair.prompt, pair.chosen)
    assert e.prompt + e.rejected == full_ids(tok, pair.prompt, pair.rejected)
    assert st == {"examples": 1, "boundary_merged": 0, "truncated": 0, "dropped_overlong": 0,
                  "dropped_empty": 0, "dropped_identical": 0}
    # plain: the prompt ends in "\n", which BPE merges with an answer's leading spaces
    install_format(tok, resolve_format(tok, "plain"))
    merged = PrefPair((U("Add 2 and 3."),), "    return a + b", "def add(a, b):")
    (e,), st = tokenize_pairs(tok, [merged], 64, "left")
    p = prompt_ids(tok, list(merged.prompt))
    assert st["boundary_merged"] == 1 and e.prompt == p[:-1] != p
    assert e.prompt + e.chosen == full_ids(tok, merged.prompt, merged.chosen)  # still exact
    assert e.prompt + e.rejected == full_ids(tok, merged.prompt, merged.rejected)
    (u,), ust = tokenize_unpaired(tok, [Unpaired(merged.prompt, merged.chosen, True)], 64, "left")
    assert ust["boundary_merged"] == 1 and u.prompt + u.completion == e.prompt + e.chosen


def test_truncation_cuts_the_prompts_oldest_then_the_answers_end(tok) -> None:
    prompt = (U("Write a Python function that keeps the even numbers."), A("def add(a, b):"),
              U("Add 2 and 3. Be brief. Now 4?"))
    pair = PrefPair(prompt, "return a + b", "Be brief.")
    (whole,), _ = tokenize_pairs(tok, [pair], 512, "left")
    longest = max(len(whole.chosen), len(whole.rejected))
    n = longest + 5
    (e,), st = tokenize_pairs(tok, [pair], n, "left")
    assert st["truncated"] == 1 and e.prompt == whole.prompt[-5:]
    assert (e.chosen, e.rejected) == (whole.chosen, whole.rejected)
    (e,), st = tokenize_pairs(tok, [pair], 4, "left")  # the answers' ends go, one prompt token stays
    assert e.prompt == whole.prompt[-1:] and e.chosen == whole.chosen[:3]
    assert e.rejected == whole.rejected[:3] and st["truncated"] == 1
    assert tokenize_pairs(tok, [pair], n, "drop")[1]["dropped_overlong"] == 1
    # answers that differ only past the cut are identical as tokens: nothing to compare
    same_start = PrefPair(prompt, "Add 2 and 3. Be brief.", "Add 2 and 3. Now 4?")
    kept, st = tokenize_pairs(tok, [same_start], 4, "left")
    assert kept == [] and st["dropped_identical"] == 1 and st["truncated"] == 1


def test_a_template_that_drops_the_answer_leaves_nothing_and_is_counted(tok) -> None:
    tok.chat_template = ("{%- for m in messages if m['role'] != 'assistant' -%}"
                         "{{ m['content'] }}{%- endfor -%}")
    kept, st = tokenize_pairs(tok, [PrefPair((U("q"),), "a", "b")], 64, "left")
    assert kept == [] and st["dropped_empty"] == 1


# --------------------------------------------------------------------------- batches

WORDS = "def add ( a , b ): return a + b Add 2 and 3 . Be brief Now 4 ? Write a Python function that keeps the even numbers".split()


def random_pairs(n: int, seed: int = 0) -> list[PrefPair]:
    rng = np.random.default_rng(seed)
    say = lambda lo, hi: " ".join(rng.choice(WORDS, rng.integers(lo, hi)))  # noqa: E731
    return [PrefPair((U(say(1, 12)),), say(1, 14), say(1, 14), float(i)) for i in range(n)]


def seq_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], n: int) -> torch.Tensor:
    """(n,) summed completion log-probs per sequence, straight from the batch's seq_ids. The
    model runs in fp32; the log-softmax and sums run in float64, because a sum near 150 has an
    fp32 ulp of 1.5e-5: rounding there alone would exceed the 1e-5 the grouping is held to."""
    logits = lm_logits(model, batch).double()  # (R, T, V)
    logp = torch.log_softmax(logits, -1).gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1)
    on = batch["seq_ids"] >= 0
    return torch.zeros(n, dtype=logp.dtype).index_add(0, batch["seq_ids"][on], logp[on])


def test_sequence_2j_is_pair_js_chosen_and_2j_plus_1_its_rejected(tok) -> None:
    pairs = random_pairs(10)
    examples, _ = tokenize_pairs(tok, pairs, 64, "left")
    for packing in (True, False):
        b = PairBatches(examples, 64, packing, seed=1, pad_id=PAD_ID)
        for batch in b.micro_batches(3, 4, 1) + b.eval_batches(4):
            assert batch["margin"].tolist() == [pairs[i].margin for i in batch["index"].tolist()]
            for j, i in enumerate(batch["index"].tolist()):
                chosen = batch["targets"][batch["seq_ids"] == 2 * j].tolist()
                rejected = batch["targets"][batch["seq_ids"] == 2 * j + 1].tolist()
                assert chosen == examples[i].chosen and rejected == examples[i].rejected
                assert tok.decode(chosen) == pairs[i].chosen + "<|end|>\n"
                assert tok.decode(rejected) == pairs[i].rejected + "<|end|>\n"
            assert (batch["seq_ids"] < 2 * len(batch["index"])).all()


def test_micro_batches_are_a_pure_function_of_the_step(tok) -> None:
    examples, _ = tokenize_pairs(tok, random_pairs(12), 64, "left")
    a = PairBatches(examples, 64, True, seed=3, pad_id=PAD_ID)
    b = PairBatches(examples, 64, True, seed=3, pad_id=PAD_ID)
    for step in (5, 0, 11):  # 11 steps * 4 pairs crosses several epochs
        for x, y in zip(a.micro_batches(step, 2, 2), b.micro_batches(step, 2, 2)):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    epoch = torch.cat([m["index"] for s in range(3) for m in a.micro_batches(s, 2, 2)])
    assert sorted(epoch.tolist()) == list(range(12))  # 3 steps of 4 = one epoch, each pair once
    assert torch.cat([m["index"] for m in a.eval_batches(5)]).tolist() == list(range(12))
    assert a.epochs(6, 2, 2) == 2.0
    assert not torch.equal(a.micro_batches(0, 2, 1)[0]["index"],
                           PairBatches(examples, 64, True, 4, PAD_ID).micro_batches(0, 2, 1)[0]["index"])


def row_lengths(batch: dict[str, torch.Tensor]) -> list[int]:
    """Tokens (ids, as pack_rows counts them) of each row: inputs + one per sequence."""
    starts = ((batch["position_ids"] == 0) & (batch["valid"] == 1)).sum(1)
    return (batch["valid"].sum(1) + starts).tolist()


@pytest.mark.parametrize("unpaired", [False, True], ids=["pairs", "unpaired"])
def test_packed_and_padded_give_the_same_sequence_logps(tok, unpaired: bool) -> None:
    """The property the losses rest on: a sequence's completion log-prob does not depend on
    which sequences share its row. The fp32 model runs the same sums through differently
    shaped matmuls for packed and padded rows, so logits agree to fp32 rounding (the sums
    differ by ~1e-7 here), while one token leaking across a boundary moves a sum by > 1e-2."""
    pairs = random_pairs(24, seed=5)
    max_length = 64  # micro_llama has 64 positions; a packed row restarts them per sequence
    if unpaired:
        rows = [Unpaired(p.prompt, p.chosen, i % 2 == 0) for i, p in enumerate(pairs)]
        examples: list[Any] = tokenize_unpaired(tok, rows, max_length, "left")[0]
        make = UnpairedBatches
    else:
        examples = tokenize_pairs(tok, pairs, max_length, "left")[0]
        make = PairBatches
    model = micro_llama(vocab=len(tok)).eval()
    packed = make(examples, max_length, True, seed=0, pad_id=PAD_ID)
    padded = make(examples, max_length, False, seed=0, pad_id=PAD_ID)
    fills, worst = [], 0.0
    with torch.no_grad():
        for step in range(3):
            for bp, bu in zip(packed.micro_batches(step, 8, 1), padded.micro_batches(step, 8, 1)):
                assert torch.equal(bp["index"], bu["index"])
                n = 2 * bp["index"].numel()
                lp, lu = seq_logps(model, bp, n), seq_logps(model, bu, n)
                worst = max(worst, float((lp - lu).abs().max()))
                torch.testing.assert_close(lp, lu, atol=1e-5, rtol=0)
                # best-fit: no two rows would fit in one, so at most one is half empty or worse
                lengths = row_lengths(bp)
                assert len(lengths) < bu["input_ids"].size(0) and max(lengths) <= max_length
                assert all(x + y > max_length for i, x in enumerate(lengths) for y in lengths[i + 1:])
                assert sum(x <= max_length / 2 for x in lengths) <= 1
                fills.append(sum(lengths) / (len(lengths) * max_length))
        # the test has teeth: without the restarts the sequences of a row see each other
        leaky = {**bp, "position_ids": torch.arange(bp["input_ids"].size(1)).expand_as(bp["input_ids"])}
        assert float((seq_logps(model, leaky, n) - lu).abs().max()) > 1e-2
    print(f"packed row fill {np.mean(fills):.3f} (min {min(fills):.3f}); max |packed - padded| {worst:.1e}")


def test_unpaired_kl_sequences_pair_each_prompt_with_a_fixed_other_completion(tok) -> None:
    rows = [Unpaired(p.prompt, p.chosen, i % 3 == 0) for i, p in enumerate(random_pairs(9, 2))]
    examples, _ = tokenize_unpaired(tok, rows, 24, "left")
    b = UnpairedBatches(examples, 24, True, seed=7, pad_id=PAD_ID)
    assert sorted(b.partner) == list(range(9)) and all(b.partner[i] != i for i in range(9))
    assert b.partner == UnpairedBatches(examples, 24, False, 7, PAD_ID).partner  # fixed by the seed
    for batch in b.micro_batches(2, 4, 1):
        P = batch["index"].numel()
        assert batch["desirable"].tolist() == [examples[i].desirable for i in batch["index"].tolist()]
        for j, i in enumerate(batch["index"].tolist()):
            own = batch["targets"][batch["seq_ids"] == j].tolist()
            kl = batch["targets"][batch["seq_ids"] == P + j].tolist()
            assert own == examples[i].completion
            room = 24 - len(examples[i].prompt)  # the KL completion's end is cut to fit
            assert kl == examples[b.partner[i]].completion[:room] and kl
        assert max(row_lengths(batch)) <= 24


def test_pair_example_margin_default_and_empty_batches_refused() -> None:
    assert PairExample([1], [2], [3]).margin == 0.0
    with pytest.raises(UserError, match="no preference examples"):
        PairBatches([], 64, True, 0, PAD_ID)


def test_error_message_for_bad_json_in_gz_names_the_line(tmp_path: Path) -> None:
    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"chosen": "x"\n'))
    with pytest.raises(UserError, match=re.escape(f"{gz}:1: invalid JSON")):
        load_pairs(str(gz))
