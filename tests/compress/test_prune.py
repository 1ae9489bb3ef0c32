"""Pruning: masks on hand-worked numbers, Wanda against a naive reference, structured pruning
that really shrinks (and changes nothing when what it removes was already zero), recovery that
keeps the zeros, and bad input as one line with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

from lmforge.cli import main
from lmforge.compress.prune import (
    block_linears,
    group_importance,
    input_sq_norms,
    lowest_k_mask,
    magnitude_masks,
    nm_mask,
    prune_structured,
    prune_unstructured,
    row_mask,
    wanda_scores,
)
from lmforge.models import save_hf
from tests.conftest import BOS_ID, EOS_ID, PAD_ID, ROOT, make_chat_tokenizer

T, F = True, False


# --------------------------------------------------------------------------- closed forms


def test_magnitude_mask_of_a_2x4_matrix_by_hand() -> None:
    # |W| sorted: 0.1 0.3 0.6 0.8 | 2 4 5 7: half the entries, the four smallest, go
    w = torch.tensor([[0.1, -2.0, 0.3, 4.0], [-5.0, 0.6, 7.0, -0.8]])
    got = magnitude_masks({"w": w}, 0.5, "layer")["w"]
    assert got.tolist() == [[F, T, F, T], [T, F, T, F]]
    # 0.25 of 8 = 2 entries: 0.1 and 0.3
    assert magnitude_masks({"w": w}, 0.25, "layer")["w"].tolist() == [[F, T, F, T], [T, T, T, T]]


def test_global_and_per_layer_thresholds_differ_as_by_hand() -> None:
    w1 = torch.tensor([[1.0, -4.0], [3.0, 0.5]])
    w2 = torch.tensor([[10.0, 20.0], [-30.0, 40.0]])
    layer = magnitude_masks({"a": w1, "b": w2}, 0.5, "layer")
    assert layer["a"].tolist() == [[F, T], [T, F]]  # threshold between 1 and 3
    assert layer["b"].tolist() == [[F, F], [T, T]]  # threshold between 20 and 30
    glob = magnitude_masks({"a": w1, "b": w2}, 0.5, "global")  # one threshold: between 4 and 10
    assert glob["a"].tolist() == [[F, F], [F, F]] and glob["b"].tolist() == [[T, T], [T, T]]


def test_ties_still_drop_exactly_k() -> None:
    assert lowest_k_mask(torch.zeros(2, 3), 4).sum() == 2
    assert lowest_k_mask(torch.tensor([[3.0, 1.0], [2.0, 5.0]]), 2).tolist() == [[T, F], [F, T]]


def test_wanda_scores_and_row_masks_by_hand() -> None:
    w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    s = wanda_scores(w, torch.tensor([16.0, 1.0]))  # ||X|| = [4, 1]
    assert s.tolist() == [[4.0, 2.0], [12.0, 0.5]]
    assert row_mask(s, 0.5).tolist() == [[T, F], [T, F]]
    # magnitude alone would have dropped W_00 = 1 instead: the activations change the choice
    assert row_mask(w.abs(), 0.5).tolist() == [[F, T], [T, F]]
    assert row_mask(torch.tensor([[4.0, 2, 9, 1], [1, 7, 3, 8]]), 0.5).tolist() == [
        [T, F, T, F], [F, T, F, T]]


def test_two_four_masks_by_hand() -> None:
    row = torch.tensor([[1.0, -3.0, 2.0, 0.5, 4.0, 4.0, -1.0, 0.0]])
    assert nm_mask(row.abs()).tolist() == [[F, T, T, F, T, T, F, F]]
    with pytest.raises(ValueError, match="not a multiple of 4"):
        nm_mask(torch.ones(2, 6))


def test_two_four_keeps_the_two_largest_of_every_four() -> None:
    scores = torch.rand(16, 64, generator=torch.Generator().manual_seed(0))
    keep = nm_mask(scores)
    groups, kept = scores.view(16, 16, 4), keep.view(16, 16, 4)
    assert (kept.sum(-1) == 2).all()  # exactly 2 zeros in every 4
    lo_kept = torch.where(kept, groups, torch.inf).amin(-1)
    hi_dropped = torch.where(kept, -torch.inf, groups).amax(-1)
    assert (lo_kept >= hi_dropped).all()


def test_input_norms_by_hand() -> None:
    lin = nn.Linear(2, 1, bias=False)
    wrap = nn.Sequential(lin)
    wrap.forward = lambda input_ids, use_cache: lin(input_ids)  # type: ignore[method-assign]
    got = input_sq_norms(wrap, {"l": lin}, [torch.tensor([[1.0, 2.0], [3.0, 0.0]])])
    assert got["l"].tolist() == [10.0, 4.0]


def test_group_importance_by_hand() -> None:
    w = torch.tensor([[1.0, 2.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0]])
    assert group_importance(w, torch.tensor([1.0, 1.0, 4.0, 1.0]), 2).tolist() == [6.0, 2.0]
    assert group_importance(w, None, 1).tolist() == [2.0, 4.0, 0.0, 2.0]


# --------------------------------------------------------------------------- models


def llama(n_kv: int = 4, vocab: int = 64, seed: int = 0) -> nn.Module:
    conf = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=n_kv, max_position_embeddings=64,
                       tie_word_embeddings=True, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                       pad_token_id=PAD_ID, attn_implementation="eager")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(conf)


def qwen2() -> nn.Module:  # q/k/v with biases
    conf = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       attn_implementation="eager")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(conf)


def gpt2() -> nn.Module:
    conf = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=64,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(conf)


def test_only_the_blocks_linear_layers_are_pruned() -> None:
    names = block_linears(llama())
    assert len(names) == 2 * 7 and all(n.startswith("model.layers.") for n in names)
    assert all(".c_" in n for n in block_linears(gpt2()))


def _layer_input(model: nn.Module, ids: torch.Tensor, i: int) -> torch.Tensor:
    """What q_proj of layer i reads: the normed hidden state entering layer i, (N, d)."""
    with torch.no_grad():
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[i]
        return model.model.layers[i].input_layernorm(h).reshape(-1, h.size(-1))


@pytest.mark.parametrize("sequential", [False, True])
def test_wanda_matches_a_naive_reference(sequential: bool) -> None:
    """Scores from the hooks equal |W| * ||X|| with X taken from the model's hidden states;
    sequential: layer 1's X comes from the model whose layer 0 is already pruned."""
    model = llama().double().eval()
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(1))
    dense = {i: model.model.layers[i].self_attn.q_proj.weight.detach().clone() for i in (0, 1)}
    x0 = _layer_input(model, ids, 0)
    x1_dense = _layer_input(model, ids, 1)
    prune_unstructured(model, "wanda", 0.5, "layer", [ids], sequential=sequential)
    x1 = _layer_input(model, ids, 1) if sequential else x1_dense  # layer 1 pruning can't change it
    for i, x in ((0, x0), (1, x1)):
        ref = dense[i] * row_mask(dense[i].abs() * x.pow(2).sum(0).sqrt(), 0.5)
        torch.testing.assert_close(model.model.layers[i].self_attn.q_proj.weight, ref, rtol=0, atol=0)


