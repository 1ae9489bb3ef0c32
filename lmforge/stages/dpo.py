"""Direct preference optimisation and its family: DPO, IPO, conservative and robust DPO, SLiC
hinge, SimPO, ORPO, each optionally with RPO's NLL term; picked by the typed `loss` field.

Reads top to bottom: model and template, preference data, the reference (precomputed and
cached by default, see train/reference.py), the step (chosen and rejected in one packed
forward), the loop, then held-out pass@1 of what was shipped.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmforge.chat import ChatFormat
from lmforge.config import DpoCfg, KtoCfg
from lmforge.data.preference import (
    PairBatches,
    UnpairedBatches,
    hash_split,
    load_pairs,
    load_unpaired,
    tokenize_pairs,
    tokenize_unpaired,
)
from lmforge.errors import UserError
from lmforge.io import read_jsonl
from lmforge.losses.preference import REFERENCE_FREE, PairLogps, paired_loss
from lmforge.models import (
    adapter_export,
    config_summary,
    disable_dropout,
    load_model,
    resolve_model_dir,
)
from lmforge.stages.sft import (
    SYNTHETIC,
    load_sft_model,
    load_tokenizer_and_format,
    pass_at_1,
    task_splits,
)
from lmforge.tokenizer import load_tokenizer
from lmforge.train import distributed
from lmforge.train.loop import Result, Task, train
from lmforge.train.precision import Precision, make_precision
from lmforge.train.reference import (
    Layout,
    Reference,
    batch_logps,
    cached_tables,
    data_digest,
    live_reference,
)
from lmforge.unsloth_backend import training_device

PrefCfg = DpoCfg | KtoCfg
Batches = PairBatches | UnpairedBatches

# --------------------------------------------------------------------------- model + data


def load_policy(cfg: PrefCfg) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ChatFormat]:
    """The policy, as SFT loads a model (template, LoRA/QLoRA), with dropout off: the loss
    compares the policy with a reference run without dropout, and at policy == reference a
    dropout mask alone would move the first step's loss off its exact value (ln 2 for DPO)."""
    if cfg.model.path is None:
        raise UserError("set model.path: preference optimisation starts from a trained model "
                        "(usually an SFT one)")
    tokenizer, fmt, _ = load_tokenizer_and_format(cfg)  # type: ignore[arg-type]
    model = load_sft_model(cfg, tokenizer, fmt)  # type: ignore[arg-type]
    disable_dropout(model)
    return model, tokenizer, fmt


def load_examples(cfg: PrefCfg, tokenizer: PreTrainedTokenizerBase, unpaired: bool
                  ) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """Tokenized train and validation examples (pairs, or unpaired rows for KTO) + stats."""
    d = cfg.data
    if d.train is None:
        raise UserError("set data.train: a preference .jsonl/.json file, a hub dataset id, or a "
                        "`lmforge synth pairs` run dir")
    load = load_unpaired if unpaired else load_pairs
    tokenize = tokenize_unpaired if unpaired else tokenize_pairs
    rows, st = load(d.train, d.format, split=d.split, skip_invalid=d.skip_invalid, limit=d.limit)
    stats: dict[str, Any] = {"rows": dataclasses.asdict(st)}
    if d.val is not None:
        val_rows, vst = load(d.val, d.format, split=d.split, skip_invalid=d.skip_invalid)
        stats["val_rows"] = dataclasses.asdict(vst)
        train_rows = rows
    else:
        train_rows, val_rows = hash_split(rows, d.val_fraction)
    train_ex, stats["train"] = tokenize(tokenizer, train_rows, d.max_length, d.truncation)
    val_ex, stats["val"] = tokenize(tokenizer, val_rows, d.max_length, d.truncation)
    if not train_ex:
        raise UserError(f"{d.train}: no training example is left after tokenizing "
                        f"({stats['train']}); raise data.max_length or check the rows")
    if not val_ex:
        raise UserError(f"{d.train}: the validation split is empty; raise data.val_fraction "
                        "or set data.val")
    return train_ex, val_ex, stats


def make_batches(cfg: PrefCfg, examples: list[Any], pad_id: int, unpaired: bool) -> Batches:
    cls = UnpairedBatches if unpaired else PairBatches
    return cls(examples, cfg.data.max_length, cfg.data.packing, cfg.train.seed, pad_id)


# --------------------------------------------------------------------------- the reference


