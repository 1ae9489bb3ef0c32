"""causal_lm_loss: closed form, a naive reference, float64 gradcheck, masking."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.losses.lm import causal_lm_loss


def test_closed_form() -> None:
    logits = torch.zeros(1, 1, 2)  # uniform over 2 tokens
    loss, m = causal_lm_loss(logits, torch.tensor([[0]]))
    assert float(loss) == pytest.approx(math.log(2)) and m["n_tokens"] == 1
    # logits [log 3, 0]: p(target 0) = 3/4 -> -log(3/4)
    loss, _ = causal_lm_loss(torch.tensor([[[math.log(3), 0.0]]]), torch.tensor([[0]]))
    assert float(loss) == pytest.approx(-math.log(0.75))


def test_matches_naive_reference_with_mask() -> None:
    torch.manual_seed(0)
    logits, targets = torch.randn(3, 5, 11), torch.randint(0, 11, (3, 5))
    mask = torch.rand(3, 5) > 0.4
    loss, m = causal_lm_loss(logits, targets, mask)
    logp = logits.log_softmax(-1)
    picked = [-logp[b, t, targets[b, t]] for b in range(3) for t in range(5) if mask[b, t]]
    assert float(loss) == pytest.approx(float(sum(picked) / len(picked)), abs=1e-6)
    assert m["n_tokens"] == len(picked)


def test_fp32_even_under_bf16_logits() -> None:
    logits = torch.randn(2, 4, 50).bfloat16()
    loss, _ = causal_lm_loss(logits, torch.zeros(2, 4, dtype=torch.long))
    assert loss.dtype == torch.float32


def test_gradcheck_float64() -> None:
    logits = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 5, (2, 3))
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]])

    def f(x: torch.Tensor) -> torch.Tensor:
        nll = torch.nn.functional.cross_entropy(x.reshape(-1, 5), targets.reshape(-1), reduction="none")
        return (nll * mask.reshape(-1)).sum() / mask.sum()

    assert torch.autograd.gradcheck(f, (logits,))
    loss, _ = causal_lm_loss(logits, targets, mask)
    (g,) = torch.autograd.grad(loss, logits)
    (g_ref,) = torch.autograd.grad(f(logits), logits)
    assert torch.allclose(g.double(), g_ref, atol=1e-6)
