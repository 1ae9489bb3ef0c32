"""The rollout engine: its log-probs are the policy's, its ids are what it sampled, its stops
stop, and its draws are a function of the generator's seed."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from lmforge.errors import UserError
from lmforge.rl.rollout import HfEngine, SamplingCfg, pick, teacher_forced_logps
from tests.conftest import micro_llama
from tests.rl.conftest import make_prompts


def _gpt2(vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    conf = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return AutoModelForCausalLM.from_config(conf)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_sampled_logps_equal_teacher_forced(tok, arch: str, temperature: float) -> None:
    """The KV-cached, left-padded, compacting sampler reports the log-probs a plain forward
    over prompt + completion gives. fp32: both sum the same ~100 products per dot product in
    different orders/blockings, a relative error of a few ulps (1e-7) of values of order 1-10;
    1e-5 bounds that with room, and a wrong position, mask or temperature is off by >1e-2."""
    model = (micro_llama(vocab=len(tok)) if arch == "llama" else _gpt2(len(tok))).float()
    eng = HfEngine(model, tok, [tok.eos_token_id], tok.pad_token_id)
    cfg = SamplingCfg(max_new_tokens=12, temperature=temperature, batch_size=5)
    ro = eng.generate(make_prompts(tok, 11), cfg, torch.Generator().manual_seed(0))
    ref = teacher_forced_logps(model, ro, temperature, tok.pad_token_id)
    assert ro.tokens.shape == ro.logps.shape == ro.mask.shape
    torch.testing.assert_close(ro.logps, ref, atol=1e-5, rtol=0)
    assert bool((ro.logps[ro.mask == 0] == 0).all())
    assert bool((ro.tokens[ro.mask == 0] == tok.pad_token_id).all())


def test_eos_ends_a_row_and_is_kept(tok) -> None:
    """A row ends at its first stop id; that token is part of the completion (mask 1); nothing
    after it is."""
    model = micro_llama(vocab=len(tok))
    eos = tok.eos_token_id
    eng = HfEngine(model, tok, [eos], tok.pad_token_id)
    ro = eng.generate(make_prompts(tok, 64), SamplingCfg(max_new_tokens=20, temperature=3.0, batch_size=16),
                      torch.Generator().manual_seed(1))
    assert {"eos", "length"} <= set(ro.finish), "the test needs rows of both kinds"
    for i in range(64):
        c = ro.completion(i)
        if ro.finish[i] == "eos":
            assert c[-1] == eos and eos not in c[:-1]
        else:
            assert eos not in c and len(c) == 20 and ro.finish[i] == "length"


def test_stop_string_cuts_text_not_ids(tok) -> None:
    """A stop string ends the row once its text holds it; the text is cut before it and the ids
    are kept up to the token that completed it (never re-tokenized)."""
    model = micro_llama(vocab=len(tok))
    eng = HfEngine(model, tok, [tok.eos_token_id], tok.pad_token_id)
    ro = eng.generate(make_prompts(tok, 12), SamplingCfg(max_new_tokens=24, temperature=2.0, stop=("x",)),
                      torch.Generator().manual_seed(2))
    hit = [i for i in range(12) if ro.finish[i] == "stop"]
    assert hit, "the test needs rows that meet the stop string"
    for i in hit:
        ids = ro.completion(i)
        full = tok.decode(ids)
        assert "x" in full and "x" not in tok.decode(ids[:-1])  # the last token completed it
        assert ro.texts[i] == full[: full.find("x")]


def test_same_seed_same_rollouts_any_batch_size(tok) -> None:
    """Draws depend on the generator and the batching; the same seed and batching repeat
    exactly, which is what a resumed run relies on."""
    model = micro_llama(vocab=len(tok))
    eng = HfEngine(model, tok, [tok.eos_token_id], tok.pad_token_id)
    cfg = SamplingCfg(max_new_tokens=10, temperature=1.0, batch_size=4)
    a = eng.generate(make_prompts(tok, 9), cfg, torch.Generator().manual_seed(5))
    b = eng.generate(make_prompts(tok, 9), cfg, torch.Generator().manual_seed(5))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logps, b.logps)
    c = eng.generate(make_prompts(tok, 9), cfg, torch.Generator().manual_seed(6))
    assert not torch.equal(a.tokens, c.tokens)


def test_pick_top_k_top_p_support() -> None:
    """top-k keeps the k largest; top-p the smallest prefix whose mass reaches p; the reported
    log-prob is of softmax(logits / T) whatever was cut. Worked: logits log[0.5, 0.3, 0.2] at
    T=1; top_p 0.6 keeps {0, 1} (0.5 < 0.6 <= 0.8); top_k 1 keeps {0}."""
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log().repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    tok, logp = pick(logits, SamplingCfg(top_p=0.6), g)
    assert set(tok.tolist()) == {0, 1}
    share = (tok == 0).float().mean().item()  # 0.5/0.8 = 0.625, binomial sd 0.011 at n=2000
    assert abs(share - 0.625) < 5 * math.sqrt(0.625 * 0.375 / 2000)
    torch.testing.assert_close(logp, logits.gather(-1, tok[:, None]).squeeze(-1))
    tok, _ = pick(logits, SamplingCfg(top_k=1), g)
    assert set(tok.tolist()) == {0}
    greedy, lp = pick(logits[:1], SamplingCfg(temperature=0.0), g)
    assert greedy.item() == 0 and abs(lp.item() - math.log(0.5)) < 1e-6


def test_bad_settings(tok) -> None:
    eng = HfEngine(micro_llama(vocab=len(tok)), tok, [tok.eos_token_id], tok.pad_token_id)
    with pytest.raises(UserError, match="empty"):
        eng.generate([[]], SamplingCfg(), torch.Generator())
    with pytest.raises(UserError, match="top_p"):
        SamplingCfg(top_p=0).check()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("fast", [True, False])
def test_trainer_logps_equal_the_samplers(tok, arch: str, fast: bool, monkeypatch) -> None:
    """What GRPO's step scores: rollouts packed padding-free into rows and scored with the
    output layer on completion positions only (fast) or on all of them (any architecture)
    give the engine's log-probs; the same fp32 bound as above."""
    from lmforge import models
    from lmforge.rl.rounds import completion_logps, rollout_batch

    if not fast:
        monkeypatch.setattr(models, "PLAIN_HEAD", frozenset())
    model = (micro_llama(vocab=len(tok)) if arch == "llama" else _gpt2(len(tok))).float()
    eng = HfEngine(model, tok, [tok.eos_token_id], tok.pad_token_id)
    ro = eng.generate(make_prompts(tok, 9), SamplingCfg(max_new_tokens=10, temperature=0.7),
                      torch.Generator().manual_seed(3))
    b = rollout_batch(ro, torch.zeros(9), tok.pad_token_id, seed=0)
    assert b["input_ids"].size(0) < 9  # packed: several rollouts share a row
    with torch.no_grad():
        got, ent = completion_logps(model, b, 0.7, entropy=False)
    torch.testing.assert_close(got, ro.logps, atol=1e-5, rtol=0)
    assert ent is not None and bool((ent[ro.mask == 0] == 0).all()) and bool((ent[ro.mask == 1] > 0).all())


def test_groups_share_one_prefill(tok) -> None:
    """G copies of a prompt are prefilled once and their cache rows repeated: the log-probs
    are still the teacher-forced ones, and the copies draw different completions."""
    model = micro_llama(vocab=len(tok))
    eng = HfEngine(model, tok, [tok.eos_token_id], tok.pad_token_id)
    prompts = [p for p in make_prompts(tok, 3) for _ in range(4)]
    ro = eng.generate(prompts, SamplingCfg(max_new_tokens=8, temperature=1.0),
                      torch.Generator().manual_seed(4))
    torch.testing.assert_close(ro.logps, teacher_forced_logps(model, ro, 1.0, tok.pad_token_id),
                               atol=1e-5, rtol=0)
    assert len({tuple(ro.completion(i)) for i in range(4)}) > 1