def _zero_heads_and_neurons(model: nn.Module, arch: str) -> None:
    """Make the odd key/value groups (with their query heads) of every layer and neurons
    3, 7, 11, ... contribute exactly nothing."""
    with torch.no_grad():
        for layer in (model.transformer.h if arch == "gpt2" else model.model.layers):
            if arch == "gpt2":
                layer.mlp.c_proj.weight[3::4] = 0  # Conv1D (in, out): a neuron is a row
                continue
            c = model.config
            head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
            per_group = head_dim * (c.num_attention_heads // c.num_key_value_heads)
            for g in range(1, c.num_key_value_heads, 2):
                layer.self_attn.o_proj.weight[:, g * per_group:(g + 1) * per_group] = 0
            layer.mlp.down_proj.weight[:, 3::4] = 0


@pytest.mark.parametrize("arch", ["llama", "llama-gqa", "qwen2", "gpt2"])
def test_removing_zeroed_heads_and_neurons_leaves_the_logits(arch: str, tmp_path: Path) -> None:
    model = {"llama": llama, "llama-gqa": lambda: llama(n_kv=2), "qwen2": qwen2, "gpt2": gpt2}[arch]()
    model = model.double().eval()
    fam = "gpt2" if arch == "gpt2" else "llama"
    _zero_heads_and_neurons(model, fam)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    save_hf(model, tmp_path / "dense")
    with torch.no_grad():
        before = model(input_ids=ids).logits
        # loading computes rotary tables its own way: compare loaded with loaded
        before_loaded = load64(tmp_path / "dense")(input_ids=ids).logits
    n_groups = model.config.num_key_value_heads if fam == "llama" else 0
    # half the groups, the zeroed ones: magnitude importance 0, below every other group's
    out = prune_structured(model, 0.5 if n_groups else 0.0, 0.25, None)
    assert out["config"]["n_inner" if fam == "gpt2" else "intermediate_size"] == [64, 48]
    if fam == "llama":
        assert out["heads_kept"] == [list(range(0, n_groups, 2))] * 2
    save_hf(model, tmp_path / "m")
    with torch.no_grad():
        after, reloaded = model(input_ids=ids).logits, load64(tmp_path / "m")(input_ids=ids).logits
    # the removed terms were exact zeros: only the summation order of the kept ones differs,
    # float64 rounding (~1e-16 relative per add, a few hundred adds per logit) stays << 1e-10
    torch.testing.assert_close(after, before, rtol=0, atol=1e-10)
    torch.testing.assert_close(reloaded, before_loaded, rtol=0, atol=1e-10)


def load64(d: Path) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64).eval()


