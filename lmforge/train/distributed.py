"""Training on several processes with PyTorch's own engine. When the process is one rank of
an initialized process group (`torch.distributed`: NCCL between GPUs, gloo on CPUs), the loop
trains data-parallel with PyTorch's DDP in its composable form (`replicate`: applied to the
model in place, so a stage's closures that call the model keep working, and its gradient
all-reduce runs in backward).

The global batch is the config's, micro_batch_size x grad_accum, whatever the number of
ranks: a stage hands the loop the step's grad_accum micro-batches, and each rank trains on
its own contiguous share of grad_accum / world of them. Every rank knows every micro-batch's
weight (its loss tokens), so the weighted mean over the global batch needs no extra exchange:
each rank scales its losses by weight / (total weight) x world, and DDP's mean over ranks
turns that into the single-process gradient. Logging, checkpoints and exports are rank 0's.

With `train.parallel: fsdp` the model is sharded instead of replicated: FSDP2's `fully_shard`
on every transformer block (the classes the model names in `_no_split_modules`), then on the
root, so each rank holds 1/world of the weights, gradients and AdamW states (ZeRO-3; with
`reshard_after_forward: false` a block's gathered weights stay until its backward, ZeRO-2-like).
On several ranks, checkpoints are `torch.distributed.checkpoint` directories: every rank writes
its own shards, nothing is gathered, and any number of ranks (one included) can load them. The
HF `final/` is written by rank 0 from the full weights gathered once, one tensor at a time, to
its CPU memory.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from lmforge.errors import UserError
from lmforge.train.precision import DTYPES

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def current() -> Dist:
    """This process's place: from the initialized process group, else a world of one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size())
    return Dist()


# the stages that run under torchrun (every training stage: each write is rank 0's, the data
# every rank's alike); the others say so in one line
STAGES = ("pretrain", "sft", "rm", "dpo", "kto", "distill", "grpo", "ppo")
# stages whose model FSDP can shard: the RL stages sample on each rank's own prompts, so their
# ranks call the model a different number of times, which weights gathered by all ranks
# together (every forward a collective) cannot serve
FSDP_STAGES = ("pretrain", "sft", "rm", "dpo", "kto", "distill")


def launched() -> bool:
    """Started by torchrun (or any launcher that sets the env:// variables) with > 1 rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch_rank() -> int:
    """The rank the launcher gave this process (0 without one); unlike `current()`, still
    known after the process group is gone (an error reported on the way out)."""
    return int(os.environ.get("RANK", "0"))


@contextmanager
def session() -> Iterator[Dist]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, ...) for the
    block: NCCL with one GPU per local rank where CUDA is, else gloo."""
    import torch.distributed as dist

    if not launched() or dist.is_initialized():
        yield current()
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        # one log: what a stage prints is rank 0's (errors and warnings, on stderr, are every
        # rank's; a user error is printed by rank 0 alone, see cli.py)
        with open(os.devnull, "w") as sink, \
                contextlib.redirect_stdout(sink if dist.get_rank() else sys.stdout):
            yield current()
    finally:
        dist.destroy_process_group()


def check_stage(name: str, cfg: Any) -> None:
    """Under torchrun: whether stage `name` with config `cfg` can run, else one line."""
    if not current().active:
        return
    train = getattr(cfg, "train", None)
    parallel = getattr(train, "parallel", "ddp")
    if name not in STAGES:
        raise UserError(f"{name} cannot run on several processes yet (distributed: "
                        f"{', '.join(STAGES)}); run it without torchrun")
    if parallel == "fsdp" and name not in FSDP_STAGES:
        raise UserError(f"train.parallel=fsdp: {name} cannot shard its model (FSDP: "
                        f"{', '.join(FSDP_STAGES)}); use train.parallel=ddp")
    if getattr(train, "backend", "hf") != "hf":
        raise UserError(f"train.backend={train.backend} trains on one GPU; under torchrun use "  # type: ignore[union-attr]
                        "train.backend=hf")
    if getattr(getattr(cfg, "critic", None), "share_base", False):
        raise UserError("critic.share_base under torchrun: the critic's adapter lives in the "
                        "actor's layers, which one DDP unit per model cannot split; set "
                        "critic.share_base=false")
    rollout = getattr(cfg, "rollout", None)
    if getattr(rollout, "backend", "hf") != "hf":
        raise UserError(f"rollout.backend={rollout.backend}: one engine per rank is not "  # type: ignore[union-attr]
                        "supported under torchrun yet; use rollout.backend=hf")


