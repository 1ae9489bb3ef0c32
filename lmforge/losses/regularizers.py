"""Penalties that keep fine-tuned weights near where they started (forgetting controls)."""

from __future__ import annotations

import torch


def anchor_penalty(
    params: list[torch.Tensor],
    anchors: list[torch.Tensor],
    fisher: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """1/2 * sum_i F_i (theta_i - theta0_i)^2 over every element.

    With `fisher=None` (F = 1) this is L2-SP (Li et al. 2018: decay toward the pretrained
    weights, not toward 0); with a diagonal Fisher it is EWC (Kirkpatrick et al. 2017), which
    pulls hardest on the weights the old task's likelihood is most sensitive to.

    Worked example: theta = [1, 2], theta0 = [0, 0], F = [1, 0.5]: 1/2 (1 + 0.5 * 4) = 1.5.
    """
    acc = torch.promote_types(params[0].dtype, torch.float32) if params else torch.float32
    total = torch.zeros((), dtype=acc, device=params[0].device if params else None)
    for i, (p, a) in enumerate(zip(params, anchors)):
        d = (p.to(acc) - a.to(acc)).pow(2)
        total = total + (d if fisher is None else fisher[i].to(acc) * d).sum()
    total = 0.5 * total
    return total, {"anchor_penalty": float(total.detach())}
