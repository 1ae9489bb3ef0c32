"""rollout.backend=unsloth: GRPO's sampling through the vLLM engine Unsloth starts inside the
policy. Unsloth and vLLM need a GPU, so the objects they contribute (the model's `vllm_engine`,
`load_lora`, `FastLanguageModel`) are stand-ins recording what lmforge hands them, with the
documented signatures; what is asserted is lmforge's side: the adapter of the latest sync on
every request, the rollouts built from the engine's outputs, the refusals, the load's
arguments. The engine's own numbers are checked on a GPU (bench/backends.py)."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from lmforge.config import LoraCfg
from lmforge.errors import UserError
from lmforge.rl.rollout import SamplingCfg, make_engine
from lmforge.unsloth_backend import load_unsloth, vllm_share
from tests.conftest import micro_llama

ROOT = Path(__file__).resolve().parents[1]


class Params:
    """vLLM's SamplingParams, as a record of its keywords."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


def _out(ids: list[int], logps: list[float], finish: str, stop: Any = None) -> Any:
    lp = [{t: types.SimpleNamespace(logprob=v)} for t, v in zip(ids, logps)]
    comp = types.SimpleNamespace(token_ids=ids, logprobs=lp, finish_reason=finish, stop_reason=stop)
    return types.SimpleNamespace(outputs=[comp])


class FakeLLM:
    """vLLM's LLM.generate: answers prompt i with the i-th canned output; records the calls."""

    def __init__(self, outs: list[Any], mode: str) -> None:
        self.outs, self.calls = outs, []
        self.llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(logprobs_mode=mode))

    def generate(self, prompts: list[dict], params: list[Params], *, use_tqdm: bool,
                 lora_request: Any) -> list[Any]:
        self.calls.append((prompts, params, lora_request))
        return self.outs[: len(prompts)]


class FakeModel(torch.nn.Module):
    """The peft model Unsloth returns with fast_inference: `vllm_engine` and `load_lora`."""

    def __init__(self, llm: FakeLLM) -> None:
        super().__init__()
        self.vllm_engine, self.loads = llm, []

    def load_lora(self, save_directory: str, load_tensors: bool = False) -> str:
        self.loads.append((save_directory, load_tensors))
        return f"request-{len(self.loads)}"


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=Params))


def _engine(chat_tok: Any, outs: list[Any], mode: str = "raw_logprobs") -> tuple[Any, FakeModel]:
    model = FakeModel(FakeLLM(outs, mode))
    eos = chat_tok.convert_tokens_to_ids("<|endoftext|>")
    return make_engine("unsloth", model, chat_tok, [eos], chat_tok.pad_token_id), model


