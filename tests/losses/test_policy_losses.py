"""Policy losses: closed forms, a naive reference for every choice combination, float64
gradcheck, the on-policy REINFORCE gradient, GSPO's gradient, accumulation and data-parallel
invariance, masked padding never read, and the chunked token entropy."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch

from lmforge.losses.policy import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    RATIOS,
    Aggregation,
    aggregate,
    kl_penalty,
    policy_loss,
    token_entropy,
    token_weights,
    weight_of,
)

# float64 results of at most ~40 O(1) terms, each a few ulps (2.2e-16) off: the absolute error
# stays far below 1e-13, and a relative 1e-12 covers the exp/log of the larger values
F64 = {"rel": 1e-12, "abs": 1e-13}
D = torch.float64
T = torch.tensor
AGGS: list[Aggregation] = sorted(AGGREGATIONS)
MAX_TOKENS = 8  # Dr. GRPO's constant: a generation budget, deliberately not the batch's T (6)


def _f(x: torch.Tensor) -> float:
    return float(x.detach())


def _max_tokens(agg: str) -> int | None:
    return MAX_TOKENS if agg == "seq_mean_token_sum_norm" else None


# rows as a rollout batch has them: prompt positions first, padding at the end, a tool output's
# hole in the middle, and an all-padding row (2) that a fixed-shape batch may carry
MASK = T([[0, 1, 1, 1, 1, 0],
          [1, 1, 1, 1, 1, 1],
          [0, 0, 0, 0, 0, 0],
          [1, 1, 0, 0, 0, 0],
          [0, 0, 1, 0, 1, 1],
          [1, 0, 0, 0, 0, 0],
          [1, 1, 1, 0, 0, 0]], dtype=torch.bool)


def _batch(seed: int, spread: float = 0.25) -> dict[str, torch.Tensor]:
    """Random (7, 6) inputs: old_logps off by `spread` so that clip 0.2 catches some tokens."""
    g = torch.Generator().manual_seed(seed)
    B, Tn = MASK.shape

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=D)

    logps = -0.1 - 2.9 * torch.rand(B, Tn, generator=g, dtype=D)
    old = logps + spread * randn(B, Tn)
    return {
        "logps": logps.requires_grad_(True),
        "old_logps": old,
        "advantages": randn(B),
        "loss_mask": MASK,
        "ref_logps": logps.detach() + 0.3 * randn(B, Tn),
        "rollout_logps": old + 0.3 * randn(B, Tn),
        "entropies": (3 * torch.rand(B, Tn, generator=g, dtype=D)).requires_grad_(True),
    }


def _rows(b: dict[str, torch.Tensor], lo: int, hi: int) -> dict[str, torch.Tensor]:
    return {k: v[lo:hi] for k, v in b.items()}


# ------------------------------------------------------------------------------- closed forms


def test_aggregate_closed_form() -> None:
    x = T([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]], dtype=D)
    mask = T([[1, 1, 1], [1, 0, 0], [0, 0, 0]])  # row 2: padding, never counted
    assert float(aggregate(x, mask, "token_mean")) == 2.5  # 10 / 4 tokens
    assert float(aggregate(x, mask, "seq_mean_token_mean")) == 3.0  # (6/3 + 4/1) / 2
    assert float(aggregate(x, mask, "seq_mean_token_sum_norm", max_tokens=4)) == 1.25  # (6/4 + 4/4) / 2
    assert weight_of(mask, "token_mean") == 4.0
    assert weight_of(mask, "seq_mean_token_mean") == weight_of(mask, "seq_mean_token_sum_norm") == 2.0
    assert torch.allclose(token_weights(mask[:2].double(), "seq_mean_token_mean"),
                          T([[1 / 6, 1 / 6, 1 / 6], [1 / 2, 0, 0]], dtype=D), rtol=1e-15, atol=0)
    assert token_weights(mask[:2].double(), "seq_mean_token_sum_norm", 4).tolist() == [[0.125] * 3, [0.125, 0, 0]]


def test_aggregate_of_nothing_is_zero_with_weight_zero() -> None:
    x = T([[float("nan"), 1.0]], dtype=D)  # a value under the mask is never read
    for agg in AGGS:
        assert float(aggregate(x, T([[0, 0]]), agg, max_tokens=_max_tokens(agg))) == 0.0
        assert weight_of(T([[0, 0]]), agg) == 0.0


def test_kl_estimators_closed_form() -> None:
    logps, ref = T([math.log(0.5)], dtype=D), T([math.log(0.25)], dtype=D)  # x = -log 2
    ln2 = math.log(2)
    assert float(kl_penalty(logps, ref, "k1")) == pytest.approx(ln2, **F64)
    assert float(kl_penalty(logps, ref, "k2")) == pytest.approx(ln2**2 / 2, **F64)
    assert float(kl_penalty(logps, ref, "k3")) == pytest.approx(0.5 + ln2 - 1, **F64)
    assert float(kl_penalty(logps, ref, "k3")) == pytest.approx(0.1931, abs=1e-4)
    assert float(kl_penalty(logps, ref, "none")) == 0.0
    # k3 near x = 0 is x^2/2 + x^3/6 + ...: e^x - x - 1 computed naively would lose it entirely
    x = 1e-7
    got = float(kl_penalty(T([0.0], dtype=D), T([x], dtype=D), "k3"))
    assert got == pytest.approx(x * x / 2 + x**3 / 6, rel=1e-8)


def test_kl_estimators_are_unbiased_and_have_their_gradients() -> None:
    """Exact expectations over y ~ pi on a 5-token vocabulary: k1 and k3 average to
    KL(pi || ref), k2 does not; as loss terms, k1's gradient averages to 0, k2's to the gradient
    of KL(pi || ref), k3's to the gradient of KL(ref || pi)."""
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(5, generator=g, dtype=D, requires_grad=True)
    ref = torch.randn(5, generator=g, dtype=D).log_softmax(-1)  # (V,)
    logp = theta.log_softmax(-1)  # (V,)
    p = logp.exp().detach()  # (V,) the sampling distribution: not differentiated
    kl_fwd = (logp.exp() * (logp - ref)).sum()  # KL(pi || ref)
    kl_rev = (ref.exp() * (ref - logp)).sum()  # KL(ref || pi)
    (g_fwd,) = torch.autograd.grad(kl_fwd, theta, retain_graph=True)
    (g_rev,) = torch.autograd.grad(kl_rev, theta, retain_graph=True)
    expected = {name: (p * kl_penalty(logp, ref, name)).sum() for name in ("k1", "k2", "k3")}
    assert _f(expected["k1"]) == pytest.approx(_f(kl_fwd), **F64)
    assert _f(expected["k3"]) == pytest.approx(_f(kl_fwd), **F64)
    assert abs(_f(expected["k2"]) - _f(kl_fwd)) > 1e-3
    grads = {k: torch.autograd.grad(v, theta, retain_graph=True)[0] for k, v in expected.items()}
    assert torch.allclose(grads["k1"], torch.zeros(5, dtype=D), atol=1e-15)
    assert torch.allclose(grads["k2"], g_fwd, rtol=1e-12, atol=1e-15)
    assert torch.allclose(grads["k3"], g_rev, rtol=1e-12, atol=1e-15)


