"""The GPT-2 MBPP recipes with and without the fast backends: time and memory per backend pair.

The exercise "repeat the DPO training with unsloth and vLLM and compare memory (CPU and GPU)
and run time with and without them", as one command. Each row runs the whole recipe
(configs/gpt2-mbpp-grpo.yaml by default: SFT, pairs, DPO, GRPO and an eval after each; or
configs/gpt2-mbpp-dpo.yaml with --recipe dpo) in its own `lmforge run` process, under one
training/generation backend pair:

- hf/hf: lmforge's own training loop and KV-cached sampler;
- hf/vllm: GRPO rollouts (`grpo.rollout.backend=vllm`) and every eval's sampling
  (`eval-*.backend=vllm`) through vLLM; the pairs stage samples with hf (it has no backend
  switch). vLLM lives in its own venv (`make vllm`), so these rows run that venv's python;
- unsloth/vllm: `train.backend=unsloth` for SFT, DPO and GRPO, the evals through vLLM as in
  hf/vllm; GRPO's rollouts through the vLLM engine Unsloth starts inside the policy
  (`grpo.rollout.backend=unsloth`: one copy of the base weights, the adapter handed over after
  each step) when the stages train adapters (`--lora lora|qlora`), else through a colocated
  vLLM as in hf/vllm (the recipe fine-tunes GPT-2 fully); only where CUDA and unsloth are
  importable, else the row says why.
`--lora M` sets every training stage's lora.method in every row, so rows stay comparable.

Measured per row: peak RSS of the whole process tree (the `lmforge run` process and every
child: vLLM's engine core and the sandbox workers), polled from /proc every 0.2 s, so a child
that lives less than that can be missed; peak GPU memory from the training stages' own
`peak_mem_mb` (torch's max allocated; vLLM's KV cache is outside it), "—" off CUDA; the wall
time of every stage, split into generation and training where the stage reports it (eval and
pairs: sampling seconds; GRPO: per-step gen/train means times steps); the final pass@1 of
each eval after an aligned model.

Default scale is hermetic and offline: a from-scratch GPT-2 (d 128, 2 heads: head size 64,
which vLLM's CPU attention takes), a tokenizer trained here, and the 17 MBPP-shaped problems of
tests/stages/test_recipes.py with the recipe test's shrunk step counts. `--mbpp PATH --limit N`
uses N problems of each MBPP split from a real mbpp.jsonl instead (e.g. ../shared/data/mbpp).
`--full` runs the recipe as written (hub gpt2, 500 test problems): a GPU machine's job.

    python bench/backends.py                          # hf/hf, hf/vllm, unsloth/vllm; tiny
    python bench/backends.py --rows hf/hf,hf/vllm --threads 2
    python bench/backends.py --mbpp ../shared/data/mbpp/mbpp.jsonl --limit 20
    python bench/backends.py --full --recipe dpo      # the real recipe (hub or shared data)
    python bench/backends.py --full --lora qlora      # QLoRA everywhere: Unsloth's own vLLM
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.conftest: the recipe test's tokenizer, reused here

import torch  # noqa: E402

from lmforge.train.precision import cpu_features, cpu_name  # noqa: E402

VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
ROWS = ("hf/hf", "hf/vllm", "unsloth/vllm")
TRAIN_STAGES = ("sft", "dpo", "grpo")
PAGE = os.sysconf("SC_PAGE_SIZE")


def mbpp_rows(path: Path | None, limit: int) -> list[dict[str, Any]]:
    """The recipe test's 17 MBPP-shaped problems (ids 11-14 test, 511-513 validation, 601-610
    train), or the first `limit` of each split of a real mbpp.jsonl."""
    if path is None:
        from tests.stages.test_recipes import _row

        return [_row(t, t % 7) for t in [*range(11, 15), *range(511, 514), *range(601, 611)]]
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    splits = [(11, 510), (511, 600), (601, 974)]  # MBPP's test, validation and train ids
    return [r for lo, hi in splits for r in [r for r in rows if lo <= r["task_id"] <= hi][:limit]]


def build_tiny(work: Path, mbpp: Path | None, limit: int) -> tuple[Path, Path]:
    """(gpt2 dir, mbpp.jsonl) for the hermetic scale."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmforge.models import save_hf
    from tests.conftest import make_chat_tokenizer

    data = work / "mbpp.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in mbpp_rows(mbpp, limit)))
    tok = make_chat_tokenizer(work / "tok")
    conf = GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=128, n_layer=2, n_head=2,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    save_hf(GPT2LMHeadModel(conf), work / "gpt2", tok)
    return work / "gpt2", data


