"""Supervised fine-tuning: chat data -> template -> assistant-only loss, packed rows, full
fine-tuning or LoRA / DoRA / QLoRA, with forgetting measured and optionally held back.

Reads top to bottom: model and template, data, forgetting controls, the step, the loop, then
the evaluations the summary reports (task pass@1 and general perplexity, before and after).
"""

from __future__ import annotations

import copy
import zlib
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmforge.chat import (
    ChatFormat,
    install_format,
    mark_loss_tokens,
    render,
    resolve_format,
    stop_token_ids,
)
from lmforge.compress.prune import keep_zeros, masked_record
from lmforge.config import DpoCfg, KtoCfg, SftCfg
from lmforge.data.chat_rows import Conversation, load_conversations
from lmforge.data.sft import SftBatches, fit_length, lm_logits
from lmforge.errors import UserError
from lmforge.io import append_jsonl
from lmforge.losses.lm import causal_lm_loss, token_kl, token_mean
from lmforge.models import (
    adapter_export,
    add_rows_for_new_tokens,
    apply_lora,
    build_model,
    config_summary,
    load_model,
    load_quantized,
    resolve_model_dir,
)
from lmforge.tokenizer import load_tokenizer
from lmforge.train import distributed
from lmforge.train.forgetting import Anchor, GeneralText, fisher_diagonal, merge_rows, perplexity
from lmforge.train.loop import Task, train
from lmforge.train.precision import make_precision
from lmforge.unsloth_backend import load_unsloth, max_seq_length, training_device, vllm_share

SYNTHETIC = "synthetic_code"
MBPP = "mbpp"  # `mbpp` (the hub's copy) or `mbpp:SOURCE` (a file, directory or hub id)


# --------------------------------------------------------------------------- model + template


def load_tokenizer_and_format(cfg: SftCfg) -> tuple[PreTrainedTokenizerBase, ChatFormat, list[str]]:
    src = cfg.model.path or cfg.data.tokenizer
    if src is None:
        raise UserError("sft: set model.path (a pretrained model) or data.tokenizer with model.preset")
    tokenizer = load_tokenizer(src, cfg.model.trust_remote_code)
    fmt = resolve_format(tokenizer, cfg.data.template)
    added = install_format(tokenizer, fmt)
    if tokenizer.pad_token_id is None:  # padding needs an id; it is never a target
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, fmt, added


def load_sft_model(cfg: SftCfg, tokenizer: PreTrainedTokenizerBase,
                   fmt: ChatFormat) -> PreTrainedModel:
    method = cfg.lora.method
    if method != "full" and cfg.model.path is None:
        raise UserError(f"lora.method={method} adapts a pretrained model: set model.path")
    if cfg.train.backend == "unsloth":  # Unsloth's loader and LoRA (unsloth_backend.py)
        return load_unsloth(cfg.model.path, cfg.lora, max_seq_length(cfg),
                            n_vocab=len(tokenizer), stop_ids=stop_token_ids(tokenizer, fmt),
                            new_token_ids=[tokenizer.convert_tokens_to_ids(t) for t in fmt.special_tokens],
                            pad_id=tokenizer.pad_token_id, seed=cfg.train.seed,
                            trust_remote_code=cfg.model.trust_remote_code,
                            vllm_share=vllm_share(cfg))
    if method == "qlora":
        model = load_quantized(resolve_model_dir(cfg.model.path), cfg.lora, cfg.model.trust_remote_code)
    else:
        model = build_model(cfg.model, tokenizer, seed=cfg.train.seed)
    add_rows_for_new_tokens(model, len(tokenizer))
    # generation (HF, vLLM) stops at the template's end-of-turn token, saved with the model
    model.generation_config.eos_token_id = stop_token_ids(tokenizer, fmt)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if method == "full":
        return model
    template_ids = [tokenizer.convert_tokens_to_ids(t) for t in fmt.special_tokens]
    return apply_lora(model, cfg.lora, template_ids, cfg.model.gradient_checkpointing)


# --------------------------------------------------------------------------- data


def _hash_split(convs: list[Conversation], fraction: float) -> tuple[list[Conversation], list[Conversation]]:
    """Deterministic train/val split by a hash of the content (stable across runs and order)."""
    train, val = [], []
    for c in convs:
        key = "\x00".join(m["content"] for m in c.messages).encode()
        (val if zlib.crc32(key) / 2**32 < fraction else train).append(c)
    return train, val


def _is_mbpp(spec: str) -> bool:
    return spec == MBPP or spec.startswith(MBPP + ":")


