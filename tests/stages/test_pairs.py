"""lmforge synth pairs: a tiny chat model through the CLI (every answer fails, so the reference
is chosen), the pairing with canned answers that really run in the sandbox, answers that try
to pass without their tests running, the reward-model judge and scorer, and bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForSequenceClassification

from lmforge import sandbox
from lmforge.chat import BUILTINS
from lmforge.config import PairsCfg, load_config
from lmforge.errors import UserError
from lmforge.models import save_hf
from lmforge.rl.rewards import reward_model_scores
from lmforge.stages import pairs as stage
from lmforge.stages import run_stage
from lmforge.stages.pairs import Sample, execution_pairs, outcomes, reward_model_pair
from lmforge.tasks.base import CodeItem
from lmforge.tasks.synthetic_code import make_splits, to_code_items
from tests.conftest import BOS_ID, EOS_ID, PAD_ID, ROOT, make_chat_tokenizer, run_cli

TINY = ROOT / "configs/pairs/tiny.yaml"
LIMITS = sandbox.Limits(timeout_s=5)
ROW_KEYS = {"prompt", "chosen", "rejected", "task_id", "chosen_from", "pass_rate"}


def _llama(vocab: int, **kw: Any) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=512, tie_word_embeddings=True,
                       bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, **kw)


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer chat model with lmforge's template (as `lmforge sft` saves one)."""
    d = tmp_path_factory.mktemp("policy")
    tok = make_chat_tokenizer(d / "tok")
    tok.chat_template = BUILTINS["lmforge"].template
    torch.manual_seed(0)
    save_hf(AutoModelForCausalLM.from_config(_llama(len(tok))), d / "final", tok)
    return d / "final"


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random scalar-head model, saved as the rm stage saves one (pad_token_id set)."""
    d = tmp_path_factory.mktemp("rm")
    tok = make_chat_tokenizer(d / "tok")
    tok.chat_template = BUILTINS["lmforge"].template
    torch.manual_seed(1)
    save_hf(LlamaForSequenceClassification(_llama(len(tok), num_labels=1)), d / "final", tok)
    return d / "final"


def _items(limit: int = 3) -> list[CodeItem]:
    return to_code_items(make_splits(0, 8, 1).train[:limit], signature_prefill=True)


def _runs(item: CodeItem, text: str) -> sandbox.Result:
    """An answer (a whole assistant message) run with the problem's tests."""
    assert text.startswith(item.head)
    return sandbox.run(item.program(text[len(item.head):]), LIMITS)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_cli_random_model_pairs_come_from_the_reference(policy: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = run_cli("synth", "pairs", str(TINY), f"model.path={policy}", f"run.dir={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    rows, samples = _jsonl(out / "pairs.jsonl"), _jsonl(out / "samples.jsonl")
    items = {it.task_id: it for it in _items()}
    assert s["problems"] == 3 and s["samples"] == len(samples) == 12 and s["pass_rate"] == 0
    assert s["problems_none_pass"] == 3 and s["problems_with_pass"] == s["problems_all_pass"] == 0
    assert s["pairs"] == s["pairs_from_reference"] == len(rows) > 0
    assert s["generation_s"] > 0 and s["samples_per_s"] > 0 and s["precision"]["name"] == "fp32"
    assert {x["task_id"] for x in samples} == set(items)  # training problems only
    assert all(x["status"] != "passed" for x in samples)
    for row in rows:
        it = items[row["task_id"]]
        assert set(row) == ROW_KEYS and row["chosen_from"] == "reference"
        assert row["prompt"] == [{"role": "user", "content": it.prompt}]
        assert row["chosen"] == it.head + it.reference and row["pass_rate"] == 0.0
        assert row["rejected"] in {x["answer"] for x in samples if x["task_id"] == it.task_id}
    per = {t: [r for r in rows if r["task_id"] == t] for t in items}
    for t, rs in per.items():  # the cap, and no rejected answer twice
        failing = {x["answer"] for x in samples if x["task_id"] == t}
        assert len(rs) == min(2, len(failing)) == len({r["rejected"] for r in rs})
    assert all(_runs(it, it.head + it.reference).passed for it in items.values())
    assert "pairs from 3 problems (pass rate 0%; 0 all pass, 3 none pass -> reference chosen)" \
        in r.stdout


def _canned(items: list[CodeItem]) -> dict[str, list[str]]:
    """Completions (what follows the prefill): the reference, a wrong body twice, another
    wrong one, and two that try to look like a pass without the tests running; the last
    problem gets only references (every answer passes)."""
    wrong = "\n    return None"
    cheats = ["\n    return None\nimport sys\nsys.exit(0)",
              "\n    return None\nprint('PASSED')\nimport os\nos._exit(0)"]
    out = {it.task_id: [it.reference, wrong, wrong, "\n    return 12345", *cheats]
           for it in items[:-1]}
    out[items[-1].task_id] = [items[-1].reference] * 6
    return out


def _run_canned(monkeypatch: pytest.MonkeyPatch, policy: Path, out: Path, canned: dict,
                *over: str) -> dict[str, Any]:
    def fake(gen: Any, items: list[CodeItem], *, n: int, **kw: Any) -> list[list[str]]:
        assert all(len(canned[it.task_id]) == n for it in items)
        return [list(canned[it.task_id]) for it in items]

    monkeypatch.setattr(stage, "answer_items", fake)
    cfg = load_config(PairsCfg, TINY, [f"model.path={policy}", f"run.dir={out}", "n=6", *over])
    return run_stage("pairs", cfg)


def test_pairs_pass_over_fail_by_running_the_sandbox(monkeypatch: pytest.MonkeyPatch,
                                                     policy: Path, tmp_path: Path) -> None:
    items = _items()
    s = _run_canned(monkeypatch, policy, tmp_path, _canned(items))
    rows, samples = _jsonl(tmp_path / "pairs.jsonl"), _jsonl(tmp_path / "samples.jsonl")
    assert s["samples"] == 18 and s["pass_rate"] == round(8 / 18, 4)
    assert (s["problems_with_pass"], s["problems_all_pass"], s["problems_none_pass"]) == (3, 1, 0)
    assert s["pairs"] == len(rows) == 4 and s["pairs_from_reference"] == 0  # 2 + 2 + all-pass 0
    # the early exits ran to exit status 0 and printed PASSED, and still fail: no pass token
    for x in samples:
        if "exit" in x["answer"]:
            assert x["status"] == "failed" and x["reason"] == "exited before its end"
    by_id = {it.task_id: it for it in items}
    for t in (it.task_id for it in items[:-1]):
        rs = [r for r in rows if r["task_id"] == t]
        assert len(rs) == 2 and len({r["rejected"] for r in rs}) == 2  # deduped, capped
        for r in rs:
            assert set(r) == ROW_KEYS and r["chosen_from"] == "sample"
            assert r["pass_rate"] == pytest.approx(1 / 6)
            assert _runs(by_id[t], r["chosen"]).passed
            assert not _runs(by_id[t], r["rejected"]).passed
    assert not [r for r in rows if r["task_id"] == items[-1].task_id]


def _s(text: str, ok: bool, score: float | None = None) -> Sample:
    return Sample(text, "passed" if ok else "failed", "", score)


def test_pairing_dedupes_caps_and_is_deterministic() -> None:
    it = _items(1)[0]
    ss = [_s("a", True), _s("a", True), _s("b", True), _s("x", False), _s("x", False),
          _s("y", False), _s("z", False), _s("flaky", True), _s("flaky", False)]
    assert outcomes(ss) == (["a", "b"], ["x", "y", "z"])  # a mixed-outcome text is neither
    got = execution_pairs(it, ss, 4, True, seed=0)
    assert len(got) == 4 and len({(p.chosen, p.rejected) for p in got}) == 4
    assert all(p.chosen in "ab" and p.rejected in "xyz" and p.pass_rate == 4 / 9 for p in got)
    assert [p.row() for p in got] == [p.row() for p in execution_pairs(it, ss, 4, True, seed=0)]
    seeds = {tuple((p.chosen, p.rejected) for p in execution_pairs(it, ss, 2, True, seed=k))
             for k in range(8)}
    assert len(seeds) > 1  # the seed chooses
    assert len(execution_pairs(it, ss, 100, True, seed=0)) == 6  # every distinct pair, once
    assert execution_pairs(it, [_s("a", True)] * 3, 2, True, seed=0) == []  # all pass
    none = [_s("x", False), _s("y", False), _s("x", False)]
    ref = execution_pairs(it, none, 5, True, seed=0)
    assert {(p.chosen, p.rejected, p.chosen_from) for p in ref} == {
        (it.head + it.reference, "x", "reference"), (it.head + it.reference, "y", "reference")}
    assert execution_pairs(it, none, 5, False, seed=0) == []


def test_reward_model_pair_is_best_over_worst_and_skips_ties() -> None:
    it = _items(1)[0]
    ss = [_s("a", True, 0.5), _s("b", False, 2.0), _s("c", False, -1.0), _s("b", False, 2.0)]
    (p,) = reward_model_pair(it, ss)
    assert (p.chosen, p.rejected, p.chosen_passed, p.rejected_passed) == ("b", "c", False, False)
    assert reward_model_pair(it, [_s("a", True, 1.0), _s("b", False, 1.0)]) == []
    assert reward_model_pair(it, [_s("a", True, 1.0), _s("a", True, 1.0)]) == []


@pytest.mark.parametrize("body", [
    "\n    return None\nimport sys, os\nprint(sys._getframe(1).f_locals['nonce'])\n"
    "sys.stdout.flush()\nos._exit(0)",
    "\n    class A:\n        def __eq__(self, other):\n            return True\n    return A()",
], ids=["reads-the-nonce", "equal-to-everything"])
def test_no_pass_without_the_tests_passing(body: str) -> None:
    it = _items(1)[0]
    assert not _runs(it, it.head + body).passed


def test_reward_model_scores_match_unpadded_forward(reward_model: Path) -> None:
    from lmforge.tokenizer import load_tokenizer

    tok = load_tokenizer(reward_model)
    prompts = [[{"role": "user", "content": p}] for p in ("Add 2 and 3.", "Write a Python "
               "function that keeps the even numbers.", "Now 4?")]
    answers = ["5", "def add(a, b):\n    return a + b\n", "Be brief. " * 6]
    got = reward_model_scores(reward_model, None, prompts, answers, batch_size=2)
    model = LlamaForSequenceClassification.from_pretrained(reward_model).eval()
    for conv, a, g in zip(prompts, answers, got):
        ids = tok.apply_chat_template([*conv, {"role": "assistant", "content": a}],
                                      tokenize=True, return_dict=True)["input_ids"]
        with torch.no_grad():
            want = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
        assert g == pytest.approx(want, abs=1e-5)
    assert len(set(got)) == 3
    # the rm stage's length fit: b per answer token comes off
    (reward_model / "reward_length.json").write_text(json.dumps({"slope": 0.25, "intercept": 1}))
    try:
        fair = reward_model_scores(reward_model, None, prompts, answers, batch_size=3)
    finally:
        (reward_model / "reward_length.json").unlink()
    for a, g, f in zip(answers, got, fair):
        n = len(tok(a, add_special_tokens=False)["input_ids"])
        assert f == pytest.approx(g - 0.25 * n, abs=1e-5)


def test_reward_model_judge_agreement_is_the_sandbox_outcomes(
        monkeypatch: pytest.MonkeyPatch, policy: Path, reward_model: Path, tmp_path: Path) -> None:
    items = _items()
    s = _run_canned(monkeypatch, policy, tmp_path, _canned(items), "judge=reward_model",
                    f"reward_model={reward_model}")
    rows, samples = _jsonl(tmp_path / "pairs.jsonl"), _jsonl(tmp_path / "samples.jsonl")
    assert s["pairs"] == len(rows) == 2  # one per mixed problem; the all-pass one has one text
    mixed = agree = 0
    for r in rows:
        mine = [x for x in samples if x["task_id"] == r["task_id"]]
        score = {x["answer"]: x["score"] for x in mine}
        ok = {x["answer"]: x["status"] == "passed" for x in mine}
        assert score[r["chosen"]] == max(score.values()) > score[r["rejected"]] == min(score.values())
        if ok[r["chosen"]] != ok[r["rejected"]]:
            mixed, agree = mixed + 1, agree + ok[r["chosen"]]
    assert s["rm_agrees_with_execution"] == (round(agree / mixed, 4) if mixed else None)
    assert s["rm_s"] > 0


def test_every_answer_passing_is_an_error_not_an_empty_file(
        monkeypatch: pytest.MonkeyPatch, policy: Path, tmp_path: Path) -> None:
    items = _items()
    canned = {it.task_id: [it.reference] * 6 for it in items}
    with pytest.raises(UserError, match="every answer passed its tests"):
        _run_canned(monkeypatch, policy, tmp_path, canned)
    assert not (tmp_path / "pairs.jsonl").exists() and not (tmp_path / "summary.json").exists()
    assert len(_jsonl(tmp_path / "samples.jsonl")) == 18  # kept for a look


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    def cfg(*over: str) -> PairsCfg:
        return load_config(PairsCfg, TINY, [f"run.dir={tmp_path / 'o'}", *over])

    with pytest.raises(UserError, match="^model.path: give the policy"):
        stage.main(cfg())
    with pytest.raises(UserError, match="^reward_model: judging by a reward model needs"):
        stage.main(cfg("model.path=x", "judge=reward_model"))
    with pytest.raises(UserError, match="dataset path not found: .*nope.jsonl"):
        stage.main(cfg("model.path=x", "task=mbpp", f"source={tmp_path / 'nope.jsonl'}"))
    r = run_cli("pairs", str(TINY), f"run.dir={tmp_path / 'cli'}")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "model.path" in r.stderr and "Traceback" not in r.stderr


def test_mbpp_train_problems_from_a_local_file(monkeypatch: pytest.MonkeyPatch, policy: Path,
                                               tmp_path: Path) -> None:
    rows = [{"task_id": i, "text": f"Add {i} to x.", "code": f"def f{i}(x):\r\n    return x + {i}",
             "test_list": [f"assert f{i}(1) == {i + 1}"], "test_setup_code": ""}
            for i in (510, 601, 602)]  # 510 is in the test split: never asked
    src = tmp_path / "mbpp.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    canned = {f"mbpp/{i}": [f"```python\ndef f{i}(x):\n    return x + {i}\n```", "def f(x): pass"]
              for i in (601, 602)}
    s = _run_canned(monkeypatch, policy, tmp_path / "o", canned, "task=mbpp", f"source={src}",
                    "n=2", "pairs_per_problem=1")
    got = _jsonl(tmp_path / "o" / "pairs.jsonl")
    assert s["problems"] == 2 and s["pairs"] == len(got) == 2 and s["pass_rate"] == 0.5
    assert [(r["task_id"], r["rejected"]) for r in got] == [("mbpp/601", "def f(x): pass"),
                                                          ("mbpp/602", "def f(x): pass")]
    assert got[0]["chosen"].startswith("```python\ndef f601")  # the whole message, fence and all
