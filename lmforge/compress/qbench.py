"""`lmforge bench quantize`: one table, one row per quantization method.

Each row runs in a fresh process, so the peak resident memory it reports (VmHWM) is that
method's alone: a child of a fork server that has imported the libraries every row needs
(~5 s of a row's ~7 on a 2-core CPU) and run nothing else. fp32 runs first: its greedy
answers and its next-token log-probs on the held-out text are the reference every other row
is compared with. Per row:

- weight bytes: the stored weights with their scales (`quantize.weight_bytes`);
- peak RSS (and its growth over the process's size before the load) and peak GPU memory;
- load time (from the full-precision checkpoint, quantizing included);
- time to first token: prefill + the first greedy token at batch 1;
- decode tokens/s at each batch size: greedy steps after the first token, a fixed number
  of them (no early stop), on a KV cache; speeds are the best of 3 runs;
- perplexity on the held-out text (`eval.text_metrics.perplexity`, as `lmforge eval` has it);
- greedy agreement with fp32 over a fixed prompt set: exact-match rate and mean common prefix;
- mean KL(fp32 || method) of the next-token distributions at the held-out text's positions.

A method this device cannot run, or one that fails, is a row saying why. Rows measure speed
with whatever else the machine runs; the header says what it is.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import resource
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from itertools import zip_longest
from pathlib import Path
from typing import Any

from lmforge.compress.config import QuantBenchCfg, QuantizeCfg
from lmforge.errors import UserError
from lmforge.io import atomic_write_json, atomic_write_text, human_bytes
from lmforge.train.precision import cpu_name

# every column of a row; a row that did not run has None in the measured ones
COLUMNS = ("method", "status", "reason", "note", "weight_bytes", "base_rss_bytes",
           "peak_rss_bytes", "peak_gpu_bytes", "load_s", "ttft_s", "decode_tok_s",
           "perplexity", "exact_match", "mean_prefix", "mean_kl", "row_s")
REFERENCE = "fp32"
# the cache argument's old name is the one every supported transformers accepts (as in
# rl/rollout.py), without a warning per decoded token
warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)


def empty_row(method: str, status: str, reason: str | None = None, note: str = "") -> dict[str, Any]:
    return {**dict.fromkeys(COLUMNS), "method": method, "status": status, "reason": reason,
            "note": note}


# --------------------------------------------------------------------------- pure measures


def agreement(ref: Sequence[Sequence[int]], got: Sequence[Sequence[int]]) -> tuple[float, float]:
    """(exact-match rate, mean common-prefix length in tokens) of greedy outputs, prompt by
    prompt. Worked example: ref [[1, 2, 3], [4]] and got [[1, 2, 9], [4]] give exact 1/2 and
    prefix (2 + 1) / 2 = 1.5."""
    if len(ref) != len(got) or not ref:
        raise ValueError(f"agreement needs as many outputs as references, got {len(got)} for {len(ref)}")
    prefix = [next((i for i, (a, b) in enumerate(zip(r, g)) if a != b), min(len(r), len(g)))
              for r, g in zip(ref, got)]
    exact = sum(list(r) == list(g) for r, g in zip(ref, got)) / len(ref)
    return exact, sum(prefix) / len(prefix)


def kl_sum(ref_logps: Any, logits: Any) -> float:
    """Sum over positions of KL(p_ref || p) in nats, p_ref given as log-probs (N, V) and p as
    logits (N, V). The reference is the first argument of `token_kl` (KL(p || p_ref) there,
    with p from its first argument): log-probs are valid logits."""
    import torch

    from lmforge.losses.lm import token_kl

    mask = torch.ones(1, ref_logps.size(0))
    # token_kl upcasts each chunk to fp32 (fp64 when given fp64) itself
    kl, _ = token_kl(ref_logps[None], logits[None].to(ref_logps.device), mask)
    return float(kl) * ref_logps.size(0)


# --------------------------------------------------------------------------- inputs


def heldout_problems(seed: int, n: int) -> list[Any]:
    """`n` held-out synthetic-code problems, difficulties interleaved (d1, d2, d3, d4, unseen,
    d1, ...) so a short list still spans them."""
    from lmforge.tasks.synthetic_code import make_splits

    splits = make_splits(seed, n_train=1, n_eval=max(1, -(-n // 5)))
    groups = [*(ps for _, ps in sorted(splits.heldout.items())), splits.unseen]
    return [p for row in zip_longest(*groups) for p in row if p is not None][:n]


def agreement_prompts(gen: Any, bench: QuantBenchCfg, seed: int) -> list[list[int]]:
    """The greedy-agreement prompts as the model's tokens: the configured prompts, or held-out
    problems with their signature put in the answer (as `lmforge eval` asks them)."""
    room = gen.context - bench.agree_tokens
    if room < 1:
        raise UserError(f"bench.agree_tokens={bench.agree_tokens} leaves no room for a prompt "
                        f"in the model's {gen.context}-token context")
    if bench.prompts:
        ids = [gen.prompt_ids(p) for p in bench.prompts[:bench.n_prompts]]
    else:
        ids = [gen.prompt_ids(p.prompt, p.solution.splitlines()[0])
               for p in heldout_problems(seed, bench.n_prompts)]
    return [x[-room:] for x in ids]


def heldout_texts(tokenizer: Any, bench: QuantBenchCfg, seed: int) -> tuple[list[str], str]:
    """(texts, what they are), at most `max_text_tokens` tokens: the configured text set, or
    held-out problems answered by their reference solutions (in the chat template when the
    tokenizer has one: the text a chat model is used on)."""
    if bench.text is not None:
        from lmforge.stages.eval import text_set

        docs, what = text_set(bench.text), str(bench.text)
    else:
        chat = bool(getattr(tokenizer, "chat_template", None))
        docs = [tokenizer.apply_chat_template([{"role": "user", "content": p.prompt},
                                               {"role": "assistant", "content": p.solution}],
                                              tokenize=False)
                if chat else f"{p.prompt}\n{p.solution}"
                for p in heldout_problems(seed, max(5, bench.max_text_tokens // 48))]  # ~100 tokens each
        what = "held-out synthetic-code problems with reference answers" + (" (chat)" if chat else "")
    out, total = [], 0
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        room = bench.max_text_tokens - total
        if len(ids) > room:  # the document that overflows the budget: its start fills it
            if room >= 16:
                out.append(tokenizer.decode(ids[:room]))
            break
        out.append(doc)
        total += len(ids)
    if not out:
        raise UserError(f"bench.text {what}: no text to score")
    return out, what


def kl_windows(tokenizer: Any, texts: list[str], context: int, vocab: int,
               bench: QuantBenchCfg) -> list[list[int]]:
    """The positions the KL is taken at: the texts' tokens joined by end-of-text (as
    pretraining packed documents) cut into windows of up to 256 tokens, and no more positions
    than keep the fp32 reference (positions x vocab x 4 bytes) within max_reference_mb."""
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = [t for doc in texts for t in [*sep, *tokenizer(doc, add_special_tokens=False)["input_ids"]]]
    cap = min(bench.max_text_tokens, bench.max_reference_mb * 2**20 // (4 * vocab))
    ids = ids[:max(cap, 1)]
    L = max(1, min(256, context))
    return [ids[i:i + L] for i in range(0, len(ids), L)]


# --------------------------------------------------------------------------- timing


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def greedy_steps(model: Any, ids: Any, n: int) -> tuple[float, float]:
    """(seconds to the first token, seconds for the n - 1 after it) of greedy decoding from
    `ids` (B, P) on a KV cache; every step runs (no stop token ends it early)."""
    import torch
    from transformers import DynamicCache

    device = ids.device.type
    with torch.inference_mode():
        _sync(device)
        t0 = time.perf_counter()
        cache = DynamicCache()
        tok = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        t1 = time.perf_counter()
        for _ in range(n - 1):
            tok = model(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        return t1 - t0, time.perf_counter() - t1


def timing(model: Any, prompts: list[list[int]], bench: QuantBenchCfg, context: int,
           device: str) -> tuple[float, dict[str, float]]:
    """(time to first token at batch 1, {batch: decode tokens/s}), each the best of 3 runs:
    another process can only slow a run down, so the best is the closest to this method's
    own speed. A batch's prompts are the first B agreement prompts cut to one length (their
    ends: no padding in what is timed)."""
    import torch

    n = bench.decode_tokens
    if n >= context:
        raise UserError(f"bench.decode_tokens={n} does not fit the model's {context}-token context")

    def batch(b: int) -> Any:
        rows = [prompts[i % len(prompts)] for i in range(b)]
        P = max(1, min(min(len(r) for r in rows), context - n))
        return torch.tensor([r[-P:] for r in rows], device=device)

    one = batch(1)
    greedy_steps(model, one, 2)  # warm-up: kernel selection, allocator, lazy repacking
    ttft = min(greedy_steps(model, one, 1)[0] for _ in range(3))
    rates = {}
    for b in bench.batch_sizes:
        x = batch(b)
        greedy_steps(model, x, 2)
        rates[str(b)] = b * (n - 1) / min(greedy_steps(model, x, n)[1] for _ in range(3))
    return ttft, rates


def memory() -> tuple[int, int]:
    """(current RSS, peak RSS) of this process in bytes: Linux VmRSS/VmHWM, else getrusage."""
    try:
        status = Path("/proc/self/status").read_text()
        kb = {k: int(v.split()[0]) for k, v in (ln.split(":", 1) for ln in status.splitlines()
                                                  if ln.startswith(("VmRSS", "VmHWM")))}
        return kb["VmRSS"] * 1024, kb["VmHWM"] * 1024
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak *= 1 if sys.platform == "darwin" else 1024
        return peak, peak


# --------------------------------------------------------------------------- one row


def greedy_tokens(model: Any, prompts: list[list[int]], stop_ids: list[int], pad_id: int,
                  n: int) -> list[list[int]]:
    """Greedy answers (up to `n` tokens, cut before a stop token), 8 prompts per batch: the
    same batches for every method, since LLM.int8 picks its outlier columns per batch."""
    from lmforge.generate import generate_batch

    return generate_batch(model, prompts, stop_ids, pad_id, n, batch_size=8, label="agreement")


def _forward_logps(model: Any, windows: list[list[int]], device: str):  # type: ignore[no-untyped-def]
    """Next-token log-probs (positions, V) in fp32, window batches of equal length in turn."""
    import torch

    i = 0
    with torch.inference_mode():
        while i < len(windows):
            j = i
            while j < len(windows) and j - i < 8 and len(windows[j]) == len(windows[i]):
                j += 1
            x = torch.tensor(windows[i:j], device=device)
            logits = model(input_ids=x, use_cache=False).logits.float()  # (b, L, V)
            yield torch.log_softmax(logits, -1).reshape(-1, logits.size(-1)).cpu()
            i = j


def kl_pass(model: Any, windows: list[list[int]], ref: Path, device: str, write: bool) -> float:
    """Mean KL(fp32 || this model) over the windows' positions. The reference row (`write`)
    first stores its own log-probs at `ref`, then is compared with what it stored."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    parts = list(_forward_logps(model, windows, device)) if write else None
    if write:
        save_file({"logps": torch.cat(parts).contiguous()}, str(ref))  # type: ignore[arg-type]
    total, pos = 0.0, 0
    with safe_open(str(ref), "pt") as f:
        sl = f.get_slice("logps")
        for logps in parts if write else _forward_logps(model, windows, device):  # type: ignore[union-attr]
            total += kl_sum(sl[pos:pos + logps.size(0)], logps)
            pos += logps.size(0)
    return total / max(pos, 1)


