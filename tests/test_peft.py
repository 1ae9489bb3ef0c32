"""PEFT helpers in lmforge.models: target checks, parameter counts, rsLoRA scaling, new-token
rows, and the adapter -> merged-model round trip (export_peft, merge_cli) on micro models."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from lmforge.chat import install_format, resolve_format
from lmforge.config import LoraCfg
from lmforge.errors import UserError
from lmforge.models import (
    add_rows_for_new_tokens,
    apply_lora,
    check_targets,
    count_params,
    export_peft,
    foreign_entries,
    linear_module_names,
    load_model,
    merge_cli,
    save_hf,
)
from lmforge.tokenizer import PORTABLE_TOKENIZER_CLASS, load_tokenizer
from tests.conftest import VOCAB, make_chat_tokenizer, micro_llama

LLAMA_LINEARS = ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj", "up_proj",
                 "v_proj"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    from lmforge.tokenizer import load_tokenizer

    d = tmp_path_factory.mktemp("peft_tok")
    make_chat_tokenizer(d)
    return load_tokenizer(d)


def _perturb_trainables(model: nn.Module, seed: int = 0, scale: float = 0.2) -> None:
    """LoRA B (and the token deltas) start at zero: an untrained adapter is the identity and
    would make any round trip pass trivially."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


# ------------------------------------------------------------------------------ targets, names


def test_linear_module_names_llama_and_gpt2() -> None:
    assert linear_module_names(micro_llama()) == LLAMA_LINEARS
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1,
                                                       n_head=2, n_positions=16))
    assert linear_module_names(gpt2) == ["c_attn", "c_fc", "c_proj", "lm_head"]  # Conv1D too


def test_unknown_target_lists_linear_layers() -> None:
    model = micro_llama()
    with pytest.raises(UserError) as e:
        apply_lora(model, LoraCfg(method="lora", r=4, target_modules=["q_proj", "qkv_proj"]), [])
    msg = str(e.value)
    assert "'qkv_proj'" in msg and "matches no module" in msg
    assert msg.endswith(", ".join(LLAMA_LINEARS))
    # the failed call must not have wrapped the model
    assert not _lora_layers(model)
    check_targets(model, "all-linear")
    check_targets(model, ["q_proj", "layers.0.mlp.down_proj"])  # last names and dotted suffixes


# ---------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("targets,new_ids", [("all-linear", []), (["q_proj", "v_proj"], []),
                                             ("all-linear", [3, 60, 61])])
def test_lora_trainable_count_by_hand(targets, new_ids: list[int]) -> None:
    r = 4
    base = micro_llama()
    _, total_before = count_params(base)
    # peft's all-linear leaves the output layer alone
    names = [n for n in LLAMA_LINEARS if n != "lm_head"] if targets == "all-linear" else targets
    adapted = [m for n, m in base.named_modules()
               if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in names]
    expected = sum(r * (m.in_features + m.out_features) for m in adapted)
    # q,k,v,o: 32->32; gate, up: 32->64; down: 64->32; two layers
    per_layer = {"q_proj": 256, "k_proj": 256, "v_proj": 256, "o_proj": 256, "gate_proj": 384,
                 "up_proj": 384, "down_proj": 384}
    assert expected == 2 * sum(per_layer[n] for n in names)
    expected += len(new_ids) * base.config.hidden_size  # one delta row per new token (tied head)
    model = apply_lora(base, LoraCfg(method="lora", r=r, alpha=8, target_modules=targets), new_ids)
    trainable, total = count_params(model)
    assert trainable == expected
    assert total == total_before + expected  # the base is all there, and all frozen
    assert len(_lora_layers(model)) == len(adapted)


def test_train_new_tokens_off_adds_no_token_rows() -> None:
    model = apply_lora(micro_llama(), LoraCfg(method="lora", r=4, train_new_tokens=False), [5, 6])
    assert not any("trainable_tokens" in n for n, _ in model.named_parameters())
    assert count_params(model)[0] == 2 * (4 * 256 + 3 * 384)


# ------------------------------------------------------------------------------------ rsLoRA


@pytest.mark.parametrize("rslora,r,alpha,expected", [(False, 4, 8.0, 2.0), (True, 4, 8.0, 4.0),
                                                     (True, 16, 8.0, 2.0), (False, 16, 8.0, 0.5)])
