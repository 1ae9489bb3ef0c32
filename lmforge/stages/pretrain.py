"""Pretrain stage: pack the corpus with the tokenizer, train a causal LM with the one loop.

Reports the final validation loss next to the unigram entropy of the validation tokens: the
loss of a model that ignores context. How far below it the model gets is what it learned.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lmforge.compress.prune import keep_zeros, masked_record
from lmforge.config import PretrainCfg
from lmforge.data.pack import TokenWindows, pack_corpus, unigram_entropy
from lmforge.errors import UserError
from lmforge.losses.lm import causal_lm_loss, token_mean
from lmforge.models import build_model, config_summary, flops_per_token
from lmforge.tokenizer import load_tokenizer, resolve_tokenizer_dir
from lmforge.train import distributed
from lmforge.train.loop import Task, train


def lm_task(model: torch.nn.Module, train_w: TokenWindows, val_w: TokenWindows,
            cfg: PretrainCfg, device: torch.device, flops: float) -> Task:
    t = cfg.train
    val_batches = val_w.eval_batches(t.eval_batches, t.micro_batch_size)

    def loss_of(batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        batch = batch.to(device)
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits  # (B, T, V)
        return causal_lm_loss(logits, batch[:, 1:])

    def step(batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        return loss_of(batch)[0], {}

    def batches(n: int) -> list[torch.Tensor]:
        full = train_w.batch(t.seed, n, t.micro_batch_size * t.grad_accum)  # (B*A, T+1)
        return list(full.split(t.micro_batch_size))

    def evaluate() -> dict[str, float]:
        return {"val_loss": token_mean(val_batches, loss_of)}

    ntok = lambda b: b.size(0) * (b.size(1) - 1)  # noqa: E731
    return Task(step=step, batches=batches, weight=ntok, tokens=ntok, evaluate=evaluate,
                flops_per_token=flops)


def main(cfg: PretrainCfg) -> dict[str, Any]:
    d = cfg.data
    if d.corpus is None:
        raise UserError("pretrain: set data.corpus to a corpus stage directory")
    tok_src = d.tokenizer or cfg.model.path
    if tok_src is None:
        raise UserError("pretrain: set data.tokenizer (or model.path to a dir with a tokenizer)")
    tokenizer = load_tokenizer(tok_src, cfg.model.trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise UserError(f"pretrain: tokenizer {tok_src} has no eos token to separate documents")
    tok_dir = resolve_tokenizer_dir(d.tokenizer) if d.tokenizer else None
    for _ in distributed.main_first(distributed.current()):  # the others reuse rank 0's pack
        manifest = pack_corpus(d.corpus, tokenizer.backend_tokenizer, len(tokenizer),
                               tokenizer.eos_token_id, cfg.run.dir / "data",
                               tok_dir / "tokenizer.json" if tok_dir else None)
    pack_dir = cfg.run.dir / "data"
    train_w = TokenWindows.from_manifest(pack_dir, "train", d.seq_len)
    val_w = TokenWindows.from_manifest(pack_dir, "val", d.seq_len)
    print(f"pretrain: {manifest['splits']['train']['tokens']:,} train / "
          f"{manifest['splits']['val']['tokens']:,} val tokens ({manifest['dtype']})")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(cfg.model, tokenizer, seed=cfg.train.seed).to(device)
    if model.config.vocab_size < len(tokenizer):
        raise UserError(f"pretrain: model vocab {model.config.vocab_size} < tokenizer's "
                        f"{len(tokenizer)}")
    info = config_summary(model)
    flops = flops_per_token(model, d.seq_len)
    print(f"pretrain: {info['model_type']} with {info['params']:,} params, "
          f"{flops / 1e6:.1f} MFLOP/token")
    task = lm_task(model, train_w, val_w, cfg, device, flops)
    # from an unstructured-pruned model (its prune.json): a dense update would refill the zeros
    keeper = keep_zeros(task, model, masked_record(cfg.model.path), "pretrain", cfg.train.parallel)
    res = train(cfg.train, cfg.optim, cfg.log, cfg.run.dir, model, task, tokenizer)
    pruned = keeper.finish(res.final_dir, "pretrain", res.steps) if keeper is not None else None

    h1 = unigram_entropy(val_w.token_counts(len(tokenizer)))
    val = res.best_val_loss if cfg.train.final == "best" else res.last.get("loss")
    v = manifest["splits"]["val"]
    # per byte: the one loss figure that compares across tokenizers and vocab sizes
    nats_per_byte = val * v["tokens"] / v["bytes"] if val is not None and v.get("bytes") else None
    return {
        **info,
        **res.facts(),
        "flops_per_token": flops,
        "final_train_loss": res.last.get("loss"),
        "final_val_loss": val,
        "final_val_ppl": math.exp(val) if val is not None else None,
        "val_unigram_entropy": h1,
        "val_loss_over_unigram_entropy": (val / h1) if val is not None else None,
        "val_nats_per_byte": nats_per_byte,
        "val_bits_per_byte": nats_per_byte / math.log(2) if nats_per_byte else None,
        "nonfinite_skipped": res.nonfinite_skipped,
        "data": manifest,
        **({"pruned": pruned} if pruned is not None else {}),
        "final_dir": str(res.final_dir),
    }
