"""Ranks and devices of an evaluation run: one process, or one per rank under `torchrun`.

Part of `randfeat eval`, the protocol of Nguyen et al., "Understanding the Robustness of
Randomized Feature Defense Against Query-Based Adversarial Attacks", ICLR 2024 (§5). Under
`torchrun` (`WORLD_SIZE` > 1) every rank joins the process group (env:// init; NCCL on GPUs,
gloo on the CPU); rank 0 prepares the run and broadcasts the plan, units are dealt round-robin,
and after each round rank 0 gathers the rows (`gather_object`) and writes them
(`randfeat.eval.runner.run_eval`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from randfeat.eval.errors import ConfigError

__all__ = ["Dist", "device_name", "init_dist"]


@dataclass
class Dist:
    """This process's rank among the run's processes, and the collective calls rank 0 needs."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    active: bool = False

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on rank 0 (`[]` elsewhere)."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out or []


def init_dist(device: str) -> tuple[Dist, torch.device]:
    """Join torchrun's process group (env:// init) when `WORLD_SIZE` > 1; pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"Unknown --device {device!r}: {err}") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda, but CUDA is not available; use --device cpu.")
        if world > 1 or dev.index is None:
            dev = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    if world <= 1:
        return Dist(), dev
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local, True), dev


def device_name(dev: torch.device) -> str:
    """`"cpu"`, or `"cuda:0 (NVIDIA H100)"`: the device and its model."""
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return str(dev)