def test_every_request_carries_the_latest_adapter(chat_tok: Any, fake_vllm: None) -> None:
    a, b = chat_tok.encode("def add"), chat_tok.encode("Add 2")
    eos = chat_tok.convert_tokens_to_ids("<|endoftext|>")
    outs = [_out(a + [eos], [-0.5] * len(a) + [-0.25], "stop", eos), _out(b, [-1.0] * len(b), "length")]
    engine, model = _engine(chat_tok, outs)
    assert engine.name == "unsloth"
    assert len(model.loads) == 1 and model.loads[0][1] is True  # synced at start, from tensors
    cfg = SamplingCfg(max_new_tokens=8, temperature=1.0, stop=["\n"])
    ro = engine.generate([[5, 6], [7]], cfg, torch.Generator().manual_seed(0))
    prompts, params, req = model.vllm_engine.calls[-1]
    assert req == "request-1"
    assert prompts == [{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": [7]}]
    assert [p.stop_token_ids for p in params] == [[eos], [eos]] and params[0].ignore_eos
    assert params[0].seed != params[1].seed  # each prompt its own seed from the generator
    engine.sync(model)  # after an optimizer step: a new request (a new id), same directory
    engine.generate([[5, 6]], cfg, torch.Generator().manual_seed(0))
    assert model.vllm_engine.calls[-1][2] == "request-2"
    assert model.loads[1] == model.loads[0]
    # the rollouts: tokens, log-probs and mask as the engine returned them, finish reasons
    assert ro.tokens[0, : len(a) + 1].tolist() == a + [eos]
    assert ro.mask.sum(1).tolist() == [len(a) + 1, len(b)]
    assert ro.logps[0, len(a)].item() == -0.25 and ro.logps[1].sum().item() == -len(b)
    assert ro.finish == ["eos", "length"]
    assert ro.texts == [chat_tok.decode(a, skip_special_tokens=True),
                        chat_tok.decode(b, skip_special_tokens=True)]


def test_raw_logprobs_only_at_temperature_1(chat_tok: Any, fake_vllm: None) -> None:
    """vLLM's default raw log-probs are the T=1 distribution's: at another temperature they
    are not what the trainer scores, so the run stops rather than correcting with them."""
    outs = [_out([9], [-1.0], "length")]
    engine, _ = _engine(chat_tok, outs)
    with pytest.raises(UserError, match=r"rollout.temperature=0.7.*raw_logprobs"):
        engine.generate([[5]], SamplingCfg(max_new_tokens=1, temperature=0.7), torch.Generator())
    engine, _ = _engine(chat_tok, outs, mode="processed_logprobs")
    ro = engine.generate([[5]], SamplingCfg(max_new_tokens=1, temperature=0.7), torch.Generator())
    assert ro.tokens.tolist() == [[9]]


def test_a_model_without_unsloths_engine_is_one_line(chat_tok: Any) -> None:
    with pytest.raises(UserError, match="train.backend=unsloth"):
        make_engine("unsloth", micro_llama(), chat_tok, [0], 0)


def test_config_needs_the_unsloth_train_backend(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from lmforge.cli import main

    rc = main(["grpo", str(ROOT / "configs/grpo/tiny.yaml"), f"run.dir={tmp_path / 'run'}",
               "rollout.backend=unsloth"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "rollout.backend=unsloth" in err and "train.backend=unsloth" in err
    assert not (tmp_path / "run").exists()


class FakeFLM:
    """FastLanguageModel: records the keywords of both calls; the model is a micro llama."""

    def __init__(self, vocab: int) -> None:
        self.vocab, self.calls = vocab, {}

    def from_pretrained(self, **kw: Any) -> tuple[Any, None]:
        self.calls["from_pretrained"] = kw
        return micro_llama(vocab=self.vocab), None

    def get_peft_model(self, model: Any, **kw: Any) -> Any:
        self.calls["get_peft_model"] = kw
        return model


def _load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, n_vocab: int,
          share: float | None) -> FakeFLM:
    import lmforge.unsloth_backend as ub

    flm = FakeFLM(vocab=300)
    monkeypatch.setattr(ub, "check_unsloth", lambda what: None)
    monkeypatch.setattr(ub, "_fast_language_model", lambda: flm)
    load_unsloth(str(tmp_path), LoraCfg(method="lora", r=16), 64, n_vocab=n_vocab,
                 new_token_ids=[3, 4], stop_ids=[4], pad_id=0, vllm_share=share)
    return flm


def test_fast_inference_load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    flm = _load(monkeypatch, tmp_path, 300, 0.45)
    kw = flm.calls["from_pretrained"]
    assert (kw["fast_inference"], kw["max_lora_rank"], kw["gpu_memory_utilization"]) == (True, 16, 0.45)
    assert flm.calls["get_peft_model"]["trainable_token_indices"] is None  # vLLM LoRA: no rows
    assert "token rows are not trained" in capsys.readouterr().out
    plain = _load(monkeypatch, tmp_path, 300, None)  # without it: Unsloth's plain load, rows trained
    assert "fast_inference" not in plain.calls["from_pretrained"]
    assert plain.calls["get_peft_model"]["trainable_token_indices"] == [3, 4]
    with pytest.raises(UserError, match=r"2 new token rows \(300 -> 302\)"):
        _load(monkeypatch, tmp_path, 302, 0.45)


def test_vllm_share_is_grpos_unsloth_rollout_only() -> None:
    from lmforge.rl.config import GrpoCfg
    from lmforge.stages.sft import SftCfg

    cfg = GrpoCfg.model_validate({"train": {"backend": "unsloth"}, "lora": {"method": "qlora"},
                                  "rollout": {"backend": "unsloth", "gpu_memory_utilization": 0.5}})
    assert vllm_share(cfg) == 0.5
    assert vllm_share(GrpoCfg()) is None and vllm_share(SftCfg()) is None
