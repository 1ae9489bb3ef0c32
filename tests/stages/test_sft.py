"""The sft stage end to end on the tiny pipeline's model: what it writes, adapters and merge,
exact resume, continued pretraining, and every bad input as one line with exit 2."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmforge.chat import BUILTINS
from lmforge.errors import UserError
from tests.conftest import ROOT, run_cli


def test_pipeline_sft_outputs(tiny_run: Path) -> None:
    s = json.loads((tiny_run / "sft" / "summary.json").read_text())
    assert s["method"] == "full" and s["template"] == "lmforge" and s["steps"] == 6
    for when in ("before", "after"):
        p = s[when]["pass_at_1"]
        assert p["n_per_group"] == {"d1": 4, "d2": 4, "d3": 4, "d4": 4, "unseen": 4}
        assert s[when]["general_ppl"] > 1.0
        rows = [json.loads(x) for x in (tiny_run / "sft" / f"eval_{when}.jsonl").read_text().splitlines()]
        assert len(rows) == 20
        for g in p["n_per_group"]:  # the summary's rates are the per-item statuses, counted
            assert p[g] == sum(r["status"] == "passed" for r in rows if r["group"] == g) / 4
    evals = [json.loads(x) for x in (tiny_run / "sft" / "metrics.jsonl").read_text().splitlines()
             if "val_loss" in x]
    assert [e["step"] for e in evals] == [3, 6] and all("general_ppl" in e for e in evals)
    # the training template travels with the model; generation stops at its end-of-turn
    final = tiny_run / "sft" / "final"
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.chat_template == BUILTINS["lmforge"].template
    model = AutoModelForCausalLM.from_pretrained(final)
    assert tok.convert_tokens_to_ids("<|end|>") in model.generation_config.eos_token_id
    report = (tiny_run / "report.md").read_text()
    assert "## Supervised fine-tuning" in report and "| after |" in report


def sft(cwd: Path, *args: str):
    return run_cli("sft", str(ROOT / "configs/sft/lora-tiny.yaml"), *args, cwd=cwd)


def test_lora_writes_merged_model_and_adapter_and_resumes_exactly(tiny_run: Path, tmp_path: Path) -> None:
    base = f"model.path={tiny_run / 'pretrain'}"
    data = f"data.train={ROOT / 'tests/data/chat_tiny.jsonl'}"
    r = sft(tmp_path, base, data, "run.dir=straight", "train.save_every=2", "log.progress=off")
    assert r.returncode == 0, r.stderr[-1500:]
    s = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert s["trainable_params"] < s["params"] / 5 and s["template"] == "chatml"
    assert s["added_tokens"] == ["<|im_start|>", "<|im_end|>"]
    final = tmp_path / "straight" / "final"
    assert (final / "adapter" / "adapter_config.json").exists()
    assert AutoModelForCausalLM.from_pretrained(final).config.vocab_size == 1026
    # a run that died after step 2 resumes to the same step-4 adapter as the straight run
    shutil.copytree(tmp_path / "straight/checkpoints/step-2", tmp_path / "split/checkpoints/step-2")
    r = sft(tmp_path, base, data, "run.dir=split", "log.progress=off")
    assert r.returncode == 0, r.stderr[-1500:]
    a = load_file(str(tmp_path / "straight/checkpoints/step-4/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "split/checkpoints/step-4/adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_continued_pretraining_starts_from_the_model(tiny_run: Path, tmp_path: Path) -> None:
    """Pretrain with model.path and a zero-size step: the val loss is the base model's."""
    r = run_cli("pretrain", str(ROOT / "configs/pretrain/tiny.yaml"), f"model.path={tiny_run / 'pretrain'}",
                f"data.corpus={tiny_run / 'corpus'}", "data.tokenizer=null", "run.dir=cpt",
                "train.max_steps=1", "optim.lr=1e-30", "optim.warmup_steps=0", "log.progress=off",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-1500:]
    base = json.loads((tiny_run / "pretrain" / "summary.json").read_text())["final_val_loss"]
    got = json.loads((tmp_path / "cpt" / "summary.json").read_text())["final_val_loss"]
    assert math.isclose(got, base, abs_tol=1e-4)


