"""`lmforge grpo` against TRL's `GRPOTrainer`: same model, prompts, reward and settings, on CPU.

    python bench/grpo_vs_trl.py [--steps 8] [--prompts 4] [--G 8] [--max-new-tokens 64]
    python bench/grpo_vs_trl.py --steps 3 --prompts 2 --G 4 --max-new-tokens 16   # a smoke run
    python bench/grpo_vs_trl.py --threads 1   # on a machine shared with other work

Each side runs in its own process (so its peak RSS is its own). The two start together but
run one at a time, taking turns at every optimizer step (bench/dpo_vs_trl.py's baton): their
steps interleave, so other load on the machine slows both alike and the ratios stay
meaningful where the absolute times do not.

Same on both sides: one from-config llama (lmforge's `tiny` preset, 5.3M parameters, vocab
8192, seed 0) saved once as an HF directory with a tokenizer trained here and lmforge's chat
template; generation_config.eos_token_id = [<|end|>, <|endoftext|>], which both stop at. The
prompts: `--steps x --prompts` synthetic-code training problems (lmforge.tasks.synthetic_code,
seed 0), each a one-turn chat with the signature `def name(arg):` put in the assistant's
mouth (lmforge's default `data.signature_prefill`), in lmforge's order (its seeded
permutation), so step k samples from the same prompts on both sides. TRL gets each prompt as
the rendered text, and the parent checks that TRL's tokenization of it is exactly the token
ids lmforge samples from. G completions per prompt, sampled at temperature 1.0 (top-p 1,
top-k off) up to `--max-new-tokens`, all P x G in one batch; one reward function: lmforge's
`code` reward (all_pass: the prompt's program with the completion run against its tests in
lmforge's sandbox, `sandbox.run_many`, 2 workers, 5 s timeout, 2 GB), which lmforge calls
itself and TRL calls through a plain reward callable; group advantages; one optimizer step
per batch of rollouts; micro-batches of `--micro` completions accumulated; fp32; AdamW
(fused, betas 0.9/0.95, eps 1e-8, no weight decay), constant lr, clip 1.0; KL to a frozen
copy of the starting model with weight `--beta` (0.04 by default: both hold and run a
reference; `--beta 0` drops it on both); no dropout, no gradient checkpointing, no vLLM.

The options, side by side (lmforge's config keys -> TRL 1.16's GRPOConfig fields, names
checked in trl/trainer/grpo_config.py):

- rollout.group_size = G -> num_generations = G
- rollout.prompts_per_step = P, train.micro_batch_size = micro -> per_device_train_batch_size =
  micro, gradient_accumulation_steps = P*G / micro (so steps_per_generation = P*G / micro and
  generation_batch_size = P*G: one generation per optimizer step, as ours)
- rollout.max_new_tokens -> max_completion_length
- rollout.temperature / top_p / top_k (0 = off) -> temperature / top_p / top_k (0 = off)
- rollout.backend = hf (our KV-cached sampler) -> use_vllm = False (transformers `generate`;
  use_transformers_continuous_batching stays False; both checked and printed)
- advantage.kind = group_std -> scale_rewards = "group" ((r - group mean) / group std)
- loss.aggregation = token_mean, exact across micro-batches (weight_of) -> loss_type = "dapo"
  (normalized by the active tokens of the whole generation batch, hence also exact; "bnpo"
  would average per micro-batch, "grpo" per sequence = our seq_mean_token_mean, "dr_grpo" =
  our seq_mean_token_sum_norm)
- loss.ratio_level = token -> importance_sampling_level = "token"
- loss.clip_low / clip_high = 0.2 / 0.2 -> epsilon / epsilon_high = 0.2 / 0.2
- loss.kl = k3, loss.beta -> beta (TRL's KL term is always k3)
- ref.kind = auto (a full model: a frozen copy, run live) -> with beta > 0, a reference model
  loaded from the same directory
- mu = 1 -> num_iterations = 1 (so neither computes old log-probs: the ratio is 1 on pass 1)
- loss.entropy_coef = 0 -> entropy_coef = 0 (both still compute entropies as a metric)
- loss.is_correction = auto (off for hf) -> vLLM importance sampling, unused without vLLM
- dynamic_sampling_rounds = 0 (every group kept) -> TRL keeps every group
- (ours trains on truncated completions) -> mask_truncated_completions = False
- optim betas 0.9/0.95, eps 1e-8, weight_decay 0, schedule constant -> adam_beta1/2,
  adam_epsilon, weight_decay, lr_scheduler_type = "constant", optim = "adamw_torch_fused"
- train.clip_grad = 1.0 -> max_grad_norm = 1.0
- train.precision = fp32 -> bf16 = False (TRL's default is True, even on a CPU), fp16 = False
- (ours has none) -> gradient_checkpointing = False, shuffle_dataset = False (our prompt
  order instead), disable_dropout = True, use_cpu = True

Reported, per optimizer step after `--warmup` steps (median; best in the notes): step = wall
time from the end of the previous step to the end of this one (everything either side does
between two optimizer updates); gen = sampling (lmforge: its logged `time/gen_s`, the rollout
engine's call; TRL: `_generate`, i.e. prompt tokenization, `model.generate`, decoding);
reward = scoring (lmforge: `time/reward_s`; TRL: `_calculate_rewards`, which calls the reward
callable); train = step - gen - reward (reference log-probs, advantages, batching, forward +
backward, optimizer, logging). Tokens/step: completion tokens sampled (the stop token
included); peak MB: the process's ru_maxrss (the sandbox's programs run in processes of their
own and count on neither side).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TARGET_TIME, TARGET_MEM = 0.50, 1.00  # lmforge / TRL, each at most
SIDES = ("lmforge", "TRL")


def _dpo_bench() -> Any:
    """bench/dpo_vs_trl.py's turn-taking and measuring helpers (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("dpo_vs_trl", ROOT / "bench" / "dpo_vs_trl.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


