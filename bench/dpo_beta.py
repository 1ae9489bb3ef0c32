"""The policy shift of DPO, measured: one SFT model, one set of pairs, DPO at several beta (and
with RPO's NLL term), and for each run the KL to the reference, the drift of the chosen and
rejected log-probs, held-out pass@1 and general-text perplexity, in one table.

    python bench/dpo_beta.py                       # after `make demo`: runs/demo/{sft,pairs,corpus}
    python bench/dpo_beta.py --betas 0.01,0.1,0.5 --rpo 1.0 --steps 150

Why it matters (the exam question): DPO's loss only asks that the chosen answer's log-ratio
to the reference beat the rejected one's; it says nothing about where both go. With a small
beta the implied reward beta * log(pi/pi_ref) needs a large log-ratio to move the loss, so the
policy travels far from the reference (a large KL): probability leaves both answers (both
log-probs fall), goes to sequences no pair ever showed, and what the reference knew (general
text, held-out skill) can be lost: a catastrophic policy shift. beta is the weight of the KL
term in the objective DPO solves (max E[r] - beta KL(pi || pi_ref)); a larger beta keeps the
policy near the reference. RPO's NLL on the chosen answers pins their likelihood directly.

KL(pi || pi_ref) is estimated the honest way, by sampling from the policy (temperature 1, no
top-k/p) and averaging log pi - log pi_ref over the sampled tokens of each answer (summed per
answer: a sequence-level KL, in nats), on held-out prompts. The "implicit KL" DPO logs per step
is a log-ratio on the training answers, which the policy did not sample.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmforge.chat import Rendered, prompt_ids  # noqa: E402
from lmforge.config import DpoCfg, TaskEvalCfg, load_config  # noqa: E402
from lmforge.data.sft import collate  # noqa: E402
from lmforge.eval.codegen import eval_splits  # noqa: E402
from lmforge.generate import generate_batch  # noqa: E402
from lmforge.losses.preference import sequence_logps  # noqa: E402
from lmforge.models import load_model  # noqa: E402
from lmforge.stages import run_stage  # noqa: E402
from lmforge.tasks.synthetic_code import make_splits  # noqa: E402
from lmforge.tokenizer import load_tokenizer  # noqa: E402
from lmforge.train.forgetting import GeneralText, perplexity  # noqa: E402


def sampled_kl(policy: Any, ref: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int,
               seed: int = 0) -> tuple[float, float]:
    """(mean KL(pi || pi_ref) per answer in nats, mean answer length) from answers sampled
    from `policy` at temperature 1: the Monte Carlo estimate E_pi[log pi(y) - log pi_ref(y)]."""
    stop = list(policy.generation_config.eos_token_id or [])
    pad = tokenizer.pad_token_id
    ids = [prompt_ids(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    outs = generate_batch(policy, ids, stop, pad, max_new_tokens, 64, temperature=1.0, seed=seed,
                          label="kl samples")
    seqs = [Rendered(p + o, [0] * len(p) + [1] * len(o)) for p, o in zip(ids, outs) if o]
    kls: list[float] = []
    for i in range(0, len(seqs), 32):
        chunk = seqs[i:i + 32]
        b = collate(chunk, [[j] for j in range(len(chunk))], pad, seq_ids=range(len(chunk)))
        with torch.no_grad():
            lp = [sequence_logps(m(input_ids=b["input_ids"], position_ids=b["position_ids"],
                                   use_cache=False).logits, b["targets"], b["seq_ids"], len(chunk))[0]
                  for m in (policy, ref)]
        kls += (lp[0] - lp[1]).tolist()
    lengths = [len(o) for o in outs if o]
    return sum(kls) / max(len(kls), 1), sum(lengths) / max(len(lengths), 1)


def ref_val_logps(run: Path) -> tuple[float, float] | None:
    """Mean reference log-prob of the held-out chosen and rejected answers (from the cache)."""
    from safetensors.torch import load_file

    files = sorted((run / "ref_cache").glob("ref-val-*.safetensors"))  # one per data/precision
    if not files:
        return None
    t = load_file(str(files[0]))["logps"]
    return float(t[:, 0].mean()), float(t[:, 1].mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sft", default="runs/demo/sft")
    ap.add_argument("--pairs", default="runs/demo/pairs")
    ap.add_argument("--corpus", default="runs/demo/corpus", help="general text for perplexity")
    ap.add_argument("--config", default=str(ROOT / "configs/dpo/demo.yaml"))
    ap.add_argument("--betas", default="0.01,0.1,0.5")
    ap.add_argument("--rpo", type=float, default=1.0, help="also beta 0.1 with this rpo_alpha")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--n-eval", type=int, default=50, help="held-out problems per group")
    ap.add_argument("--kl-prompts", type=int, default=64)
    ap.add_argument("--out", default="runs/bench-dpo-beta")
    a = ap.parse_args()
    out = Path(a.out)
    runs: list[tuple[str, list[str]]] = [(f"beta {b}", [f"beta={b}", "rpo_alpha=0"])
                                         for b in a.betas.split(",")]
    if a.rpo:
        runs.append((f"beta 0.1 + RPO {a.rpo}", ["beta=0.1", f"rpo_alpha={a.rpo}"]))
    splits = make_splits(0, 4000, a.n_eval)
    prompts = [p.prompt for ps in splits.heldout.values() for p in ps][:a.kl_prompts]
    ref = load_model(a.sft).eval()
    tok = load_tokenizer(Path(a.sft) / "final" if (Path(a.sft) / "final").exists() else a.sft)
    general = GeneralText.from_corpus(Path(a.corpus), tok, out / "general", 256)
    ppl = lambda m: perplexity(m, general.val, 8, 8, torch.device("cpu"))  # noqa: E731
    stop = list(ref.generation_config.eos_token_id or [])
    heldout = lambda m: eval_splits(m, tok, splits, stop, TaskEvalCfg(batch_size=96))[0]  # noqa: E731
    rows = [{"run": "SFT (the reference)", "kl": 0.0, "len": math.nan, "pass": heldout(ref),
             "ppl": ppl(ref), "dc": 0.0, "dr": 0.0, "acc": None}]
    for name, over in runs:
        run = out / name.replace(" ", "_").replace("+", "")
        cfg = load_config(DpoCfg, a.config, [f"model.path={a.sft}", f"data.train={a.pairs}",
                                             f"run.dir={run}", f"train.max_steps={a.steps}",
                                             "train.time_budget_s=null", "eval.task=null",
                                             f"ref.cache_dir={out / 'ref_cache'}",  # computed once
                                             "log.progress=off", *over])
        s = run_stage("dpo", cfg)
        pol = load_model(s["final_dir"]).eval()
        kl, length = sampled_kl(pol, ref, tok, prompts, 96)
        rv, val = ref_val_logps(out), s.get("final_val", {})
        rows.append({"run": name, "kl": kl, "len": length, "ppl": ppl(pol),
                     "pass": heldout(pol), "acc": val.get("val_rewards_accuracy"),
                     "dc": val.get("val_logps_chosen", math.nan) - rv[0] if rv else math.nan,
                     "dr": val.get("val_logps_rejected", math.nan) - rv[1] if rv else math.nan})
    groups = [f"d{d}" for d in sorted(splits.heldout)] + ["unseen"]
    print(f"\nDPO from {a.sft} on {a.pairs}, {a.steps} steps each; pass@1 greedy on {a.n_eval} "
          "held-out problems per group; KL sampled at temperature 1 on "
          f"{len(prompts)} held-out prompts\n")
    print("| run | KL(pi||ref) nats/answer | d logp chosen | d logp rejected | val pref acc | "
          + " | ".join(groups) + " | all | general ppl |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(groups) + "---:|---:|")
    for r in rows:
        p = r["pass"]
        acc = "-" if r["acc"] is None else f"{r['acc']:.0%}"
        print(f"| {r['run']} | {r['kl']:.2f} | {r['dc']:+.1f} | {r['dr']:+.1f} | {acc} | "
              + " | ".join(f"{p.get(g, math.nan):.1%}" for g in groups)
              + f" | {sum(p[g] * p['n_per_group'][g] for g in groups) / sum(p['n_per_group'].values()):.1%}"
              + f" | {r['ppl']:.1f} |")


if __name__ == "__main__":
    main()
