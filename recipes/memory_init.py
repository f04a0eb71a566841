"""Step 3 of the RMN schedule: memory initialisation by Euclidean k-means.

The model runs over the training data in eval mode; for every routed stage the keys
(global average of the stage input) of all samples are collected, and k-means with
k = N gives the memories. Large sets use MiniBatchKMeans or a sample cap; the seed is
fixed so that the same data gives the same memories.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from sklearn.cluster import KMeans, MiniBatchKMeans
from torch import nn

from rmn_fx.errors import RMNError
from rmn_fx.nn.modes import hooks, training_mode
from rmn_fx.nn.routed_stage import routed_stages

from .distributed import Group, model_device
from .progress import progress


class MemoryInitError(RMNError):
    """k-means cannot give N memories (fewer distinct samples than procedures)."""


@torch.no_grad()
def collect_keys(model: nn.Module, batches: Iterable, max_samples: int | None = None, show_progress: bool = True) -> list[torch.Tensor]:
    """Keys [samples, C] of every routed stage, over `batches` of images (or (images, ...))
    as a loader gives them: on the CPU, moved to the model's device here."""
    stages = routed_stages(model)
    device = model_device(model)
    keys: list[list[torch.Tensor]] = [[] for _ in stages]
    recorders = [
        stage.register_forward_pre_hook(lambda m, args, i=i: keys[i].append(m.key(args[0]).float().cpu()))
        for i, stage in enumerate(stages)
    ]
    seen = 0
    with hooks(recorders), training_mode(model, False):
        for batch in progress(batches, "memory keys" if show_progress else None):
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(images.to(device, non_blocking=True))
            seen += images.shape[0]
            if max_samples is not None and seen >= max_samples:
                break
    return [torch.cat(k)[:max_samples] if k else torch.empty(0) for k in keys]


def kmeans_centres(keys: torch.Tensor, k: int, seed: int = 0, minibatch: bool = False) -> torch.Tensor:
    """Euclidean k-means centres of `keys` [n, C], as float32 [k, C]."""
    data = keys.double().numpy()
    distinct = len(np.unique(data, axis=0))
    if distinct < k:
        raise MemoryInitError(
            f"k-means needs at least {k} distinct samples for {k} procedures, got {distinct}; "
            "use more data or fewer branches"
        )
    algorithm = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3) if minibatch else KMeans(n_clusters=k, random_state=seed, n_init=4)
    return torch.from_numpy(algorithm.fit(data).cluster_centers_).float()


@torch.no_grad()
def init_memories(
    model: nn.Module,
    batches: Iterable,
    seed: int = 0,
    max_samples: int | None = None,
    minibatch: bool = False,
    group: Group | None = None,
) -> None:
    """Set every router's memories to the k-means centres of its stage's keys.

    Data-parallel (`group`): each rank collects the keys of its share, rank 0 runs k-means
    over all of them, and the centres are broadcast, so every rank holds the same memories."""
    group = group or Group()
    stages = routed_stages(model)
    per_rank = group.gather(collect_keys(model, batches, max_samples, group.is_main))
    for i, stage in progress(list(enumerate(stages)), "k-means per stage" if group.is_main else None):
        if group.is_main:
            keys = torch.cat([rank_keys[i] for rank_keys in per_rank])[:max_samples]
            stage.router.memory.copy_(kmeans_centres(keys, stage.branches, seed, minibatch).to(stage.router.memory))
        group.broadcast(stage.router.memory)
