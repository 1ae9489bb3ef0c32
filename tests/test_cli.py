"""Bad input: one line on stderr naming the problem, exit 2, no traceback, no summary.json."""

from __future__ import annotations

import errno
import shutil
import subprocess
from pathlib import Path

import pytest

from lmforge.cli import main
from tests.conftest import ROOT, run_cli


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


# --------------------------------------------------------------------------- found by a new user


def _main(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """`lmforge ARGS` in this process: exit 2 and one line on stderr, which is returned."""
    rc = main(list(args))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_config_that_is_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("run:\n  dir: x\n", encoding="utf-16")
    _user_error(run_cli("pretrain", str(f)), f"{f}: config file is UTF-16")
    f.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    assert f"{f}:1: config file is not UTF-8 text (byte 0x89" in _main(capsys, "corpus", str(f))


@pytest.mark.parametrize("override,needle", [
    ("train.max_steps=true", "train.max_steps = true: a boolean is not a number"),
    ("optim.lr=.inf", "optim.lr = Infinity: Input should be a finite number"),
    ("optim.lr=nan", "optim.lr = \"nan\": Input should be a finite number"),
    ("optim.betas=[0.9,abc]", "override optim.betas: optim.betas.1 = \"abc\""),
    ("train.max_steps=5 #1", "override train.max_steps: train.max_steps = \"5 #1\""),
])
def test_values_a_config_must_refuse(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     override: str, needle: str) -> None:
    out = tmp_path / "out"
    err = _main(capsys, "pretrain", "configs/pretrain/tiny.yaml", override, f"run.dir={out}")
    assert needle in err
    assert not out.exists()


def test_generate_refuses_non_finite_sampling_flags(capsys: pytest.CaptureFixture[str]) -> None:
    # refused before any model is looked for: the model path need not exist
    _user_error(run_cli("generate", "no/such/model", "--temperature", "nan"),
                "temperature must be a finite number >= 0, got nan")
    assert "got inf" in _main(capsys, "generate", "x", "--temperature", "inf")
    assert "got -1.0" in _main(capsys, "generate", "x", "--temperature", "-1")
    assert "top_p" in _main(capsys, "generate", "x", "--top-p", "nan")


@pytest.fixture
def tiny_fs(tmp_path: Path):
    """A 64 KiB tmpfs (root only; skipped where mounting is not permitted)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_is_one_line_and_leaves_no_temp_file(tiny_fs: Path) -> None:
    out = tiny_fs / "corpus"
    r = run_cli("corpus", "configs/corpus/tiny.yaml", f"run.dir={out}")
    _user_error(r, "disk full", str(out), "free on")
    left = sorted(p.name for p in out.iterdir())
    assert left == ["config.yaml"], left  # no .train.jsonl.tmp-PID, no summary.json


def test_a_read_only_run_dir_is_refused_before_any_work(tiny_fs: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    _user_error(run_cli("corpus", "configs/corpus/tiny.yaml", f"run.dir={tiny_fs}/c"),
                f"run.dir {tiny_fs}/c: cannot write there (Read-only file system)")


@pytest.mark.parametrize("exc", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 2898112 vs 2898000"),
    RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed "
                 "writing file data/0: file write failed"),
], ids=["enospc", "torch-pos", "torch-write"])
def test_a_full_disk_anywhere_in_a_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch,
                                         exc: BaseException) -> None:
    def boom(cfg: object) -> dict[str, object]:
        raise exc

    monkeypatch.setattr("lmforge.stages.corpus.main", boom)
    err = _main(capsys, "corpus", f"run.dir={tmp_path}")
    assert "disk full" in err and str(tmp_path) in err and "free on" in err
    assert not (tmp_path / "summary.json").exists()


def test_storage_errors_outside_a_stage_are_mapped_by_main(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(ns: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "x"))

    monkeypatch.setattr("lmforge.generate.generate_cli", boom)
    err = _main(capsys, "generate", "m")
    assert f"cannot write {tmp_path / 'x'}: read-only file system" in err

    def bug(ns: object) -> None:
        raise OSError(errno.ENOENT, "No such file or directory")

    monkeypatch.setattr("lmforge.generate.generate_cli", bug)
    with pytest.raises(OSError):  # not a storage problem: a bug keeps its traceback
        main(["generate", "m"])


@pytest.mark.parametrize("where", ["file", "file/sub", "/proc/lmforge-test"])
def test_an_unusable_run_dir_is_refused_before_any_work(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str) -> None:
    (tmp_path / "file").write_text("mine")
    run_dir = where if where.startswith("/") else str(tmp_path / where)
    err = _main(capsys, "corpus", "configs/corpus/tiny.yaml", f"run.dir={run_dir}")
    assert f"run.dir {run_dir}: cannot write there" in err
    assert (tmp_path / "file").read_text() == "mine"


def test_a_missing_earlier_stage_output_names_the_command_that_makes_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    for stage, key, made_by in [("pretrain", "data.corpus", "corpus"),
                                ("tokenizer", "corpus", "corpus"),
                                ("sft", "model.path", "pretrain")]:
        err = _main(capsys, stage, f"configs/{stage}/tiny.yaml")
        assert err.startswith(f"lmforge {stage}: error: {key}: runs/tiny/{made_by} does not exist")
        assert f"stage '{made_by}' of the pipeline configs/tiny.yaml" in err
        assert "run `lmforge run configs/tiny.yaml` first" in err
    (tmp_path / "runs/tiny/corpus").mkdir(parents=True)  # the next input is the next culprit
    assert "data.tokenizer: runs/tiny/tokenizer" in _main(capsys, "pretrain",
                                                            "configs/pretrain/tiny.yaml")
    assert not (tmp_path / "runs/tiny/pretrain").exists()  # found before any work
    # outside any pipeline's runs: the stage that makes it
    err = _main(capsys, "pretrain", "configs/pretrain/tiny.yaml",
                "data.corpus=runs/other/corpus")
    assert "run the corpus stage with run.dir=runs/other/corpus first" in err