def test_clipped_surrogate_every_branch() -> None:
    # one token per case: (A, r) = (+1, 1.5) clipped high; (+1, 0.5) unclipped (the clip below
    # 1 - lo does not bind for A > 0); (-1, 0.5) clipped low; (-1, 1.5) unclipped; (+1, 1.25)
    # inside clip-higher's 1.28 but beyond a symmetric 1.2
    r = T([[1.5, 0.5, 0.5, 1.5, 1.25]], dtype=D)
    adv = T([[1.0, 1.0, -1.0, -1.0, 1.0]], dtype=D)
    logps = r.log().requires_grad_(True)
    mask = torch.ones(1, 5)
    loss, m = policy_loss(logps, torch.zeros_like(logps), adv, mask, clip_low=0.2, clip_high=0.28)
    pg = [-1.28, -0.5, 0.8, 1.5, -1.25]
    assert _f(loss) == pytest.approx(sum(pg) / 5, **F64)
    (g,) = torch.autograd.grad(loss, logps)
    # d(-r A)/d logp = -r A where unclipped, 0 where clipped
    assert g[0].tolist() == pytest.approx([0.0, -0.5 / 5, 0.0, 1.5 / 5, -1.25 / 5], **F64)
    assert m["clip_frac/high"] == m["clip_frac/low"] == 0.2 and m["clip_frac"] == 0.4
    assert m["ratio/mean"] == pytest.approx((1.5 + 0.5 + 0.5 + 1.5 + 1.25) / 5, **F64)
    assert m["pg_loss"] == m["loss"] == pytest.approx(sum(pg) / 5, **F64)
    sym, m_sym = policy_loss(logps, torch.zeros_like(logps), adv, mask, clip_low=0.2, clip_high=0.2)
    assert _f(sym) == pytest.approx((-1.2 - 0.5 + 0.8 + 1.5 - 1.2) / 5, **F64)
    assert m_sym["clip_frac/high"] == 0.4


