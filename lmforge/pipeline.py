"""`lmforge run PIPELINE.yaml`: named stages in order, each feeding the next.

A stage whose `summary.json` exists is finished and skipped on a rerun; `--force STAGE` redoes
it and every later stage that consumes it (directly or not), since their inputs changed.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from lmforge.config import PipelineCfg, PipelineStageCfg, load_config
from lmforge.errors import UserError
from lmforge.stages import STAGES, run_stage


def _check(p: PipelineCfg, source: Path) -> None:
    seen: set[str] = set()
    for i, st in enumerate(p.stages):
        where = f"{source}: stages[{i}] ({st.name})"
        if st.stage not in STAGES:
            raise UserError(f"{where}: unknown stage {st.stage!r}; known: {', '.join(STAGES)}")
        if st.name in seen:
            raise UserError(f"{where}: duplicate stage name {st.name!r}")
        for field, src in st.uses.items():
            if src not in seen:
                raise UserError(f"{where}: uses {field}={src!r}, which is not an earlier stage")
        seen.add(st.name)


def _to_redo(p: PipelineCfg, force: list[str]) -> set[str]:
    names = [s.name for s in p.stages]
    for f in force:
        if f != "all" and f not in names:
            raise UserError(f"--force {f}: no such stage; stages: {', '.join(names)}")
    redo = set(names) if "all" in force else set(force)
    for st in p.stages:  # in order, so invalidation flows downstream transitively
        if any(src in redo for src in st.uses.values()):
            redo.add(st.name)
    return redo


def _resolve(path: Path, pipeline_file: Path) -> Path:
    """Stage config paths are relative to the working directory, else to the pipeline file."""
    if path.is_absolute() or path.exists():
        return path
    alt = pipeline_file.parent / path
    return alt if alt.exists() else path


def stage_overrides(st: PipelineStageCfg, root: Path, extra: list[str]) -> list[str]:
    ov = [f"run.dir={json.dumps(str(root / st.name))}"]
    ov += [f"{field}={json.dumps(str(root / src))}" for field, src in st.uses.items()]
    ov += [f"{k}={json.dumps(v)}" for k, v in st.set.items()]  # JSON is valid YAML
    return ov + extra


def _split_overrides(overrides: list[str], names: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """`pretrain.train.max_steps=5` goes to the stage named pretrain; the rest to the pipeline."""
    own: list[str] = []
    per: dict[str, list[str]] = {n: [] for n in names}
    for o in overrides:
        head, _, rest = o.partition(".")
        if head in per and rest:
            per[head].append(rest)
        else:
            own.append(o)
    return own, per


def run_pipeline(path: Path, force: list[str] | None = None,
                 overrides: list[str] | None = None) -> dict[str, dict[str, Any]]:
    raw_names = _stage_names(path)
    own, per_stage = _split_overrides(list(overrides or []), raw_names)
    p = load_config(PipelineCfg, path, own)
    _check(p, path)
    root = p.dir or Path("runs") / p.name
    redo = _to_redo(p, list(force or []))
    root.mkdir(parents=True, exist_ok=True)
    summaries: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    for st in p.stages:
        base = _resolve(st.config, path) if st.config else None
        cfg = load_config(STAGES[st.stage], base,
                          stage_overrides(st, root, per_stage.get(st.name, [])))
        done = root / st.name / "summary.json"
        if done.exists() and st.name not in redo:
            print(f"[{st.name}] finished earlier; skipped (--force {st.name} to redo)")
            summaries[st.name] = json.loads(done.read_text())
            continue
        if st.name in redo and (root / st.name).exists():
            # redone means from scratch: an old checkpoint must not be resumed into new inputs
            shutil.rmtree(root / st.name)
        print(f"[{st.name}] running stage {st.stage} -> {root / st.name}", flush=True)
        summaries[st.name] = run_stage(st.stage, cfg)
        print(f"[{st.name}] done in {summaries[st.name]['wall_time_s']:.1f}s", flush=True)
    from lmforge.report import write_report

    report = write_report(root, p, summaries, time.perf_counter() - t0)
    print(f"report: {report}")
    return summaries


def _stage_names(path: Path) -> list[str]:
    from lmforge.config import read_yaml

    data, _ = read_yaml(path)
    stages = data.get("stages")
    if not isinstance(stages, list):
        return []
    return [s["name"] for s in stages if isinstance(s, dict) and isinstance(s.get("name"), str)]
