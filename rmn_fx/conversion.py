"""The public API: analyse a backbone, and transform it into a routed GraphModule.

    analyze:   trace -> ShapePropagation -> PackBoundaries -> FindStages -> CarryBatchedSideInputs
               -> OutlineParts -> RemoveInnerPacks -> CheckStagesKeepSamplesApart   (an Anatomy)
    transform: analyze -> RouteStages -> verify on the sample input      (a GraphModule)

The converted GraphModule's top-level code reads stem -> stage_1 ... stage_S -> head, and
`gm.meta["rmn_fx"]` records how it was made (what `save` stores to rebuild it).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from rmn_fx.passes.find_stages import (
    GRANULARITIES,
    FindStages,
    Stage,
    parse_stage_ranges,
)
from rmn_fx.passes.infra import PassManager
from rmn_fx.passes.outline import OutlineParts
from rmn_fx.passes.pack_boundaries import CarryBatchedSideInputs, PackBoundaries, RemoveInnerPacks
from rmn_fx.passes.remove_downsampling import RemoveDownsampling, check_removed
from rmn_fx.passes.route import RouteStages, part_specs
from rmn_fx.passes.sample_independence import CheckStagesKeepSamplesApart
from rmn_fx.passes.shape_prop import ShapePropagation, sample_input

from .errors import ConversionError, ModulesLeftOutWarning, OptionError, RMNError
from .measure import (
    count_params,
    flop_counts,
    free_memory,
    output_tensors,
    relative_error,
)
from .models import check_convertible, create_model, default_input_size
from .nn.layout import PackedLayout
from .nn.modes import training_mode
from .nn.routed_stage import PartSpec, routed_stages
from .nn.rules import RoutingConfig, rule_class
from .tracing import CAPTURES, describe_left_out, left_out_modules, trace

VERIFY_RTOL = 1e-5


@dataclass
class Anatomy:
    """A backbone split into stem, stages and head (outlined, not yet routed)."""

    graph_module: fx.GraphModule
    stages: list[Stage]
    input_size: tuple[int, ...]
    source: dict | None
    sample: torch.Tensor  # the input of shape propagation, on the model's device and dtype
    sample_output: object  # the base model's output on `sample`: the verification reference
    left_out: list[tuple[str, int]] = field(default_factory=list)  # (module path, parameters) the graph never uses
    capture: str = CAPTURES[0]  # how the graph was captured (`tracing.CAPTURES`)

    def parts(self) -> list[dict]:
        """One row per part: name, modules, shapes, parameters, share of FLOPs."""
        total, per_module = flop_counts(self.graph_module, self.sample)
        stages = {s.name: s for s in self.stages}
        rows = []
        for name in part_order_of(self.graph_module):
            part = self.graph_module.get_submodule(name)
            stage = stages.get(name)
            rows.append(
                {
                    "part": name,
                    "modules": list(self.graph_module.meta["rmn_part_modules"].get(name, ())),
                    "in_shape": _sample_shape(stage.in_layout, stage.in_shape) if stage else None,
                    "out_shape": _sample_shape(stage.out_layout, stage.out_shape) if stage else None,
                    "layout": stage.in_layout.name if stage else None,
                    "params": count_params(part),
                    "flops_share": per_module.get(name, 0) / total if total else 0.0,
                }
            )
        return rows

    def stage_ranges(self) -> str | None:
        """The stages as a --stages value, or None if a stage holds no whole module."""
        if not all(s.modules for s in self.stages):
            return None
        return ",".join(f"{s.modules[0]}:{s.modules[-1]}" for s in self.stages)


def _sample_shape(layout, shape) -> list:
    """One sample's shape at a stage's end; for tensors packed there, each one's shape."""
    if isinstance(layout, PackedLayout):
        return [list(s) for s in layout.shapes]
    return list(shape[1:])


def part_order_of(gm: fx.GraphModule) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "call_module"]


def _resolve(model: nn.Module | str, num_classes: int | None):
    if isinstance(model, str):
        check_convertible(model)
        return create_model(model, num_classes), {"model": model, "num_classes": num_classes}
    if not isinstance(model, nn.Module):
        raise OptionError(f"expected an nn.Module or a model name, got {type(model).__name__}")
    if num_classes is not None:
        raise OptionError("num_classes applies to model names only; build your model with the classes you need")
    if routed_stages(model):
        raise OptionError("this model is already converted (it has RoutedStage modules); convert the original network")
    return copy.deepcopy(model), None