def test_gspo_sequence_ratio_closed_form() -> None:
    logps = T([[0.1, 0.3]], dtype=D, requires_grad=True)
    old, mask, adv = torch.zeros(1, 2, dtype=D), torch.ones(1, 2), T([1.0], dtype=D)
    # wide clip: every token's ratio is the sequence's exp(mean log-ratio) = exp(0.2) = 1.2214
    loss, m = policy_loss(logps, old, adv, mask, ratio_level="sequence", clip_low=0.5, clip_high=0.5)
    s = math.exp(0.2)
    assert m["ratio/mean"] == pytest.approx(s, **F64) and _f(loss) == pytest.approx(-s, **F64)
    (g,) = torch.autograd.grad(loss, logps)
    assert g[0].tolist() == pytest.approx([-s / 2, -s / 2], **F64)  # -A s_i per token, over 2 tokens
    # GSPO's tiny range (3e-4, 4e-4): 1.2214 > 1.0004 and A > 0, so the sequence is clipped
    loss, m = policy_loss(logps, old, adv, mask, ratio_level="sequence", clip_low=3e-4, clip_high=4e-4)
    assert _f(loss) == pytest.approx(-1.0004, **F64) and m["clip_frac/high"] == 1.0
    assert torch.autograd.grad(loss, logps)[0].abs().max() == 0


def test_truncated_importance_sampling_closed_form() -> None:
    logps = torch.zeros(1, 2, dtype=D, requires_grad=True)
    old = torch.zeros(1, 2, dtype=D)  # on-policy for the trainer: ratio 1
    rollout = -T([[math.log(1.5), math.log(3.0)]], dtype=D)  # old - rollout = [log 1.5, log 3]
    mask, adv = torch.ones(1, 2), T([1.0], dtype=D)
    loss, m = policy_loss(logps, old, adv, mask, rollout_logps=rollout, is_cap=2.0)
    assert _f(loss) == pytest.approx(-(1.5 + 2.0) / 2, **F64)  # weights [1.5, min(3, 2)]
    assert m["is/weight_mean"] == pytest.approx(1.75, **F64) and m["is/truncated_frac"] == 0.5
    assert m["is/gap"] == pytest.approx((math.log(1.5) + math.log(3)) / 2, **F64)
    assert m["is/gap"] == pytest.approx(0.7520, abs=1e-4)
    (g,) = torch.autograd.grad(loss, logps)
    assert g[0].tolist() == pytest.approx([-1.5 / 2, -2.0 / 2], **F64)  # the weight is a constant
    off, m_off = policy_loss(logps, old, adv, mask, rollout_logps=rollout, is_cap=None)
    assert _f(off) == -1.0 and "is/weight_mean" not in m_off and "is/gap" in m_off


def test_kl_and_entropy_terms_closed_form() -> None:
    logps = torch.full((1, 2), math.log(0.5), dtype=D)
    ref = torch.full((1, 2), math.log(0.25), dtype=D)
    ent = T([[1.0, 2.0]], dtype=D)
    zero = torch.zeros(1, dtype=D)  # A = 0: only the KL and entropy terms remain
    k3 = 0.5 + math.log(2) - 1
    loss, m = policy_loss(logps, logps, zero, torch.ones(1, 2), ref_logps=ref, kl="k3", beta=0.1,
                          entropies=ent, entropy_coef=0.01)
    assert _f(loss) == pytest.approx(0.1 * k3 - 0.01 * 1.5, **F64)
    assert m["kl"] == pytest.approx(k3, **F64) and m["entropy"] == 1.5 and m["pg_loss"] == 0.0
    # the KL is reported at beta 0 but not added; kl "none" neither reports nor adds it
    loss0, m0 = policy_loss(logps, logps, zero, torch.ones(1, 2), ref_logps=ref, kl="k2")
    assert float(loss0) == 0.0 and m0["kl"] == pytest.approx(math.log(2) ** 2 / 2, **F64)
    lossn, mn = policy_loss(logps, logps, zero, torch.ones(1, 2), ref_logps=ref, kl="none", beta=0.1)
    assert float(lossn) == 0.0 and "kl" not in mn


# ------------------------------------------------------------------------ naive reference


