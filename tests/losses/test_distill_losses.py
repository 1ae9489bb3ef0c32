"""Distillation losses: the docstrings' hand-worked numbers, T^2 scaling, forward/reverse
asymmetry, the JSD's bounds and beta limits, a naive unchunked reference for every kind,
float64 gradcheck, chunk-size invariance, masking, and alpha = 0 being causal_lm_loss."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.losses.distill import distill_loss, divergence
from lmforge.losses.lm import causal_lm_loss

KINDS = ["forward_kl", "reverse_kl", "jsd"]
L3 = math.log(3)
IDENTITY = lambda x: x  # noqa: E731  (hidden states are the logits themselves)


def _v2(teacher: list[float], student: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor([student], dtype=torch.float64), torch.tensor([teacher], dtype=torch.float64))


def test_closed_form_v2() -> None:
    """p = (3/4, 1/4), q = (1/2, 1/2): the worked numbers of `divergence`'s docstring,
    checked to 1e-12 (float64 sums of two terms: ~1e-16 rounding)."""
    q, p = _v2([L3, 0.0], [0.0, 0.0])
    fwd = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    rev = 0.5 * math.log(4 / 3)
    jsd = 0.5 * (0.75 * math.log(6 / 5) + 0.25 * math.log(2 / 3)) + 0.5 * (0.5 * math.log(4 / 5) + 0.5 * math.log(4 / 3))
    assert float(divergence(q, p, "forward_kl")) == pytest.approx(fwd, abs=1e-12)
    assert float(divergence(q, p, "reverse_kl")) == pytest.approx(rev, abs=1e-12)
    assert float(divergence(q, p, "jsd", beta=0.5)) == pytest.approx(jsd, abs=1e-12)
    assert (fwd, rev, jsd) == pytest.approx((0.130812, 0.143841, 0.033822), abs=1e-6)
    assert fwd != pytest.approx(rev, abs=1e-3)  # KL is not symmetric: the two directions differ
    # swapping the roles swaps the directions exactly
    assert float(divergence(p, q, "reverse_kl")) == pytest.approx(fwd, abs=1e-12)
    # beta 1/4: m = (9/16, 7/16), worked the same way
    m = (0.25 * 0.75 + 0.75 * 0.5, 0.25 * 0.25 + 0.75 * 0.5)
    j4 = (0.25 * (0.75 * math.log(0.75 / m[0]) + 0.25 * math.log(0.25 / m[1]))
          + 0.75 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])))
    assert float(divergence(q, p, "jsd", beta=0.25)) == pytest.approx(j4, abs=1e-12)


def test_temperature_scales_by_t_squared() -> None:
    """Teacher [log 9, 0] at T = 2 is (3/4, 1/4): T^2 x the T = 1 number, 0.523248; for every
    kind, loss(T) = T^2 x the divergence of the logits divided by T."""
    q, p = _v2([2 * L3, 0.0], [0.0, 0.0])
    assert float(divergence(q, p, "forward_kl", temperature=2.0)) == pytest.approx(0.5232481437645479, abs=1e-12)
    torch.manual_seed(0)
    zs, zt = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    for kind in KINDS:
        for T in (0.5, 2.0, 4.0):
            got = divergence(zs, zt, kind, temperature=T)
            torch.testing.assert_close(got, T * T * divergence(zs / T, zt / T, kind), rtol=1e-12, atol=1e-14)


def test_jsd_bounds_and_beta_limits() -> None:
    """0 <= JSD_beta <= H(beta) = -beta log beta - (1-beta) log(1-beta) (log 2 at 1/2), with
    near-equality for distributions on disjoint supports; JSD / beta -> KL(p || q) as beta -> 0
    and JSD / (1 - beta) -> KL(q || p) as beta -> 1. The next term of the expansion is
    beta x sum (p - q)^2 / q (a chi^2, ~10 here) against the KL's ~1, so at beta = 1e-9 it is
    ~1e-8 relative; float64 rounding of log q - log m (~1e-16 absolute per term, against a
    JSD of ~1e-9) costs ~1e-7 relative: rtol 1e-5 bounds both."""
    torch.manual_seed(1)
    zs, zt = torch.randn(64, 9, dtype=torch.float64) * 3, torch.randn(64, 9, dtype=torch.float64) * 3
    for beta in (0.1, 0.5, 0.9):
        j = divergence(zs, zt, "jsd", beta=beta)
        h = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
        assert bool((j >= -1e-15).all()) and bool((j <= h + 1e-12).all())
        # almost disjoint supports: the bound is reached up to the tiny shared mass
        far = divergence(torch.tensor([[40.0, 0.0]], dtype=torch.float64),
                         torch.tensor([[0.0, 40.0]], dtype=torch.float64), "jsd", beta=beta)
        assert float(far) == pytest.approx(h, abs=1e-12)
    zs, zt = zs / 3, zt / 3  # logits of spread ~1: the ratios p / q stay moderate
    fwd, rev = divergence(zs, zt, "forward_kl"), divergence(zs, zt, "reverse_kl")
    b = 1e-9
    torch.testing.assert_close(divergence(zs, zt, "jsd", beta=b) / b, fwd, rtol=1e-5, atol=0)
    torch.testing.assert_close(divergence(zs, zt, "jsd", beta=1 - b) / b, rev, rtol=1e-5, atol=0)
    assert float(divergence(zs, zs, "jsd").abs().max()) < 1e-15  # the same distribution: 0


def test_loss_closed_form_and_alpha_mix() -> None:
    """teacher [log 3, 0], student [0, 0], target 0: alpha x 0.130812 + (1 - alpha) x log 2."""
    zs, zt = torch.tensor([[0.0, 0.0]], dtype=torch.float64), torch.tensor([[L3, 0.0]], dtype=torch.float64)
    tg = torch.tensor([0])
    for alpha in (0.0, 0.5, 1.0):
        loss, m = distill_loss(zs, IDENTITY, zt, IDENTITY, tg, alpha=alpha)
        fwd = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
        assert float(loss) == pytest.approx(alpha * fwd + (1 - alpha) * math.log(2), abs=1e-12)
        assert m["soft"] == pytest.approx(fwd, abs=1e-12) and m["hard"] == pytest.approx(math.log(2), abs=1e-12)
        assert m["teacher_ce"] == pytest.approx(-math.log(0.75), abs=1e-12) and m["n_tokens"] == 1.0
    assert float(distill_loss(zs, IDENTITY, zt, IDENTITY, tg, alpha=0.5)[0]) == pytest.approx(0.411980, abs=1e-6)


def _naive(zs: torch.Tensor, zt: torch.Tensor, tg: torch.Tensor, mask: torch.Tensor, kind: str,
           T: float, alpha: float, beta: float) -> torch.Tensor:
    """Position by position, straight from the definitions (probabilities, no log-space)."""
    total, n = zs.new_zeros(()), 0
    for i in range(zs.size(0)):
        if not mask[i]:
            continue
        q, p = torch.softmax(zs[i] / T, -1), torch.softmax(zt[i] / T, -1)
        kl = lambda a, b: (a * (a / b).log()).sum()  # noqa: E731
        m = beta * p + (1 - beta) * q
        soft = {"forward_kl": kl(p, q), "reverse_kl": kl(q, p),
                "jsd": beta * kl(p, m) + (1 - beta) * kl(q, m)}[kind] * T * T
        hard = -torch.log_softmax(zs[i], -1)[tg[i]]
        total, n = total + alpha * soft + (1 - alpha) * hard, n + 1
    return total / n


@pytest.mark.parametrize("kind", KINDS)
def test_matches_naive_reference_through_heads(kind: str) -> None:
    """Hidden states and linear heads, masked, chunked by 3 rows, against the naive loss on
    the full logits; float64, so 1e-10 bounds sums of ~30 terms of order 1."""
    torch.manual_seed(2)
    h, th = torch.randn(2, 7, 6, dtype=torch.float64), torch.randn(2, 7, 5, dtype=torch.float64)
    W, Wt = torch.randn(11, 6, dtype=torch.float64), torch.randn(11, 5, dtype=torch.float64)
    tg, mask = torch.randint(0, 11, (2, 7)), torch.rand(2, 7) > 0.3
    loss, m = distill_loss(h, lambda x: x @ W.T, th, lambda x: x @ Wt.T, tg, mask, kind=kind,
                           temperature=2.0, alpha=0.3, beta=0.4, chunk_rows=3)
    want = _naive((h @ W.T).reshape(-1, 11), (th @ Wt.T).reshape(-1, 11), tg.reshape(-1),
                  mask.reshape(-1), kind, 2.0, 0.3, 0.4)
    assert float(loss) == pytest.approx(float(want), abs=1e-10)
    assert m["n_tokens"] == int(mask.sum())


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(kind: str) -> None:
    """Gradients through the checkpointed chunks, for the hidden states and the head's weight,
    against finite differences; and equal to the unchunked autograd of the naive loss."""
    torch.manual_seed(3)
    h = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    W = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    th, Wt = torch.randn(5, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    tg = torch.randint(0, 6, (5,))

    def f(h: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        return distill_loss(h, lambda x: x @ W.T, th, lambda x: x @ Wt.T, tg, kind=kind,
                            temperature=1.5, alpha=0.6, beta=0.3, chunk_rows=2)[0]

    assert torch.autograd.gradcheck(f, (h, W))
    g = torch.autograd.grad(f(h, W), (h, W))
    ref = torch.autograd.grad(_naive(h @ W.T, th @ Wt.T, tg, torch.ones(5, dtype=torch.bool),
                                     kind, 1.5, 0.6, 0.3), (h, W))
    for a, b in zip(g, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_chunk_size_invariance(kind: str) -> None:
    """Chunks only split a sum: loss and gradient agree for every chunk size to float64
    rounding (sums of 40 terms reordered: ~1e-15 relative)."""
    torch.manual_seed(4)
    zs = torch.randn(40, 13, dtype=torch.float64, requires_grad=True)
    zt, tg = torch.randn(40, 13, dtype=torch.float64), torch.randint(0, 13, (40,))
    outs = []
    for c in (1, 7, 40, 1000):
        loss, _ = distill_loss(zs, IDENTITY, zt, IDENTITY, tg, kind=kind, temperature=2.0, chunk_rows=c)
        outs.append((loss.detach(), torch.autograd.grad(loss, zs)[0]))
    for loss, g in outs[1:]:
        torch.testing.assert_close(loss, outs[0][0], rtol=1e-12, atol=0)
        torch.testing.assert_close(g, outs[0][1], rtol=1e-12, atol=1e-15)


def test_masked_positions_are_never_read() -> None:
    """NaN and inf at masked positions (student, teacher and an out-of-range target) change
    neither the loss nor the gradient of the kept positions, and give them a zero gradient."""
    torch.manual_seed(5)
    zs, zt = torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    tg = torch.randint(0, 5, (2, 4))
    mask = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 0]])
    dirty_s, dirty_t, dirty_tg = zs.clone(), zt.clone(), tg.clone()
    dirty_s[mask == 0], dirty_t[mask == 0], dirty_tg[mask == 0] = float("nan"), float("inf"), 10**6
    for kind in KINDS:
        a = zs.clone().requires_grad_()
        b = dirty_s.clone().requires_grad_()
        la, _ = distill_loss(a, IDENTITY, zt, IDENTITY, tg, mask, kind=kind, alpha=0.5)
        lb, _ = distill_loss(b, IDENTITY, dirty_t, IDENTITY, dirty_tg, mask, kind=kind, alpha=0.5)
        assert torch.equal(la, lb)
        ga, gb = torch.autograd.grad(la, a)[0], torch.autograd.grad(lb, b)[0]
        assert torch.equal(ga, gb) and bool((gb[mask == 0] == 0).all())


def test_alpha_zero_is_causal_lm_loss() -> None:
    """alpha = 0 is the hard loss alone: causal_lm_loss on the same logits and mask, loss and
    gradient, to float64 rounding of the chunk sums' order (~1e-15 relative)."""
    torch.manual_seed(6)
    zs = torch.randn(3, 9, 17, dtype=torch.float64, requires_grad=True)
    zt, tg = torch.randn(3, 9, 17, dtype=torch.float64), torch.randint(0, 17, (3, 9))
    mask = torch.rand(3, 9) > 0.4
    loss, m = distill_loss(zs, IDENTITY, zt, IDENTITY, tg, mask, alpha=0.0, chunk_rows=4)
    want, wm = causal_lm_loss(zs, tg, mask)
    torch.testing.assert_close(loss, want, rtol=1e-13, atol=0)
    assert m["n_tokens"] == wm["n_tokens"]
    torch.testing.assert_close(torch.autograd.grad(loss, zs)[0], torch.autograd.grad(want, zs)[0],
                               rtol=1e-12, atol=1e-16)


