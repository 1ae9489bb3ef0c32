"""lmforge eval: any checkpoint on a list of tasks, one command.

    lmforge eval runs/demo/sft/final --task synthetic-code,mbpp --k 1,5 --n 10 --temperature 0.8

Code tasks (synthetic-code, mbpp, mbpp-sanitized, humaneval) sample n completions per problem,
run each with the problem's tests in the sandbox and report pass@k with the unbiased estimator;
gsm8k compares the final number; `perplexity:PATH` scores a text set; `text:PATH` generates for
prompt/reference rows and reports BLEU, chrF, ROUGE, embedding similarity and BERTScore-style
F1. Optional: an n-gram contamination scan of training text against every task's items, and
a pairwise LLM judge against a baseline model. Writes eval.json and one eval_<task>.jsonl per
task (one row per item) into run.dir.

`backend=vllm` samples the answers (code, gsm8k and text tasks) with vLLM: the RL rollout
engine (lmforge/rl/vllm_engine.py) built from the loaded checkpoint, fed the same prompt ids,
stop ids and strings, n, temperature and top_p; scoring is unchanged. Perplexity and the
judge's baseline still run on the HF model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from lmforge.config import EVAL_TASKS, EvalCfg
from lmforge.endpoint import Endpoint, is_endpoint
from lmforge.errors import UserError
from lmforge.eval import harness as H
from lmforge.eval.passk import check_k
from lmforge.io import atomic_file, atomic_write_json
from lmforge.sandbox import Isolation, Limits
from lmforge.tasks.base import AnswerItem, CodeItem

PREFIXED = ("perplexity", "text")
VLLM_MISSING = ("backend=vllm needs vLLM: make vllm (its own venv: .venv-vllm/bin/lmforge "
                "eval ...) or pip install vllm")
VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
Autocast = Callable[[], AbstractContextManager[None]]


def parse_task(spec: str) -> tuple[str, str | None]:
    """`name` or `perplexity:PATH` / `text:PATH`; a path must exist (said before a model is
    loaded, not after: an empty one would otherwise score nothing and report null)."""
    name, _, arg = spec.partition(":")
    if name in PREFIXED:
        if not arg.strip():
            raise UserError(f"tasks: {spec!r} needs a path: {name}:PATH")
        if not Path(arg).exists():
            raise UserError(f"tasks: {spec!r}: no such file or directory: {arg}")
        return name, arg
    if name not in EVAL_TASKS or arg:
        raise UserError(f"tasks: unknown task {spec!r}; known: {', '.join(EVAL_TASKS)}, "
                        "perplexity:PATH, text:PATH")
    return name, None


def check(cfg: EvalCfg) -> None:
    """Everything that can be wrong with the settings, before a model is loaded."""
    if not cfg.model.path:
        raise UserError("model.path: give the checkpoint to evaluate")
    if not cfg.tasks:
        raise UserError("tasks: give at least one task")
    for spec in cfg.tasks:
        parse_task(spec)
    for k in cfg.k:
        check_k(k, cfg.n)
    if cfg.n > 1 and cfg.temperature == 0:
        raise UserError(f"n={cfg.n} samples need temperature > 0 (greedy samples are identical)")
    if cfg.judge.judge and not cfg.judge.baseline:
        raise UserError("judge.baseline: a judge compares this model with a baseline model")
    if is_endpoint(cfg.judge.judge):  # a dead or wrong server: said before any model loads
        if not cfg.judge.judge_model:
            raise UserError(f"judge {cfg.judge.judge}: an endpoint judge needs a model name")
        Endpoint(str(cfg.judge.judge), cfg.judge.judge_model, what="judge endpoint").check()
    if cfg.backend == "vllm":
        try:
            import vllm  # noqa: F401  (said before a checkpoint is loaded, not after)
        except ImportError:
            raise UserError(VLLM_MISSING) from None
        if cfg.temperature > 2:
            raise UserError(f"temperature={cfg.temperature}: backend=vllm samples at temperatures "
                            "up to 2 (vLLM's limit); use backend=hf")


def load_items(name: str, cfg: EvalCfg) -> list[CodeItem] | list[AnswerItem]:
    src = cfg.sources.get(name)
    if name == "synthetic-code":
        from lmforge.tasks.synthetic_code import make_splits, to_code_items

        t = cfg.synthetic
        splits = make_splits(t.seed, n_train=1, n_eval=t.n_eval)
        groups = {f"d{d}": ps for d, ps in sorted(splits.heldout.items())}
        groups["unseen"] = splits.unseen
        return [it for g, ps in groups.items()
                for it in to_code_items(ps[:cfg.limit], cfg.signature_prefill, g)]
    if name in ("mbpp", "mbpp-sanitized"):
        from lmforge.tasks.mbpp import load_mbpp

        shots = {} if cfg.n_shot is None else {"n_shot": cfg.n_shot}
        return load_mbpp(src, split=cfg.split, sanitized=name == "mbpp-sanitized",
                         limit=cfg.limit, **shots)
    if name == "humaneval":
        from lmforge.tasks.humaneval import load_humaneval

        return load_humaneval(src, limit=cfg.limit)
    from lmforge.tasks.gsm8k import load_gsm8k

    shots = {} if cfg.n_shot is None else {"n_shot": cfg.n_shot}
    return load_gsm8k(src, split=cfg.split, limit=cfg.limit, **shots)


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_file(path) as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _slug(spec: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in spec)[:60]


def run_task(name: str, items: list[Any], gen: H.Generator, cfg: EvalCfg, autocast: Autocast
             ) -> tuple[dict[str, Any], list[dict[str, Any]], Isolation | None]:
    if not items:
        raise UserError(f"task {name}: no items (split {cfg.split!r}, limit {cfg.limit})")
    timer = H.Timer()
    gen.truncated = 0
    completions = H.answer_items(gen, items, n=cfg.n, temperature=cfg.temperature,
                                 top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                                 batch_size=cfg.batch_size, seed=cfg.seed, autocast=autocast())
    gen_s = timer.lap()
    isolation = None
    if isinstance(items[0], CodeItem):
        limits = Limits(timeout_s=cfg.sandbox.timeout_s, memory_mb=cfg.sandbox.memory_mb)
        rows, isolation = H.score_code(items, completions, limits, cfg.sandbox.workers)  # type: ignore[arg-type]
    else:
        rows = H.score_answers(items, completions)  # type: ignore[arg-type]
    summary = H.summarize(rows, cfg.k)
    summary.update(generate_s=gen_s, score_s=timer.lap(),
                   mode="chat" if gen.chat else "completion", truncated_prompts=gen.truncated)
    if gen.truncated:
        print(f"eval {name}: {gen.truncated} prompts longer than the context lost their start")
    if isolation is not None:
        summary["isolation"] = isolation.describe()
    return summary, rows, isolation


def text_set(path: Path) -> list[str]:
    """A text set: a corpus stage dir (its val split), .txt, or .jsonl/.json rows' text."""
    from lmforge.eval.contamination import eval_texts_from_file

    if path.is_dir():
        path = path / "val.jsonl"
    if not path.exists():
        raise UserError(f"text set not found: {path}")
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    return [t for _, t in eval_texts_from_file(path, ["text"] if path.name == "val.jsonl" else None)]


