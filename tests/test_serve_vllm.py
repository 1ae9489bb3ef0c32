"""`lmforge serve --backend vllm`: the command line handed to vLLM, and the one-line error
where no vLLM is found. Nothing here starts vLLM (it is not installed in the test venv)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from lmforge import serve_vllm as sv
from lmforge.cli import _parser, main
from lmforge.errors import UserError


def test_argv_translates_lmforge_flags() -> None:
    argv = sv.vllm_argv(["vllm"], "runs/x/final", "0.0.0.0", 9000, "sk-1", "tiny", 16, cpu=False)
    assert argv == ["vllm", "--model", "runs/x/final", "--host", "0.0.0.0", "--port", "9000",
                    "--served-model-name", "tiny", "--max-num-seqs", "16", "--api-key", "sk-1"]


def test_argv_on_cpu_is_fp32_eager_and_keyless() -> None:
    argv = sv.vllm_argv(["py", "-m", "m"], "d", "127.0.0.1", 8000, None, "d", 32, cpu=True)
    assert argv[:5] == ["py", "-m", "m", "--model", "d"]
    assert "--api-key" not in argv
    assert argv[-3:] == ["--dtype", "float32", "--enforce-eager"]


def test_cli_flags_reach_vllm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    """The whole path from argv to execv, with execv caught: a stage dir resolves to final/,
    the default model name is CKPT as given, and an adapter/ subdir is named, not loaded."""
    final = tmp_path / "sft" / "final"
    (final / "adapter").mkdir(parents=True)
    (final / "config.json").write_text("{}")
    seen: list[list[str]] = []

    def execv(path: str, argv: list[str]) -> None:
        seen.append(argv)
        raise SystemExit(0)

    monkeypatch.setattr(sv, "find_vllm", lambda: ["/v/bin/vllm"])
    monkeypatch.setattr(sv, "_cuda", lambda: False)
    monkeypatch.setattr(os, "execv", execv)
    ns = _parser().parse_args(["serve", str(tmp_path / "sft"), "--backend", "vllm", "--port",
                               "8123", "--max-batch", "4", "--api-key", "secret"])
    with pytest.raises(SystemExit):
        main(["serve", str(tmp_path / "sft"), "--backend", "vllm", "--port", "8123",
              "--max-batch", "4", "--api-key", "secret"])
    assert seen == [sv.vllm_argv(["/v/bin/vllm"], str(final), "127.0.0.1", 8123, "secret",
                                 ns.ckpt, 4, cpu=True)]
    out = capsys.readouterr().out
    assert "adapter/ is not loaded as a LoRA" in out and "secret" not in out


def test_no_vllm_is_one_line_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sv.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(sv, "PROJECT", tmp_path)  # no .venv-vllm there
    with pytest.raises(UserError, match="^install vLLM: make vllm"):
        sv.find_vllm()
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert main(["serve", str(tmp_path / "m"), "--backend", "vllm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(sv.INSTALL)


def test_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM importable here wins; else the python of the project's .venv-vllm (with vLLM's
    script beside it); else nothing."""
    monkeypatch.setattr(sv.importlib.util, "find_spec", lambda name: object())
    assert sv.find_vllm(tmp_path) == [sys.executable, "-m", sv.SERVER]
    monkeypatch.setattr(sv.importlib.util, "find_spec", lambda name: None)
    exe = tmp_path / ".venv-vllm" / "bin" / "python"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    with pytest.raises(UserError):  # a venv without vLLM in it
        sv.find_vllm(tmp_path)
    (exe.parent / "vllm").write_text("")
    assert sv.find_vllm(tmp_path) == [str(exe), "-m", sv.SERVER]