def bad(tmp_path: Path, tiny_run: Path, rows: list, *args: str):
    f, v = tmp_path / "bad.jsonl", tmp_path / "val.jsonl"
    f.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    v.write_text(json.dumps(GOOD) + "\n")
    return sft(tmp_path, f"model.path={tiny_run / 'pretrain'}", f"data.train={f}", f"data.val={v}",
               "run.dir=out", "log.progress=off", *args)


GOOD = {"messages": [{"role": "user", "content": "What is 1 plus 1?"},
                     {"role": "assistant", "content": "2"}]}


def test_bad_rows_are_one_line_errors_or_counted_skips(tiny_run: Path, tmp_path: Path) -> None:
    unknown = {"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]}
    empty = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}
    r = bad(tmp_path, tiny_run, [GOOD, unknown])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "bad.jsonl:2" in r.stderr and "messages[0].role" in r.stderr and "unknown role" in r.stderr
    r = bad(tmp_path, tiny_run, [GOOD, empty])
    assert r.returncode == 2 and "bad.jsonl:2" in r.stderr and "empty assistant" in r.stderr
    assert not (tmp_path / "out" / "summary.json").exists()
    long = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x " * 400}]}
    r = bad(tmp_path, tiny_run, [GOOD] * 6 + [unknown, empty, "{not json", long],
            "data.skip_invalid=true", "train.max_steps=1")
    assert r.returncode == 0, r.stderr[-1500:]
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["data"]["rows"]["skipped"] == {"unknown role": 1, "empty assistant message": 1,
                                            "invalid json": 1}
    assert s["data"]["train"]["dropped_overlong"] == 1  # an answer is never cut: dropped, counted


def test_template_without_marker_and_unknown_target(tiny_run: Path, tmp_path: Path) -> None:
    t = tmp_path / "t.jinja"
    t.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    r = bad(tmp_path, tiny_run, [GOOD] * 4, f"data.template={t}")
    assert r.returncode == 2 and "no {% generation %} marker" in r.stderr
    r = bad(tmp_path, tiny_run, [GOOD] * 4, "lora.target_modules=[qkv]")
    assert r.returncode == 2 and "'qkv' matches no module" in r.stderr and "q_proj" in r.stderr


def test_preview_marks_the_loss_tokens(tiny_run: Path, tmp_path: Path) -> None:
    r = bad(tmp_path, tiny_run, [GOOD] * 3, "--preview", "1")
    assert r.returncode == 0, r.stderr
    assert "<|im_start|>assistant\n[[2<|im_end|>]]" in r.stdout and "example 0" in r.stdout
    assert not (tmp_path / "out").exists()