def _naive_aggregate(vals: dict[tuple[int, int], float], mask: list[list[bool]], agg: str,
                     max_tokens: int | None) -> float:
    if agg == "token_mean":
        return sum(vals.values()) / max(len(vals), 1)
    seqs = [[vals[i, t] for t in range(len(row)) if row[t]] for i, row in enumerate(mask)]
    seqs = [s for s in seqs if s]
    assert max_tokens is not None or agg == "seq_mean_token_mean"
    per = [sum(s) / (len(s) if agg == "seq_mean_token_mean" else max_tokens) for s in seqs]
    return sum(per) / max(len(per), 1)


def _naive_policy_loss(b: dict[str, torch.Tensor], *, ratio_level: str, agg: str, kl: str,
                       use_is: bool, beta: float, coef: float, lo: float, hi: float,
                       cap: float = 2.0) -> tuple[float, dict[str, float]]:
    """policy_loss one token at a time in Python floats, straight from the formulas."""
    L, OLD, R, RO, E = (b[k].tolist() for k in ("logps", "old_logps", "ref_logps", "rollout_logps", "entropies"))
    A, M = b["advantages"].tolist(), b["loss_mask"].tolist()
    pg, kls, ents, ratios, ws, gaps = {}, {}, {}, {}, {}, {}
    n_low = n_high = n_trunc = 0
    for i, row in enumerate(M):
        idx = [t for t in range(len(row)) if row[t]]
        s = math.exp(sum(L[i][t] - OLD[i][t] for t in idx) / len(idx)) if idx else 1.0
        for t in idx:
            r = math.exp(L[i][t] - OLD[i][t]) if ratio_level == "token" else s
            a = A[i]
            clipped = min(max(r, 1 - lo), 1 + hi)
            pg[i, t] = -min(r * a, clipped * a)
            n_high += r > 1 + hi and a > 0
            n_low += r < 1 - lo and a < 0
            raw = math.exp(OLD[i][t] - RO[i][t])
            gaps[i, t], ws[i, t] = abs(OLD[i][t] - RO[i][t]), min(raw, cap)
            n_trunc += raw > cap
            if use_is:
                pg[i, t] *= ws[i, t]
            x = R[i][t] - L[i][t]
            kls[i, t] = {"k1": -x, "k2": x * x / 2, "k3": math.exp(x) - x - 1, "none": 0.0}[kl]
            ents[i, t], ratios[i, t] = E[i][t], r
    n = len(pg)
    pg_loss = _naive_aggregate(pg, M, agg, _max_tokens(agg))
    loss = (pg_loss + beta * _naive_aggregate(kls, M, agg, _max_tokens(agg))
            - coef * _naive_aggregate(ents, M, agg, _max_tokens(agg)))
    m = {"pg_loss": pg_loss, "loss": loss, "clip_frac/low": n_low / n, "clip_frac/high": n_high / n,
         "clip_frac": (n_low + n_high) / n, "ratio/mean": sum(ratios.values()) / n,
         "entropy": sum(ents.values()) / n, "is/gap": sum(gaps.values()) / n}
    if kl != "none":
        m["kl"] = sum(kls.values()) / n
    if use_is:
        m |= {"is/weight_mean": sum(ws.values()) / n, "is/truncated_frac": n_trunc / n}
    return loss, m


@pytest.mark.parametrize(("ratio_level", "agg", "kl", "use_is"),
                         list(itertools.product(sorted(RATIOS), AGGS, sorted(KL_ESTIMATORS), [False, True])))
def test_policy_loss_matches_naive_loop(ratio_level: str, agg: str, kl: str, use_is: bool) -> None:
    b = _batch(1)
    # asymmetric clip, wide enough for the sequence-level ratios (closer to 1) to hit it too
    lo, hi = (0.2, 0.28) if ratio_level == "token" else (0.05, 0.08)
    loss, m = policy_loss(**b, ratio_level=ratio_level, aggregation=agg, max_tokens=_max_tokens(agg),
                          kl=kl, beta=0.07, entropy_coef=0.01, clip_low=lo, clip_high=hi,
                          is_cap=2.0 if use_is else None)
    want, want_m = _naive_policy_loss(b, ratio_level=ratio_level, agg=agg, kl=kl, use_is=use_is,
                                      beta=0.07, coef=0.01, lo=lo, hi=hi)
    assert _f(loss) == pytest.approx(want, **F64)
    assert set(m) == set(want_m)
    for k, v in want_m.items():
        assert m[k] == pytest.approx(v, **F64), k
    assert 0 < m["clip_frac"] < 1  # the batch does exercise both branches


