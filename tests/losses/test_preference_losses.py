"""Preference losses: closed forms, naive references, float64 gradcheck, accumulation invariance,
the chunked log-probs they read, and the paired-loss dispatch."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from lmforge.losses.lm import token_logps
from lmforge.losses.preference import (
    LENGTH_AVERAGED,
    PAIRED,
    REFERENCE_FREE,
    PairLogps,
    bt_loss,
    chosen_nll,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    kto_loss,
    orpo_loss,
    paired_loss,
    robust_dpo_loss,
    sequence_logps,
    simpo_loss,
)

F64 = {"rel": 1e-12, "abs": 1e-14}  # float64 arithmetic: a few ulps per operation
Loss = tuple[torch.Tensor, dict[str, float]]


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _log_odds(x: float) -> float:
    return x - math.log(-math.expm1(x))


def _randn(n: int, seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(8, generator=g, dtype=torch.float64) for _ in range(n)]


def _neg_avgs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token average log-probs in [-3, -0.1]: ORPO's log-odds need p < 1."""
    g = torch.Generator().manual_seed(seed)
    a, b = (-0.1 - 2.9 * torch.rand(8, generator=g, dtype=torch.float64) for _ in range(2))
    return a, b


# ------------------------------------------------------------------------------- closed forms

T = torch.tensor


def test_bt_closed_form() -> None:
    assert float(bt_loss(T([2.0]), T([1.0]))[0]) == pytest.approx(-_logsig(1.0))
    assert float(bt_loss(T([2.0]), T([1.0]))[0]) == pytest.approx(0.3133, abs=1e-4)
    assert float(bt_loss(T([2.0]), T([1.0]), margin=T([1.0]))[0]) == pytest.approx(math.log(2))


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 10.0])
def test_dpo_at_reference_is_log2_for_any_beta(beta: float) -> None:
    c, r = _randn(2, 0)
    for eps in (0.0, 0.1):
        assert float(dpo_loss(c, r, c, r, beta=beta, label_smoothing=eps)[0]) == pytest.approx(math.log(2), **F64)
    robust, _ = robust_dpo_loss(c, r, c, r, beta=beta, label_smoothing=0.2)
    assert float(robust) == pytest.approx(math.log(2), **F64)


# the docstrings' point: logps (-1, -3), reference (-2, -2), so h = 2
H2 = (T([-1.0]), T([-3.0]), T([-2.0]), T([-2.0]))


def test_dpo_family_closed_form() -> None:
    assert float(dpo_loss(*H2, beta=0.5)[0]) == pytest.approx(0.3133, abs=1e-4)
    assert float(dpo_loss(*H2, beta=0.5, label_smoothing=0.1)[0]) == pytest.approx(
        0.9 * -_logsig(1) + 0.1 * -_logsig(-1))
    assert float(dpo_loss(*H2, beta=0.5, label_smoothing=0.1)[0]) == pytest.approx(0.4133, abs=1e-4)
    assert float(robust_dpo_loss(*H2, beta=0.5, label_smoothing=0.1)[0]) == pytest.approx(0.1883, abs=1e-4)
    assert float(robust_dpo_loss(*H2, beta=0.5, label_smoothing=0.0)[0]) == pytest.approx(-_logsig(1))
    assert float(ipo_loss(*H2, beta=0.1)[0]) == pytest.approx(9.0)
    assert float(ipo_loss(*H2, beta=0.25)[0]) == 0.0
    assert float(hinge_loss(*H2, beta=0.25)[0]) == pytest.approx(0.5)
    assert float(hinge_loss(*H2, beta=0.5)[0]) == 0.0
    _, m = dpo_loss(*H2, beta=0.5)
    assert m == pytest.approx({"rewards/chosen": 0.5, "rewards/rejected": -0.5,
                               "rewards/margin": 1.0, "rewards/accuracy": 1.0})