def main_first(d: Dist) -> Iterator[None]:
    """Rank 0 does a block of work first (writes a shared file), then the others (who find
    it done and read it): `for _ in main_first(d): work()`."""
    if d.main:
        yield
    if d.active:
        barrier()
    if not d.main:
        yield


def check_split(micro_batches: int, world: int, what: str = "") -> None:
    """A step's micro-batches must split evenly over the ranks. `what` names where the count
    comes from when it is not train.grad_accum (RL: the rollouts)."""
    if micro_batches % world:
        source = what or (f"train.grad_accum={micro_batches}: the global batch (micro_batch_size "
                          "x grad_accum) is the same on any number of ranks, so grad_accum")
        raise UserError(f"{micro_batches} micro-batches a step cannot be split over {world} "
                        f"ranks ({source} must be a multiple of {world}); run on fewer ranks")


def share(micro: Sequence[T], weights: Sequence[float], d: Dist) -> tuple[list[T], list[float], int]:
    """This rank's contiguous share of a step's micro-batches and their weights. A step with
    fewer than its planned micro-batches (an RL round whose dynamic sampling fell short) is
    padded to a multiple of the ranks with weight-0 repeats of its last micro-batch: every rank
    must run as many backwards (each an all-reduce), and a weight of 0 adds nothing. The
    third value: how many of the share are real (the pads come last)."""
    n, pad = len(micro), -len(micro) % d.world
    micro, weights = [*micro, *[micro[-1]] * pad], [*weights, *[0.0] * pad]
    k = len(micro) // d.world
    lo = d.rank * k
    return micro[lo:lo + k], weights[lo:lo + k], max(0, min(k, n - lo))


def replicate(model: torch.nn.Module) -> torch.nn.Module:
    """DDP on `model`, in place: its gradients are averaged over the ranks in backward. Models
    trained as one (PPO's actor and critic) are each their own DDP unit: DDP averages only
    what passed through its module's forward, and the stage calls each part's."""
    from torch.distributed._composable.replicate import replicate as ddp

    from lmforge.train.checkpoint import Composite

    if isinstance(model, Composite):
        for part in model.children():
            replicate(part)
        return model

    # no buffer broadcast: the buffers here (rotary frequencies) never change, and the
    # broadcast would be a collective in every forward, hanging ranks that sample their own
    # prompts (a different number of forward calls each)
    ddp(model, broadcast_buffers=False)
    return model


def parallelize(model: torch.nn.Module, cfg: Any, precision: str,
                micro_batches: tuple[int, str] | None) -> torch.nn.Module | None:
    """DDP or FSDP2 on `model` as `cfg` (a TrainCfg) says, in place, before any optimizer sees
    it; under FSDP returns the model's skeleton, to export from. Bad settings are said here,
    before any step."""
    count, what = micro_batches or (cfg.grad_accum, "")
    check_split(count, current().world, what)
    if cfg.parallel == "ddp":
        replicate(model)
        return None
    if precision == "fp16":
        raise UserError("train.parallel=fsdp with train.precision=fp16: the loss scaler does not "
                        "unscale sharded gradients here; use bf16 (FSDP's mixed-precision "
                        "policy) or fp32")
    low = None if precision == "fp32" else DTYPES[precision]  # bf16: compute in it
    return fully_shard_blocks(model, cfg.reshard_after_forward, low)


def nonfinite(model: torch.nn.Module, sharded: bool, device: torch.device) -> tuple[int, str]:
    """(how many weight tensors hold inf/nan, the first one's name); with sharded weights each
    rank checks its own shards and the count is summed, so every rank stops or none does."""
    bad = [n for n, p in model.named_parameters()
           if not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()]
    found = int(all_sum([float(len(bad))], device)[0]) if sharded else len(bad)
    return found, bad[0] if bad else "all on other ranks' shards"