_dpo = _dpo_bench()
Baton, cpu_line, maxrss_mb, steps_of = _dpo.Baton, _dpo.cpu_line, _dpo.maxrss_mb, _dpo.steps_of


# --------------------------------------------------------------------------- setup (parent)


def code_items(a: argparse.Namespace) -> list[Any]:
    """The training prompts exactly as `lmforge grpo` loads them for the config written below."""
    from lmforge.tasks.synthetic_code import make_splits, to_code_items

    return to_code_items(make_splits(0, a.steps * a.prompts, 1).train, signature_prefill=True)


def item_order(a: argparse.Namespace, n: int) -> list[int]:
    """The items lmforge's rounds draw, in order (its Rounds.item_at on the same seed)."""
    from lmforge.rl.rounds import Rounds

    fake = SimpleNamespace(items=range(n), cfg=SimpleNamespace(train=SimpleNamespace(seed=0)))
    return [Rounds.item_at(fake, i) for i in range(a.steps * a.prompts)]  # type: ignore[arg-type]


def make_setup(work: Path, a: argparse.Namespace) -> dict[str, Any]:
    """Tokenizer + model dir, the prompts (checked to tokenize alike), lmforge's config."""
    import yaml

    from lmforge.config import ModelCfg
    from lmforge.eval.harness import Generator
    from lmforge.models import build_model, count_params, save_hf

    items = code_items(a)
    tok = _dpo.bench_tokenizer([it.prompt for it in items] + [it.head + it.reference for it in items],
                               work)
    model = build_model(ModelCfg(preset=a.preset), tok, seed=0)
    stops = [tok.convert_tokens_to_ids("<|end|>"), tok.eos_token_id]
    model.generation_config.eos_token_id = stops  # TRL stops at these; lmforge adds them too
    save_hf(model, work / "model", tok)
    gen = Generator(model, tok, chat=True)
    order = item_order(a, len(items))
    rows, lengths = [], []
    for i in order:
        it = items[i]
        ids = gen.prompt_ids(it.prompt, it.head)
        text = tok.apply_chat_template([{"role": "user", "content": it.prompt}], tokenize=False,
                                       add_generation_prompt=True) + it.head
        if tok(text)["input_ids"] != ids:
            raise SystemExit(f"prompt {it.task_id}: TRL's tokenization of the rendered text "
                             "differs from the ids lmforge samples from")
        rows.append({"prompt": text, "item": i})
        lengths.append(len(ids))
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "model": {"path": str(work / "model")},
        "data": {"train": "synthetic_code", "signature_prefill": True},
        "task": {"seed": 0, "n_train": a.steps * a.prompts, "n_eval": 1},
        "rollout": {"backend": "hf", "group_size": a.G, "prompts_per_step": a.prompts,
                    "max_new_tokens": a.max_new_tokens, "temperature": 1.0, "top_p": 1.0,
                    "top_k": 0, "batch_size": a.prompts * a.G},
        "rewards": [{"kind": "code", "mode": "all_pass", "weight": 1.0}],
        "advantage": {"kind": "group_std", "whiten": False},
        "loss": {"ratio_level": "token", "clip_low": 0.2, "clip_high": 0.2,
                 "aggregation": "token_mean", "kl": "k3", "beta": a.beta, "entropy_coef": 0.0,
                 "is_correction": "auto"},
        "mu": 1, "dynamic_sampling_rounds": 0, "ref": {"kind": "auto"},
        "optim": {"lr": a.lr, "weight_decay": 0.0, "betas": [0.9, 0.95], "eps": 1e-8,
                  "schedule": "constant", "warmup_steps": 0},
        "train": {"max_steps": a.steps, "micro_batch_size": a.micro, "grad_accum": 1,
                  "precision": "fp32", "clip_grad": 1.0, "eval_every": 0, "resume": "never",
                  "seed": 0},
        "log": {"every": 1, "progress": "off"},
        "eval": {"task": None},
    }
    (work / "grpo.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return {"params": count_params(model)[1], "vocab": len(tok), "stops": stops,
            "prompt_min": min(lengths), "prompt_mean": statistics.mean(lengths),
            "prompt_max": max(lengths)}


