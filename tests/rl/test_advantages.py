"""Advantage estimators: closed forms worked by hand, naive loops, and the identities that tie
them together (RLOO against centering, GAE's lambda = 0 / 1 limits, masked positions skipped)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from lmforge.rl.advantages import gae, group_advantages, rloo_advantages, whiten

# float64 sums of a handful of O(1) terms, each a few ulps (2.2e-16) off
F64 = {"rel": 1e-12, "abs": 1e-14}
D = torch.float64
T = torch.tensor


def _rand(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


# ------------------------------------------------------------------------ group advantages


def test_group_advantages_closed_form() -> None:
    r = T([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0], dtype=D)
    adv = group_advantages(r, 4)
    # group 0: mean 1/2, unbiased std sqrt((4 * 1/4) / 3) = sqrt(1/3)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert adv[:4].tolist() == pytest.approx([a, -a, -a, a], **F64)
    assert a == pytest.approx(0.8659, abs=1e-4)
    # group 1, all rewards equal: exactly 0 (centered 0, std 0, eps keeps 0/0 away), no nan
    assert adv[4:].tolist() == [0.0] * 4
    assert group_advantages(r, 4, scale="none").tolist() == [0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]


def test_group_of_equal_inexact_rewards_stays_near_zero() -> None:
    # 0.1 has no exact binary form: the mean of three of them may be off by an ulp (~1e-17),
    # and that over (std ~1e-17 + eps 1e-4) is ~1e-13, never the 0/0 an eps-free form risks
    adv = group_advantages(T([0.1, 0.1, 0.1], dtype=D), 3)
    assert torch.isfinite(adv).all() and adv.abs().max() < 1e-12


def test_group_advantages_match_naive_loop() -> None:
    r = _rand((20,), 0)
    for G in (2, 4, 5):
        adv = group_advantages(r, G, eps=1e-4)
        for k in range(20 // G):
            group = r[k * G : (k + 1) * G].tolist()
            mean, sd = statistics.fmean(group), statistics.stdev(group)  # stdev: n - 1, as torch
            want = [(x - mean) / (sd + 1e-4) for x in group]
            assert adv[k * G : (k + 1) * G].tolist() == pytest.approx(want, **F64)
        centered = group_advantages(r, G, scale="none").reshape(-1, G)
        assert centered.sum(-1).abs().max() < 1e-14  # each group's advantages sum to 0


def test_group_advantages_reject_bad_shapes() -> None:
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.zeros(10), 4)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(4), 1)  # an unbiased std of one sample is undefined
    assert group_advantages(torch.ones(4), 1, scale="none").tolist() == [0.0] * 4
    with pytest.raises(ValueError, match=r"\(N,\)"):
        group_advantages(torch.zeros(2, 4), 4)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), 2, scale="mad")  # type: ignore[arg-type]


def test_rloo_closed_form_and_identity() -> None:
    adv = rloo_advantages(T([1.0, 0.0, 0.0, 1.0], dtype=D), 4)
    assert adv.tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3], **F64)
    r = _rand((12,), 1)
    for G in (2, 3, 4, 6):
        # r_i - mean of the others == G / (G - 1) * (r_i - group mean)
        want = G / (G - 1) * group_advantages(r, G, scale="none")
        assert torch.allclose(rloo_advantages(r, G), want, rtol=1e-12, atol=1e-14)
        naive = [r[i] - (sum(r[(i // G) * G : (i // G + 1) * G].tolist()) - r[i]) / (G - 1) for i in range(12)]
        assert rloo_advantages(r, G).tolist() == pytest.approx([float(x) for x in naive], **F64)
    with pytest.raises(ValueError, match="group_size"):
        rloo_advantages(r, 1)
    with pytest.raises(ValueError, match="multiple"):
        rloo_advantages(r, 5)


# ------------------------------------------------------------------------------------- GAE


def test_gae_closed_form() -> None:
    rewards, values = T([[0.0, 0.0, 1.0]], dtype=D), T([[0.5, 0.6, 0.7]], dtype=D)
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=0.5, lam=0.5)
    # delta = [0 + 0.5 * 0.6 - 0.5, 0 + 0.5 * 0.7 - 0.6, 1 + 0 - 0.7] = [-0.2, -0.25, 0.3];
    # A_2 = 0.3, A_1 = -0.25 + 0.25 * 0.3, A_0 = -0.2 + 0.25 * A_1
    assert adv[0].tolist() == pytest.approx([-0.24375, -0.175, 0.3], **F64)
    assert ret[0].tolist() == pytest.approx([0.25625, 0.425, 1.0], **F64)
    # the same three tokens with a prompt before, a tool output between and padding after:
    # garbage there is never read, and those positions get 0
    nan = float("nan")
    rewards = T([[nan, 0.0, 5.0, 0.0, 1.0, nan]], dtype=D)
    values = T([[nan, 0.5, 9.0, 0.6, 0.7, nan]], dtype=D)
    mask = T([[0, 1, 0, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    assert adv[0].tolist() == pytest.approx([0.0, -0.24375, 0.0, -0.175, 0.3, 0.0], **F64)
    assert ret[0].tolist() == pytest.approx([0.0, 0.25625, 0.0, 0.425, 1.0, 0.0], **F64)


def _naive_gae(r: list[float], v: list[float], m: list[int], gamma: float, lam: float) -> list[float]:
    """The textbook recursion on the row's valid positions only, scattered back."""
    idx = [t for t in range(len(m)) if m[t]]
    out = [0.0] * len(m)
    running = 0.0
    for k in reversed(range(len(idx))):
        t = idx[k]
        next_v = v[idx[k + 1]] if k + 1 < len(idx) else 0.0
        running = r[t] + gamma * next_v - v[t] + gamma * lam * running
        out[t] = running
    return out