def run_perplexity(path: str, gen: H.Generator, autocast: Autocast) -> dict[str, Any]:
    from lmforge.eval.text_metrics import perplexity

    with autocast():
        out = perplexity(gen.model, gen.tokenizer, text_set(Path(path)))
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def run_text(path: str, gen: H.Generator, cfg: EvalCfg, autocast: Autocast
             ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Rows {"prompt", "reference"}: greedy answers scored against the references."""
    from lmforge.eval.contamination import eval_texts_from_file
    from lmforge.eval.text_metrics import generation_metrics

    prompts = eval_texts_from_file(path, ["prompt"])[:cfg.limit]
    refs = eval_texts_from_file(path, ["reference"])[:cfg.limit]
    with autocast():
        hyps = [o[0] for o in gen([p for _, p in prompts], max_new_tokens=cfg.max_new_tokens,
                                  batch_size=cfg.batch_size)]
    rows = [{"id": i, "prompt": p, "reference": r, "answer": h}
            for (i, p), (_, r), h in zip(prompts, refs, hyps)]
    return generation_metrics(hyps, [r for _, r in refs]), rows


def run_contamination(cfg: EvalCfg, task_items: dict[str, list[Any]], out: Path) -> dict[str, Any]:
    from lmforge.eval.contamination import format_report, scan

    def item_text(it: CodeItem | AnswerItem) -> str:
        question = str(it.meta.get("text") or it.meta.get("question") or it.prompt)
        return question + "\n" + (it.reference if isinstance(it, CodeItem) else it.answer)

    sets = {name: [(it.task_id, item_text(it)) for it in items] for name, items in task_items.items()}
    report = scan(_train_docs(cfg.contamination.train), sets, n=cfg.contamination.n)
    (out / "contamination.txt").write_text(format_report(report, max_items=1000) + "\n")
    print(format_report(report))
    return report.to_json()


def _train_docs(paths: list[Path]) -> Any:
    from lmforge.eval.contamination import eval_texts_from_file

    for p in paths:
        if p.is_dir() and (p / "train.jsonl").exists():
            p = p / "train.jsonl"
        if not p.exists():
            raise UserError(f"contamination.train: not found: {p}")
        if p.suffix == ".txt":
            yield str(p), p.read_text(encoding="utf-8")
        else:
            yield from eval_texts_from_file(p)


def run_judge(cfg: EvalCfg, gen: H.Generator, task_items: dict[str, list[Any]], out: Path,
              autocast: Autocast, sample_autocast: Autocast) -> dict[str, Any]:
    from lmforge.eval.judge import judge_pairs, make_judge
    from lmforge.models import load_model
    from lmforge.tokenizer import load_tokenizer

    j = cfg.judge
    judge = make_judge(j.judge, **({"model": j.judge_model} if j.judge_model else {}))
    if j.prompts is not None:
        from lmforge.eval.contamination import eval_texts_from_file

        prompts = [t for _, t in eval_texts_from_file(j.prompts, ["prompt"])]
    else:
        prompts = [it.prompt for items in task_items.values() for it in items]
    prompts = prompts[:j.limit]
    base = H.Generator(load_model(j.baseline).eval(), load_tokenizer(j.baseline))
    with sample_autocast():
        mine = [o[0] for o in gen(prompts, max_new_tokens=j.max_new_tokens)]
    with autocast():
        theirs = [o[0] for o in base(prompts, max_new_tokens=j.max_new_tokens)]
    rows, summary = judge_pairs(judge, list(zip(prompts, mine, theirs)))
    _write_rows(out / "eval_judge.jsonl", rows)
    return {"baseline": j.baseline, "judge": j.judge, **summary}


def attach_vllm(gen: H.Generator, precision_name: str, cfg: EvalCfg) -> str:
    """Sample `gen`'s answers with the vLLM rollout engine; returns the engine's dtype. It runs
    in the precision's dtype (autocast does not reach vLLM's kernels). Its KV cache holds
    `batch_size` sequences of the full context (vLLM schedules more when they are shorter):
    vLLM's default takes a share of all memory, of RAM on a CPU."""
    from lmforge.rl.rollout import make_engine

    conf = gen.model.config
    known = gen.context < 1 << 30  # else vLLM reads the length from the config itself
    heads = conf.num_attention_heads
    head_dim = getattr(conf, "head_dim", None) or conf.hidden_size // heads
    kv_heads = getattr(conf, "num_key_value_heads", None) or heads
    dtype = VLLM_DTYPES[precision_name]
    per_token = 2 * conf.num_hidden_layers * kv_heads * head_dim * torch.finfo(
        getattr(torch, dtype)).bits // 8  # keys and values, every layer
    kv = per_token * gen.context * cfg.batch_size if known else None
    gen.engine = make_engine("vllm", gen.model, gen.tokenizer, gen.stop_ids, gen.pad, vllm_args={
        "dtype": dtype, "seed": cfg.seed, "max_model_len": gen.context if known else None,
        "kv_cache_memory_bytes": kv})
    return dtype


