"""The tiny pipeline end to end: outputs, report, skip/force, and `final/` as a real HF dir."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmforge import pipeline
from lmforge.data.pack import TokenWindows
from lmforge.errors import UserError
from lmforge.losses.lm import causal_lm_loss
from tests.conftest import ROOT, run_cli, spawn


def test_stage_outputs_and_report(tiny_run: Path) -> None:
    for stage in ("corpus", "tokenizer", "pretrain"):
        assert (tiny_run / stage / "summary.json").exists()
        assert (tiny_run / stage / "config.yaml").exists()
    s = json.loads((tiny_run / "pretrain" / "summary.json").read_text())
    assert s["steps"] == 10 and s["stopped"] == "max_steps"
    assert s["val_loss_over_unigram_entropy"] == s["final_val_loss"] / s["val_unigram_entropy"]
    val = s["data"]["splits"]["val"]
    assert s["val_nats_per_byte"] == s["final_val_loss"] * val["tokens"] / val["bytes"]
    rows = [json.loads(x) for x in (tiny_run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_mb"):
        assert key in train_rows[-1]
    report = (tiny_run / "report.md").read_text()
    assert "![loss curves](loss.png)" in report and (tiny_run / "loss.png").stat().st_size > 1000
    assert report.count("```python") == 3  # three samples
    assert "unigram entropy" in report and "| pretrain | pretrain |" in report
    # the final model quantized: the export's line and the method table, fp32 its reference
    assert "## Compression" in report and "`bnb-int8` export of" in report
    assert "| fp32 | " in report and "| bnb-int8 | " in report
    assert "### prune\n- wanda (wanda scores): 50.0% of the blocks' weights removed" in report
    assert "### distill\n- teacher " in report and "held-out greedy pass@1: teacher " in report


def test_final_is_a_hf_dir_that_reproduces_the_val_loss(tiny_run: Path) -> None:
    final = tiny_run / "pretrain" / "final"
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    assert len(tok) == model.config.vocab_size == 1024
    w = TokenWindows.from_manifest(tiny_run / "pretrain" / "data", "val", 64)
    total = count = 0.0
    with torch.no_grad():
        for b in w.eval_batches(2, 4):  # the config's eval_batches x micro_batch_size
            loss, _ = causal_lm_loss(model(input_ids=b[:, :-1]).logits, b[:, 1:])
            total += float(loss) * b[:, 1:].numel()
            count += b[:, 1:].numel()
    s = json.loads((tiny_run / "pretrain" / "summary.json").read_text())
    assert math.isclose(total / count, s["final_val_loss"], abs_tol=1e-4)


def test_rerun_skips_finished_and_force_redoes_downstream(tiny_run: Path) -> None:
    """--force grpo redoes grpo and what uses it (eval, quantize), not what it uses (dpo) nor
    its sibling on the same input (ppo)."""
    cwd = tiny_run.parent.parent
    names = ("corpus", "dpo", "ppo", "grpo", "eval", "quantize")
    before = {s: (tiny_run / s / "summary.json").stat().st_mtime_ns for s in names
              if (tiny_run / s / "summary.json").exists()}
    r = run_cli("run", "configs/tiny.yaml", "--force", "grpo", cwd=cwd)
    assert r.returncode == 0, r.stderr
    assert "[corpus] finished earlier; skipped" in r.stdout
    after = {s: (tiny_run / s / "summary.json").stat().st_mtime_ns for s in before}
    assert [after[s] == before[s] for s in ("corpus", "dpo", "ppo")] == [True] * 3
    assert all(after[s] > before[s] for s in ("grpo", "eval", "quantize"))
    r = run_cli("run", "configs/tiny.yaml", "--force", "nosuch", cwd=cwd)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no such stage" in r.stderr


def test_sigterm_exits_143_with_checkpoint_then_resumes(tiny_run: Path, tmp_path: Path) -> None:
    args = [sys.executable, "-m", "lmforge.cli", "pretrain", str(ROOT / "configs/pretrain/tiny.yaml"),
            f"data.corpus={tiny_run / 'corpus'}", f"data.tokenizer={tiny_run / 'tokenizer'}",
            f"run.dir={tmp_path}", "train.max_steps=400", "log.every=1", "train.eval_every=0"]
    proc = spawn(args)
    deadline = time.time() + 120
    while not (tmp_path / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "checkpoint saved to" in err and "Traceback" not in err
    assert not (tmp_path / "summary.json").exists()
    ckpts = sorted((tmp_path / "checkpoints").glob("step-*"))
    k = int(ckpts[-1].name.split("-")[1])
    r = subprocess.run([*args[:-3], "train.max_steps=" + str(k + 3)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"resumed from {ckpts[-1]} at step {k}" in r.stdout
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == k + 3


def test_stage_configs_resolve_from_any_working_directory(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`lmforge run /abs/configs/tiny.yaml` elsewhere: `configs/corpus/tiny.yaml` is found
    next to the pipeline's folder; the runs still go under the working directory."""
    ran: list[tuple[str, Path]] = []

    def fake_stage(stage: str, cfg) -> dict:
        ran.append((stage, cfg.run.dir))
        return {"wall_time_s": 0.0}

    monkeypatch.setattr(pipeline, "run_stage", fake_stage)
    monkeypatch.setattr("lmforge.report.write_report", lambda root, *a: root / "report.md")
    monkeypatch.chdir(tmp_path)
    pipeline.run_pipeline(ROOT / "configs" / "tiny.yaml")
    assert [s for s, _ in ran] == ["corpus", "tokenizer", "pretrain", "sft", "pairs", "dpo", "grpo",
                                   "ppo", "eval", "quantize", "prune", "distill"]
    assert ran[0][1] == Path("runs/tiny/corpus")
    copy = tmp_path / "elsewhere" / "pipelines"
    copy.mkdir(parents=True)
    (copy / "p.yaml").write_text((ROOT / "configs" / "tiny.yaml").read_text())
    # the same YAML in a folder without configs/ next to it: one line naming the stage
    with pytest.raises(UserError, match=r"p\.yaml: stages\[0\] \(corpus\): config file not "
                                        r"found: configs/corpus/tiny\.yaml \(looked for "):
        pipeline.run_pipeline(copy / "p.yaml")


def test_run_from_another_directory_cli(tmp_path: Path) -> None:
    # the real CLI: every stage config resolves and validates, then an unusable pipeline dir
    # stops it before the first stage writes anything
    r = run_cli("run", str(ROOT / "configs" / "tiny.yaml"), "dir=/proc/lmforge-test",
                cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "dir /proc/lmforge-test: cannot write there" in r.stderr
    assert list(tmp_path.iterdir()) == []
