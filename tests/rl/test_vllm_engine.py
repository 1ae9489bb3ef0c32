"""The vllm rollout backend. Without vLLM: the weight export (names as a plain HF state dict,
a peft model merged on the fly, the trained module untouched) and the install hint. With vLLM
(`make vllm`, then `.venv-vllm/bin/python -m pytest tests/rl/test_vllm_engine.py`): the
engine's log-probs are the trainer's, before and after a sync, for a full and a LoRA policy.

Bounds, from the arithmetic:
- CPU, fp32 on both sides: the engine (oneDNN GEMMs, vLLM's attention kernel) and the trainer
  (ATen/MKL) sum the same products in different orders. A K-term fp32 dot product is then off
  by at most ~K * 2^-24 of the sum of its terms' magnitudes; K <= 256 here and the logits are
  of order 1-20, which bounds a log-prob's error (at most twice a logit's) well inside 1e-4,
  while a wrong weight, position or temperature moves log-probs by > 1e-1.
- GPU (marked gpu): vLLM's `auto` dtype runs an fp32 policy in bf16 (unit roundoff 2^-8 =
  3.9e-3). Weights and each layer's activations are rounded once each, so over this 2-layer
  model a logit of magnitude <= 5 moves by about 2 layers * 2 roundings * 3.9e-3 * 5 = 0.08 at
  worst; a log-prob by up to twice that, hence 0.15, against changes of > 1 from a sync.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from lmforge.config import LoraCfg
from lmforge.errors import UserError
from lmforge.models import apply_lora
from lmforge.rl.rollout import SamplingCfg, make_engine, teacher_forced_logps
from lmforge.rl.vllm_engine import VllmEngine, policy_weights
from tests.rl.conftest import make_prompts

ATOL = {"cpu": 1e-4, "cuda": 0.15}


def _model(arch: str, vocab: int, seed: int = 0) -> torch.nn.Module:
    """Head size 32: the smallest vLLM's CPU attention kernel takes."""
    torch.manual_seed(seed)
    if arch == "gpt2":
        conf = GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=2, n_positions=128,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        conf = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                           max_position_embeddings=128, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(conf).float().eval()


def _peft(model: torch.nn.Module, method: str, new_ids: list[int]) -> torch.nn.Module:
    """A LoRA/DoRA policy as the stages build it, its adapters moved off their zero init (a
    trained adapter: B = 0 would make every merge trivially the base)."""
    peft = apply_lora(model, LoraCfg(method=method, r=4, alpha=8), new_ids)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in peft.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.device))
    return peft.eval()


# --------------------------------------------------------------------------- without vLLM


def test_plain_model_weights_are_its_state_dict(tok) -> None:
    """Same names, same order, the module's own tensors (no copy of a full model)."""
    model = _model("gpt2", len(tok))
    sd = model.state_dict()
    out = list(policy_weights(model))
    assert [n for n, _ in out] == list(sd)
    assert all(t.data_ptr() == sd[n].data_ptr() for n, t in out)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merged_adapter_equals_merge_and_unload(tok, arch: str, method: str) -> None:
    """The export of a peft policy (LoRA/DoRA on every linear, GPT-2's transposed Conv1D
    included, plus trained rows of new tokens in tied embeddings) is merge_and_unload()'s
    state dict: the same names, the same values (LoRA bit for bit, as peft adds the same delta
    in the same dtype; DoRA to fp32 rounding, as peft's in-place merge rescales in another
    order), and the trained module is left exactly as it was."""
    peft = _peft(_model(arch, len(tok)), method, new_ids=[len(tok) - 2, len(tok) - 1])
    before = {k: v.clone() for k, v in peft.state_dict().items()}
    merged = dict(policy_weights(peft))
    ref = copy.deepcopy(peft).merge_and_unload().state_dict()
    assert list(merged) == list(ref)
    for k in ref:
        if method == "lora":
            assert torch.equal(merged[k], ref[k]), k
        else:
            torch.testing.assert_close(merged[k], ref[k], atol=1e-6, rtol=0, msg=k)
    after = peft.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    layers = [m for m in peft.modules() if hasattr(m, "merged_adapters")]
    assert layers and not any(m.merged_adapters for m in layers)
    assert not any(getattr(m, "_caches", None) for m in layers)  # no stale DoRA norm


def test_disabled_adapters_export_the_base(tok) -> None:
    base = _model("llama", len(tok))
    ref = {k: v.clone() for k, v in base.state_dict().items()}
    peft = _peft(base, "lora", new_ids=[])
    with peft.disable_adapter():
        out = dict(policy_weights(peft))
    assert list(out) == list(ref) and all(torch.equal(out[k], ref[k]) for k in ref)


def test_missing_vllm_is_one_line_naming_make_vllm(tok, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(UserError, match="make vllm") as e:
        make_engine("vllm", _model("gpt2", len(tok)), tok, [tok.eos_token_id], tok.pad_token_id)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- with vLLM

NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, NO_CUDA])]


@pytest.fixture(scope="module", params=DEVICES)
def setup(request, tok):
    """One engine per device for the module (vLLM takes seconds to start): the policy it was
    built from, and the engine. Tests that sync other weights sync these back."""
    pytest.importorskip("vllm", reason="vLLM is not installed here (make vllm)")
    device = request.param
    model = _model("gpt2", len(tok)).to(device)
    eng = VllmEngine(model, tok, [tok.eos_token_id], tok.pad_token_id, seed=0,
                     gpu_memory_utilization=0.2, kv_cache_memory_bytes=64 << 20)
    yield model, eng, device
    del eng


