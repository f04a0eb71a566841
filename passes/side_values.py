"""Analysis: are the values a stage reads or hands on beside its tensor batch-independent?

A routed stage runs each procedure on its share of the batch. A value it reads that was
computed before it (a grid size, a position table, an attention mask) is passed unchanged
to every procedure, and a value it hands on to later parts beside its output (MViT's
pooled (T, H, W)) is taken from whichever procedure ran. Both are right only if the value
is the same for every batch: neither the samples nor their number may change it. Two
probes with other batch sizes and other contents show which values do change; a value
that stays the same on both (and a shape-derived integer cannot do otherwise) is treated
as independent of the batch. An integer that equals the batch size on both probes is the
batch size (`B = x.shape[0]`, read once before the stages and used inside them): a stage
reads it from its own input instead, the size of its sub-batch.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import fx

from rmn_fx.errors import StageError, first_line
from rmn_fx.nn.modes import training_mode

from .main_path import image_input
from .shape_prop import PlainArgsInterpreter, sample_input, tensor_shape

PROBES = ((3, 1), (4, 2))  # (batch, seed): batch sizes and contents unlike the shape sample's


class _ValueRecorder(PlainArgsInterpreter):
    """Runs the graph and keeps the values of the nodes asked for."""

    def __init__(self, graph_module: fx.GraphModule, wanted: set[fx.Node]) -> None:
        super().__init__(graph_module)
        self.wanted, self.values = wanted, {}

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if n in self.wanted:
            self.values[n] = result
        return result


INDEPENDENT, BATCH_SIZE, DEPENDENT = "independent", "batch size", "dependent"


def classify(graph_module: fx.GraphModule, nodes: Iterable[fx.Node]) -> dict[fx.Node, str]:
    """Per node: INDEPENDENT (the same value on both probes), BATCH_SIZE (an integer equal to
    the probe's batch size on both: `B = x.shape[0]` read once and used later), or DEPENDENT."""
    wanted = set(nodes)
    if not wanted:
        return {}
    example = image_input(graph_module.graph)
    dtype = example.meta["tensor_meta"].dtype
    device = next((t.device for t in (*graph_module.parameters(), *graph_module.buffers())), torch.device("cpu"))
    runs = []
    with training_mode(graph_module, False), torch.no_grad():
        for batch, seed in PROBES:
            probe = sample_input(tensor_shape(example)[1:], batch, seed).to(device, dtype)
            recorder = _ValueRecorder(graph_module, wanted)
            try:
                recorder.run(probe)
            except Exception as exc:
                raise StageError(
                    f"the model fails on a batch of {batch} ({type(exc).__name__}: {first_line(exc)}), so rmn-fx cannot check "
                    "that the values its stages share do not change with the batch; convert a model that takes any batch size"
                ) from exc
            runs.append(recorder.values)
    first, second = runs
    kinds = {}
    for n in wanted:
        if same_value(first[n], second[n]):
            kinds[n] = INDEPENDENT
        elif all(type(run[n]) is int and run[n] == batch for run, (batch, _) in zip(runs, PROBES, strict=True)):
            kinds[n] = BATCH_SIZE
        else:
            kinds[n] = DEPENDENT
    return kinds


def same_value(a, b) -> bool:
    """Equal values, tensors compared by shape and content, containers element by element."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b
