"""`runs/<run>/report.md` + PNG plots: the one page a person reads to see what a run did."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from lmforge.config import PipelineCfg
from lmforge.io import atomic_write_text, read_jsonl


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
        f"- non-finite steps skipped: {s.get('nonfinite_skipped', 0)}",
    ]


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
    trained = [n for n in summaries if (root / n / "metrics.jsonl").exists()]
    if trained and plot_losses(root, trained, root / "loss.png"):
        lines += ["## Loss", "", "![loss curves](loss.png)", ""]
    for name, s in summaries.items():
        if stage_of[name] == "corpus":
            lines += [f"## Corpus ({name})", "", *corpus_lines(s), ""]
        if stage_of[name] == "pretrain":
            lines += ["## Pretraining", "", *pretrain_lines(name, s), ""]
    models = [Path(s["final_dir"]) for s in summaries.values()
              if s.get("final_dir") and (Path(s["final_dir"]) / "config.json").exists()]
    if models:
        lines += ["## Samples", "", *sample_lines(models[-1], cfg)]
    path = root / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