def main(cfg: EvalCfg) -> dict[str, Any]:
    from lmforge.models import load_model
    from lmforge.tokenizer import load_tokenizer
    from lmforge.train.precision import make_precision

    check(cfg)
    out = cfg.run.dir
    model = load_model(cfg.model.path, cfg.model.trust_remote_code)  # type: ignore[arg-type]
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)  # type: ignore[arg-type]
    if torch.cuda.is_available():
        model.to("cuda")
    model.eval()
    chat = {"auto": None, "on": True, "off": False}[cfg.chat]
    if chat and not getattr(tokenizer, "chat_template", None):
        raise UserError(f"chat=on: {cfg.model.path} has no chat template in its tokenizer files")
    gen = H.Generator(model, tokenizer, chat)
    precision = make_precision(cfg.precision, next(model.parameters()).device.type)
    print(f"eval: {precision.choice.line()}")
    autocast = precision.autocast
    settings: dict[str, Any] = {"backend": cfg.backend}
    if cfg.backend == "vllm":
        settings["backend_dtype"] = attach_vllm(gen, precision.name, cfg)
        sample_autocast: Autocast = nullcontext
    else:
        sample_autocast = autocast
    print(f"eval: answers sampled with {cfg.backend}")
    results: dict[str, Any] = {}
    task_items: dict[str, list[Any]] = {}
    isolation: Isolation | None = None
    for spec in cfg.tasks:
        name, arg = parse_task(spec)
        if name == "perplexity":
            results[spec] = run_perplexity(arg, gen, autocast)  # type: ignore[arg-type]
        elif name == "text":
            results[spec], rows = run_text(arg, gen, cfg, sample_autocast)  # type: ignore[arg-type]
            _write_rows(out / f"eval_{_slug(spec)}.jsonl", rows)
        else:
            task_items[spec] = load_items(name, cfg)
            results[spec], rows, iso = run_task(name, task_items[spec], gen, cfg, sample_autocast)
            isolation = isolation or iso
            _write_rows(out / f"eval_{_slug(spec)}.jsonl", rows)
        print(f"eval {spec}: " + ", ".join(f"{k} {v:.4g}" for k, v in results[spec].items()
                                           if isinstance(v, float)))
    summary: dict[str, Any] = {"model": str(cfg.model.path), "tasks": results,
                               "settings": {"n": cfg.n, "k": cfg.k, "temperature": cfg.temperature,
                                            "top_p": cfg.top_p, "chat": gen.chat,
                                            "max_new_tokens": cfg.max_new_tokens, **settings},
                               "precision": precision.choice.as_dict()}
    if isolation is not None:
        summary["sandbox"] = {"level": isolation.level, "layers": isolation.layers,
                              "notes": list(isolation.notes)}
        if isolation.level == "weak":
            print(f"warning: sandbox isolation is weak here: {isolation.describe()}")
    if cfg.contamination.train:
        summary["contamination"] = run_contamination(cfg, task_items, out)
    if cfg.judge.judge:
        summary["judge"] = run_judge(cfg, gen, task_items, out, autocast, sample_autocast)
    atomic_write_json(out / "eval.json", summary)
    return summary
