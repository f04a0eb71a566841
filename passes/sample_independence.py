"""Analysis: does every stage compute each sample's output from that sample alone?

A routed stage runs each procedure on its share of the batch. That keeps the original
function only if the stage treats its samples apart: a statistic over the batch computed
inside it (a BatchNorm that keeps no running statistics, attention across the samples)
would be taken over each procedure's share instead, and nothing at conversion would show
it (right after conversion every sample takes the same procedure). So the outlined model
runs on the sample batch, and each stage runs again on the batch's first sample alone: its
output must be that sample's row of the whole batch's output.
"""

from __future__ import annotations

import torch
from torch import fx

from rmn_fx.errors import StageError, first_line
from rmn_fx.nn.modes import training_mode

from .infra import PassBase, PassResult


class CheckStagesKeepSamplesApart(PassBase):
    """Raise StageError for a stage whose output for one sample changes with the other
    samples of its batch. Runs on the outlined model (after `OutlineParts`) with `sample`,
    a batch of two or more."""

    def __init__(self, sample: torch.Tensor) -> None:
        self.sample = sample

    def requires(self, graph_module: fx.GraphModule) -> None:
        if not all(hasattr(graph_module, stage.name) for stage in graph_module.meta.get("rmn_stages", [])):
            raise RuntimeError("CheckStagesKeepSamplesApart needs OutlineParts first")

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        stages = graph_module.meta["rmn_stages"]
        if self.sample.shape[0] < 2 or not stages:
            return PassResult(graph_module, False)
        calls: dict[str, tuple] = {}

        def record(name: str):
            def hook(module, args, output) -> None:
                calls[name] = (args, output)

            return hook

        hooks = [graph_module.get_submodule(stage.name).register_forward_hook(record(stage.name)) for stage in stages]
        try:
            with training_mode(graph_module, False), torch.no_grad():
                graph_module(self.sample)
                for stage in stages:
                    args, output = calls[stage.name]
                    alone = _run_alone(graph_module.get_submodule(stage.name), stage, args)
                    error = _relative_error(_first(output)[:1], _first(alone))
                    if error > _tolerance(args[0].dtype):
                        raise StageError(
                            f"stage {stage.index} (nodes {stage.nodes[0]}..{stage.exit}) mixes the samples of its batch: its output "
                            f"for one sample changes by {error:.2g} (relative) when the others are left out, as a statistic over the "
                            "batch does (a BatchNorm without running statistics, attention across samples); routed, each procedure "
                            "would see only its share - choose other boundaries (--stages) or remove the statistic"
                        )
        finally:
            for hook in hooks:
                hook.remove()
        return PassResult(graph_module, False)


def _run_alone(part: torch.nn.Module, stage, args: tuple):
    """The stage on the first sample of its input alone, with the same side inputs."""
    try:
        return part(args[0][:1], *args[1:])
    except Exception as exc:
        raise StageError(
            f"stage {stage.index} (nodes {stage.nodes[0]}..{stage.exit}) fails on a single sample ({type(exc).__name__}: "
            f"{first_line(exc)}), and routed, a procedure may receive one; convert a model whose stages take any batch size"
        ) from exc


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _relative_error(want: torch.Tensor, got: torch.Tensor) -> float:
    want, got = want.double(), got.double()
    return ((want - got).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def _tolerance(dtype: torch.dtype) -> float:
    """Far above the rounding of kernels that differ between batch sizes (1e-3 in float32)."""
    return max(1e-3, 50 * torch.finfo(dtype).eps) if dtype.is_floating_point else 0.0
