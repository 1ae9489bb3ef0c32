"""`lmforge dpo` against TRL's `DPOTrainer` on the same model, pairs and settings, on CPU.

    python bench/dpo_vs_trl.py [--steps 30] [--pairs 256] [--batch 8] [--max-length 256]
    python bench/dpo_vs_trl.py --rows ours "ours, packing off" "TRL, live reference" \
        "TRL, precomputed reference"
    python bench/dpo_vs_trl.py --threads 1   # on a machine shared with other work
    make bench-dpo      # installs the `bench` extra (trl) first

Rows, each its own process (so its peak RSS is its own). The processes start together but run
one at a time, taking turns at every optimizer step (a baton the parent hands round): the
rows' steps interleave, so a machine shared with other work slows every row alike and the
ratios stay meaningful where the absolute times do not.

- ours: `lmforge dpo` as the CLI runs it; the reference's log-probs precomputed once
  (its default), chosen and rejected packed padding-free into rows of max_length.
- ours, packing off (with `--rows`, not by default, for time): the same with
  `data.packing=false` (one sequence per row, padded, as TRL pads), to show how much of the
  difference is packing.
- TRL: `DPOTrainer` with its default reference strategy, a frozen copy of the model run
  every step.
- TRL, precomputed reference: `precompute_ref_log_probs=True`, the like-for-like peer of ours.

Same for every row: one from-config llama (lmforge's `tiny` preset, vocab 8192, weights saved
once), one tokenizer trained here with lmforge's chat template, the same 256 pairs (one file:
synthetic-code problems after 0-2 earlier problem/solution turns; chosen: the problem's
reference program, rejected: another problem's), batch 8 pairs, gradient accumulation 1,
max_length, AdamW (fused, betas 0.9/0.95, eps 1e-8, no weight decay), constant lr, clip 1.0,
beta 0.1, sigmoid loss, dropout off, no gradient checkpointing, seed 0, CUDA hidden. Every
sequence fits max_length (checked when the pairs are made), so neither side truncates and
the two truncation modes (ours: `left`, TRL: `keep_start`) never act.

Reported: step = median (and best) wall time of one optimizer step after `--warmup` steps,
from the end of the previous one (data collation, forward, backward, clip, AdamW, the
loop's own bookkeeping); train s = reference precompute + every step; process s = the whole
child's running time, turns waited for excluded (imports, loading, tokenizing, training,
ours' end-of-run validation and saving; TRL saves nothing); peak MB =
the child's ru_maxrss; train MB = how far training raised it above the loaded policy and
data. Ours also precomputes the reference for its 8 validation pairs (it requires a validation
split) and evaluates them once after the last step (outside step and train s). The first
step's loss is ln 2 = 0.6931 at policy == reference in every row.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SPECIALS = ["<|endoftext|>", "<|bos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>",
            "<|end|>"]
VOCAB = 8192
TARGET_TIME, TARGET_MEM = 0.70, 1.00  # ours / TRL, each at most
ROWS = {  # name -> (system, variant)
    "ours": ("ours", "packed"),
    "ours, packing off": ("ours", "padded"),
    "TRL, live reference": ("trl", "live"),
    "TRL, precomputed reference": ("trl", "precompute"),
}


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# --------------------------------------------------------------------------- setup (parent)


def bench_tokenizer(texts: list[str], work: Path) -> Any:
    """An 8k byte-level BPE trained on the task's texts plus stdlib code (to fill the
    vocabulary), saved to work/tok, with lmforge's chat template."""
    from lmforge.chat import BUILTINS
    from lmforge.tokenizer import save_tokenizer, train_bpe

    std = Path(sysconfig.get_paths()["stdlib"])
    texts = list(texts) + [f.read_text(errors="ignore") for f in sorted(std.glob("*.py"))[:60]]
    tok = save_tokenizer(train_bpe(texts, VOCAB, SPECIALS), work / "tok", bos_token="<|bos|>",
                         eos_token="<|endoftext|>", pad_token="<|pad|>",
                         extra_special_tokens=SPECIALS[3:])
    tok.chat_template = BUILTINS["lmforge"].template
    return tok


