"""Models: preset sizes, portable HF directories (round trip, tied/untied, config spellings),
damaged weights met by load_model (and so by eval and generate)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmforge.config import ModelCfg
from lmforge.errors import UserError
from lmforge.models import (
    count_params,
    enable_checkpointing,
    flops_per_token,
    load_model,
    preset_config,
    save_hf,
)
from lmforge.tokenizer import save_tokenizer, train_bpe
from tests.conftest import micro_llama, run_cli

TEXTS = ["def add(a, b):\n    return a + b\n", "class A:\n    pass\n"] * 20


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("tok")
    tok = train_bpe(TEXTS, 275, ["<|bos|>", "<|endoftext|>", "<|pad|>", "<|user|>"], min_frequency=1)
    return save_tokenizer(tok, d, bos_token="<|bos|>", eos_token="<|endoftext|>",
                          pad_token="<|pad|>", extra_special_tokens=["<|user|>"])


def _params(preset: str, vocab: int = 8192) -> int:
    conf = preset_config(ModelCfg(preset=preset), vocab, 0, 1, 2)
    with torch.device("meta"):
        return count_params(AutoModelForCausalLM.from_config(conf))[1]


def test_preset_sizes() -> None:
    assert 4.5e6 < _params("tiny") < 6e6  # "about 5M"
    assert 25e6 < _params("small") < 35e6  # "about 30M"
    assert _params("gpt2-124m", 50257) == 124_439_808  # GPT-2 small, exactly


@pytest.mark.parametrize("arch,tied", [("llama", True), ("llama", False), ("gpt2", True)])
def test_hf_round_trip_same_logits(tmp_path: Path, tokenizer, arch: str, tied: bool) -> None:
    cfg = ModelCfg(preset="tiny", arch=arch, tie_embeddings=tied, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(preset_config(cfg, len(tokenizer), 0, 1, 2))
    model.eval()
    save_hf(model, tmp_path / "final", tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    tok = AutoTokenizer.from_pretrained(tmp_path / "final")
    ids = tok("def add(a, b):", return_tensors="pt")["input_ids"]
    assert ids.tolist() == tokenizer("def add(a, b):", return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded(ids).logits, atol=1e-6)
    with safe_open(str(tmp_path / "final" / "model.safetensors"), "pt") as f:
        head_saved = any(k.startswith("lm_head") for k in f.keys())
    assert head_saved == (not tied)  # a tied head is saved once, as the config says


def test_saved_config_speaks_both_transformers_generations(tmp_path: Path, tokenizer) -> None:
    model = AutoModelForCausalLM.from_config(
        preset_config(ModelCfg(preset="tiny", max_position_embeddings=64), len(tokenizer), 0, 1, 2))
    save_hf(model, tmp_path / "m", tokenizer)
    conf = json.loads((tmp_path / "m" / "config.json").read_text())
    assert conf["rope_theta"] == conf["rope_parameters"]["rope_theta"]  # 4.x reads rope_theta
    assert conf["rope_scaling"] is None
    assert conf["torch_dtype"] == conf["dtype"] == "float32"
    assert conf["architectures"] == ["LlamaForCausalLM"]
    tc = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast"  # a class 4.x knows
    # 4.x's name for the list; 4.47-4.57 crash on a list under 5.x's `extra_special_tokens`
    assert tc["additional_special_tokens"] == ["<|user|>"] and "extra_special_tokens" not in tc
    back = AutoTokenizer.from_pretrained(tmp_path / "m")  # and 5.x reads it back the same
    assert back.get_vocab() == tokenizer.get_vocab()
    assert back.all_special_tokens == tokenizer.all_special_tokens
    assert back("<|user|>x")["input_ids"] == tokenizer("<|user|>x")["input_ids"]
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left nothing behind


def test_flops_per_token_closed_form(tokenizer) -> None:
    conf = preset_config(ModelCfg(preset="tiny"), 1000, 0, 1, 2)
    model = AutoModelForCausalLM.from_config(conf)
    d, ff, L = 256, 688, 4
    n = L * (4 * d * d + 3 * d * ff) + 1000 * d  # attention + SwiGLU matrices + LM head
    assert flops_per_token(model, 128) == 6 * n + 12 * L * 128 * d


def test_gradient_checkpointing_same_gradients(tokenizer) -> None:
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        conf = preset_config(ModelCfg(preset="tiny", max_position_embeddings=64), 300, 0, 1, 2)
        model = AutoModelForCausalLM.from_config(conf)
        if ckpt:
            enable_checkpointing(model)
        model.train()
        ids = torch.arange(32).reshape(2, 16)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_load_model_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="model path not found"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a Hugging Face model directory"):
        load_model(tmp_path / "empty")


def _damage(d: Path, how: str) -> None:
    f = d / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes({"half": raw[: len(raw) // 2], "last byte": raw[:-1], "empty": b"",
                   "header": raw[:8] + b"{" * (len(raw) - 8)}[how])


@pytest.mark.parametrize("how", ["half", "last byte", "empty", "header"])
def test_damaged_weights_are_one_line_naming_the_file(tmp_path: Path, tokenizer, how: str) -> None:
    save_hf(micro_llama(vocab=len(tokenizer)), tmp_path / "m", tokenizer)
    _damage(tmp_path / "m", how)
    with pytest.raises(UserError) as e:
        load_model(tmp_path / "m")
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'm' / 'model.safetensors'} is truncated or corrupt (")
    assert "\n" not in msg


def test_damaged_weights_through_generate_and_eval(tmp_path: Path, tokenizer) -> None:
    m = tmp_path / "final"
    save_hf(micro_llama(vocab=len(tokenizer)), m, tokenizer)
    _damage(m, "half")
    want = f"{m / 'model.safetensors'} is truncated or corrupt"
    for args in (["generate", str(m), "--prompt", "x"],
                 ["eval", str(m), "--task", "synthetic-code", "--limit", "1", "--out", str(tmp_path / "ev")]):
        r = run_cli(*args)
        assert r.returncode == 2, (args[0], r.stderr[-3000:])
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        assert want in r.stderr, r.stderr
    assert not (tmp_path / "ev" / "summary.json").exists()
