"""The stage registry: name -> (config class, main). Mains import lazily (torch is slow)."""

from __future__ import annotations

import importlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lmforge import config as C
from lmforge.compress.config import DistillCfg, PruneCfg, QuantizeCfg
from lmforge.errors import UserError
from lmforge.io import atomic_write_json, ensure_writable_dir, storage_errors
from lmforge.rl.config import GrpoCfg, PpoCfg

STAGES: dict[str, type[C.Cfg]] = {
    "corpus": C.CorpusCfg,
    "tokenizer": C.TokenizerCfg,
    "pretrain": C.PretrainCfg,
    "sft": C.SftCfg,
    "pairs": C.PairsCfg,  # also `lmforge synth pairs`
    "best_of_n": C.BestOfNCfg,  # also `lmforge synth best-of-n`
    "self_instruct": C.SelfInstructCfg,  # also `lmforge synth self-instruct`
    "constitutional": C.ConstitutionalCfg,  # also `lmforge synth constitutional`
    "rm": C.RmCfg,
    "dpo": C.DpoCfg,
    "kto": C.KtoCfg,
    "grpo": GrpoCfg,
    "ppo": PpoCfg,
    "distill": DistillCfg,
    "prune": PruneCfg,
    "quantize": QuantizeCfg,
    "eval": C.EvalCfg,
}

# where a pipeline puts a stage's output: runs/<pipeline>/<stage>[/...]
_STAGE_OUTPUT = re.compile(r"(?:^|/)runs/[^/]+/([^/]+)")


def stage_main(name: str) -> Callable[[Any], dict[str, Any]]:
    return importlib.import_module(f"lmforge.stages.{name}").main  # type: ignore[no-any-return]


def run_stage(name: str, cfg: C.Cfg) -> dict[str, Any]:
    """Run one stage in `cfg.run.dir`: resolved config first, summary.json last (the done mark).

    Missing inputs and an unusable run.dir are found before anything is written; a full disk
    or a read-only filesystem met on the way is one line naming run.dir."""
    from lmforge.train import distributed

    out: Path = cfg.run.dir  # type: ignore[attr-defined]
    distributed.check_stage(name, cfg)
    check_inputs(cfg)
    check_run_dir(out, name)
    d = distributed.current()  # under torchrun: rank 0 writes the stage's own files
    for _ in distributed.main_first(d):
        ensure_writable_dir(out, "run.dir")
    with storage_errors(out):
        if d.main:
            (out / "summary.json").unlink(missing_ok=True)  # a rerun is not finished until it says so
            C.dump_config(cfg, out / "config.yaml")
        t0 = time.perf_counter()
        summary = stage_main(name)(cfg)
        summary = {"stage": name, "wall_time_s": round(time.perf_counter() - t0, 2), **summary}
        if d.active:
            summary["ranks"] = d.world
        if d.main:
            atomic_write_json(out / "summary.json", summary)
    return summary


def check_run_dir(out: Path, stage: str) -> None:
    """run.dir must not be another stage's directory or a pipeline's root: a stage writes its
    config.yaml and summary.json there, and a summary is another stage's mark of done."""
    try:
        done = json.loads((out / "summary.json").read_text(encoding="utf-8")).get("stage")
    except (OSError, ValueError, AttributeError):
        done = None
    if done not in (None, stage):
        raise UserError(f"run.dir {out} is the {done} stage's directory; name a new one")
    stages = sorted(d.parent.name for d in out.glob("*/summary.json")) if out.is_dir() else []
    if stages:
        raise UserError(f"run.dir {out} holds a pipeline's stages ({', '.join(stages[:3])}); "
                        "name a new directory")


def check_inputs(cfg: C.Cfg) -> None:
    """An input that is another stage's output (`runs/<name>/<stage>`) and does not exist yet
    is one line saying which command makes it, instead of a stage failing halfway to it."""
    for key, value in _paths(cfg, ()):
        m = _STAGE_OUTPUT.search(value.replace(os.sep, "/"))
        if m is None or Path(value).exists():
            continue
        made_by = _producer(Path(value))
        if made_by is not None:
            pipeline, stage = made_by
            how = (f"it is made by stage {stage!r} of the pipeline {pipeline}: "
                   f"run `lmforge run {pipeline}` first")
        else:
            stage_dir = value[:m.end()]
            how = (f"it is the output of an earlier stage: run the {m.group(1)} stage "
                   f"with run.dir={stage_dir} first")
        raise UserError(f"{key}: {value} does not exist; {how}")


# fields that name where a stage writes, not what it reads
_OUTPUT_FIELDS = {"cache_dir"}


def _paths(node: Any, key: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    """(dotted key, text) for every path or string in a config, outputs excepted (run.dir,
    a cache the stage fills)."""
    if isinstance(node, C.RunCfg) or (key and key[-1] in _OUTPUT_FIELDS):
        return
    if isinstance(node, BaseModel):
        for name in type(node).model_fields:
            yield from _paths(getattr(node, name), (*key, name))
    elif isinstance(node, (str, Path)):
        yield ".".join(key), str(node)
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _paths(v, (*key, str(i)))
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*key, str(k)))


def _pipeline_files() -> list[Path]:
    """Pipeline YAMLs (those with `stages:`) in ./configs, else in the source tree's configs."""
    for d in (Path("configs"), Path(__file__).resolve().parents[2] / "configs"):
        if d.is_dir():
            return sorted(f for f in d.glob("*.yaml") if "\nstages:" in _head(f))
    return []


def _head(f: Path) -> str:
    try:
        return "\n" + f.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _producer(path: Path) -> tuple[str, str] | None:
    """(pipeline file, stage name) of a pipeline under configs/ whose run writes `path`."""
    target = Path(os.path.abspath(path))
    for f in _pipeline_files():
        try:
            p = C.load_config(C.PipelineCfg, f)
        except UserError:
            continue
        root = p.dir or Path("runs") / p.name
        for st in p.stages:
            d = Path(os.path.abspath(root / st.name))
            if target == d or d in target.parents:
                return str(f), st.name
    return None
