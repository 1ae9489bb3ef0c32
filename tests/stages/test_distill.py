"""The distill stage on micro llamas sharing a tokenizer trained here: what a run writes,
the first step's losses against a from-the-definitions computation (kind, T, alpha, beta and
the answer-only mask reach the loss), a teacher copy teaching itself (no loss, no gradient),
on-policy batches and their exact resume, the prompts cut from packed rows, and a teacher
with another tokenizer or a bad student as one line with exit 2."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from lmforge import cli
from lmforge.chat import install_format, render, resolve_format
from lmforge.compress.config import DistillCfg
from lmforge.config import load_config
from lmforge.data.sft import SftBatches, lm_logits
from lmforge.io import read_jsonl
from lmforge.models import load_model, save_hf
from lmforge.stages import run_stage
from lmforge.stages.distill import (
    answer_prompts,
    is_on_policy,
    load_tokenizers,
    student_from_layers,
)
from lmforge.stages.sft import build_batches, load_data
from lmforge.tokenizer import load_tokenizer, save_tokenizer, train_bpe
from tests.conftest import BOS_ID, CHAT_SPECIALS, EOS_ID, PAD_ID, ROOT, make_chat_tokenizer

CHAT = ROOT / "tests/data/chat_tiny.jsonl"
TIMING = ("tokens_per_s", "peak_mem_mb", "step_s")  # what measures time or memory


def _llama(vocab: int, layers: int, seed: int) -> torch.nn.Module:
    conf = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=BOS_ID,
                       eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                       initializer_range=0.2)  # peaked, unlike models: divergences of order 1
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(conf)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """teacher (3 layers) and student (2 layers, other init) on one tokenizer; `alien`: a
    student whose tokenizer was trained on other text."""
    root = tmp_path_factory.mktemp("distill")
    tok = make_chat_tokenizer(root / "tok")
    out = {}
    for name, layers, seed in (("teacher", 3, 0), ("student", 2, 1)):
        save_hf(_llama(len(tok), layers, seed), root / name, tok)
        out[name] = root / name
    other = train_bpe(["print('hello world')\nx = [i * i for i in range(9)]\n"] * 20, 280,
                      CHAT_SPECIALS, min_frequency=1)
    alien_tok = save_tokenizer(other, root / "alien_tok", bos_token="<|bos|>", eos_token="<|endoftext|>",
                               pad_token="<|pad|>", extra_special_tokens=CHAT_SPECIALS[3:])
    save_hf(_llama(len(alien_tok), 2, 2), root / "alien", alien_tok)
    out["alien"] = root / "alien"
    return out


def config(models: dict[str, Path], run: Path, *over: str) -> DistillCfg:
    return load_config(DistillCfg, ROOT / "configs/distill/tiny.yaml", [
        f"teacher.path={models['teacher']}", "student_layers=null", f"model.path={models['student']}",
        f"data.train={CHAT}", f"data.val={CHAT}", "data.max_length=96", "eval.task=null",
        f"run.dir={run}", "log.progress=off", "log.every=1", *over])


def _rows(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)}
            for r in read_jsonl(run / "metrics.jsonl")]


def _weights(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "model.safetensors"))


def test_run_writes_a_smaller_student_and_its_measurements(models: dict[str, Path], tmp_path: Path) -> None:
    """student_layers: the student is the teacher with layer 1 skipped (its logits are the
    teacher's computed through layers 0 and 2 only, bit for bit); the run logs every loss
    part, evaluates the held-out hard loss and ships final/ with two layers."""
    cfg = config(models, tmp_path / "r", "model.path=null", "student_layers=[0, 2]",
                 "train.max_steps=3", "train.eval_every=0")
    teacher = load_model(models["teacher"]).eval()
    st = student_from_layers(teacher, [0, 2]).eval()
    skipping = copy.deepcopy(teacher)
    skipping.model.layers = torch.nn.ModuleList([skipping.model.layers[i] for i in (0, 2)])
    ids = torch.randint(0, teacher.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(st(input_ids=ids).logits, skipping(input_ids=ids).logits)
    s = run_stage("distill", cfg)
    assert s["student"] == "the teacher's layers [0, 2]" and s["steps"] == 3
    assert s["params"] < s["teacher"]["params"] and s["tokens_per_s"] > 0
    assert s["teacher"]["val_loss"] == s["before"]["val"]["val_teacher_ce"]
    assert s["before"]["val"]["val_agree"] < 1.0  # two layers of three do not agree everywhere
    row = read_jsonl(tmp_path / "r" / "metrics.jsonl")[0]
    for k in ("soft", "hard", "agree", "teacher_ce", "on_policy", "sample_len", "grad_norm"):
        assert k in row, k
    final = AutoModelForCausalLM.from_pretrained(s["final_dir"])
    assert final.config.num_hidden_layers == 2


def _naive(z: torch.Tensor, zt: torch.Tensor, tg: torch.Tensor, kind: str, T: float, beta: float) -> tuple[float, float]:
    """(mean soft, mean hard) over rows, from the definitions, in float64."""
    q, p = torch.softmax(z.double() / T, -1), torch.softmax(zt.double() / T, -1)
    kl = lambda a, b: (a * (a / b).log()).sum(-1)  # noqa: E731
    m = beta * p + (1 - beta) * q
    soft = {"forward_kl": kl(p, q), "reverse_kl": kl(q, p),
            "jsd": beta * kl(p, m) + (1 - beta) * kl(q, m)}[kind] * T * T
    hard = -torch.log_softmax(z.double(), -1).gather(-1, tg[:, None]).squeeze(-1)
    return float(soft.mean()), float(hard.mean())


@pytest.mark.parametrize("kind, T, alpha", [("jsd", 2.0, 0.3), ("reverse_kl", 4.0, 0.8),
                                            ("forward_kl", 1.0, 0.0)])
def test_first_step_losses_from_the_definitions(models: dict[str, Path], tmp_path: Path,
                                                kind: str, T: float, alpha: float) -> None:
    """Step 1 (the saved weights, before any update) on the stage's own first micro-batch:
    soft and hard recomputed from full logits on the answer tokens, and loss = alpha soft +
    (1 - alpha) hard. The stage works in fp32: log-probs of size <= ~10 carry ~1e-6 absolute
    error, so a divergence (x T^2 <= 16) is off by < ~2e-5 per position and so is the mean;
    3e-5 absolute bounds that and still catches a wrong T (a factor), beta or mask (>1e-2)."""
    cfg = config(models, tmp_path / "p", f"loss.kind={kind}", f"loss.temperature={T}",
                 f"loss.alpha={alpha}", "loss.jsd_beta=0.3", "train.max_steps=1", "train.eval_every=0")
    run_stage("distill", cfg)
    row = read_jsonl(tmp_path / "p" / "metrics.jsonl")[0]
    tok, _, sft_cfg = load_tokenizers(cfg, str(models["teacher"]))
    train_c, _, _ = load_data(sft_cfg, None)
    b = build_batches(train_c, tok, sft_cfg, "training")[0].micro_batches(0, cfg.train.micro_batch_size, 1)[0]
    sel = b["loss_mask"].bool()
    with torch.no_grad():
        z, zt = (lm_logits(AutoModelForCausalLM.from_pretrained(models[k]), b)[sel]
                 for k in ("student", "teacher"))
    soft, hard = _naive(z, zt, b["targets"][sel], kind, T, 0.3)
    assert row["soft"] == pytest.approx(soft, abs=3e-5) and row["hard"] == pytest.approx(hard, abs=3e-5)
    assert soft > 0.05  # a check with something to check
    assert row["loss"] == pytest.approx(alpha * row["soft"] + (1 - alpha) * row["hard"], rel=1e-6)


def test_a_teacher_copy_teaches_nothing(models: dict[str, Path], tmp_path: Path) -> None:
    """Student = teacher, alpha = 1: the divergence is 0 at its minimum, so is its gradient,
    for every kind. Both run the same weights on the same inputs, though not always through
    the same kernels (with a graph and without), so the difference is float32 rounding: ~1e-7
    relative on log-probs of size <= ~6, so a divergence (x T^2 = 4) under ~3e-6 and a
    gradient norm under ~1e-4, where a student that differs reads ~1."""
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        cfg = config(models, tmp_path / kind, f"model.path={models['teacher']}", "loss.alpha=1.0",
                     f"loss.kind={kind}", "train.max_steps=1", "train.eval_every=0")
        run_stage("distill", cfg)
        row = read_jsonl(tmp_path / kind / "metrics.jsonl")[0]
        assert abs(row["soft"]) < 3e-6 and row["grad_norm"] < 1e-4 and row["agree"] == 1.0, row


def test_lora_student_ships_an_adapter(models: dict[str, Path], tmp_path: Path) -> None:
    """lora.method on a saved student: only adapters train (the loss reaches them through the
    peft-wrapped body and head), final/ holds the merged model and the adapter."""
    s = run_stage("distill", config(models, tmp_path / "l", "lora.method=lora", "lora.r=4",
                                    "train.max_steps=2", "train.eval_every=0"))
    assert s["trainable_params"] < s["params"] / 2 and s["method"] == "lora"
    assert (Path(s["final_dir"]) / "adapter" / "adapter_config.json").exists()
    assert AutoModelForCausalLM.from_pretrained(s["final_dir"]).config.num_hidden_layers == 2


def test_a_pruned_student_keeps_its_zeros(models: dict[str, Path], tmp_path: Path) -> None:
    """Prune, then distill from the unpruned model (the recovery Minitron describes): the
    pruned weights stay exactly zero through training and the record travels to final/."""
    from lmforge.compress.config import PruneCfg

    run_stage("prune", load_config(PruneCfg, None, [
        f"model.path={models['teacher']}", "method=magnitude", "sparsity=0.5",
        f"run.dir={tmp_path / 'pruned'}"]))
    s = run_stage("distill", config(models, tmp_path / "d", f"model.path={tmp_path / 'pruned'}",
                                    "train.max_steps=2", "train.eval_every=0"))
    assert s["pruned"]["sparsity_after"] == pytest.approx(0.5, abs=0.01)
    before, after = _weights(tmp_path / "pruned" / "final"), _weights(Path(s["final_dir"]))
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(after[name] == 0, before[name] == 0) and not torch.equal(after[name], before[name])


def test_answer_prompts_are_the_examples_before_their_last_answer(models: dict[str, Path]) -> None:
    """Packed rows of several examples (one of them two-turn): each example's prompt is its
    rendering up to its last answer, the assistant header included."""
    tok = load_tokenizer(models["teacher"])
    install_format(tok, resolve_format(tok, "auto"))
    convs = [json.loads(x)["messages"] for x in CHAT.read_text().splitlines()]
    examples = render(tok, convs)
    b = SftBatches(examples, 256, True, 0, tok.pad_token_id)
    batch = b.eval_batches(len(b.rows))[0]
    assert len(b.rows) < len(examples)  # packed: rows hold several examples
    got = sorted(answer_prompts(batch))
    want = []
    for e in examples:
        last = max(i for i, m in enumerate(e.loss_mask) if m)
        start = max(i for i in range(last + 1) if e.loss_mask[i] and (i == 0 or not e.loss_mask[i - 1]))
        want.append(e.ids[:start])
    assert got == sorted(want)
    assert all(tok.decode(p).endswith("<|assistant|>\n") for p in got)


def test_on_policy_runs_and_resumes_exactly(models: dict[str, Path], tmp_path: Path) -> None:
    """A share of steps trains on the student's own samples (chosen by (seed, step)); a run
    resumed from step 2's checkpoint repeats the straight run's rows and final weights bit for
    bit: the choice, the sampling generator and the weights are all restored."""
    over = ["on_policy.fraction=0.5", "on_policy.max_new_tokens=16", "train.max_steps=4",
            "train.save_every=2", "train.keep_last=3", "train.eval_every=2", "train.seed=4",
            "train.final=last"]  # best/ of step 2 is not in the copied checkpoint
    picks = [is_on_policy(4, s, 0.5) for s in range(4)]
    assert any(picks) and not all(picks)  # both kinds of step, and on each side of step 2
    run_stage("distill", config(models, tmp_path / "straight", *over))
    rows = [r for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl") if "loss" in r]
    assert [r["on_policy"] == 1.0 for r in rows] == picks
    for r in rows:  # on-policy steps: soft loss only, on sampled tokens
        if r["on_policy"]:
            assert r["sample_len"] >= 1 and r["loss"] == pytest.approx(r["soft"], rel=1e-6)
    shutil.copytree(tmp_path / "straight/checkpoints/step-2", tmp_path / "split/checkpoints/step-2")
    s = run_stage("distill", config(models, tmp_path / "split", *over))
    assert s["on_policy"]["steps"] == sum(picks)
    assert _rows(tmp_path / "split") == [r for r in _rows(tmp_path / "straight") if r["step"] > 2]
    a, b = _weights(tmp_path / "straight" / "final"), _weights(tmp_path / "split" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("over, needles", [
    (["model.path={alien}"], ["teacher.path={teacher}", "{alien}", "differ at id"]),
    (["model.path=null", "student_layers=[0, 5]"], ["student_layers=[0, 5]", "0 to 2"]),
    (["student_layers=[0]"], ["student_layers", "model.path"]),
    (["model.path=null", "model.preset=null"], ["model.path, model.preset or student_layers"]),
    (["teacher.path=null"], ["teacher.path"]),
    (["on_policy.fraction=0.5", "on_policy.max_new_tokens=200"], ["on_policy.max_new_tokens=200", "256"]),
    (["on_policy.fraction=0.5", "data.train_on_prompt=true"], ["data.train_on_prompt"]),
    (["model.path=null", "student_layers=[0]", "lora.method=lora"], ["lora.method=lora"]),
])
def test_bad_input_is_one_line_exit_2(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
                                      over: list[str], needles: list[str]) -> None:
    paths = {k: str(v) for k, v in models.items()}
    args = [f"teacher.path={models['teacher']}", "student_layers=null", f"model.path={models['student']}",
            f"data.train={CHAT}", f"data.val={CHAT}", "data.max_length=96", "eval.task=null",
            f"run.dir={tmp_path / 'bad'}", "log.progress=off", *(o.format(**paths) for o in over)]
    code = cli.main(["distill", str(ROOT / "configs/distill/tiny.yaml"), *args])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n.format(**paths) in err, (n, err)
    assert not (tmp_path / "bad" / "summary.json").exists()


def test_pass_at_1_of_teacher_and_student(models: dict[str, Path], tmp_path: Path) -> None:
    """On the synthetic task: the teacher's pass@1 once, the student's before and after, each
    with its per-problem rows written (micro models pass nothing: the plumbing is the test)."""
    cfg = config(models, tmp_path / "e", "data.train=synthetic_code", "data.val=null",
                 "data.max_length=256", "eval.task=synthetic_code", "task.n_train=40",
                 "task.n_eval=2", "eval.max_new_tokens=8", "train.max_steps=1")
    s = run_stage("distill", cfg)
    for part in (s["teacher"], s["before"], s["after"]):
        assert part["pass_at_1"]["n_per_group"] == {"d1": 2, "d2": 2, "d3": 2, "d4": 2, "unseen": 2}
    for when in ("teacher", "before", "after"):
        assert len(read_jsonl(tmp_path / "e" / f"eval_{when}.jsonl")) == 10
    assert math.isfinite(s["final_val_loss"])