def test_gae_matches_naive_loop() -> None:
    rewards, values = _rand((5, 9), 2), _rand((5, 9), 3)
    mask = (torch.rand(5, 9, generator=torch.Generator().manual_seed(4)) > 0.3).long()
    mask[3] = 0  # an empty row
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.7)
    for i in range(5):
        want = _naive_gae(rewards[i].tolist(), values[i].tolist(), mask[i].tolist(), 0.9, 0.7)
        assert adv[i].tolist() == pytest.approx(want, **F64)
    assert torch.equal(ret, torch.where(mask.bool(), adv + values, 0.0))


def test_gae_limits() -> None:
    """lam = 0: the one-step TD error; lam = gamma = 1 with zero values: the reward-to-go."""
    rewards, values = _rand((3, 5), 5), _rand((3, 5), 6)
    mask = torch.ones(3, 5)
    adv0, _ = gae(rewards, values, mask, gamma=0.8, lam=0.0)
    next_v = torch.cat([values[:, 1:], torch.zeros(3, 1, dtype=D)], 1)
    assert torch.allclose(adv0, rewards + 0.8 * next_v - values, rtol=1e-12, atol=1e-15)
    adv1, ret1 = gae(rewards, torch.zeros_like(values), mask, gamma=1.0, lam=1.0)
    to_go = rewards.flip(1).cumsum(1).flip(1)
    assert torch.allclose(adv1, to_go, rtol=1e-12, atol=1e-14) and torch.equal(ret1, adv1)


def test_gae_carries_no_gradient() -> None:
    values = _rand((2, 4), 7).requires_grad_(True)
    adv, ret = gae(_rand((2, 4), 8), values, torch.ones(2, 4), gamma=1.0, lam=0.95)
    assert not adv.requires_grad and not ret.requires_grad
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        gae(torch.zeros(2, 4), torch.zeros(2, 3), torch.ones(2, 4), gamma=1.0, lam=1.0)


# ---------------------------------------------------------------------------------- whiten


def test_whiten_closed_form() -> None:
    x = T([1.0, 3.0, 5.0], dtype=D)  # mean 3, unbiased var (4 + 0 + 4) / 2 = 4
    k = 1 / math.sqrt(1 + 1e-8 / 4)  # eps is added to var 4, so the scale is 1/2 times this
    assert whiten(x).tolist() == pytest.approx([-k, 0.0, k], **F64)
    assert whiten(x, shift_mean=False).tolist() == pytest.approx([3 - k, 3.0, 3 + k], **F64)
    # masked: the statistics come from [1, 3, 5] alone, and the masked entries come out 0
    y = T([1.0, 100.0, 3.0, float("nan"), 5.0], dtype=D)
    got = whiten(y, T([1, 0, 1, 0, 1]))
    assert got.tolist() == pytest.approx([-k, 0.0, 0.0, 0.0, k], **F64)


