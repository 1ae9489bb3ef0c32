"""train.backend=unsloth on a machine that cannot run it: one line, exit 2, before any model or
data loads, nothing written that looks finished. (The load itself needs CUDA and unsloth:
checked on a GPU machine, not here.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.config import LoraCfg
from lmforge.errors import UserError
from lmforge.unsloth_backend import check_unsloth, load_unsloth, lora_targets
from tests.conftest import micro_llama

ROOT = Path(__file__).resolve().parents[1]


def _overrides(stage: str, tmp: Path) -> list[str]:
    """The tiny config with every input pointed at an existing (empty) directory: the check
    must fire before anything is read from them."""
    model = tmp / "model"
    model.mkdir(exist_ok=True)
    common = [f"run.dir={tmp / 'run'}", f"model.path={model}", "train.backend=unsloth"]
    return common + {"sft": ["forgetting.general=null"],
                     "dpo": [f"data.train={model}"], "grpo": []}[stage]


def _no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any model or tokenizer load would be a failure of "before anything loads"."""
    import lmforge.stages.sft as sft

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("a model or tokenizer was loaded before the backend check")

    monkeypatch.setattr(sft, "load_tokenizer_and_format", boom)
    monkeypatch.setattr(sft, "load_sft_model", boom)


def _finished_looking(run: Path) -> list[str]:
    return [p.name for p in (run / "summary.json", run / "final", run / "checkpoints") if p.exists()]


@pytest.mark.parametrize("stage", ["sft", "dpo", "grpo"])
def test_no_cuda_is_one_line_exit_2(stage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _no_model_load(monkeypatch)
    rc = main([stage, str(ROOT / f"configs/{stage}/tiny.yaml"), *_overrides(stage, tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "CUDA" in err and "train.backend=hf" in err and stage in err
    assert _finished_looking(tmp_path / "run") == []


@pytest.mark.parametrize("stage", ["sft", "dpo", "grpo"])
def test_cuda_without_unsloth_says_what_to_install(stage: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "unsloth" else real(name, *a))
    _no_model_load(monkeypatch)
    rc = main([stage, str(ROOT / f"configs/{stage}/tiny.yaml"), *_overrides(stage, tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1
    assert "pip install 'lmforge[unsloth]'" in err
    assert _finished_looking(tmp_path / "run") == []


def test_backend_field() -> None:
    from lmforge.config import TrainCfg

    assert TrainCfg().backend == "hf"
    with pytest.raises(ValueError, match="backend"):
        TrainCfg(backend="vllm")  # type: ignore[arg-type]


def test_load_unsloth_checks_before_importing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A direct call (any stage that reaches load_sft_model) is guarded too."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="CUDA"):
        load_unsloth("x", LoraCfg(method="lora"), 64, n_vocab=10, new_token_ids=[], stop_ids=[0],
                     pad_id=0)
    with pytest.raises(UserError, match="CUDA"):
        check_unsloth("sft")


def test_all_linear_is_spelled_out_without_the_head() -> None:
    """Unsloth iterates target_modules: "all-linear" must arrive as peft means it, every linear
    layer of the blocks and not the output head (an nn.Linear in llama, tied or not)."""
    model = micro_llama()
    names = lora_targets(model, LoraCfg(method="lora"))
    assert "lm_head" not in names
    assert set(names) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                          "down_proj"}
    assert lora_targets(model, LoraCfg(method="lora", target_modules=["q_proj"])) == ["q_proj"]