def sandbox_env() -> Any:
    """The sandbox settings `lmforge grpo` uses by default (GrpoCfg.sandbox), for TRL's reward."""
    from lmforge import sandbox
    from lmforge.rl.config import GrpoCfg
    from lmforge.rl.rewards import Env

    sb = GrpoCfg.model_fields["sandbox"].default
    return Env(sandbox.Limits(timeout_s=sb.timeout_s, memory_mb=sb.memory_mb), sb.workers)


# --------------------------------------------------------------------------- one side (child)


def run_lmforge(a: argparse.Namespace, work: Path, baton: Baton) -> dict[str, Any]:
    import lmforge.train.loop as loop
    from lmforge.cli import main

    out: dict[str, Any] = {"resumed": [], "ends": []}

    def timed_step(self: Any) -> Any:
        if not out["resumed"]:
            out["base_mb"] = maxrss_mb()  # policy, reference, engine and prompts loaded
            out["resumed"].append(baton.turn())
        r = orig_step(self)
        out["ends"].append(time.perf_counter())
        out["resumed"].append(baton.turn())
        return r

    orig_step, loop.Trainer.train_step = loop.Trainer.train_step, timed_step
    run_dir = work / "lmforge"
    rc = main(["grpo", str(work / "grpo.yaml"), f"run.dir={run_dir}"]
              + ([f"train.threads={a.threads}"] if a.threads else []))
    if rc != 0:
        raise SystemExit(f"lmforge grpo exited {rc}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/gen_s" in r]
    if len(rows) != a.steps:
        raise SystemExit(f"expected {a.steps} logged steps, found {len(rows)}")
    n = a.prompts * a.G
    summary = json.loads((run_dir / "summary.json").read_text())
    return {**steps_of(out["resumed"], out["ends"], a.warmup), "base_mb": out["base_mb"],
            "gen": [r["time/gen_s"] for r in rows], "reward": [r["time/reward_s"] for r in rows],
            "own_train": [r["time/train_s"] for r in rows],
            "tokens": [r["completion/len"] * n for r in rows],
            "rewards": [r["reward/mean"] for r in rows],
            "truncated": [r["completion/truncated"] for r in rows],
            "reference": summary.get("reference"), "backend": "hf (lmforge's KV-cached sampler)"}