# ------------------------------------------------------------------------------ gradients


def _far_from_clip_edges(b: dict[str, torch.Tensor], ratio_level: str, lo: float, hi: float) -> bool:
    """Finite differences straddling a clip edge would see the kink, not the derivative."""
    with torch.no_grad():
        d = b["logps"] - b["old_logps"]
        m = b["loss_mask"].double()
        if ratio_level == "sequence":
            d = ((d * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)).expand_as(d)
        r = d.exp()[b["loss_mask"]]
        return bool(((r - (1 - lo)).abs().min() > 1e-4) and ((r - (1 + hi)).abs().min() > 1e-4))


@pytest.mark.parametrize(("ratio_level", "agg"), list(itertools.product(sorted(RATIOS), AGGS)))
def test_policy_loss_gradcheck(ratio_level: str, agg: str) -> None:
    b = _batch(2)
    lo, hi = (0.2, 0.28) if ratio_level == "token" else (0.05, 0.08)
    assert _far_from_clip_edges(b, ratio_level, lo, hi)
    if ratio_level == "token":
        # per-token advantages and IS weights: allowed at token level, where each token's ratio
        # is its own
        b["advantages"] = b["advantages"][:, None] + 0.1 * b["ref_logps"]
        extra: dict[str, Any] = {"is_cap": 1.5}
    else:
        # GSPO's ratio has GSPO-token's gradient, which is the gradient of the loss's value only
        # when every token of a sequence weighs the same (one advantage per sequence, no IS)
        extra = {"rollout_logps": None}
    args = {k: v for k, v in b.items() if k not in ("logps", "entropies")} | extra

    def f(logps: torch.Tensor, entropies: torch.Tensor) -> torch.Tensor:
        return policy_loss(logps, entropies=entropies, ratio_level=ratio_level, aggregation=agg,
                           max_tokens=_max_tokens(agg), clip_low=lo, clip_high=hi, kl="k3",
                           beta=0.1, entropy_coef=0.03, **args)[0]

    assert torch.autograd.gradcheck(f, (b["logps"], b["entropies"]))


@pytest.mark.parametrize(("ratio_level", "agg"), list(itertools.product(sorted(RATIOS), AGGS)))
def test_on_policy_gradient_is_reinforce(ratio_level: str, agg: str) -> None:
    """At old_logps == logps every ratio is 1: nothing clips and d loss / d logps[i, t] is
    -A_i times the token's aggregation weight, GRPO's REINFORCE-with-baseline gradient."""
    b = _batch(3)
    logps, adv = b["logps"], b["advantages"]
    loss, m = policy_loss(logps, logps.detach(), adv, MASK, ratio_level=ratio_level, aggregation=agg,
                          max_tokens=_max_tokens(agg), clip_low=0.2, clip_high=0.28)
    assert m["clip_frac"] == 0.0 and m["ratio/mean"] == 1.0
    (g,) = torch.autograd.grad(loss, logps)
    n_i = MASK.sum(-1, keepdim=True).double()  # (B, 1) tokens per sequence
    n_tok, n_seq = float(MASK.sum()), float((n_i > 0).sum())  # 19 tokens, 6 sequences
    weight = {"token_mean": 1 / n_tok * torch.ones_like(n_i),
              "seq_mean_token_mean": 1 / (n_seq * n_i.clamp(min=1)),
              "seq_mean_token_sum_norm": 1 / (n_seq * MAX_TOKENS) * torch.ones_like(n_i)}[agg]
    want = torch.where(MASK, -adv[:, None] * weight, 0.0)  # (B, T)
    assert torch.allclose(g, want, rtol=1e-14, atol=1e-17)