def setup_reference(cfg: PrefCfg, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                    data: dict[str, tuple[Batches, list[Any]]], layout: Layout,
                    device: torch.device, precision: Precision) -> Reference:
    """Precomputed and cached (default), or live: see train/reference.py."""
    explicit = None
    if cfg.ref.model is not None:
        explicit = load_model(cfg.ref.model, cfg.model.trust_remote_code).to(device)
        if explicit.get_input_embeddings().num_embeddings < len(tokenizer):
            raise UserError(f"ref.model {cfg.ref.model}: its vocabulary is smaller than the "
                            "policy's tokenizer; the reference must share the policy's tokens")
    if not cfg.ref.precompute:
        live, how = live_reference(model, explicit, cfg.lora.method != "full")
        return Reference(layout, live=live, how=how)
    source = explicit if explicit is not None else model
    micro = cfg.train.micro_batch_size
    datasets = {split: (b.eval_batches(micro), len(ex), data_digest(_seqs(ex)))
                for split, (b, ex) in data.items()}
    key = {"template": str(tokenizer.chat_template), "precision": precision.name,
           "seed": str(cfg.train.seed) if layout == "halves" else ""}  # KL partners are seeded
    for _ in distributed.main_first(distributed.current()):  # the others read rank 0's cache
        tables = cached_tables(source, datasets, layout, cfg.ref.cache_dir or cfg.run.dir / "ref_cache",
                               key, device, precision.autocast, print)
    what = f"ref.model {cfg.ref.model}" if explicit is not None else "the starting policy"
    del explicit  # nothing of the reference stays in memory while training
    return Reference(layout, tables=tables, how=f"{what}, precomputed once and cached")


def _seqs(examples: list[Any]) -> list[list[list[int]]]:
    """Every token list of every example, for the cache key."""
    return [[v for v in dataclasses.astuple(e) if isinstance(v, list)] +
            [[int(getattr(e, "desirable", 0))]] for e in examples]


# --------------------------------------------------------------------------- the task


def dpo_task(model: PreTrainedModel, train_b: PairBatches, val_b: PairBatches,
             ref: Reference | None, cfg: DpoCfg, device: torch.device) -> Task:
    kw = {"beta": cfg.beta, "label_smoothing": cfg.label_smoothing,
          "simpo_gamma": cfg.simpo_gamma, "orpo_lambda": cfg.orpo_lambda,
          "rpo_alpha": cfg.rpo_alpha}

    def pair_loss(b: dict[str, torch.Tensor], split: str) -> tuple[torch.Tensor, dict[str, float]]:
        b = {k: v.to(device) for k, v in b.items()}
        logps, ntok = batch_logps(model, b)  # (2P,): chosen, rejected interleaved
        r = ref.logps(b, split) if ref is not None else None
        p = PairLogps(logps[0::2], logps[1::2], ntok[0::2], ntok[1::2],
                      None if r is None else r[0::2], None if r is None else r[1::2])
        loss, m = paired_loss(cfg.loss, p, **kw)
        m["len/chosen"] = float(ntok[0::2].mean())
        m["len/rejected"] = float(ntok[1::2].mean())
        if r is not None:  # the data's mean log pi/pi_ref: an implicit, not a sampled, KL
            m["kl/implicit"] = float((logps.detach() - r).mean())
        return loss, m

    return preference_task(pair_loss, train_b, val_b, cfg)


def preference_task(loss_of: Any, train_b: Batches, val_b: Batches, cfg: PrefCfg) -> Task:
    """The loop's Task for a `loss_of(batch, split)`: a micro-batch weighs its number of
    examples (every preference loss is a mean over them), validation on every held-out one."""
    val_batches = val_b.eval_batches(cfg.train.micro_batch_size)
    return Task(step=lambda b: loss_of(b, "train"),
                batches=lambda n: train_b.micro_batches(n, cfg.train.micro_batch_size,
                                                        cfg.train.grad_accum),
                weight=lambda b: float(b["index"].numel()),
                tokens=lambda b: int(b["valid"].sum()),
                evaluate=lambda: val_metrics(val_batches, lambda b: loss_of(b, "val")))


def val_metrics(batches: list[dict[str, torch.Tensor]], loss_of: Any) -> dict[str, float]:
    """Held-out loss and metrics, each a mean over examples (batches weighed by their size)."""
    sums: dict[str, float] = {}
    n = 0.0
    for b in batches:
        loss, m = loss_of(b)
        w = float(b["index"].numel())
        for k, v in {"loss": float(loss), **m}.items():
            sums[k] = sums.get(k, 0.0) + v * w
        n += w
    return {f"val_{k.replace('/', '_')}" if k != "loss" else "val_loss": v / max(n, 1.0)
            for k, v in sums.items()}


# --------------------------------------------------------------------------- main