# --------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer, a corpus stage dir of code-like text, and a saved GQA llama using both."""
    from lmforge.tokenizer import load_tokenizer

    d = tmp_path_factory.mktemp("prune")
    make_chat_tokenizer(d / "tok")
    tok = load_tokenizer(d / "tok")
    (d / "corpus").mkdir()
    for split, n in (("train", 60), ("val", 12)):
        rows = [json.dumps({"text": f"def add_{i}(a, b):\n    return a + b * {i}\n" * 3})
                for i in range(n)]
        (d / "corpus" / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    save_hf(llama(n_kv=2, vocab=len(tok)), d / "model", tok)
    return d


def _run(*args: str) -> int:
    return main([*args, "log.progress=off"] if args[0] != "prune" else list(args))


def test_structured_model_has_the_stated_shapes_and_loads(workdir: Path, tmp_path: Path) -> None:
    out = tmp_path / "p"
    assert _run("prune", f"model.path={workdir / 'model'}", "method=structured", "heads=0.5",
                "neurons=0.25", f"calibration.text={workdir / 'corpus'}", f"run.dir={out}") == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["scores"] == "wanda" and s["config_changes"] == {
        "num_attention_heads": [4, 2], "num_key_value_heads": [2, 1], "intermediate_size": [64, 48]}
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    c = model.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size) == (2, 1, 8, 48)
    layer = model.model.layers[1]
    assert layer.self_attn.q_proj.weight.shape == (16, 32)
    assert layer.self_attn.k_proj.weight.shape == layer.self_attn.v_proj.weight.shape == (8, 32)
    assert layer.self_attn.o_proj.weight.shape == (32, 16)
    assert layer.mlp.gate_proj.weight.shape == layer.mlp.up_proj.weight.shape == (48, 32)
    assert layer.mlp.down_proj.weight.shape == (32, 48)
    assert s["after"]["params"] < s["before"]["params"]
    assert s["after"]["weights_bytes"] < s["before"]["weights_bytes"]
    assert s["before"]["perplexity"] > 1 and s["after"]["perplexity"] > 1


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_recovery_keeps_the_pruned_zeros(workdir: Path, tmp_path: Path, stage: str) -> None:
    pruned = tmp_path / "p"
    assert _run("prune", f"model.path={workdir / 'model'}", "method=wanda", "sparsity=0.6",
                f"calibration.text={workdir / 'corpus'}", f"run.dir={pruned}") == 0
    rec = json.loads((pruned / "final" / "prune.json").read_text())
    assert rec["method"] == "wanda" and rec["sparsity"] == pytest.approx(0.6, abs=0.02)
    data = ([f"data.corpus={workdir / 'corpus'}", "data.seq_len=16"] if stage == "pretrain" else
            [str(ROOT / "configs/sft/lora-tiny.yaml"), "lora.method=full",
             f"data.train={ROOT / 'tests/data/chat_tiny.jsonl'}"])
    assert _run(stage, *data, f"model.path={pruned}", "train.max_steps=4", "train.micro_batch_size=4",
                "train.precision=fp32", "optim.lr=1e-2", "optim.weight_decay=0.1",
                f"run.dir={tmp_path / 'r'}") == 0
    before = load_file(str(pruned / "final" / "model.safetensors"))
    after = load_file(str(tmp_path / "r" / "final" / "model.safetensors"))
    for name in rec["matrices"]:
        w0, w1 = before[f"{name}.weight"], after[f"{name}.weight"]
        assert torch.equal(w1 == 0, w0 == 0), name  # the same zeros, no more, no fewer
        assert not torch.equal(w1, w0), name  # and the kept weights did train
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["pruned"]["sparsity_after"] == pytest.approx(rec["sparsity"])
    carried = json.loads((tmp_path / "r" / "final" / "prune.json").read_text())
    assert carried["recovered"] == [{"stage": stage, "steps": 4}]


