"""`lmforge run PIPELINE.yaml`: named stages in order, each feeding the next.

A stage whose `summary.json` exists is finished and skipped on a rerun; `--force STAGE` redoes
it and every later stage that consumes it (directly or not), since their inputs changed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from lmforge.config import Cfg, PipelineCfg, PipelineStageCfg, load_config
from lmforge.errors import UserError
from lmforge.io import ensure_writable_dir, storage_errors
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


def _resolve(path: Path, pipeline_file: Path, where: str) -> Path:
    """A stage config path is relative to the working directory, else to the pipeline file's
    folder, else to the folder above it: pipelines live in configs/ and name their stage
    configs `configs/<stage>/x.yaml`, so `lmforge run /abs/configs/tiny.yaml` works from
    anywhere."""
    if path.is_absolute():
        candidates = [path]
    else:
        here = Path(os.path.abspath(pipeline_file)).parent
        candidates = [path, here / path, here.parent / path]
    for c in candidates:
        if c.is_file():
            return c
    looked = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise UserError(f"{where}: config file not found: {path} (looked for {looked})")


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
    # every stage's config is read and validated before the first stage runs: a typo in the
    # last stage's settings must not cost the run of the ones before it
    cfgs = [_stage_cfg(p, i, path, root, per_stage) for i in range(len(p.stages))]
    ensure_writable_dir(root, "dir")
    summaries: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    with storage_errors(root):
        for st, cfg in zip(p.stages, cfgs):
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


def _stage_cfg(p: PipelineCfg, i: int, path: Path, root: Path,
               per_stage: dict[str, list[str]]) -> Cfg:
    st = p.stages[i]
    base = _resolve(st.config, path, f"{path}: stages[{i}] ({st.name})") if st.config else None
    return load_config(STAGES[st.stage], base, stage_overrides(st, root, per_stage.get(st.name, [])))


def _stage_names(path: Path) -> list[str]:
    from lmforge.config import read_yaml

    data, _ = read_yaml(path)
    stages = data.get("stages")
    if not isinstance(stages, list):
        return []
    return [s["name"] for s in stages if isinstance(s, dict) and isinstance(s.get("name"), str)]
