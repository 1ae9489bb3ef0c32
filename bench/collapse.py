"""Model collapse, measured (Shumailov et al. 2024, "AI models collapse when trained on
recursively generated data"): generation k+1 is trained from scratch on text sampled from
generation k, and the tails of the distribution go first.

Generation 0 is `lmforge pretrain` (the demo's nano llama) on real text: `--rows` chunks of
`--seq` tokens of the demo corpus (the Python standard library). Each later generation is the
same recipe (same size, steps, seed) on the same number of tokens, sampled at temperature 1
from the generation before it, in two chains:

- replace: only the previous generation's samples;
- mix: half the previous generation's samples, half real rows (a fresh random half of
  generation 0's real set each generation): real data mixed back in.

Per generation: held-out perplexity on real text (the corpus's validation split, the same
windows for every generation; final/ is the last step, never chosen by this loss), self-BLEU
and distinct-1/2 of `--eval-rows` of its samples (diversity: higher self-BLEU and lower
distinct-n mean more alike), and vocabulary coverage: the share of the token types of the
real training set that appear anywhere in its samples. A "real" row gives the same numbers
for real rows. Writes results.json, collapse.png and report.md to --out.

    python bench/collapse.py                      # ~8 min on 2 CPU cores (9 trainings)
    python bench/collapse.py --quick              # plumbing: small sets, 2 generations
    python bench/collapse.py --report-only        # table and plot from results.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine, write_report  # noqa: E402

CHAINS = ("replace", "mix")


def stage(name: str, config: Path | None, over: list[str]) -> dict[str, Any]:
    from lmforge.config import load_config
    from lmforge.stages import STAGES, run_stage

    return run_stage(name, load_config(STAGES[name], config, over))


def inputs(a: argparse.Namespace) -> tuple[Path, Path]:
    """The demo's corpus and tokenizer, made here when `make demo` has not run."""
    corpus, tok = a.corpus, a.tokenizer
    if not (corpus / "summary.json").exists():
        corpus = a.out / "corpus"
        if not (corpus / "summary.json").exists():
            stage("corpus", ROOT / "configs/corpus/stdlib.yaml", [f"run.dir={corpus}"])
    if not (tok / "summary.json").exists():
        tok = a.out / "tokenizer"
        if not (tok / "summary.json").exists():
            stage("tokenizer", ROOT / "configs/tokenizer/demo.yaml",
                  [f"run.dir={tok}", f"corpus={corpus}"])
    return corpus, tok


def real_rows(corpus: Path, tokenizer: Any, rows: int, seq: int, seed: int) -> list[list[int]]:
    """`rows` chunks of exactly `seq` token ids cut from randomly ordered training documents."""
    docs = [json.loads(x)["text"] for x in (corpus / "train.jsonl").open()]
    random.Random(seed).shuffle(docs)
    out: list[list[int]] = []
    for d in docs:
        ids = tokenizer.backend_tokenizer.encode(d, add_special_tokens=False).ids
        out += [ids[i:i + seq] for i in range(0, len(ids) - seq + 1, seq)]
        if len(out) >= rows:
            return out[:rows]
    sys.exit(f"{corpus}: only {len(out)} chunks of {seq} tokens; lower --rows or --seq")


def write_corpus(d: Path, rows: list[list[int]], tokenizer: Any, val: Path) -> None:
    """A corpus stage directory: the rows as documents, the real validation split as val."""
    d.mkdir(parents=True, exist_ok=True)
    with (d / "train.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps({"text": tokenizer.decode(r)}) + "\n")
    (d / "val.jsonl").write_bytes(val.read_bytes())


def train(a: argparse.Namespace, run: Path, corpus: Path, tok: Path) -> dict[str, Any]:
    if (run / "summary.json").exists():
        return json.loads((run / "summary.json").read_text())  # a finished generation
    return stage("pretrain", ROOT / "configs/pretrain/demo.yaml", [
        f"run.dir={run}", f"data.corpus={corpus}", f"data.tokenizer={tok}",
        f"data.seq_len={a.seq}", f"train.max_steps={a.steps}", "train.time_budget_s=null",
        "train.eval_every=0", f"train.eval_batches={a.eval_batches}", "train.final=last",
        "train.save_every=0", "optim.warmup_steps=20", "log.progress=off", "log.every=1000"])


def sample(final: Path, rows: int, seq: int, seed: int) -> list[list[int]]:
    """`rows` rows of `seq` tokens at temperature 1, each begun at end-of-text (as every
    training document begins); end-of-text inside a row just starts another document."""
    import torch

    from lmforge.models import load_model
    from lmforge.rl.rollout import HfEngine, SamplingCfg
    from lmforge.tokenizer import load_tokenizer

    model, tok = load_model(str(final)).eval(), load_tokenizer(str(final))
    engine = HfEngine(model, tok, stop_ids=[], pad_id=tok.pad_token_id or 0)
    cfg = SamplingCfg(max_new_tokens=seq, temperature=1.0, batch_size=256)
    ro = engine.generate([[tok.eos_token_id]] * rows, cfg, torch.Generator().manual_seed(seed))
    return [ro.completion(i) for i in range(rows)]


def measure(rows: list[list[int]], tokenizer: Any, real_types: set[int], eval_rows: int
            ) -> dict[str, float]:
    from lmforge.eval.text_metrics import distinct_n, self_bleu

    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in rows[:eval_rows]]
    types = {t for r in rows for t in r}
    return {"self_bleu": round(self_bleu(texts), 2), "distinct_1": round(distinct_n(texts, 1), 4),
            "distinct_2": round(distinct_n(texts, 2), 4),
            "coverage": round(len(types & real_types) / len(real_types), 4)}