def test_fp32_under_bf16_and_no_full_logits_kept() -> None:
    """bf16 hidden states and heads give an fp32 loss; and the backward keeps no (N, V)
    tensor: the saved tensors of the graph are the chunks' inputs, not their logits."""
    torch.manual_seed(7)
    h = torch.randn(64, 8).bfloat16().requires_grad_()
    W = torch.randn(50, 8).bfloat16()
    loss, _ = distill_loss(h, lambda x: x @ W.T, h.detach(), lambda x: x @ W.T,
                           torch.randint(0, 50, (64,)), chunk_rows=16)
    assert loss.dtype == torch.float32
    saved: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        distill_loss(h, lambda x: x @ W.T, h.detach(), lambda x: x @ W.T,
                     torch.randint(0, 50, (64,)), chunk_rows=16)
    assert saved and all(s.numel() < 16 * 50 for s in saved), saved


def test_identical_models_have_zero_soft_loss_and_gradient() -> None:
    """Student == teacher: every divergence is 0 and so is its gradient (each is minimal
    there), so with alpha = 1 nothing moves."""
    torch.manual_seed(8)
    z = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    for kind in KINDS:
        loss, m = distill_loss(z, IDENTITY, z.detach(), IDENTITY, torch.randint(0, 10, (6,)),
                               kind=kind, alpha=1.0, temperature=3.0)
        assert abs(float(loss.detach())) < 1e-15 and m["agree"] == 1.0
        assert float(torch.autograd.grad(loss, z)[0].abs().max()) < 1e-15
