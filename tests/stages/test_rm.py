"""The rm stage: rewards of the packed training path equal what
AutoModelForSequenceClassification reads back from final/ (full, LoRA and DoRA; llama and gpt2), a
learnable preference learned end to end through the CLI, the length-bias numbers against
numpy, exact resume, and bad inputs as one-line errors."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForSequenceClassification,
    CodeGenConfig,
    CodeGenForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
)

from lmforge.config import RmCfg, load_config
from lmforge.data.preference import PairExample
from lmforge.errors import UserError
from lmforge.models import foreign_entries, save_hf
from lmforge.stages import run_stage
from lmforge.stages.rm import (
    RewardBatches,
    export_merged,
    fit_length,
    length_bias,
    load_reward_model,
    pairwise_accuracy,
    pearson,
    sequence_rewards,
)
from lmforge.stages.sft import load_tokenizer_and_format
from tests.conftest import BOS_ID, EOS_ID, PAD_ID, ROOT, make_chat_tokenizer, micro_llama, run_cli

CONFIG = ROOT / "configs" / "rm" / "tiny.yaml"


def base_model(d: Path, arch: str = "llama") -> Path:
    """A tiny causal LM saved with a chat tokenizer, as an SFT stage's final/ would be."""
    tok = make_chat_tokenizer(d)
    if arch == "llama":
        model = micro_llama(vocab=len(tok))
    else:  # gpt2 ships dropout 0.1: the stage must turn it off
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4,
                                           n_positions=64, bos_token_id=BOS_ID,
                                           eos_token_id=EOS_ID, pad_token_id=PAD_ID))
    save_hf(model, d, tok)
    return d


def rm_cfg(path: Path, *overrides: str) -> RmCfg:
    return load_config(RmCfg, None, [f"model.path={path}", "data.max_length=64",
                                     "train.precision=fp32", *overrides])


def random_pairs(n: int, vocab: int, seed: int = 0) -> list[PairExample]:
    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(3, vocab) for _ in range(k)]  # noqa: E731  (0-2: eos/bos/pad)
    return [PairExample(ids(rng.randint(2, 12)), ids(rng.randint(1, 10)), ids(rng.randint(1, 10)))
            for _ in range(n)]


@pytest.mark.parametrize("arch,method", [("llama", "full"), ("llama", "lora"), ("llama", "dora"),
                                         ("gpt2", "full")])