# --------------------------------------------------------------------------- bad input


def _error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    rc = main(list(args))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("value", ["1.5", "0", "1", "-0.1"])
def test_sparsity_outside_0_1(capsys: pytest.CaptureFixture[str], tmp_path: Path, value: str) -> None:
    err = _error(capsys, "prune", "model.path=x", f"sparsity={value}", f"run.dir={tmp_path}")
    assert f"sparsity = {value}" in err and "Input should be" in err


def test_bad_combinations(workdir: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    m = f"model.path={workdir / 'model'}"
    err = _error(capsys, "prune", m, "method=wanda", f"run.dir={tmp_path}")
    assert "calibration.text: method=wanda weighs each weight by its input activations" in err
    assert "calibration.text" in _error(capsys, "prune", m, "method=2:4", "scores=wanda",
                                        f"run.dir={tmp_path}")
    assert "sparsity=0.7: method=2:4" in _error(capsys, "prune", m, "method=2:4", "sparsity=0.7",
                                                 f"run.dir={tmp_path}")
    assert "scope=global" in _error(capsys, "prune", m, "method=wanda", "scope=global",
                                    f"calibration.text={workdir / 'corpus'}", f"run.dir={tmp_path}")
    assert "heads / neurons: only method=structured" in _error(capsys, "prune", m, "heads=0.5",
                                                               f"run.dir={tmp_path}")
    assert "would remove nothing" in _error(capsys, "prune", m, "method=structured", "heads=0",
                                            "neurons=0", f"run.dir={tmp_path}")
    # the model has 2 key/value groups: 0.8 of them rounds to both
    err = _error(capsys, "prune", m, "method=structured", "heads=0.8", f"run.dir={tmp_path}")
    assert "heads=0.8 would remove all 2 per layer" in err


def test_two_four_on_a_width_not_divisible_by_4(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lmforge.tokenizer import load_tokenizer

    make_chat_tokenizer(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    conf = LlamaConfig(vocab_size=len(tok), hidden_size=30, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=3, max_position_embeddings=64)
    save_hf(AutoModelForCausalLM.from_config(conf), tmp_path / "m", tok)
    err = _error(capsys, "prune", f"model.path={tmp_path / 'm'}", "method=2:4", f"run.dir={tmp_path / 'o'}")
    assert "method=2:4 needs in_features divisible by 4; model.layers.0.self_attn.q_proj (30)" in err


def test_structured_refuses_what_it_cannot_describe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import GPTNeoXConfig

    from lmforge.tokenizer import load_tokenizer

    make_chat_tokenizer(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    neox = AutoModelForCausalLM.from_config(GPTNeoXConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64))
    save_hf(neox, tmp_path / "neox", tok)
    err = _error(capsys, "prune", f"model.path={tmp_path / 'neox'}", "method=structured",
                 f"run.dir={tmp_path / 'o'}")
    assert "model_type='gpt_neox'" in err and "use an unstructured method" in err
    g = gpt2()
    g.resize_token_embeddings(len(tok))
    save_hf(g, tmp_path / "gpt2", tok)
    err = _error(capsys, "prune", f"model.path={tmp_path / 'gpt2'}", "method=structured",
                 f"run.dir={tmp_path / 'o'}")
    assert "cannot remove heads of gpt2" in err and "heads=0" in err
    assert main(["prune", f"model.path={tmp_path / 'gpt2'}", "method=structured", "heads=0",
                 f"run.dir={tmp_path / 'o'}"]) == 0


def test_head_counts_the_config_would_refuse() -> None:
    from lmforge.errors import UserError

    # LlamaConfig wants hidden_size (32) divisible by the heads: 3 of 4 would not load
    with pytest.raises(UserError, match=r"heads=0.25 keeps 3 of 4 heads, which LlamaConfig would "
                       r"not load \(.*\); head counts that load: 2 \(heads=0.5\), 1 \(heads=0.75\)"):
        prune_structured(llama(), 0.25, 0.0, None)


def test_an_adapter_on_a_pruned_model_is_refused(workdir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    pruned = tmp_path / "p"
    assert main(["prune", f"model.path={workdir / 'model'}", f"run.dir={pruned}"]) == 0
    capsys.readouterr()
    err = _error(capsys, "sft", f"model.path={pruned}", "lora.method=lora",
                 "data.train=synthetic_code", f"run.dir={tmp_path / 's'}")
    assert "lora.method=lora" in err and "merged adapter is dense" in err
