"""`runs/<run>/report.md` + PNG plots: the one page a person reads to see what a run did."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from lmforge.config import PipelineCfg
from lmforge.io import atomic_write_text, read_jsonl

RL_STAGES = ("grpo", "ppo")

def _fmt(v: Any, spec: str = ".4f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def plot_losses(root: Path, names: list[str], out: Path) -> bool:
    """Training loss (line) and validation loss (dots) per training stage, one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    drew = False
    for name in names:
        rows = read_jsonl(root / name / "metrics.jsonl")
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        if train:
            ax.plot(*zip(*train), label=f"{name} train")
            drew = True
        if val:
            ax.plot(*zip(*val), "o--", label=f"{name} val")
    if drew:
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out, dpi=110)
    plt.close(fig)
    return drew


def stage_table(summaries: dict[str, dict[str, Any]], stage_of: dict[str, str]) -> list[str]:
    lines = ["| stage | kind | wall time | tokens | final val loss | val ppl | bytes/token |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, s in summaries.items():
        lines.append(
            f"| {name} | {stage_of[name]} | {s.get('wall_time_s', 0):.1f}s | {_fmt(s.get('tokens'))} "
            f"| {_fmt(s.get('final_val_loss'))} | {_fmt(s.get('final_val_ppl'), '.2f')} "
            f"| {_fmt(s.get('val_bytes_per_token'), '.3f')} |")
    return lines


def corpus_lines(s: dict[str, Any]) -> list[str]:
    keys = [k for k, v in s.items() if isinstance(v, int) and not isinstance(v, bool)]
    return ["| count | value |", "|---|---:|"] + [f"| {k} | {s[k]:,} |" for k in keys]


def pretrain_lines(name: str, s: dict[str, Any]) -> list[str]:
    ratio = s.get("val_loss_over_unigram_entropy")
    verdict = "" if ratio is None else (" (target <= 60%: met)" if ratio <= 0.6 else
                                        " (target <= 60%: NOT met)")
    return [
        f"### {name}",
        f"- model: {s.get('model_type')} with {_fmt(s.get('params'))} parameters; "
        f"{_fmt(s.get('steps'))} steps ({s.get('stopped')}), {_fmt(s.get('tokens'))} tokens "
        f"at {_fmt(s.get('tokens_per_s'), ',.0f')} tokens/s",
        f"- final val loss **{_fmt(s.get('final_val_loss'))}** nats/token vs unigram entropy of "
        f"the val tokens **{_fmt(s.get('val_unigram_entropy'))}**: "
        f"**{_fmt(ratio, '.1%')}**{verdict}",
        f"- per byte of val text (comparable across vocab sizes): "
        f"{_fmt(s.get('val_nats_per_byte'), '.3f')} nats = {_fmt(s.get('val_bits_per_byte'), '.3f')} bits",
        *run_lines(s),
        f"- non-finite steps skipped: {s.get('nonfinite_skipped', 0)}",
    ]


def run_lines(s: dict[str, Any]) -> list[str]:
    """How a training stage ran: the precision chosen and why, and the time budget's plan."""
    out = []
    p = s.get("precision") or {}
    if p:
        asked = "" if p.get("requested") == p.get("name") else f" ({p.get('requested')})"
        out.append(f"- precision **{p.get('name')}**{asked}: {p.get('reason')}")
    b = s.get("time_budget") or {}
    if b:
        out.append(f"- time budget {_fmt(b.get('budget_s'), '.0f')}s: planned "
                   f"{_fmt(s.get('planned_steps'))} steps from {_fmt(b.get('step_s'), '.3f')} s/step "
                   f"and {_fmt(b.get('eval_s'), '.1f')} s per evaluation; the learning rate "
                   "anneals over the planned steps")
    return out


D1_TARGET = 0.70  # the demo's SFT target at difficulty 1


def sft_lines(name: str, s: dict[str, Any]) -> list[str]:
    """Method and cost, task pass@1 before/after per held-out group, forgetting."""
    d = s.get("data", {})
    tr = d.get("train", {})
    lines = [
        f"### {name}",
        f"- {s.get('method')} fine-tuning of {s.get('model_type')}: {_fmt(s.get('trainable_params'))} "
        f"of {_fmt(s.get('params'))} parameters train; template `{s.get('template')}`; "
        f"{_fmt(s.get('steps'))} steps ({s.get('stopped')}, {_fmt(s.get('epochs'), '.2f')} epochs) "
        f"in {_fmt(s.get('train_time_s'), '.0f')}s",
        f"- data: {_fmt(tr.get('examples'))} examples packed into {_fmt(tr.get('rows'))} rows "
        f"({_fmt(tr.get('row_fill'), '.1%')} full); truncated {tr.get('truncated', 0)}, "
        f"dropped {tr.get('dropped_overlong', 0)} overlong + {tr.get('dropped_no_loss', 0)} "
        f"without answer tokens; skipped rows {d.get('rows', {}).get('skipped') or 0}",
        f"- final val loss on answer tokens: {_fmt(s.get('final_val_loss'))}",
        *run_lines(s),
    ]
    b, a = s.get("before", {}), s.get("after", {})
    if "general_ppl" in a:
        lines.append(f"- forgetting: general-text perplexity {_fmt(b.get('general_ppl'), '.2f')} "
                     f"before -> {_fmt(a.get('general_ppl'), '.2f')} after")
    pa, pb = a.get("pass_at_1"), b.get("pass_at_1", {})
    if pa:
        groups = list(pa["n_per_group"])
        lines += ["", "| held-out pass@1 (greedy) | " + " | ".join(groups) + " |",
                  "|---|" + "---:|" * len(groups),
                  "| problems | " + " | ".join(str(pa["n_per_group"][g]) for g in groups) + " |"]
        if pb:
            n_b = pb.get("n_per_group", {})
            label = "before" if n_b == pa["n_per_group"] else \
                f"before (first {max(n_b.values(), default=0)} per group)"
            lines.append(f"| {label} | " + " | ".join(_fmt(pb.get(g), ".1%") for g in groups) + " |")
        lines.append("| after | " + " | ".join(_fmt(pa.get(g), ".1%") for g in groups) + " |")
        if "d1" in pa:
            met = "met" if pa["d1"] >= D1_TARGET else "NOT met"
            lines += ["", f"Held-out pass@1 at difficulty 1: **{pa['d1']:.1%}** "
                          f"(the demo's target >= {D1_TARGET:.0%}: {met})."]
        lines += ["", "d1-d4: new instances (held out by seed) of compositions seen in training "
                  "(none at d4: training stops at d3); unseen: compositions never trained on."]
    return lines


def pairs_lines(name: str, s: dict[str, Any]) -> list[str]:
    """How the preference pairs were made: samples, their pass rate, where chosen came from."""
    return [
        f"### {name}",
        f"- {_fmt(s.get('samples'))} answers to {_fmt(s.get('problems'))} {s.get('task')} "
        f"problems, each judged by {s.get('judge', 'execution')}: pass rate "
        f"**{_fmt(s.get('pass_rate'), '.1%')}**; {_fmt(s.get('problems_all_pass'))} problems "
        f"all pass (no pair), {_fmt(s.get('problems_none_pass'))} none pass",
        f"- **{_fmt(s.get('pairs'))} pairs**, {_fmt(s.get('pairs_from_reference'))} of them with "
        "the reference solution as chosen; generation "
        f"{_fmt(s.get('generation_s'), '.0f')}s, sandbox {_fmt(s.get('sandbox_s'), '.0f')}s",
    ]


PREF_KEYS = ("loss", "rewards/accuracy", "rewards/margin", "rewards/chosen", "rewards/rejected",
             "logps/chosen", "logps/rejected", "kl/implicit", "kl")


def preference_lines(name: str, s: dict[str, Any]) -> list[str]:
    """A DPO/KTO stage: what it optimised, first vs last step, held-out preference metrics."""
    first, last, val = s.get("first_step", {}), s.get("last", {}), s.get("final_val", {})
    loss = s.get("loss", "kto") + (f" + RPO (alpha {s['rpo_alpha']})" if s.get("rpo_alpha") else "")
    lines = [
        f"### {name}",
        f"- {s.get('method')} {loss} (beta {s.get('beta')}) from `{s.get('reference') or 'no reference'}`; "
        f"{_fmt(s.get('steps'))} steps ({s.get('stopped')}, {_fmt(s.get('epochs'), '.2f')} epochs) "
        f"in {_fmt(s.get('train_time_s'), '.0f')}s",
        f"- held-out pairs: loss {_fmt(val.get('val_loss'))}, reward accuracy "
        f"{_fmt(val.get('val_rewards_accuracy'), '.1%')}, margin {_fmt(val.get('val_rewards_margin'), '.3f')}",
        *run_lines(s), "",
        "| per step | first | last |", "|---|---:|---:|",
    ]
    lines += [f"| {k} | {_fmt(first.get(k))} | {_fmt(last.get(k))} |" for k in PREF_KEYS
              if k in first or k in last]
    lines += ["", "Both log-probs falling together while the margin grows is the known DPO "
              "failure mode (the chosen answer gets less likely too); compare the rows above."]
    return lines


def compare_pass_lines(summaries: dict[str, dict[str, Any]], stage_of: dict[str, str]) -> list[str]:
    """Held-out greedy pass@1 of every stage that measured it, side by side (same problems)."""
    rows = [(n, s["after"]["pass_at_1"]) for n, s in summaries.items()
            if stage_of[n] in ("sft", "dpo", "kto", *RL_STAGES) and (s.get("after") or {}).get("pass_at_1")]
    if len(rows) < 2:
        return []
    groups = list(rows[0][1]["n_per_group"])
    if any(pa["n_per_group"] != rows[0][1]["n_per_group"] for _, pa in rows):
        return ["(pass@1 of these stages was measured on different held-out problems: "
                "set the same eval.after_n to compare them)"]
    total = sum(rows[0][1]["n_per_group"].values())
    lines = [f"Greedy pass@1 on the same {total} held-out problems:", "",
             "| model | " + " | ".join(groups) + " | all |", "|---|" + "---:|" * (len(groups) + 1)]
    for n, pa in rows:
        lines.append(f"| {n} | " + " | ".join(_fmt(pa.get(g), ".1%") for g in groups)
                     + f" | **{overall_pass(pa):.1%}** |")
    return lines


def overall_pass(pa: dict[str, Any]) -> float | None:
    """pass@1 over all the held-out problems of a per-group summary (groups weighted by size)."""
    n_g = pa.get("n_per_group") or {}
    if not n_g:
        return None
    return sum(pa[g] * n for g, n in n_g.items()) / max(sum(n_g.values()), 1)


RL_CURVES = (("reward/mean", "reward (weighted sum)"), ("pass_rate", "pass rate (all tests)"),
             ("kl", "KL to the reference (nats/token)"))


def plot_rl(rows: list[dict[str, Any]], out: Path) -> bool:
    """An online-RL stage's reward, pass rate and KL per optimizer step, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [(k, label) for k, label in RL_CURVES if any(k in r for r in rows)]
    if not curves:
        return False
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.2), squeeze=False)
    for ax, (k, label) in zip(axes[0], curves):
        ax.plot([r["step"] for r in rows if k in r], [r[k] for r in rows if k in r])
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def rl_lines(root: Path, name: str, s: dict[str, Any]) -> list[str]:
    """An online-RL stage (GRPO, PPO): rollouts, the loss's choices, start vs end of the
    curves, time split; PPO's memory per model and KL coefficient."""
    ro, t, first, last = s.get("rollouts", {}), s.get("time_per_step_s", {}), \
        s.get("curve", {}).get("first", {}), s.get("curve", {}).get("last", {})
    lines = [f"### {name}",
             f"- {s.get('method')} on {_fmt(ro.get('prompts'))} prompts, {_fmt(ro.get('per_step'))} "
             f"rollouts per round ({ro.get('backend')} backend), {_fmt(s.get('steps'))} steps "
             f"({s.get('stopped')}) in {_fmt(s.get('train_time_s'), '.0f')}s; {s.get('variant', '')}",
             f"- reference: {s.get('reference')}",
             *(["- memory (MiB): " + ", ".join(f"{k} {_fmt(v, '.1f')}" for k, v in s["memory_mb"].items())]
               if s.get("memory_mb") else []),
             *([f"- KL coefficient {_fmt(s['kl']['coef_start'])} -> {_fmt(s['kl']['coef_end'])}"
                f" ({'target ' + _fmt(s['kl']['target']) if s['kl'].get('target') else 'fixed'})"]
               if s.get("kl") else []),
             f"- time per step: generation {_fmt(t.get('gen'), '.2f')}s, reward "
             f"{_fmt(t.get('reward'), '.2f')}s, training {_fmt(t.get('train'), '.2f')}s",
             *run_lines(s), "", "| per step (mean of the first / last quarter) | first | last |",
             "|---|---:|---:|"]
    lines += [f"| {k} | {_fmt(first.get(k))} | {_fmt(last.get(k))} |" for k in first]
    rows = read_jsonl(root / name / "metrics.jsonl")
    if plot_rl(rows, root / f"{name}_rl.png"):
        lines += ["", f"![reward and KL]({name}_rl.png)"]
    return lines


def eval_lines(name: str, s: dict[str, Any]) -> list[str]:
    """One table per eval stage: a row per task with its pass@k (or other) numbers."""
    st = s.get("settings", {})
    lines = [f"### {name}: `{s.get('model')}`",
             f"- {st.get('n')} sample(s) per item at temperature {st.get('temperature')}, "
             f"{'chat template' if st.get('chat') else 'raw completion'}; "
             f"{st.get('max_new_tokens')} new tokens at most"]
    box = s.get("sandbox")
    if box:
        held = ", ".join(k for k, v in box["layers"].items() if v)
        lines.append(f"- sandbox isolation: **{box['level']}** ({held})" if box["level"] == "strong"
                     else f"- sandbox isolation: **weak** here: only {held or 'rlimits'} held; "
                          "generated code ran without network/filesystem/process namespaces")
    lines += ["", "| task | items | metric | value |", "|---|---:|---|---:|"]
    for task, r in s.get("tasks", {}).items():
        keys = [k for k in r if k.startswith("pass@")] or [
            k for k in ("perplexity", "bleu", "chrf", "rougeL_f", "embedding_cosine",
                        "bertscore_f1") if k in r]
        for k in keys:
            lines.append(f"| {task} | {r.get('items', r.get('documents', r.get('pairs', '')))} "
                         f"| {k} | {_fmt(r[k], '.3f')} |")
        for g, gr in r.get("groups", {}).items():
            lines.append(f"| {task} / {g} | {gr['items']} | "
                         + ", ".join(k for k in gr if k.startswith("pass@")) + " | "
                         + " / ".join(_fmt(v, ".3f") for k, v in gr.items() if k.startswith("pass@"))
                         + " |")
    c = s.get("contamination")
    if c:
        lines += ["", f"- contamination ({c.get('n')}-grams vs {c.get('train_docs')} training "
                  "docs): " + ", ".join(f"{n} {v['contaminated']}/{v['checked']} items"
                                        for n, v in c.get("sets", {}).items())]
    j = s.get("judge")
    if j:
        lines += ["", f"- judge `{j.get('judge')}` vs `{j.get('baseline')}`: win {_fmt(j.get('win_rate'), '.1%')}, "
                  f"tie {_fmt(j.get('tie_rate'), '.1%')}, position consistency "
                  f"{_fmt(j.get('position_consistency'), '.1%')}"]
    return lines


def compare_eval_lines(summaries: dict[str, dict[str, Any]], stage_of: dict[str, str]) -> list[str]:
    """Every eval stage's pass@k side by side, one row per stage and task (e.g. MBPP after
    SFT, after DPO, after GRPO, all scored with the same settings)."""
    evals = [(n, s) for n, s in summaries.items() if stage_of[n] == "eval"]
    if len(evals) < 2:
        return []
    ks = sorted({k for _, s in evals for r in s.get("tasks", {}).values() for k in r
                 if k.startswith("pass@")}, key=lambda k: int(k[5:]))
    if not ks:
        return []
    lines = ["| eval | model | task | " + " | ".join(ks) + " |", "|---|---|---|" + "---:|" * len(ks)]
    for n, s in evals:
        for task, r in s.get("tasks", {}).items():
            lines.append(f"| {n} | `{s.get('model')}` | {task} | "
                         + " | ".join(_fmt(r.get(k), ".3f") for k in ks) + " |")
    return lines


def quantize_lines(name: str, s: dict[str, Any]) -> list[str]:
    """The export (bytes, reload check) and the method table as `bench quantize` prints it."""
    lines = [f"### {name}"]
    e = s.get("export")
    if e:
        lines.append(f"- `{e['method']}` export of `{s.get('model')}` -> `{e['dir']}`: "
                     f"{e['weight_bytes'] / 2**20:.2f} MiB of weights; reloaded from disk, the same "
                     f"greedy answers on {e['prompts']} prompts" + (f" ({e['note']})" if e.get("note") else ""))
    if s.get("bench"):
        from lmforge.compress.qbench import render_markdown

        # the table's own title is a level-3 heading: one level below this section's
        lines += ["", render_markdown(s["bench"]).replace("### ", "#### ", 1)]
    return lines


def prune_lines(name: str, s: dict[str, Any]) -> list[str]:
    b, a = s.get("before", {}), s.get("after", {})
    return [f"### {name}",
            f"- {s.get('method')} ({s.get('scores')} scores): {_fmt(s.get('sparsity'), '.1%')} of "
            f"the blocks' weights removed; params {_fmt(b.get('params'))} -> {_fmt(a.get('params'))} "
            f"({_fmt(a.get('nonzero_params'))} nonzero); weights file {_fmt(b.get('weights_bytes'))} "
            f"-> {_fmt(a.get('weights_bytes'))} bytes",
            f"- held-out perplexity {_fmt(b.get('perplexity'), '.2f')} -> "
            f"{_fmt(a.get('perplexity'), '.2f')} ({s.get('held_out') or 'no held-out text'})"]


def distill_lines(name: str, s: dict[str, Any]) -> list[str]:
    t, L = s.get("teacher", {}), s.get("loss", {})
    pass_of = {who: overall_pass(d.get("pass_at_1") or {}) for who, d in
               (("teacher", t), ("before", s.get("before", {})), ("after", s.get("after", {})))}
    return [f"### {name}",
            f"- teacher {_fmt(t.get('params'))} params -> student {_fmt(s.get('params'))} params "
            f"({s.get('student')}); {L.get('kind')} at T={L.get('temperature')}, alpha "
            f"{L.get('alpha')}; on-policy share {s.get('on_policy', {}).get('fraction')}",
            f"- final val loss (hard labels) {_fmt(s.get('final_val_loss'))}, teacher's "
            f"{_fmt(t.get('val_loss'))}",
            f"- held-out greedy pass@1: teacher {_fmt(pass_of['teacher'], '.1%')}, student "
            f"before {_fmt(pass_of['before'], '.1%')} -> after {_fmt(pass_of['after'], '.1%')}",
            *run_lines(s)]


COMPRESS = {"quantize": quantize_lines, "prune": prune_lines, "distill": distill_lines}


def sample_lines(final_dir: Path, cfg: PipelineCfg) -> list[str]:
    from lmforge.generate import SampleCfg, generate
    from lmforge.models import load_model
    from lmforge.tokenizer import load_tokenizer

    model = load_model(final_dir)
    model.eval()
    tok = load_tokenizer(final_dir)
    r = cfg.report
    texts = generate(model, tok, list(r.prompts),
                     SampleCfg(r.max_new_tokens, r.temperature, r.top_k, 1.0, (), 0))
    out = [f"Samples from `{final_dir}` (temperature {r.temperature}, top-k {r.top_k}, "
           f"{r.max_new_tokens} new tokens):", ""]
    for prompt, text in zip(r.prompts, texts):
        out += ["```python", (prompt + text).rstrip(), "```", ""]
    return out


def write_report(root: Path, cfg: PipelineCfg, summaries: dict[str, dict[str, Any]],
                 wall_s: float) -> Path:
    stage_of = {s.name: s.stage for s in cfg.stages}
    lines = [f"# lmforge run: {cfg.name}", "",
             f"{dt.datetime.now().isoformat(timespec='seconds')}; this invocation took "
             f"{wall_s:.1f}s (stages finished earlier were skipped and show their own times).", "",
             "## Stages", "", *stage_table(summaries, stage_of), ""]
    # preference losses are nats per pair, not per token: they would share no axis with the rest
    trained = [n for n in summaries if (root / n / "metrics.jsonl").exists()
               and stage_of[n] not in ("dpo", "kto", "rm", *RL_STAGES)]
    if trained and plot_losses(root, trained, root / "loss.png"):
        lines += ["## Loss", "", "![loss curves](loss.png)", ""]
    for name, s in summaries.items():
        if stage_of[name] == "corpus":
            lines += [f"## Corpus ({name})", "", *corpus_lines(s), ""]
        if stage_of[name] == "pretrain":
            lines += ["## Pretraining", "", *pretrain_lines(name, s), ""]
        if stage_of[name] == "sft":
            lines += ["## Supervised fine-tuning", "", *sft_lines(name, s), ""]
        if stage_of[name] == "pairs":
            lines += ["## Preference pairs", "", *pairs_lines(name, s), ""]
        if stage_of[name] in ("dpo", "kto"):
            lines += ["## Preference optimisation", "", *preference_lines(name, s), ""]
            if not set(RL_STAGES) & set(stage_of.values()):  # else the RL section compares
                lines += [*compare_pass_lines(summaries, stage_of), ""]
        rl = [n for n in summaries if stage_of[n] in RL_STAGES]
        if rl and name == rl[0]:  # one section for every online-RL stage, then the comparison
            lines += ["## Online RL", ""]
            for n in rl:
                lines += [*rl_lines(root, n, summaries[n]), ""]
            lines += [*compare_pass_lines(summaries, stage_of), ""]
        if stage_of[name] == "eval":
            lines += ["## Evaluation", "", *eval_lines(name, s), ""]
    compress = [n for n in summaries if stage_of[n] in COMPRESS]
    if compress:
        lines += ["## Compression", ""]
        for name in compress:
            lines += [*COMPRESS[stage_of[name]](name, summaries[name]), ""]
    compare = compare_eval_lines(summaries, stage_of)
    if compare:
        lines += ["## Side by side", "", *compare, ""]
    # raw-text continuations show what pretraining learned; chat models speak through templates
    models = [Path(s["final_dir"]) for n, s in summaries.items() if stage_of[n] == "pretrain"
              and s.get("final_dir") and (Path(s["final_dir"]) / "config.json").exists()]
    if models:
        lines += ["## Samples", "", *sample_lines(models[-1], cfg)]
    path = root / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