def _import_all() -> None:
    """Every row imports the same libraries before its baseline RSS is read, so the growth
    it reports is its model's, not the difference between libraries it imported."""
    import importlib

    import transformers  # noqa: F401

    import lmforge.compress.quantize  # noqa: F401  (quiets the libraries below first)

    for lib in ("bitsandbytes", "torchao"):
        try:
            importlib.import_module(lib)
        except Exception:  # absent or broken: its rows say so
            pass


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One method's row (and, for the reference, what the others compare with)."""
    import torch

    _import_all()
    from lmforge.compress import quantize as Q
    from lmforge.eval.harness import Generator
    from lmforge.eval.text_metrics import perplexity
    from lmforge.models import count_params
    from lmforge.tokenizer import load_tokenizer

    cfg = QuantizeCfg.model_validate(spec["cfg"])
    bench, method, device = cfg.bench or QuantBenchCfg(), spec["method"], spec["device"]
    work, reference = Path(spec["work"]), method == REFERENCE
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base_rss, _ = memory()
    t0 = time.perf_counter()
    model = Q.load_quantized_as(spec["source"], method, cfg, device)
    load_s = time.perf_counter() - t0
    wbytes = Q.weight_bytes(model)  # before the first forward (see weight_bytes)
    tokenizer = load_tokenizer(spec["source"])
    gen = Generator(model, tokenizer)
    if reference:
        texts, what = heldout_texts(tokenizer, bench, cfg.seed)
        inputs = {"prompts": agreement_prompts(gen, bench, cfg.seed), "texts": texts,
                  "windows": kl_windows(tokenizer, texts, gen.context, model.config.vocab_size, bench)}
        atomic_write_json(work / "inputs.json", inputs)
    inputs = json.loads((work / "inputs.json").read_text())
    ttft, rates = timing(model, inputs["prompts"], bench, gen.context, device)
    ppl = perplexity(model, tokenizer, inputs["texts"])["perplexity"]
    greedy = greedy_tokens(model, inputs["prompts"], gen.stop_ids, gen.pad, bench.agree_tokens)
    _, peak = memory()  # before the KL pass: the reference's size is not this method's
    gpu = torch.cuda.max_memory_allocated() if device == "cuda" else None
    if reference:
        atomic_write_json(work / "greedy.json", greedy)
    kl = kl_pass(model, inputs["windows"], work / "reference.safetensors", device, reference)
    exact, prefix = agreement(json.loads((work / "greedy.json").read_text()), greedy)
    row = {**empty_row(method, "ok", note=Q.note(method, device, model.config)),
           "weight_bytes": wbytes, "base_rss_bytes": base_rss, "peak_rss_bytes": peak,
           "peak_gpu_bytes": gpu, "load_s": load_s, "ttft_s": ttft, "decode_tok_s": rates,
           "perplexity": ppl, "exact_match": exact, "mean_prefix": prefix, "mean_kl": kl}
    n_text = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in inputs["texts"])
    info = {"params": count_params(model)[1], "vocab": model.config.vocab_size,
            "threads": torch.get_num_threads(), "prompts": len(inputs["prompts"]),
            "text_docs": len(inputs["texts"]), "text_tokens": n_text,
            "kl_positions": sum(len(w) for w in inputs["windows"])}
    if reference:
        info["text"] = what
    return {"row": row, "info": info}


