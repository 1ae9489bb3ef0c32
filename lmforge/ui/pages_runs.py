"""The dashboard's run pages: every run and its stages, a stage (charts, summary, eval tables,
samples, config), several stages compared (overlaid curves, config diff) and a run's report."""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from lmforge.ui.html import ago, attr_json, badge, cell, e, flatten, fmt, markdown, page, table
from lmforge.ui.runs import Stage

# what a stage page charts first (any others are one pick away): training loss, held-out
# loss, reward, KL to the reference, pass rates
DEFAULT_METRICS = ("loss", "val_loss", "reward/mean", "rewards/margin", "kl", "pass_rate")
SAMPLE_FILES = ("rollouts.jsonl", "samples.jsonl", "pairs.jsonl", "eval_after.jsonl",
                "eval_before.jsonl", "eval_judge.jsonl")
SAMPLES_SHOWN = 20
TAIL_BYTES = 512 * 1024  # a sample file may be hundreds of MB: its end is what is shown


def _problems(stage: Stage) -> str:
    if not stage.problems:
        return ""
    return '<div class="warn">' + "<br>".join(e(p) for p in stage.problems) + "</div>"


def runs_page(stages: list[Stage], root: Path, now: float) -> str:
    """Runs (a stage's first path part) with their stages; ticked stages open side by side."""
    if not stages:
        return page("runs", f"<p>No stage directories under <code>{e(root)}</code> yet: "
                    "a stage writes its config.yaml when it starts.</p>", active="runs")
    groups: dict[str, list[Stage]] = {}
    for s in stages:
        groups.setdefault(s.name.split("/")[0], []).append(s)
    parts = []
    for run, members in groups.items():
        report = (root / run / "report.md").is_file()
        rows = []
        for s in members:
            summary = s.summary or {}
            rows.append([
                f'<input type="checkbox" name="s" value="{e(s.name)}">',
                f'<a href="/stage/{e(s.name)}">{e(s.name)}</a>',
                f'<span data-stage="{e(s.name)}">{badge(s.state)}</span>',
                e(ago(s.updated, now)),
                e(fmt(summary.get("wall_time_s"))) + (" s" if "wall_time_s" in summary else ""),
                e(fmt(summary.get("steps"))),
                "" if not s.problems else f'<span class="warn">{e(s.problems[0])}</span>'])
        link = f' · <a href="/report/{e(run)}">report</a>' if report else ""
        parts.append(f"<h2>{e(run)}{link}</h2>" + table(
            ["", "stage", "state", "updated", "wall time", "steps", "problems"], rows))
    body = ('<form method="get" action="/compare">' + "".join(parts)
            + '<p><button type="submit">compare ticked stages</button> '
              '(curves overlaid, config diff of the first two)</p></form>')
    return page("runs", body, scripts=["live.js"], active="runs")


def charts(stages: list[str], metrics: list[str]) -> str:
    """The chart panel; charts.js fetches /api/curves and draws with uPlot."""
    return (f'<div class="charts" data-stages="{attr_json(stages)}" '
            f'data-metrics="{attr_json(metrics)}"><div class="controls">'
            '<label>smoothing <input type="range" class="smoothing" min="0" max="0.99" '
            'step="0.01" value="0.6"> <span class="smoothing-value">0.6</span></label> '
            '<label>add chart <select class="add-metric"><option value="">metric...</option>'
            '</select></label> <span class="live"></span> '
            '<span class="hint">drag to zoom, double-click to reset</span></div>'
            '<div class="panels"></div></div>')


def default_metrics(names: list[str]) -> list[str]:
    chosen = [m for m in DEFAULT_METRICS if m in names]
    return chosen or names[:2]


def eval_tables(summary: dict[str, Any]) -> str:
    """The eval stage's task table (pass@k per task and group) and a training stage's greedy
    pass@1 before and after."""
    out = []
    tasks = summary.get("tasks")
    if isinstance(tasks, dict):
        rows = []
        for name, t in tasks.items():
            if not isinstance(t, dict):
                continue
            ks = [k for k in t if k.startswith("pass@")]
            rows.append([f"<b>{e(name)}</b>", cell(t.get("items"))]
                        + [f"{e(k)} {cell(t[k])}" for k in ks])
            for g, v in (t.get("groups") or {}).items():
                if isinstance(v, dict):
                    rows.append([e(f"  {name} / {g}"), cell(v.get("items"))]
                                + [f"{e(k)} {cell(v[k])}" for k in ks if k in v])
        out.append(table(["task", "items", "scores"], rows))
    passes = {w: (summary.get(w) or {}).get("pass_at_1") for w in ("before", "after")
              if isinstance(summary.get(w), dict)}
    passes = {w: p for w, p in passes.items() if isinstance(p, dict)}
    if passes:
        first = next(iter(passes.values()))
        groups = [g for g, v in first.items() if isinstance(v, (int, float))]
        rows = [[e(g)] + [cell((passes.get(w) or {}).get(g)) for w in ("before", "after")]
                for g in groups]
        out.append("<h3>greedy pass@1 by group</h3>" + table(["group", "before", "after"], rows))
    return "".join(out)