def test_generate_chat_uses_the_saved_template_like_the_eval(tiny_run: Path) -> None:
    """`generate --chat` and the pass@1 eval render the same prompt and stop at the same
    tokens, so greedy answers agree; a model without a template is refused (exit 2)."""
    from lmforge.generate import SampleCfg, generate, generate_batch
    from lmforge.models import load_model
    from lmforge.tokenizer import load_tokenizer

    final = tiny_run / "sft" / "final"
    model, tok = load_model(final).eval(), load_tokenizer(final)
    prompt = "Write a Python function add_one(xs) that adds 1 to each number."
    text = generate(model, tok, [prompt], SampleCfg(max_new_tokens=12, temperature=0.0), chat=True)[0]
    from lmforge.chat import prompt_ids

    stop = list(model.generation_config.eos_token_id)
    ids = generate_batch(model, [prompt_ids(tok, [{"role": "user", "content": prompt}])], stop,
                       tok.pad_token_id, 12)[0]
    assert text == tok.decode(ids, skip_special_tokens=True)
    r = run_cli("generate", str(final), "--chat", "--prompt", prompt, "--temperature", "0",
                "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    r = run_cli("generate", str(tiny_run / "pretrain" / "final"), "--chat", "--prompt", "x")
    assert r.returncode == 2 and "needs a chat template" in r.stderr


MBPP_FILE = ROOT.parent / "shared" / "data" / "mbpp" / "mbpp.jsonl"


def _mbpp_row(task_id: int) -> dict:
    return {"task_id": task_id, "text": f"Write a function f{task_id} that adds {task_id}.",
            "code": f"def f{task_id}(x):\r\n    return x + {task_id}", "test_setup_code": "",
            "test_list": [f"assert f{task_id}(1) == {task_id + 1}"], "challenge_test_list": []}


def test_mbpp_train_items_as_sft_data_end_to_end(tiny_run: Path, tmp_path: Path) -> None:
    f = tmp_path / "mbpp.jsonl"  # validation 511-512, train 601-604
    f.write_text("".join(json.dumps(_mbpp_row(i)) + "\n" for i in (511, 512, 601, 602, 603, 604)))
    r = sft(tmp_path, f"model.path={tiny_run / 'pretrain'}", f"data.train=mbpp:{f}",
            f"data.val=mbpp:{f}", "data.max_length=256", "train.max_steps=2", "run.dir=out",
            "log.progress=off")
    assert r.returncode == 0, r.stderr[-1500:]
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["steps"] == 2 and s["data"]["train"]["examples"] == 4
    assert s["data"]["rows"] == {"source": f"mbpp:{f}", "split": "train", "rows": 4, "kept": 4}
    assert s["data"]["val_rows"] == {"source": f"mbpp:{f}", "split": "validation", "kept": 2}


def _mbpp_data(**data: object) -> tuple[list, list, dict]:
    from lmforge.config import ChatDataCfg, SftCfg
    from lmforge.stages.sft import load_data

    return load_data(SftCfg(data=ChatDataCfg(**data)))


def test_mbpp_sources_that_cannot_be_read_are_one_line_errors(tmp_path: Path) -> None:
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps(GOOD) + "\n")
    mbpp = tmp_path / "mbpp.jsonl"
    mbpp.write_text(json.dumps(_mbpp_row(601)) + "\n")
    cases = [
        ({"train": "mbpp:missing/mbpp.jsonl"},
         "data.train=mbpp:missing/mbpp.jsonl: dataset path not found: missing/mbpp.jsonl"),
        ({"train": f"mbpp:{chat}"}, f"data.train=mbpp:{chat}: {chat}:1: missing field 'task_id'"),
        ({"train": "mbpp:"}, "data.train='mbpp:': give the MBPP file, directory or hub id"),
        ({"train": f"mbpp:{mbpp}", "split": "dev"}, "data.split='dev' is not an MBPP split"),
        ({"train": f"mbpp:{mbpp}", "val": f"mbpp:{mbpp}"},
         f"data.val=mbpp:{mbpp}: {mbpp}: no MBPP rows in split 'validation'"),
        ({"train": f"mbpp:{mbpp}", "split": "validation", "val": "mbpp"},
         "data.val: MBPP validation items are already the training data"),
    ]
    for data, message in cases:
        with pytest.raises(UserError) as e:
            _mbpp_data(**data)
        assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


@pytest.mark.skipif(not MBPP_FILE.is_file(), reason="shared/data/mbpp is absent")
def test_mbpp_train_split_is_the_zero_shot_eval_prompts_and_references() -> None:
    from lmforge.config import EvalCfg
    from lmforge.stages.eval import load_items

    train, val, stats = _mbpp_data(train=f"mbpp:{MBPP_FILE}", val_fraction=0)
    assert len(train) == 374 and val == []
    assert stats["rows"] == {"source": f"mbpp:{MBPP_FILE}", "split": "train", "rows": 374, "kept": 374}
    items = load_items("mbpp", EvalCfg(sources={"mbpp": str(MBPP_FILE)}, split="train", n_shot=0))
    assert [it.meta["task_id"] for it in items] == list(range(601, 975))
    assert train[0] == [{"role": "user", "content": items[0].prompt},
                        {"role": "assistant", "content": items[0].reference}]
    assert all([m["content"] for m in c] == [it.prompt, it.reference] for c, it in zip(train, items))
