"""Advantage estimators: pure functions on tensors (DESIGN rule 11).

Group-relative ones (GRPO, Dr. GRPO, RLOO) take one scalar reward per sampled completion, laid
out group after group: rewards[k * G : (k + 1) * G] are the G completions of prompt k. GAE takes
per-token rewards and a value model's per-token values. `whiten` normalizes either.
`kl_shaped_rewards` builds PPO's per-token rewards (a score plus the KL penalty) that GAE takes,
and `adaptive_kl_coef` steers the penalty's weight towards a target KL.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

GroupScale = Literal["std", "none"]


def _groups(rewards: torch.Tensor, group_size: int, least: int) -> torch.Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be (N,), got shape {tuple(rewards.shape)}")
    if group_size < least:
        raise ValueError(f"group_size must be >= {least} here, got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards are not a whole number of groups of "
                         f"{group_size} (N must be a multiple of group_size)")
    return rewards.reshape(-1, group_size)  # (N / G, G)


# what the centered rewards are divided by: (N / G, G), eps -> (N / G, 1); and the least group
# size each is defined for (an unbiased std needs two samples, centering one)
_SCALES: dict[GroupScale, tuple[Callable[[torch.Tensor, float], torch.Tensor], int]] = {
    # unbiased (Bessel-corrected) std, torch's default, as TRL's GRPOTrainer computes it
    "std": (lambda g, eps: g.std(-1, keepdim=True) + eps, 2),
    # Dr. GRPO (Liu et al. 2025): dividing by the std up-weights prompts that are
    # nearly always right or nearly always wrong, a question-difficulty bias; center only
    "none": (lambda g, eps: torch.ones_like(g[:, :1]), 1),
}


def group_advantages(
    rewards: torch.Tensor,  # (N,)
    group_size: int,
    scale: GroupScale = "std",
    eps: float = 1e-4,
) -> torch.Tensor:
    """GRPO's outcome advantages (Shao et al. 2024, DeepSeekMath, outcome supervision): (N,).

    "std": (r - group mean) / (group std + eps), the std unbiased (divides by G - 1; torch's
    default and TRL's); eps = 1e-4 is TRL's and keeps an all-equal group at exactly 0 instead of
    0/0. "none": r - group mean (Dr. GRPO; eps unused).

    Worked example: one group [1, 0, 0, 1]: mean 1/2, unbiased std sqrt(1/3) = 0.5774, so
    "std" gives +-0.5 / (0.5774 + 1e-4) = +-0.8659 and "none" +-0.5; a group [1, 1, 1, 1]
    gives [0, 0, 0, 0].
    """
    if scale not in _SCALES:
        raise ValueError(f"unknown scale {scale!r}; one of {sorted(_SCALES)}")
    denom_of, least = _SCALES[scale]
    grouped = _groups(rewards, group_size, least)  # (N / G, G)
    centered = grouped - grouped.mean(-1, keepdim=True)  # (N / G, G)
    return (centered / denom_of(grouped, eps)).reshape(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024): r_i minus the mean
    of the other G - 1 rewards of its group: (N,). An unbiased baseline, since it does not
    depend on sample i; equal to G / (G - 1) * (r_i - group mean).

    Worked example: [1, 0, 0, 1]: 1 - 1/3 = 2/3 and 0 - 2/3 = -2/3, i.e. 4/3 * +-1/2.
    """
    grouped = _groups(rewards, group_size, 2)  # (N / G, G)
    others = (grouped.sum(-1, keepdim=True) - grouped) / (group_size - 1)  # (N / G, G)
    return (grouped - others).reshape(-1)


def gae(
    rewards: torch.Tensor,  # (B, T) per-token rewards
    values: torch.Tensor,  # (B, T) the value model's V(s_t)
    loss_mask: torch.Tensor,  # (B, T) 1 on the tokens the policy generated
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016): (advantages, returns), (B, T).

    delta_t = r_t + gamma V(next) - V_t and A_t = delta_t + gamma lam A(next), where "next" is
    the row's next VALID position: masked positions (prompt, padding, tool output in a
    multi-turn row) are skipped, neither contributing their reward and value nor receiving an
    advantage (0 there), as verl's multi-turn GAE does. After a row's last valid token the value
    is 0 (the episode ends). returns = A + V on valid positions, the value model's target.
    Outputs carry no gradient: they are targets, and the values' graph must not leak into them.

    Worked example: rewards [0, 0, 1], values [0.5, 0.6, 0.7], gamma = lam = 0.5:
    delta = [0 + 0.3 - 0.5, 0 + 0.35 - 0.6, 1 + 0 - 0.7] = [-0.2, -0.25, 0.3];
    A_2 = 0.3, A_1 = -0.25 + 0.25 * 0.3 = -0.175, A_0 = -0.2 + 0.25 * -0.175 = -0.24375;
    returns [0.25625, 0.425, 1.0].
    """
    if not rewards.shape == values.shape == loss_mask.shape or rewards.dim() != 2:
        raise ValueError(f"rewards, values and loss_mask must all be (B, T); got {tuple(rewards.shape)}, "
                         f"{tuple(values.shape)}, {tuple(loss_mask.shape)}")
    valid = loss_mask.bool()  # (B, T)
    r, v = rewards.detach(), values.detach()
    next_value = torch.zeros_like(v[:, 0])  # (B,) 0: nothing follows a row's last valid token
    next_adv = torch.zeros_like(v[:, 0])  # (B,)
    advs: list[torch.Tensor] = []
    for t in reversed(range(r.size(1))):
        ok = valid[:, t]  # (B,)
        adv = r[:, t] + gamma * next_value - v[:, t] + gamma * lam * next_adv  # (B,)
        # a masked position passes the carried value and advantage through untouched
        next_value = torch.where(ok, v[:, t], next_value)
        next_adv = torch.where(ok, adv, next_adv)
        advs.append(torch.where(ok, adv, 0.0))
    advantages = torch.stack(advs[::-1], dim=1)  # (B, T)
    return advantages, torch.where(valid, advantages + v, 0.0)


def whiten(
    x: torch.Tensor,
    mask: torch.Tensor | None = None,  # same shape as x; None: every element
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked elements, mean added back when
    shift_mean is False (scale only, as PPO does to rewards); masked-out elements come out 0.

    As TRL's masked_whiten: the variance is unbiased (divides by n - 1), so at least two
    elements are needed.

    Worked example: [1, 3, 5]: mean 3, var (4 + 0 + 4) / 2 = 4, gives [-1, 0, 1] (to 1e-8
    relative, from eps); shift_mean False: [2, 3, 4].
    """
    m = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
    n = int(m.sum())
    if n < 2:
        raise ValueError(f"whiten needs at least 2 elements under the mask for an unbiased variance, got {n}")
    mean = torch.where(m, x, 0.0).sum() / n
    var = torch.where(m, x - mean, 0.0).square().sum() / (n - 1)
    out = (x - mean) * torch.rsqrt(var + eps)
    return torch.where(m, out if shift_mean else out + mean, 0.0)