def test_gspo_gradient_is_the_sequence_objective_gradient() -> None:
    """GSPO's objective: -1/G sum_i min(s_i A_i, clip(s_i) A_i), s_i = exp(mean_t log-ratio), written
    directly with no stop-gradient trick, has policy_loss's value and gradient under
    seq_mean_token_mean; analytically d/d logps[i, t] = -A_i s_i / (G |y_i|), 0 when clipped."""
    b = _batch(4)
    logps, old, adv = b["logps"], b["old_logps"], b["advantages"]
    lo, hi = 0.05, 0.08
    loss, m = policy_loss(logps, old, adv, MASK, ratio_level="sequence", aggregation="seq_mean_token_mean",
                          clip_low=lo, clip_high=hi)
    (g,) = torch.autograd.grad(loss, logps)
    rows = MASK.any(-1)
    n_i = MASK.sum(-1).double().clamp(min=1)  # (B,)
    s = (((logps - old) * MASK).sum(-1) / n_i).exp()  # (B,)
    direct = -torch.minimum(s * adv, s.clamp(1 - lo, 1 + hi) * adv)[rows].mean()
    (g_direct,) = torch.autograd.grad(direct, logps)
    assert _f(loss) == pytest.approx(_f(direct), **F64)
    assert torch.allclose(g, g_direct, rtol=1e-12, atol=1e-16)
    s_, a = s.detach(), adv
    clipped = ((s_ > 1 + hi) & (a > 0)) | ((s_ < 1 - lo) & (a < 0))
    assert 0 < int(clipped[rows].sum()) < int(rows.sum())  # both kinds of sequence present
    per_seq = torch.where(clipped, 0.0, -a * s_ / (rows.sum() * n_i))  # (B,)
    assert torch.allclose(g, torch.where(MASK, per_seq[:, None], 0.0), rtol=1e-12, atol=1e-16)
    assert m["clip_frac"] == pytest.approx(int((clipped[:, None] & MASK).sum()) / int(MASK.sum()), **F64)


def test_gspo_token_gradient_with_per_token_weights() -> None:
    """GSPO-token: with per-token advantages and IS weights the gradient w.r.t.
    logps[i, t] is the token's own -w_agg A_i,t is_w_i,t s_i (0 where clipped). Letting the
    gradient flow through s_i instead would spread each token's term over its whole sequence,
    which the uniform-weight tests above cannot tell apart."""
    b = _batch(11)
    logps, old, rollout = b["logps"], b["old_logps"], b["rollout_logps"]
    adv = _rand_like(logps, 12)  # (B, T)
    lo, hi = 0.05, 0.08
    loss, _ = policy_loss(logps, old, adv, MASK, ratio_level="sequence", clip_low=lo, clip_high=hi,
                          rollout_logps=rollout, is_cap=1.5)
    (g,) = torch.autograd.grad(loss, logps)
    n_i = MASK.sum(-1, keepdim=True).double().clamp(min=1)  # (B, 1)
    s = (((logps - old) * MASK).sum(-1, keepdim=True) / n_i).exp().detach()  # (B, 1)
    is_w = (old - rollout).exp().clamp(max=1.5)  # (B, T)
    clipped = ((s > 1 + hi) & (adv > 0)) | ((s < 1 - lo) & (adv < 0))  # (B, T)
    want = torch.where(MASK & ~clipped, -adv * is_w * s / MASK.sum(), 0.0)  # token_mean: 1/19
    assert bool((clipped & MASK).any()) and bool((~clipped & MASK).any())
    assert torch.allclose(g, want, rtol=1e-12, atol=1e-16)


def _rand_like(x: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)


def test_masked_positions_are_never_read() -> None:
    """inf and nan under the mask in every input leave the loss and its gradients unchanged."""
    clean = _batch(5)
    dirty = {k: v.detach().clone() for k, v in clean.items()}
    for k in ("logps", "old_logps", "ref_logps", "rollout_logps", "entropies"):
        dirty[k][~MASK] = float("nan") if k != "old_logps" else -float("inf")
    dirty["advantages"] = dirty["advantages"][:, None].expand(-1, 6).clone()
    dirty["advantages"][~MASK] = float("inf")
    for k in ("logps", "entropies"):
        dirty[k].requires_grad_(True)
    kw: dict[str, Any] = {"ratio_level": "token", "kl": "k3", "beta": 0.1, "entropy_coef": 0.01}
    for level in ("token", "sequence"):
        kw["ratio_level"] = level
        a, ma = policy_loss(**clean, **kw)
        b, mb = policy_loss(**dirty, **kw)
        assert _f(a) == pytest.approx(_f(b), **F64) and ma == pytest.approx(mb, **F64)
        ga = torch.autograd.grad(a, (clean["logps"], clean["entropies"]))
        gb = torch.autograd.grad(b, (dirty["logps"], dirty["entropies"]))
        for x, y in zip(ga, gb):
            assert torch.isfinite(y).all() and torch.allclose(x, y, rtol=1e-14, atol=0)


# -------------------------------------------------------------- accumulation and sharding

SPLITS = {
    "micro-batches": [(0, 2), (2, 3), (3, 7)],  # (2, 3) holds only the padding row: weight 0
    "2 shards": [(0, 4), (4, 7)],
    "3 shards": [(0, 3), (3, 5), (5, 7)],
}
EVERYTHING: dict[str, Any] = {"kl": "k3", "beta": 0.05, "entropy_coef": 0.02, "clip_low": 0.2,
                              "clip_high": 0.28, "is_cap": 1.5}