def trl_config(a: argparse.Namespace, out: Path) -> Any:
    from trl import GRPOConfig

    n = a.prompts * a.G
    return GRPOConfig(
        output_dir=str(out), max_steps=a.steps, per_device_train_batch_size=a.micro,
        gradient_accumulation_steps=n // a.micro, num_generations=a.G,
        max_completion_length=a.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        use_vllm=False, beta=a.beta, epsilon=0.2, epsilon_high=0.2, loss_type="dapo",
        scale_rewards="group", importance_sampling_level="token", num_iterations=1,
        mask_truncated_completions=False, entropy_coef=0.0, shuffle_dataset=False,
        learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, optim="adamw_torch_fused",
        max_grad_norm=1.0, gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True,
        disable_dropout=True, seed=0, dataloader_num_workers=0, logging_steps=1,
        save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        log_completions=False)


def run_trl(a: argparse.Namespace, work: Path, baton: Baton) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    from lmforge.rl.config import CodeRewardCfg
    from lmforge.rl.rewards import Answer, code_reward

    items, env, code_cfg = code_items(a), sandbox_env(), CodeRewardCfg(mode="all_pass")
    out: dict[str, Any] = {"resumed": [], "ends": [], "gen": [], "reward": [], "tokens": [],
                           "rewards": [], "acc": {"gen": 0.0, "reward": 0.0, "tokens": 0}}

    def code(prompts: list[str], completions: list[str], completion_ids: list[list[int]],
             item: list[int], **_: Any) -> list[float]:
        """lmforge's `code` reward on TRL's completions: each run in lmforge's sandbox."""
        answers = [Answer(items[i], c, len(ids))
                   for i, c, ids in zip(item, completions, completion_ids)]
        r = code_reward(code_cfg, answers, env)
        out["rewards"].append(statistics.mean(r))
        return r

    def timed_generate(self: Any, prompts: list) -> Any:
        t = time.perf_counter()
        r = orig_gen(self, prompts)
        out["acc"]["gen"] += time.perf_counter() - t
        out["acc"]["tokens"] += sum(len(c) for c in r[1])  # completion_ids, the stop included
        return r

    def timed_rewards(self: Any, *args: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        r = orig_rew(self, *args, **kw)
        out["acc"]["reward"] += time.perf_counter() - t
        return r

    class Clock(TrainerCallback):
        def on_train_begin(self, *args: Any, **kw: Any) -> None:
            out["base_mb"] = maxrss_mb()
            out["resumed"].append(baton.turn())

        def on_step_end(self, *args: Any, **kw: Any) -> None:
            out["ends"].append(time.perf_counter())
            acc = out["acc"]
            for k in ("gen", "reward", "tokens"):
                out[k].append(acc[k])
                acc[k] = 0 if k == "tokens" else 0.0
            out["resumed"].append(baton.turn())

    orig_gen, GRPOTrainer._generate = GRPOTrainer._generate, timed_generate
    orig_rew, GRPOTrainer._calculate_rewards = GRPOTrainer._calculate_rewards, timed_rewards
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = [json.loads(line) for line in (work / "prompts.jsonl").read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=[code], args=trl_config(a, work / "trl"),
                          train_dataset=Dataset.from_list(rows), processing_class=tok,
                          callbacks=[Clock()])
    checks = {"use_vllm": trainer.use_vllm,
              "continuous_batching": trainer.use_transformers_continuous_batching,
              "loss_type": trainer.loss_type, "scale_rewards": trainer.scale_rewards,
              "beta": trainer.beta, "reference": "frozen copy" if trainer.ref_model is not None
              else "none", "eos_ids": list(trainer.eos_token_ids)}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {**steps_of(out["resumed"], out["ends"], a.warmup), "base_mb": out["base_mb"],
            "gen": out["gen"], "reward": out["reward"], "tokens": out["tokens"],
            "rewards": out["rewards"],
            "truncated": [h["completions/clipped_ratio"] for h in logs],
            "checks": checks, "backend": "transformers generate (no vLLM)"}


def child(a: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    baton = Baton(a.baton)
    baton.wait()  # even imports wait their turn
    import torch

    r = (run_lmforge if a.one == "lmforge" else run_trl)(a, Path(a.work), baton)
    r.update(peak_mb=maxrss_mb(), threads=torch.get_num_threads(),
             process_s=time.perf_counter() - t0 - baton.waited)
    Path(a.result).write_text(json.dumps(r))


# --------------------------------------------------------------------------- parent


def trl_status() -> str | None:
    """None when TRL can run here, else why not (one line)."""
    if importlib.util.find_spec("trl") is None or importlib.util.find_spec("datasets") is None:
        return "trl is not installed: pip install -e '.[bench]'"
    v = importlib.metadata.version("trl")
    if tuple(int(x) for x in v.split(".")[:2]) < (1, 0):
        return f"trl {v} is older than 1.0: pip install -e '.[bench]'"
    return None


def run_sides(names: list[str], a: argparse.Namespace, work: Path) -> dict[str, dict[str, Any]]:
    """Each side in its own process, both started at once and handed the baton in turn."""
    jobs = []
    for name in names:
        res, log = work / f"result-{name}.json", work / f"log-{name}.txt"
        cmd = [sys.executable, __file__, "--one", name, "--work", str(work), "--result", str(res),
               "--steps", str(a.steps), "--prompts",
               str(a.prompts), "--G", str(a.G), "--max-new-tokens", str(a.max_new_tokens),
               "--micro", str(a.micro), "--lr", str(a.lr), "--beta", str(a.beta),
               "--warmup", str(a.warmup), "--preset", a.preset]
        cmd += ["--threads", str(a.threads)] if a.threads else []
        jobs.append((name, cmd, res, log))
    return dict(_dpo.take_turns(jobs, _dpo.child_env(a, work)))


def summarize(r: dict[str, Any], warmup: int) -> dict[str, float]:
    """Medians over the timed steps (those after the warm-up)."""
    med = lambda xs: statistics.median(xs[warmup:] or xs)  # noqa: E731
    train = [s - g - w for s, g, w in zip(r["steps"], r["gen"], r["reward"])]
    return {"step": r["step_s"], "best": r["best_s"], "gen": med(r["gen"]),
            "reward": med(r["reward"]), "train": med(train), "peak": r["peak_mb"],
            "tokens": statistics.mean(r["tokens"])}


def print_table(got: dict[str, dict[str, Any]], a: argparse.Namespace
                ) -> dict[str, dict[str, float]]:
    n = a.prompts * a.G
    print("| side | step s (median) | gen s | reward s | train s | peak RSS MB | "
          "tokens generated/step | mean completion tokens |")
    print("|---|" + "---:|" * 7)
    s = {}
    for name in SIDES:
        r = got.get(name)
        if r is None:
            continue
        if "error" in r:
            print(f"| {name} | {r['error']} |||||||")
            continue
        s[name] = v = summarize(r, a.warmup)
        print(f"| {name} | {v['step']:.2f} | {v['gen']:.2f} | {v['reward']:.2f} | "
              f"{v['train']:.2f} | {v['peak']:,.0f} | {v['tokens']:,.0f} | {v['tokens'] / n:.1f} |")
    if len(s) == 2:
        o, t = s["lmforge"], s["TRL"]
        q = lambda k: f"{o[k] / t[k]:.2f}x" if t[k] else "-"  # noqa: E731
        print(f"| lmforge / TRL | {q('step')} | {q('gen')} | {q('reward')} | {q('train')} | "
              f"{q('peak')} | {q('tokens')} | {q('tokens')} |")
    return s


def notes(got: dict[str, dict[str, Any]], s: dict[str, dict[str, float]],
          a: argparse.Namespace) -> list[str]:
    lines = []
    for name, v in s.items():
        r = got[name]
        base = r["base_mb"]
        lines.append(f"{name}: best step {v['best']:.2f} s; process {r['process_s']:.0f} s; "
                     f"peak RSS {v['peak']:,.0f} MB, {v['peak'] - base:,.0f} MB above the loaded "
                     f"models; steps (s) {', '.join(f'{x:.2f}' for x in r['steps'])}; mean "
                     f"reward per step {', '.join(f'{x:.2f}' for x in r['rewards'])}; share "
                     f"cut at the token cap {statistics.mean(r['truncated']):.2f}; "
                     f"generation: {r['backend']}")
    if "lmforge" in s:
        r = got["lmforge"]
        own = statistics.median(r["own_train"][a.warmup:] or r["own_train"])
        lines.append(f"lmforge's own time/train_s (micro-steps + optimizer only): {own:.2f} s "
                     f"median; reference: {r['reference']}")
    if "TRL" in s:
        lines.append(f"TRL as run: {json.dumps(got['TRL']['checks'])}")
    if len(s) == 2:
        o, t = s["lmforge"], s["TRL"]
        ratio_t, ratio_m = o["step"] / t["step"], o["peak"] / t["peak"]
        ok = lambda x, target: "met" if x <= target else "NOT met"  # noqa: E731
        lines.append(f"target: step {ratio_t:.2f}x TRL's median (best "
                     f"{o['best'] / t['best']:.2f}x) (<= {TARGET_TIME:.2f}x: "
                     f"{ok(ratio_t, TARGET_TIME)}); peak RSS "
                     f"{ratio_m:.2f}x (<= {TARGET_MEM:.2f}x: {ok(ratio_m, TARGET_MEM)})")
        if abs(o["tokens"] / t["tokens"] - 1) > 0.1:
            lines.append("SURPRISE: the sides sampled > 10% different numbers of tokens per step: "
                         "the times are not for the same work")
        for name, v in s.items():
            if v["step"] > 2 * v["best"]:
                lines.append(f"disturbed: {name}'s median step is > 2x its best (other load)"
                             + ("" if a.threads == 1 else "; --threads 1 is far less sensitive"))
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the medians")
    p.add_argument("--prompts", type=int, default=4, help="prompts per optimizer step")
    p.add_argument("--G", type=int, default=8, help="completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--micro", type=int, default=8, help="completions per micro-batch")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--beta", type=float, default=0.04, help="KL weight; 0: no reference on "
                   "either side")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--threads", type=int, help="torch threads on both sides (default: torch's)")
    p.add_argument("--sides", nargs="*", default=list(SIDES), choices=list(SIDES))
    p.add_argument("--one", choices=list(SIDES), help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--baton", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        child(a)
        return
    if (a.prompts * a.G) % a.micro:
        p.error(f"--micro {a.micro} must divide prompts x G = {a.prompts * a.G}")
    if a.warmup >= a.steps:
        p.error("--warmup must be below --steps")
    import torch
    import transformers

    why_missing = trl_status()
    names = [n for n in a.sides if n == "lmforge" or why_missing is None]
    load0 = os.getloadavg()
    tmp = tempfile.TemporaryDirectory(prefix="grpo-vs-trl-")
    work = Path(tmp.name)
    info = make_setup(work, a)
    got = run_sides(names, a, work)
    threads = sorted({r["threads"] for r in got.values() if "threads" in r})
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}, " + (
        f"trl {importlib.metadata.version('trl')}" if why_missing is None else "trl: none")
    print(f"\nCPU: {cpu_line()}; torch threads {threads}; {versions}")
    print(f"load average before the run (1/5/15 min): {load0[0]:.2f} / {load0[1]:.2f} / "
          f"{load0[2]:.2f}" + (" -- other processes shared these cores: absolute times are "
                                "stretched; the sides ran interleaved step by step, so the "
                                "ratios are the figures to read" if load0[0] > 0.5 else ""))
    print(f"model: {a.preset} llama from config, {info['params'] / 1e6:.1f}M params, vocab "
          f"{info['vocab']}, fp32; {a.steps} steps (medians over steps {a.warmup + 1}-{a.steps}), "
          f"{a.prompts} prompts x G={a.G} = {a.prompts * a.G} completions per step, prompts "
          f"{info['prompt_min']}-{info['prompt_max']} tokens (mean {info['prompt_mean']:.0f}), "
          f"max {a.max_new_tokens} new tokens, temperature 1.0, micro-batch {a.micro}, "
          f"lr {a.lr} constant, beta {a.beta} (k3 KL"
          + (" to a frozen reference on both sides)" if a.beta
             else ": no reference on either side)")
          + "; reward: lmforge's code reward (all_pass) through its sandbox on both sides")
    print()
    s = print_table(got, a)
    if why_missing:
        print(f"| TRL | not run: {why_missing} |||||||")
    print()
    for line in notes(got, s, a):
        print(f"- {line}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
