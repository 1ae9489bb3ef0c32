"""The dpo and kto stages on the tiny pipeline's SFT model and its execution-judged pairs:
first-step losses at policy == reference (worked by hand per loss), the reference three ways,
its cache, exact resume, and bad input as one line with exit 2."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.config import DpoCfg, KtoCfg, load_config
from lmforge.stages import run_stage
from tests.conftest import ROOT, run_cli

# At policy == reference every log-ratio is 0, up to the reference's fp32 round-off: the cache
# is computed in other packed rows than the training step's, and each sequence's summed
# log-prob (|sum| < ~200 nats over < 200 tokens) moves by at most ~1e-4 with the rows'
# reduction order. DPO's loss -log sig(beta h) then moves by beta/2 |h| <= 1e-5.
TOL = 1e-4


def dpo(tiny_run: Path, out: Path, *over: str, cls: type = DpoCfg, stage: str = "dpo") -> dict:
    cfg = load_config(cls, ROOT / f"configs/{stage}/tiny.yaml",
                      [f"model.path={tiny_run / 'sft'}", f"data.train={tiny_run / 'pairs'}",
                       f"run.dir={out}", "log.progress=off", "eval.task=null", *over])
    return run_stage(stage, cfg)


def test_pipeline_dpo_outputs(tiny_run: Path) -> None:
    s = json.loads((tiny_run / "dpo" / "summary.json").read_text())
    assert s["loss"] == "sigmoid" and s["steps"] == 4 and s["reference"] == "starting policy"
    assert abs(s["first_step"]["loss"] - math.log(2)) < TOL  # policy == reference at step 1
    assert abs(s["first_step"]["rewards/margin"]) < TOL
    for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "logps/chosen",
              "logps/rejected", "kl/implicit", "len/chosen", "len/rejected"):
        assert k in s["last"], k
    assert list((tiny_run / "dpo" / "ref_cache").glob("ref-train-*.safetensors"))
    assert s["after"]["pass_at_1"]["n_per_group"] == {"d1": 4, "d2": 4, "d3": 4, "d4": 4, "unseen": 4}
    report = (tiny_run / "report.md").read_text()
    assert "## Preference pairs" in report and "## Preference optimisation" in report
    assert "| sft |" in report and "| dpo |" in report  # pass@1 side by side


@pytest.mark.parametrize("loss, extra, first", [
    ("sigmoid", [], math.log(2)),
    ("cdpo", ["label_smoothing=0.2"], math.log(2)),  # (1-e) ln2 + e ln2
    ("robust", ["label_smoothing=0.2"], math.log(2)),  # ((1-e) - e) ln2 / (1 - 2e)
    ("ipo", ["beta=0.1"], (0 - 1 / (2 * 0.1)) ** 2),  # (h - 1/(2 beta))^2 at h = 0: 25
    ("hinge", [], 1.0),  # relu(1 - beta h) at h = 0
])
def test_first_step_loss_at_policy_equal_reference(tiny_run: Path, tmp_path: Path, loss: str,
                                                   extra: list[str], first: float) -> None:
    s = dpo(tiny_run, tmp_path / loss, f"loss={loss}", "train.max_steps=1", *extra)
    assert abs(s["first_step"]["loss"] - first) < TOL * max(1.0, first)


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_reference_free_losses_need_no_reference(tiny_run: Path, tmp_path: Path, loss: str) -> None:
    s = dpo(tiny_run, tmp_path / loss, f"loss={loss}", "train.max_steps=2")
    assert s["reference"] is None and not (tmp_path / loss / "ref_cache").exists()
    assert math.isfinite(s["first_step"]["loss"]) and "rewards/margin" in s["last"]


def test_rpo_adds_the_chosen_nll(tiny_run: Path, tmp_path: Path) -> None:
    s = dpo(tiny_run, tmp_path / "rpo", "rpo_alpha=0.5", "train.max_steps=1")
    f = s["first_step"]
    assert abs(f["loss"] - (math.log(2) + 0.5 * f["nll"])) < TOL * (1 + f["nll"])


def test_reference_three_ways_agree_at_the_first_step(tiny_run: Path, tmp_path: Path) -> None:
    cached = dpo(tiny_run, tmp_path / "cached", "train.max_steps=1")
    live = dpo(tiny_run, tmp_path / "live", "train.max_steps=1", "ref.precompute=false")
    explicit = dpo(tiny_run, tmp_path / "explicit", "train.max_steps=1",
                   f"ref.model={tiny_run / 'sft' / 'final'}")
    lora = dpo(tiny_run, tmp_path / "lora", "train.max_steps=1", "ref.precompute=false",
               "lora.method=lora")
    for s in (cached, live, explicit, lora):
        assert abs(s["first_step"]["loss"] - math.log(2)) < TOL
    # live against the same rows is exact: the reference sees the very batch the policy sees
    assert live["first_step"]["rewards/margin"] == 0.0
    assert lora["first_step"]["rewards/margin"] == 0.0
    assert explicit["reference"] == str(tiny_run / "sft" / "final")


def test_reference_cache_is_reused_and_keyed_by_data(tiny_run: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    dpo(tiny_run, tmp_path / "a", "train.max_steps=1", f"ref.cache_dir={cache}")
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) == 2  # train and val
    capsys.readouterr()
    dpo(tiny_run, tmp_path / "b", "train.max_steps=1", f"ref.cache_dir={cache}")
    assert capsys.readouterr().out.count("read from") == 2 and sorted(cache.glob("*")) == files
    dpo(tiny_run, tmp_path / "c", "train.max_steps=1", f"ref.cache_dir={cache}", "data.max_length=96")
    assert len(list(cache.glob("*.safetensors"))) > 2  # other tokens: other keys, computed anew


def test_resume_is_exact(tiny_run: Path, tmp_path: Path) -> None:
    dpo(tiny_run, tmp_path / "straight", "train.save_every=2")
    shutil.copytree(tmp_path / "straight/checkpoints/step-2", tmp_path / "split/checkpoints/step-2")
    shutil.copytree(tmp_path / "straight/ref_cache", tmp_path / "split/ref_cache")
    dpo(tiny_run, tmp_path / "split")
    a = load_file(str(tmp_path / "straight/checkpoints/step-4/model.safetensors"))
    b = load_file(str(tmp_path / "split/checkpoints/step-4/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kto_first_step_is_one_half(tiny_run: Path, tmp_path: Path) -> None:
    # policy == reference: every reward r = 0 and z0 = 0, so each row's loss is 1 - sig(0)
    s = dpo(tiny_run, tmp_path / "kto", "train.max_steps=2", cls=KtoCfg, stage="kto")
    assert abs(s["first_step"]["loss"] - 0.5) < TOL and abs(s["first_step"]["kl"]) < TOL
    assert s["data"]["rows"]["kept"] == 2 * json.loads(
        (tiny_run / "pairs" / "summary.json").read_text())["pairs"]


def test_bad_input_is_one_line(tiny_run: Path, tmp_path: Path) -> None:
    only_good = tmp_path / "good.jsonl"
    only_good.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": "a", "label": True}) + "\n"
                                 for i in range(4)))
    cases = [
        ("dpo", [f"data.train={tmp_path / 'missing.jsonl'}"], "missing.jsonl"),
        ("dpo", ["loss=cdpo"], "label_smoothing"),
        ("dpo", ["data.train=null"], "data.train"),
        ("kto", [f"data.train={only_good}"], "both"),
    ]
    for stage, over, needle in cases:
        r = run_cli(stage, str(ROOT / f"configs/{stage}/tiny.yaml"),
                    f"model.path={tiny_run / 'sft'}", f"run.dir={tmp_path / 'out'}", *over, cwd=tmp_path)
        assert r.returncode == 2, (over, r.stderr[-800:])
        assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