def run_preference(cfg: PrefCfg, unpaired: bool,
                   make_task: Any) -> dict[str, Any]:
    """What DPO and KTO share: load, reference, train, measure what was shipped."""
    device = training_device("kto" if unpaired else "dpo", cfg.train)
    model, tokenizer, fmt = load_policy(cfg)
    model.to(device)
    train_ex, val_ex, data_stats = load_examples(cfg, tokenizer, unpaired)
    pad = tokenizer.pad_token_id
    train_b = make_batches(cfg, train_ex, pad, unpaired)
    val_b = make_batches(cfg, val_ex, pad, unpaired)
    info = config_summary(model)
    precision = make_precision(cfg.train.precision, device.type)
    needs_ref = unpaired or cfg.loss not in REFERENCE_FREE  # type: ignore[union-attr]
    ref = (setup_reference(cfg, model, tokenizer, {"train": (train_b, train_ex), "val": (val_b, val_ex)},
                           "halves" if unpaired else "interleaved", device, precision)
           if needs_ref else None)
    print(f"{cfg.run.dir.name}: {cfg.lora.method} on {info['model_type']}, trainable "
          f"{info['trainable_params']:,} of {info['params']:,} params; {len(train_ex):,} train / "
          f"{len(val_ex):,} val examples, {train_b.epochs(cfg.train.max_steps, cfg.train.micro_batch_size, cfg.train.grad_accum):.2f} "
          f"epochs; reference: {ref.how if ref else 'none (reference-free loss)'}")
    task = make_task(model, train_b, val_b, ref, cfg, device)
    task.export = adapter_export(cfg.lora.method, cfg.model.path, tokenizer)
    res = train(cfg.train, cfg.optim, cfg.log, cfg.run.dir, model, task, tokenizer)
    return {**info, "method": cfg.lora.method, "data": data_stats, **res.facts(),
            "reference": None if not needs_ref else cfg.ref.model or "starting policy",
            "first_step": _first_step(cfg), "last": _rounded(res.last),
            "final_val": _final_val(cfg, res), "epochs": round(train_b.epochs(
                res.steps, cfg.train.micro_batch_size, cfg.train.grad_accum), 3),
            "nonfinite_skipped": res.nonfinite_skipped, "final_dir": str(res.final_dir),
            **heldout_pass_at_1(cfg, fmt, precision, res, device)}


def _first_step(cfg: PrefCfg) -> dict[str, float]:
    """The first step's own row (its loss at policy == reference: ln 2 for DPO)."""
    rows = [r for r in read_jsonl(cfg.run.dir / "metrics.jsonl") if r.get("step") == 1 and "loss" in r]
    return _rounded(rows[0]) if rows else {}


def _final_val(cfg: PrefCfg, res: Result) -> dict[str, float]:
    rows = [r for r in read_jsonl(cfg.run.dir / "metrics.jsonl") if "val_loss" in r]
    return _rounded(min(rows, key=lambda r: r["val_loss"]) if cfg.train.final == "best" and rows
                    else rows[-1]) if rows else {}


def _rounded(row: dict[str, Any]) -> dict[str, Any]:
    # six significant digits: a learning rate of 3e-6 must not read as 0
    return {k: float(f"{v:.6g}") if isinstance(v, float) and math.isfinite(v) else v
            for k, v in row.items() if k not in ("step_s", "step_tokens")}


def heldout_pass_at_1(cfg: PrefCfg, fmt: ChatFormat, precision: Precision, res: Result,
                      device: torch.device) -> dict[str, Any]:
    """Greedy pass@1 on the synthetic task's held-out problems, of final/ as loaded from disk
    (and of the starting policy with eval.before), the same measurement SFT reports."""
    if cfg.eval.task != SYNTHETIC:
        return {}
    splits = task_splits(cfg)
    out: dict[str, Any] = {}
    if cfg.eval.before:
        start = load_model(resolve_model_dir(cfg.model.path)).to(device)  # type: ignore[arg-type]
        out["before"] = {"pass_at_1": pass_at_1(start, load_tokenizer(resolve_model_dir(cfg.model.path)),  # type: ignore[arg-type]
                                                fmt, splits, cfg, precision, "before", cfg.eval.after_n)}
        del start
    final = load_model(res.final_dir).to(device)
    out["after"] = {"pass_at_1": pass_at_1(final, load_tokenizer(res.final_dir), fmt, splits, cfg,
                                           precision, "after", cfg.eval.after_n)}
    return out


def main(cfg: DpoCfg) -> dict[str, Any]:
    summary = run_preference(cfg, False, dpo_task)
    return {"loss": cfg.loss, "beta": cfg.beta, "rpo_alpha": cfg.rpo_alpha, **summary}