def test_robust_dpo_is_unbiased_under_label_noise() -> None:
    # the property it is built for: the expectation over a flip with probability eps is DPO
    c, r, rc, rr = _randn(4, 1)
    eps, beta = 0.2, 0.7
    noisy = ((1 - eps) * robust_dpo_loss(c, r, rc, rr, beta=beta, label_smoothing=eps)[0]
             + eps * robust_dpo_loss(r, c, rr, rc, beta=beta, label_smoothing=eps)[0])
    assert float(noisy) == pytest.approx(float(dpo_loss(c, r, rc, rr, beta=beta)[0]), **F64)


def test_simpo_orpo_closed_form() -> None:
    assert float(simpo_loss(T([-1.0]), T([-2.0]), beta=2.0, gamma=1.0)[0]) == pytest.approx(0.3133, abs=1e-4)
    loss, m = orpo_loss(T([math.log(0.5)], dtype=torch.float64), T([math.log(0.25)], dtype=torch.float64), lam=0.1)
    assert float(loss) == pytest.approx(math.log(2) + 0.1 * math.log(4 / 3), **F64)
    assert float(loss) == pytest.approx(0.7219, abs=1e-4)
    assert m["nll"] == pytest.approx(math.log(2), **F64)
    assert m["log_odds_chosen"] == pytest.approx(math.log(3), **F64)  # odds 1 against odds 1/3


def test_orpo_stable_near_certainty() -> None:
    # p -> 1 (avg log-prob -> 0): log(1 - p) must come from expm1, not from 1 - exp
    for x in (-1e-10, -1e-25, -50.0):
        avg_c = T([x], dtype=torch.float64)
        loss, m = orpo_loss(avg_c, T([-1.0], dtype=torch.float64), lam=1.0)
        assert m["log_odds_chosen"] == pytest.approx(_log_odds(x) - _log_odds(-1.0), **F64)
    # p == 1 exactly (fp32 rounds a large logit gap to avg 0): finite, and the NLL still pulls
    avg_c = torch.zeros(1, requires_grad=True)
    loss, _ = orpo_loss(avg_c, T([-1.0]), lam=1.0)
    (g,) = torch.autograd.grad(loss, avg_c)
    assert torch.isfinite(loss) and torch.isfinite(g).all()


def test_kto_closed_form() -> None:
    loss, m = kto_loss(T([3.0, -1.0]), T([0.0, 0.0]), T([True, False]), T([1.0, 2.0]), T([0.0, 1.0]),
                       beta=0.5, undesirable_weight=2.0)
    one = 1 - 1 / (1 + math.exp(-1))
    assert float(loss) == pytest.approx((one + 2 * one) / 2)
    assert float(loss) == pytest.approx(0.4034, abs=1e-4)
    assert m["kl"] == 1.0
    assert m["rewards/desirable"] == 1.5 and m["rewards/undesirable"] == -0.5
    # a negative KL estimate is clamped to 0
    _, m = kto_loss(T([1.0]), T([0.0]), T([True]), T([-1.0]), T([0.0]), beta=0.5)
    assert m["kl"] == 0.0


def test_kto_absent_class_reports_zero_not_nan() -> None:
    _, m = kto_loss(T([1.0, 2.0]), T([0.0, 0.0]), T([True, True]), T([0.0]), T([0.0]), beta=0.1)
    assert m["count/undesirable"] == 0.0 and m["rewards/undesirable"] == 0.0
    assert m["logps/undesirable"] == 0.0
    assert m["count/desirable"] == 2.0 and all(math.isfinite(v) for v in m.values())


def test_chosen_nll_closed_form() -> None:
    nll, m = chosen_nll(T([-3.0, -5.0]), T([2.0, 3.0]))
    assert float(nll) == pytest.approx(1.6) and m["nll"] == pytest.approx(1.6)


def test_accuracy_counts_ties_as_wrong() -> None:
    c = T([0.0, 1.0, 2.0, -1.0], dtype=torch.float64)
    r = T([0.0, 0.0, 3.0, -2.0], dtype=torch.float64)
    _, m = bt_loss(c, r)
    assert m["rewards/accuracy"] == 0.5


