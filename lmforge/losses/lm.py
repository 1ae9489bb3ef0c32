"""Language-modelling losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_lm_loss(
    logits: torch.Tensor,  # (B, T, V)
    targets: torch.Tensor,  # (B, T) next-token ids
    loss_mask: torch.Tensor | None = None,  # (B, T) 1 where the token counts
    chunk_rows: int = 256,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean next-token cross-entropy (nats) over the tokens the mask keeps.

    Each chunk of `chunk_rows` positions is upcast to fp32 on its own: a bf16 log-softmax over
    a large vocabulary loses the small probabilities the loss is made of, and upcasting all of
    (B, T, V) at once would materialize two full fp32 copies (DESIGN rule 4).

    Worked example: V=2, logits [[0, 0]] and target 0 give log 2 = 0.6931 nats.
    """
    V = logits.size(-1)
    flat, tgt = logits.reshape(-1, V), targets.reshape(-1)  # (N, V), (N,)
    mask = None if loss_mask is None else loss_mask.reshape(-1).to(torch.float32)
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for i in range(0, flat.size(0), chunk_rows):
        nll = F.cross_entropy(flat[i : i + chunk_rows].float(), tgt[i : i + chunk_rows],
                              reduction="none")
        total = total + (nll.sum() if mask is None else (nll * mask[i : i + chunk_rows]).sum())
    n = tgt.numel() if mask is None else int(mask.sum())
    return total / max(n, 1), {"n_tokens": float(n)}
