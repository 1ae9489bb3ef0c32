"""Prune stage: remove weights (magnitude, Wanda, 2:4) or attention heads and MLP neurons
(structured) from a trained model; save an ordinary HF directory plus a record of what went.

Reads top to bottom: check the settings, load, held-out perplexity, calibration windows, prune,
save final/ (+ prune.json), then perplexity again on final/ as loaded from disk: what ships.

Recovery is a short fine-tune from the pruned directory, and keeps an unstructured method's
zeros zero (compress/prune.py `MaskKeeper`):
    lmforge pretrain configs/pretrain/tiny.yaml model.path=runs/x/prune data.tokenizer=null
    lmforge sft configs/sft/tiny.yaml model.path=runs/x/prune
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmforge.compress.config import PruneCfg
from lmforge.compress.prune import (
    RECORD,
    block_linears,
    out_in,
    prune_structured,
    prune_unstructured,
    zero_share,
)
from lmforge.data.sources import iter_corpus
from lmforge.errors import UserError
from lmforge.io import human_bytes
from lmforge.models import count_params, load_model, resolve_model_dir, save_hf
from lmforge.tokenizer import load_tokenizer

# --------------------------------------------------------------------------- settings


def check(cfg: PruneCfg) -> str:
    """Refuse settings that contradict each other, before any loading. Returns what ranks the
    weights: "magnitude" or "wanda"."""
    if cfg.model.path is None:
        raise UserError("prune: set model.path (an HF dir, a stage dir or a hub id)")
    if cfg.scope == "global" and cfg.method != "magnitude":
        raise UserError(f"scope=global: only method=magnitude reads it ({cfg.method} ranks "
                        "weights within each matrix); remove it")
    fixed = {"magnitude": "magnitude", "wanda": "wanda"}.get(cfg.method)
    if fixed is not None and cfg.scores not in (None, fixed):
        raise UserError(f"scores={cfg.scores}: method={cfg.method} always ranks by {fixed}")
    scores = fixed or cfg.scores or ("wanda" if cfg.calibration.text is not None else "magnitude")
    if scores == "wanda" and cfg.calibration.text is None:
        how = "method=wanda" if cfg.method == "wanda" else f"method={cfg.method} with scores=wanda"
        raise UserError(f"calibration.text: {how} weighs each weight by its input activations; "
                        "set it to a corpus stage dir, a .txt or a .jsonl file")
    if cfg.method == "2:4" and cfg.sparsity != 0.5:
        raise UserError(f"sparsity={cfg.sparsity}: method=2:4 removes exactly 2 of every 4 "
                        "weights (sparsity 0.5)")
    if cfg.method != "structured" and (cfg.heads is not None or cfg.neurons is not None):
        raise UserError(f"heads / neurons: only method=structured reads them, not {cfg.method}")
    if cfg.method == "structured" and shares(cfg) == (0.0, 0.0):
        raise UserError("heads=0 and neurons=0: method=structured would remove nothing")
    for key, path in (("calibration.text", cfg.calibration.text), ("eval.text", cfg.eval.text)):
        if path is not None and not path.exists():
            raise UserError(f"{key}: {path} does not exist")
    return scores


def shares(cfg: PruneCfg) -> tuple[float, float]:
    """(heads, neurons) removed by structured pruning; unset ones follow `sparsity`."""
    return (cfg.sparsity if cfg.heads is None else cfg.heads,
            cfg.sparsity if cfg.neurons is None else cfg.neurons)


# --------------------------------------------------------------------------- text


def read_texts(path: Path, split: str, max_bytes: int, key: str) -> list[str]:
    """The first documents, up to `max_bytes`, of a corpus stage dir's `split`, a .txt file
    (one document) or .jsonl/.json rows' "text"."""
    from lmforge.eval.contamination import eval_texts_from_file

    if path.is_dir():
        return list(iter_corpus(path, split, max_bytes))
    if path.suffix == ".txt":
        try:
            return [path.read_bytes()[:max_bytes].decode("utf-8", errors="ignore")]
        except OSError as e:
            raise UserError(f"{key}: cannot read {path}: {e.strerror}") from None
    try:
        rows = [t for _, t in eval_texts_from_file(path, ["text"])]
    except UserError as e:
        raise UserError(f"{key}: {e}") from None
    out, seen = [], 0
    for t in rows:
        if seen >= max_bytes:
            break
        out.append(t)
        seen += len(t.encode("utf-8"))
    return out


def calibration_batches(tokenizer: PreTrainedTokenizerBase, cfg: PruneCfg) -> list[torch.Tensor]:
    """`samples` windows of `seq_len` tokens at random offsets (seeded) of the calibration
    text, documents joined by the eos token, in batches of 8 windows."""
    c = cfg.calibration
    assert c.text is not None
    texts = read_texts(c.text, "train", max(1 << 20, 8 * c.samples * c.seq_len), "calibration.text")
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = [i for t in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
           for i in [*t, *sep]]
    if len(ids) < c.seq_len:
        raise UserError(f"calibration.text: {c.text} gives {len(ids)} tokens, fewer than "
                        f"calibration.seq_len={c.seq_len}")
    starts = np.random.default_rng(cfg.seed).integers(0, len(ids) - c.seq_len + 1, size=c.samples)
    windows = torch.tensor([ids[s:s + c.seq_len] for s in starts.tolist()], dtype=torch.long)
    return list(windows.split(8))