def _gap(model, ro, temperature: float, pad: int) -> float:
    ref = teacher_forced_logps(model, ro, temperature, pad)
    return float((ro.logps - ref).abs().max())


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_engine_logps_equal_teacher_forced(setup, tok, temperature: float) -> None:
    model, eng, device = setup
    ro = eng.generate(make_prompts(tok, 11), SamplingCfg(max_new_tokens=12, temperature=temperature),
                      torch.Generator().manual_seed(0))
    assert ro.tokens.shape == ro.logps.shape == ro.mask.shape and ro.tokens.size(0) == 11
    assert _gap(model, ro, temperature, tok.pad_token_id) <= ATOL[device]
    assert bool((ro.logps[ro.mask == 0] == 0).all())
    assert bool((ro.tokens[ro.mask == 0] == tok.pad_token_id).all())


def test_sync_samples_from_the_new_weights(setup, tok) -> None:
    """After the policy's weights change and a sync, the engine's log-probs are the changed
    model's (within the bound) and far from the old model's."""
    model, eng, device = setup
    new = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g).to(device))
    cfg = SamplingCfg(max_new_tokens=12)
    try:
        eng.sync(new)
        ro = eng.generate(make_prompts(tok, 8), cfg, torch.Generator().manual_seed(0))
        assert _gap(new, ro, 1.0, tok.pad_token_id) <= ATOL[device]
        assert _gap(model, ro, 1.0, tok.pad_token_id) > 1.0
    finally:
        eng.sync(model)
    ro = eng.generate(make_prompts(tok, 8), cfg, torch.Generator().manual_seed(0))
    assert _gap(model, ro, 1.0, tok.pad_token_id) <= ATOL[device]


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_sync_merges_a_peft_policy(setup, tok, method: str) -> None:
    """A LoRA/DoRA policy is sampled as its merged weights: the engine's log-probs are the
    peft model's own forward's."""
    model, eng, device = setup
    peft = _peft(copy.deepcopy(model), method, new_ids=[len(tok) - 1])
    try:
        eng.sync(peft)
        ro = eng.generate(make_prompts(tok, 8), SamplingCfg(max_new_tokens=12),
                          torch.Generator().manual_seed(0))
        assert _gap(peft, ro, 1.0, tok.pad_token_id) <= ATOL[device]
        assert _gap(model, ro, 1.0, tok.pad_token_id) > 1e-2
    finally:
        eng.sync(model)


def test_stops_finish_reasons_and_texts(setup, tok) -> None:
    """A stop id ends a row and is kept (finish 'eos'); a stop string ends it at the token
    that completed it, and the text is cut before it (finish 'stop'); the rest run to the
    limit ('length'). Ids are the sampled ones, never re-tokenized."""
    model, eng, _ = setup
    eos = tok.eos_token_id
    ro = eng.generate(make_prompts(tok, 48), SamplingCfg(max_new_tokens=16, temperature=2.0, stop=("x",)),
                      torch.Generator().manual_seed(4))
    assert {"eos", "stop", "length"} <= set(ro.finish), "the test needs rows of each kind"
    for i in range(48):
        ids = ro.completion(i)
        if ro.finish[i] == "eos":
            assert ids[-1] == eos and eos not in ids[:-1]
        elif ro.finish[i] == "stop":
            full = tok.decode(ids)
            assert "x" in full and "x" not in tok.decode(ids[:-1]) and eos not in ids
            assert ro.texts[i] == tok.decode(ids, skip_special_tokens=True).split("x")[0]
        else:
            assert len(ids) == 16 and eos not in ids and "x" not in tok.decode(ids)


def test_seeded_and_process_state_kept(setup, tok) -> None:
    """The same generator seed repeats the rollouts exactly, another does not; sampling leaves
    the process's global RNG and torch's thread setting alone (vLLM seeds and patches both when
    it starts; the engine puts them back)."""
    _, eng, _ = setup
    cfg = SamplingCfg(max_new_tokens=10)
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    a = eng.generate(make_prompts(tok, 9), cfg, torch.Generator().manual_seed(5))
    b = eng.generate(make_prompts(tok, 9), cfg, torch.Generator().manual_seed(5))
    c = eng.generate(make_prompts(tok, 9), cfg, torch.Generator().manual_seed(6))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logps, b.logps)
    assert not torch.equal(a.tokens, c.tokens)
    assert torch.equal(torch.get_rng_state(), state) and torch.get_num_threads() == threads
    assert torch.set_num_threads.__name__ == "set_num_threads"  # not vLLM's no-op


def test_cpu_head_size_checked_before_start(tok) -> None:
    """A head size vLLM's CPU attention lacks is one UserError at construction, not a
    RuntimeError inside the first generate."""
    pytest.importorskip("vllm", reason="vLLM is not installed here (make vllm)")
    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=len(tok), hidden_size=96, intermediate_size=128,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    with pytest.raises(UserError, match="head sizes"):
        VllmEngine(AutoModelForCausalLM.from_config(conf), tok, [0], 1)
