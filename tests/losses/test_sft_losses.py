"""token_kl and anchor_penalty: closed forms, naive references, chunking invariance, gradcheck."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.losses.lm import token_kl
from lmforge.losses.regularizers import anchor_penalty


def _kl_reference(logits: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Direct per-position sum over the vocabulary, then the masked mean (float64)."""
    logp, logq = logits.double().log_softmax(-1), ref.double().log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)  # (B, T)
    m = mask.double()
    return (kl * m).sum() / m.sum()


# ----------------------------------------------------------------------------------- token_kl


def test_token_kl_closed_form() -> None:
    logits = torch.zeros(1, 1, 2)  # p = (1/2, 1/2)
    ref = torch.tensor([[[math.log(3), 0.0]]])  # q = (3/4, 1/4)
    kl, m = token_kl(logits, ref, torch.ones(1, 1))
    assert float(kl) == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    assert float(kl) == pytest.approx(0.1438, abs=1e-4)
    assert m["kl_tokens"] == 1.0
    # KL is not symmetric: the other direction is 3/4 log(3/2) + 1/4 log(1/2)
    kl_rev, _ = token_kl(ref, logits, torch.ones(1, 1))
    assert float(kl_rev) == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-6)


@pytest.mark.parametrize("chunk_rows", [1, 3, 1000])
def test_token_kl_matches_reference_any_chunking(chunk_rows: int) -> None:
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 5, 11
    logits, ref = torch.randn(B, T, V, generator=g), torch.randn(B, T, V, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.4).long()
    mask[0, 0] = 1
    kl, m = token_kl(logits, ref, mask, chunk_rows=chunk_rows)
    assert float(kl) == pytest.approx(float(_kl_reference(logits, ref, mask)), abs=1e-6)
    assert m["kl_tokens"] == float(mask.sum())
    # torch's own KL (input is log q, target is log p) agrees position by position
    per_pos = F.kl_div(ref.log_softmax(-1), logits.log_softmax(-1), log_target=True,
                       reduction="none").sum(-1)
    assert float(kl) == pytest.approx(float((per_pos * mask).sum() / mask.sum()), abs=1e-6)


def test_token_kl_masked_positions_do_not_count() -> None:
    g = torch.Generator().manual_seed(1)
    logits, ref = torch.randn(2, 4, 7, generator=g), torch.randn(2, 4, 7, generator=g)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 1]])
    kl, _ = token_kl(logits, ref, mask)
    # anything at a masked position is irrelevant
    logits2 = logits.clone()
    logits2[mask == 0] = torch.randn(int((mask == 0).sum()), 7, generator=g) * 10
    kl2, _ = token_kl(logits2, ref, mask)
    assert float(kl2) == pytest.approx(float(kl), abs=1e-6)


def test_token_kl_zero_for_identical_and_shifted_logits() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 9, generator=g)
    mask = torch.ones(2, 3)
    kl, _ = token_kl(logits, logits.clone(), mask)
    assert float(kl) == pytest.approx(0.0, abs=1e-6)
    # softmax is shift invariant per position: a constant offset gives the same distribution
    kl, _ = token_kl(logits, logits + torch.randn(2, 3, 1, generator=g) * 5, mask)
    assert float(kl) == pytest.approx(0.0, abs=1e-5)


def test_token_kl_nonnegative() -> None:
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        logits, ref = torch.randn(2, 3, 6, generator=g) * 3, torch.randn(2, 3, 6, generator=g) * 3
        kl, _ = token_kl(logits, ref, torch.ones(2, 3), chunk_rows=2)
        assert float(kl) >= 0.0


def test_token_kl_all_masked_is_zero_not_nan() -> None:
    kl, m = token_kl(torch.randn(1, 3, 4), torch.randn(1, 3, 4), torch.zeros(1, 3))
    assert float(kl) == 0.0 and m["kl_tokens"] == 0.0


def test_token_kl_gradient_matches_reference() -> None:
    """Gradient w.r.t. the trained logits (the reference is frozen) equals the float64 reference,
    and the reference itself passes gradcheck. The closed form of the gradient,
    p * ((logp - logq) - KL) per position / n, is checked too."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    ref = torch.randn(2, 3, 4, dtype=torch.float64, generator=g)
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]])
    assert torch.autograd.gradcheck(lambda x: _kl_reference(x, ref, mask), (logits,))
    kl, _ = token_kl(logits, ref, mask, chunk_rows=2)
    (grad,) = torch.autograd.grad(kl, logits)
    (grad_ref,) = torch.autograd.grad(_kl_reference(logits, ref, mask), logits)
    assert torch.allclose(grad.double(), grad_ref, atol=1e-6)
    logp, logq = logits.detach().log_softmax(-1), ref.log_softmax(-1)
    per = (logp.exp() * (logp - logq)).sum(-1, keepdim=True)
    closed = logp.exp() * (logp - logq - per) * mask[..., None] / mask.sum()
    assert torch.allclose(grad_ref, closed, atol=1e-12)


def test_token_kl_gradcheck_float64() -> None:
    """token_kl itself under float64 gradcheck (it upcasts per chunk; it must not downcast)."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    ref = torch.randn(2, 2, 3, dtype=torch.float64, generator=g)
    mask = torch.tensor([[1, 0], [1, 1]])
    assert torch.autograd.gradcheck(lambda x: token_kl(x, ref, mask, chunk_rows=3)[0], (logits,))


# ----------------------------------------------------------------------------- anchor_penalty


def test_anchor_penalty_worked_example() -> None:
    theta, theta0 = torch.tensor([1.0, 2.0]), torch.zeros(2)
    pen, m = anchor_penalty([theta], [theta0], [torch.tensor([1.0, 0.5])])
    assert float(pen) == pytest.approx(1.5) and m["anchor_penalty"] == pytest.approx(1.5)
    pen, _ = anchor_penalty([theta], [theta0])  # F = 1: 1/2 (1 + 4)
    assert float(pen) == pytest.approx(2.5)


def test_anchor_penalty_several_tensors_and_ones_fisher() -> None:
    g = torch.Generator().manual_seed(6)
    params = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    anchors = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    expected = 0.5 * sum(float(((p.double() - a.double()) ** 2).sum()) for p, a in zip(params, anchors))
    pen, _ = anchor_penalty(params, anchors)
    pen1, _ = anchor_penalty(params, anchors, [torch.ones_like(p) for p in params])
    assert float(pen) == pytest.approx(expected, rel=1e-6)
    assert float(pen1) == float(pen)
    assert float(anchor_penalty(params, [p.clone() for p in params])[0]) == 0.0
    assert float(anchor_penalty([], [])[0]) == 0.0


def test_anchor_penalty_gradient_is_fisher_times_displacement() -> None:
    g = torch.Generator().manual_seed(7)
    p = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    a = torch.randn(4, 3, dtype=torch.float64, generator=g)
    f = torch.rand(4, 3, dtype=torch.float64, generator=g)

    def ref(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (f * (x - a) ** 2).sum()

    assert torch.autograd.gradcheck(ref, (p,))
    pen, _ = anchor_penalty([p], [a], [f])
    (grad,) = torch.autograd.grad(pen, p)
    assert torch.allclose(grad.double(), (f * (p - a)).detach(), atol=1e-6)


def test_anchor_penalty_gradcheck_float64() -> None:
    g = torch.Generator().manual_seed(8)
    p = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    a = torch.randn(4, 3, dtype=torch.float64, generator=g)
    f = torch.rand(4, 3, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(lambda x: anchor_penalty([x], [a], [f])[0], (p,))