def _mbpp_conversations(spec: str, split: str, key: str,
                        limit: int | None = None) -> list[Conversation]:
    """MBPP items as conversations whose user turn is the zero-shot eval prompt; any problem
    with the source is one line that names the key it came from."""
    from lmforge.tasks.mbpp import SPLITS, sft_conversations

    if split not in SPLITS:
        raise UserError(f"data.split={split!r} is not an MBPP split (expected {', '.join(SPLITS)})")
    source = spec.partition(":")[2]
    if spec != MBPP and not source.strip():
        raise UserError(f"{key}={spec!r}: give the MBPP file, directory or hub id after "
                        f"'{MBPP}:', or write {MBPP} for the hub's copy")
    try:
        return sft_conversations(source or None, split=split, limit=limit)
    except UserError as e:
        raise UserError(f"{key}={spec}: {e}") from None


def load_data(cfg: SftCfg, splits: Any = None) -> tuple[list[list[dict[str, str]]], list[list[dict[str, str]]], dict[str, Any]]:
    d = cfg.data
    if d.train is None:
        raise UserError(f"sft: set data.train (a .jsonl/.json file, a hub dataset id, {SYNTHETIC} "
                        f"or {MBPP}[:SOURCE])")
    if d.val is not None and _is_mbpp(d.val) and _is_mbpp(d.train) and d.split == "validation":
        raise UserError("data.val: MBPP validation items are already the training data "
                        "(data.split=validation); give data.val another source")
    stats: dict[str, Any] = {}
    if d.train == SYNTHETIC:
        train_p = splits.train
        convs = [Conversation(({"role": "user", "content": p.prompt},
                               {"role": "assistant", "content": p.solution}), p.task_id)
                 for p in train_p]
        stats["rows"] = {"source": SYNTHETIC, "rows": len(convs), "kept": len(convs)}
    elif _is_mbpp(d.train):
        convs = _mbpp_conversations(d.train, d.split, "data.train", d.limit)
        stats["rows"] = {"source": d.train, "split": d.split, "rows": len(convs), "kept": len(convs)}
    else:
        convs, st = load_conversations(d.train, d.format, split=d.split,
                                       skip_invalid=d.skip_invalid, limit=d.limit)
        stats["rows"] = {"source": d.train, "format": st.format, "rows": st.rows, "kept": st.kept,
                         "skipped": st.skipped}
    if d.val is not None and _is_mbpp(d.val):
        # Held-out MBPP items are upstream's validation split (511-600), whatever data.split
        # trains on; it does not overlap the test split (11-510) the eval reads by default.
        val = _mbpp_conversations(d.val, "validation", "data.val")
        stats["val_rows"] = {"source": d.val, "split": "validation", "kept": len(val)}
        train_c = convs
    elif d.val is not None:
        val, st = load_conversations(d.val, d.format, split=d.split, skip_invalid=d.skip_invalid)
        stats["val_rows"] = {"source": d.val, "kept": st.kept, "skipped": st.skipped}
        train_c = convs
    else:
        train_c, val = _hash_split(convs, d.val_fraction)
    as_msgs = lambda cs: [list(c.messages) for c in cs]  # noqa: E731
    return as_msgs(train_c), as_msgs(val), stats


def build_batches(convs: list[list[dict[str, str]]], tokenizer: PreTrainedTokenizerBase,
                  cfg: SftCfg, what: str) -> tuple[SftBatches, dict[str, Any]]:
    d = cfg.data
    examples, fit = fit_length(render(tokenizer, convs, d.train_on_prompt), d.max_length, d.truncation)
    if not examples:
        raise UserError(f"sft: no {what} example fits data.max_length={d.max_length} "
                        f"({fit.dropped_overlong} too long, {fit.dropped_no_loss} without answer tokens)")
    b = SftBatches(examples, d.max_length, d.packing, cfg.train.seed, tokenizer.pad_token_id)
    return b, {"examples": fit.examples, "truncated": fit.truncated,
               "dropped_overlong": fit.dropped_overlong, "dropped_no_loss": fit.dropped_no_loss,
               "rows": len(b.rows), "row_fill": round(b.fill, 4),
               "loss_tokens": sum(sum(e.loss_mask[1:]) for e in examples)}


def preview(cfg: SftCfg, n: int) -> None:
    """Print `n` rendered training examples; [[...]] marks the tokens the loss sees."""
    tokenizer, fmt, _ = load_tokenizer_and_format(cfg)
    convs, _, _ = load_data(cfg, task_splits(cfg))
    print(f"template: {fmt.name}; loss on {'every token' if cfg.data.train_on_prompt else '[[assistant]] tokens'}")
    for i, r in enumerate(render(tokenizer, convs[:n], cfg.data.train_on_prompt)):
        print(f"----- example {i} ({len(r.ids)} tokens, {sum(r.loss_mask)} in the loss)")
        print(mark_loss_tokens(tokenizer, r))


