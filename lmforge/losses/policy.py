"""Policy-gradient losses for online RL: GRPO's clipped surrogate and its modern variants, and
PPO's clipped value loss for a critic.

Pure functions of per-token log-probs (DESIGN rules 1 and 11): tensors in, (scalar loss,
metrics) out. Every choice is an independent typed field, looked up in a dict:

  ratio_level  RATIOS         "token" (PPO, GRPO) | "sequence" (GSPO)
  aggregation  AGGREGATIONS   "token_mean" (DAPO) | "seq_mean_token_mean" (GRPO)
                              | "seq_mean_token_sum_norm" (Dr. GRPO)
  kl           KL_ESTIMATORS  "k1" | "k2" | "k3" (GRPO) | "none"

and the numbers clip_low / clip_high (DAPO's clip-higher), beta (KL weight), entropy_coef and
is_cap (verl's truncated importance sampling) switch the rest on and off.

Shapes: B sampled completions (rows) of T positions; `loss_mask` (B, T) is 1 on the completion
tokens the policy sampled and 0 on prompt, padding or tool-output positions. Nothing at a masked
position is ever read: every input is replaced by 0 there before any arithmetic, so padding
holding -inf or nan changes neither the loss nor its gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

RatioLevel = Literal["token", "sequence"]
Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
KlEstimator = Literal["k1", "k2", "k3", "none"]


# ---------------------------------------------------------------------------- aggregation


def _n_tokens(m: torch.Tensor) -> torch.Tensor:
    return m.sum()


def _n_seqs(m: torch.Tensor) -> torch.Tensor:
    # a row with no valid token (a padding row that fills a fixed-shape batch) is no sequence
    return (m.sum(-1) > 0).to(m.dtype).sum()


@dataclass(frozen=True)
class AggregationRule:
    """A loss aggregation as `sum(share * per_token) / mean_over`.

    `share` (B, T) is each token's part of its unit (a token, or a sequence) and depends on its
    own row only; `mean_over` counts the units. That split is what makes gradient accumulation
    and data parallelism exact: micro-batches' mean losses, weighted by their `mean_over`
    (`weight_of`), sum to the full batch's `sum(share * x) / sum(mean_over)`.
    """

    share: Callable[[torch.Tensor, int | None], torch.Tensor]  # (B, T) float mask -> (B, T)
    mean_over: Callable[[torch.Tensor], torch.Tensor]  # (B, T) float mask -> ()


AGGREGATIONS: dict[Aggregation, AggregationRule] = {
    # DAPO (Yu et al. 2025, its "token-level policy gradient loss"): every token counts
    # the same, so a long answer's tokens are not down-weighted for being in a long answer
    "token_mean": AggregationRule(lambda m, _: m, _n_tokens),
    # GRPO (Shao et al. 2024, DeepSeekMath): 1/G sum_i 1/|o_i| sum_t; each sequence
    # weighs the same, so a token of a short answer weighs more than one of a long answer
    "seq_mean_token_mean": AggregationRule(
        lambda m, _: m / m.sum(-1, keepdim=True).clamp(min=1), _n_seqs
    ),
    # Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like training"): 1/|o_i|
    # replaced by one constant (the generation budget), removing the length bias that lets
    # wrong answers grow long; the constant must be the same in every micro-batch
    "seq_mean_token_sum_norm": AggregationRule(lambda m, max_tokens: m / max_tokens, _n_seqs),
}


def _float_mask(loss_mask: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    dtype = like.dtype if like is not None else (
        loss_mask.dtype if loss_mask.is_floating_point() else torch.get_default_dtype())
    return loss_mask.bool().to(dtype)


def _rule(mode: Aggregation, max_tokens: int | None) -> AggregationRule:
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {mode!r}; one of {sorted(AGGREGATIONS)}")
    if (mode == "seq_mean_token_sum_norm") != (max_tokens is not None):
        raise ValueError("max_tokens (the constant each sequence's token sum is divided by) is "
                         f"required by, and read only by, seq_mean_token_sum_norm; got {mode!r} "
                         f"with max_tokens={max_tokens}")
    if max_tokens is not None and max_tokens <= 0:
        raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
    return AGGREGATIONS[mode]


def token_weights(
    loss_mask: torch.Tensor,  # (B, T)
    mode: Aggregation,
    max_tokens: int | None = None,
) -> torch.Tensor:
    """Each token's weight in the aggregated loss: (B, T), 0 at masked positions.

    `aggregate(x) == sum(token_weights * x)`, so these are also d loss / d per-token term.
    Worked example: mask [[1, 1, 1], [1, 0, 0]] gives token_mean 1/4 everywhere valid;
    seq_mean_token_mean [[1/6, 1/6, 1/6], [1/2, 0, 0]]; seq_mean_token_sum_norm with
    max_tokens 4: 1/8 everywhere valid.
    """
    rule = _rule(mode, max_tokens)
    m = _float_mask(loss_mask)
    return rule.share(m, max_tokens) / rule.mean_over(m).clamp(min=1)


def aggregate(
    per_token: torch.Tensor,  # (B, T)
    loss_mask: torch.Tensor,  # (B, T)
    mode: Aggregation,
    max_tokens: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss to a scalar over the valid tokens, the way `mode` says.

    Worked example: per_token [[1, 2, 3], [4, 0, 0]], mask [[1, 1, 1], [1, 0, 0]]:
    token_mean (1 + 2 + 3 + 4) / 4 = 2.5; seq_mean_token_mean (2 + 4) / 2 = 3;
    seq_mean_token_sum_norm with max_tokens 4: (6/4 + 4/4) / 2 = 1.25.
    A batch with no valid token gives 0 (and weight_of 0), never nan.
    """
    w = token_weights(_float_mask(loss_mask, per_token), mode, max_tokens)  # (B, T)
    return (torch.where(loss_mask.bool(), per_token, 0.0) * w).sum()


