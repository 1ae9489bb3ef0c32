"""Pruning, measured: sparsity against perplexity, file size and decode latency, per method,
before and after a short recovery fine-tune, each next to the dense model in the same run.

    python bench/prune.py [--model runs/demo/pretrain] [--corpus runs/demo/corpus]
                          [--threads 1] [--quick] [--out runs/bench-prune]

Two models, because one cannot show both things:
- quality and size come from the trained model (`--model`, default the demo's 2M-parameter
  llama): held-out perplexity on the corpus's val split, safetensors size and its gzip size,
  before and after recovery (the pretrain stage run from the pruned directory, which keeps an
  unstructured method's zeros zero). "dense + fine-tune" gets the same recovery steps, so the
  "after" column is read against it, not against the untouched dense model;
- latency comes from a wider random-weight llama of the same family (hidden 768, 12 heads,
  MLP 2048, 6 layers, ~43M parameters, fp32): at 2M parameters a decode step is mostly Python
  and kernel-launch overhead, so any method would look alike. A dense matmul's time does not
  depend on the values it multiplies (zeros are not denormals), so random weights time it the
  same as trained ones; the trained model's ms/token is shown too, to make that point.
Decode: batch 1, KV cache, greedy, a fixed 32-token prompt, 48 new tokens, best of 4 calls that
alternate with the dense model's (each speed-up is against that neighbour, so a load that
drifts during the run cancels), all at `--threads` (default 1: the machine is shared; one
thread is not stretched by a descheduled peer). The dense neighbours' spread is printed: it is
the run's noise.

Reading the size columns: unstructured zeros are stored as dense fp32, so the safetensors file
does not shrink; gzip shrinks it because half-zero data compresses (a transfer/storage gain
only: loaded, it is dense again). Storing it truly sparse needs an index per weight (CSR with
int32 columns: 8 bytes per kept fp32 weight, a loss below 50% sparsity) or 2:4's compressed
form (kept values + 2 bits each), which only sparse kernels (2:4: NVIDIA sparse tensor cores)
turn into speed. Structured pruning changes the matrices themselves: the file, the memory
and the per-token work all shrink.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gzip
import io
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmforge.compress.config import PruneCfg  # noqa: E402
from lmforge.config import PretrainCfg, load_config  # noqa: E402
from lmforge.models import count_params, load_model, save_hf  # noqa: E402
from lmforge.stages import run_stage  # noqa: E402
from lmforge.stages.prune import (  # noqa: E402
    calibration_batches,
    check,
    nonzero_params,
    perplexity_of,
    prune,
    read_texts,
    save_pruned,
)
from lmforge.tokenizer import load_tokenizer  # noqa: E402
from lmforge.train.precision import cpu_features, cpu_name  # noqa: E402

warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)

PROMPT, NEW, REPS = 32, 48, 4


def methods(quick: bool) -> list[tuple[str, dict[str, Any]]]:
    """(row label, prune config values); 2:4 is 50% by definition."""
    rows = []
    for s in ([0.5] if quick else [0.3, 0.5, 0.7]):
        rows += [(f"magnitude, per matrix @{s}", {"method": "magnitude", "sparsity": s}),
                 (f"magnitude, global @{s}", {"method": "magnitude", "scope": "global", "sparsity": s}),
                 (f"wanda @{s}", {"method": "wanda", "sparsity": s})]
        if s == 0.5:
            rows += [("2:4, magnitude", {"method": "2:4", "scores": "magnitude"}),
                     ("2:4, wanda", {"method": "2:4", "scores": "wanda"})]
        rows.append((f"structured (heads+neurons) @{s}", {"method": "structured", "sparsity": s}))
    return rows


def file_sizes(d: Path) -> tuple[int, int]:
    """(safetensors bytes, their gzip -6 bytes)."""
    raw = b"".join(f.read_bytes() for f in sorted(d.glob("*.safetensors")))
    return len(raw), len(gzip.compress(raw, compresslevel=6))


@torch.no_grad()
def decode_ms(model: torch.nn.Module, prompt: list[int]) -> float:
    """Milliseconds per generated token (batch 1, KV cache, greedy), one call."""
    cache = DynamicCache()
    out = model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(NEW):
        nxt = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    return (time.perf_counter() - t0) / NEW * 1e3


def paired_ms(dense: torch.nn.Module, model: torch.nn.Module, prompt: list[int]) -> tuple[float, float]:
    """(dense, model) best-of-REPS ms/token, measured alternately: on a shared machine the
    load drifts, and a ratio of neighbours cancels what a ratio of distant runs would not."""
    d = m = float("inf")
    for _ in range(REPS):
        d, m = min(d, decode_ms(dense.eval(), prompt)), min(m, decode_ms(model.eval(), prompt))
    return d, m


def latency_model(vocab: int) -> torch.nn.Module:
    conf = LlamaConfig(vocab_size=vocab, hidden_size=768, intermediate_size=2048, num_hidden_layers=6,
                       num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=1024,
                       tie_word_embeddings=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(conf).eval()


def recover(pruned: Path, out: Path, a: argparse.Namespace) -> dict[str, Any]:
    """The pretrain stage from the pruned dir for `--recover-steps` steps (the packed corpus is
    shared between runs: the stage reuses a pack whose sources are unchanged)."""
    pack = Path(a.out) / "pack"
    if pack.exists() and not (out / "data").exists():
        shutil.copytree(pack, out / "data", copy_function=os.link)
    cfg = load_config(PretrainCfg, None, [
        f"model.path={pruned}", f"data.corpus={a.corpus}", "data.tokenizer=null", "data.seq_len=256",
        f"train.max_steps={a.recover_steps}", "train.micro_batch_size=8", "train.eval_every=0",
        "train.eval_batches=2", f"train.threads={a.threads}", "train.resume=never",
        # fp32 on every row: the comparison is between methods, not precisions
        "train.precision=fp32", "optim.lr=3e-4", "optim.warmup_steps=5", "log.progress=off",
        f"run.dir={out}"])
    with contextlib.redirect_stdout(io.StringIO()):
        summary = run_stage("pretrain", cfg)
    if not pack.exists():
        shutil.copytree(out / "data", pack, copy_function=os.link)
    return summary


def measure(label: str, model: torch.nn.Module, dense: torch.nn.Module, tok: Any, texts: list[str],
            cfg: PruneCfg, d: Path, a: argparse.Namespace, prompt: list[int]) -> dict[str, Any]:
    """Perplexity, sizes and latency of the model saved in `d`, then of its recovery."""
    size, gz = file_sizes(d / "final")
    row = {"label": label, "params": count_params(model)[1], "nonzero": nonzero_params(model),
           "ppl": perplexity_of(model, tok, texts, cfg), "bytes": size, "gzip": gz,
           "ms_small": paired_ms(dense, model, prompt)}
    rec = recover(d, d.parent / f"{d.name}-recovered", a)
    recovered = load_model(rec["final_dir"]).eval()
    row["ppl_rec"] = perplexity_of(recovered, tok, texts, cfg)
    row["zeros_kept"] = rec.get("pruned", {}).get("sparsity_after")
    return row


def run(a: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, float]]:
    tok = load_tokenizer(a.model)
    dense = load_model(a.model).eval()
    base = PruneCfg(model={"path": a.model}, calibration={"text": a.corpus, "samples": 32, "seq_len": 128},
                    eval={"max_length": 256, "max_bytes": 30_000 if a.quick else 40_000})
    texts = read_texts(Path(a.corpus), "val", base.eval.max_bytes, "corpus")
    calib = calibration_batches(tok, base)
    prompt = calib[0][0, :PROMPT].tolist()
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    big = latency_model(len(tok))
    big_calib = [torch.randint(0, len(tok), (2, 64), generator=torch.Generator().manual_seed(0))]
    lat = {"dense_first": min(decode_ms(big, prompt) for _ in range(REPS))}
    save_hf(dense, out / "dense" / "final", tok)
    rows = [measure("dense (+ fine-tune)", dense, dense, tok, texts, base, out / "dense", a, prompt)]
    rows[0].update(sparsity=0.0, ms_big=(lat["dense_first"],) * 2, big_params=count_params(big)[1])
    for i, (label, values) in enumerate(methods(a.quick)):
        cfg = base.model_copy(update=values)
        scores = check(cfg)
        model = copy.deepcopy(dense)
        rec = prune(model, cfg, scores, calib if scores == "wanda" else None)
        save_pruned(model, tok, rec, out / f"m{i}" / "final")
        row = measure(label, model, dense, tok, texts, base, out / f"m{i}", a, prompt)
        b = copy.deepcopy(big)
        prune(b, cfg, scores, big_calib if scores == "wanda" else None)
        row.update(sparsity=rec["sparsity"], ms_big=paired_ms(big, b, prompt), big_params=count_params(b)[1])
        rows.append(row)
        print(f"done: {label}", file=sys.stderr, flush=True)
        del model, b
    lat["dense_last"] = min(decode_ms(big, prompt) for _ in range(REPS))
    return rows, lat


def report(rows: list[dict[str, Any]], lat: dict[str, float], a: argparse.Namespace, secs: float) -> None:
    d = rows[0]
    mb = lambda n: f"{n / 2**20:.2f}"  # noqa: E731
    print(f"CPU: {cpu_name()} ({', '.join(cpu_features())}); torch {torch.__version__}, "
          f"transformers {transformers.__version__}; {torch.get_num_threads()} thread(s); "
          f"load average {a.load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; "
          f"{secs / 60:.1f} min")
    print(f"quality/size: {a.model} ({d['params']:,} params), perplexity on {a.corpus}/val.jsonl "
          f"(sliding windows of 256); recovery: pretrain stage, {a.recover_steps} steps x 8 x 256 "
          f"tokens, lr 3e-4 (the demo's final). latency: random-weight llama 768/12 heads/2048/6 layers "
          f"({d['big_params']:,} params), batch 1, {PROMPT}-token prompt, {NEW} new tokens, best of "
          f"{REPS} alternating with the dense model (speed-up: against that neighbour); dense "
          f"{lat['dense_first']:.2f} ms/token first, {lat['dense_last']:.2f} last, "
          f"{min(r['ms_big'][0] for r in rows):.2f}-{max(r['ms_big'][0] for r in rows):.2f} "
          "as the neighbours\n")
    print("| method | sparsity | params (nonzero) | ppl | ppl after recovery | safetensors MB "
          "| gzip MB | ms/token, 2M trained model (speed-up) | ms/token, 43M model | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    dense_best = min(lat["dense_first"], lat["dense_last"], *(r["ms_big"][0] for r in rows))
    rows[0]["ms_big"] = (dense_best, dense_best)  # the dense row: its best measurement of the run
    for r in rows:
        speed = r["ms_big"][0] / r["ms_big"][1]
        kept = "" if r["zeros_kept"] is None else f" ({r['zeros_kept']:.1%} zeros kept)"
        print(f"| {r['label']} | {r['sparsity']:.1%} | {r['params']:,} ({r['nonzero']:,}) "
              f"| {r['ppl']:.2f} ({r['ppl'] / d['ppl']:.2f}x) "
              f"| {r['ppl_rec']:.2f} ({r['ppl_rec'] / d['ppl_rec']:.2f}x){kept} "
              f"| {mb(r['bytes'])} ({r['bytes'] / d['bytes']:.2f}x) | {mb(r['gzip'])} ({r['gzip'] / d['gzip']:.2f}x) "
              f"| {r['ms_small'][1]:.2f} ({r['ms_small'][0] / r['ms_small'][1]:.2f}x) "
              f"| {r['ms_big'][1]:.2f} | {speed:.2f}x |")
    print("\nsparsity: share of the block matrices' weights removed (embeddings and head stay dense); "
          "x columns: against the dense row (ppl after recovery: against dense + the same fine-tune).")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/demo/pretrain", help="trained model (HF dir or stage dir)")
    p.add_argument("--corpus", default="runs/demo/corpus", help="corpus stage dir: calibration + val")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="sparsity 0.5 only, 20 recovery steps (~3 min)")
    p.add_argument("--recover-steps", type=int, default=None)
    p.add_argument("--out", default="runs/bench-prune")
    a = p.parse_args()
    a.recover_steps = a.recover_steps or (20 if a.quick else 40)
    for what, path in (("--model", a.model), ("--corpus", a.corpus)):
        if not Path(path).exists():
            sys.exit(f"{what} {path} does not exist (make demo builds the default)")
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    a.load_start = os.getloadavg()[0]
    rows, lat = run(a)
    report(rows, lat, a, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