def evals_of(recipe: str) -> list[str]:
    return ["eval-sft", "eval-dpo"] + (["eval-grpo"] if recipe == "grpo" else [])


def scale_overrides(recipe: str, gpt2: Path, data: Path) -> list[str]:
    """The recipe test's shrunk settings (tests/stages/test_recipes.py `_run_recipe`)."""
    ov = [f"sft.model.path={gpt2}", f"sft.data.train=mbpp:{data}", f"sft.data.val=mbpp:{data}",
          "sft.train.max_steps=2", "sft.train.eval_every=0",
          f"pairs.source={data}", "pairs.n=2", "pairs.max_new_tokens=16",
          "dpo.train.max_steps=2", "dpo.train.eval_every=0", "dpo.data.val_fraction=0.3",
          "report.max_new_tokens=8"]
    ov += [f"{e}.{o}" for e in evals_of(recipe) for o in
           ("n=2", "k=[1,2]", "max_new_tokens=16", "batch_size=8", f"sources.mbpp={data}")]
    if recipe == "grpo":
        ov += [f"grpo.data.train=mbpp:{data}", "grpo.train.max_steps=2",
               "grpo.rollout.group_size=2", "grpo.rollout.prompts_per_step=2",
               "grpo.rollout.max_new_tokens=16", "grpo.train.micro_batch_size=2",
               "grpo.dynamic_sampling_rounds=1"]
    return ov


def full_overrides(recipe: str, mbpp: Path | None) -> list[str]:
    """The recipe as written; with a local mbpp.jsonl, every MBPP source points at it."""
    if mbpp is None:
        return []
    ov = [f"sft.data.train=mbpp:{mbpp}", f"pairs.source={mbpp}"]
    ov += [f"{e}.sources.mbpp={mbpp}" for e in evals_of(recipe)]
    return ov + ([f"grpo.data.train=mbpp:{mbpp}"] if recipe == "grpo" else [])


def backend_overrides(row: str, recipe: str, lora: str | None = None) -> list[str]:
    train, gen = row.split("/")
    stages = [s for s in TRAIN_STAGES if recipe == "grpo" or s != "grpo"]
    ov = [f"{s}.train.backend={train}" for s in stages]
    ov += [f"{s}.lora.method={lora}" for s in stages if lora]
    ov += [f"{e}.backend={gen}" for e in evals_of(recipe)]
    # Unsloth's own vLLM integration carries a LoRA adapter; a full fine-tune's rollouts go
    # through the colocated engine, which takes the whole weights
    adapters = lora in ("lora", "qlora")
    rollout = "unsloth" if train == "unsloth" and adapters else gen
    return ov + ([f"grpo.rollout.backend={rollout}"] if recipe == "grpo" else [])


def probe(py: Path, code: str) -> str | None:
    """None when `code` runs under `py`, else the reason in one line."""
    if not py.exists():
        return f"{py.relative_to(ROOT)} missing: make vllm"
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=300)
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["failed"])[-1][:120]


def why_not(row: str) -> str | None:
    train, gen = row.split("/")
    if gen == "vllm" and (e := probe(VLLM_PY, "import vllm")):
        return f"no vLLM: {e}"
    if train == "unsloth":
        return probe(VLLM_PY, "import torch, sys; sys.exit(0 if torch.cuda.is_available() else "
                              "'no CUDA device: unsloth needs an NVIDIA GPU'); import unsloth")
    return None


