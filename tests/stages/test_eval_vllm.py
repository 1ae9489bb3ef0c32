"""`lmforge eval ... backend=vllm`: without vLLM, one line saying how to get it (exit 2, before
a checkpoint is read); with vLLM (`.venv-vllm/bin/python -m pytest tests/stages/test_eval_vllm.py`),
greedy answers sampled by the vLLM engine are the HF model's own, token for token.

Why exact equality is the right property, and when it holds: both sides run fp32 on the same
weights and prompt ids and differ only in summation order (oneDNN GEMMs and vLLM's attention
kernel against ATen/MKL). tests/rl/test_vllm_engine.py bounds the resulting difference of a
log-prob by 1e-4 for models of this size (K <= 256-term dot products, logits of order 1-20);
a logit differs by at most that much, so a greedy step can only pick another token where the
HF model's top two logits are within 2e-4 of each other. The test first checks that no greedy
step of these items has such a near-tie (a property of the seeded model, not of the engine),
then asserts equal completions.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from lmforge import cli
from lmforge.config import EvalCfg, load_config
from lmforge.eval.harness import Generator
from lmforge.generate import generate_batch
from lmforge.stages import run_stage
from lmforge.stages.eval import VLLM_MISSING, load_items
from lmforge.tokenizer import load_tokenizer, save_tokenizer, train_bpe

MAX_NEW = 24
# twice the 1e-4 logit bound above: two logits each that far off can swap at a gap below it
NEAR_TIE = 2e-4


def test_missing_vllm_is_one_line_exit_2_before_loading(tmp_path: Path, monkeypatch, capsys) -> None:
    """Runs in either venv: vLLM is made unimportable, and reading the checkpoint would fail."""
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError

    def no_load(*a: object, **k: object) -> None:
        raise AssertionError("the checkpoint was read before the backend was checked")

    monkeypatch.setattr("lmforge.models.load_model", no_load)
    code = cli.main(["eval", str(tmp_path / "ckpt"), "--out", str(tmp_path / "ev"),
                     "backend=vllm"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.splitlines() == [f"lmforge eval: error: {VLLM_MISSING}"]
    assert not (tmp_path / "ev" / "eval.json").exists()


# --------------------------------------------------------------------------- with vLLM


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPT-2 of head size 64 (one vLLM's CPU attention takes), its weights drawn at std 0.2 so
    logits spread over several units (the default 0.02 gives near-ties everywhere), with a
    byte-level tokenizer trained on code, saved as an HF directory."""
    pytest.importorskip("vllm", reason="vLLM is not installed here (make vllm)")
    out = tmp_path_factory.mktemp("ckpt")
    code = ["def add(a, b):\n    return a + b\n", "def f(x):\n    if x > 0:\n        return x\n",
            "for i in range(10):\n    print(i * 2)\n"]
    tok = save_tokenizer(train_bpe(code * 30, 280, ["<e>", "<p>"], 1), out, bos_token="<e>",
                         eos_token="<e>", pad_token="<p>", extra_special_tokens=[])
    torch.manual_seed(0)
    conf = GPT2Config(vocab_size=len(tok), n_embd=128, n_layer=2, n_head=2, n_positions=512,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.2,
                      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    AutoModelForCausalLM.from_config(conf).float().save_pretrained(out)
    return out


def _cfg(ckpt: Path, out: Path, backend: str) -> EvalCfg:
    return load_config(EvalCfg, None, [
        f"model.path={ckpt}", f"run.dir={out}", f"backend={backend}", "precision=fp32",
        "tasks=[synthetic-code]", "limit=2", "synthetic.n_eval=2", f"max_new_tokens={MAX_NEW}",
        "batch_size=4", "sandbox.workers=1"])


def _greedy(cfg: EvalCfg) -> tuple[float, list[list[int]]]:
    """The HF model's greedy new ids on the eval's items (prompts as the harness builds them)
    and the smallest top-1 minus top-2 logit gap over all those steps."""
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path).float().eval()
    gen = Generator(model, load_tokenizer(cfg.model.path))
    items = load_items("synthetic-code", cfg)
    room = gen.context - MAX_NEW
    prompts = [gen.prompt_ids(it.prompt, it.head)[-room:] for it in items]
    outs = generate_batch(model, prompts, gen.stop_ids, gen.pad, MAX_NEW, 4,
                          stop=items[0].stop, tokenizer=gen.tokenizer)
    margin = float("inf")
    with torch.no_grad():
        for p, o in zip(prompts, outs):
            logits = model(torch.tensor([p + o])).logits[0, len(p) - 1:].double()  # (len(o)+1, V)
            top = logits.topk(2, dim=-1).values
            margin = min(margin, float((top[:, 0] - top[:, 1]).min()))
    return margin, outs


def _add_stop_id(ckpt: Path, outs: list[list[int]]) -> int:
    """Make a token the model emits mid-answer a stop id too (the checkpoint's generation
    config, where `lmforge sft` writes its template's), so some answers end on a stop id: the
    engine keeps it, the harness cuts it, as generate_batch does."""
    from collections import Counter

    from transformers import GenerationConfig

    stop = Counter(t for o in outs for t in set(o[2:])).most_common(1)[0][0]
    conf = GenerationConfig.from_pretrained(ckpt)
    conf.eos_token_id = [conf.eos_token_id, stop]
    conf.save_pretrained(ckpt)
    return stop


def test_vllm_greedy_answers_equal_hf(ckpt: Path, tmp_path: Path) -> None:
    hf_cfg, vllm_cfg = _cfg(ckpt, tmp_path / "hf", "hf"), _cfg(ckpt, tmp_path / "vllm", "vllm")
    margin, outs = _greedy(hf_cfg)
    assert margin > NEAR_TIE, "the seeded model has a near-tie: reseed it"
    stop = _add_stop_id(ckpt, outs)
    hf, vl = run_stage("eval", hf_cfg), run_stage("eval", vllm_cfg)
    assert hf["settings"]["backend"] == "hf" and "backend_dtype" not in hf["settings"]
    assert vl["settings"]["backend"] == "vllm" and vl["settings"]["backend_dtype"] == "float32"

    def rows(run: Path) -> list[dict]:
        return [json.loads(x) for x in (run / "eval_synthetic-code.jsonl").open()]

    a, b = rows(tmp_path / "hf"), rows(tmp_path / "vllm")
    assert len(a) == len(b) == 10  # 2 items in each of 5 groups
    assert [r["task_id"] for r in a] == [r["task_id"] for r in b]
    assert [r["completions"] for r in a] == [r["completions"] for r in b]
    assert any(c.strip() for r in a for c in r["completions"]), "the model wrote nothing"
    ended = [o.index(stop) for o in outs if stop in o]  # the path up to a stop is unchanged
    assert ended and min(ended) < MAX_NEW - 1, "no answer ends on the added stop id"
    # scoring is the same function of the same texts
    assert [r["statuses"] for r in a] == [r["statuses"] for r in b]
    assert hf["tasks"]["synthetic-code"]["pass@1"] == vl["tasks"]["synthetic-code"]["pass@1"]
