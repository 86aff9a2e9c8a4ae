"""Data-parallel training: who this process is, its share of each batch, and the wrapped model.

One loop serves one process, ``torchrun`` (DDP or FSDP2) and Ray Train's ``TorchTrainer``: torchrun
sets RANK / WORLD_SIZE / LOCAL_RANK and the process group is started here; Ray Train starts the
group itself and the loop finds it already up. Every rank computes the same global micro-batch
(``data.batch_indices`` is a pure function of the step) and keeps its contiguous share of the rows,
so the data order does not depend on the world size and a run resumes exactly at another one.

Losses are masked means over the tokens of the *global* micro-batch: each rank scales its local
mean by (its tokens / all ranks' tokens) * world before DDP / FSDP2 average the gradients, so N
ranks compute the gradient one process computes on the whole batch, also when ranks hold
different numbers of scored tokens (generated data masks its prompts).

Checkpoints are full, unsharded state dicts keyed by parameter name (written by rank 0), so any
world size and either wrapper can resume them.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.distributed as dist

from tandem_vllm.errors import TandemError

Parallel = Literal["ddp", "fsdp"]
TIMEOUT = datetime.timedelta(minutes=10)  # a collective waiting this long for a dead peer ends the job


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    owned: bool = False  # this module started the process group (and ends it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def share(self, n: int) -> slice:
        """This rank's contiguous rows of an n-row global batch (the first n % size ranks get one more)."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))


def join(device: str) -> World:
    """This process's place: the group torchrun describes (started here) or one already started
    (Ray Train), else a single process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_available():
        raise TandemError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return World(rank, size, local, owned=True)


def leave(world: World) -> None:
    """End the process group this module started (Ray Train ends its own)."""
    if world.owned and dist.is_initialized():
        dist.destroy_process_group()


def device_for(world: World, name: str) -> str:
    """``auto`` / ``cuda`` name this rank's own GPU under torchrun."""
    if world.distributed and name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{world.local_rank}"
    return name


def all_sum(world: World, value: float, device: torch.device) -> float:
    if not world.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def weigh(world: World, loss: torch.Tensor, mask: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A rank's masked-mean loss -> its share of the global batch's mean, times the world size (DDP and
    FSDP2 average the ranks' gradients); one process's loss as it is."""
    if not world.distributed:
        return loss
    local = float(mask.sum().item())
    return loss * (local / max(all_sum(world, local, device), 1.0) * world.size)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


@contextmanager
def sync_gradients(model: torch.nn.Module, world: World, parallel: Parallel, sync: bool) -> Iterator[None]:
    """Gradient accumulation: all-reduce only on a step's last micro-batch."""
    if not world.distributed or sync:
        yield
    elif parallel == "ddp":
        with cast(Any, model).no_sync():
            yield
    else:
        cast(Any, model).set_requires_gradient_sync(False)
        try:
            yield
        finally:
            cast(Any, model).set_requires_gradient_sync(True)


def wrap(module: torch.nn.Module, world: World, parallel: Parallel, device: torch.device,
         shard: list[torch.nn.Module], methods: tuple[str, ...] = ()) -> torch.nn.Module:
    """DDP over the module, or FSDP2: every module in ``shard`` (the student's and the target's
    layers) its own unit, then the module itself; ``methods`` are other entry points of those units
    that callers use besides forward (they gather the unit's weights too). A single process gets
    the module back."""
    if not world.distributed:
        return module
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for unit in shard:
        fully_shard(unit)
        for name in methods:
            if hasattr(unit, name):
                register_fsdp_forward_method(unit, name)
    fully_shard(module)
    return module


def full_state(module: torch.nn.Module, opt: torch.optim.Optimizer | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Unsharded model (and optimizer) state keyed by parameter name, on CPU; under FSDP2 every rank
    must call it (the shards are gathered)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model = get_model_state_dict(module, options=options)
    return model, (get_optimizer_state_dict(module, opt, options=options) if opt is not None else None)


def load_full_state(module: torch.nn.Module, opt: torch.optim.Optimizer, model: dict[str, Any], optim: dict[str, Any]) -> None:
    """The inverse of ``full_state``: every rank loads the whole state and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(module, model, options=options)
    set_optimizer_state_dict(module, opt, optim, options=options)