def test_packed_rewards_equal_the_saved_model_read_back(tmp_path: Path, arch: str, method: str) -> None:
    cfg = rm_cfg(base_model(tmp_path / "base", arch), f"lora.method={method}", "lora.r=4")
    tok, fmt, _ = load_tokenizer_and_format(cfg)
    model = load_reward_model(cfg, tok, fmt)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if method != "full":  # the head trains whole (modules_to_save), no adapter on it
        assert any("score.modules_to_save" in n for n in trainable)
        assert not any("score" in n and "lora_" in n for n in trainable)
    # move every trainable weight off its start, so the merge and the head are not trivial
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.train()  # as in training: rewards must not depend on dropout (gpt2 ships 0.1)
    pairs = random_pairs(6, len(tok))
    batch = RewardBatches(pairs, 64, True, 0, PAD_ID).eval_batches(6)[0]
    assert batch["input_ids"].shape[0] < 12  # packed: several sequences per row
    with torch.no_grad():
        packed = sequence_rewards(model, batch)  # (12,)
    final = tmp_path / "final"
    if method == "full":  # the loop's own export
        save_hf(model, final, tok)
    else:
        export_merged(model, final, tok)
    hf = AutoModelForSequenceClassification.from_pretrained(final).eval()
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == PAD_ID
    assert hf.config.architectures[0].endswith("ForSequenceClassification")
    seqs = [e.prompt + c for e in pairs for c in (e.chosen, e.rejected)]
    with torch.no_grad():
        alone = torch.stack([hf(input_ids=torch.tensor([s])).logits[0, 0] for s in seqs])
        T = max(map(len, seqs))
        ids = torch.full((len(seqs), T), PAD_ID)
        mask = torch.zeros(len(seqs), T, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
        padded = hf(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert packed.abs().max() > 1e-3  # a real reward, not a zero head
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0)


def test_length_bias_numbers_against_numpy() -> None:
    rewards = np.array([[2.0, 1.0], [0.5, 0.5], [-1.0, 3.0], [4.0, 0.0]])
    lengths = np.array([[10.0, 4.0], [6.0, 6.0], [3.0, 9.0], [5.0, 7.0]])
    out = length_bias(rewards, lengths)
    assert out["accuracy"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)  # a tie counts 1/2
    assert out["longer_wins_accuracy"] == pytest.approx((1 + 0.5 + 0 + 0) / 4)
    assert out["length_corr"] == pytest.approx(np.corrcoef(rewards.ravel(), lengths.ravel())[0, 1])
    assert pairwise_accuracy(np.array([1.0]), np.array([1.0])) == 0.5
    assert pearson(np.array([1.0, 1.0]), np.array([1.0, 2.0])) is None  # constant side
    slope, intercept = fit_length(rewards, lengths)
    b, a = np.polyfit(lengths.ravel(), rewards.ravel(), 1)
    assert (slope, intercept) == pytest.approx((b, a))
    # an exactly linear reward: the fit recovers it, and the corrected reward is flat
    slope, intercept = fit_length(0.25 * lengths - 1.0, lengths)
    assert (slope, intercept) == pytest.approx((0.25, -1.0))
    assert fit_length(rewards, np.full_like(lengths, 5.0)) == pytest.approx((0.0, rewards.mean()))


WORDS = ["def", "add", "return", "numbers", "keeps", "function", "Python", "brief", "Now"]


def pairs_file(path: Path, n: int, seed: int = 0) -> Path:
    """Chosen answers end with "even", rejected ones never hold it; lengths are independent
    of the label, so length alone predicts nothing."""
    rng = random.Random(seed)
    words = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))  # noqa: E731
    rows = [{"prompt": f"Add {i} and {rng.randint(0, 9)}.", "chosen": words() + " even",
             "rejected": words() + " odd"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_end_to_end_learns_a_preference_and_reports_length_bias(tmp_path: Path) -> None:
    base = base_model(tmp_path / "base")
    data = pairs_file(tmp_path / "pairs.jsonl", 120)
    r = run_cli("rm", str(CONFIG), f"model.path={base}", f"data.train={data}", "run.dir=rm",
                "train.max_steps=30", "data.max_length=64", "log.progress=off", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((tmp_path / "rm" / "summary.json").read_text())
    h = s["heldout"]
    assert s["steps"] == 30 and s["method"] == "full"
    assert h["accuracy"] == 1.0, h
    assert 0.3 < h["longer_wins_accuracy"] < 0.7 and -1 <= h["length_corr"] <= 1
    assert h["accuracy_corrected"] == 1.0 and "length_corr_corrected" in h
    fit = json.loads((tmp_path / "rm" / "final" / "reward_length.json").read_text())
    assert fit == s["length_fit"] and fit["unit"] == "completion token"
    assert foreign_entries(tmp_path / "rm" / "final") == []  # its file list names the fit too
    st = json.loads((tmp_path / "rm" / "final" / "reward_stats.json").read_text())
    assert st["completions"] % 2 == 0 and st["std"] > 0  # chosen + rejected of every pair
    rows = [json.loads(x) for x in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "accuracy", "rewards/chosen", "rewards/rejected", "margin"} <= rows[0].keys()
    assert abs(rows[0]["loss_step"] - np.log(2)) < 0.05  # the small head: pairs start near a tie
    assert any("val_accuracy" in x for x in rows)
    assert "held-out accuracy 1.000" in r.stdout


@pytest.mark.parametrize("method", ["full", "lora"])
def test_resume_is_exact(tmp_path: Path, method: str) -> None:
    """4 steps straight and 2 + a resumed 2 give bit-equal weights (the head included, and
    with LoRA the head saved as peft's module to save): fp32 in one process, the same ops in
    the same order, the loop restoring optimizer, RNG and data position."""
    base = base_model(tmp_path / "base")
    data = pairs_file(tmp_path / "pairs.jsonl", 40)
    over = [f"model.path={base}", f"data.train={data}", "train.max_steps=4", "log.progress=off",
            "train.eval_every=0", "train.final=last", "data.max_length=64", "log.every=1",
            f"lora.method={method}", "lora.r=4"]
    run_stage("rm", load_config(RmCfg, CONFIG, [*over, f"run.dir={tmp_path / 'straight'}",
                                                "train.save_every=2"]))
    shutil.copytree(tmp_path / "straight/checkpoints/step-2", tmp_path / "split/checkpoints/step-2")
    run_stage("rm", load_config(RmCfg, CONFIG, [*over, f"run.dir={tmp_path / 'split'}"]))
    logged = [json.loads(x) for x in (tmp_path / "split/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [3, 4]  # it resumed, not restarted
    a = load_file(str(tmp_path / "straight/final/model.safetensors"))
    b = load_file(str(tmp_path / "split/final/model.safetensors"))
    assert a.keys() == b.keys() and "score.weight" in a
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    data = pairs_file(tmp_path / "pairs.jsonl", 10)
    r = run_cli("rm", str(CONFIG), f"model.path={tmp_path / 'nope'}", f"data.train={data}",
                "run.dir=out", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "model path not found" in r.stderr and "nope" in r.stderr
    tok = make_chat_tokenizer(tmp_path / "codegen")
    save_hf(CodeGenForCausalLM(CodeGenConfig(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=4,
                                             rotary_dim=4, n_positions=64)), tmp_path / "codegen", tok)
    cfg = rm_cfg(tmp_path / "codegen")
    tok, fmt, _ = load_tokenizer_and_format(cfg)
    with pytest.raises(UserError, match="no sequence-classification class for 'codegen'"):
        load_reward_model(cfg, tok, fmt)
    with pytest.raises(UserError, match="qlora"):
        load_reward_model(rm_cfg(base_model(tmp_path / "base"), "lora.method=qlora"), tok, fmt)
