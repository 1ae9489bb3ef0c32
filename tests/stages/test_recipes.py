"""configs/gpt2-mbpp-dpo.yaml, the MBPP DPO recipe, run end to end hermetically: the same
pipeline file with a tiny from-scratch GPT-2, a tokenizer trained here and a few MBPP-shaped
problems in place of the hub's gpt2 and MBPP (what users get with internet)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from transformers import GPT2Config, GPT2LMHeadModel

from lmforge.models import save_hf
from tests.conftest import ROOT, make_chat_tokenizer, run_cli


def _row(task_id: int, k: int) -> dict:
    name = f"add_{k}_{task_id}"
    return {"text": f"Write a function {name} that adds {k} to a number.",
            "code": f"def {name}(x):\r\n    return x + {k}", "task_id": task_id,
            "test_setup_code": "", "challenge_test_list": [],
            "test_list": [f"assert {name}(1) == {1 + k}", f"assert {name}(-2) == {k - 2}"]}


def _run_recipe(tmp_path: Path, recipe: str, evals: tuple[str, ...], *extra: str) -> None:
    """The recipe on a tiny GPT-2 and 17 MBPP-shaped problems: task ids 11-14 (test),
    511-513 (validation), 601-610 (train), with the SFT, pairs and DPO stages shrunk."""
    rows = [_row(t, t % 7) for t in [*range(11, 15), *range(511, 514), *range(601, 611)]]
    mbpp = tmp_path / "mbpp.jsonl"
    mbpp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = make_chat_tokenizer(tmp_path / "tok")
    conf = GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=32, n_layer=2, n_head=2,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    gpt2 = tmp_path / "gpt2"
    save_hf(GPT2LMHeadModel(conf), gpt2, tok)
    small = ["n=2", "k=[1,2]", "max_new_tokens=16", "batch_size=8", f"sources.mbpp={mbpp}"]
    r = run_cli("run", str(ROOT / f"configs/{recipe}"), f"dir={tmp_path / 'run'}",
                f"sft.model.path={gpt2}", f"sft.data.train=mbpp:{mbpp}", f"sft.data.val=mbpp:{mbpp}",
                "sft.train.max_steps=2", "sft.train.eval_every=0",
                f"pairs.source={mbpp}", "pairs.n=2", "pairs.max_new_tokens=16",
                "dpo.train.max_steps=2", "dpo.train.eval_every=0", "dpo.data.val_fraction=0.3",
                *[f"eval-{m}.{o}" for m in evals for o in small],
                *[x.replace("MBPP", str(mbpp)) for x in extra],
                "report.max_new_tokens=8", cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]


def test_gpt2_mbpp_dpo_recipe_runs_end_to_end(tmp_path: Path) -> None:
    _run_recipe(tmp_path, "gpt2-mbpp-dpo.yaml", ("sft", "dpo"))
    run = tmp_path / "run"
    s = {n: json.loads((run / n / "summary.json").read_text())
         for n in ("sft", "eval-sft", "pairs", "dpo", "eval-dpo")}
    assert s["sft"]["data"]["rows"]["kept"] == 10  # the train split: task ids 601-610
    assert s["pairs"]["problems"] == 10 and s["pairs"]["pairs"] >= 1
    assert s["dpo"]["steps"] == 2 and abs(s["dpo"]["first_step"]["loss"] - math.log(2)) < 1e-4
    for e in ("eval-sft", "eval-dpo"):
        mb = s[e]["tasks"]["mbpp"]
        assert mb["items"] == 4 and {"pass@1", "pass@2"} <= set(mb)  # the test split: 11-14
    report = (run / "report.md").read_text()
    assert "## Preference optimisation" in report and report.count("### eval-") == 2


def test_gpt2_mbpp_grpo_recipe_runs_end_to_end(tmp_path: Path) -> None:
    """configs/gpt2-mbpp-grpo.yaml: SFT, then DPO and GRPO from it, each scored on MBPP test
    with the same settings, side by side in one report."""
    _run_recipe(tmp_path, "gpt2-mbpp-grpo.yaml", ("sft", "dpo", "grpo"),
                "grpo.data.train=mbpp:MBPP", "grpo.train.max_steps=2",
                "grpo.rollout.group_size=2", "grpo.rollout.prompts_per_step=2",
                "grpo.rollout.max_new_tokens=16", "grpo.train.micro_batch_size=2",
                "grpo.dynamic_sampling_rounds=1")
    run = tmp_path / "run"
    s = {n: json.loads((run / n / "summary.json").read_text())
         for n in ("sft", "grpo", "eval-sft", "eval-dpo", "eval-grpo")}
    assert s["grpo"]["steps"] == 2 and s["grpo"]["rollouts"]["prompts"] == 10  # MBPP train
    tasks = {json.loads(line)["task_id"] for line in (run / "grpo" / "rollouts.jsonl").open()}
    assert tasks <= {f"mbpp/{t}" for t in range(601, 611)}, tasks  # never test problems
    for e in ("eval-sft", "eval-dpo", "eval-grpo"):
        assert s[e]["tasks"]["mbpp"]["items"] == 4
    report = (run / "report.md").read_text()
    assert "## Online RL" in report and "## Side by side" in report
    assert all(f"| eval-{m} |" in report for m in ("sft", "dpo", "grpo"))
