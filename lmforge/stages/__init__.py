"""The stage registry: name -> (config class, main). Mains import lazily (torch is slow)."""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmforge import config as C
from lmforge.io import atomic_write_json

STAGES: dict[str, type[C.Cfg]] = {
    "corpus": C.CorpusCfg,
    "tokenizer": C.TokenizerCfg,
    "pretrain": C.PretrainCfg,
    "sft": C.SftCfg,
    "eval": C.EvalCfg,
}


def stage_main(name: str) -> Callable[[Any], dict[str, Any]]:
    return importlib.import_module(f"lmforge.stages.{name}").main  # type: ignore[no-any-return]


def run_stage(name: str, cfg: C.Cfg) -> dict[str, Any]:
    """Run one stage in `cfg.run.dir`: resolved config first, summary.json last (the done mark)."""
    out: Path = cfg.run.dir  # type: ignore[attr-defined]
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)  # a rerun is not finished until it says so
    C.dump_config(cfg, out / "config.yaml")
    t0 = time.perf_counter()
    summary = stage_main(name)(cfg)
    summary = {"stage": name, "wall_time_s": round(time.perf_counter() - t0, 2), **summary}
    atomic_write_json(out / "summary.json", summary)
    return summary
