"""Rollout throughput: lmforge's `hf` engine (HfEngine) against plain `model.generate`, and the
`vllm` engine where vLLM is importable, on the same model, prompts and token counts.

The model is a GPT-2 with the `small` preset's shape (d 512, 8 layers, 8 heads, MLP 1376; head
size 64, which vLLM's CPU attention takes), random init, fp32, over an 8k byte-level BPE trained
here on synthetic-code prompts and stdlib source. Prompts are real synthetic-code prompts cut
to at most 48 tokens, so batches are left-padded with an attention mask on every side.

Like for like: every side samples at T=1 with top-k and top-p off and draws exactly
`--new-tokens` tokens per row, EOS included as an ordinary token:
- `model.generate`: do_sample, temperature 1, top_k 0, top_p 1, min_new_tokens =
  max_new_tokens (EOS masked until the last token, so no row ends early; the mask costs one
  masked_fill per step);
- HfEngine: no stop id at all (stop_ids=[]), so every row runs to max_new_tokens;
- VllmEngine: no stop id either (it sets ignore_eos, so the checkpoint's EOS is not added).
Each side's token count is checked. tokens/s = batch * new tokens / wall time of one call
(prefill included), median of `--reps` calls after one warm-up call; generate and HfEngine
take turns call by call, so a disturbance on a shared machine hits both alike.

    python bench/rollout.py                     # batches 1, 8, 32; 64 new tokens; 3 reps
    python bench/rollout.py --threads 1         # on a machine other processes load
    .venv-vllm/bin/python bench/rollout.py      # the same plus the vllm row (make vllm)
"""

from __future__ import annotations

import argparse
import statistics
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, GenerationConfig

from lmforge.config import ModelCfg
from lmforge.models import count_params, preset_config
from lmforge.rl.rollout import HfEngine, SamplingCfg, left_pad
from lmforge.tasks.synthetic_code import make_splits
from lmforge.tokenizer import save_tokenizer, train_bpe
from lmforge.train.precision import cpu_name

VOCAB = 8192
SPECIALS = ["<|endoftext|>", "<|bos|>", "<|pad|>"]


def setup(work: Path, n_prompts: int, prompt_tokens: int):
    problems = list(make_splits(0, n_train=max(200, n_prompts), n_eval=1).train)
    std = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.prompt for p in problems] + [p.solution for p in problems]
    texts += [f.read_text(errors="ignore") for f in sorted(std.glob("*.py"))[:60]]
    tok = save_tokenizer(train_bpe(texts, VOCAB, SPECIALS), work / "tok", bos_token="<|bos|>",
                         eos_token="<|endoftext|>", pad_token="<|pad|>", extra_special_tokens=[])
    conf = preset_config(ModelCfg(preset="small", arch="gpt2"), len(tok), tok.bos_token_id,
                         tok.eos_token_id, tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(conf).float().eval()
    prompts = [[tok.bos_token_id, *tok(p.prompt, add_special_tokens=False)["input_ids"]][:prompt_tokens]
               for p in problems[:n_prompts]]
    return tok, model, prompts


def hf_generate(model, pad_id: int, n: int) -> Callable[[list[list[int]], int], int]:
    gc = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=n,
                          min_new_tokens=n, pad_token_id=pad_id, eos_token_id=model.config.eos_token_id)

    def run(prompts: list[list[int]], seed: int) -> int:
        ids, att = left_pad(prompts, pad_id)
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=att, generation_config=gc)
        return (out.size(1) - ids.size(1)) * out.size(0)

    return run


def engine_run(engine, n: int) -> Callable[[list[list[int]], int], int]:
    cfg = SamplingCfg(max_new_tokens=n, temperature=1.0, batch_size=1024)

    def run(prompts: list[list[int]], seed: int) -> int:
        ro = engine.generate(prompts, cfg, torch.Generator().manual_seed(seed))
        return int(ro.mask.sum())

    return run


def measure(runs: dict[str, Callable[[list[list[int]], int], int]], prompts: list[list[int]],
            batch: int, n: int, reps: int) -> dict[str, float]:
    """Median tokens/s of each runner; runners take turns each repetition."""
    rows = prompts[:batch]
    times: dict[str, list[float]] = {k: [] for k in runs}
    for k, run in runs.items():  # warm-up (allocator, caches, lazy init)
        assert run(rows, 0) == batch * n, f"{k} did not draw {n} tokens per row"
    for r in range(reps):
        for k, run in runs.items():
            t = time.perf_counter()
            got = run(rows, r + 1)
            times[k].append(time.perf_counter() - t)
            assert got == batch * n, f"{k} drew {got} tokens, not {batch * n}"
    return {k: batch * n / statistics.median(v) for k, v in times.items()}


def vllm_engine(model, tok):
    """The engine, or why there is none."""
    try:
        import vllm
    except ImportError as e:
        return None, f"vLLM not importable here ({e}): `make vllm`, then .venv-vllm/bin/python bench/rollout.py"
    from lmforge.rl.vllm_engine import VllmEngine

    eng = VllmEngine(model, tok, [], tok.pad_token_id, kv_cache_memory_bytes=1 << 30)
    return eng, f"vllm {vllm.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=48)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-vllm", action="store_true")
    # on a machine others load, 1 thread avoids OpenMP regions waiting on a descheduled thread
    # (seen here: a batch-1 decode step at 19 ms on 1 thread, 230 ms on 2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as d:
        tok, model, prompts = setup(Path(d), max(a.batches), a.prompt_tokens)
        n = a.new_tokens
        hf = HfEngine(model, tok, [], tok.pad_token_id)  # no stop id: every row runs n tokens
        res = {b: measure({"generate": hf_generate(model, tok.pad_token_id, n),
                           "hf": engine_run(hf, n)}, prompts, b, n, a.reps) for b in a.batches}
        eng, why = (None, "skipped (--no-vllm)") if a.no_vllm else vllm_engine(model, tok)
        if eng is not None:
            for b in a.batches:
                res[b] |= measure({"vllm": engine_run(eng, n)}, prompts, b, n, a.reps)
    lens = [len(p) for p in prompts]
    print(f"CPU: {cpu_name()}; torch {torch.__version__} with {torch.get_num_threads()} threads; "
          f"transformers {transformers.__version__}; {why}")
    print(f"model: GPT-2 shaped as preset small, {count_params(model)[0] / 1e6:.1f}M params, fp32, "
          f"vocab {len(tok)}; prompts {min(lens)}-{max(lens)} tokens (left-padded); {n} new "
          f"tokens per row at T=1, no early stop; median of {a.reps} calls\n")
    head = " | ".join(f"batch {b}" for b in a.batches)
    print(f"| tokens/s (x generate) | {head} |")
    print("|---|" + "---|" * len(a.batches))
    for key, label in [("generate", "HF `model.generate`"), ("hf", "HfEngine (`hf`)"),
                       ("vllm", "VllmEngine (`vllm`)")]:
        if key == "vllm" and eng is None:
            print(f"| {label} | {why} |" + " |" * (len(a.batches) - 1))
            continue
        cells = [f"{res[b][key]:,.0f}" + ("" if key == "generate" else
                                          f" ({res[b][key] / res[b]['generate']:.2f}x)")
                 for b in a.batches]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