def test_rslora_scaling(rslora: bool, r: int, alpha: float, expected: float) -> None:
    model = apply_lora(micro_llama(), LoraCfg(method="lora", r=r, alpha=alpha, rslora=rslora), [])
    layers = _lora_layers(model)
    assert len(layers) == 14
    for m in layers.values():
        assert m.scaling["default"] == pytest.approx(expected)
    # and the scale is the one the forward uses: base(x) + s * B A x
    _perturb_trainables(model)
    m = layers["base_model.model.model.layers.0.mlp.up_proj"]
    x = torch.randn(3, 32)
    with torch.no_grad():
        want = m.base_layer(x) + expected * m.lora_B["default"](m.lora_A["default"](x))
        assert torch.allclose(m(x), want, atol=1e-5)


# ------------------------------------------------------------------------------ new-token rows


@pytest.mark.parametrize("tied", [True, False])
def test_add_rows_for_new_tokens_mean_init(tied: bool) -> None:
    conf = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                       tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(conf)
    emb_old = model.get_input_embeddings().weight.detach().clone()
    head_old = model.get_output_embeddings().weight.detach().clone()
    add_rows_for_new_tokens(model, VOCAB + 5)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape == head.shape == (VOCAB + 5, 32)
    assert model.config.vocab_size == VOCAB + 5
    assert torch.equal(emb[:VOCAB], emb_old) and torch.equal(head[:VOCAB], head_old)
    assert torch.equal(emb[VOCAB:], emb_old.mean(0, keepdim=True).expand(5, 32))
    assert torch.equal(head[VOCAB:], head_old.mean(0, keepdim=True).expand(5, 32))
    assert (emb is head) == tied  # still tied (one tensor), or still separate
    if tied:
        with torch.no_grad():
            emb[VOCAB] += 1.0
        assert torch.equal(model.get_output_embeddings().weight[VOCAB], emb[VOCAB])
    # growing to a size it already has (or less) changes nothing
    before = emb.detach().clone()
    add_rows_for_new_tokens(model, VOCAB)
    add_rows_for_new_tokens(model, VOCAB + 5)
    assert torch.equal(model.get_input_embeddings().weight, before)


# ------------------------------------------------------------------------- merge round trip


@pytest.mark.parametrize("method,n_new", [("lora", 0), ("lora", 7), ("dora", 7)])
def test_export_and_merge_round_trip(tok, tmp_path: Path, method: str, n_new: int) -> None:
    """n_new=0: the base already has every tokenizer row and the trained ids are inside it;
    n_new=7: the base lacks the last 7 rows, grown by add_rows_for_new_tokens as in training
    and again, from the adapter's tokenizer alone, at merge time."""
    V = len(tok)
    base_dir = tmp_path / "base"
    save_hf(micro_llama(seed=1, vocab=V - n_new), base_dir, tok)
    model = load_model(base_dir)
    add_rows_for_new_tokens(model, V)
    new_ids = list(range(V - n_new, V)) if n_new else [V - 1, V - 3]
    peft_model = apply_lora(model, LoraCfg(method=method, r=4, alpha=8, rslora=True), new_ids)
    assert any("trainable_tokens" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    _perturb_trainables(peft_model)
    peft_model.eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, V, (2, 12), generator=g)
    ids[0, : len(new_ids)] = torch.tensor(new_ids)  # the trained rows must be exercised
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        if n_new == 0:  # the perturbation matters, so agreement below is not vacuous
            plain = load_model(base_dir).eval()(input_ids=ids).logits
            assert (plain - want).abs().max() > 1e-2

    out = tmp_path / "final"
    export_peft(peft_model, out, tok, base=str(base_dir))
    conf = json.loads((out / "adapter" / "adapter_config.json").read_text())
    # the base the adapter loads on: the original when it has every row the adapter uses, else
    # the grown copy written next to the adapter; absolute, so it loads from any directory
    grown = out.resolve() / "base"
    assert conf["base_model_name_or_path"] == str(grown if n_new else base_dir.resolve())
    assert (out / "base").exists() == bool(n_new)
    assert conf["use_dora"] == (method == "dora") and conf["use_rslora"] is True
    assert (out / "tokenizer_config.json").exists() and (out / "config.json").exists()
    assert foreign_entries(out) == []  # every file listed as lmforge's, adapter/ and base/ too

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.dtype == torch.float32 and merged.config.vocab_size == V
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()

    # the base from adapter_config.json, and the original base grown again at merge time
    for name, base in (("merged_cli", None), ("merged_orig", str(base_dir))):
        merge_cli(out / "adapter", base, tmp_path / name)
        merged2 = AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()
        with torch.no_grad():
            got2 = merged2(input_ids=ids).logits
        assert torch.allclose(got2, want, atol=1e-4), (name, (got2 - want).abs().max())