def weight_of(loss_mask: torch.Tensor, mode: Aggregation) -> float:
    """What `aggregate(..., mode)` is a mean over: the number of valid tokens for token_mean,
    of sequences with at least one valid token otherwise. A loop that sums micro-batch (or
    shard) losses weighted by this, over the sum of the weights, gets the full batch's loss and
    gradient for any split of the rows (train/loop.py's `Task.weight`).

    Worked example: mask [[1, 1, 1], [1, 0, 0], [0, 0, 0]]: token_mean 4, the others 2.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {mode!r}; one of {sorted(AGGREGATIONS)}")
    return float(AGGREGATIONS[mode].mean_over(_float_mask(loss_mask)))


# ------------------------------------------------------------------------------------- KL

# Schulman (2020), "Approximating KL divergence", on x = log ref(y) - log pi(y), y ~ pi: all
# three estimate KL(pi || ref) per sampled token. k1 = -x: unbiased, high variance, negative on
# some tokens. k2 = x^2 / 2: biased, low variance. k3 = e^x - x - 1: unbiased, low variance,
# never negative; GRPO's (DeepSeekMath). As loss terms their gradients differ (in
# expectation over y ~ pi): k1's is 0, k2's is the gradient of KL(pi || ref), k3's that of
# KL(ref || pi); tests/losses/test_policy_losses.py checks all three exactly.
KL_ESTIMATORS: dict[KlEstimator, Callable[[torch.Tensor], torch.Tensor]] = {
    "k1": lambda x: -x,
    "k2": lambda x: 0.5 * x * x,
    # expm1: e^x - 1 without the cancellation that loses k3's small values near x = 0
    "k3": lambda x: torch.expm1(x) - x,
    "none": torch.zeros_like,
}


def kl_penalty(
    logps: torch.Tensor,  # (B, T) policy
    ref_logps: torch.Tensor,  # (B, T) reference
    estimator: KlEstimator,
) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) by `estimator`: (B, T), unmasked.

    Worked example: logps log 0.5, ref_logps log 0.25, so x = -log 2 = -0.6931:
    k1 = 0.6931, k2 = 0.2402, k3 = 0.5 + 0.6931 - 1 = 0.1931 (one-sample estimates: only
    their means over y ~ pi are the KL).
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; one of {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](ref_logps - logps)


# ---------------------------------------------------------------------------------- ratios


def _token_log_ratio(logps: torch.Tensor, old_logps: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return logps - old_logps  # (B, T)


def _sequence_log_ratio(logps: torch.Tensor, old_logps: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    # GSPO-token (Zheng et al. 2025, "Group Sequence Policy Optimization"):
    # s_i,t = sg[s_i] * pi(y_t) / sg[pi(y_t)], whose value is the sequence's
    # s_i = exp(mean_t log-ratio) and whose gradient w.r.t. log pi(y_t) is s_i; with one
    # advantage per sequence (and no per-token weights) that is exactly GSPO's gradient
    seq = ((logps - old_logps) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)
    return (seq.detach() + logps - logps.detach()) * m  # (B, T)


# (logps, old_logps, float mask), all zero at masked positions -> log-ratio (B, T)
RATIOS: dict[RatioLevel, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "token": _token_log_ratio,
    "sequence": _sequence_log_ratio,
}


# ------------------------------------------------------------------------------ the loss


def _clipped_surrogate(
    ratio: torch.Tensor,  # (B, T)
    adv: torch.Tensor,  # (B, T)
    m: torch.Tensor,  # (B, T) float mask
    n: torch.Tensor,  # () valid tokens, at least 1
    clip_low: float,
    clip_high: float,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """PPO's -min(r A, clip(r, 1 - lo, 1 + hi) A) per token, and how often each clip is active."""
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high)
    pg = torch.maximum(-adv * ratio, -adv * clipped)  # (B, T)
    r = ratio.detach()
    # the clipped branch wins (and passes no gradient) only on the side the advantage pushes
    # toward: above 1 + hi for A > 0, below 1 - lo for A < 0; the other sides stay unclipped
    high = ((r > 1 + clip_high) & (adv > 0)).to(m.dtype) * m  # (B, T)
    low = ((r < 1 - clip_low) & (adv < 0)).to(m.dtype) * m  # (B, T)
    return pg, {
        "clip_frac": float((low + high).sum() / n),
        "clip_frac/low": float(low.sum() / n),
        "clip_frac/high": float(high.sum() / n),
        "ratio/mean": float((r * m).sum() / n),
    }