def make_setup(work: Path, a: argparse.Namespace) -> dict:
    """Tokenizer + model dir, and pairs.jsonl / val.jsonl whose every sequence fits."""
    from lmforge.config import ModelCfg
    from lmforge.models import build_model, count_params, save_hf
    from lmforge.tasks.synthetic_code import make_splits

    problems = list(make_splits(0, n_train=4 * (a.pairs + 8), n_eval=1).train)
    tok = bench_tokenizer([p.prompt for p in problems] + [p.solution for p in problems], work)
    model = build_model(ModelCfg(preset=a.preset), tok, seed=0)
    save_hf(model, work / "model", tok)
    rng = random.Random(0)
    rows, lengths = [], []
    for i, p in enumerate(problems):
        if len(rows) == a.pairs + 8:
            break
        history = []
        for q in rng.sample(problems, rng.choice([0, 0, 1, 1, 2])):
            history += [{"role": "user", "content": q.prompt},
                        {"role": "assistant", "content": q.solution}]
        prompt = [*history, {"role": "user", "content": p.prompt}]
        other = problems[(i + 1 + rng.randrange(len(problems) - 1)) % len(problems)].solution
        if other == p.solution:
            continue
        n = [len(tok.apply_chat_template([*prompt, {"role": "assistant", "content": c}],
                                         tokenize=True, return_dict=True)["input_ids"])
             for c in (p.solution, other)]
        if max(n) > a.max_length:  # neither side may truncate: the two modes differ
            continue
        rows.append({"prompt": prompt, "chosen": p.solution, "rejected": other})
        lengths += n
    if len(rows) < a.pairs + 8:
        raise SystemExit(f"only {len(rows)} pairs fit max_length={a.max_length}; raise it")
    write = lambda path, rs: path.write_text("".join(json.dumps(r) + "\n" for r in rs))  # noqa: E731
    write(work / "pairs.jsonl", rows[:a.pairs])
    write(work / "val.jsonl", rows[a.pairs:])  # ours needs a validation split; 8 pairs
    lengths = lengths[:2 * a.pairs]
    return {"params": count_params(model)[1], "vocab": len(tok), "min_len": min(lengths),
            "mean_len": statistics.mean(lengths), "max_len": max(lengths)}


# --------------------------------------------------------------------------- one row (child)


class Baton:
    """Turns between the rows' processes, handed round by the parent: a row runs only while it
    holds the baton and passes it on at every optimizer step's end (and around its reference
    precompute), so the rows' steps interleave one by one and whatever else loads the machine
    falls on all of them alike. Time spent waiting for the baton is counted out."""

    def __init__(self, fds: str | None) -> None:
        self.go, self.done = map(int, fds.split(",")) if fds else (None, None)
        self.waited = 0.0

    def wait(self) -> None:
        if self.go is not None:
            t = time.perf_counter()
            if not os.read(self.go, 1):  # the parent is gone (interrupted): stop, don't run free
                raise SystemExit("dpo_vs_trl: the parent process ended")
            self.waited += time.perf_counter() - t

    def turn(self) -> float:
        """Pass the baton, wait for it back; returns when this row resumed."""
        if self.done is not None:
            os.write(self.done, b"d")
        self.wait()
        return time.perf_counter()


def steps_of(resumed: list[float], ends: list[float], warmup: int) -> dict:
    """Step i runs from the baton's return after step i-1 (before step 1: the loop's start)
    to its own end: everything the loop does between two optimizer steps."""
    steps = [e - r for r, e in zip(resumed, ends)]
    timed = steps[warmup:] or steps
    return {"step_s": statistics.median(timed), "best_s": min(timed), "steps": steps,
            "steps_s": sum(steps)}


