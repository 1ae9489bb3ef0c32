"""Atomic, exactly resumable checkpoints: an HF directory plus `trainer_state.pt`.

A checkpoint is written into `.tmp-step-N/`, gets a `COMPLETE` mark, and only then is renamed
to `step-N/`. Resume takes the newest `step-N/` that has the mark, so a run killed mid-write
falls back to the previous checkpoint instead of loading half a file. On several ranks the
weights and optimizer are a `dcp/` directory of shards instead, each rank writing its own
(`torch.distributed.checkpoint`), loadable on any number of ranks.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import PreTrainedModel

from lmforge.errors import UserError
from lmforge.io import atomic_dir, replace_dir


class CorruptCheckpoint(UserError):
    """A checkpoint's files exist but do not read (truncated, damaged): resume=auto falls back
    to the one before it."""


COMPLETE = "COMPLETE"
STATE = "trainer_state.pt"
SHARDS = "dcp"  # a distributed checkpoint's weights and optimizer
_STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # numpy's state holds an ndarray, which weights_only loading refuses: store a tensor
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step}"


def save_checkpoint(
    root: Path, step: int, model: PreTrainedModel, trainer_state: dict[str, Any], keep_last: int,
) -> Path:
    final = step_dir(root, step)
    with atomic_dir(final, tmp=root / f".tmp-step-{step}") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        _seal(tmp, step, trainer_state)
    _prune(root, keep_last)
    return final


def save_sharded_checkpoint(root: Path, step: int, write_shards: Callable[[Path], None],
                            trainer_state: dict[str, Any], keep_last: int, main: bool) -> Path:
    """A checkpoint of several ranks: every rank calls this; each writes its shards through
    `write_shards` (a collective), rank 0 the trainer state, the mark and the rename. The
    directory must be one every rank sees (a shared filesystem across nodes)."""
    from lmforge.train.distributed import barrier

    final, tmp = step_dir(root, step), root / f".tmp-step-{step}"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    write_shards(tmp / SHARDS)
    if main:
        _seal(tmp, step, trainer_state)
        replace_dir(tmp, final)
        _prune(root, keep_last)
    barrier()
    return final


def _seal(tmp: Path, step: int, trainer_state: dict[str, Any]) -> None:
    """The trainer state and the COMPLETE mark, flushed before the rename publishes them."""
    torch.save(trainer_state, tmp / STATE)
    (tmp / COMPLETE).write_text(f"{step}\n")
    _fsync_dir(tmp)


class Composite(torch.nn.Module):
    """Several models the loop trains as one (PPO's actor and critic): one optimizer over all
    their parameters, one checkpoint holding each part in a subdirectory of its name, so an
    exact resume restores them together."""

    def __init__(self, **parts: torch.nn.Module) -> None:
        super().__init__()
        for name, part in parts.items():
            self.add_module(name, part)

    def save_pretrained(self, out: str | Path, **kw: Any) -> None:
        for name, part in self.named_children():
            part.save_pretrained(Path(out) / name, **kw)  # type: ignore[operator]


def _fsync_dir(path: Path) -> None:
    """Flush the files before the rename that publishes them (a crash must not publish zeros)."""
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir() and (d / COMPLETE).exists() and (d / STATE).exists():
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def _prune(root: Path, keep_last: int) -> None:
    for _, d in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(d, ignore_errors=True)
    for d in root.glob(".tmp-step-*"):  # leftovers of runs killed mid-write
        shutil.rmtree(d, ignore_errors=True)


def read_safetensors(f: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a damaged file is one line naming it, not a traceback."""
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptCheckpoint(f"{f} is truncated or corrupt ({str(e).splitlines()[0][:120]})") from None


def load_weights(model: PreTrainedModel, ckpt: Path) -> None:
    """Load safetensors shards into `model` in place (the optimizer keeps its param refs).
    Tied weights are saved once, so only keys of tied parameters may be missing."""
    if isinstance(model, Composite):
        for name, part in model.named_children():
            load_weights(part, ckpt / name)  # type: ignore[arg-type]
        return
    if callable(getattr(model, "restore", None)):  # a part that saves itself its own way
        model.restore(ckpt)
        return
    if hasattr(model, "peft_config"):
        _load_adapter(model, ckpt)
        return
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise UserError(f"checkpoint {ckpt} has no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(read_safetensors(f))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch: a checkpoint of another model
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e))
        raise UserError(f"checkpoint {ckpt} does not match the model ({detail}); "
                        "set train.resume=never to start over") from None
    params = dict(model.named_parameters(remove_duplicate=False))
    ids = {id(p) for k, p in params.items() if k in state}
    untied = [k for k in missing if k in params and id(params[k]) not in ids]
    if unexpected or untied:
        raise UserError(f"checkpoint {ckpt} does not match the model: missing {untied[:3]}, "
                        f"unexpected {list(unexpected)[:3]}")


def _load_adapter(model: PreTrainedModel, ckpt: Path) -> None:
    """An adapter run checkpoints only what trains (peft's adapter file); the frozen base is
    rebuilt from its own source on resume."""
    from peft import set_peft_model_state_dict

    f = ckpt / "adapter_model.safetensors"
    if not f.exists():
        raise UserError(f"checkpoint {ckpt} has no adapter weights; set train.resume=never "
                        "to start over")
    try:
        res = set_peft_model_state_dict(model, read_safetensors(f))
    except RuntimeError as e:
        raise UserError(f"checkpoint {ckpt} does not match the adapter ({str(e).splitlines()[0]}); "
                        "set train.resume=never to start over") from None
    # with tied embeddings peft saves the trainable-token rows under both names but loads
    # them through one (shared) parameter, so the head's copy comes back "unexpected"
    unexpected = [k for k in res.unexpected_keys if not k.endswith("trainable_tokens_delta")]
    if unexpected:
        raise UserError(f"checkpoint {ckpt} does not match the adapter: unexpected {unexpected[:3]}")


def load_checkpoint(ckpt: Path, model: PreTrainedModel) -> dict[str, Any]:
    """Restore weights into `model`; return the trainer state (optimizer, scaler, RNG, step)."""
    check_complete(ckpt)
    load_weights(model, ckpt)
    return read_state(ckpt)


def check_complete(ckpt: Path) -> None:
    if not (ckpt / COMPLETE).exists() or not (ckpt / STATE).exists():
        raise UserError(f"not a complete checkpoint: {ckpt} (no {COMPLETE} mark or {STATE})")


def read_state(ckpt: Path) -> dict[str, Any]:
    try:
        return torch.load(ckpt / STATE, weights_only=True)  # type: ignore[no-any-return]
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise CorruptCheckpoint(f"{ckpt / STATE} is truncated or corrupt "
                                f"({str(e).splitlines()[0][:120]})") from None