def _tail_rows(path: Path, n: int) -> tuple[list[Any], int]:
    """The last `n` JSON rows of a file (a partial first or last line is dropped)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - TAIL_BYTES))
        text = f.read().decode("utf-8", errors="replace")
    lines = text.split("\n")
    if size > TAIL_BYTES:
        lines = lines[1:]
    if not text.endswith("\n"):
        lines = lines[:-1]
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows[-n:], size


def samples(stage: Stage, chosen: str | None) -> str:
    files = [f for f in SAMPLE_FILES if (stage.path / f).is_file()]
    files += sorted(p.name for p in stage.path.glob("eval_*.jsonl") if p.name not in files)
    if not files:
        return "<p>No sample files in this stage.</p>"
    name = chosen if chosen in files else files[0]
    links = " · ".join(f'<a href="/stage/{e(stage.name)}?samples={e(f)}#samples">{e(f)}</a>'
                       if f != name else f"<b>{e(f)}</b>" for f in files)
    rows, size = _tail_rows(stage.path / name, SAMPLES_SHOWN)
    cards = []
    for r in reversed(rows):
        if not isinstance(r, dict):
            continue
        short = " · ".join(f"{e(k)}: {cell(v)}" for k, v in r.items()
                           if not (isinstance(v, str) and (len(v) > 60 or "\n" in v)))
        long = "".join(f"<div class='k'>{e(k)}</div><pre>{e(v)}</pre>" for k, v in r.items()
                       if isinstance(v, str) and (len(v) > 60 or "\n" in v))
        cards.append(f'<div class="sample"><div class="meta">{short}</div>{long}</div>')
    return (f"<p>{links}</p><p>the last {len(cards)} rows of {e(name)} "
            f"({fmt(size)} bytes), newest first</p>" + "".join(cards))


def stage_page(stage: Stage, names: list[str], others: list[Stage], sample: str | None,
               now: float) -> str:
    summary = stage.summary or {}
    cfg_path = stage.path / "config.yaml"
    config = cfg_path.read_text(encoding="utf-8", errors="replace") if cfg_path.is_file() else ""
    diff_options = "".join(f'<option value="{e(o.name)}">{e(o.name)}</option>'
                           for o in others if o.name != stage.name)
    facts = (f'<p>{badge(stage.state)} updated {e(ago(stage.updated, now))}'
             + (f" · wall time {e(fmt(summary['wall_time_s']))} s" if "wall_time_s" in summary else "")
             + f' · <code>{e(stage.path)}</code></p>')
    body = [facts, _problems(stage), "<h2>curves</h2>",
            charts([stage.name], default_metrics(names)) if names
            else "<p>No metrics.jsonl rows yet.</p>"]
    evals = eval_tables(summary)
    if evals:
        body.append("<h2>evaluation</h2>" + evals)
    if summary:
        rows = [[e(k), cell(v)] for k, v in flatten(summary)]
        body.append('<details open><summary><h2>summary</h2></summary>'
                    + table(["key", "value"], rows, "kv") + "</details>")
    body.append('<h2 id="samples">samples</h2>' + samples(stage, sample))
    body.append(f'<h2>config</h2><form method="get" action="/compare">'
                f'<input type="hidden" name="s" value="{e(stage.name)}">'
                f'diff with <select name="s">{diff_options}</select> '
                f'<button type="submit">compare</button></form>'
                f"<pre>{e(config) or 'no config.yaml'}</pre>")
    return page(stage.name, "".join(body), scripts=["uplot/uPlot.iife.min.js", "charts.js"])


def _config(stage: Stage) -> tuple[str, dict[str, Any]]:
    path = stage.path / "config.yaml"
    text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError:
        data = {}
    return text, data if isinstance(data, dict) else {}


def config_diff(a: Stage, b: Stage) -> str:
    """The keys whose values differ (run.dir aside, always different), then the unified diff."""
    (ta, da), (tb, db) = _config(a), _config(b)
    fa, fb = dict(flatten(da)), dict(flatten(db))
    keys = sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k) and k != "run.dir")
    rows = [[e(k), cell(fa.get(k, "(absent)")), cell(fb.get(k, "(absent)"))] for k in keys]
    lines = difflib.unified_diff(ta.splitlines(), tb.splitlines(), f"{a.name}/config.yaml",
                                 f"{b.name}/config.yaml", lineterm="")
    shown = "".join(f'<span class="{"add" if x.startswith("+") else "del" if x.startswith("-") else ""}">'
                    f"{e(x)}</span>\n" for x in lines)
    return (f"<h2>config diff: {e(a.name)} vs {e(b.name)}</h2>"
            + (table(["key", a.name, b.name], rows) if rows else "<p>The same settings.</p>")
            + f"<details><summary>unified diff</summary><pre>{shown}</pre></details>")


def compare_page(chosen: list[Stage], names: list[str]) -> str:
    body = [" ".join(f'<a href="/stage/{e(s.name)}">{e(s.name)}</a> {badge(s.state)}'
                     for s in chosen), "<h2>curves</h2>",
            charts([s.name for s in chosen], default_metrics(names))]
    if len(chosen) >= 2:
        body.append(config_diff(chosen[0], chosen[1]))
    return page("compare", "".join(body), scripts=["uplot/uPlot.iife.min.js", "charts.js"])


def report_page(run: str, path: Path, src: Callable[[str], str | None]) -> str:
    text = path.read_text(encoding="utf-8", errors="replace")
    body = re.sub(r"^<h2>lmforge run: [^<]*</h2>", "", markdown(text, src))
    return page(f"report: {run}", f'<div class="report">{body}</div>')