# ---------------------------------------------------------------------- naive references


def _naive_dpo(c: list[float], r: list[float], rc: list[float], rr: list[float],
               per: Callable[[float], float]) -> float:
    """The mean over pairs of per(h), one pair at a time in Python floats."""
    return sum(per((c[i] - rc[i]) - (r[i] - rr[i])) for i in range(len(c))) / len(c)


def test_reference_losses_match_naive_loops() -> None:
    c, r, rc, rr = _randn(4, 2, scale=3.0)
    L = [x.tolist() for x in (c, r, rc, rr)]
    b, e = 0.3, 0.15
    cases: list[tuple[Loss, Callable[[float], float]]] = [
        (dpo_loss(c, r, rc, rr, beta=b), lambda h: -_logsig(b * h)),
        (dpo_loss(c, r, rc, rr, beta=b, label_smoothing=e),
         lambda h: -(1 - e) * _logsig(b * h) - e * _logsig(-b * h)),
        (robust_dpo_loss(c, r, rc, rr, beta=b, label_smoothing=e),
         lambda h: ((1 - e) * -_logsig(b * h) - e * -_logsig(-b * h)) / (1 - 2 * e)),
        (ipo_loss(c, r, rc, rr, beta=b), lambda h: (h - 1 / (2 * b)) ** 2),
        (hinge_loss(c, r, rc, rr, beta=b), lambda h: max(0.0, 1 - b * h)),
    ]
    for (loss, m), per in cases:
        assert float(loss) == pytest.approx(_naive_dpo(*L, per), **F64)
        assert m["rewards/chosen"] == pytest.approx(sum(b * (x - y) for x, y in zip(L[0], L[2])) / 8, **F64)
        wins = sum((L[0][i] - L[2][i]) > (L[1][i] - L[3][i]) for i in range(8)) / 8
        assert m["rewards/accuracy"] == wins


def test_bt_simpo_orpo_nll_match_naive_loops() -> None:
    c, r, margin = _randn(3, 3, scale=2.0)
    C, R, M = c.tolist(), r.tolist(), margin.abs().tolist()
    assert float(bt_loss(c, r, margin=margin.abs())[0]) == pytest.approx(
        sum(-_logsig(C[i] - R[i] - M[i]) for i in range(8)) / 8, **F64)
    assert float(simpo_loss(c, r, beta=2.5, gamma=0.7)[0]) == pytest.approx(
        sum(-_logsig(2.5 * (C[i] - R[i]) - 0.7) for i in range(8)) / 8, **F64)
    ac, ar = _neg_avgs(4)
    AC, AR = ac.tolist(), ar.tolist()
    want = sum(-x for x in AC) / 8 - 0.2 * sum(_logsig(_log_odds(AC[i]) - _log_odds(AR[i])) for i in range(8)) / 8
    assert float(orpo_loss(ac, ar, lam=0.2)[0]) == pytest.approx(want, **F64)
    tokens = torch.arange(1.0, 9.0, dtype=torch.float64)
    assert float(chosen_nll(c, tokens)[0]) == pytest.approx(-sum(C) / 36, **F64)


def test_kto_matches_naive_loop() -> None:
    logps, ref, kl, ref_kl = _randn(4, 5, scale=2.0)
    kl = kl + 1.0  # a positive batch KL, so z0 is not the clamp's 0
    d = torch.tensor([True, False, True, True, False, False, True, False])
    b, wd, wu = 0.4, 1.3, 0.8
    loss, m = kto_loss(logps, ref, d, kl, ref_kl, beta=b, desirable_weight=wd, undesirable_weight=wu)
    z0 = max(0.0, sum(kl.tolist()) / 8 - sum(ref_kl.tolist()) / 8)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    total = 0.0
    for i in range(8):
        ri = float(logps[i]) - float(ref[i])
        total += wd * (1 - sig(b * (ri - z0))) if d[i] else wu * (1 - sig(b * (z0 - ri)))
    assert float(loss) == pytest.approx(total / 8, **F64)
    assert m["kl"] == pytest.approx(z0, **F64)
    want = sum(b * (float(logps[i]) - float(ref[i])) for i in range(8) if d[i]) / 4
    assert m["rewards/desirable"] == pytest.approx(want, **F64) and m["count/desirable"] == 4.0


