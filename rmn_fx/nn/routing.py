"""Memory-based hard routing and the dispatch that runs each sample through one procedure.

Routing is parameter-free (RMN, NeurIPS 2021): a stage's key is the global average of its
input, and the route is the index of the nearest memory (Euclidean). Memories are buffers
that receive no gradient; in training mode they follow the keys routed to them by a moving
average. In eval mode nothing changes, so a sample's route never depends on its batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .modes import training_mode


class MemoryRouter(nn.Module):
    """Nearest-memory routing over `branches` memories of size `key_dim`.

    Buffers: `memory` [N, C] (the keys' moving averages), `samples` [N] (how many training
    samples each procedure has received, for load reports and dead-procedure detection).
    Under data parallelism (`share_statistics`) the per-procedure key sums and counts are
    summed over ranks before the update, so every rank keeps identical memories.
    Memories start at zero, so every sample takes procedure 0 until they are initialised
    (k-means over training keys, step 3 of the recipe).
    """

    def __init__(self, branches: int, key_dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        self.branches, self.key_dim, self.momentum = branches, key_dim, momentum
        self.register_buffer("memory", torch.zeros(branches, key_dim))
        self.register_buffer("samples", torch.zeros(branches, dtype=torch.long))
        self._all_reduce: Callable[[torch.Tensor], None] | None = None

    def share_statistics(self, all_reduce: Callable[[torch.Tensor], None]) -> None:
        """Sum the update's statistics over data-parallel ranks with `all_reduce` (in place)."""
        self._all_reduce = all_reduce

    def extra_repr(self) -> str:
        return f"branches={self.branches}, key_dim={self.key_dim}, momentum={self.momentum}"

    def nearest(self, key: torch.Tensor) -> torch.Tensor:
        """The index of each row's nearest memory, [B]; changes nothing."""
        return self._nearest(self._as_key(key))

    def forward(self, key: torch.Tensor) -> torch.Tensor:
        """Route each row of `key` [B, C]; in training mode also update the memories."""
        key = self._as_key(key)
        route = self._nearest(key)
        if self.training:
            self.update(key, route)
        return route

    def _as_key(self, key: torch.Tensor) -> torch.Tensor:
        """`key` without gradient, in the memories' dtype (converted only where it differs:
        at batch 1 every op of a stage's routing is a measurable share of its time)."""
        key = key.detach()
        return key if key.dtype == self.memory.dtype else key.to(self.memory.dtype)

    def _nearest(self, key: torch.Tensor) -> torch.Tensor:
        return (key.unsqueeze(1) - self.memory).square().sum(-1).argmin(dim=1)

    @torch.no_grad()
    def update(self, key: torch.Tensor, route: torch.Tensor) -> None:
        """m_j <- a * m_j + (1 - a) * mean(keys routed to j), for every j that got a sample."""
        sums = torch.zeros_like(self.memory).index_add_(0, route, key)
        counts = torch.bincount(route, minlength=self.branches)
        if self._all_reduce is not None:  # data-parallel: every rank applies the global statistics
            self._all_reduce(sums)
            self._all_reduce(counts)
        hit = counts > 0
        means = sums[hit] / counts[hit].unsqueeze(1).to(sums.dtype)
        self.memory[hit] = self.momentum * self.memory[hit] + (1.0 - self.momentum) * means
        self.samples += counts


