"""Parameter and FLOP counts, measured the same way for base and converted models.

FLOPs come from `torch.utils.flop_counter.FlopCounterMode` on a real forward pass: it
counts matrix multiplications and convolutions (2 FLOPs per multiply-add); pooling,
element-wise ops and the router's distance computation are not counted, for either model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from .nn.modes import hooks, training_mode


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def free_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on `device` (the kernel's MemAvailable on the CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux: what sysconf knows
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def flop_counts(model: nn.Module, x: torch.Tensor) -> tuple[int, dict[str, int]]:
    """Total FLOPs of `model(x)` and FLOPs per module path (without the root's class prefix).

    Runs with autograd on: FlopCounterMode's module tracker fails under no_grad when a
    parameter is passed straight into a submodule (timm's CaiT class-attention blocks).
    """
    with training_mode(model, False), FlopCounterMode(display=False) as counter:
        model(x)
    per_module = {}
    for name, counts in counter.get_flop_counts().items():
        _, _, path = name.partition(".")
        if path:
            per_module[path] = sum(counts.values())
    return counter.get_total_flops(), per_module


def part_costs(gm, x: torch.Tensor) -> dict[str, tuple[int, float]]:
    """Parameters and FLOPs per sample of each top-level part (stem, stage_i, head) of an
    outlined or converted GraphModule, on input `x`."""
    _, per_module = flop_counts(gm, x)
    parts = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    return {name: (count_params(gm.get_submodule(name)), per_module.get(name, 0) / x.shape[0]) for name in parts}


def output_tensors(output) -> list[torch.Tensor]:
    """The tensors of a model's output, in order: a tensor, or any nesting of dicts, lists
    and tuples of them (a segmentation model's {"out": ...}, a detector backbone's maps)."""
    leaves, _ = tree_flatten(output)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def samples_together(outputs: list) -> list[torch.Tensor]:
    """The outputs of single samples as one batch: each output tensor concatenated."""
    return [torch.cat(column) for column in zip(*map(output_tensors, outputs), strict=True)]


def relative_error(want, got) -> float:
    """max |want - got| / max |want|, the error measure of every function check, computed
    in float64 (integer and half-precision outputs compare too) for each output tensor
    (`output_tensors`); the worst of them."""
    errors = []
    for w, g in zip(output_tensors(want), output_tensors(got), strict=True):
        w, g = w.double(), g.double()
        errors.append(((w - g).abs().max() / w.abs().max().clamp_min(1e-12)).item())
    return max(errors)


def spread_routes(converted: nn.Module, x: torch.Tensor) -> None:
    """Point every routed stage's routing state at different samples of `x`
    (`RoutedStage.spread_over_procedures`: the memories, a gate's weights).

    Right after conversion all memories are zero and every sample takes procedure 0; this
    spreads a batch over min(B, N) procedures, so that checks exercise the dispatch.
    """
    from .nn.routed_stage import routed_stages

    def hook(stage, args):
        if not isinstance(args[0], tuple):  # paths: a multi-path stage, nothing to point
            stage.spread_over_procedures(args[0])

    with hooks(s.register_forward_pre_hook(hook) for s in routed_stages(converted)), torch.no_grad():
        converted.eval()(x)


@dataclass(frozen=True)
class ProcedureCost:
    """FLOPs of one procedure of a routed stage, run alone on the stage's input: `per_sample`
    grows with its sub-batch, `per_call` does not (tables computed once per forward, e.g.
    Swin V2's relative-position-bias MLP), and `calls`: how many procedures ran in the
    converted model's forward."""

    per_sample: float
    per_call: float
    calls: int


def run_with_procedure_costs(converted: nn.Module, x: torch.Tensor) -> tuple[object, list[ProcedureCost]]:
    """Run `converted` on `x` in eval mode; return its output and the cost of one procedure
    of each routed stage (on the stage's input: the first path's where paths cross), its
    per-sample and per-call parts told apart by running it on the whole input and on one
    sample."""
    from .nn.routed_stage import routed_stages

    inputs, side, calls = {}, {}, {}

    def record_input(stage, args):
        inputs[stage] = args[0][0] if isinstance(args[0], tuple) else args[0]
        side[stage] = args[1:]

    def count_call(stage):
        return lambda procedure, args: calls.__setitem__(stage, calls.get(stage, 0) + 1)

    stages = routed_stages(converted)
    watching = [s.register_forward_pre_hook(record_input) for s in stages]
    watching += [p.register_forward_pre_hook(count_call(s)) for s in stages for p in s.procedures]
    with hooks(watching), training_mode(converted, False), torch.no_grad():
        output = converted(x)
    costs = []
    for stage in stages:
        batch = inputs[stage].shape[0]
        with stage.side_inputs(side[stage]):
            whole = flop_counts(stage.procedures[0], inputs[stage])[0]
            one = flop_counts(stage.procedures[0], inputs[stage][:1])[0] if batch > 1 else whole
        per_sample, per_call = whole, 0  # one sample: the two parts cannot be told apart, nor need to be
        if batch > 1:
            per_sample = (whole - one) / (batch - 1)
            per_call = one - per_sample
        costs.append(ProcedureCost(per_sample, per_call, calls.get(stage, 0)))
    return output, costs


def compare(base: nn.Module, converted: nn.Module, x: torch.Tensor) -> dict:
    """Function, FLOPs and parameters of a converted model against its base, on input `x`.

    The anatomy and the rule predict `expected_params` = parameters the base's forward
    uses (modules it never calls, like Inception's auxiliary heads in eval mode, are not
    in the graph) + (N - 1) * routed-stage parameters + the rule's own, and
    `expected_flops_per_sample` = base FLOPs + (paths per sample - 1) * a procedure's FLOPs
    per sample + (procedures run - 1) * its FLOPs per call / batch + the rule's matrix
    products, per routed stage; a conversion is exact when the measured values equal them.
    """
    from .nn.routed_stage import routed_stages
    from .tracing import trace

    with torch.no_grad():
        want = base.eval()(x)
    got, costs = run_with_procedure_costs(converted.eval(), x)
    routed = routed_stages(converted)
    batch = x.shape[0]
    extra_params = sum((s.branches - 1) * count_params(s.procedures[0]) + s.rule_parameters(s.spec, s.config) for s in routed)
    extra_flops = sum(
        (s.paths_per_sample - 1) * c.per_sample + (c.calls - 1) * c.per_call / batch + s.routing_flops_per_sample() for s, c in zip(routed, costs)
    )
    base_flops, converted_flops = flop_counts(base, x)[0] / batch, flop_counts(converted, x)[0] / batch
    return {
        "max_relative_error": relative_error(want, got),
        "base_params": count_params(base),
        "converted_params": count_params(converted),
        "expected_params": count_params(trace(base, x)) + extra_params,  # x: a model only the second capture traces needs it
        "base_flops_per_sample": base_flops,
        "converted_flops_per_sample": converted_flops,
        "expected_flops_per_sample": base_flops + extra_flops,
        "flops_ratio": converted_flops / base_flops if base_flops else float("nan"),
        "per_call_flops": sum(c.per_call for c in costs),  # FLOPs of the routed parts that do not grow with the batch
    }