def _loss(b: dict[str, torch.Tensor], level: str, agg: Aggregation) -> torch.Tensor:
    return policy_loss(**b, ratio_level=level, aggregation=agg, max_tokens=_max_tokens(agg),
                       **EVERYTHING)[0]


@pytest.mark.parametrize("split", sorted(SPLITS))
@pytest.mark.parametrize(("level", "agg"), list(itertools.product(sorted(RATIOS), AGGS)))
def test_accumulation_invariant(level: str, agg: Aggregation, split: str) -> None:
    """train/loop.py's accumulation: sum_k loss_k * w_k / sum_k w_k, w = weight_of."""
    b = _batch(6)
    leaves = (b["logps"], b["entropies"])
    full = _loss(b, level, agg)
    g_full = torch.autograd.grad(full, leaves)
    ws = [weight_of(MASK[lo:hi], agg) for lo, hi in SPLITS[split]]
    acc = sum(_loss(_rows(b, lo, hi), level, agg) * w / sum(ws) for (lo, hi), w in zip(SPLITS[split], ws))
    assert isinstance(acc, torch.Tensor)
    g_acc = torch.autograd.grad(acc, leaves)
    assert _f(acc) == pytest.approx(_f(full), **F64)
    for x, y in zip(g_acc, g_full):
        assert torch.allclose(x, y, rtol=1e-12, atol=1e-16)


@pytest.mark.parametrize("n_shards", [2, 3])
@pytest.mark.parametrize("agg", AGGS)
def test_data_parallel_invariant(agg: Aggregation, n_shards: int) -> None:
    """DDP averages the ranks' gradients; each rank scales its mean loss by
    world * w_rank / sum(w) (the sum an all-reduce of weight_of), so the average is the full
    batch's gradient. Each rank differentiates only its own loss, as a rank would."""
    b = _batch(7)
    full = _loss(b, "sequence", agg)
    g_full = torch.autograd.grad(full, b["logps"])[0]
    shards = SPLITS[f"{n_shards} shards"]
    ws = [weight_of(MASK[lo:hi], agg) for lo, hi in shards]
    grads, losses = [], []
    for (lo, hi), w in zip(shards, ws):
        rank = {k: v.detach()[lo:hi].clone() for k, v in b.items()}
        rank["logps"].requires_grad_(True)
        scaled = _loss(rank, "sequence", agg) * n_shards * w / sum(ws)
        grads.append(torch.autograd.grad(scaled, rank["logps"])[0])
        losses.append(_f(scaled))
    assert sum(losses) / n_shards == pytest.approx(_f(full), **F64)
    assert torch.allclose(torch.cat(grads) / n_shards, g_full, rtol=1e-12, atol=1e-16)


# ------------------------------------------------------------------------------- errors


def test_policy_loss_rejects_bad_requests() -> None:
    b = _batch(8)
    bad: list[tuple[dict[str, Any], str]] = [
        ({"aggregation": "seq_mean_token_sum_norm"}, "max_tokens"),  # Dr. GRPO needs its constant
        ({"max_tokens": 8}, "max_tokens"),  # read by seq_mean_token_sum_norm only
        ({"aggregation": "sum"}, "aggregation"),
        ({"ratio_level": "segment"}, "ratio_level"),
        ({"kl": "k4"}, "KL"),
        ({"ref_logps": None, "beta": 0.1}, "ref_logps"),
        ({"beta": -0.1}, "beta"),
        ({"entropies": None, "entropy_coef": 0.1}, "entropies"),
        ({"is_cap": 0.0}, "is_cap"),
        ({"clip_low": 1.0}, "clip"),
        ({"advantages": torch.zeros(3)}, "advantages"),
    ]
    for kw, match in bad:
        with pytest.raises(ValueError, match=match):
            policy_loss(**(b | kw))
    assert torch.isfinite(policy_loss(**(b | {"ref_logps": None}), beta=0.0)[0])  # no KL: no ref needed


# ------------------------------------------------------------------------------ entropy


def _naive_entropy(logits: torch.Tensor) -> torch.Tensor:
    p = logits.double().softmax(-1)
    return -(p * p.log()).sum(-1)


