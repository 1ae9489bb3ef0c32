"""Serving load: requests/s and p50/p95 latency at 1, 8 and 32 concurrent clients, for
`lmforge serve` and, where vLLM is installed (`make vllm`), the same checkpoint served by
`lmforge serve --backend vllm` (vLLM's own OpenAI server), in one table.

The model is a llama built here (hidden 256, 4 heads: head size 64, which vLLM's CPU attention
takes; 4 layers; random init, fp32) over a byte-level BPE trained here on synthetic-code prompts,
with lmforge's chat template, saved as a stage's final/ would be. Each server runs as a
subprocess on a free loopback port and is stopped after. Every client is a thread with the
official `openai` client sending chat completions of fixed prompts, max_tokens fixed,
temperature 0; a level's `--requests` requests are shared among its clients. Latency is one
whole (non-streamed) request; req/s = requests / wall time of the level. The mean completion
length is printed per row: a random model may end a reply early at its end-of-turn token, and
the two servers sample the same greedy tokens only up to float rounding.

    python bench/serve_load.py                    # 64 requests per level, 32 tokens each
    python bench/serve_load.py --requests 128 --threads 2
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from lmforge.chat import install_format, resolve_format
from lmforge.models import save_hf
from lmforge.tasks.synthetic_code import make_splits
from lmforge.tokenizer import save_tokenizer, train_bpe
from lmforge.train.precision import cpu_features, cpu_name

ROOT = Path(__file__).resolve().parent.parent
SPECIALS = ["<|endoftext|>", "<|bos|>", "<|pad|>"]
LEVELS = (1, 8, 32)


def build(work: Path) -> tuple[Path, list[str]]:
    problems = list(make_splits(0, n_train=200, n_eval=1).train)
    texts = [p.prompt for p in problems] + [p.solution for p in problems]
    tok = save_tokenizer(train_bpe(texts, 512, SPECIALS), work, bos_token="<|bos|>",
                         eos_token="<|endoftext|>", pad_token="<|pad|>", extra_special_tokens=[])
    install_format(tok, resolve_format(tok, "lmforge"))  # as `lmforge sft` saves its model
    conf = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=688,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=512, tie_word_embeddings=True,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    save_hf(AutoModelForCausalLM.from_config(conf).float().eval(), work, tok)
    return work, [p.prompt[:200] for p in problems[:16]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(backend: str, ckpt: Path, port: int, threads: int, log: Path) -> subprocess.Popen:
    # `lmforge serve --backend vllm` finds .venv-vllm itself; vLLM's CPU KV cache is sized
    # explicitly (GiB) rather than as a share of a shared machine's RAM
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [sys.executable, "-m", "lmforge.cli", "serve", str(ckpt), "--port", str(port),
           "--model-name", "tiny", "--max-batch", "32", "--backend", backend]
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_up(proc: subprocess.Popen, port: int, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"server not up in {timeout:.0f} s:\n{log.read_text()[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: vLLM's engine process goes too
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def level(port: int, prompts: list[str], clients: int, requests: int, max_tokens: int
          ) -> tuple[float, float, float, float]:
    """(req/s, p50 s, p95 s, mean completion tokens) for `requests` shared by `clients`."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                           max_retries=0, timeout=600)

    def one(i: int) -> tuple[float, int]:
        t = time.perf_counter()
        r = client.chat.completions.create(
            model="tiny", max_tokens=max_tokens, temperature=0,
            messages=[{"role": "user", "content": prompts[i % len(prompts)]}])
        return time.perf_counter() - t, r.usage.completion_tokens

    one(0)  # warm-up: first-call costs are not load
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        out = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    lat = sorted(x for x, _ in out)
    p95 = lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))]
    return requests / wall, statistics.median(lat), p95, statistics.fmean(n for _, n in out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per server")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--startup", type=float, default=600, help="seconds a server may take to start")
    args = ap.parse_args()
    backends = ["hf"]
    try:
        from lmforge.serve_vllm import find_vllm

        find_vllm()
        backends.append("vllm")
    except Exception as e:  # noqa: BLE001 (the bench runs without vLLM; it says why)
        print(f"no vllm row: {e}")
    print(f"CPU: {cpu_name()}; features: {' '.join(cpu_features())}; server threads "
          f"{args.threads}; {args.requests} requests/level, max_tokens {args.max_tokens}, T=0")
    rows: dict[tuple[str, int], tuple[float, float, float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, prompts = build(Path(tmp) / "final")
        for backend in backends:
            port, log = free_port(), Path(tmp) / f"{backend}.log"
            t = time.perf_counter()
            proc = start(backend, ckpt, port, args.threads, log)
            try:
                wait_up(proc, port, args.startup, log)
                print(f"{backend}: up in {time.perf_counter() - t:.1f} s", flush=True)
                for c in LEVELS:
                    rows[backend, c] = level(port, prompts, c, args.requests, args.max_tokens)
            finally:
                stop(proc)
    print(f"\n{'server':8} {'clients':>7} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} "
          f"{'tokens':>6} {'req/s vs hf':>11}")
    for (backend, c), (rps, p50, p95, toks) in rows.items():
        print(f"{backend:8} {c:7d} {rps:8.2f} {p50 * 1e3:8.0f} {p95 * 1e3:8.0f} {toks:6.1f} "
              f"{rps / rows['hf', c][0]:10.2f}x")


if __name__ == "__main__":
    main()
