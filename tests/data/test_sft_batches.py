"""SFT batches: length fitting rules, packing, packed == unpacked (loss and gradients),
batches as a pure function of the step."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from lmforge.chat import Rendered
from lmforge.data.sft import SftBatches, collate, fit_length, lm_logits, pack_rows
from lmforge.losses.lm import causal_lm_loss
from tests.conftest import micro_llama


def ex(n_prompt: int, n_answer: int, start: int = 3) -> Rendered:
    ids = [(start + i) % 60 + 3 for i in range(n_prompt + n_answer)]
    return Rendered(ids, [0] * n_prompt + [1] * n_answer)


def test_fit_length_truncates_the_prompt_never_the_answer() -> None:
    long_prompt, long_answer, fits = ex(20, 5), ex(3, 20), ex(4, 4)
    kept, st = fit_length([long_prompt, long_answer, fits, ex(5, 0)], 12, "left")
    assert kept[0].ids == long_prompt.ids[-12:] and sum(kept[0].loss_mask) == 5
    assert kept[1] is fits
    assert (st.truncated, st.dropped_overlong, st.dropped_no_loss, st.examples) == (1, 1, 1, 4)
    kept, st = fit_length([long_prompt, fits], 12, "drop")
    assert kept == [fits] and st.dropped_overlong == 1 and st.truncated == 0


def test_multi_turn_truncation_keeps_the_last_answer_whole() -> None:
    r = Rendered(list(range(3, 23)), [0] * 4 + [1] * 4 + [0] * 4 + [1] * 8)
    kept, st = fit_length([r], 13, "left")
    # the first answer loses its start (counted as truncated); the last one is whole
    assert kept[0].loss_mask == [1] + [0] * 4 + [1] * 8 and kept[0].ids == r.ids[-13:]
    assert st.truncated == 1
    assert fit_length([r], 8, "left")[1].dropped_overlong == 1  # answer's start would go


def test_pack_rows_respects_capacity_and_uses_every_example_once() -> None:
    lengths = [int(x) for x in torch.randint(2, 40, (300,), generator=torch.Generator().manual_seed(0))]
    rows = pack_rows(lengths, 64, seed=1)
    assert sorted(i for r in rows for i in r) == list(range(300))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    assert sum(lengths) / (64 * len(rows)) > 0.95  # best-fit wastes little here
    assert rows == pack_rows(lengths, 64, seed=1)


def gpt2_micro() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0))


@pytest.mark.parametrize("make", [micro_llama, gpt2_micro], ids=["llama", "gpt2"])
def test_packed_equals_unpacked_loss_and_gradients(make) -> None:
    """Each example's loss and gradient, computed inside a packed row next to others, equal
    those computed alone: no attention crosses an example boundary. In float64, so the bound
    measures leakage, not kernels: packed and alone run the same sums over differently shaped
    matmuls, whose blocking (and so rounding order) differs by CPU; float64 rounding over
    these few-dozen-term sums is ~1e-15, and any leak of another example's tokens moves a
    loss by far more than the 1e-10 bound."""
    model = make().double()
    examples = [ex(5, 4, 0), ex(3, 7, 11), ex(6, 2, 23)]
    packed = collate(examples, [[0, 1, 2]], pad_id=0)
    alone = [collate(examples, [[i]], pad_id=0) for i in range(3)]

    def per_example(batch, keep):  # loss over the targets of one example only
        logits = lm_logits(model, batch)
        return causal_lm_loss(logits, batch["targets"], batch["loss_mask"] * keep)[0]

    offset = 0
    for b in alone:
        n = b["input_ids"].size(1)
        keep = torch.zeros_like(packed["loss_mask"])
        keep[:, offset:offset + n] = 1
        offset += n
        model.zero_grad()
        lp = per_example(packed, keep)
        lp.backward()
        gp = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        la = per_example(b, torch.ones_like(b["loss_mask"]))
        la.backward()
        assert abs(float(lp.detach()) - float(la.detach())) < 1e-10
        for g1, p in zip(gp, model.parameters()):
            torch.testing.assert_close(g1, p.grad, atol=1e-10, rtol=0)


def test_padding_is_never_a_target_and_positions_continue() -> None:
    b = collate([ex(2, 2), ex(3, 4)], [[0], [1]], pad_id=1)
    assert b["input_ids"][0].tolist()[3:] == [1, 1, 1]
    assert b["loss_mask"][0].tolist() == [0, 1, 1, 0, 0, 0] and b["valid"][0].sum() == 3
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5]  # no restart: no extra segment


def test_micro_batches_are_a_pure_function_of_the_step() -> None:
    exs = [ex(3 + i % 5, 2 + i % 3, i) for i in range(50)]
    a = SftBatches(exs, 32, packing=True, seed=3, pad_id=0)
    b = SftBatches(exs, 32, packing=True, seed=3, pad_id=0)
    for step in (0, 7, 40):  # 40 steps * 4 rows crosses several epochs
        for x, y in zip(a.micro_batches(step, 2, 2), b.micro_batches(step, 2, 2)):
            assert all(torch.equal(x[k], y[k]) for k in x)
    # one epoch visits every row exactly once
    R = len(a.rows)
    seen = [r for s in range(R) for r in a._row_ids(s, 1)]
    assert sorted(seen) == list(range(R))
