"""Preference-optimization losses: reward models (Bradley-Terry), DPO and its relatives, KTO.

Every loss is a pure function of per-sequence log-probs (DESIGN rule 1): tensors in,
(scalar loss, metrics) out, the loss a mean over the batch. Log-probs come from
`sequence_logps`, which reads them off the logits chunk by chunk (rule 4).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmforge.losses.lm import token_logps


def sequence_logps(
    logits: torch.Tensor,  # (R, T, V)
    targets: torch.Tensor,  # (R, T) next-token ids
    seq_ids: torch.Tensor,  # (R, T) long: the sequence whose completion token targets[r, t] is; -1: none
    n_seqs: int,
    *,
    chunk_rows: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each sequence's completion tokens, and how many there are: (n_seqs,) each.

    The counted positions are picked out first, so the logsumexp over the vocabulary runs on
    completion tokens only (a prompt is often longer than its completion), and rows may hold
    several packed sequences. Sequence i's per-token average is `sums[i] / counts[i]`.
    Every id must lie in [-1, n_seqs); a sequence with no tokens gets sum 0 and count 0.

    Worked example: V=2, one row with logits [[log 3, 0], [0, 0], [0, log 3]], targets
    [0, 1, 1] and seq_ids [0, -1, 1]: sums [log(3/4), log(3/4)] = [-0.2877, -0.2877], counts
    [1, 1]; the middle position is not read.
    """
    keep = seq_ids >= 0  # (R, T)
    ids = seq_ids[keep]  # (K,)
    logps = token_logps(logits[keep], targets[keep], chunk_rows)  # (K,) fp32, fp64 for fp64 logits
    sums = logps.new_zeros(n_seqs).index_add(0, ids, logps)  # (n_seqs,)
    counts = logps.new_zeros(n_seqs).index_add(0, ids, torch.ones_like(logps))  # (n_seqs,)
    return sums, counts


@dataclass(frozen=True)
class PairLogps:
    """The per-pair inputs of a paired preference loss, all (N,).

    `chosen` / `rejected`: the policy's summed completion log-probs; `*_tokens`: completion
    lengths (float), from which the length-averaged kinds take per-token averages; `ref_*`:
    the frozen reference's summed log-probs, None for a reference-free loss.
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None


def _reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    c, r = chosen_rewards.detach(), rejected_rewards.detach()  # (N,) each
    return {
        "rewards/chosen": float(c.mean()),
        "rewards/rejected": float(r.mean()),
        "rewards/margin": float((c - r).mean()),
        "rewards/accuracy": float((c > r).to(c.dtype).mean()),  # ties count as wrong
    }


def _h(
    logps_c: torch.Tensor, logps_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor
) -> torch.Tensor:
    """How much more the policy prefers chosen over rejected than the reference does: (N,)."""
    return (logps_c - ref_c) - (logps_r - ref_r)


def bt_loss(
    chosen_rewards: torch.Tensor,  # (N,)
    rejected_rewards: torch.Tensor,  # (N,)
    *,
    margin: torch.Tensor | None = None,  # (N,) how much better chosen is, when the labels say
) -> tuple[torch.Tensor, dict[str, float]]:
    """Bradley-Terry reward-model loss: mean of -log sigmoid(r_c - r_r - margin).

    The margin is Llama 2's (Touvron et al. 2023, sec. 3.2.2): a pair rated "much better" must be
    separated by more than one rated "slightly better" before the loss lets go of it.

    Worked example: r_c = 2, r_r = 1 gives -log sigmoid(1) = 0.3133; with margin 1 the pair
    counts as a tie, -log sigmoid(0) = log 2 = 0.6931.
    """
    diff = chosen_rewards - rejected_rewards  # (N,)
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean(), _reward_metrics(chosen_rewards, rejected_rewards)


def dpo_loss(
    logps_c: torch.Tensor,  # (N,) policy, chosen
    logps_r: torch.Tensor,  # (N,) policy, rejected
    ref_c: torch.Tensor,  # (N,) reference, chosen
    ref_r: torch.Tensor,  # (N,) reference, rejected
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO (Rafailov et al. 2023, eq. 7): mean of -log sigmoid(beta h), where
    h = (logps_c - ref_c) - (logps_r - ref_r).

    With label_smoothing eps > 0 it is conservative DPO (Mitchell 2023, "A note on DPO with
    noisy preferences"): each label is taken to be flipped with probability eps, so the loss is
    -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h), which stops pushing once
    sigmoid(beta h) = 1 - eps instead of driving h to infinity.

    Worked example: policy == reference gives h = 0 and exactly log 2 = 0.6931 for any beta.
    logps (-1, -3), ref (-2, -2): h = 1 - (-1) = 2; beta 0.5: -log sigmoid(1) = 0.3133;
    eps 0.1: 0.9 * 0.3133 + 0.1 * 1.3133 = 0.4133.
    """
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5], got {label_smoothing}")
    bh = beta * _h(logps_c, logps_r, ref_c, ref_r)  # (N,)
    losses = -(1 - label_smoothing) * F.logsigmoid(bh) - label_smoothing * F.logsigmoid(-bh)
    return losses.mean(), _reward_metrics(beta * (logps_c - ref_c), beta * (logps_r - ref_r))


