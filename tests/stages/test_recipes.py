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


def test_gpt2_mbpp_dpo_recipe_runs_end_to_end(tmp_path: Path) -> None:
    rows = [_row(t, t % 7) for t in [*range(11, 15), *range(511, 514), *range(601, 611)]]
    mbpp = tmp_path / "mbpp.jsonl"
    mbpp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = make_chat_tokenizer(tmp_path / "tok")
    conf = GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=32, n_layer=2, n_head=2,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    gpt2 = tmp_path / "gpt2"
    save_hf(GPT2LMHeadModel(conf), gpt2, tok)
    small = ["n=2", "k=[1,2]", "max_new_tokens=16", "batch_size=8", f"sources.mbpp={mbpp}"]
    r = run_cli("run", str(ROOT / "configs/gpt2-mbpp-dpo.yaml"), f"dir={tmp_path / 'run'}",
                f"sft.model.path={gpt2}", f"sft.data.train=mbpp:{mbpp}", f"sft.data.val=mbpp:{mbpp}",
                "sft.train.max_steps=2", "sft.train.eval_every=0",
                f"pairs.source={mbpp}", "pairs.n=2", "pairs.max_new_tokens=16",
                "dpo.train.max_steps=2", "dpo.train.eval_every=0", "dpo.data.val_fraction=0.3",
                *[f"eval-{m}.{o}" for m in ("sft", "dpo") for o in small],
                "report.max_new_tokens=8", cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
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
