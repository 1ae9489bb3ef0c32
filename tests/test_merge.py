"""`lmforge merge` on bad input: it never deletes what lmforge did not write, and every refusal
is one line naming the path (exit 2 from the CLI), with nothing written that looks finished."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from lmforge.errors import UserError
from lmforge.models import WRITTEN, foreign_entries, merge_cli, read_adapter_config
from tests.conftest import run_cli
from tests.test_peft import sft_adapter_run


@pytest.fixture(scope="module")
def final(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sft_adapter_run(tmp_path_factory.mktemp("merge"))[0]


def _user_error(r, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr


def _tree(d: Path) -> dict[str, bytes]:
    return {str(f.relative_to(d)): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()}


# ------------------------------------------------------------------------- where it may write


def test_refuses_a_directory_holding_someone_elses_files(final: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "sub" / "data.bin").write_bytes(b"\0" * 10)
    with pytest.raises(UserError, match=r"--out .*out is not empty .*notes.txt.*--force"):
        merge_cli(final / "adapter", None, out)
    assert _tree(out) == {"notes.txt": b"mine", "sub/data.bin": b"\0" * 10}
    assert not list(tmp_path.glob(".*"))  # refused before writing anything at all


def test_refuses_an_existing_file_and_a_path_below_one(final: Path, tmp_path: Path) -> None:
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"precious")
    with pytest.raises(UserError, match="is an existing file"):
        merge_cli(final / "adapter", None, f)
    with pytest.raises(UserError, match="is a file, so nothing can be written below it"):
        merge_cli(final / "adapter", None, f / "merged")
    assert f.read_bytes() == b"precious"


def test_refuses_the_current_directory_and_the_inputs(final: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for out in (".", "..", str(work)):
        with pytest.raises(UserError, match="current directory or one above it"):
            merge_cli(final / "adapter", None, Path(out), force=True)
    # final/ is lmforge's, but replacing it would delete the adapter (and base/) being merged
    for out in (final, final / "adapter", final / "base"):
        with pytest.raises(UserError, match="which this merge reads"):
            merge_cli(final / "adapter", None, out, force=True)
    assert (final / "adapter" / "adapter_config.json").exists() and (final / "base").is_dir()


def test_replaces_only_what_lmforge_wrote_unless_forced(final: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    out.mkdir()  # empty: nothing to lose
    merge_cli(final / "adapter", None, out)
    first = _tree(out)
    assert WRITTEN in first and foreign_entries(out) == []
    merge_cli(final / "adapter", None, out)  # its own earlier output: replaced, same bytes
    assert {k: v for k, v in _tree(out).items() if k != WRITTEN} == \
        {k: v for k, v in first.items() if k != WRITTEN}
    # a file lmforge wrote but someone edited since is theirs now
    cfg = out / "generation_config.json"
    cfg.write_text(cfg.read_text() + " ")
    assert foreign_entries(out) == ["generation_config.json"]
    with pytest.raises(UserError, match="generation_config.json"):
        merge_cli(final / "adapter", None, out)
    assert cfg.read_text().endswith(" ")
    merge_cli(final / "adapter", None, out, force=True)  # the user said so
    assert foreign_entries(out) == [] and not cfg.read_text().endswith(" ")


def test_a_trained_model_is_never_scratch_space(final: Path, tmp_path: Path) -> None:
    """A stage's final/ is lmforge's own and untouched, yet a trained model: merging onto it
    without --force would silently delete it."""
    pretrained = tmp_path / "pretrain_final"
    shutil.copytree(final, pretrained, copy_function=shutil.copy2)  # keeps sizes and mtimes
    shutil.rmtree(pretrained / "adapter")
    shutil.rmtree(pretrained / "base", ignore_errors=True)
    before = _tree(pretrained)
    with pytest.raises(UserError, match="holds a trained model lmforge wrote"):
        merge_cli(final / "adapter", None, pretrained)
    assert _tree(pretrained) == before


def test_force_replaces_a_file(final: Path, tmp_path: Path) -> None:
    f = tmp_path / "out"
    f.write_text("x")
    merge_cli(final / "adapter", None, f, force=True)
    assert (f / "config.json").is_file() and foreign_entries(f) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or old copy left


def test_foreign_entries_sees_links_dirs_and_a_damaged_list(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    assert foreign_entries(d) == []
    (d / "a.txt").write_text("a")
    (d / "sub").mkdir()
    (d / "sub" / "b.txt").write_text("b")
    assert foreign_entries(d) == ["a.txt", "sub"]  # a foreign dir is named once, not walked
    (d / WRITTEN).write_text("{not json")
    assert foreign_entries(d) == [WRITTEN, "a.txt", "sub"]
    st = (d / "a.txt").stat()
    (d / WRITTEN).write_text(json.dumps({"files": {"a.txt": [st.st_size, st.st_mtime_ns]}}))
    os.symlink(d / "a.txt", d / "link")
    assert foreign_entries(d) == ["link", "sub"]


# --------------------------------------------------------------------------- adapter_config


@pytest.mark.parametrize("content,why", [
    (b"\xff\xfe{\x00", "not UTF-8"),
    (b'{"r": 4, ', "not valid JSON: Expecting property name"),
    (b"[1, 2]", "must hold a JSON object, not list"),
])
def test_malformed_adapter_config(tmp_path: Path, content: bytes, why: str) -> None:
    (tmp_path / "adapter_config.json").write_bytes(content)
    with pytest.raises(UserError, match=why) as e:
        read_adapter_config(tmp_path)
    assert str(tmp_path / "adapter_config.json") in str(e.value)
    assert "\n" not in str(e.value)


def test_adapter_config_naming_no_base(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text('{"base_model_name_or_path": null}')
    with pytest.raises(UserError, match="names no base model; pass --base"):
        merge_cli(tmp_path, None, tmp_path / "out")


# ------------------------------------------------------------------------------ the CLI


def test_cli_refuses_non_empty_out_and_dot(final: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _user_error(run_cli("merge", str(final / "adapter"), "--out", str(out)),
                f"--out {out} is not empty", "keep.txt", "--force")
    assert _tree(out) == {"keep.txt": b"mine"}
    _user_error(run_cli("merge", str(final / "adapter"), "--out", ".", cwd=tmp_path),
                "--out .: refusing to replace the current directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cli_malformed_adapter_config(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_bytes(b"\x80\x81garbage")
    _user_error(run_cli("merge", str(tmp_path), "--out", str(tmp_path / "m")),
                f"{tmp_path / 'adapter_config.json'} is not UTF-8")
    assert not (tmp_path / "m").exists()


def test_cli_force_merges_over_a_user_dir(final: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("replace me")
    r = run_cli("merge", str(final), "--out", str(out), "--force")  # final/ means its adapter/
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "config.json").is_file() and not (out / "old.txt").exists()


def test_truncated_adapter_weights(final: Path, tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(final / "adapter", adapter)
    f = adapter / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(UserError, match=f"^{re.escape(str(f))} is truncated or corrupt"):
        merge_cli(adapter, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()