@contextlib.contextmanager
def left_out_said_elsewhere():
    """Silence `ModulesLeftOutWarning` where the user is told otherwise: the CLI prints its
    own line, and a file being loaded was converted (and said so) before."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ModulesLeftOutWarning)
        yield


def _check_input_size(input_size) -> tuple[int, ...]:
    size = tuple(input_size)
    if len(size) not in (3, 4) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
        raise OptionError(f"input_size must be positive integers C,H,W (an image) or C,T,H,W (a video), got {input_size!r}")
    return size


def analyze(
    model: nn.Module | str,
    stages: str | Sequence | None = None,
    input_size: Sequence[int] | None = None,
    num_classes: int | None = None,
    remove_downsamplings: int = 0,
    granularity: str = "stage",
) -> Anatomy:
    """Find the stem, stages and head of `model` (an nn.Module or a model name).

    remove_downsamplings: make the first k resolution drops keep the resolution first
    (the paper's small-image variant); the anatomy is that of the rewritten network.
    granularity: "stage" (the parts are the downsampling stages) or "block" (every block
    inside a stage is a part of its own).
    """
    base, source = _resolve(model, num_classes)
    size = _check_input_size(input_size or default_input_size(base, source and source["model"]))
    ranges = parse_stage_ranges(stages) if stages is not None else None
    if isinstance(remove_downsamplings, bool) or not isinstance(remove_downsamplings, int) or remove_downsamplings < 0:
        raise OptionError(f"remove_downsamplings must be an integer >= 0, got {remove_downsamplings!r}")
    if granularity not in GRANULARITIES:
        raise OptionError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    gm = trace(base, _sample_for(base, size))
    capture = gm.meta["rmn_capture"]
    left_out = left_out_modules(base, gm)
    if remove_downsamplings and capture != CAPTURES[0]:
        raise OptionError(
            "remove_downsamplings needs a graph that runs at other input sizes, but this model was traced with its "
            "sizes fixed at the sample's (plain torch.fx cannot trace it); convert it without removing downsamplings"
        )
    if remove_downsamplings:  # find the anatomy first, where the original network has room for it
        gm = _remove_downsamplings(gm, base, size, ranges, remove_downsamplings, granularity)
        ranges = None
    shapes = ShapePropagation(_sample_for(base, size))
    plan = gm.meta.pop("rmn_stage_plan", None)
    find_stages = FindStages(ranges, plan, granularity)
    gm, _ = PassManager([shapes, PackBoundaries(shapes, ranges), find_stages, CarryBatchedSideInputs(shapes, find_stages)])(gm)
    check_removed(gm)
    gm, _ = PassManager([OutlineParts(), RemoveInnerPacks(), CheckStagesKeepSamplesApart(shapes.sample)])(gm)
    return Anatomy(gm, gm.meta["rmn_stages"], size, source, shapes.sample, shapes.output, left_out, capture)


def _remove_downsamplings(gm: fx.GraphModule, base: nn.Module, size, ranges, count: int, granularity: str) -> fx.GraphModule:
    """Find the stages on the original network at 2^count times the height and width (where
    its maps have the sizes the rewritten network's have at `size`; a video's frames stay),
    then rewrite; the stage plan travels on `gm.meta["rmn_stage_plan"]`."""
    *leading, height, width = size
    detect = ShapePropagation(_sample_for(base, (*leading, height << count, width << count)))
    find_stages = FindStages(ranges, granularity=granularity)
    gm, _ = PassManager([detect, PackBoundaries(detect, ranges), find_stages, CarryBatchedSideInputs(detect, find_stages), RemoveDownsampling(count)])(gm)
    gm.meta["rmn_stage_plan"] = [(s.entry, s.exit) for s in gm.meta.pop("rmn_stages")]
    return gm


def _sample_for(model: nn.Module, size: tuple[int, ...]) -> torch.Tensor:
    """The sample input, on the device and in the floating dtype of the model's parameters."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    sample = sample_input(size)
    return sample if param is None else sample.to(device=param.device, dtype=param.dtype)


def transform(
    model: nn.Module | str,
    branches: int = 8,
    attention: bool | None = None,
    stages: str | Sequence | None = None,
    routed: Sequence[int] | None = None,
    input_size: Sequence[int] | None = None,
    momentum: float | None = None,
    num_classes: int | None = None,
    remove_downsamplings: int = 0,
    verify: bool = True,
    routing: str | RoutingConfig = "memory",
    top_k: int | None = None,
    granularity: str = "stage",
) -> fx.GraphModule:
    """Convert `model` into a routed GraphModule with `branches` procedures per routed stage.

    model:      an nn.Module (left untouched; it is copied) or a model name.
    routing:    the rule (`rmn_fx.nn.rule_names()`: "memory", "gate", "cross-connections",
                "cross-prediction"), or a RoutingConfig (then leave branches and the rule
                options at their defaults). Rule options: attention, momentum (memory),
                top_k (gate); None takes the rule's default.
    stages:     module-path ranges "a:b,c:d" instead of automatic detection.
    granularity: "stage" routes each stage; "block" routes each block of every stage as a
                part of its own (then `routed` counts blocks).
    routed:     1-based indices of the stages (parts) to route (default: all).
    input_size: C,H,W (or C,T,H,W for a video) of the sample used for shape propagation (default: the model's own).
    remove_downsamplings: remove the first k downsamplings first (small images, see analyze).
    verify:     check on the sample that the result computes the original function.
    """
    config = routing_config(routing, branches, attention, momentum, top_k)
    anatomy = analyze(model, stages, input_size, num_classes, remove_downsamplings, granularity)
    count = len(anatomy.stages)
    routed = list(range(1, count + 1)) if routed is None else sorted(set(routed))
    if not routed or not all(isinstance(i, int) and 1 <= i <= count for i in routed):
        raise OptionError(f"routed stages must be indices in 1..{count}, got {routed!r}")
    specs = part_specs(anatomy.graph_module, config, routed)
    check_memory_for(anatomy, config, specs)
    base_params = count_params(anatomy.graph_module)  # what the base's forward uses (before cloning)
    gm, _ = PassManager([RouteStages(config, routed)])(anatomy.graph_module)
    gm.meta["rmn_fx"] = {
        "source": anatomy.source,
        "input_size": list(anatomy.input_size),
        "routing": config.as_meta(),
        "routed": routed,
        "remove_downsamplings": remove_downsamplings,
        "stages": None if stages is None else [list(r) for r in parse_stage_ranges(stages)],
        "granularity": granularity,
        "stage_plan": [[s.entry, s.exit] for s in anatomy.stages],
        "left_out": [[path, count] for path, count in anatomy.left_out],
        "capture": anatomy.capture,
        "base_params": base_params,
    }
    if anatomy.left_out:
        warnings.warn(describe_left_out(anatomy.left_out), ModulesLeftOutWarning, stacklevel=2)
    if verify:
        with training_mode(gm, False), torch.no_grad():
            _verify(output_tensors(anatomy.sample_output), output_tensors(gm(anatomy.sample)))
    return gm


def routing_config(routing: str | RoutingConfig, branches: int, attention, momentum, top_k) -> RoutingConfig:
    """The typed routing of a `transform` call (a RoutingConfig given whole, or built here)."""
    if isinstance(routing, RoutingConfig):
        if (branches, attention, momentum, top_k) != (8, None, None, None):
            raise OptionError("give the branches and rule options inside the RoutingConfig, not beside it")
        return routing
    if not isinstance(routing, str):
        raise OptionError(f"routing must be a rule name or a RoutingConfig, got {type(routing).__name__}")
    return RoutingConfig(routing, branches, attention, momentum, top_k)


def added_parameters(anatomy: Anatomy, config: RoutingConfig, specs: dict[int, PartSpec]) -> int:
    """Parameters and buffer entries the conversion adds: (N - 1) copies of every routed
    stage and the rule's own (attention, memories, gates); known before anything is copied."""
    rule = rule_class(config.rule)
    stages = {s.index: s for s in anatomy.stages}
    return sum(
        (config.branches - 1) * stages[i].params + rule.rule_parameters(spec, config) + rule.rule_buffer_numel(spec, config)
        for i, spec in specs.items()
    )


def check_memory_for(anatomy: Anatomy, config: RoutingConfig, specs: dict[int, PartSpec]) -> None:
    """Refuse a conversion whose copies cannot fit in the memory free on the model's device."""
    added = added_parameters(anatomy, config, specs)
    needed = added * anatomy.sample.element_size()
    free = free_memory(anatomy.sample.device)
    if needed > free:
        raise OptionError(
            f"{config.branches} branches would add {added:,} parameters and memory entries ({needed / 2**30:.1f} GiB), more than the "
            f"{free / 2**30:.1f} GiB of memory free on {anatomy.sample.device}; use fewer branches or route fewer stages"
        )


def _verify(expected: list[torch.Tensor], actual: list[torch.Tensor]) -> None:
    if len(expected) != len(actual):
        raise ConversionError("the converted model returns a different number of tensors than the original")
    for want, got in zip(expected, actual):
        error = relative_error(want, got) if want.shape == got.shape and want.numel() else 0.0
        if want.shape != got.shape or error > VERIFY_RTOL:
            raise ConversionError(
                f"the converted model differs from the original on the sample input (relative error {error:.3g}); please report this model"
            )


__all__ = ["Anatomy", "RMNError", "analyze", "transform"]