# --------------------------------------------------------------------------- the task


def sft_task(model: PreTrainedModel, train_b: SftBatches, val_b: SftBatches, cfg: SftCfg,
             device: torch.device, general: GeneralText | None, pad_id: int,
             anchor: Anchor | None) -> Task:
    t, f = cfg.train, cfg.forgetting
    n_replay = replay_rows(cfg)
    if n_replay and general is None:
        raise UserError("forgetting.replay_fraction needs forgetting.general (a corpus stage dir)")
    ref = None
    if f.kl_coef and cfg.lora.method == "full":  # adapters get their base back by disabling
        ref = copy.deepcopy(model).eval().requires_grad_(False)

    def ref_logits(b: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            if ref is not None:
                return lm_logits(ref, b)
            with model.disable_adapter():  # type: ignore[attr-defined]
                return lm_logits(model, b)

    def step(b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        b = {k: v.to(device) for k, v in b.items()}
        logits = lm_logits(model, b)  # (B, T, V)
        loss, _ = causal_lm_loss(logits, b["targets"], b["loss_mask"])
        metrics: dict[str, float] = {"lm_loss": float(loss.detach())}
        if f.kl_coef:
            kl, _ = token_kl(logits, ref_logits(b), b["valid"])
            loss = loss + f.kl_coef * kl
            metrics["kl"] = float(kl.detach())
        if anchor is not None:
            pen, m = anchor.penalty()
            loss = loss + pen
            metrics.update(m)
        return loss, metrics

    def batches(n: int) -> list[dict[str, torch.Tensor]]:
        micro = train_b.micro_batches(n, t.micro_batch_size - n_replay, t.grad_accum)
        if not n_replay:
            return micro
        return [merge_rows(m, general.replay_rows(t.seed, n * t.grad_accum + i, n_replay), pad_id)  # type: ignore[union-attr]
                for i, m in enumerate(micro)]

    val_batches = val_b.eval_batches(t.micro_batch_size)

    def answer_loss(b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        b = {k: v.to(device) for k, v in b.items()}
        return causal_lm_loss(lm_logits(model, b), b["targets"], b["loss_mask"])

    def evaluate() -> dict[str, float]:
        out = {"val_loss": token_mean(val_batches, answer_loss)}
        if general is not None:
            out["general_ppl"] = perplexity(model, general.val, f.eval_batches, t.micro_batch_size, device)
        return out

    ntok = lambda b: float(b["loss_mask"].sum())  # noqa: E731
    return Task(step=step, batches=batches, weight=ntok, tokens=lambda b: int(b["valid"].sum()),
                evaluate=evaluate)


def replay_rows(cfg: SftCfg) -> int:
    """Rows of general text in each micro-batch (the rest are fine-tuning rows)."""
    f, micro = cfg.forgetting, cfg.train.micro_batch_size
    if not f.replay_fraction:
        return 0
    n = max(1, round(f.replay_fraction * micro))
    if n >= micro:
        raise UserError(f"forgetting.replay_fraction={f.replay_fraction} leaves no fine-tuning "
                        f"rows in a micro-batch of {micro}; lower it or raise train.micro_batch_size")
    return n


def forgetting_setup(cfg: SftCfg, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                     device: torch.device) -> tuple[GeneralText | None, Anchor | None]:
    """The general text (monitor, replay, Fisher) and the weight anchor (L2-SP or EWC)."""
    f = cfg.forgetting
    general = (GeneralText.from_corpus(f.general, tokenizer, cfg.run.dir / "general", f.seq_len)
               if f.general is not None else None)
    if f.ewc_coef:
        if general is None:
            raise UserError("forgetting.ewc_coef needs forgetting.general (base-model data for the Fisher)")
        params = [p for p in model.parameters() if p.requires_grad]
        fisher = fisher_diagonal(model, params, general.train, f.fisher_batches, cfg.train.seed, device)
        return general, Anchor.of(model, f.ewc_coef, fisher)
    return general, Anchor.of(model, f.l2sp_coef) if f.l2sp_coef else None


# --------------------------------------------------------------------------- main


def main(cfg: SftCfg) -> dict[str, Any]:
    device = training_device("sft", cfg.train)
    # a model pruned with an unstructured method keeps its zeros (an adapter cannot: refused)
    pruned_rec = masked_record(cfg.model.path, cfg.lora.method)
    tokenizer, fmt, added = load_tokenizer_and_format(cfg)
    splits = task_splits(cfg)
    train_c, val_c, data_stats = load_data(cfg, splits)
    if not val_c:
        raise UserError("sft: the validation split is empty; raise data.val_fraction or set data.val")
    train_b, data_stats["train"] = build_batches(train_c, tokenizer, cfg, "training")
    val_b, data_stats["val"] = build_batches(val_c, tokenizer, cfg, "validation")
    model = load_sft_model(cfg, tokenizer, fmt).to(device)
    info = config_summary(model)
    sft_micro = cfg.train.micro_batch_size - replay_rows(cfg)
    print(f"sft: {cfg.lora.method} on {info['model_type']}, template {fmt.name}"
          f"{' (+' + ', '.join(added) + ')' if added else ''}; trainable {info['trainable_params']:,} "
          f"of {info['params']:,} params ({info['trainable_params'] / info['params']:.2%}); "
          f"{len(train_b.rows):,} rows of {data_stats['train']['examples']:,} examples, "
          f"{train_b.epochs(cfg.train.max_steps, sft_micro, cfg.train.grad_accum):.2f} epochs")

    general, anchor = forgetting_setup(cfg, model, tokenizer, device)
    precision = make_precision(cfg.train.precision, device.type)  # the loop logs the choice

    def general_ppl(m: PreTrainedModel) -> dict[str, float]:
        if general is None:
            return {}
        with precision.autocast():
            return {"general_ppl": perplexity(m, general.val, cfg.forgetting.eval_batches,
                                              cfg.train.micro_batch_size, device)}

    before: dict[str, Any] = general_ppl(model)
    if splits is not None and cfg.eval.task == SYNTHETIC and cfg.eval.before:
        before["pass_at_1"] = pass_at_1(model, tokenizer, fmt, splits, cfg, precision, "before",
                                         cfg.eval.before_n)

    task = sft_task(model, train_b, val_b, cfg, device, general, tokenizer.pad_token_id, anchor)
    task.export = adapter_export(cfg.lora.method, cfg.model.path, tokenizer)
    keeper = keep_zeros(task, model, pruned_rec, "sft", cfg.train.parallel)
    res = train(cfg.train, cfg.optim, cfg.log, cfg.run.dir, model, task, tokenizer)
    pruned = keeper.finish(res.final_dir, "sft", res.steps) if keeper is not None else None

    # everything "after" is measured on what was shipped: final/ as loaded from disk
    final_model = load_model(res.final_dir).to(device)
    final_tok = load_tokenizer(res.final_dir)
    after: dict[str, Any] = general_ppl(final_model)
    if splits is not None and cfg.eval.task == SYNTHETIC:
        after["pass_at_1"] = pass_at_1(final_model, final_tok, fmt, splits, cfg, precision, "after",
                                       cfg.eval.after_n)
    return {
        **info,
        "method": cfg.lora.method,
        "template": fmt.name,
        "added_tokens": added,
        "data": data_stats,
        **res.facts(),
        "epochs": round(train_b.epochs(res.steps, sft_micro, cfg.train.grad_accum), 3),
        "final_train_loss": res.last.get("lm_loss", res.last.get("loss")),
        "final_val_loss": res.best_val_loss,
        "before": before,
        "after": after,
        "nonfinite_skipped": res.nonfinite_skipped,
        **({"pruned": pruned} if pruned is not None else {}),
        "final_dir": str(res.final_dir),
    }


def task_splits(cfg: SftCfg | DpoCfg | KtoCfg) -> Any:
    """The synthetic task's splits when it is trained on or evaluated (built once: ~3 s)."""
    if cfg.eval.task != SYNTHETIC and cfg.data.train != SYNTHETIC:
        return None
    from lmforge.tasks.synthetic_code import make_splits

    t = cfg.task
    return make_splits(t.seed, t.n_train, t.n_eval)


def pass_at_1(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, fmt: ChatFormat,
               splits: Any, cfg: SftCfg | DpoCfg | KtoCfg, precision: Any, when: str,
               limit: int | None = None) -> dict[str, Any]:
    from lmforge.eval.codegen import eval_splits

    summary, rows = eval_splits(model, tokenizer, splits, stop_token_ids(tokenizer, fmt),
                                cfg.eval, precision.autocast(), limit)
    path = cfg.run.dir / f"eval_{when}.jsonl"
    if distributed.current().main:  # under torchrun every rank evaluates alike; one writes
        path.unlink(missing_ok=True)
        for r in rows:
            append_jsonl(path, r)
    groups = ", ".join(f"{k} {summary[k]:.1%}" for k in summary["n_per_group"])
    print(f"{cfg.run.dir.name}: pass@1 {when}: {groups} ({summary['seconds']:.0f}s)")
    return summary
