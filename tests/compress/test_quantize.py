"""lmforge quantize / bench quantize: every method's export reloads with the same greedy
output, weight bytes against the storage formats' own arithmetic, the agreement and KL
measures on hand-worked numbers, one table end to end (fresh processes), and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from lmforge import cli
from lmforge.compress import qbench
from lmforge.compress import quantize as Q
from lmforge.compress.config import ALL_METHODS, QuantBenchCfg, QuantizeCfg
from lmforge.compress.qbench import (
    COLUMNS,
    agreement,
    empty_row,
    greedy_tokens,
    heldout_texts,
    kl_sum,
    kl_windows,
    render_markdown,
    run_table,
)
from lmforge.errors import UserError
from lmforge.models import save_hf
from lmforge.stages import check_run_dir
from lmforge.stages.quantize import check_target, main
from tests.conftest import BOS_ID, EOS_ID, PAD_ID, make_chat_tokenizer

# the decode loop passes its KV cache by the name every supported transformers accepts
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")

# greedy prompts: token ids the test tokenizer has (ids 0-2 are its eos/bos/pad)
PROMPTS = [[EOS_ID, 10, 11, 12], [EOS_ID, 40, 41], [EOS_ID, 7, 8, 9, 100, 101], [EOS_ID, 60]]


def _llama(vocab: int, hidden: int) -> LlamaConfig:
    # hidden 64 / MLP 128: widths bitsandbytes' AVX512-BF16 4-bit kernel accepts (inputs a
    # multiple of its 64-wide blocks, outputs of 32), so every method runs on every CPU
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=128, tie_word_embeddings=True,
                       bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)


def _save(d: Path, hidden: int, seed: int = 0) -> Path:
    tok = make_chat_tokenizer(d / "tok")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_llama(len(tok), hidden))
    save_hf(model, d / "final", tok)
    return d / "final"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save(tmp_path_factory.mktemp("q64"), hidden=64)


@pytest.fixture(scope="module")
def odd_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """hidden 48: no int4 group of 32 or more divides it, so torchao-int4wo cannot run."""
    return _save(tmp_path_factory.mktemp("q48"), hidden=48)


def _cfg(model: Path, out: Path, method: str | None, **bench: Any) -> QuantizeCfg:
    b = QuantBenchCfg(n_prompts=4, agree_tokens=8, decode_tokens=4, max_text_tokens=256, **bench)
    return QuantizeCfg(model={"path": str(model)}, run={"dir": out}, method=method, bench=b,
                       device="cpu")


# --------------------------------------------------------------------------- export round trip


def _round_trip(method: str, model_dir: Path, out: Path, device: str) -> None:
    cfg = _cfg(model_dir, out, method).model_copy(update={"bench": None, "device": device})
    why = Q.unsupported(method, device, Q.source_config(str(model_dir)))
    if why is not None:  # e.g. torchao not installed: the stage says so in one line instead
        with pytest.raises(UserError, match=f"method={method} cannot run on {device}"):
            main(cfg)
        return
    summary = main(cfg)["export"]
    final = out / "final"
    # the model before export, rebuilt: quantizing the same checkpoint is deterministic
    before = Q.load_quantized_as(str(model_dir), method, cfg, device)
    kw = {"device_map": device} if device == "cuda" else {}
    back = AutoModelForCausalLM.from_pretrained(str(final), dtype="auto", **kw)
    # the export stores the quantized form itself (same tensor classes, same bytes), not a
    # dequantized copy that would merely answer alike
    w0 = before.model.layers[0].mlp.up_proj.weight
    w1 = back.model.layers[0].mlp.up_proj.weight
    assert (type(w1), w1.dtype) == (type(w0), w0.dtype)
    assert Q.weight_bytes(back) == Q.weight_bytes(before) == summary["weight_bytes"]
    out0 = greedy_tokens(before, PROMPTS, [EOS_ID], PAD_ID, 8)
    assert greedy_tokens(back, PROMPTS, [EOS_ID], PAD_ID, 8) == out0
    assert Q.read_record(final)["method"] == method
    assert summary["same_greedy_after_reload"] is True


@pytest.mark.parametrize("method", ALL_METHODS)
def test_export_reloads_with_the_same_greedy_output(method: str, model_dir: Path,
                                                    tmp_path: Path) -> None:
    _round_trip(method, model_dir, tmp_path, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["fp16", "bnb-int8", "bnb-nf4-dq", "torchao-int4wo"])
def test_export_reloads_on_cuda(method: str, model_dir: Path, tmp_path: Path) -> None:
    _round_trip(method, model_dir, tmp_path, "cuda")


def test_an_export_never_replaces_what_lmforge_did_not_write(model_dir: Path, tmp_path: Path) -> None:
    final = tmp_path / "final"
    final.mkdir()
    (final / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"final holds files lmforge did not write \(notes.txt\)"):
        check_target(final, str(model_dir))
    with pytest.raises(UserError, match="holds a model lmforge wrote \\(model\\)"):
        check_target(model_dir.parent / "final", str(tmp_path / "elsewhere"))
    with pytest.raises(UserError, match="holds the checkpoint being quantized"):
        check_target(model_dir, str(model_dir))
    (tmp_path / "grpo").mkdir()
    (tmp_path / "grpo" / "summary.json").write_text('{"stage": "grpo"}')
    with pytest.raises(UserError, match="is the grpo stage's directory"):
        check_run_dir(tmp_path / "grpo", "quantize")
    with pytest.raises(UserError, match=r"holds a pipeline's stages \(grpo\)"):
        check_run_dir(tmp_path, "quantize")


# --------------------------------------------------------------------------- bytes


def _linear_and_other(model_dir: Path) -> tuple[list[tuple[int, int]], int]:
    """(in, out) of each quantized Linear, and the count of every other parameter."""
    m = AutoModelForCausalLM.from_pretrained(str(model_dir))
    head = m.get_output_embeddings()
    lin = [(x.in_features, x.out_features) for x in m.modules()
           if isinstance(x, torch.nn.Linear) and x is not head]
    total = sum(p.numel() for p in m.parameters())  # tied head counted once
    return lin, total - sum(i * o for i, o in lin)


def test_weight_bytes_follow_each_storage_format(model_dir: Path) -> None:
    lin, other = _linear_and_other(model_dir)
    n = sum(i * o for i, o in lin)
    cfg = _cfg(model_dir, Path("unused"), None)

    def wb(method: str) -> int:
        return Q.weight_bytes(Q.load_quantized_as(str(model_dir), method, cfg, "cpu"))

    assert wb("fp32") == 4 * (n + other)
    assert wb("fp16") == 2 * (n + other)
    # LLM.int8: one byte a weight, one fp32 scale per output row; the rest stays fp32
    assert wb("bnb-int8") == sum(i * o + 4 * o for i, o in lin) + 4 * other
    # NF4: two weights a byte, one fp32 absmax per block of 64, a 16-entry fp32 code
    nf4 = sum(i * o // 2 + 4 * (i * o // 64) + 4 * 16 for i, o in lin)
    assert wb("bnb-nf4") == nf4 + 4 * other
    # double quantization: each absmax one byte, plus per layer one fp32 absmax per 256 of
    # them, the 256-entry fp32 code of that 8-bit quantization and its fp32 offset
    dq = sum(i * o // 2 + i * o // 64 + 4 * math.ceil(i * o / 64 / 256) + 4 * 256 + 4 + 4 * 16
             for i, o in lin)
    assert wb("bnb-nf4-dq") == dq + 4 * other


# --------------------------------------------------------------------------- measures


def test_agreement_worked_example() -> None:
    assert agreement([[1, 2, 3], [4]], [[1, 2, 9], [4]]) == (0.5, 1.5)
    # a shorter answer that is a prefix: not an exact match, its whole length in common
    assert agreement([[5, 6, 7]], [[5, 6]]) == (0.0, 2.0)
    assert agreement([[5, 6]], [[5, 6]]) == (1.0, 2.0)


def test_kl_worked_example_and_zero_against_itself() -> None:
    # p_ref = (1/2, 1/2), p = softmax(log 3, 0) = (3/4, 1/4):
    # KL(p_ref || p) = 1/2 log(2/3) + 1/2 log(2) = 1/2 log(4/3)
    ref = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    logits = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    assert kl_sum(ref, logits) == pytest.approx(0.5 * math.log(4 / 3), rel=1e-12)
    x = torch.log_softmax(torch.randn(5, 11, generator=torch.Generator().manual_seed(0)), -1)
    assert kl_sum(x, x) == 0.0  # identical log-probs: every term is p * 0, exactly


def test_text_budget_and_reference_cap(tmp_path: Path) -> None:
    tok = make_chat_tokenizer(tmp_path / "tok")
    text = "def add(a, b):\n    return a + b\n" * 200
    (tmp_path / "held.txt").write_text(text)
    bench = QuantBenchCfg(text=tmp_path / "held.txt", max_text_tokens=64, max_reference_mb=1)
    texts, what = heldout_texts(tok, bench, seed=0)
    assert what.endswith("held.txt") and len(texts) == 1 and text.startswith(texts[0])
    # 1 MiB of fp32 log-probs over a 1024-token vocabulary is 2**20 / (4 * 1024) = 256
    # positions; the text budget (64) is the smaller cap here, then the reference's (256)
    long = QuantBenchCfg(max_text_tokens=4096, max_reference_mb=1)
    assert sum(map(len, kl_windows(tok, [text], 1024, 1024, bench))) == 64
    windows = kl_windows(tok, [text], 100, 1024, long)
    assert sum(map(len, windows)) == 256 and max(map(len, windows)) == 100  # the context


def test_a_method_needing_a_missing_library_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = Q.importlib.util.find_spec
    monkeypatch.setattr(Q.importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchao" else real(name, *a))
    assert Q.unsupported("torchao-int8wo", "cpu") == "needs torchao: pip install 'lmforge[quant]'"
    assert Q.unsupported("fp16", "cpu") is None


def test_int4_needs_a_group_that_divides_every_layer(odd_model_dir: Path) -> None:
    conf = Q.source_config(str(odd_model_dir))
    assert "int4 groups of 32 do not divide" in (Q.unsupported("torchao-int4wo", "cpu", conf) or "")
    assert Q.int4_group_size([("a", 192, 8), ("b", 512, 8)]) == 64  # the demo model's widths


def test_markdown_shows_ratios_refusals_and_who_is_slower() -> None:
    ok = {"status": "ok", "base_rss_bytes": 100 << 20, "peak_rss_bytes": 110 << 20,
          "peak_gpu_bytes": None, "load_s": 0.5, "ttft_s": 0.01, "perplexity": 5.0,
          "exact_match": 1.0, "mean_prefix": 8.0, "mean_kl": 0.0, "row_s": 3.0}
    rows = [{**empty_row("fp32", "ok"), **ok, "weight_bytes": 1000, "decode_tok_s": {"1": 10.0}},
            {**empty_row("bnb-int8", "ok"), **ok, "weight_bytes": 300, "decode_tok_s": {"1": 4.0},
             "ttft_s": 0.02},
            empty_row("torchao-int4wo", "unsupported", "needs torchao")]
    header = {"model": "m", "device": "cpu", "gpu": None, "cpu": "X", "cpu_features": ["avx2"],
              "threads": 2, "env": {}, "versions": {"torch": "2"}, "params": 2e6, "vocab": 64,
              "text": "t", "text_docs": 1, "text_tokens": 10, "kl_positions": 10,
              "reference_bytes": 2560, "prompts": 4, "agree_tokens": 8, "decode_tokens": 4,
              "batch_sizes": [1]}
    md = render_markdown({"header": header, "rows": rows})
    # a markdown table whose delimiter or rows have another cell count than its header is not
    # rendered as a table at all (GFM): every row, refusals included, has the header's count
    table_lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert len({ln.count("|") for ln in table_lines}) == 1, table_lines
    assert "| bnb-int8 | 300 B (0.30x) |" in md
    assert "| 20.0 (2.00x) | 4 (0.40x) |" in md  # TTFT twice fp32's, 0.4x its decode speed
    assert "unsupported: needs torchao |" in md
    assert "Smaller but slower than fp32 here (memory bought with speed): bnb-int8 (0.30x bytes, " \
           "0.40x tok/s at batch 1)." in md


# --------------------------------------------------------------------------- the table, end to end


def _table(model: Path, out: Path) -> dict[str, Any]:
    cfg = _cfg(model, out, None, methods=["fp32", "bnb-int8", "torchao-int4wo"],
               batch_sizes=[1, 2])
    return run_table(cfg, str(model), out, "cpu")


def _check_table(table: dict[str, Any], out: Path) -> None:
    rows = {r["method"]: r for r in table["rows"]}
    assert [r["method"] for r in table["rows"]] == ["fp32", "bnb-int8", "torchao-int4wo"]
    assert all(set(r) == set(COLUMNS) for r in table["rows"])
    fp32, int8 = rows["fp32"], rows["bnb-int8"]
    assert fp32["status"] == "ok", fp32["reason"]
    # fp32 against its own stored reference: the same numbers, so exactly 0 and full agreement
    assert fp32["mean_kl"] == 0.0 and fp32["exact_match"] == 1.0
    assert int8["status"] == "ok", int8["reason"]
    assert set(int8["decode_tok_s"]) == {"1", "2"} and int8["peak_gpu_bytes"] is None
    assert int8["weight_bytes"] < fp32["weight_bytes"]
    assert 0.0 <= int8["exact_match"] <= 1.0 and int8["mean_kl"] >= 0.0  # reported, not judged
    print(f"int8 vs fp32: exact {int8['exact_match']:.2f}, prefix {int8['mean_prefix']:.1f}, "
          f"KL {int8['mean_kl']:.3g}")
    if Q.unsupported("torchao-int8wo", "cpu") is None:  # torchao installed: the shape refuses
        assert rows["torchao-int4wo"]["status"] == "unsupported"
        assert "int4 groups of 32 do not divide" in rows["torchao-int4wo"]["reason"]
    assert table["header"]["kl_positions"] > 0 and table["header"]["params"] > 0
    saved = json.loads((out / "quant_table.json").read_text())
    assert (out / "quant_table.md").read_text() == render_markdown(saved)
    assert not (out / ".qbench").exists()  # the reference is scratch, not an output


def test_the_table_has_every_column_fp32_as_its_own_reference_and_refusals_as_rows(
        odd_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the rows' own code in this process (a fresh one costs seconds of imports each);
    # test_the_table_in_fresh_processes runs the real thing
    monkeypatch.setattr(qbench, "run_child", lambda spec, timeout: (qbench.child_main([str(spec)]), ""))
    _check_table(_table(odd_model_dir, tmp_path), tmp_path)


@pytest.mark.slow
def test_the_table_in_fresh_processes(odd_model_dir: Path, tmp_path: Path) -> None:
    table = _table(odd_model_dir, tmp_path)
    _check_table(table, tmp_path)
    for r in table["rows"][:2]:  # the process grew while loading and running its model
        assert r["peak_rss_bytes"] > r["base_rss_bytes"] > 0 and r["row_s"] > 0


# --------------------------------------------------------------------------- bad input


def test_cli_bad_input_is_one_line_and_exit_2(odd_model_dir: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "q")
    cases = [
        (["quantize", str(odd_model_dir), "--method", "bnb-int9", "--out", out], "method"),
        (["bench", "quantize", str(odd_model_dir), "--methods", "fp32,nope", "--out", out],
         "bench.methods"),
        (["quantize", str(tmp_path / "missing"), "--method", "fp16", "--out", out], "not found"),
    ]
    if Q.unsupported("torchao-int8wo", "cpu") is None:
        cases.append((["quantize", str(odd_model_dir), "--method", "torchao-int4wo", "--out", out],
                      "method=torchao-int4wo cannot run on cpu: int4 groups of 32"))
    for argv, says in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err, err