# -------------------------------------------------------------------------------- gradcheck


def _leaves(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(x.clone().requires_grad_(True) for x in xs)


PAIR_FNS: dict[str, Callable[..., Loss]] = {
    "dpo": lambda c, r, rc, rr: dpo_loss(c, r, rc, rr, beta=0.3),
    "cdpo": lambda c, r, rc, rr: dpo_loss(c, r, rc, rr, beta=0.3, label_smoothing=0.1),
    "robust": lambda c, r, rc, rr: robust_dpo_loss(c, r, rc, rr, beta=0.3, label_smoothing=0.1),
    "ipo": lambda c, r, rc, rr: ipo_loss(c, r, rc, rr, beta=0.3),
    "hinge": lambda c, r, rc, rr: hinge_loss(c, r, rc, rr, beta=0.3),
}


@pytest.mark.parametrize("name", sorted(PAIR_FNS))
def test_gradcheck_reference_losses(name: str) -> None:
    xs = _leaves(*_randn(4, 6, scale=2.0))
    h = (xs[0] - xs[2]) - (xs[1] - xs[3])
    assert (1 - 0.3 * h).abs().min() > 1e-3  # away from the hinge's kink
    assert torch.autograd.gradcheck(lambda *a: PAIR_FNS[name](*a)[0], xs)


def test_gradcheck_bt_simpo_orpo_nll() -> None:
    c, r, m = _leaves(*_randn(3, 7))
    assert torch.autograd.gradcheck(lambda a, b, mm: bt_loss(a, b, margin=mm)[0], (c, r, m))
    assert torch.autograd.gradcheck(lambda a, b: simpo_loss(a, b, beta=2.0, gamma=0.5)[0], (c, r))
    assert torch.autograd.gradcheck(lambda a: chosen_nll(a, torch.arange(1.0, 9.0, dtype=torch.float64))[0], (c,))
    ac, ar = _leaves(*_neg_avgs(8))
    assert torch.autograd.gradcheck(lambda a, b: orpo_loss(a, b, lam=0.5)[0], (ac, ar))


def test_gradcheck_kto_and_no_gradient_through_z0() -> None:
    logps, ref, kl, ref_kl = _randn(4, 9)
    kl = (kl + 1.0).requires_grad_(True)
    d = torch.tensor([True, False] * 4)
    logps = logps.requires_grad_(True)
    f = lambda x: kto_loss(x, ref, d, kl, ref_kl, beta=0.5, undesirable_weight=1.5)[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (logps,))
    (g,) = torch.autograd.grad(f(logps), kl, allow_unused=True)
    assert g is None  # z0 is detached


# -------------------------------------------------------------------- log-probs off the logits


def test_token_logps_closed_form_and_chunking() -> None:
    lp = token_logps(T([[math.log(3), 0.0]]), T([0]))
    assert float(lp[0]) == pytest.approx(math.log(0.75))
    g = torch.Generator().manual_seed(10)
    logits = torch.randn(4, 5, 11, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (4, 5), generator=g)
    small, big = token_logps(logits, targets, chunk_rows=3), token_logps(logits, targets, chunk_rows=10_000)
    want = logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    assert small.shape == (4, 5) and small.dtype == torch.float64
    assert torch.allclose(small, big, rtol=1e-12, atol=0) and torch.allclose(small, want, rtol=1e-12, atol=1e-14)
    w = torch.randn(4, 5, generator=g, dtype=torch.float64)
    (ga,) = torch.autograd.grad((small * w).sum(), logits)
    (gb,) = torch.autograd.grad((want * w).sum(), logits)
    assert torch.allclose(ga, gb, rtol=1e-12, atol=1e-14)


def test_token_logps_keeps_no_fp32_copy_for_backward() -> None:
    # DESIGN rule 4: for bf16 logits the backward keeps the logits as given plus one fp32
    # logsumexp and one target id per row; keeping each chunk's upcast copy, as plain autograd
    # would, adds up to the full fp32 (N, V) tensor the chunks were meant to avoid
    N, V = 64, 512
    logits = torch.randn(N, V).bfloat16().requires_grad_(True)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_logps(logits, torch.zeros(N, dtype=torch.long), chunk_rows=8)
    assert sum(saved) == N * V * 2 + N * (8 + 4)


def test_token_logps_gradcheck() -> None:
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 5, (7,), generator=g)
    assert torch.autograd.gradcheck(lambda x: token_logps(x, targets, chunk_rows=3), (logits,))


