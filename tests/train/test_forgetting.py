"""Forgetting controls: merge_rows padding, replay layout, the diagonal Fisher against a
plain loop, the anchor penalty after a known move, and token-weighted perplexity."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.data.pack import TokenWindows
from lmforge.train.forgetting import Anchor, GeneralText, fisher_diagonal, merge_rows, perplexity
from tests.conftest import SEQ, VOCAB, micro_llama

CPU = torch.device("cpu")
L = torch.long


# --------------------------------------------------------------------------------- merge_rows


def test_merge_rows_pads_shorter_batch_by_hand() -> None:
    sft = {  # one packed row of two examples, T=3
        "input_ids": torch.tensor([[5, 6, 7]]),
        "targets": torch.tensor([[6, 7, 8]]),
        "loss_mask": torch.tensor([[0, 1, 1]]),
        "position_ids": torch.tensor([[0, 0, 1]]),
        "valid": torch.tensor([[1, 1, 1]]),
    }
    replay = {  # two rows, T=5
        "input_ids": torch.tensor([[1, 2, 3, 4, 5], [9, 8, 7, 6, 5]]),
        "targets": torch.tensor([[2, 3, 4, 5, 6], [8, 7, 6, 5, 4]]),
        "loss_mask": torch.ones(2, 5, dtype=L),
        "position_ids": torch.arange(5).expand(2, 5).clone(),
        "valid": torch.ones(2, 5, dtype=L),
    }
    m = merge_rows(sft, replay, pad_id=63)
    assert set(m) == set(sft)
    assert torch.equal(m["input_ids"], torch.tensor([[5, 6, 7, 63, 63], [1, 2, 3, 4, 5],
                                                     [9, 8, 7, 6, 5]]))
    assert torch.equal(m["targets"], torch.tensor([[6, 7, 8, 0, 0], [2, 3, 4, 5, 6],
                                                   [8, 7, 6, 5, 4]]))
    assert torch.equal(m["loss_mask"], torch.tensor([[0, 1, 1, 0, 0], [1] * 5, [1] * 5]))
    # positions continue the last example (1 -> 2, 3): no restart, no extra segment
    assert torch.equal(m["position_ids"], torch.tensor([[0, 0, 1, 2, 3], [0, 1, 2, 3, 4],
                                                        [0, 1, 2, 3, 4]]))
    assert torch.equal(m["valid"], torch.tensor([[1, 1, 1, 0, 0], [1] * 5, [1] * 5]))
    assert all(v.dtype == L for v in m.values())

    # the other way round: the second batch is the one padded, and rows keep their order
    m2 = merge_rows(replay, sft, pad_id=63)
    assert torch.equal(m2["input_ids"], m["input_ids"][[1, 2, 0]])
    assert torch.equal(m2["position_ids"], m["position_ids"][[1, 2, 0]])
    assert torch.equal(m2["valid"], m["valid"][[1, 2, 0]])


def test_merge_rows_equal_lengths_is_plain_concat() -> None:
    a = {"input_ids": torch.tensor([[1, 2]]), "position_ids": torch.tensor([[0, 1]])}
    b = {"input_ids": torch.tensor([[3, 4]]), "position_ids": torch.tensor([[4, 5]])}
    m = merge_rows(a, b, pad_id=0)
    assert torch.equal(m["input_ids"], torch.tensor([[1, 2], [3, 4]]))
    assert torch.equal(m["position_ids"], torch.tensor([[0, 1], [4, 5]]))


# ------------------------------------------------------------------------------- replay_rows


def test_replay_rows_layout(windows: TokenWindows) -> None:
    general = GeneralText(train=windows, val=windows)
    b = general.replay_rows(seed=3, step=2, n=4)
    assert set(b) == {"input_ids", "targets", "loss_mask", "position_ids", "valid"}
    assert all(v.shape == (4, SEQ) for v in b.values())
    assert torch.equal(b["targets"][:, :-1], b["input_ids"][:, 1:])  # shifted by one
    # each row is a contiguous slice of the packed ids
    data = np.asarray(windows.data, dtype=np.int64)
    full = torch.cat([b["input_ids"], b["targets"][:, -1:]], 1).numpy()
    for row in full:
        starts = np.flatnonzero(data[: len(data) - SEQ] == row[0])
        assert any((data[s : s + SEQ + 1] == row).all() for s in starts)
    assert torch.equal(b["loss_mask"], torch.ones(4, SEQ, dtype=L))
    assert torch.equal(b["valid"], torch.ones(4, SEQ, dtype=L))
    assert torch.equal(b["position_ids"], torch.arange(SEQ).expand(4, SEQ))
    # a pure function of (seed, step), on a stream of its own (not pretraining's windows)
    assert torch.equal(general.replay_rows(3, 2, 4)["input_ids"], b["input_ids"])
    assert not torch.equal(general.replay_rows(3, 3, 4)["input_ids"], b["input_ids"])
    assert not torch.equal(windows.batch(3, 2, 4)[:, :-1], b["input_ids"])
    # rows merge with SFT rows without any padding when lengths match
    m = merge_rows(b, general.replay_rows(3, 5, 2), pad_id=0)
    assert m["input_ids"].shape == (6, SEQ)


# --------------------------------------------------------------------------- fisher_diagonal


def test_fisher_diagonal_matches_plain_loop(windows: TokenWindows) -> None:
    model = micro_llama(seed=0)
    model.train()
    params = [p for n, p in model.named_parameters() if "layers.1" in n or "norm" in n]
    n, seed = 3, 11
    fisher = fisher_diagonal(model, params, windows, n=n, seed=seed, device=CPU)
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())  # no gradients left behind

    ref = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for i in range(n):
        w = windows.batch(seed + 104729, i, 1)
        logits = model(input_ids=w[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), w[:, 1:].reshape(-1))
        grads = torch.autograd.grad(loss, params)
        for r, g in zip(ref, grads):
            r += g.double() ** 2 / n
    mean = sum(float(r.sum()) for r in ref) / sum(r.numel() for r in ref)
    assert len(fisher) == len(params)
    for f, r, p in zip(fisher, ref, params):
        assert f.shape == p.shape and f.dtype == torch.float32
        assert torch.allclose(f.double(), r / mean, rtol=1e-3, atol=1e-6)
    total = sum(float(f.double().sum()) for f in fisher)
    assert total / sum(f.numel() for f in fisher) == pytest.approx(1.0, rel=1e-5)
    assert all((f >= 0).all() for f in fisher)


# ----------------------------------------------------------------------------------- Anchor


def test_anchor_penalty_after_known_move() -> None:
    model = micro_llama()
    for p in model.model.layers[0].parameters():  # frozen params are not anchored
        p.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    coef = 0.3
    anchor = Anchor.of(model, coef)
    assert len(anchor.params) == len(trainable)
    assert all(a is p for a, p in zip(anchor.params, trainable))
    pen, m = anchor.penalty()
    assert float(pen.detach()) == 0.0 and m["anchor_penalty"] == 0.0

    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(p.shape, generator=g) * 0.05 for p in trainable]
    with torch.no_grad():
        for p, d in zip(trainable, deltas):
            p.add_(d)
        model.model.layers[0].self_attn.q_proj.weight.add_(1.0)  # frozen: must not count
    expected = coef * 0.5 * sum(float((d.double() ** 2).sum()) for d in deltas)
    pen, _ = anchor.penalty()
    assert float(pen.detach()) == pytest.approx(expected, rel=1e-4)
    # the start is a copy, not a view of the moving weights; gradient is coef * d
    pen.backward()
    for p, d in zip(trainable, deltas):
        assert torch.allclose(p.grad, coef * d, atol=1e-6)


def test_anchor_with_fisher_weights_the_move() -> None:
    model = micro_llama()
    params = [p for p in model.parameters() if p.requires_grad]
    fisher = [torch.full_like(p, float(i % 3)) for i, p in enumerate(params)]
    anchor = Anchor.of(model, 2.0, fisher)
    with torch.no_grad():
        for p in params:
            p.add_(0.1)
    expected = 2.0 * 0.5 * sum(float(f.sum()) * 0.01 for f in fisher)
    assert float(anchor.penalty()[0].detach()) == pytest.approx(expected, rel=1e-4)


# ------------------------------------------------------------------------------- perplexity


def test_perplexity_is_exp_token_weighted_mean(tmp_path: Path) -> None:
    # 90 ids / 17 per window -> 5 windows; micro 3 -> batches of 3 and 2 (unequal sizes,
    # so a mean of batch means would differ from the token-weighted mean)
    ids = np.random.default_rng(1).integers(0, VOCAB, size=90).astype(np.uint16)
    ids.tofile(tmp_path / "val.bin")
    w = TokenWindows(tmp_path / "val.bin", "uint16", SEQ)
    model = micro_llama(seed=2)
    batches = w.eval_batches(2, 3)
    assert [b.size(0) for b in batches] == [3, 2]

    nll, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b[:, :-1]).logits.double()
            nll += float(F.cross_entropy(logits.reshape(-1, VOCAB), b[:, 1:].reshape(-1),
                                         reduction="sum"))
            count += b[:, 1:].numel()
    assert count == 5 * SEQ
    ppl = perplexity(model, w, n_batches=2, micro=3, device=CPU)
    assert ppl == pytest.approx(math.exp(nll / count), rel=1e-5)
    # the windows are fixed: the same number every call
    assert perplexity(model, w, n_batches=2, micro=3, device=CPU) == ppl


def test_perplexity_runs_without_dropout_and_restores_the_mode(windows: TokenWindows) -> None:
    """With attention dropout at 0.5, a forward in train mode is random; the monitor's
    perplexity must equal the eval-mode value exactly, and leave the model training."""
    model = micro_llama()
    model.config.attention_dropout = 0.5
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    model.eval()
    want = perplexity(model, windows, 2, 4, CPU)
    model.train()
    torch.manual_seed(1)
    assert perplexity(model, windows, 2, 4, CPU) == want
    assert model.training
