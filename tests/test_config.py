"""Typed configs: every YAML under configs/ validates; errors name the key, line and fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from lmforge.config import PipelineCfg, PretrainCfg, load_config, parse_override, read_yaml
from lmforge.errors import UserError
from lmforge.pipeline import _check, stage_overrides
from lmforge.stages import STAGES
from tests.conftest import ROOT

CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def _stage_of(path: Path) -> str | None:
    rel = path.relative_to(ROOT / "configs")
    return rel.parts[0] if len(rel.parts) > 1 else None


def test_configs_exist() -> None:
    assert (ROOT / "configs" / "demo.yaml") in CONFIGS
    assert {_stage_of(p) for p in CONFIGS} >= {"corpus", "tokenizer", "pretrain"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_validates(path: Path) -> None:
    stage = _stage_of(path)
    if stage is not None:
        load_config(STAGES[stage], path)
        return
    p = load_config(PipelineCfg, path)  # a pipeline: every stage's resolved config must validate
    _check(p, path)
    for st in p.stages:
        base = ROOT / st.config if st.config else None
        load_config(STAGES[st.stage], base, stage_overrides(st, Path("runs") / p.name, []))


def test_override_values_are_typed() -> None:
    assert parse_override("train.max_steps=5") == (["train", "max_steps"], 5)
    assert parse_override("optim.lr=1.5e-3") == (["optim", "lr"], 1.5e-3)
    assert parse_override("model.gradient_checkpointing=true")[1] is True
    assert parse_override("model.path=runs/x")[1] == "runs/x"
    cfg = load_config(PretrainCfg, None, ["train.max_steps=7", "optim.betas=[0.8, 0.9]"])
    assert cfg.train.max_steps == 7 and cfg.optim.betas == (0.8, 0.9)


def test_unknown_key_names_path_line_and_closest(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  max_steps: 3\n  mirco_batch_size: 4\n")
    with pytest.raises(UserError) as e:
        load_config(PretrainCfg, f)
    assert str(e.value) == (f"{f}:3: unknown key 'train.mirco_batch_size' "
                            "(did you mean 'train.micro_batch_size'?)")


def test_unknown_override_key() -> None:
    with pytest.raises(UserError, match=r"override optim\.learning_rate: unknown key"):
        load_config(PretrainCfg, None, ["optim.learning_rate=1"])


def test_wrong_type_names_path_and_expected_type(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("run:\n  dir: x\ntrain:\n  max_steps: many\n")
    with pytest.raises(UserError) as e:
        load_config(PretrainCfg, f)
    msg = str(e.value)
    assert msg.startswith(f"{f}:4: train.max_steps = \"many\"") and "integer" in msg
    with pytest.raises(UserError, match="precision.*'fp32', 'bf16' or 'fp16'"):
        load_config(PretrainCfg, None, ["train.precision=fp8"])


def test_missing_checkpoint_path_is_a_config_error() -> None:
    with pytest.raises(UserError, match="train.resume.*does not exist"):
        load_config(PretrainCfg, None, ["train.resume=/nonexistent/step-3"])


def test_configs_are_frozen() -> None:
    cfg = load_config(PretrainCfg, None)
    with pytest.raises(ValidationError, match="frozen"):
        cfg.train.max_steps = 3  # type: ignore[misc]


def test_bad_yaml_names_line(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  max_steps: [1\n")
    with pytest.raises(UserError, match=rf"{f}:\d+: invalid YAML"):
        read_yaml(f)