def _naive_sequence_logps(logits: torch.Tensor, targets: torch.Tensor, seq_ids: torch.Tensor,
                          n: int) -> tuple[list[float], list[float]]:
    logp = logits.double().log_softmax(-1)
    sums, counts = [0.0] * n, [0.0] * n
    for b in range(targets.size(0)):
        for t in range(targets.size(1)):
            s = int(seq_ids[b, t])
            if s >= 0:
                sums[s] += float(logp[b, t, targets[b, t]])
                counts[s] += 1
    return sums, counts


def _packed_batch(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(2, 7, 13, generator=g, dtype=torch.float64).to(dtype)
    targets = torch.randint(0, 13, (2, 7), generator=g)
    seq_ids = torch.tensor([[-1, 0, 0, -1, -1, 1, 1],  # two sequences packed in row 0
                            [-1, -1, 2, 2, 2, -1, -1]])  # prompt, completion, padding
    return logits, targets, seq_ids


def test_sequence_logps_matches_naive_loop() -> None:
    logits, targets, seq_ids = _packed_batch(torch.float64)
    sums, counts = sequence_logps(logits, targets, seq_ids, 4, chunk_rows=2)  # sequence 3: empty
    want_s, want_c = _naive_sequence_logps(logits, targets, seq_ids, 4)
    assert sums.tolist() == pytest.approx(want_s, **F64) and counts.tolist() == want_c == [2, 2, 3, 0]
    # positions with seq_id -1 are never read: not even a nan there reaches the result
    poisoned = logits.clone()
    poisoned[seq_ids < 0] = float("nan")
    assert torch.equal(sequence_logps(poisoned, targets, seq_ids, 4)[0], sums)


def test_sequence_logps_gradcheck() -> None:
    logits, targets, seq_ids = _packed_batch(torch.float64)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: sequence_logps(x, targets, seq_ids, 3, chunk_rows=2)[0], (logits,))


def test_sequence_logps_bf16_logits_give_fp32() -> None:
    logits, targets, seq_ids = _packed_batch(torch.bfloat16)
    logits.requires_grad_(True)
    sums, counts = sequence_logps(logits, targets, seq_ids, 3, chunk_rows=2)
    assert sums.dtype == counts.dtype == torch.float32
    # the same bf16 values, exactly, in float64: only fp32 rounding separates the two
    want, _ = _naive_sequence_logps(logits.detach(), targets, seq_ids, 3)
    assert sums.tolist() == pytest.approx(want, rel=1e-5)
    (g,) = torch.autograd.grad(sums.sum(), logits)
    assert g.dtype == torch.bfloat16 and bool((g[seq_ids < 0] == 0).all())
    x = logits.detach().double().requires_grad_(True)
    (g64,) = torch.autograd.grad(sequence_logps(x, targets, seq_ids, 3)[0].sum(), x)
    assert torch.allclose(g.double(), g64, rtol=2**-8, atol=1e-6)  # bf16's 8-bit mantissa


# ------------------------------------------------------------------ accumulation invariance
# The paired losses are means over pairs, so shards weighed by their pair counts give the
# full-batch loss and gradient: what gradient accumulation and data parallelism compute.