def test_whiten_gives_mean_zero_unit_variance() -> None:
    x = 3.0 + 2.0 * _rand((4, 6), 9)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 2:] = False
    w = whiten(x, mask, eps=0.0)[mask]
    assert float(w.mean()) == pytest.approx(0.0, abs=1e-14)
    assert float(w.var()) == pytest.approx(1.0, **F64)  # torch's var is unbiased, as whiten's
    kept = whiten(x, mask, shift_mean=False, eps=0.0)[mask]
    assert float(kept.mean()) == pytest.approx(float(x[mask].mean()), **F64)
    with pytest.raises(ValueError, match="at least 2"):
        whiten(x, torch.zeros(4, 6).index_put_((T([0]), T([0])), T(1.0)))


# -------------------------------------------------------------------- PPO's reward shaping


def test_kl_shaped_rewards_closed_form() -> None:
    from lmforge.rl.advantages import kl_shaped_rewards

    lp = T([[math.log(0.5), math.log(0.5), 0.0]], dtype=D)
    ref = T([[math.log(0.25), math.log(0.5), -9.0]], dtype=D)
    mask = T([[1, 1, 0]])
    rewards, kl = kl_shaped_rewards(T([1.0], dtype=D), lp, ref, mask, 0.1)
    assert kl[0].tolist() == pytest.approx([math.log(2), 0.0, 0.0], **F64)
    # the score lands on the last generated token (index 1), never on padding
    assert rewards[0].tolist() == pytest.approx([-0.1 * math.log(2), 1.0, 0.0], **F64)


def test_kl_shaped_rewards_score_on_each_rows_last_token_and_gae_sums_them() -> None:
    """With gamma = lam = 1 and zero values, GAE's advantage at a row's first token is the sum
    of its rewards: score - coef * sum(k1), the KL-regularized return of classical RLHF."""
    from lmforge.rl.advantages import kl_shaped_rewards

    lp, ref = _rand((3, 5), 1), _rand((3, 5), 2)
    mask = T([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 0, 1, 1, 0]])  # left pad, gaps, right pad
    scores = T([0.5, -1.0, 2.0], dtype=D)
    rewards, kl = kl_shaped_rewards(scores, lp, ref, mask, 0.05)
    for b, last in enumerate([2, 4, 3]):
        want = -0.05 * (lp[b] - ref[b]) * mask[b]
        want[last] += scores[b]
        assert rewards[b].tolist() == pytest.approx(want.tolist(), **F64)
    adv, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=1.0)
    first = [0, 1, 0]
    want = scores - 0.05 * ((lp - ref) * mask).sum(-1)
    assert [float(adv[b, f]) for b, f in enumerate(first)] == pytest.approx(want.tolist(), **F64)
    with pytest.raises(ValueError, match="at least one generated token"):
        kl_shaped_rewards(scores, lp, ref, mask * T([[1], [1], [0]]), 0.05)


def test_adaptive_kl_coef_closed_form() -> None:
    from lmforge.rl.advantages import adaptive_kl_coef

    assert adaptive_kl_coef(0.1, 12.0, 6.0, 10000, 512) == pytest.approx(0.101024, rel=1e-12)
    assert adaptive_kl_coef(0.1, 6.0, 6.0, 10000, 512) == 0.1
    # below target by half: error -0.5 clipped to -0.2; slightly above: unclipped 0.05
    assert adaptive_kl_coef(0.1, 3.0, 6.0, 1000, 100) == pytest.approx(0.1 * (1 - 0.02), rel=1e-12)
    assert adaptive_kl_coef(0.1, 6.3, 6.0, 1000, 100) == pytest.approx(0.1 * (1 + 0.005), rel=1e-12)
    with pytest.raises(ValueError):
        adaptive_kl_coef(0.1, 1.0, 0.0, 1000, 1)
