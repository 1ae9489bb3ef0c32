"""Reward model: a causal LM with a scalar head, trained with Bradley-Terry on preference pairs.

Reads top to bottom: the model (the LM under `AutoModelForSequenceClassification`'s one-output
`score` head, full or LoRA/DoRA), the rows (chosen and rejected whole, packed padding-free),
the step (one forward of the transformer body, the head on each sequence's last token), the
loop, then what was shipped, measured from disk: held-out pairwise accuracy next to how much
of the reward only measures length (its correlation with completion length, and how often
"the longer answer wins" alone is right), with an optional linear length correction.

The reward is read where Hugging Face's sequence-classification models read it, at a
sequence's last token that is not padding, so `AutoModelForSequenceClassification` on final/
gives the reward training saw (tests/stages/test_rm.py checks it to 1e-5).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING
from transformers.utils import logging as hf_logging

from lmforge.chat import ChatFormat
from lmforge.config import RmCfg
from lmforge.data.preference import PairBatches, PairExample
from lmforge.data.sft import Batch, pack_rows
from lmforge.errors import UserError
from lmforge.io import atomic_write_json, check_local_or_hub
from lmforge.losses.preference import bt_loss
from lmforge.models import (
    WRITTEN,
    add_rows_for_new_tokens,
    check_targets,
    config_summary,
    disable_dropout,
    enable_checkpointing,
    final_hidden,
    record_written,
    resolve_model_dir,
    save_hf,
)
from lmforge.rl.rewards import LENGTH_FILE, STATS_FILE
from lmforge.stages.dpo import load_examples, val_metrics
from lmforge.stages.sft import load_tokenizer_and_format
from lmforge.train import distributed
from lmforge.train.loop import Task, train
from lmforge.train.precision import Precision, make_precision

# --------------------------------------------------------------------------- the model


def load_reward_model(cfg: RmCfg, tokenizer: PreTrainedTokenizerBase,
                      fmt: ChatFormat) -> PreTrainedModel:
    """model.path under a one-output score head, rows for the template's tokens, dropout off
    (the loss compares two forwards: dropout noise would read as a preference), adapters."""
    path = _model_dir(cfg)
    conf = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    remote = "AutoModelForSequenceClassification" in (getattr(conf, "auto_map", None) or {})
    if type(conf) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING and not remote:
        raise UserError(f"model.path {path}: transformers has no sequence-classification class "
                        f"for {conf.model_type!r} models, so no reward head can be put on it; "
                        "start from a model family that has one (llama, mistral, qwen2, gpt2, ...)")
    if cfg.lora.method == "qlora":
        raise UserError("lora.method=qlora is not supported by the rm stage (its merged export "
                        "would need the 4-bit base dequantized); use lora or dora")
    conf.num_labels = 1
    conf.pad_token_id = tokenizer.pad_token_id  # the head reads the last token that is not pad
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the new head's "MISSING" load report: expected, handled
    try:
        model, loading = AutoModelForSequenceClassification.from_pretrained(
            path, config=conf, dtype=torch.float32, output_loading_info=True,
            trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot load {path!r} as a reward model: "
                        f"{(str(e).strip().splitlines() or [type(e).__name__])[0][:200]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if any(k.split(".")[0] == "score" for k in loading["missing_keys"]):  # a causal LM: new head
        init_head(model.score, cfg.train.seed)
    add_rows_for_new_tokens(model, len(tokenizer))
    disable_dropout(model)
    model.config.use_cache = False
    if cfg.model.gradient_checkpointing:
        enable_checkpointing(model)
    if cfg.lora.method == "full":
        return model  # type: ignore[no-any-return]
    return apply_reward_lora(model, cfg, [tokenizer.convert_tokens_to_ids(t) for t in fmt.special_tokens])


def _model_dir(cfg: RmCfg) -> str:
    if cfg.model.path is None:
        raise UserError("set model.path: a reward model starts from a trained causal LM "
                        "(usually an SFT stage's output)")
    path = resolve_model_dir(cfg.model.path)
    check_local_or_hub(path, "model")
    if Path(path).exists() and not (Path(path) / "config.json").exists():
        raise UserError(f"model.path {path} is not a Hugging Face model directory (no config.json)")
    return path


def init_head(head: nn.Linear, seed: int) -> None:
    """N(0, 1/(d+1)), as OpenRLHF's value head. transformers draws a new head from N(0, 0.02):
    after the final norm a hidden state has norm ~sqrt(d), so that head's rewards have std
    ~0.02 sqrt(d) (1.3 at d = 4096): random preferences the loss must first unlearn. This one
    gives std ~1/sqrt(d): every pair starts near a tie (loss ln 2), yet the head is not 0, so
    the body has gradients from the first step. Seeded: a resumed run rebuilds the same head."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = torch.randn(head.weight.shape, generator=g) / (head.in_features + 1)
        head.weight.copy_(w)
        if head.bias is not None:
            head.bias.zero_()