SPLIT = (3, 5)


def _pairs(seed: int) -> PairLogps:
    g = torch.Generator().manual_seed(seed)
    c, r = (-1.0 - 4 * torch.rand(8, generator=g, dtype=torch.float64) for _ in range(2))
    rc, rr = (-1.0 - 4 * torch.rand(8, generator=g, dtype=torch.float64) for _ in range(2))
    nc, nr = (torch.randint(1, 6, (8,), generator=g).double() for _ in range(2))
    return PairLogps(c.requires_grad_(True), r.requires_grad_(True), nc, nr, rc, rr)


def _shard(p: PairLogps, lo: int, hi: int) -> PairLogps:
    return PairLogps(*(getattr(p, f)[lo:hi] for f in ("chosen", "rejected", "chosen_tokens", "rejected_tokens",
                                                       "ref_chosen", "ref_rejected")))


def _check_invariant(p: PairLogps, loss_of: Callable[[PairLogps], torch.Tensor]) -> None:
    full = loss_of(p)
    g_full = torch.autograd.grad(full, (p.chosen, p.rejected))
    acc, lo = torch.zeros((), dtype=torch.float64), 0
    for n in SPLIT:
        acc = acc + n / 8 * loss_of(_shard(p, lo, lo + n))
        lo += n
    g_acc = torch.autograd.grad(acc, (p.chosen, p.rejected))
    assert float(acc.detach()) == pytest.approx(float(full.detach()), **F64)
    for a, b in zip(g_acc, g_full):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kind", sorted(PAIRED))
def test_paired_losses_accumulation_invariant(kind: str) -> None:
    smooth = 0.1 if kind in ("cdpo", "robust") else 0.0
    _check_invariant(_pairs(13), lambda q: paired_loss(kind, q, beta=0.4, label_smoothing=smooth)[0])


def test_bt_accumulation_invariant() -> None:
    _check_invariant(_pairs(14), lambda q: bt_loss(q.chosen, q.rejected, margin=q.chosen_tokens / 4)[0])


def test_rpo_term_is_token_weighted() -> None:
    # chosen_nll is a token mean: shards must be weighed by their chosen-token counts
    p = _pairs(15)
    full = chosen_nll(p.chosen, p.chosen_tokens)[0]
    parts = [_shard(p, 0, 3), _shard(p, 3, 8)]
    acc = sum(float(q.chosen_tokens.sum()) * chosen_nll(q.chosen, q.chosen_tokens)[0] for q in parts)
    assert float(acc.detach() / p.chosen_tokens.sum()) == pytest.approx(float(full.detach()), **F64)


def test_kto_invariant_only_with_a_shared_reference_point() -> None:
    # KTO is NOT accumulation-invariant in general: z0 is a statistic of the batch's KL
    # completions, and each shard would estimate its own. With z0 fixed (every shard given the
    # same kl inputs) the loss is a mean over rows, and row-count weighing recovers it.
    logps, ref, kl, ref_kl = _randn(4, 16, scale=2.0)
    kl = kl + 1.0
    d = torch.tensor([True, False, False, True, True, False, True, True])
    f = lambda lo, hi, k, rk: kto_loss(logps[lo:hi], ref[lo:hi], d[lo:hi], k, rk, beta=0.5)[0]  # noqa: E731
    full = f(0, 8, kl, ref_kl)
    shared = 3 / 8 * f(0, 3, kl, ref_kl) + 5 / 8 * f(3, 8, kl, ref_kl)
    assert float(shared) == pytest.approx(float(full), **F64)
    own = 3 / 8 * f(0, 3, kl[:3], ref_kl[:3]) + 5 / 8 * f(3, 8, kl[3:], ref_kl[3:])
    assert abs(float(own) - float(full)) > 1e-6


# ------------------------------------------------------------------------- paired_loss dispatch