def test_merge_cli_rejects_non_adapter_dir(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no adapter_config.json"):
        merge_cli(tmp_path, None, tmp_path / "out")


# ------------------------------------------------------- the adapter dir as a client loads it


def sft_adapter_run(tmp_path: Path, method: str = "lora") -> tuple[Path, Path]:
    """What an SFT adapter run leaves: a base pretrained without the chat template's tokens,
    chatml installed on its tokenizer (two new special tokens, as `lmforge sft` does), LoRA plus
    trainable rows for them, perturbed so the adapter moves every logit, exported.
    Returns (final/, the original base)."""
    make_chat_tokenizer(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    base_dir = tmp_path / "base"
    save_hf(micro_llama(seed=3, vocab=len(tok)), base_dir, tok)
    fmt = resolve_format(tok, "chatml")
    assert install_format(tok, fmt) == ["<|im_start|>", "<|im_end|>"]
    model = load_model(base_dir)
    add_rows_for_new_tokens(model, len(tok))
    template_ids = [tok.convert_tokens_to_ids(t) for t in fmt.special_tokens]
    peft_model = apply_lora(model, LoraCfg(method=method, r=4, alpha=8), template_ids)
    _perturb_trainables(peft_model)
    export_peft(peft_model, tmp_path / "final", tok, base=str(base_dir))
    return tmp_path / "final", base_dir


CONV = [{"role": "user", "content": "def add(a, b):"}, {"role": "assistant", "content": "return a + b"}]


def merged_logits_tol(want: torch.Tensor, r: int = 4) -> float:
    """How far float64 logits of peft(base, adapter) may sit from those of the merged model
    (also run in float64). The passes differ only through the merged weights, computed and
    stored in fp32: each carries at most k roundings of relative size u = 2^-24, k = r (the
    rank-r sum in B@A) + 2 (scale, add) + log2(64) (DoRA's pairwise column norm over at most
    64 inputs). To first order a logit passes 16 matrices of micro_llama (embedding, 7 per
    layer, head), each adding at most k*u relative error: 16 * k * u * max|logits|, ~1.1e-5
    relative; the measured gap is ~30x below it, the adapter's own effect ~1e5x above."""
    return 16 * (r + 2 + math.log2(64)) * 2.0**-24 * want.abs().max().item()


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_readme_load_gives_the_merged_logits(tmp_path: Path, method: str) -> None:
    """The two-line load the adapter's README prints, run as printed: peft on the recorded base
    gives final/'s logits (see merged_logits_tol for the tolerance)."""
    final, _ = sft_adapter_run(tmp_path, method)
    readme = (final / "adapter" / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S)
    assert code is not None, readme
    ns: dict = {}
    exec(code.group(1), ns)  # noqa: S102  (a file this test's own export wrote)
    model, tok = ns["model"].eval(), ns["tokenizer"]
    assert str((final / "base").resolve()) in code.group(1)  # the grown base, by absolute path
    ids = torch.tensor([tok.apply_chat_template(CONV, tokenize=True, return_dict=True)["input_ids"]])
    assert {tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")} <= set(ids[0].tolist())
    merged = AutoModelForCausalLM.from_pretrained(final).eval()
    with torch.no_grad():
        got = model.double()(input_ids=ids).logits
        want = merged.double()(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(final / "base").double()(input_ids=ids).logits
    tol = merged_logits_tol(want)
    assert (got - want).abs().max().item() <= tol
    assert (got - plain).abs().max().item() > 1e3 * tol  # the adapter matters: not a vacuous match


def test_grown_base_is_the_original_plus_mean_rows(tmp_path: Path) -> None:
    final, base_dir = sft_adapter_run(tmp_path)
    orig = AutoModelForCausalLM.from_pretrained(base_dir).get_input_embeddings().weight
    grown = AutoModelForCausalLM.from_pretrained(final / "base").get_input_embeddings().weight
    n = orig.size(0)
    assert grown.shape == (n + 2, orig.size(1))
    assert torch.equal(grown[:n], orig)
    assert torch.equal(grown[n:], orig.mean(0, keepdim=True).expand(2, -1))
    assert len(load_tokenizer(final / "base")) == n + 2  # its tokenizer has the rows' tokens


def test_adapter_tokenizer_is_portable(tmp_path: Path) -> None:
    """adapter/ gets the tokenizer treatment final/ gets: a class 4.x knows, the template inline
    (and as a file for 5.x), and it reloads to the same tokenizer as final/'s."""
    final, _ = sft_adapter_run(tmp_path)
    for d in (final, final / "adapter", final / "base"):
        tc = json.loads((d / "tokenizer_config.json").read_text())
        assert tc["tokenizer_class"] == PORTABLE_TOKENIZER_CLASS, d
        assert tc["chat_template"] == (d / "chat_template.jinja").read_text(), d
        assert "extra_special_tokens" not in tc, d  # a list there crashes transformers 4.47-4.57
    a, f = load_tokenizer(final / "adapter"), load_tokenizer(final)
    assert a.get_vocab() == f.get_vocab() and a.chat_template == f.chat_template
    assert a.apply_chat_template(CONV, tokenize=False) == f.apply_chat_template(CONV, tokenize=False)


def test_moved_final_dir_still_merges(tmp_path: Path) -> None:
    """The recorded base is absolute; a final/ moved elsewhere still has base/ by the adapter."""
    final, _ = sft_adapter_run(tmp_path / "run")
    moved = tmp_path / "moved"
    final.rename(moved)
    merge_cli(moved / "adapter", None, tmp_path / "merged")
    a = AutoModelForCausalLM.from_pretrained(moved).state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------- QLoRA


@pytest.mark.parametrize("compute_dtype", ["fp32", "bf16"])
def test_qlora_grads_only_on_adapters(tmp_path: Path, compute_dtype: str) -> None:
    pytest.importorskip("bitsandbytes")
    from lmforge.models import load_quantized

    save_hf(micro_llama(), tmp_path / "base")
    cfg = LoraCfg(method="qlora", r=4, alpha=8, compute_dtype=compute_dtype)
    model = load_quantized(str(tmp_path / "base"), cfg)
    q4 = {n: m for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}
    layer_names = {n.rsplit(".", 1)[-1] for n in q4}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= layer_names
    assert all(m.weight.dtype == torch.uint8 for m in q4.values())  # packed 4-bit
    peft_model = apply_lora(model, cfg, [])
    _perturb_trainables(peft_model)  # nonzero B, so lora_A gets a gradient too
    # train mode: bnb's CPU inference path needs in_features >= its 64-wide blocks
    peft_model.train()
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    out = peft_model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for n, p in peft_model.named_parameters():
        if "lora_" in n:
            assert p.requires_grad and p.grad is not None, n
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
        else:
            assert not p.requires_grad and p.grad is None, n
    n_adapters = sum("lora_" in n for n, _ in peft_model.named_parameters())
    assert n_adapters == 2 * 14


def test_best_adapter_final_is_exported_in_place(tmp_path: Path, windows) -> None:
    """With final=best, an adapter run's final/ holds the best evaluation's adapter and records
    its own base (final/base), not best/'s: a copy of best/ would point into best/."""
    from safetensors.torch import load_file

    from lmforge.train.loop import Trainer
    from tests.conftest import OPTIM, QUIET, lm_task, train_cfg

    make_chat_tokenizer(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    save_hf(micro_llama(seed=3, vocab=len(tok)), tmp_path / "base", tok)
    fmt = resolve_format(tok, "chatml")
    install_format(tok, fmt)
    model = load_model(tmp_path / "base")
    add_rows_for_new_tokens(model, len(tok))
    ids = [tok.convert_tokens_to_ids(t) for t in fmt.special_tokens]
    peft_model = apply_lora(model, LoraCfg(method="lora", r=4, alpha=8), ids)
    task = lm_task(peft_model, windows, 8, 1)
    vals = iter([2.0, 1.0, 3.0])  # the best is the evaluation at step 2, not the last
    task.evaluate = lambda: {"val_loss": next(vals)}
    run = tmp_path / "run"
    task.export = lambda m, out: export_peft(m, out, tok, str(tmp_path / "base"))
    Trainer(train_cfg(max_steps=3, eval_every=1, final="best"), OPTIM, QUIET, run, peft_model,
            task, tok).run()
    conf = json.loads((run / "final" / "adapter" / "adapter_config.json").read_text())
    assert Path(conf["base_model_name_or_path"]) == (run / "final" / "base").resolve()
    best = load_file(str(run / "best" / "adapter" / "adapter_model.safetensors"))
    final = load_file(str(run / "final" / "adapter" / "adapter_model.safetensors"))
    assert best.keys() == final.keys() and all(torch.equal(best[k], final[k]) for k in best)
