"""Language-modelling losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_lm_loss(
    logits: torch.Tensor,  # (B, T, V)
    targets: torch.Tensor,  # (B, T) next-token ids
    loss_mask: torch.Tensor | None = None,  # (B, T) 1 where the token counts
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean next-token cross-entropy (nats) over the tokens the mask keeps.

    Computed in fp32 whatever the autocast dtype: a bf16 log-softmax over a large vocabulary
    loses the small probabilities the loss is made of.

    Worked example: V=2, logits [[0, 0]] and target 0 give log 2 = 0.6931 nats.
    """
    V = logits.size(-1)
    nll = F.cross_entropy(logits.float().reshape(-1, V), targets.reshape(-1), reduction="none")
    if loss_mask is None:
        loss = nll.mean()
        n = nll.numel()
    else:
        m = loss_mask.reshape(-1).to(nll.dtype)
        n = int(m.sum())
        loss = (nll * m).sum() / max(n, 1)
    return loss, {"n_tokens": float(n)}