# ------------------------------------------------------------------- PPO's reward shaping


def kl_shaped_rewards(
    scores: torch.Tensor,  # (B,) one score per completion: a reward model's, or a verifier's
    logps: torch.Tensor,  # (B, T) the policy that sampled
    ref_logps: torch.Tensor,  # (B, T) the frozen reference
    loss_mask: torch.Tensor,  # (B, T)
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classical RLHF's per-token rewards (Ziegler et al. 2019; Ouyang et al. 2022): (rewards,
    kl), both (B, T), 0 off the mask.

    r_t = -kl_coef * (logp_t - ref_logp_t) on every generated token, plus the completion's score
    on its last one: the KL penalty is part of the reward (GAE spreads it), where GRPO puts it in
    the loss. The per-token term is the k1 estimate, whose sum over a completion is an unbiased
    estimate of the sequence KL (and is what TRL's and OpenRLHF's PPO use); it is negative on
    tokens the policy likes less than the reference does.

    Worked example: logps [log 0.5, log 0.5], ref [log 0.25, log 0.5], score 1, kl_coef 0.1:
    kl = [log 2, 0] = [0.6931, 0], rewards [-0.06931, 1.0].
    """
    if scores.dim() != 1 or not logps.shape == ref_logps.shape == loss_mask.shape \
            or logps.size(0) != scores.size(0):
        raise ValueError(f"scores must be (B,) and logps, ref_logps, loss_mask (B, T); got "
                         f"{tuple(scores.shape)}, {tuple(logps.shape)}, {tuple(ref_logps.shape)}, "
                         f"{tuple(loss_mask.shape)}")
    valid = loss_mask.bool()
    if not valid.any(-1).all():
        raise ValueError("every row needs at least one generated token to carry its score")
    kl = torch.where(valid, logps.detach() - ref_logps.detach(), 0.0)  # (B, T)
    rewards = -kl_coef * kl
    # the last valid position of each row: the highest index whose mask is 1
    idx = torch.arange(valid.size(1), device=valid.device)
    last = torch.where(valid, idx, -1).amax(-1)  # (B,)
    rewards[torch.arange(valid.size(0)), last] += scores.detach().to(rewards.dtype)
    return rewards, kl


def adaptive_kl_coef(coef: float, kl: float, target: float, horizon: float, n_steps: int) -> float:
    """Ziegler et al. 2019's proportional controller: the KL coefficient after a batch whose
    mean sequence KL was `kl`, steering it towards `target`. The error kl / target - 1 is
    clipped to +-0.2, so one batch moves the coefficient by at most 0.2 * n_steps / horizon of
    itself; `n_steps` is the batch's size in the controller's units (TRL: completions).

    Worked example: coef 0.1, kl 12, target 6, horizon 10000, n_steps 512: the error 1 is
    clipped to 0.2, coef 0.1 * (1 + 0.2 * 512 / 10000) = 0.101024; kl 6 leaves it at 0.1.
    """
    if target <= 0 or horizon <= 0:
        raise ValueError(f"target and horizon must be > 0, got {target} and {horizon}")
    error = min(max(kl / target - 1, -0.2), 0.2)
    return coef * (1 + error * n_steps / horizon)