def test_token_entropy_closed_form() -> None:
    assert token_entropy(torch.zeros(2, 3, 4, dtype=D)).flatten().tolist() == pytest.approx([math.log(4)] * 6, **F64)
    got = float(token_entropy(T([[math.log(3), 0.0]], dtype=D))[0])
    assert got == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), **F64)
    assert got == pytest.approx(0.5623, abs=1e-4)
    # a one-hot distribution (a logit gap past exp's range) has entropy 0, not nan
    assert float(token_entropy(T([[0.0, -1e4]], dtype=D))[0]) == 0.0


def test_token_entropy_matches_naive_and_chunks() -> None:
    g = torch.Generator().manual_seed(9)
    logits = 3 * torch.randn(3, 5, 17, generator=g, dtype=D)
    want = _naive_entropy(logits)
    for chunk in (1, 4, 7, 1000):
        got = token_entropy(logits, chunk_rows=chunk)
        assert got.shape == (3, 5) and torch.allclose(got, want, rtol=1e-13, atol=1e-15)
    w = torch.randn(3, 5, generator=g, dtype=D)
    x = logits.clone().requires_grad_(True)
    (ga,) = torch.autograd.grad((token_entropy(x, chunk_rows=4) * w).sum(), x)
    (gb,) = torch.autograd.grad((_naive_entropy(x) * w).sum(), x)
    assert torch.allclose(ga, gb, rtol=1e-12, atol=1e-15)


def test_token_entropy_gradcheck() -> None:
    g = torch.Generator().manual_seed(10)
    logits = torch.randn(3, 4, 5, generator=g, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: token_entropy(x, chunk_rows=5), (logits,))


def test_token_entropy_keeps_no_fp32_copy_for_backward() -> None:
    # DESIGN rule 4: for bf16 logits the backward keeps the logits as given plus one fp32
    # logsumexp and one fp32 entropy per position, never an fp32 (N, V) copy
    N, V = 64, 512
    logits = torch.randn(4, N // 4, V).bfloat16().requires_grad_(True)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = token_entropy(logits, chunk_rows=8)
    assert sum(saved) == N * V * 2 + N * (4 + 4)
    assert out.dtype == torch.float32 and out.shape == (4, N // 4)
    # fp32 accumulation over 512 terms of the same bf16 values: ~1e-6 relative
    assert torch.allclose(out.double(), _naive_entropy(logits.detach()), rtol=1e-5, atol=1e-6)
    (gr,) = torch.autograd.grad(out.sum(), logits)
    assert gr.dtype == torch.bfloat16


# ------------------------------------------------------------------------------- value loss


def test_value_loss_closed_form_and_gradient() -> None:
    from lmforge.losses.policy import value_loss

    v = torch.tensor([[1.0, 2.0, 7.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[0.5, 2.0, float("nan")]], dtype=torch.float64)  # padding is never read
    ret = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]])
    loss, m = value_loss(v, old, ret, mask, clip=0.2)
    assert float(loss) == pytest.approx(0.6725, rel=1e-12)
    assert m["vf_clipfrac"] == 0.5
    loss.backward()
    assert v.grad[0].tolist() == pytest.approx([0.0, 0.5, 0.0], rel=1e-12)
    plain, _ = value_loss(v.detach(), old, ret, mask, clip=None)
    assert float(plain) == pytest.approx(0.5 * (1 + 1) / 2, rel=1e-12)


def test_value_loss_matches_naive_loop_and_explained_variance() -> None:
    from lmforge.losses.policy import value_loss

    g = torch.Generator().manual_seed(0)
    v, old, ret = (torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(3))
    mask = (torch.rand(4, 6, generator=g) > 0.3).long()
    mask[:, 0] = 1
    loss, m = value_loss(v, old, ret, mask, clip=0.3)
    terms = []
    for b in range(4):
        for t in range(6):
            if mask[b, t]:
                vc = old[b, t] + max(-0.3, min(0.3, float(v[b, t] - old[b, t])))
                terms.append(max((v[b, t] - ret[b, t]) ** 2, (vc - ret[b, t]) ** 2))
    assert float(loss) == pytest.approx(0.5 * float(sum(terms)) / len(terms), rel=1e-12)
    r, e = ret[mask.bool()], (ret - v)[mask.bool()]
    assert m["explained_variance"] == pytest.approx(float(1 - e.var(unbiased=False) / r.var(unbiased=False)),
                                                    rel=1e-12)
    # a perfect critic explains everything and, unclipped, has zero loss
    loss, m = value_loss(ret, old, ret, mask, clip=None)
    assert float(loss) == 0.0 and m["explained_variance"] == 1.0
