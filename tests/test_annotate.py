"""The label record: each annotator's seeded order, durable appends, resume after a restart,
the training files the preference stages read, and the agreement report worked by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.annotate import KTO, LABELS, PREFERENCES, Item, Record, report, schedule
from lmforge.data.preference import load_pairs, load_unpaired
from lmforge.errors import UserError
from lmforge.eval.agreement import cohen_kappa

ITEMS = [Item(f"q{i}", f"Question {i}?", {"a": f"answer a{i}", "b": f"answer b{i}",
                                          "c": f"answer c{i}"}) for i in range(4)]


def test_each_annotator_has_one_seeded_order_of_every_comparison() -> None:
    order = schedule(ITEMS, "ann", seed=0)
    assert order == schedule(ITEMS, "ann", seed=0)  # the same when they come back
    assert order != schedule(ITEMS, "bob", seed=0)
    assert sorted(s.key for s in order) == sorted(
        f"q{i}|{x}|{y}" for i in range(4) for x, y in (("a", "b"), ("a", "c"), ("b", "c")))
    lefts = sum(s.left < s.right for s in order)  # type: ignore[operator]
    assert 0 < lefts < len(order)  # sides are drawn, not fixed
    thumbs = schedule(ITEMS, "ann", seed=0, thumbs=True)
    assert len(thumbs) == 12 and all(s.right is None for s in thumbs)


def test_labels_survive_a_restart_and_become_pairs_dpo_reads(tmp_path: Path) -> None:
    """Five labels through one Record; a new Record (the server restarted) resumes at the
    sixth; preferences.jsonl holds exactly the five decided labels with their positions, and
    the preference reader loads it. A last line cut off by a crash is ignored."""
    order = schedule(ITEMS, "ann", seed=0)
    rec = Record(tmp_path, ITEMS)
    choices = ["left", "right", "left", "left", "right"]
    for shown, c in zip(order, choices):
        rec.add("ann", shown, c, reason="clearer" if c == "left" else "")
    with open(tmp_path / LABELS, "a", encoding="utf-8") as f:
        f.write('{"annotator": "ann", "item": "q')  # the crash
    again = Record(tmp_path, ITEMS)
    assert again.next_index("ann", order) == 5 and again.next_index("bob", order) == 0
    rows = [json.loads(x) for x in (tmp_path / PREFERENCES).read_text().splitlines()]
    assert [r["chosen_position"] for r in rows] == choices
    for r, shown, c in zip(rows, order, choices):
        winner = shown.left if c == "left" else shown.right
        assert r["chosen_model"] == winner and r["chosen"] == ITEMS[int(shown.item[1:])].responses[winner]
    pairs, stats = load_pairs(str(tmp_path / PREFERENCES))
    assert stats.format == "pairs" and len(pairs) == 5


def test_ties_and_skips_are_recorded_but_train_nothing(tmp_path: Path) -> None:
    order = schedule(ITEMS, "ann", seed=1)
    rec = Record(tmp_path, ITEMS)
    for shown, c in zip(order, ["tie", "skip", "both_bad", "left"]):
        rec.add("ann", shown, c)
    assert len(rec.rows()) == 4 and rec.next_index("ann", order) == 4
    assert len((tmp_path / PREFERENCES).read_text().splitlines()) == 1
    with pytest.raises(UserError, match="choice 'up': expected one of left, right"):
        rec.add("ann", order[4], "up")


def test_thumbs_become_the_rows_kto_reads(tmp_path: Path) -> None:
    order = schedule(ITEMS, "ann", seed=0, thumbs=True)
    rec = Record(tmp_path, ITEMS)
    for shown, c in zip(order, ["up", "down", "up", "skip"]):
        rec.add("ann", shown, c)
    rows, stats = load_unpaired(str(tmp_path / KTO))
    assert stats.format == "unpaired" and [u.desirable for u in rows] == [True, False, True]


def test_a_damaged_record_line_is_named(tmp_path: Path) -> None:
    (tmp_path / LABELS).write_text('{"annotator": "a"}\nnot json\n{"annotator": "a"}\n')
    with pytest.raises(UserError, match=r"labels.jsonl:2: not a JSON line"):
        Record(tmp_path, ITEMS).rows()


def _label(who: str, item: str, left: str, right: str, choice: str) -> dict:
    return {"annotator": who, "item": item, "key": f"{item}|{'|'.join(sorted((left, right)))}",
            "left": left, "right": right, "choice": choice, "reason": ""}


def test_report_worked_by_hand() -> None:
    """Two annotators, four shared comparisons of a vs b, sides swapped for the second:
    verdicts (winner names) ann a, a, b, tie; bob a, b, b, tie -> agree on 3 of 4.
    p_o = 3/4; ann's shares a 2/4, b 1/4, tie 1/4; bob's a 1/4, b 2/4, tie 1/4;
    p_e = 2/16 + 2/16 + 1/16 = 5/16; kappa = (12/16 - 5/16) / (11/16) = 7/11.
    Model a: wins 3 (ann q0 q1, bob q0), losses 3, ties 2 -> 4/8. The left answer won 4 of
    the 6 decided."""
    rows = [_label("ann", "q0", "a", "b", "left"), _label("ann", "q1", "a", "b", "left"),
            _label("ann", "q2", "a", "b", "right"), _label("ann", "q3", "a", "b", "tie"),
            _label("bob", "q0", "b", "a", "right"), _label("bob", "q1", "b", "a", "left"),
            _label("bob", "q2", "b", "a", "left"), _label("bob", "q3", "b", "a", "tie")]
    out = report(rows)
    assert out["agreement"]["kind"] == "cohen" and out["agreement"]["shared"] == 4
    assert out["agreement"]["kappa"] == pytest.approx(7 / 11, abs=1e-12)
    assert cohen_kappa(["a", "a", "b", "tie"], ["a", "b", "b", "tie"]) == pytest.approx(7 / 11)
    assert out["win_rates"]["a"]["wins"] == 4.0 and out["win_rates"]["a"]["games"] == 8
    assert out["left_wins"] == pytest.approx(4 / 6, abs=1e-12)
    assert "elo" not in out  # two models: the win rate says it all


def _jsonl_file(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_pairs_or_kto_file_becomes_a_session_to_relabel(tmp_path: Path, capsys) -> None:
    from lmforge.annotate import load_session
    from lmforge.cli import main

    pairs = _jsonl_file(tmp_path / "p.jsonl", [
        {"prompt": "Q1", "chosen": "good", "rejected": "bad"},
        {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Q2"}],
         "chosen": "yes", "rejected": "no"}])
    assert main(["annotate", str(tmp_path / "s"), "--relabel", pairs]) == 0
    s = load_session(tmp_path / "s")
    assert s.mode == "pairs" and s.models == ["chosen", "rejected"]
    assert s.items[0].prompt == "Q1" and s.items[0].responses == {"chosen": "good", "rejected": "bad"}
    assert s.items[1].prompt == [{"role": "system", "content": "be brief"},
                                 {"role": "user", "content": "Q2"}]
    kto = _jsonl_file(tmp_path / "k.jsonl", [{"prompt": "Q", "completion": "A", "label": True}])
    assert main(["annotate", str(tmp_path / "k"), "--relabel", kto]) == 2
    assert "--thumbs" in capsys.readouterr().err
    assert main(["annotate", str(tmp_path / "k"), "--relabel", kto, "--thumbs"]) == 0
    assert load_session(tmp_path / "k").items[0].responses == {"desirable": "A"}
    capsys.readouterr()
    assert main(["annotate", str(tmp_path / "s"), "--relabel", pairs]) == 2  # never overwritten
    assert "already holds an annotation session" in capsys.readouterr().err


def test_answers_come_from_the_generation_path(tiny_run: Path, tmp_path: Path) -> None:
    """`lmforge annotate --prompts --model a=CKPT --model b=CKPT`: each item holds exactly what
    `lmforge.generate.generate` answers (greedy), the chat template used where there is one."""
    from lmforge.annotate import load_session
    from lmforge.cli import main
    from lmforge.generate import SampleCfg, generate
    from lmforge.models import load_model
    from lmforge.tokenizer import load_tokenizer

    prompts = tmp_path / "p.txt"
    prompts.write_text("Write a function that adds.\n\nKeep the even numbers.\n")
    models = {"sft": tiny_run / "sft", "pre": tiny_run / "pretrain"}
    assert main(["annotate", str(tmp_path / "s"), "--prompts", str(prompts),
                 *(f"--model={k}={v}" for k, v in models.items()),
                 "--max-new-tokens", "6", "--temperature", "0"]) == 0
    s = load_session(tmp_path / "s")
    assert [it.prompt for it in s.items] == ["Write a function that adds.", "Keep the even numbers."]
    for name, path in models.items():
        tok = load_tokenizer(str(path))
        want = generate(load_model(str(path)).eval(), tok, [it.prompt for it in s.items],
                        SampleCfg(6, 0.0, None, 1.0, (), 0), chat=bool(tok.chat_template))
        assert [it.responses[name] for it in s.items] == want