def fully_shard_blocks(model: torch.nn.Module, reshard_after_forward: bool,
                      param_dtype: torch.dtype | None) -> torch.nn.Module:
    """FSDP2 on `model`, in place: each transformer block its own unit (its weights gathered
    just before it runs and freed after), then the root (embeddings, final norm, head). With a
    `param_dtype` the gathered weights compute in it while the sharded masters, gradients'
    reduction and AdamW stay fp32 (the mixed-precision policy). Returns the model's skeleton:
    its structure on the meta device, into which rank 0 loads the gathered weights to export."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    quantized = [n for n, p in model.named_parameters() if type(p).__module__.startswith("bitsandbytes")]
    if quantized:
        raise UserError(f"train.parallel=fsdp cannot shard bitsandbytes-quantized weights "
                        f"({quantized[0]}: QLoRA); use train.parallel=ddp, or lora.method=lora")
    names = set(itertools.chain.from_iterable(getattr(m, "_no_split_modules", None) or ()
                                              for m in model.modules()))
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise UserError(f"train.parallel=fsdp: {type(model).__name__} names no transformer "
                        "blocks (_no_split_modules) to shard one by one; use train.parallel=ddp")
    skeleton = _meta_copy(model)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32
                                  if param_dtype is not None else None)
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    # the root's own weights (embeddings, head) are needed again at once by backward
    fully_shard(model, reshard_after_forward=False, mp_policy=policy)
    return skeleton


def _meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy whose parameters are on the meta device (no memory); buffers, small and
    never sharded (rotary frequencies), are copied as they are."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"),
                                         requires_grad=p.requires_grad)
    return copy.deepcopy(model, memo)


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on rank 0's CPU, gathered tensor by tensor (empty on the
    other ranks); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


def materialize(skeleton: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An unsharded model holding `state`, built from a skeleton (which stays on meta)."""
    model = copy.deepcopy(skeleton)
    uses: dict[int, list[tuple[torch.nn.Module, str]]] = {}  # a tied weight: used in 2 places
    for m in model.modules(remove_duplicate=False):
        for name, p in m.named_parameters(recurse=False):
            uses.setdefault(id(p), []).append((m, name))
    model.load_state_dict(state, assign=True)
    for places in uses.values():  # assign= gave each place its own tensor: tie them again
        first_module, first_name = places[0]
        for m, name in places[1:]:
            setattr(m, name, getattr(first_module, first_name))
    return model


def _state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Model and optimizer state keyed by parameter names, as shards where the model is
    sharded: what DCP saves and loads whatever the number of ranks. Frozen weights (an
    adapter run's base) are rebuilt from their source, as in a single-process checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": msd, "optim": osd}


def save_sharded(d: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its own shards of `d` (replicated tensors once, by one rank)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state_dicts(model, optimizer), checkpoint_id=str(d))


def load_sharded(d: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a DCP checkpoint written by any number of ranks into this run's model and
    optimizer, resharded to this run's ranks (one process included)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = _state_dicts(model, optimizer)
    try:
        dcp.load(state, checkpoint_id=str(d))
    # DCP gathers every rank's failure into one CheckpointException (a BaseException), raised
    # on every rank alike: each leaves with the same line
    except (CheckpointException, ValueError, RuntimeError, KeyError) as e:
        why = next((ln.strip() for ln in str(e).splitlines()
                    if any(w in ln for w in ("size", "shape", "Missing key", "missing"))),
                   str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
        why = re.sub(r"^\w+(Error|Exception): ", "", why)
        raise UserError(f"checkpoint {d.parent} does not match the model ({why[:200]}); set "
                        "train.resume=never to start over") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True))


def part(items: Sequence[T], d: Dist) -> list[T]:
    """This rank's contiguous part of `items`, the parts as equal as they can be (some may be
    empty): e.g. the prompts of an RL round, each rank sampling its own."""
    n = len(items)
    return list(items[d.rank * n // d.world:(d.rank + 1) * n // d.world])


def gather(mine: list[T]) -> list[T]:
    """Every rank's list, concatenated in rank order, on every rank (pickled: rollouts and
    their rewards, small next to a step's tensors)."""
    import torch.distributed as dist

    box: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(box, mine)
    return [x for chunk in box for x in chunk]


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums over the ranks, in float64 (the losses of a step's shares)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return [float(x) for x in t]


def broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank: a decision only rank 0 may take (the time budget's plan,
    a stop), so that no rank waits on a collective another has left."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()