def held_out(cfg: PruneCfg) -> tuple[list[str], str] | None:
    """(texts, where from) for perplexity: eval.text, else the calibration corpus's val split."""
    e, c = cfg.eval, cfg.calibration.text
    if e.text is not None:
        return read_texts(e.text, "val", e.max_bytes, "eval.text"), str(e.text)
    if c is not None and c.is_dir():
        return read_texts(c, "val", e.max_bytes, "calibration.text"), str(c / "val.jsonl")
    return None


def perplexity_of(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str],
                  cfg: PruneCfg) -> float:
    from lmforge.eval.text_metrics import max_positions, perplexity

    limit = max_positions(model)  # perplexity refuses a window longer than the model's
    length = min(cfg.eval.max_length, limit) if limit else cfg.eval.max_length
    return float(perplexity(model, tokenizer, texts, max_length=length)["perplexity"])


def weights_bytes(model_dir: str) -> int | None:
    d = Path(model_dir)
    return sum(f.stat().st_size for f in d.glob("*.safetensors")) if d.is_dir() else None


def nonzero_params(model: torch.nn.Module) -> int:
    seen = {id(p): p for p in model.parameters()}  # tied weights once
    return sum(int(torch.count_nonzero(p)) for p in seen.values())


# --------------------------------------------------------------------------- pruning


def prune(model: PreTrainedModel, cfg: PruneCfg, scores: str,
          batches: list[torch.Tensor] | None) -> dict[str, Any]:
    """Prune `model` in place as `cfg` says; returns the record saved as prune.json."""
    modules = block_linears(model)
    shapes = {n: list(out_in(m).shape) for n, m in modules.items()}
    params = count_params(model)[1]
    seq = cfg.calibration.sequential
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"method": cfg.method, "scores": scores}
    if cfg.method == "structured":
        heads, neurons = shares(cfg)
        rec.update(requested={"heads": heads, "neurons": neurons},
                   **prune_structured(model, heads, neurons, batches, seq))
        after = {n: list(out_in(m).shape) for n, m in modules.items()}
        kept = sum(a[0] * a[1] for a in after.values()) / sum(s[0] * s[1] for s in shapes.values())
        rec["sparsity"] = 1.0 - kept  # share of the block matrices' weights removed
        rec["matrices"] = {n: {"shape": shapes[n], "shape_after": after[n]} for n in modules}
    else:
        prune_unstructured(model, cfg.method, cfg.sparsity, cfg.scope, batches, seq)
        per, total = zero_share(modules)
        rec.update(requested=cfg.sparsity, sparsity=total,
                   matrices={n: {"shape": shapes[n], "sparsity": per[n]} for n in modules})
        if cfg.method == "magnitude":
            rec["scope"] = cfg.scope
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    rec["params_before"], rec["params_after"] = params, count_params(model)[1]
    rec["nonzero_params_after"] = nonzero_params(model)
    if batches is not None:
        c = cfg.calibration
        rec["calibration"] = {"text": str(c.text), "samples": c.samples, "seq_len": c.seq_len,
                              "tokens": sum(b.numel() for b in batches), "sequential": seq}
    return rec


def save_pruned(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rec: dict[str, Any],
                out: Path) -> None:
    """final/: the HF directory, its tokenizer and prune.json, written at once."""
    save_hf(model, out, tokenizer, extra={RECORD: json.dumps(rec, indent=1) + "\n"})


# --------------------------------------------------------------------------- main


def main(cfg: PruneCfg) -> dict[str, Any]:
    scores = check(cfg)
    src = resolve_model_dir(cfg.model.path)  # type: ignore[arg-type]
    tokenizer = load_tokenizer(src, cfg.model.trust_remote_code)
    model = load_model(src, trust_remote_code=cfg.model.trust_remote_code).eval()
    text = held_out(cfg)
    before: dict[str, Any] = {"params": count_params(model)[1], "weights_bytes": weights_bytes(src)}
    if text is not None:
        before["perplexity"] = perplexity_of(model, tokenizer, text[0], cfg)
    else:
        print("prune: no held-out text (set eval.text, or calibration.text to a corpus dir): "
              "perplexity not measured")
    batches = calibration_batches(tokenizer, cfg) if scores == "wanda" else None
    with torch.no_grad():
        rec = prune(model, cfg, scores, batches)
    final = cfg.run.dir / "final"
    save_pruned(model, tokenizer, rec, final)
    # measured on final/ as a user loads it: proves the config describes the smaller matrices
    shipped = load_model(final).eval()
    after: dict[str, Any] = {"params": count_params(shipped)[1], "nonzero_params": nonzero_params(shipped),
                             "weights_bytes": weights_bytes(str(final))}
    if text is not None:
        after["perplexity"] = perplexity_of(shipped, tokenizer, text[0], cfg)
    print(f"prune: {cfg.method} ({scores} scores) removed {rec['sparsity']:.1%} of "
          f"{len(rec['matrices'])} block matrices in {rec['seconds']:.1f}s; params "
          f"{before['params']:,} -> {after['params']:,} ({after['nonzero_params']:,} nonzero)"
          + (f"; perplexity {before['perplexity']:.2f} -> {after['perplexity']:.2f}" if text else "")
          + (f"; weights {human_bytes(before['weights_bytes'])} -> {human_bytes(after['weights_bytes'])}"
             if before["weights_bytes"] else ""))
    return {
        "model_type": shipped.config.model_type,
        "method": cfg.method,
        "scores": scores,
        "sparsity_requested": rec["requested"],
        "sparsity": rec["sparsity"],
        "config_changes": rec.get("config"),
        "before": before,
        "after": after,
        "held_out": text[1] if text else None,
        "calibration": rec.get("calibration"),
        "prune_seconds": rec["seconds"],
        "keeps_mask_in_recovery": cfg.method != "structured",
        "final_dir": str(final),
    }