def _check_args(
    logps: torch.Tensor, advantages: torch.Tensor, ratio_level: str, kl: str, clip: tuple[float, float],
    beta: float, ref_given: bool, entropy_coef: float, entropies_given: bool, is_cap: float | None,
) -> None:
    if logps.dim() != 2 or advantages.shape not in (logps.shape[:1], logps.shape):
        raise ValueError(f"logps must be (B, T) and advantages (B,) or (B, T); got "
                         f"{tuple(logps.shape)} and {tuple(advantages.shape)}")
    if ratio_level not in RATIOS:
        raise ValueError(f"unknown ratio_level {ratio_level!r}; one of {sorted(RATIOS)}")
    if kl not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kl!r}; one of {sorted(KL_ESTIMATORS)}")
    if not (0 <= clip[0] < 1 and clip[1] >= 0):
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip}")
    if beta < 0 or (beta > 0 and kl != "none" and not ref_given):
        raise ValueError(f"beta must be >= 0, and beta > 0 with kl={kl!r} needs ref_logps; got {beta}")
    if entropy_coef != 0 and not entropies_given:
        raise ValueError(f"entropy_coef={entropy_coef} needs entropies")
    if is_cap is not None and not is_cap > 0:
        raise ValueError(f"is_cap must be > 0 or None (no correction), got {is_cap}")