def run_procedure(procedure: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run `procedure` on a sub-batch. In training mode a lone sample runs in eval mode:
    one sample has no batch statistics (BatchNorm would fail on a 1x1 map, and its
    running statistics are the better estimate anyway). Gradients flow as usual."""
    if not (procedure.training and x.shape[0] == 1):
        return procedure(x)
    with training_mode(procedure, False):
        return procedure(x)


def dispatch(
    x: torch.Tensor, route: torch.Tensor, procedures: nn.ModuleList, every_procedure: bool = False
) -> torch.Tensor:
    """Run each sample of `x` through `procedures[route[i]]` only, and keep the batch order.

    Eagerly and under torch.compile: `sorted_dispatch`. Under torch.export and
    torch.jit.trace, which record one program for every route: `traceable_dispatch`.
    """
    if torch.compiler.is_exporting() or torch.jit.is_tracing():
        return traceable_dispatch(x, route, procedures)
    return sorted_dispatch(x, route, procedures, every_procedure)


def sorted_dispatch(x: torch.Tensor, route: torch.Tensor, procedures: nn.ModuleList, every_procedure: bool = False) -> torch.Tensor:
    """Samples sorted by route, split into one contiguous sub-batch per procedure, run, and
    each output written straight to its samples' rows. Procedures that receive no sample
    are not run, unless `every_procedure` (then all run, in training mode, empty sub-batches
    included: what collective layers such as SyncBatchNorm need). One host sync (the
    sub-batch sizes).

    Under torch.compile this frame runs eagerly, like all of a stage's own code
    (`compile_boundary`), while the procedures it calls are compiled, each on its own (a
    deep-copied GraphModule has its own code) with a dynamic batch axis: a procedure
    compiles once per sub-batch size class torch specialises (1; 2-15; 16 and up), and
    after those a new mix of routes compiles nothing.
    """
    if x.shape[0] == 1 and not every_procedure:  # a single sample (deployment): no sorting, one sync
        return run_procedure(procedures[int(route[0])], x)
    sizes = torch.bincount(route, minlength=len(procedures)).tolist()
    busiest = max(range(len(sizes)), key=sizes.__getitem__)
    if sizes[busiest] == x.shape[0] and not every_procedure:  # one procedure takes the whole batch
        torch._dynamo.maybe_mark_dynamic(x, 0)  # as below
        return run_procedure(procedures[busiest], x)
    order = torch.argsort(route, stable=True)
    out = None
    for procedure, chunk, rows in zip(procedures, x.index_select(0, order).split(sizes), order.split(sizes)):
        torch._dynamo.maybe_mark_dynamic(chunk, 0)  # torch.compile: one graph serves every sub-batch size from 2 up (eager: no-op)
        if every_procedure:  # collectives inside: every rank runs every procedure, in training mode
            y = procedure(chunk)
        elif rows.numel():
            y = run_procedure(procedure, chunk)
        else:
            continue
        if out is None:
            out = empty_batch_like(y, x.shape[0])
        out.index_copy_(0, rows, y)  # each output row written once, in the batch's order
    return out


def empty_batch_like(y: torch.Tensor, batch: int) -> torch.Tensor:
    """An uninitialised [batch, *y.shape[1:]] tensor with y's dtype, device and memory format
    (a channels-last network stays channels-last through a routed stage)."""
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    channels_last = y.dim() in formats and not y.is_contiguous() and y.is_contiguous(memory_format=formats[y.dim()])
    return torch.empty(
        (batch, *y.shape[1:]), dtype=y.dtype, device=y.device,
        memory_format=formats[y.dim()] if channels_last else torch.contiguous_format,
    )


def traceable_dispatch(x: torch.Tensor, route: torch.Tensor, procedures: nn.ModuleList) -> torch.Tensor:
    """`dispatch` without a host sync or a branch on data: per procedure j, the indices of
    its samples (`nonzero(route == j)`), their sub-batch and the procedure; then the
    outputs, concatenated in procedure order, are put back in the batch's order by one
    gather. Every procedure runs, on an empty sub-batch if it has no sample (no FLOPs), so
    the program is the same whatever the routes: what torch.export, ONNX and
    torch.jit.trace record (inference: a procedure runs in its own mode). One gather
    copies the stage's output once, where an `index_copy` per procedure would copy it N
    times (ONNX Runtime's ScatterND copies its whole input). The sub-batch sizes are
    data-dependent (unbacked) sizes; see `rmn_fx.deploy.subbatch_ops` for the layers that
    cannot take them as they are (BatchNorm, GroupNorm)."""
    rows = [torch.nonzero(route == j).squeeze(1) for j in range(len(procedures))]
    outputs = [procedure(x.index_select(0, index)) for procedure, index in zip(procedures, rows, strict=True)]
    return in_batch_order(outputs, route)


def in_batch_order(outputs: list[torch.Tensor], route: torch.Tensor) -> torch.Tensor:
    """The procedures' outputs (procedure j's: its samples' rows, in batch order) as one
    tensor in the batch's order: concatenated, then one gather. The gather's indices come
    from an argsort of (procedure, sample), so every size is the batch's, never a sum of
    data-dependent sub-batch sizes."""
    batch = route.shape[0]
    order = torch.argsort(route * batch + torch.arange(batch, device=route.device))  # the rows concatenated: by procedure, then sample
    position = torch.argsort(order)  # sample i's row in the concatenation
    return torch.cat(outputs).index_select(0, position)
