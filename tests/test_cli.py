"""Bad input: one line on stderr naming the problem, exit 2, no traceback, no summary.json."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli


def _user_error(r, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr


def test_unknown_config_key(tmp_path: Path) -> None:
    r = run_cli("pretrain", "configs/pretrain/tiny.yaml", "train.max_stpes=3", f"run.dir={tmp_path}")
    _user_error(r, "unknown key 'train.max_stpes'", "did you mean 'train.max_steps'")
    assert not (tmp_path / "summary.json").exists()


def test_wrong_value_type(tmp_path: Path) -> None:
    r = run_cli("pretrain", "configs/pretrain/tiny.yaml", "optim.lr=fast", f"run.dir={tmp_path}")
    _user_error(r, "optim.lr", "valid number")


def test_missing_config_file() -> None:
    _user_error(run_cli("pretrain", "configs/nope.yaml"), "config file not found: configs/nope.yaml")


def test_missing_checkpoint_path(tmp_path: Path) -> None:
    r = run_cli("pretrain", "configs/pretrain/tiny.yaml", f"train.resume={tmp_path}/step-9",
                f"run.dir={tmp_path}")
    _user_error(r, "train.resume", "does not exist")


@pytest.mark.usefixtures("tiny_run")
def test_vocab_the_corpus_cannot_fill(tiny_run: Path, tmp_path: Path) -> None:
    r = run_cli("tokenizer", f"corpus={tiny_run / 'corpus'}", "vocab_size=400000",
                f"run.dir={tmp_path}")
    _user_error(r, "vocab_size=400000 cannot be filled")
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "final").exists()


def test_missing_model_path(tiny_run: Path, tmp_path: Path) -> None:
    r = run_cli("pretrain", f"data.corpus={tiny_run / 'corpus'}", f"model.path={tmp_path}/none",
                f"run.dir={tmp_path}")
    _user_error(r, "path not found", "none")
    assert not (tmp_path / "summary.json").exists()


def test_generate_cli(tiny_run: Path) -> None:
    r = run_cli("generate", str(tiny_run / "pretrain" / "final"), "--prompt", "def ",
                "--temperature", "0", "--max-new-tokens", "8")
    assert r.returncode == 0 and r.stdout.startswith("def ")
    _user_error(run_cli("generate", str(tiny_run / "pretrain" / "final"), "--top-p", "0"), "top_p")
