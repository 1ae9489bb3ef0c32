"""Knowledge distillation losses: a student matches a teacher's softened next-token
distribution (Hinton et al. 2015), by forward KL, reverse KL or the generalized
Jensen-Shannon divergence of GKD (Agarwal et al. 2024), mixed with the hard-label loss.

Two layers, both pure. `divergence` is the math on one block of logits (what the closed-form
tests pin down). `distill_loss` applies it to every loss position without ever holding a
(N, V) tensor of either model: it takes each model's last hidden states and output layer, and
computes logits, divergence and cross-entropy one chunk of positions at a time, inside an
activation checkpoint, so the backward rebuilds each chunk's logits instead of keeping them.
Peak memory is then O(chunk_rows x V) whatever the batch, where materialized logits cost
4 N V bytes per model in fp32 plus as much again for each saved softmax.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lmforge.losses.lm import causal_lm_loss

Kind = Literal["forward_kl", "reverse_kl", "jsd"]
Head = Callable[[torch.Tensor], torch.Tensor]  # (n, D) -> (n, V): a model's output layer


def _forward_kl(logq: torch.Tensor, logp: torch.Tensor, beta: float) -> torch.Tensor:
    """KL(teacher || student): mean-seeking, the student spreads over every teacher mode."""
    return (logp.exp() * (logp - logq)).sum(-1)


def _reverse_kl(logq: torch.Tensor, logp: torch.Tensor, beta: float) -> torch.Tensor:
    """KL(student || teacher): mode-seeking, the student may drop teacher modes it cannot fit."""
    return (logq.exp() * (logq - logp)).sum(-1)


def _jsd(logq: torch.Tensor, logp: torch.Tensor, beta: float) -> torch.Tensor:
    """beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q, with log m by
    logaddexp: forming m from probabilities would underflow to 0 where both are tiny and
    make log m -inf."""
    logm = torch.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))
    return (beta * (logp.exp() * (logp - logm)).sum(-1)
            + (1 - beta) * (logq.exp() * (logq - logm)).sum(-1))


DIVERGENCES: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "forward_kl": _forward_kl,
    "reverse_kl": _reverse_kl,
    "jsd": _jsd,
}


def divergence(
    logits: torch.Tensor,  # (..., V) the student's
    teacher_logits: torch.Tensor,  # (..., V)
    kind: Kind = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:  # (...)
    """The divergence between teacher p = softmax(z_t / T) and student q = softmax(z_s / T) at
    every position, times T^2, in nats; fp32 (fp64 when given fp64) whatever the logits' dtype.

    T^2 (Hinton et al. 2015, section 2): the gradient of the softened loss with respect to the
    student's logits is (q - p) / T for forward KL, and for T large against the logits'
    spread it shrinks as 1 / T^2; the factor keeps the soft term's gradients on the scale of
    the hard loss's as T changes, so alpha means the same at every T.

    Worked examples, V = 2 (p the teacher, q the student):
      teacher [log 3, 0] (p = 3/4, 1/4), student [0, 0] (q = 1/2, 1/2), T = 1:
        forward_kl = 3/4 log(3/2) + 1/4 log(1/2)                     = 0.130812
        reverse_kl = 1/2 log(2/3) + 1/2 log(2) = 1/2 log(4/3)       = 0.143841
        jsd, beta 1/2: m = (5/8, 3/8);
          1/2 (3/4 log(6/5) + 1/4 log(2/3)) + 1/2 (1/2 log(4/5) + 1/2 log(4/3)) = 0.033822
      teacher [log 9, 0] at T = 2 is p = (3/4, 1/4) again: forward_kl = 4 x 0.130812 = 0.523248.
    jsd is bounded by the mixture weights' entropy, -beta log beta - (1-beta) log(1-beta)
    (log 2 at beta = 1/2), times T^2; as beta -> 0 it tends to beta x forward_kl, as
    beta -> 1 to (1 - beta) x reverse_kl.
    """
    acc = torch.promote_types(logits.dtype, torch.float32)  # fp32, or fp64 when given fp64
    logq = F.log_softmax(logits.to(acc) / temperature, dim=-1)
    logp = F.log_softmax(teacher_logits.to(acc) / temperature, dim=-1)
    return temperature**2 * DIVERGENCES[kind](logq, logp, beta)


def distill_loss(
    hidden: torch.Tensor,  # (..., D) the student's last hidden states
    head: Head,  # the student's output layer: (n, D) -> (n, V)
    teacher_hidden: torch.Tensor,  # (..., D_t) the teacher's, at the same positions
    teacher_head: Head,  # (n, D_t) -> (n, V); run without a graph
    targets: torch.Tensor,  # (...) next-token ids (the hard labels)
    loss_mask: torch.Tensor | None = None,  # (...) 1 where the position counts
    *,
    kind: Kind = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 0.5,
    beta: float = 0.5,
    chunk_rows: int = 256,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over the masked positions of alpha x soft + (1 - alpha) x hard, where soft is
    `divergence(head(hidden), teacher_head(teacher_hidden), kind, temperature, beta)` and hard
    the student's cross-entropy on `targets` at T = 1 (`causal_lm_loss`, per chunk).

    Positions the mask leaves out are never read (selected away before any arithmetic), so
    padding may hold anything. A head that is the identity makes `hidden` the logits
    themselves (the fallback for models whose logits are not just an output layer).

    Metrics (means over the positions): soft, hard, agree (the student's argmax is the
    teacher's), teacher_ce (the teacher's own cross-entropy on the targets), n_tokens.

    Worked example: teacher [log 3, 0], student [0, 0], target 0, T = 1, alpha = 1/2, forward
    KL: 1/2 x 0.130812 + 1/2 x log 2 = 0.411980.
    """
    if loss_mask is not None:
        keep = loss_mask.bool()
        hidden, teacher_hidden, targets = hidden[keep], teacher_hidden[keep], targets[keep]
    else:
        hidden = hidden.reshape(-1, hidden.size(-1))
        teacher_hidden = teacher_hidden.reshape(-1, teacher_hidden.size(-1))
        targets = targets.reshape(-1)
    n = targets.numel()

    def chunk(h: torch.Tensor, th: torch.Tensor, tg: torch.Tensor) -> torch.Tensor:
        """Sums over the chunk's rows: (soft, hard, agreements, teacher CE); the last two
        carry no gradient."""
        z = head(h)  # (c, V)
        with torch.no_grad():
            zt = teacher_head(th)  # (c, V)
        soft = divergence(z, zt, kind, temperature, beta).sum()
        hard = causal_lm_loss(z, tg)[0] * tg.numel()
        with torch.no_grad():
            agree = (z.argmax(-1) == zt.argmax(-1)).sum().to(soft.dtype)
            t_ce = causal_lm_loss(zt, tg)[0].to(soft.dtype) * tg.numel()
        return torch.stack([soft, hard.to(soft.dtype), agree, t_ce])

    sums: torch.Tensor | None = None
    for i in range(0, n, chunk_rows):
        args = (hidden[i:i + chunk_rows], teacher_hidden[i:i + chunk_rows], targets[i:i + chunk_rows])
        # the checkpoint keeps only the chunk's inputs; its (c, V) intermediates are rebuilt
        # in the backward, one chunk at a time
        s = checkpoint(chunk, *args, use_reentrant=False) if torch.is_grad_enabled() else chunk(*args)
        sums = s if sums is None else sums + s
    if sums is None:  # no position to learn from: a zero that still has a graph
        return hidden.sum() * 0.0, {"soft": 0.0, "hard": 0.0, "agree": 0.0, "teacher_ce": 0.0,
                                    "n_tokens": 0.0}
    mean = sums / n
    loss = alpha * mean[0] + (1 - alpha) * mean[1]
    m = mean.detach().tolist()
    return loss, {"soft": m[0], "hard": m[1], "agree": m[2], "teacher_ce": m[3], "n_tokens": float(n)}
