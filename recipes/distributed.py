"""Data-parallel training with torch.distributed, as `torchrun` starts it.

Every rank runs the same model on its share of each global batch. What RMN adds to plain
DDP: (1) every rank must keep identical memories, so each router all-reduces its
per-procedure key sums and counts before the moving-average update; (2) k-means runs once,
on rank 0, over the keys gathered from all ranks, and its centres are broadcast;
(3) a procedure may receive no sample on a rank, so DDP looks for unused parameters;
(4) with SyncBN, collective layers must run on every rank, so every procedure runs on
every step (on an empty sub-batch if need be). Gloo on CPU, NCCL on CUDA. A torchrun launch
of one process joins a group of one: the same DDP and collective code path as eight GPUs,
which is how that path is checked on a machine with one GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from rmn_fx.nn.routed_stage import routed_stages


@dataclass
class Group:
    """This process's place among the ranks (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    joined: bool = False  # in a torch.distributed process group (torchrun), even one of one process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.joined

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over ranks, in place."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Copy rank 0's `tensor` to every rank, in place."""
        if self.distributed:
            dist.broadcast(tensor, 0)
        return tensor

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        objects = [None] * self.world
        dist.all_gather_object(objects, obj)
        return objects

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def start(device: torch.device) -> Group:
    """Join the process group that torchrun describes in the environment, if any."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not dist.is_torchelastic_launched():
        return Group()
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Group(dist.get_rank(), dist.get_world_size(), joined=True)


def stop(group: Group) -> None:
    if group.distributed and dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """The GPU of this rank (LOCAL_RANK) when training on CUDA under torchrun."""
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def prepare(model: nn.Module, group: Group, sync_bn: bool = False) -> nn.Module:
    """Share memory statistics across ranks and wrap `model` in DDP (returns the wrapper)."""
    if not group.distributed:
        return model
    for stage in routed_stages(model):
        stage.share_across_ranks(group.all_reduce, every_procedure=sync_bn)
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [model_device(model).index] if model_device(model).type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