def run_ours(a: argparse.Namespace, work: Path, variant: str, baton: Baton) -> dict:
    import lmforge.stages.dpo as dpo
    import lmforge.train.loop as loop
    from lmforge.cli import main
    from lmforge.data.preference import PairBatches

    out: dict = {"ref_s": 0.0, "positions": [], "real": [], "resumed": [], "ends": []}

    def timed_tables(*args, **kw):
        out["base_mb"] = maxrss_mb()  # policy loaded, data tokenized: training starts here
        t = baton.turn()
        r = orig_tables(*args, **kw)
        out["ref_s"] += time.perf_counter() - t
        baton.turn()
        return r

    def timed_step(self):
        if not out["resumed"]:
            out["resumed"].append(baton.turn())
        r = orig_step(self)
        out["ends"].append(time.perf_counter())
        out["resumed"].append(baton.turn())
        return r

    def counted(self, *args, **kw):
        bs = orig_batches(self, *args, **kw)
        out["positions"].append(sum(b["input_ids"].numel() for b in bs))
        out["real"].append(sum(int(b["valid"].sum()) for b in bs))
        return bs

    def tokenized(*args, **kw):
        ex, st = orig_tok(*args, **kw)
        out.setdefault("data_tokens", sum(2 * len(e.prompt) + len(e.chosen) + len(e.rejected)
                                          for e in ex))
        out.setdefault("truncated", st["truncated"] + st["dropped_overlong"])
        return ex, st

    orig_tables, dpo.cached_tables = dpo.cached_tables, timed_tables
    orig_step, loop.Trainer.train_step = loop.Trainer.train_step, timed_step
    orig_batches, PairBatches.micro_batches = PairBatches.micro_batches, counted
    orig_tok, dpo.tokenize_pairs = dpo.tokenize_pairs, tokenized
    run_dir = work / f"ours-{variant}-{a.precision}"
    rc = main(["dpo", f"model.path={work / 'model'}", f"data.train={work / 'pairs.jsonl'}",
               f"data.val={work / 'val.jsonl'}", f"data.max_length={a.max_length}",
               "data.truncation=left", f"data.packing={str(variant == 'packed').lower()}",
               f"run.dir={run_dir}", "loss=sigmoid", f"beta={a.beta}", f"optim.lr={a.lr}",
               "optim.weight_decay=0", "optim.warmup_steps=0", "optim.schedule=constant",
               f"train.max_steps={a.steps}", f"train.micro_batch_size={a.batch}",
               "train.grad_accum=1", f"train.precision={a.precision}", "train.clip_grad=1.0",
               "train.eval_every=0", "train.resume=never", "train.seed=0", "log.every=10",
               "log.progress=off", "eval.task=null"])
    if rc != 0:
        raise SystemExit(f"lmforge dpo exited {rc}")
    s = json.loads((run_dir / "summary.json").read_text())
    return {**steps_of(out["resumed"], out["ends"], a.warmup), "ref_s": out["ref_s"],
            "first_loss": s["first_step"]["loss"], "precision": s["precision"]["name"],
            "base_mb": out["base_mb"], "positions": statistics.mean(out["positions"]),
            "real": statistics.mean(out["real"]), "data_tokens": out["data_tokens"],
            "truncated": out["truncated"]}


def trl_config(a: argparse.Namespace, out: Path, precompute: bool, padding_free: bool = False):
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(out), max_steps=a.steps, per_device_train_batch_size=a.batch,
        gradient_accumulation_steps=1, learning_rate=a.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
        optim="adamw_torch_fused", max_grad_norm=1.0, beta=a.beta, loss_type=["sigmoid"],
        max_length=a.max_length, truncation_mode="keep_start", padding_free=padding_free,
        precompute_ref_log_probs=precompute, precompute_ref_batch_size=a.batch,
        gradient_checkpointing=False,  # TRL's default is True; ours is off
        bf16=a.precision == "bf16", fp16=False,  # TRL's default is bf16=True, even on a CPU
        use_cpu=True, disable_dropout=True, seed=0, dataloader_num_workers=0,
        logging_steps=10, logging_first_step=True, save_strategy="no", eval_strategy="no",
        report_to="none", disable_tqdm=True)