def child_main(argv: list[str]) -> int:
    """`python -m lmforge.compress.qbench SPEC.json`: one row, written to spec["result"];
    an error is the row's reason, never a traceback the table loses."""
    spec = json.loads(Path(argv[0]).read_text())
    try:
        out = measure(spec)
    except UserError as e:
        out = {"row": empty_row(spec["method"], "failed", str(e))}
    except Exception as e:  # the library's own failure on this device: the row says which
        first = (str(e).strip().splitlines() or [""])[0][:300]
        out = {"row": empty_row(spec["method"], "failed", f"{type(e).__name__}: {first}")}
    atomic_write_json(Path(spec["result"]), out)
    return 0



# --------------------------------------------------------------------------- the table


# what every row imports before its baseline is read (see _import_all): a forked child's
# peak RSS starts at the server's size, which is the baseline each row reads anyway
PRELOAD = ["transformers", "lmforge.compress.quantize", "bitsandbytes", "torchao",
           "lmforge.eval.harness", "lmforge.eval.text_metrics", "lmforge.tokenizer"]
ROW_ENV = {"TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _row(spec_path: str) -> None:
    os.environ.update(ROW_ENV)
    child_main([spec_path])


def run_child(spec_path: Path, timeout: float) -> tuple[int, str]:
    """(exit code, what went wrong) of one row in a fresh process: forked from a server that
    only imported libraries (never ran torch, so no thread pool is copied mid-flight)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # ignored once the server runs: it already has them
    proc = ctx.Process(target=_row, args=(str(spec_path),), daemon=True)
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise subprocess.TimeoutExpired(f"row {spec_path.stem}", timeout)
    rc = proc.exitcode if proc.exitcode is not None else -1
    return rc, (f"killed by signal {-rc} (out of memory?)" if rc < 0 else "")


def _spawn(method: str, cfg: QuantizeCfg, source: str, device: str, work: Path,
           timeout: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """One row in a fresh process: (row, what the reference row says about the inputs)."""
    result = work / f"{method}.result.json"
    spec = {"method": method, "source": source, "device": device, "work": str(work),
            "cfg": cfg.model_dump(mode="json"), "result": str(result)}
    spec_path = work / f"{method}.spec.json"
    atomic_write_json(spec_path, spec)
    t0 = time.perf_counter()
    try:
        rc, err = run_child(spec_path, timeout)
    except subprocess.TimeoutExpired:
        return empty_row(method, "failed", f"still running after row_timeout_s={timeout:g}"), {}
    row_s = time.perf_counter() - t0
    if rc != 0 or not result.exists():  # killed (out of memory?) or crashed
        tail = (err.strip().splitlines() or ["no output"])[-1][:300]
        return {**empty_row(method, "failed", f"exit {rc}: {tail}"), "row_s": row_s}, {}
    got = json.loads(result.read_text())
    return {**got["row"], "row_s": row_s}, got.get("info", {})


ISA_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "OMP_NUM_THREADS")


def header(device: str, source: str, info: dict[str, Any], bench: QuantBenchCfg) -> dict[str, Any]:
    import torch

    from lmforge.compress.quantize import versions
    from lmforge.train.precision import cpu_features

    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    positions, vocab = info.get("kl_positions"), info.get("vocab")
    return {"model": source, "device": device, "gpu": gpu, "cpu": cpu_name(),
            "cpu_features": cpu_features(), "threads": info.get("threads", torch.get_num_threads()),
            "env": {k: os.environ[k] for k in ISA_ENV if k in os.environ},
            "versions": versions(), "params": info.get("params"), "vocab": vocab,
            "text": info.get("text"), "text_docs": info.get("text_docs"),
            "text_tokens": info.get("text_tokens"), "kl_positions": positions,
            "reference_bytes": positions * vocab * 4 if positions and vocab else None,
            "prompts": info.get("prompts"), "agree_tokens": bench.agree_tokens,
            "decode_tokens": bench.decode_tokens, "batch_sizes": bench.batch_sizes}


def run_table(cfg: QuantizeCfg, source: str, out: Path, device: str) -> dict[str, Any]:
    """Every method of cfg.bench, fp32 first, each in its own process; writes
    quant_table.json and quant_table.md into `out`, prints the table, returns
    {"header", "rows"}."""
    import shutil

    from lmforge.compress import quantize as Q

    bench = cfg.bench or QuantBenchCfg()
    conf = Q.source_config(source, cfg.model.trust_remote_code)
    methods = [REFERENCE, *dict.fromkeys(m for m in bench.methods if m != REFERENCE)]
    work = out / ".qbench"  # the reference's inputs and log-probs; gone when the table is
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    try:
        for i, m in enumerate(methods):
            why = Q.unsupported(m, device, conf)
            if why is not None:
                row = empty_row(m, "unsupported", why)
            elif rows and rows[0]["status"] != "ok":
                row = empty_row(m, "failed", "no fp32 reference to compare with (its row failed)")
            else:
                row, got = _spawn(m, cfg, source, device, work, bench.row_timeout_s)
                info = info or got
            rows.append(row)
            took = f" in {row['row_s']:.1f}s" if row["row_s"] is not None else ""
            print(f"bench quantize: {m} ({i + 1}/{len(methods)}) {row['status']}{took}",
                  file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = {"header": header(device, source, info, bench), "rows": rows}
    atomic_write_json(out / "quant_table.json", table)
    md = render_markdown(table)
    atomic_write_text(out / "quant_table.md", md)
    print(md)
    return table


# --------------------------------------------------------------------------- markdown


def _x(v: float | None, ref: float | None) -> str:
    return f" ({v / ref:.2f}x)" if v is not None and ref else ""


def _cells(r: dict[str, Any], ref: dict[str, Any], batches: list[str], gpu: bool) -> list[str]:
    if r["status"] != "ok":
        return ["—"] * (9 + len(batches) + gpu) + [f"{r['status']}: {r['reason']}"]
    rate = r["decode_tok_s"] or {}
    ref_rate = ref.get("decode_tok_s") or {}
    out = [f"{human_bytes(r['weight_bytes'])}{_x(r['weight_bytes'], ref.get('weight_bytes'))}",
           f"{human_bytes(r['peak_rss_bytes'])} (+{human_bytes(r['peak_rss_bytes'] - r['base_rss_bytes'])})"]
    if gpu:
        out.append(human_bytes(r["peak_gpu_bytes"]) if r["peak_gpu_bytes"] is not None else "—")
    out += [f"{r['load_s']:.2f}", f"{1e3 * r['ttft_s']:.1f}{_x(r['ttft_s'], ref.get('ttft_s'))}"]
    out += [f"{rate[b]:.0f}{_x(rate[b], ref_rate.get(b))}" if b in rate else "—" for b in batches]
    out += [f"{r['perplexity']:.3f}", f"{100 * r['exact_match']:.0f}%", f"{r['mean_prefix']:.1f}",
            f"{r['mean_kl']:.3g}", f"{r['row_s']:.1f}" if r["row_s"] is not None else "—",
            r["note"] or ""]
    return out


def render_markdown(table: dict[str, Any]) -> str:
    """The table as markdown: what was measured where, one row per method, and which methods
    buy memory with speed. Used for quant_table.md and by the pipeline report."""
    h, rows = table["header"], table["rows"]
    ref = next((r for r in rows if r["method"] == REFERENCE and r["status"] == "ok"), {})
    batches = [str(b) for b in h["batch_sizes"]]
    gpu = h["device"] == "cuda"
    v = h["versions"]
    where = (f"{h['gpu']} (CUDA); host {h['cpu']}" if gpu else f"CPU {h['cpu']}")
    env = "".join(f"; {k}={val}" for k, val in h["env"].items())
    params = f"{h['params'] / 1e6:.1f}M params, vocab {h['vocab']}" if h["params"] else "?"
    ref_mb = f", reference {h['reference_bytes'] / 2**20:.0f} MB" if h["reference_bytes"] else ""
    lines = [
        f"### Quantization: {h['model']} ({params})", "",
        f"- device: {where}, {h['threads']} thread{'s' if h['threads'] != 1 else ''}; CPU features {', '.join(h['cpu_features']) or 'unknown'}{env}",
        "- versions: " + ", ".join(f"{k} {val or 'not installed'}" for k, val in v.items()),
        f"- perplexity and KL(fp32 || method): {h['text']} ({h['text_docs']} documents, "
        f"{h['text_tokens']} tokens; KL at {h['kl_positions']} positions{ref_mb})",
        f"- greedy agreement with fp32: {h['prompts']} prompts, up to {h['agree_tokens']} tokens each",
        f"- speed: time to first token at batch 1; decode tok/s over "
        f"{h['decode_tokens']} greedy tokens; each the best of 3 runs; (Nx) = this row / fp32",
        "- each row in a fresh process; peak RSS includes reading the fp32 checkpoint, (+N) is "
        "its growth over the process before the load; speeds are of a machine that may be shared",
        "",
        "| method | weights | peak RSS |" + (" peak GPU |" if gpu else "") + " load s | TTFT ms | "
        + " | ".join(f"tok/s b{b}" for b in batches) + " | perplexity | greedy exact | "
        "common prefix | KL nats | row s | note |",
        "|---|" + "---:|" * (9 + len(batches) + gpu) + "---|",
    ]
    lines += [f"| {r['method']} | " + " | ".join(_cells(r, ref, batches, gpu)) + " |" for r in rows]
    lines += _verdict(rows, ref, batches[0] if batches else None)
    return "\n".join(lines) + "\n"


def _verdict(rows: list[dict[str, Any]], ref: dict[str, Any], b: str | None) -> list[str]:
    """The line the table exists for: which methods are smaller but slower than fp32."""
    if not ref or b is None:
        return []
    slower = [f"{r['method']} ({r['weight_bytes'] / ref['weight_bytes']:.2f}x bytes, "
              f"{r['decode_tok_s'][b] / ref['decode_tok_s'][b]:.2f}x tok/s at batch {b})"
              for r in rows if r["status"] == "ok" and r["method"] != REFERENCE
              and r["weight_bytes"] < ref["weight_bytes"]
              and r["decode_tok_s"].get(b, math.inf) < ref["decode_tok_s"][b]]
    return ["", "Smaller but slower than fp32 here (memory bought with speed): "
            + ", ".join(slower) + "."] if slower else []


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
