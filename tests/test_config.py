"""Typed configs: every YAML under configs/ validates; errors name the key, line and fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
from pydantic import BaseModel, ValidationError

from lmforge.config import (
    EvalCfg,
    PipelineCfg,
    PretrainCfg,
    load_config,
    parse_override,
    read_yaml,
)
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


# --------------------------------------------------------------------------- strict values


def _leaves(cls: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[str, set[Any]]]:
    """(dotted key, the types a leaf field takes) for every scalar field below `cls`."""
    out = []
    for name, f in cls.model_fields.items():
        if get_origin(f.annotation) in (list, tuple, dict, set):
            continue  # containers: test_booleans_inside_lists_and_in_files
        args = {a for a in get_args(f.annotation) if a is not type(None)} or {f.annotation}
        sub = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if sub is not None:
            out += _leaves(sub, (*prefix, name))
        else:
            out.append((".".join((*prefix, name)), args))
    return out


NUMERIC = sorted({(cls, key) for cls in STAGES.values() for key, types in _leaves(cls)
                  if types & {int, float} and bool not in types}, key=str)
FLOATS = [(cls, key) for cls, key in NUMERIC if float in dict(_leaves(cls))[key]]


def test_the_sweeps_cover_the_known_numeric_fields() -> None:
    keys = {key for _, key in NUMERIC}
    assert {"train.max_steps", "optim.lr", "data.seq_len", "vocab_size", "temperature"} <= keys
    assert {"optim.lr", "top_p", "sandbox.timeout_s"} <= {key for _, key in FLOATS}


@pytest.mark.parametrize("cls,key", NUMERIC, ids=lambda x: x if isinstance(x, str) else x.__name__)
def test_no_numeric_field_takes_a_boolean(cls: type, key: str) -> None:
    # lax pydantic would read `true` as 1: `train.max_steps=true` trained one step
    for raw in ("true", "false"):
        with pytest.raises(UserError, match=rf"^override {key}: .*boolean is not a number"):
            load_config(cls, None, [f"{key}={raw}"])


@pytest.mark.parametrize("cls,key", FLOATS, ids=lambda x: x if isinstance(x, str) else x.__name__)
def test_no_float_field_takes_a_non_finite_value(cls: type, key: str) -> None:
    for raw in (".inf", "-.inf", ".nan", "nan", "inf"):
        with pytest.raises(UserError, match=rf"^override {key}: .*finite number"):
            load_config(cls, None, [f"{key}={raw}"])


def test_booleans_inside_lists_and_in_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"override optim\.betas: .*boolean"):
        load_config(PretrainCfg, None, ["optim.betas=[true, 0.9]"])
    with pytest.raises(UserError, match=r"override k: .*boolean"):
        load_config(EvalCfg, None, ["k=[1, true]"])
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  max_steps: yes\n")  # YAML 1.1: a bool
    with pytest.raises(UserError, match=rf"^{f}:2: train.max_steps = true: .*boolean"):
        load_config(PretrainCfg, f)
    # real booleans and real numbers are untouched
    cfg = load_config(PretrainCfg, None, ["model.tie_embeddings=false", "train.max_steps=3",
                                          "optim.betas=[0.8, 1]", "train.clip_grad=null"])
    assert cfg.model.tie_embeddings is False and cfg.train.max_steps == 3
    assert cfg.optim.betas == (0.8, 1.0) and cfg.train.clip_grad is None


def test_an_override_yaml_would_cut_at_a_comment_stays_whole() -> None:
    assert parse_override("run.dir=/tmp/x #1")[1] == "/tmp/x #1"
    assert parse_override("run.dir=#1")[1] == "#1"  # YAML: a comment, i.e. null
    assert parse_override("run.dir=/tmp/x#1")[1] == "/tmp/x#1"  # no comment for YAML either
    assert parse_override('run.dir="a #b"')[1] == "a #b"
    assert load_config(PretrainCfg, None, ["run.dir=/tmp/x #1"]).run.dir == Path("/tmp/x #1")
    # where a string cannot be the value, the whole text is refused, not its first part
    with pytest.raises(UserError, match=r'override train.max_steps: .*"5 # five"'):
        load_config(PretrainCfg, None, ["train.max_steps=5 # five"])


def test_a_bad_list_item_is_blamed_on_the_override(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  betas: [0.9, 0.95]\n")
    for path in (f, None):  # not on the file's line, nor on <defaults>
        with pytest.raises(UserError) as e:
            load_config(PretrainCfg, path, ["optim.betas=[0.9,abc]"])
        assert str(e.value).startswith('override optim.betas: optim.betas.1 = "abc"')
    f.write_text("optim:\n  betas: [0.9, abc]\n")  # and a bad item in the file is on its line
    with pytest.raises(UserError, match=rf"^{f}:2: optim.betas.1"):
        load_config(PretrainCfg, f)


@pytest.mark.parametrize("content,needle", [
    (b"run:\n  dir: x\xff\n", ":2: config file is not UTF-8 text (byte 0xff"),
    ("run:\n  dir: x\n".encode("utf-16"), ": config file is UTF-16"),
    ("run:\n  dir: x\n".encode("utf-16-le"), ": config file is UTF-16"),
    (bytes(range(256)) * 4, ": config file"),
    (b"run:\n  dir: x\x00\n", ":2: config file holds NUL bytes"),
], ids=["latin1", "utf16-bom", "utf16-no-bom", "binary", "nul"])
def test_a_config_that_is_not_utf8_is_one_error_naming_it(tmp_path: Path, content: bytes,
                                                          needle: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_bytes(content)
    with pytest.raises(UserError) as e:
        load_config(PretrainCfg, f)
    assert str(e.value).startswith(str(f)) and needle in str(e.value), str(e.value)
    f.write_bytes(b"\xef\xbb\xbfrun:\n  dir: x\n")  # UTF-8 with a BOM is fine
    assert load_config(PretrainCfg, f).run.dir == Path("x")