def robust_dpo_loss(
    logps_c: torch.Tensor,  # (N,)
    logps_r: torch.Tensor,  # (N,)
    ref_c: torch.Tensor,  # (N,)
    ref_r: torch.Tensor,  # (N,)
    *,
    beta: float,
    label_smoothing: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO"): the mean of
    ((1 - eps) * -log sigmoid(beta h) - eps * -log sigmoid(-beta h)) / (1 - 2 eps).

    Unlike cDPO this is an unbiased estimate of the clean-label DPO loss when each label is
    flipped with probability eps (its expectation over the noise is the DPO loss), hence the
    minus sign and the 1 / (1 - 2 eps); it needs eps < 1/2.

    Worked example: h = 2, beta 0.5, eps 0.1: (0.9 * 0.3133 - 0.1 * 1.3133) / 0.8 = 0.1883;
    eps 0 is DPO.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs label_smoothing in [0, 0.5), got {label_smoothing}")
    bh = beta * _h(logps_c, logps_r, ref_c, ref_r)  # (N,)
    eps = label_smoothing
    losses = ((1 - eps) * -F.logsigmoid(bh) - eps * -F.logsigmoid(-bh)) / (1 - 2 * eps)
    return losses.mean(), _reward_metrics(beta * (logps_c - ref_c), beta * (logps_r - ref_r))


def ipo_loss(
    logps_c: torch.Tensor,  # (N,)
    logps_r: torch.Tensor,  # (N,)
    ref_c: torch.Tensor,  # (N,)
    ref_r: torch.Tensor,  # (N,)
    *,
    beta: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """IPO (Azar et al. 2023, eq. 17): mean of (h - 1 / (2 beta))^2.

    A squared loss regresses h to a finite target, so a deterministic preference cannot pull
    the policy arbitrarily far from the reference as DPO's sigmoid can; beta is the paper's tau.

    Worked example: h = 2, beta 0.1: (2 - 5)^2 = 9; beta 0.25: (2 - 2)^2 = 0.
    """
    h = _h(logps_c, logps_r, ref_c, ref_r)  # (N,)
    losses = (h - 1 / (2 * beta)) ** 2
    return losses.mean(), _reward_metrics(beta * (logps_c - ref_c), beta * (logps_r - ref_r))


def hinge_loss(
    logps_c: torch.Tensor,  # (N,)
    logps_r: torch.Tensor,  # (N,)
    ref_c: torch.Tensor,  # (N,)
    ref_r: torch.Tensor,  # (N,)
    *,
    beta: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """SLiC's calibration hinge (Zhao et al. 2023) on DPO's reference-relative h, as TRL's
    "hinge" has it: mean of relu(1 - beta h); pairs separated by h >= 1 / beta give no gradient.

    Worked example: h = 2, beta 0.25: relu(1 - 0.5) = 0.5; beta 0.5: relu(0) = 0.
    """
    h = _h(logps_c, logps_r, ref_c, ref_r)  # (N,)
    losses = torch.relu(1 - beta * h)
    return losses.mean(), _reward_metrics(beta * (logps_c - ref_c), beta * (logps_r - ref_r))


def simpo_loss(
    avg_c: torch.Tensor,  # (N,) per-token average log-prob, chosen
    avg_r: torch.Tensor,  # (N,) per-token average log-prob, rejected
    *,
    beta: float,
    gamma: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """SimPO (Meng et al. 2024): mean of -log sigmoid(beta (avg_c - avg_r) - gamma).

    No reference model: the implicit reward is the length-averaged log-prob, which is what
    generation ranks by, and averaging stops the loss from favouring long completions. The
    margin gamma asks for a reward gap of at least gamma / beta.

    Worked example: avg (-1, -2), beta 2, gamma 1: -log sigmoid(2 - 1) = 0.3133.
    """
    losses = -F.logsigmoid(beta * (avg_c - avg_r) - gamma)  # (N,)
    return losses.mean(), _reward_metrics(beta * avg_c, beta * avg_r)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, accurate at both ends (Maechler 2012, "Accurately computing
    log(1 - exp(-|a|))"): log(-expm1(x)) near 0, log1p(-exp(x)) below -log 2.

    Each branch is evaluated only where it is used (elsewhere at a harmless -1), since
    torch.where passes 0 * (the other branch's gradient), which is nan where that is infinite.
    """
    near0 = x > -math.log(2)
    one = torch.full_like(x, -1.0)
    return torch.where(
        near0,
        torch.log(-torch.expm1(torch.where(near0, x, one))),
        torch.log1p(-torch.exp(torch.where(near0, one, x))),
    )


def orpo_loss(
    avg_c: torch.Tensor,  # (N,) per-token average log-prob, chosen
    avg_r: torch.Tensor,  # (N,) per-token average log-prob, rejected
    *,
    lam: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """ORPO (Hong et al. 2024): mean(-avg_c) - lam * mean(log sigmoid(
    log_odds(avg_c) - log_odds(avg_r))), log_odds(x) = x - log(1 - e^x) with p = e^x the
    per-token-average probability.

    SFT and preference alignment in one loss and no reference: the NLL teaches the chosen
    answers, the odds-ratio term pushes the rejected ones below them.

    Worked example: avg_c = log 0.5 (odds 1, log-odds 0), avg_r = log 0.25 (odds 1/3):
    the odds ratio is 3, -log sigmoid(log 3) = log(4/3) = 0.2877; NLL log 2 = 0.6931;
    lam 0.1: 0.6931 + 0.1 * 0.2877 = 0.7219.
    """
    # p == 1 exactly (avg 0: a logit gap beyond exp's range) would make the odds infinite and
    # the gradient nan; past -1e-30 the clamp stops only this term's gradient, not the NLL's
    cc, rr = avg_c.clamp(max=-1e-30), avg_r.clamp(max=-1e-30)
    log_odds = (cc - _log1mexp(cc)) - (rr - _log1mexp(rr))  # (N,)
    ratio = F.logsigmoid(log_odds)  # (N,)
    nll = -avg_c.mean()
    metrics = _reward_metrics(avg_c, avg_r)
    metrics |= {
        "nll": float(nll.detach()),
        "log_odds_ratio": float(ratio.detach().mean()),
        "log_odds_chosen": float(log_odds.detach().mean()),
    }
    return nll - lam * ratio.mean(), metrics


def kto_loss(
    logps: torch.Tensor,  # (N,) policy, summed completion log-probs
    ref_logps: torch.Tensor,  # (N,) reference
    desirable: torch.Tensor,  # (N,) bool: True where the completion is a good one
    kl_logps: torch.Tensor,  # (M,) policy on mismatched (prompt, completion) pairs
    ref_kl_logps: torch.Tensor,  # (M,) reference on the same
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """KTO (Ethayarajh et al. 2024) with TRL's batch estimate of the reference point.

    r = logps - ref_logps; z0 = max(0, mean(kl_logps - ref_kl_logps)), detached (the paper's
    KL term, estimated on completions paired with the wrong prompts, and not back-propagated
    through). A desirable row costs w_D (1 - sigmoid(beta (r - z0))), an undesirable one
    w_U (1 - sigmoid(beta (z0 - r))); the loss is the mean over all N rows. Under data
    parallelism pass every rank's kl log-probs (gathered) so all ranks share one z0.

    Worked example: kl diffs [1, 1] give z0 = 1; beta 0.5, a desirable row with r = 3 and an
    undesirable one with r = -1 both cost 1 - sigmoid(1) = 0.2689; with w_U = 2 the loss is
    (0.2689 + 2 * 0.2689) / 2 = 0.4034.
    """
    z0 = (kl_logps - ref_kl_logps).mean().clamp(min=0).detach()  # ()
    r = logps - ref_logps  # (N,)
    d = desirable.bool()  # (N,)
    losses = torch.where(
        d,
        desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))),
    )  # (N,)
    rewards = (beta * r).detach()  # (N,)
    metrics = {"kl": float(z0)}
    for name, rows in (("desirable", d), ("undesirable", ~d)):
        n = int(rows.sum())
        # a class absent from this batch reports 0 (with its count 0), never the nan of an empty mean
        metrics[f"rewards/{name}"] = float(rewards[rows].mean()) if n else 0.0
        metrics[f"logps/{name}"] = float(logps.detach()[rows].mean()) if n else 0.0
        metrics[f"count/{name}"] = float(n)
    return losses.mean(), metrics


def chosen_nll(
    logps_c: torch.Tensor,  # (N,) summed log-probs of the chosen completions
    tokens_c: torch.Tensor,  # (N,) their lengths
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token NLL of the chosen completions, -sum(logps_c) / sum(tokens_c): the NLL term of
    RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization"), which keeps
    DPO from lowering the chosen answers' likelihood along with the rejected ones'.

    A token mean, not a mean over pairs: split across micro-batches, its parts are weighed by
    token counts, not pair counts.

    Worked example: logps_c [-3, -5], tokens [2, 3]: 8 / 5 = 1.6.
    """
    nll = -logps_c.sum() / tokens_c.sum().clamp(min=1)
    return nll, {"nll": float(nll.detach())}


@dataclass(frozen=True)
class PairHyper:
    """The hyperparameters a paired loss may read; each kind reads its own."""

    beta: float
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    orpo_lambda: float = 0.1


# (chosen, rejected, ref_chosen, ref_rejected, hyperparameters) -> (loss, metrics)
PairedLoss = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, PairHyper],
    tuple[torch.Tensor, dict[str, float]],
]

PAIRED: dict[str, PairedLoss] = {
    "sigmoid": lambda c, r, rc, rr, h: dpo_loss(c, r, rc, rr, beta=h.beta),
    "cdpo": lambda c, r, rc, rr, h: dpo_loss(c, r, rc, rr, beta=h.beta, label_smoothing=h.label_smoothing),
    "robust": lambda c, r, rc, rr, h: robust_dpo_loss(
        c, r, rc, rr, beta=h.beta, label_smoothing=h.label_smoothing
    ),
    "ipo": lambda c, r, rc, rr, h: ipo_loss(c, r, rc, rr, beta=h.beta),
    "hinge": lambda c, r, rc, rr, h: hinge_loss(c, r, rc, rr, beta=h.beta),
    "simpo": lambda c, r, _rc, _rr, h: simpo_loss(c, r, beta=h.beta, gamma=h.simpo_gamma),
    "orpo": lambda c, r, _rc, _rr, h: orpo_loss(c, r, lam=h.orpo_lambda),
}
REFERENCE_FREE = frozenset({"simpo", "orpo"})
SMOOTHED = frozenset({"cdpo", "robust"})  # the kinds that read label_smoothing
# The kinds that see per-token averages of the log-probs (policy and reference alike).
# simpo and orpo are defined on averages. ipo follows TRL's DPOTrainer (loss_type "ipo"
# divides each log-ratio by the completion length): on summed log-probs the squared loss
# grows with length, so one beta cannot suit short and long completions, and TRL notes that
# the IPO authors confirmed their reported results use the length-normalized form.
LENGTH_AVERAGED = frozenset({"ipo", "simpo", "orpo"})


def paired_loss(
    kind: str,
    p: PairLogps,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    orpo_lambda: float = 0.1,
    rpo_alpha: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The paired loss `kind` (a key of PAIRED) on p, plus rpo_alpha * chosen_nll when > 0.

    Metrics, the same keys for every kind: rewards/{chosen,rejected,margin,accuracy} (the
    implicit rewards the loss compares: beta * (logps - ref), on averages for ipo; beta * avg
    for simpo; avg for orpo) and logps/{chosen,rejected} (means of the summed log-probs); "nll"
    too where the loss has an NLL term (orpo, or rpo_alpha > 0).

    Worked example: "sigmoid" with policy == reference is log 2 = 0.6931 for any beta; with
    rpo_alpha 1 and chosen logps [-3, -5] over [2, 3] tokens it is 0.6931 + 1.6 = 2.2931.
    """
    if kind not in PAIRED:
        raise ValueError(f"unknown preference loss {kind!r}; one of {sorted(PAIRED)}")
    needs_ref = kind not in REFERENCE_FREE
    if needs_ref and (p.ref_chosen is None or p.ref_rejected is None):
        raise ValueError(f"preference loss {kind!r} needs reference log-probs (ref_chosen, ref_rejected)")
    if label_smoothing and kind not in SMOOTHED:
        raise ValueError(f"label_smoothing is read only by {sorted(SMOOTHED)}, not {kind!r}")
    if rpo_alpha < 0 or (rpo_alpha > 0 and kind == "orpo"):
        raise ValueError(f"rpo_alpha must be >= 0, and 0 for orpo (it has its own NLL term); got {rpo_alpha}")
    c, r = p.chosen, p.rejected  # (N,)
    # a reference-free kind never reads these; zeros keep one signature for PAIRED
    rc = p.ref_chosen if p.ref_chosen is not None else torch.zeros_like(c)
    rr = p.ref_rejected if p.ref_rejected is not None else torch.zeros_like(r)
    if kind in LENGTH_AVERAGED:
        nc, nr = p.chosen_tokens.clamp(min=1), p.rejected_tokens.clamp(min=1)
        c, r, rc, rr = c / nc, r / nr, rc / nc, rr / nr
    hyper = PairHyper(beta, label_smoothing, simpo_gamma, orpo_lambda)
    loss, metrics = PAIRED[kind](c, r, rc, rr, hyper)
    metrics["logps/chosen"] = float(p.chosen.detach().mean())
    metrics["logps/rejected"] = float(p.rejected.detach().mean())
    if rpo_alpha > 0:
        nll, m = chosen_nll(p.chosen, p.chosen_tokens)
        loss = loss + rpo_alpha * nll
        metrics |= m
    return loss, metrics