def trl_dataset(work: Path, name: str = "pairs.jsonl"):
    """The same rows as ours reads, in TRL's conversational preference format."""
    from datasets import Dataset

    rows = [json.loads(line) for line in (work / name).read_text().splitlines()]
    return Dataset.from_list([{"prompt": r["prompt"],
                               "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]}
                              for r in rows])


def run_trl(a: argparse.Namespace, work: Path, variant: str, baton: Baton) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    out: dict = {"ref_s": 0.0, "positions": [], "real": [], "resumed": [], "ends": [],
                 "training": False}

    class Clock(TrainerCallback):
        def on_train_begin(self, *args, **kw):
            out["training"] = True
            out["resumed"].append(baton.turn())

        def on_step_end(self, *args, **kw):
            out["ends"].append(time.perf_counter())
            out["resumed"].append(baton.turn())

    def timed_precompute(self, *args, **kw):
        t = baton.turn()
        r = orig_pre(self, *args, **kw)
        out["ref_s"] += time.perf_counter() - t
        baton.turn()
        return r

    def counted(self, examples):
        b = orig_call(self, examples)
        if out["training"]:
            out["positions"].append(b["input_ids"].numel())
            out["real"].append(int(b["attention_mask"].sum()))
        return b

    orig_pre, DPOTrainer._precompute_ref_logps = DPOTrainer._precompute_ref_logps, timed_precompute
    orig_call, DataCollatorForPreference.torch_call = DataCollatorForPreference.torch_call, counted
    tok = AutoTokenizer.from_pretrained(work / "model")
    ds = trl_dataset(work)
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    base = maxrss_mb()
    trainer = DPOTrainer(model=model, args=trl_config(a, work / f"trl-{variant}", variant == "precompute"),
                         train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    d = trainer.train_dataset
    data_tokens = sum(2 * len(p) + len(c) + len(r) for p, c, r in
                      zip(d["prompt_ids"], d["chosen_ids"], d["rejected_ids"]))
    trainer.train()
    first = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    # positions/step: a collator call per step, plus the loader's one-ahead prefetch at most
    n = len(out["ends"])
    return {**steps_of(out["resumed"], out["ends"], a.warmup), "ref_s": out["ref_s"],
            "first_loss": first, "precision": a.precision, "base_mb": base,
            "positions": statistics.mean(out["positions"][:n]),
            "real": statistics.mean(out["real"][:n]), "data_tokens": data_tokens,
            "truncated": 0}


def child(a: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    baton = Baton(a.baton)
    baton.wait()  # even imports wait their turn
    import torch

    system, variant = ROWS[a.one]
    r = (run_ours if system == "ours" else run_trl)(a, Path(a.work), variant, baton)
    r.update(peak_mb=maxrss_mb(), threads=torch.get_num_threads(),
             process_s=time.perf_counter() - t0 - baton.waited)
    Path(a.result).write_text(json.dumps(r))


# --------------------------------------------------------------------------- parent


def trl_status() -> str | None:
    """None when TRL can run here, else why not (one line)."""
    if importlib.util.find_spec("trl") is None:
        return "trl is not installed: pip install -e '.[bench]' (or make bench-dpo)"
    v = importlib.metadata.version("trl")
    if int(v.split(".")[0]) < 1:
        return f"trl {v} is older than 1.0: pip install -e '.[bench]'"
    return None


def padding_free_probe(a: argparse.Namespace, work: Path) -> str:
    """What DPOTrainer does with padding_free=True (reported ignored in its DPO refactor)."""
    import datasets
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    logging.getLogger("trl").setLevel(logging.ERROR)  # its warning is what the attribute says
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tr = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(work / "model",
                                                                      dtype=torch.float32),
                            args=trl_config(a, work / "probe", True, padding_free=True),
                            train_dataset=trl_dataset(work, "val.jsonl"),
                            processing_class=AutoTokenizer.from_pretrained(work / "model"))
    except Exception as e:  # noqa: BLE001  (any refusal is the answer)
        return f"padding_free=True refused: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    if getattr(tr, "padding_free", None) is False:
        return ("padding_free=True is accepted, then switched off with a warning (\"temporarily "
                "unavailable\"): TRL pads every batch to its longest sequence")
    return "padding_free=True stays on in DPOTrainer (FlashAttention only; not on this CPU)"


def child_env(a: argparse.Namespace, work: Path) -> dict[str, str]:
    """What every measured process runs under: no GPU, no hub, no progress bars, and the
    same torch thread count."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(work / "hf-datasets"), "PYTHONPATH": str(ROOT)}
    if a.threads:  # torch's intra-op pool size, the same for every row
        env["OMP_NUM_THREADS"] = str(a.threads)
    return env


def take_turns(jobs: list[tuple[str, list[str], Path, Path]], env: dict[str, str]
               ) -> list[tuple[str, dict]]:
    """Start every job (name, argv, result file, log file) at once, `--baton R,W` appended,
    and hand the baton round robin, one optimizer step each, until every process has ended
    (closed its pipe); then (name, its result, or {"error": its last log line})."""
    kids = []
    for name, argv, res, log in jobs:
        go_r, go_w = os.pipe()
        done_r, done_w = os.pipe()
        with log.open("w") as f:
            proc = subprocess.Popen([*argv, "--baton", f"{go_r},{done_w}"], cwd=ROOT, env=env,
                                    stdout=f, stderr=subprocess.STDOUT, pass_fds=(go_r, done_w))
        os.close(go_r)
        os.close(done_w)
        kids.append({"name": name, "proc": proc, "go": go_w, "done": done_r, "res": res, "log": log})
    active = list(kids)
    while active:
        for k in list(active):
            try:
                os.write(k["go"], b"g")
                alive = os.read(k["done"], 1) != b""
            except BrokenPipeError:
                alive = False
            if not alive:
                active.remove(k)
                print(f"done: {k['name']}", file=sys.stderr, flush=True)
    rows = []
    for k in kids:
        rc = k["proc"].wait()
        os.close(k["go"])
        os.close(k["done"])
        if rc != 0 or not k["res"].exists():
            tail = k["log"].read_text().strip().splitlines()[-1:] or ["no output"]
            rows.append((k["name"], {"error": f"exit {rc}: {tail[0][:200]} (log: {k['log']})"}))
        else:
            rows.append((k["name"], json.loads(k["res"].read_text())))
    return rows


def run_rows(names: list[str], a: argparse.Namespace, work: Path, precision: str) -> list[tuple[str, dict]]:
    """Every row in its own process, all started at once and handed the baton in turn."""
    jobs = []
    for i, name in enumerate(names):
        res, log = work / f"result-{precision}-{i}.json", work / f"log-{precision}-{i}.txt"
        jobs.append((f"{name} ({precision})", [
            sys.executable, __file__, "--one", name, "--work", str(work), "--result", str(res),
            "--precision", precision, "--steps", str(a.steps), "--batch", str(a.batch),
            "--max-length", str(a.max_length), "--lr", str(a.lr), "--beta", str(a.beta),
            "--warmup", str(a.warmup)], res, log))
    return [(name.rsplit(" (", 1)[0], r) for name, r in take_turns(jobs, child_env(a, work))]


def cpu_line() -> str:
    model, cores = "unknown CPU", os.cpu_count()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        model = info.get("Model name", model).strip()
        cores = int(info.get("CPU(s)", cores))
    except (OSError, ValueError):
        pass
    return f"{model}, {cores} CPUs"


def print_table(rows: list[tuple[str, dict]], why_missing: str | None) -> None:
    ours = dict(rows).get("ours", {})
    print("| system | step ms (median) | ours/this | best ms | ours/this | ref precompute s | "
          "train s | process s | peak MB | ours/this | train MB | first-step loss | "
          "positions/step | real tok/step |")
    print("|---|" + "---:|" * 13)
    for name, r in rows:
        if "error" in r:
            print(f"| {name} | {r['error']} |||||||||||||")
            continue
        peer = name != "ours" and ours and "error" not in ours
        t, b, m = (f"{ours[k] / r[k]:.2f}x" if peer else "" for k in ("step_s", "best_s", "peak_mb"))
        print(f"| {name} | {1e3 * r['step_s']:.0f} | {t} | {1e3 * r['best_s']:.0f} | {b} | "
              f"{r['ref_s']:.1f} | "
              f"{r['ref_s'] + r['steps_s']:.1f} | {r['process_s']:.1f} | {r['peak_mb']:,.0f} | "
              f"{m} | {r['peak_mb'] - r['base_mb']:,.0f} | {r['first_loss']:.5f} | "
              f"{r['positions']:,.0f} | {r['real']:,.0f} |")
    if why_missing:
        print(f"| TRL | not run: {why_missing} |||||||||||||")


def verdict(rows: list[tuple[str, dict]], threads: int | None) -> list[str]:
    got = dict(rows)
    ours, lines = got.get("ours"), []
    if not ours or "error" in ours:
        return lines
    for name, r in rows:
        if name.startswith("TRL") and "error" not in r:
            t, b = ours["step_s"] / r["step_s"], ours["best_s"] / r["best_s"]
            m = ours["peak_mb"] / r["peak_mb"]
            ok = lambda x, target: "met" if x <= target else "NOT met"  # noqa: E731
            lines.append(f"target vs {name}: step {t:.2f}x median, {b:.2f}x best (<= "
                         f"{TARGET_TIME:.2f}x: {ok(t, TARGET_TIME)}); peak RSS {m:.2f}x (<= "
                         f"{TARGET_MEM:.2f}x: {ok(m, TARGET_MEM)})")
    noisy = [n for n, r in rows if "error" not in r and r["step_s"] > 2 * r["best_s"]]
    if noisy:
        lines.append(f"disturbed: median step > 2x best in {'; '.join(noisy)}: other processes "
                     "stretched most steps, so the best-step ratios are the reliable ones"
                     + ("" if threads == 1 else " (--threads 1 is far less sensitive: no thread "
                        "waits at every op for a sibling the scheduler has parked)"))
    for name, r in rows:
        if "error" not in r and abs(r["first_loss"] - math.log(2)) > 1e-3:
            lines.append(f"SURPRISE: {name}'s first-step loss {r['first_loss']:.5f} is not ln 2")
    cut = sum(r["truncated"] for _, r in rows if "error" not in r)
    lines.append("truncation: none (every sequence fits max_length)" if not cut else
                 f"SURPRISE: ours truncated or dropped {cut} pairs; TRL's keep_start cuts them otherwise")
    toks = {r["data_tokens"] for _, r in rows if "error" not in r}
    if any(n.startswith("TRL") and "error" not in r for n, r in rows):
        same = "yes (equal token totals over the training pairs)" if len(toks) == 1 else f"NO: {sorted(toks)}"
        lines.append(f"same tokens on both sides: {same}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the median")
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--threads", type=int, help="torch threads in every row (default: torch's, "
                   "one per core); 1 is far less disturbed by other processes on a shared machine")
    p.add_argument("--rows", nargs="*", default=[n for n in ROWS if n != "ours, packing off"],
                   choices=list(ROWS), help="which rows (default: all but 'ours, packing off')")
    p.add_argument("--one", choices=list(ROWS), help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--baton", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        child(a)
        return
    import torch
    import transformers

    from lmforge.train.precision import choose

    auto = choose("auto", "cpu")
    precisions = ["fp32"] + (["bf16"] if auto.name == "bf16" else [])
    why_missing = trl_status()
    tmp = tempfile.TemporaryDirectory(prefix="dpo-vs-trl-")
    work = Path(tmp.name)
    load0 = os.getloadavg()[0]
    info = make_setup(work, a)
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}, " + (
        f"trl {importlib.metadata.version('trl')}" if why_missing is None else "trl: none")
    names = [n for n in a.rows if ROWS[n][0] == "ours" or why_missing is None]
    tables = [(prec, run_rows(names, a, work, prec)) for prec in precisions]
    probe = padding_free_probe(a, work) if why_missing is None else ""
    threads = {r.get("threads") for _, rows in tables for _, r in rows if "threads" in r}
    print(f"\nCPU: {cpu_line()}; torch threads {sorted(threads)}; {versions}")
    print(f"model: {a.preset} llama from config, {info['params'] / 1e6:.1f}M params, vocab "
          f"{info['vocab']}; {a.pairs} pairs, sequences {info['min_len']}-{info['max_len']} "
          f"tokens (mean {info['mean_len']:.0f}), max_length {a.max_length}; batch {a.batch} "
          f"pairs, {a.steps} steps (median over the last {a.steps - a.warmup}), AdamW lr {a.lr}, "
          f"beta {a.beta}")
    print(f"load average (1 min) before the run: {load0:.1f}"
          + (" -- other processes shared these cores: absolute times are stretched; the rows "
             "ran interleaved step by step, so the ratios are the figures to read"
             if load0 > 0.5 else ""))
    print(f"precision: {auto.line()}; ran: {', '.join(precisions)}"
          + ("" if "bf16" in precisions else " (bf16 not run: not fast on this CPU)"))
    for prec, rows in tables:
        print(f"\n### {prec}\n")
        print_table(rows, why_missing)
        print()
        for line in verdict(rows, a.threads):
            print(f"- {line}")
    if probe:
        print(f"- TRL: {probe}")
        print("- TRL overrides of its defaults, to match: gradient_checkpointing=False (default "
              "True), bf16 as above (default True), lr schedule constant, adam_beta2=0.95, fused "
              "AdamW")
    tmp.cleanup()


if __name__ == "__main__":
    main()