def chain(a: argparse.Namespace, name: str, gen0: dict[str, Any], real: list[list[int]],
          tokenizer: Any, tok: Path, val: Path, real_types: set[int]) -> list[dict[str, Any]]:
    """Generations 1..G of one chain, each trained on samples of the one before."""
    out, prev = [], gen0
    for k in range(1, a.generations + 1):
        t0 = time.perf_counter()
        synthetic = prev["samples"]
        if name == "mix":
            half = len(real) // 2
            rng = random.Random(f"{a.seed}/{k}")
            data = rng.sample(synthetic, len(real) - half) + rng.sample(real, half)
        else:
            data = synthetic
        d = a.out / f"{name}-{k}"
        write_corpus(d / "corpus", data, tokenizer, val)
        s = train(a, d / "pretrain", d / "corpus", tok)
        samples = sample(d / "pretrain" / "final", a.rows, a.seq, a.seed + k)
        row = {"chain": name, "generation": k, "val_ppl": round(s["final_val_ppl"], 2),
               **measure(samples, tokenizer, real_types, a.eval_rows), "samples": samples}
        out.append(row)
        prev = row
        print(f"{name} generation {k}: ppl {row['val_ppl']}, self-BLEU {row['self_bleu']}, "
              f"distinct-2 {row['distinct_2']}, coverage {row['coverage']:.1%} "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| chain | gen | trained on | held-out ppl (real) | self-BLEU | distinct-1 | "
             "distinct-2 | vocab coverage |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        on = ("-" if r["chain"] == "real" else "real" if r["generation"] == 0 else
              {"replace": "samples of gen k-1", "mix": "1/2 samples + 1/2 real"}[r["chain"]])
        ppl = "-" if r["val_ppl"] is None else f"{r['val_ppl']:.2f}"
        lines.append(f"| {r['chain']} | {r['generation'] if r['chain'] != 'real' else '-'} | "
                     f"{on} | {ppl} | {r['self_bleu']:.2f} | {r['distinct_1']:.3f} | "
                     f"{r['distinct_2']:.3f} | {r['coverage']:.1%} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (("val_ppl", "held-out perplexity (real)"), ("self_bleu", "self-BLEU of samples"),
            ("distinct_2", "distinct-2 of samples"), ("coverage", "vocabulary coverage"))
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    real = next(r for r in rows if r["chain"] == "real")
    gen0 = next(r for r in rows if r["chain"] == "gen0")
    for ax, (key, title) in zip(axes, keys):
        for name in CHAINS:
            pts = [gen0] + [r for r in rows if r["chain"] == name]
            ax.plot([r["generation"] for r in pts], [r[key] for r in pts], marker="o", label=name)
        if real[key] is not None:
            ax.axhline(real[key], color="grey", linestyle="--", label="real text")
        ax.set_title(title)
        ax.set_xlabel("generation")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_all(a: argparse.Namespace) -> list[dict[str, Any]]:
    from lmforge.tokenizer import load_tokenizer

    corpus, tok = inputs(a)
    tokenizer = load_tokenizer(str(tok))
    real = real_rows(corpus, tokenizer, a.rows, a.seq, a.seed)
    real_types = {t for r in real for t in r}
    t0 = time.perf_counter()
    d = a.out / "gen-0"
    write_corpus(d / "corpus", real, tokenizer, corpus / "val.jsonl")
    s = train(a, d / "pretrain", d / "corpus", tok)
    gen0 = {"chain": "gen0", "generation": 0, "val_ppl": round(s["final_val_ppl"], 2),
            "samples": sample(d / "pretrain" / "final", a.rows, a.seq, a.seed)}
    gen0.update(measure(gen0["samples"], tokenizer, real_types, a.eval_rows))
    print(f"generation 0 (real): ppl {gen0['val_ppl']}, self-BLEU {gen0['self_bleu']}, "
          f"coverage {gen0['coverage']:.1%} ({time.perf_counter() - t0:.0f}s)", flush=True)
    rows = [{"chain": "real", "generation": 0, "val_ppl": None,
             **measure(real, tokenizer, real_types, a.eval_rows)}, gen0]
    for name in CHAINS:
        rows += chain(a, name, gen0, real, tokenizer, tok, corpus / "val.jsonl", real_types)
    return [{k: v for k, v in r.items() if k != "samples"} for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=ROOT / "runs/demo/corpus")
    ap.add_argument("--tokenizer", type=Path, default=ROOT / "runs/demo/tokenizer")
    ap.add_argument("--out", type=Path, default=ROOT / "runs/bench-collapse")
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--rows", type=int, default=512, help="training rows per generation")
    ap.add_argument("--seq", type=int, default=128, help="tokens per row")
    ap.add_argument("--steps", type=int, default=200, help="pretrain steps per generation")
    ap.add_argument("--eval-rows", type=int, default=64, help="rows for self-BLEU, distinct-n")
    ap.add_argument("--eval-batches", type=int, default=32, help="held-out windows / 8")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="2 generations of small sets")
    ap.add_argument("--report-only", action="store_true", help="from --out/results.json")
    a = ap.parse_args()
    if a.quick:
        a.generations, a.rows, a.steps, a.eval_rows, a.eval_batches = 2, 96, 20, 16, 4
    a.out.mkdir(parents=True, exist_ok=True)
    results = a.out / "results.json"
    if a.report_only:
        rows = json.loads(results.read_text())["rows"]
    else:
        rows = run_all(a)
        results.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()},
                                       "rows": rows}, indent=1))
    head = (f"{machine()}; nano llama, {a.rows} rows x {a.seq} tokens per generation, "
            f"{a.steps} steps each; samples at temperature 1")
    plot(rows, a.out / "collapse.png")
    write_report(a.out, "Model collapse", head, table(rows), "collapse.png",
                 "collapse per generation")


if __name__ == "__main__":
    main()