def apply_reward_lora(model: PreTrainedModel, cfg: RmCfg, new_token_ids: list[int]) -> PreTrainedModel:
    """LoRA or DoRA adapters on the body; the score head trains whole (peft's modules_to_save:
    it is new, a low-rank update of a random head would be meaningless) and is saved with the
    adapter; rows of tokens the template added train as in sft."""
    from peft import LoraConfig, get_peft_model

    lora = cfg.lora
    check_targets(model, lora.target_modules)
    targets = lora.target_modules
    if isinstance(targets, list) and "score" in targets:
        raise UserError("lora.target_modules: 'score' is the reward head, which trains whole; "
                        "leave it out")
    conf = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
        use_rslora=lora.rslora, use_dora=lora.method == "dora", task_type="SEQ_CLS",
        modules_to_save=["score"],
        trainable_token_indices=sorted(new_token_ids) if lora.train_new_tokens and new_token_ids else None,
    )
    return get_peft_model(model, conf)  # type: ignore[return-value]


def score_head(model: nn.Module) -> nn.Module:
    """The score head of a sequence-classification model or its peft wrapper."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.score  # type: ignore[no-any-return]


def sequence_rewards(model: nn.Module, b: Batch) -> torch.Tensor:
    """One reward per sequence of a `collate_whole` batch: (S,), in the batch's sequence order.
    use_cache=False: with a cache present transformers skips the packed-sequence detection
    (position ids restarting at 0), and sequences in a row would attend to each other."""
    hidden = final_hidden(model, b["input_ids"], b["position_ids"])  # (R, T, d)
    last = hidden.flatten(0, 1)[b["last"]]  # (S, d)
    return score_head(model)(last).squeeze(-1).float()  # (S,)


def export_merged(model: nn.Module, out: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """An adapter run's best/ and final/: the adapters merged into the base, the trained head
    in place, a plain directory AutoModelForSequenceClassification loads as is (the adapter
    itself, head included, is in checkpoints/step-N/). Merged on a copy: merging in place and
    unmerging leaves W + BA - BA, not W, and would break exact resume."""
    merged = copy.deepcopy(model).merge_and_unload()  # type: ignore[operator]
    save_hf(merged, out, tokenizer)


# --------------------------------------------------------------------------- rows


def collate_whole(seqs: list[list[int]], rows: list[list[int]], pad_id: int) -> Batch:
    """Rows of whole sequences (none shifted by one), for a model that reads each sequence's
    last token: input_ids, position_ids, valid (R, T), and `last` (S,), the flat index
    (row * T + column) of sequence i's last token. Positions restart at 0 at each sequence
    (transformers reads the restarts as boundaries: a block-diagonal mask); padding, at a
    row's end only, continues them (no restart, so no extra segment)."""
    T = max(sum(len(seqs[i]) for i in row) for row in rows)
    out = {k: torch.zeros(len(rows), T, dtype=torch.long)
           for k in ("input_ids", "position_ids", "valid")}
    out["input_ids"].fill_(pad_id)
    last = torch.full((len(seqs),), -1, dtype=torch.long)  # (S,)
    for r, row in enumerate(rows):
        col = n = 0
        for i in row:
            n = len(seqs[i])
            out["input_ids"][r, col:col + n] = torch.tensor(seqs[i])
            out["position_ids"][r, col:col + n] = torch.arange(n)
            out["valid"][r, col:col + n] = 1
            last[i] = r * T + col + n - 1
            col += n
        out["position_ids"][r, col:] = torch.arange(n, n + T - col)
    out["last"] = last
    return out


class RewardBatches(PairBatches):
    """PairBatches with every sequence whole. The LM layout (`data.sft.collate`) shifts each
    sequence by one, so its last token is a target only, never an input; the reward is read
    at that token's hidden state, so here it is an input (`collate_whole`)."""

    def _collate(self, ids: list[int]) -> Batch:
        seqs, extra = self._sequences(ids)
        # HF reads the last token that is not the pad id: where pad is eos and the template
        # ends a turn with eos, that is the token before it. Dropping trailing pad ids makes
        # training read where AutoModelForSequenceClassification will (later tokens cannot
        # change an earlier hidden state).
        whole = [_drop_trailing(s.ids, self.pad_id) for s in seqs]
        if self.packing:
            rows = pack_rows([len(s) for s in whole], self.max_length, self.seed)
        else:
            rows = [[i] for i in range(len(whole))]
        batch = collate_whole(whole, rows, self.pad_id)
        batch["index"] = torch.tensor(ids, dtype=torch.long)  # (P,)
        return {**batch, **extra}


