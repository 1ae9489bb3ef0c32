"""Shared fixtures: tiny models from configs and a tiny pipeline run, all hermetic."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from lmforge.config import LogCfg, OptimCfg, PretrainCfg, TrainCfg
from lmforge.data.pack import TokenWindows
from lmforge.stages.pretrain import lm_task as stage_lm_task
from lmforge.train.loop import Task

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 64
SEQ = 16


CHAT_SPECIALS = ["<|endoftext|>", "<|bos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>",
                 "<|end|>"]
# the ids the test tokenizers give their specials (trained with CHAT_SPECIALS first)
EOS_ID, BOS_ID, PAD_ID = 0, 1, 2


def micro_llama(seed: int = 0, vocab: int = VOCAB) -> torch.nn.Module:
    """A 2-layer llama whose bos/eos/pad ids are the test tokenizers' (not LlamaConfig's
    defaults, 1 and 2, which name other tokens there)."""
    conf = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                       tie_word_embeddings=True, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                       pad_token_id=PAD_ID)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(conf)


@pytest.fixture
def windows(tmp_path: Path) -> TokenWindows:
    """A packed split of random ids (structure is irrelevant to the loop's invariances)."""
    ids = np.random.default_rng(0).integers(0, VOCAB, size=5000).astype(np.uint16)
    path = tmp_path / "train.bin"
    ids.tofile(path)
    return TokenWindows(path, "uint16", SEQ)


def lm_task(model: torch.nn.Module, windows: TokenWindows, micro: int, accum: int,
            seed: int = 0, on_step=None) -> Task:
    """The pretrain stage's own task on `windows`, without its evaluation;
    `on_step(n)` runs before step n's batches are fetched."""
    cfg = PretrainCfg(train=TrainCfg(micro_batch_size=micro, grad_accum=accum, seed=seed,
                                     eval_batches=1))
    task = stage_lm_task(model, windows, windows, cfg, torch.device("cpu"), flops=0.0)
    task.evaluate = None
    if on_step is not None:
        fetch = task.batches

        def batches(n: int):
            on_step(n)
            return fetch(n)

        task.batches = batches
    return task


def train_cfg(**kw) -> TrainCfg:
    base = dict(max_steps=6, micro_batch_size=8, grad_accum=1, precision="fp32", clip_grad=1.0,
                keep_last=3)
    return TrainCfg(**{**base, **kw})


OPTIM = OptimCfg(lr=1e-2, warmup_steps=2)
QUIET = LogCfg(every=1, progress="off")


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *args], capture_output=True,
                          text=True, cwd=cwd or ROOT, timeout=timeout)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn(args: list[str], **kw) -> subprocess.Popen:
    """A child that a test will signal. SIGINT is reset to its default first: a shell starts
    background jobs (`make test &`, some CI runners) with SIGINT ignored, children inherit
    that, and Python then installs no KeyboardInterrupt handler, so Ctrl-C tests would hang."""
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint, **kw)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """configs/tiny.yaml run once per session: corpus -> tokenizer -> pretrain + report."""
    work = tmp_path_factory.mktemp("tiny")
    shutil.copytree(ROOT / "configs", work / "configs")
    r = run_cli("run", "configs/tiny.yaml", cwd=work)
    assert r.returncode == 0, r.stderr[-2000:]
    return work / "runs" / "tiny"


def make_chat_tokenizer(out: Path):
    """A byte-level BPE with lmforge's special tokens, trained on a few lines of code/prose."""
    from lmforge.tokenizer import save_tokenizer, train_bpe

    texts = ["def add(a, b):\n    return a + b\n", "Add 2 and 3. Be brief. Now 4?\n",
             "Write a Python function that keeps the even numbers.\n"] * 20
    tok = train_bpe(texts, 320, CHAT_SPECIALS, min_frequency=1)
    return save_tokenizer(tok, out, bos_token="<|bos|>", eos_token="<|endoftext|>",
                          pad_token="<|pad|>", extra_special_tokens=CHAT_SPECIALS[3:])


@pytest.fixture
def chat_tok(tmp_path_factory: pytest.TempPathFactory):
    from lmforge.tokenizer import load_tokenizer

    d = tmp_path_factory.mktemp("chat_tok")
    make_chat_tokenizer(d)
    return load_tokenizer(d)
