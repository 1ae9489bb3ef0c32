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
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from lmforge.errors import UserError

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


# stages whose every write is rank 0's and whose data every rank reads alike; the others say
# so in one line under torchrun
STAGES = ("pretrain", "sft")


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
        yield current()
    finally:
        dist.destroy_process_group()


def check_stage(name: str) -> None:
    if current().active and name not in STAGES:
        raise UserError(f"{name} cannot run on several processes yet (distributed: "
                        f"{', '.join(STAGES)}); run it without torchrun")


def main_first(d: Dist) -> Iterator[None]:
    """Rank 0 does a block of work first (writes a shared file), then the others (who find
    it done and read it): `for _ in main_first(d): work()`."""
    if d.main:
        yield
    if d.active:
        barrier()
    if not d.main:
        yield


def local_accum(grad_accum: int, world: int) -> int:
    """Micro-batches per rank per step; the global batch must split evenly."""
    if grad_accum % world:
        raise UserError(f"train.grad_accum={grad_accum} micro-batches cannot be split over "
                        f"{world} ranks: the global batch (micro_batch_size x grad_accum) is "
                        f"the same on any number of ranks, so grad_accum must be a multiple of "
                        f"{world} (or run on fewer ranks)")
    return grad_accum // world


def share(micro: Sequence[T], d: Dist) -> list[T]:
    """This rank's contiguous share of a step's micro-batches."""
    k = local_accum(len(micro), d.world)
    return list(micro[d.rank * k:(d.rank + 1) * k])


def replicate(model: torch.nn.Module) -> torch.nn.Module:
    """DDP on `model`, in place: its gradients are averaged over the ranks in backward."""
    from torch.distributed._composable.replicate import replicate as ddp

    ddp(model)
    return model


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