def test_paired_loss_is_each_pure_function() -> None:
    p = _pairs(17)
    c, r, rc, rr = p.chosen, p.rejected, p.ref_chosen, p.ref_rejected
    assert rc is not None and rr is not None
    nc, nr = p.chosen_tokens, p.rejected_tokens
    want: dict[str, Loss] = {
        "sigmoid": dpo_loss(c, r, rc, rr, beta=0.4),
        "cdpo": dpo_loss(c, r, rc, rr, beta=0.4, label_smoothing=0.1),
        "robust": robust_dpo_loss(c, r, rc, rr, beta=0.4, label_smoothing=0.1),
        "ipo": ipo_loss(c / nc, r / nr, rc / nc, rr / nr, beta=0.4),  # length-averaged, as TRL
        "hinge": hinge_loss(c, r, rc, rr, beta=0.4),
        "simpo": simpo_loss(c / nc, r / nr, beta=0.4, gamma=0.3),
        "orpo": orpo_loss(c / nc, r / nr, lam=0.2),
    }
    assert set(want) == set(PAIRED) and LENGTH_AVERAGED == {"ipo", "simpo", "orpo"}
    for kind, (loss, m) in want.items():
        smooth = 0.1 if kind in ("cdpo", "robust") else 0.0
        got, gm = paired_loss(kind, p, beta=0.4, label_smoothing=smooth, simpo_gamma=0.3, orpo_lambda=0.2)
        assert float(got.detach()) == float(loss.detach()), kind
        assert {k: gm[k] for k in m} == m
        assert gm["logps/chosen"] == pytest.approx(float(c.detach().mean()), **F64)  # summed, not averaged
        # the same keys for every kind (orpo adds its own diagnostics)
        assert set(gm) - {"nll", "log_odds_ratio", "log_odds_chosen"} == {
            "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
            "logps/chosen", "logps/rejected"}, kind
    assert "nll" in paired_loss("orpo", p, beta=0.4)[1] and "nll" not in paired_loss("sigmoid", p, beta=0.4)[1]


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "simpo"])
def test_rpo_adds_alpha_times_nll(kind: str) -> None:
    p = _pairs(18)
    base, _ = paired_loss(kind, p, beta=0.4)
    with_rpo, m = paired_loss(kind, p, beta=0.4, rpo_alpha=0.7)
    nll, _ = chosen_nll(p.chosen, p.chosen_tokens)
    assert float(with_rpo.detach()) == float((base + 0.7 * nll).detach())
    assert m["nll"] == float(nll.detach())


def test_rpo_closed_form() -> None:
    c, r = T([-3.0, -5.0]), T([-4.0, -4.0])
    p = PairLogps(c, r, T([2.0, 3.0]), T([1.0, 1.0]), c, r)  # policy == reference
    loss, m = paired_loss("sigmoid", p, beta=0.1, rpo_alpha=1.0)
    assert float(loss) == pytest.approx(math.log(2) + 1.6) and m["nll"] == pytest.approx(1.6)


def test_paired_loss_rejects_bad_requests() -> None:
    p = _pairs(19)
    free = PairLogps(p.chosen, p.rejected, p.chosen_tokens, p.rejected_tokens)
    for kind in sorted(set(PAIRED) - REFERENCE_FREE):
        with pytest.raises(ValueError, match="reference"):
            paired_loss(kind, free, beta=0.1, label_smoothing=0.1 if kind in ("cdpo", "robust") else 0.0)
    for kind in sorted(REFERENCE_FREE):
        assert torch.isfinite(paired_loss(kind, free, beta=0.1)[0].detach())
    with pytest.raises(ValueError, match="unknown"):
        paired_loss("kto", p, beta=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        paired_loss("sigmoid", p, beta=0.1, label_smoothing=0.1)  # read only by cdpo and robust
    with pytest.raises(ValueError, match="rpo_alpha"):
        paired_loss("orpo", p, beta=0.1, rpo_alpha=1.0)  # ORPO has its NLL term already
    with pytest.raises(ValueError, match="label_smoothing"):
        paired_loss("robust", p, beta=0.1, label_smoothing=0.5)