def _is_weights(
    old: torch.Tensor, rollout: torch.Tensor, m: torch.Tensor, n: torch.Tensor, is_cap: float | None
) -> tuple[torch.Tensor | None, dict[str, float]]:
    """verl's truncated importance sampling: min(pi_old / pi_rollout, cap) per token, detached."""
    gap = old - rollout  # (B, T), 0 at masked positions
    metrics = {"is/gap": float((gap.abs() * m).sum() / n)}
    if is_cap is None:
        return None, metrics
    raw = gap.exp()  # (B, T)
    w = raw.clamp(max=is_cap)  # (B, T)
    metrics["is/weight_mean"] = float((w * m).sum() / n)
    metrics["is/truncated_frac"] = float(((raw > is_cap).to(m.dtype) * m).sum() / n)
    return w, metrics


def policy_loss(
    logps: torch.Tensor,  # (B, T) the policy being trained
    old_logps: torch.Tensor,  # (B, T) the policy that sampled, as the trainer computes it
    advantages: torch.Tensor,  # (B,) or (B, T)
    loss_mask: torch.Tensor,  # (B, T)
    *,
    ratio_level: RatioLevel = "token",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    aggregation: Aggregation = "token_mean",
    max_tokens: int | None = None,
    ref_logps: torch.Tensor | None = None,  # (B, T)
    kl: KlEstimator = "k3",
    beta: float = 0.0,
    entropies: torch.Tensor | None = None,  # (B, T), e.g. token_entropy(logits)
    entropy_coef: float = 0.0,
    rollout_logps: torch.Tensor | None = None,  # (B, T) the sampler's own log-probs
    is_cap: float | None = 2.0,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """GRPO-family policy loss: aggregate(is_w * pg + beta * kl) - entropy_coef * aggregate(H).

    pg = -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A) per token (PPO, Schulman et al.
    2017; GRPO). r is exp(logps - old_logps) ("token") or GSPO's sequence ratio ("sequence"):
    exp(mean over the sequence's valid tokens of logps - old_logps), the same for each of its
    tokens, with GSPO-token's gradient (see _sequence_log_ratio); GSPO pairs it with tiny clip
    ranges such as 3e-4 / 4e-4. clip_high > clip_low is DAPO's clip-higher (0.2 / 0.28), which
    lets unlikely tokens with A > 0 grow further and keeps entropy from collapsing.

    The KL term is added per token (GRPO puts it in the loss, not in the reward), aggregated like
    pg; beta = 0 or kl = "none" leaves it out and ref_logps may be None. entropy_coef > 0 rewards
    entropy (verl's entropy bonus), aggregated the same way.

    rollout_logps with is_cap set: truncated importance sampling (Yao et al. 2025, "Your
    efficient RL framework secretly brings you off-policy RL training"; verl's TIS): the sampler
    (e.g. vLLM, its own kernels) and the trainer disagree on pi_old's probabilities, so each
    token's pg term is multiplied by the detached weight min(exp(old_logps - rollout_logps),
    is_cap). Gradients reach logps and entropies only; the other inputs are detached here.

    Metrics (floats; "fraction"/"mean" are over valid tokens): clip_frac (the clipped branch is
    the active one, so the token passes no gradient) = clip_frac/low (r < 1 - clip_low, A < 0)
    + clip_frac/high (r > 1 + clip_high, A > 0); ratio/mean; pg_loss (the aggregated pg term,
    IS weights included); loss; kl (mean per-token estimate, whenever ref_logps is given and
    kl != "none", even at beta 0); entropy (when entropies is given); is/gap (mean
    |old_logps - rollout_logps|), and with is_cap set is/weight_mean and is/truncated_frac
    (weights cut to is_cap), when rollout_logps is given.

    Worked example (clip_low 0.2, clip_high 0.28): A = +1, r = 1.5 is clipped high, pg = -1.28;
    A = +1, r = 0.5: pg = -0.5 (unclipped); A = -1, r = 0.5 is clipped low, pg = 0.8;
    A = -1, r = 1.5: pg = 1.5 (unclipped). GSPO: token log-ratios [0.1, 0.3] give every token
    r = exp(0.2) = 1.2214. TIS: old - rollout = [log 1.5, log 3] with cap 2 gives weights
    [1.5, 2], is/weight_mean 1.75, is/truncated_frac 0.5, is/gap (0.4055 + 1.0986) / 2 = 0.7520.
    """
    _check_args(logps, advantages, ratio_level, kl, (clip_low, clip_high), beta,
                ref_logps is not None, entropy_coef, entropies is not None, is_cap)
    valid = loss_mask.bool()  # (B, T)
    m = valid.to(logps.dtype)  # (B, T)
    n = m.sum().clamp(min=1)  # (): a batch of padding only gives 0, never 0 / 0

    def v(x: torch.Tensor) -> torch.Tensor:  # 0 at masked positions: padding is never read
        return torch.where(valid, x, 0.0)

    w_agg = token_weights(m, aggregation, max_tokens)  # (B, T)
    lp, old = v(logps), v(old_logps.detach())  # (B, T)
    adv = v(advantages.detach()[:, None] if advantages.dim() == 1 else advantages.detach())
    ratio = RATIOS[ratio_level](lp, old, m).exp()  # (B, T)
    pg, metrics = _clipped_surrogate(ratio, adv, m, n, clip_low, clip_high)  # (B, T), metrics
    if rollout_logps is not None:
        is_w, m_is = _is_weights(old, v(rollout_logps.detach()), m, n, is_cap)
        pg, metrics = (pg if is_w is None else pg * is_w), metrics | m_is
    loss = pg_loss = (pg * w_agg).sum()
    if ref_logps is not None and kl != "none":
        k = v(kl_penalty(lp, v(ref_logps.detach()), kl))  # (B, T)
        metrics["kl"] = float((k.detach() * m).sum() / n)
        loss = loss + beta * (k * w_agg).sum() if beta else loss
    if entropies is not None:
        h = v(entropies)  # (B, T)
        metrics["entropy"] = float((h.detach() * m).sum() / n)
        loss = loss - entropy_coef * (h * w_agg).sum() if entropy_coef else loss
    metrics["pg_loss"], metrics["loss"] = float(pg_loss.detach()), float(loss.detach())
    return loss, metrics


# ------------------------------------------------------------------------------- entropy


class _TokenEntropy(torch.autograd.Function):
    """Softmax entropy per row of an (N, V) block, one chunk of rows at a time.

    As _TokenLogps in lm.py: the forward keeps the logits as given plus one logsumexp and one
    entropy per row, and the backward rebuilds each chunk's softmax from them, so no fp32
    (N, V) copy is ever held. dH/dz_j = -p_j (log p_j + H).
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, chunk_rows: int) -> torch.Tensor:
        acc = torch.promote_types(logits.dtype, torch.float32)  # fp32, or fp64 when given fp64
        lse = torch.empty(logits.size(0), dtype=acc, device=logits.device)  # (N,)
        ent = torch.empty_like(lse)  # (N,)
        for i in range(0, logits.size(0), chunk_rows):
            lg = logits[i : i + chunk_rows].to(acc)  # (chunk, V)
            lse[i : i + chunk_rows] = torch.logsumexp(lg, dim=-1)
            logp = lg - lse[i : i + chunk_rows, None]  # (chunk, V)
            ent[i : i + chunk_rows] = -(logp.exp() * logp).sum(-1)
        ctx.save_for_backward(logits, lse, ent)
        ctx.chunk_rows = chunk_rows
        return ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, lse, ent = ctx.saved_tensors
        c = ctx.chunk_rows
        grad = torch.empty_like(logits)  # (N, V) in the logits' own dtype
        for i in range(0, logits.size(0), c):
            logp = logits[i : i + c].to(lse.dtype) - lse[i : i + c, None]  # (chunk, V)
            scale = grad_out[i : i + c, None].to(lse.dtype)  # (chunk, 1)
            grad[i : i + c] = logp.exp() * (logp + ent[i : i + c, None]) * -scale
        return grad, None


def token_entropy(logits: torch.Tensor, chunk_rows: int = 256) -> torch.Tensor:
    """Entropy (nats) of the softmax at every position: logits (..., V) give (...), e.g.
    (B, T, V) -> (B, T); differentiable.

    `chunk_rows` positions at a time, each chunk upcast on its own (fp32, fp64 for fp64 logits),
    and a backward that rebuilds the softmax per chunk: neither pass holds a full-precision
    copy of more than one chunk besides the logits themselves (DESIGN rule 4).

    Worked example: uniform logits over V give log V (V = 4: 1.3863); V = 2 with logits
    [log 3, 0] (p = 3/4, 1/4) gives -(3/4 log 3/4 + 1/4 log 1/4) = 0.5623.
    """
    V = logits.size(-1)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    flat = _TokenEntropy.apply(logits.reshape(-1, V), chunk_rows)  # (N,)
    return flat.reshape(logits.shape[:-1])



# --------------------------------------------------------------------------------- value


def value_loss(
    values: torch.Tensor,  # (B, T) the critic being trained
    old_values: torch.Tensor,  # (B, T) the critic's values when the rollouts were scored
    returns: torch.Tensor,  # (B, T) GAE's targets (rl/advantages.py `gae`)
    loss_mask: torch.Tensor,  # (B, T)
    *,
    clip: float | None = 0.2,
    aggregation: Aggregation = "token_mean",
) -> tuple[torch.Tensor, dict[str, Any]]:
    """PPO's clipped value loss: aggregate(0.5 * max((V - R)^2, (V_clip - R)^2)) with V_clip =
    old + clamp(V - old, -clip, clip) (Schulman et al. 2017's baselines; TRL's PPO, OpenRLHF).

    The clip keeps the critic within `clip` of the values the advantages were computed from,
    as the ratio clip keeps the policy near pi_old: the max takes the pessimistic branch, so a
    value pulled outside the band towards R earns no gradient. clip None: plain 0.5 (V - R)^2.
    Metrics: vf_loss, vf_clipfrac (the clipped branch strictly larger, over valid tokens),
    value/mean, explained_variance (1 - Var[R - V] / Var[R]: 1 is a perfect critic, 0 no better
    than a constant, negative worse).

    Worked example (clip 0.2): V [1.0, 2.0], old [0.5, 2.0], R [2.0, 1.0]. Token 0: V_clip =
    0.7, (1 - 2)^2 = 1 < (0.7 - 2)^2 = 1.69, so 1.69 and no gradient (V_clip is clamped);
    token 1: both 1. Loss 0.5 * (1.69 + 1) / 2 = 0.6725, vf_clipfrac 0.5, dL/dV = [0, 0.5].
    """
    if not values.shape == old_values.shape == returns.shape == loss_mask.shape or values.dim() != 2:
        raise ValueError(f"values, old_values, returns and loss_mask must all be (B, T); got "
                         f"{tuple(values.shape)}, {tuple(old_values.shape)}, "
                         f"{tuple(returns.shape)}, {tuple(loss_mask.shape)}")
    if clip is not None and clip <= 0:
        raise ValueError(f"clip must be > 0 (or None: no clipping), got {clip}")
    valid = loss_mask.bool()
    m = valid.to(values.dtype)
    n = m.sum().clamp(min=1)
    v = torch.where(valid, values, 0.0)
    old, ret = torch.where(valid, old_values.detach(), 0.0), torch.where(valid, returns.detach(), 0.0)
    plain = (v - ret).square()  # (B, T)
    per_token, clipped = plain, torch.zeros_like(plain, dtype=torch.bool)
    if clip is not None:
        v_clip = old + (v - old).clamp(-clip, clip)
        far = (v_clip - ret).square()
        per_token, clipped = torch.maximum(plain, far), far > plain
    loss = 0.5 * (per_token * token_weights(m, aggregation)).sum()
    err = torch.where(valid, ret - v.detach(), 0.0)

    def var(x: torch.Tensor) -> torch.Tensor:
        mean = (x * m).sum() / n
        return (torch.where(valid, x - mean, 0.0).square()).sum() / n

    r_var = var(ret)
    metrics = {"vf_loss": float(loss.detach()), "vf_clipfrac": float((clipped & valid).sum() / n),
               "value/mean": float((v.detach() * m).sum() / n),
               "explained_variance": float(1 - var(err) / r_var) if r_var > 0 else float("nan")}
    return loss, metrics