def _drop_trailing(ids: list[int], pad_id: int) -> list[int]:
    n = len(ids)
    while n > 1 and ids[n - 1] == pad_id:
        n -= 1
    return ids[:n]


def make_reward_batches(cfg: RmCfg, examples: list[PairExample], pad_id: int) -> RewardBatches:
    return RewardBatches(examples, cfg.data.max_length, cfg.data.packing, cfg.train.seed, pad_id)


# --------------------------------------------------------------------------- the task


def rm_task(model: nn.Module, train_b: RewardBatches, val_b: RewardBatches, cfg: RmCfg,
            device: torch.device, tokenizer: PreTrainedTokenizerBase) -> Task:
    t = cfg.train

    def pair_loss(b: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        b = {k: v.to(device) for k, v in b.items()}
        r = sequence_rewards(model, b)  # (2P,): chosen, rejected interleaved
        loss, m = bt_loss(r[0::2], r[1::2], margin=b["margin"] if cfg.margin else None)
        return loss, {"accuracy": m["rewards/accuracy"], "rewards/chosen": m["rewards/chosen"],
                      "rewards/rejected": m["rewards/rejected"], "margin": m["rewards/margin"]}

    val_batches = val_b.eval_batches(t.micro_batch_size)
    return Task(step=pair_loss,
                batches=lambda n: train_b.micro_batches(n, t.micro_batch_size, t.grad_accum),
                weight=lambda b: float(b["index"].numel()),  # the loss is a mean over pairs
                tokens=lambda b: int(b["valid"].sum()),
                evaluate=lambda: val_metrics(val_batches, pair_loss),
                export=None if cfg.lora.method == "full"  # the loop's save_hf does
                else lambda m, out: export_merged(m, out, tokenizer))


# --------------------------------------------------------------------------- length bias


def pairwise_accuracy(chosen: np.ndarray, rejected: np.ndarray) -> float:
    """Share of pairs where chosen scores above rejected, a tie counting 1/2 (a coin flip)."""
    return float(np.mean((chosen > rejected) + 0.5 * (chosen == rejected)))


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson's r; None when either side is constant (r is undefined there)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float((dx * dx).sum() * (dy * dy).sum()))
    return float((dx * dy).sum() / den) if den > 0 else None


def length_bias(rewards: np.ndarray, lengths: np.ndarray) -> dict[str, float | None]:
    """rewards, lengths: (N, 2), column 0 chosen, 1 rejected. The RM's pairwise accuracy, the
    correlation of reward with completion length over all 2N completions, and the accuracy
    of "the longer completion is better" on the same pairs: an RM that is no better than
    that baseline and correlates strongly with length is a length detector."""
    return {"accuracy": pairwise_accuracy(rewards[:, 0], rewards[:, 1]),
            "length_corr": pearson(rewards.reshape(-1), lengths.reshape(-1)),
            "longer_wins_accuracy": pairwise_accuracy(lengths[:, 0], lengths[:, 1])}


def fit_length(rewards: np.ndarray, lengths: np.ndarray) -> tuple[float, float]:
    """Least squares reward ~ a + b * length: (b, a). Constant lengths: b = 0."""
    x, y = np.asarray(lengths, np.float64).reshape(-1), np.asarray(rewards, np.float64).reshape(-1)
    dx = x - x.mean()
    sxx = float((dx * dx).sum())
    slope = float((dx * (y - y.mean())).sum() / sxx) if sxx > 0 else 0.0
    return slope, float(y.mean() - slope * x.mean())


@torch.no_grad()
def score_pairs(model: nn.Module, batches: list[Batch], n: int, device: torch.device,
                precision: Precision) -> np.ndarray:
    """(n, 2) rewards [chosen, rejected] of a dataset visited once through `batches`."""
    model.eval()
    out = np.full((n, 2), np.nan)
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        with precision.autocast():
            r = sequence_rewards(model, b)
        out[b["index"].cpu().numpy()] = r.view(-1, 2).cpu().double().numpy()
    assert not np.isnan(out).any(), "a pair was never scored"
    return out


def completion_lengths(examples: list[PairExample]) -> np.ndarray:
    """(N, 2) completion tokens [chosen, rejected], the template's end-of-turn included: a
    constant offset per completion, which moves the fit's intercept, not its slope."""
    return np.array([[len(e.chosen), len(e.rejected)] for e in examples], dtype=np.float64)


def measure_final(cfg: RmCfg, final: Path, train_b: RewardBatches, val_b: RewardBatches,
                  device: torch.device, precision: Precision) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """What was shipped, loaded from disk: held-out accuracy and length bias; with
    length_normalize also the length fit on the training completions, written next to the
    model for the RL scorer (lmforge/rl/rewards.py), and the corrected reward's numbers."""
    model = AutoModelForSequenceClassification.from_pretrained(final, dtype=torch.float32).to(device)
    micro = cfg.train.micro_batch_size
    val_r = score_pairs(model, val_b.eval_batches(micro), val_b.n, device, precision)
    val_len = completion_lengths(val_b.examples)
    heldout: dict[str, Any] = {"pairs": val_b.n, **length_bias(val_r, val_len)}
    train_r = score_pairs(model, train_b.eval_batches(micro), train_b.n, device, precision)
    fit = None
    if cfg.length_normalize:
        slope, intercept = fit_length(train_r, completion_lengths(train_b.examples))
        fit = {"slope": slope, "intercept": intercept, "unit": "completion token"}
        atomic_write_json(final / LENGTH_FILE, fit)
        train_r = train_r - slope * completion_lengths(train_b.examples)  # as RL will score
    # the reward's scale on its training completions, as scored: what puts the members of
    # an ensemble on one scale (an offset of the head alone would decide every min)
    atomic_write_json(final / STATS_FILE, {"mean": float(train_r.mean()),
                                           "std": float(train_r.std()), "completions": int(train_r.size)})
    (final / WRITTEN).unlink(missing_ok=True)  # the list is rebuilt with the new files in it
    record_written(final)
    if fit is None:
        return heldout, None
    corrected = length_bias(val_r - slope * val_len, val_len)
    heldout["accuracy_corrected"] = corrected["accuracy"]
    heldout["length_corr_corrected"] = corrected["length_corr"]
    return heldout, fit


# --------------------------------------------------------------------------- main


def main(cfg: RmCfg) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    _model_dir(cfg)  # a missing model is said before the tokenizer is looked for
    tokenizer, fmt, added = load_tokenizer_and_format(cfg)  # type: ignore[arg-type]
    model = load_reward_model(cfg, tokenizer, fmt).to(device)
    train_ex, val_ex, data_stats = load_examples(cfg, tokenizer, False)  # type: ignore[arg-type]
    lengths = completion_lengths(train_ex)
    data_stats["completion_tokens"] = {
        "chosen_mean": round(float(lengths[:, 0].mean()), 2),
        "rejected_mean": round(float(lengths[:, 1].mean()), 2),
        "chosen_longer": round(float(np.mean(lengths[:, 0] > lengths[:, 1])), 4)}
    train_b = make_reward_batches(cfg, train_ex, tokenizer.pad_token_id)
    val_b = make_reward_batches(cfg, val_ex, tokenizer.pad_token_id)
    info = config_summary(model)
    t = cfg.train
    print(f"rm: {cfg.lora.method} on {info['model_type']}, template {fmt.name}; trainable "
          f"{info['trainable_params']:,} of {info['params']:,} params; {len(train_ex):,} train / "
          f"{len(val_ex):,} val pairs, "
          f"{train_b.epochs(t.max_steps, t.micro_batch_size, t.grad_accum):.2f} epochs")
    res = train(cfg.train, cfg.optim, cfg.log, cfg.run.dir, model,
                rm_task(model, train_b, val_b, cfg, device, tokenizer), tokenizer)
    model.cpu()  # what is measured next is final/ as shipped, loaded from disk
    precision = make_precision(t.precision, device.type)
    heldout: dict[str, Any] = {}
    fit = None
    if distributed.current().main:  # under torchrun, rank 0 measures and writes next to final/
        heldout, fit = measure_final(cfg, res.final_dir, train_b, val_b, device, precision)
        print("rm: " + _line(heldout))
    return {**info, "method": cfg.lora.method, "template": fmt.name, "added_tokens": added,
            "margin": cfg.margin, "data": data_stats, **res.facts(),
            "epochs": round(train_b.epochs(res.steps, t.micro_batch_size, t.grad_accum), 3),
            "last": {k: round(v, 5) for k, v in res.last.items()
                     if isinstance(v, float) and math.isfinite(v) and k != "step_s"},
            "final_val_loss": res.best_val_loss, "heldout": heldout, "length_fit": fit,
            "nonfinite_skipped": res.nonfinite_skipped, "final_dir": str(res.final_dir)}


def _line(h: dict[str, Any]) -> str:
    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    s = (f"held-out accuracy {f(h['accuracy'])} (longer-wins baseline "
         f"{f(h['longer_wins_accuracy'])}), reward-length correlation {f(h['length_corr'])}")
    if "accuracy_corrected" in h:
        s += (f"; length-corrected: accuracy {f(h['accuracy_corrected'])}, correlation "
              f"{f(h['length_corr_corrected'])}")
    return s