def tree_rss(root_pid: int) -> int:
    """Resident bytes of `root_pid` and all its descendants, from /proc."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            kids.setdefault(ppid, []).append(int(d))
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        todo += kids.get(pid, [])
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            pass
    return total


def run_measured(cmd: list[str], env: dict[str, str], log: Path,
                 timeout: float) -> tuple[int, float, int]:
    """(exit code, wall seconds, peak tree RSS bytes) of one child, its output to `log`."""
    peak = [0]
    with log.open("w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        done = threading.Event()

        def poll() -> None:
            while not done.wait(0.2):
                peak[0] = max(peak[0], tree_rss(proc.pid))

        threading.Thread(target=poll, daemon=True).start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        done.set()
    return rc, time.perf_counter() - t0, peak[0]


def gen_seconds(s: dict[str, Any]) -> float | None:
    """Sampling seconds of a pairs summary (generation_s) or an eval one (per task generate_s)."""
    if isinstance(s.get("generation_s"), (int, float)):
        return float(s["generation_s"])
    vals = [t["generate_s"] for t in (s.get("tasks") or {}).values()
            if isinstance(t, dict) and isinstance(t.get("generate_s"), (int, float))]
    return float(sum(vals)) if vals else None


def stage_split(name: str, s: dict[str, Any]) -> tuple[float | None, float | None]:
    """(generation s, training s) of one stage summary; None where it does not say."""
    if name == "grpo":
        per = s.get("time_per_step_s") or {}
        steps = s.get("steps") or 0
        g, t = per.get("gen"), per.get("train")
        return (g * steps if g is not None else None, t * steps if t is not None else None)
    if name in TRAIN_STAGES:
        return None, s.get("train_time_s")
    return gen_seconds(s), None


def find_key(d: Any, key: str) -> list[float]:
    if isinstance(d, dict):
        return [float(v) for k, v in d.items() if k == key and isinstance(v, (int, float))] + \
            [x for v in d.values() for x in find_key(v, key)]
    if isinstance(d, list):
        return [x for v in d for x in find_key(v, key)]
    return []


def collect(run: Path, recipe: str, cuda: bool) -> dict[str, Any]:
    sums = {p.parent.name: json.loads(p.read_text()) for p in sorted(run.glob("*/summary.json"))}
    out: dict[str, Any] = {"stages": {}, "gpu_mb": None, "pass@1": {}}
    for name, s in sums.items():
        g, t = stage_split(name, s)
        out["stages"][name] = {"wall": s.get("wall_time_s"), "gen": g, "train": t}
    mems = [m for n in TRAIN_STAGES if n in sums for m in find_key(sums[n], "peak_mem_mb")]
    if cuda and mems:
        out["gpu_mb"] = max(mems)
    for e in evals_of(recipe)[1:]:
        mb = sums.get(e, {}).get("tasks", {}).get("mbpp", {})
        out["pass@1"][e] = mb.get("pass@1")
    return out


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "—" if x is None else format(x, spec)


def table(results: list[dict[str, Any]], recipe: str) -> str:
    names = ["sft", "eval-sft", "pairs", "dpo", "eval-dpo"]
    names += ["grpo", "eval-grpo"] if recipe == "grpo" else []
    head = ["row", "peak RSS tree (MB)", "peak GPU (MB)", *[f"{n} s (gen/train)" for n in names],
            "total s", *[f"{e} pass@1" for e in evals_of(recipe)[1:]]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if r.get("skipped"):
            rest = " | ".join(["—"] * (len(head) - 2))
            lines.append(f"| {r['row']} | {r['skipped']} | {rest} |")
            continue
        cells = [r["row"], fmt(r["rss"] / 2**20, ".0f"), fmt(r["gpu_mb"], ".0f")]
        for n in names:
            st = r["stages"].get(n)
            cells.append("—" if st is None else
                         f"{fmt(st['wall'])} ({fmt(st['gen'])}/{fmt(st['train'])})")
        cells.append(fmt(r["wall"]) + ("" if r["rc"] == 0 else f" (exit {r['rc']})"))
        cells += [fmt(r["pass@1"].get(e), ".3f") for e in evals_of(recipe)[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def header(threads: int | None, recipe: str, scale: str) -> str:
    vllm = "absent"
    if VLLM_PY.exists():
        vllm = subprocess.run([str(VLLM_PY), "-c", "import vllm; print(vllm.__version__)"],
                              capture_output=True, text=True).stdout.strip()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"configs/gpt2-mbpp-{recipe}.yaml, {scale}; CPU: {cpu_name()} "
            f"[{' '.join(cpu_features())}], {os.cpu_count()} cores, threads "
            f"{threads or 'default'}; GPU: {gpu}; torch {torch.__version__}; vllm {vllm or '?'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {ROWS}")
    ap.add_argument("--recipe", choices=["dpo", "grpo"], default="grpo")
    ap.add_argument("--full", action="store_true", help="the real recipe (hub or --mbpp data)")
    ap.add_argument("--mbpp", type=Path,
                    help="a real mbpp.jsonl (e.g. ../shared/data/mbpp/mbpp.jsonl)")
    ap.add_argument("--limit", type=int, default=10, help="problems per MBPP split with --mbpp")
    ap.add_argument("--lora", choices=["full", "lora", "dora", "qlora"],
                    help="lora.method of every training stage in every row (default: the recipe's)")
    ap.add_argument("--threads", type=int, help="OMP/MKL threads of every row")
    ap.add_argument("--out", type=Path, help="keep the runs here (default: a temp dir)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per row")
    a = ap.parse_args()
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    if bad := [r for r in rows if r not in ROWS]:
        ap.error(f"--rows: unknown {bad}; choose from {ROWS}")
    work = a.out or Path(tempfile.mkdtemp(prefix="bench-backends-"))
    work.mkdir(parents=True, exist_ok=True)
    if a.full:
        base, scale = full_overrides(a.recipe, a.mbpp), "full scale"
    else:
        gpt2, data = build_tiny(work, a.mbpp, a.limit)
        base = scale_overrides(a.recipe, gpt2, data)
        scale = (f"tiny GPT-2 (d128, 2 layers), {len(data.read_text().splitlines())} "
                 f"{'MBPP' if a.mbpp else 'MBPP-shaped'} problems")
    scale += f", lora.method={a.lora} everywhere" if a.lora else ""
    env = dict(os.environ)
    if a.threads:
        env.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    results = []
    for row in rows:
        if reason := why_not(row):
            results.append({"row": row, "skipped": reason})
            print(f"{row}: skipped: {reason}", flush=True)
            continue
        py = VLLM_PY if "vllm" in row else Path(sys.executable)
        run = work / row.replace("/", "-")
        recipe = ROOT / f"configs/gpt2-mbpp-{a.recipe}.yaml"
        cmd = [str(py), "-m", "lmforge.cli", "run", str(recipe), f"dir={run}",
               *base, *backend_overrides(row, a.recipe, a.lora)]
        print(f"{row}: running with {py}", flush=True)
        # peak_mem_mb is torch's CUDA max allocated only where the row's torch sees a GPU
        cuda = probe(py, "import torch, sys; sys.exit(not torch.cuda.is_available())") is None
        rc, wall, rss = run_measured(cmd, env, work / f"{run.name}.log", a.timeout)
        if rc != 0:
            print(f"{row}: exit {rc}; log {work / f'{run.name}.log'}", flush=True)
        results.append({"row": row, "rc": rc, "wall": wall, "rss": rss,
                        **collect(run, a.recipe, cuda)})
    print("\n" + header(a.threads, a.recipe, scale) + "\n")
    print(table(results, a.recipe))
    print(f"\nruns and logs: {work}")


if __name__ == "__main__":
    main()
