"""Rewrite: replace outlined stages by routed stages of the configured rule.

Acts on the stages `FindStages` recorded; the top-level graph keeps its calls to
`stage_i`, whose target now is a RoutedStage (N procedures + the rule's modules). For
multi-path rules, `path_links` decides where the N paths flow on from one routed stage
straight into the next (the top-level graph then carries a tuple of N tensors between the
two calls) and where they are combined into one tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import fx

from rmn_fx.nn.routed_stage import PartSpec
from rmn_fx.nn.rules import RoutingConfig, create_stage, rule_class

from .find_stages import Stage
from .infra import PassBase, PassResult


def path_links(graph_module: fx.GraphModule, routed: Sequence[int]) -> dict[int, tuple[bool, bool]]:
    """Stage index -> (receives paths, emits paths) for every routed stage.

    Stage l takes the paths of stage l-1 when both are routed, stage l-1's output feeds
    stage l alone, and stage l reads nothing else."""
    calls = {n.target: n for n in graph_module.graph.nodes if n.op == "call_module"}
    links = {}
    for i in routed:
        before = calls.get(f"stage_{i - 1}")
        links[i] = (i - 1 in routed and before is not None and calls[f"stage_{i}"].all_input_nodes == [before] and len(before.users) == 1, False)
    for i in routed:
        if links.get(i + 1, (False,))[0]:
            links[i] = (links[i][0], True)
    return links


def part_spec(stage: Stage, receives_paths: bool = False, emits_paths: bool = False) -> PartSpec:
    return PartSpec(
        in_channels=stage.in_channels,
        out_channels=stage.out_channels,
        in_layout=stage.in_layout.name,
        out_layout=stage.out_layout.name,
        in_shape=tuple(stage.in_shape[1:]),
        out_shape=tuple(stage.out_shape[1:]),
        receives_paths=receives_paths,
        emits_paths=emits_paths,
        side_inputs=len(stage.side_inputs),
        side_outputs=len(stage.side_outputs),
    )


def part_specs(graph_module: fx.GraphModule, config: RoutingConfig, routed: Sequence[int]) -> dict[int, PartSpec]:
    """The PartSpec of every routed stage (paths linked only for multi-path rules)."""
    stages = {s.index: s for s in graph_module.meta["rmn_stages"]}
    links = path_links(graph_module, routed) if rule_class(config.rule).multipath else {i: (False, False) for i in routed}
    return {i: part_spec(stages[i], *links[i]) for i in routed}


class RouteStages(PassBase):
    def __init__(self, config: RoutingConfig, routed: Sequence[int]) -> None:
        self.config, self.routed = config, list(routed)

    def requires(self, graph_module: fx.GraphModule) -> None:
        names = {stage.name for stage in graph_module.meta.get("rmn_stages", [])}
        if not names or not names <= set(graph_module._modules):
            raise RuntimeError("RouteStages needs OutlineParts first")

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        for index, spec in part_specs(graph_module, self.config, self.routed).items():
            name = f"stage_{index}"
            setattr(graph_module, name, create_stage(graph_module.get_submodule(name), spec, self.config))
            if spec.emits_paths:
                _name_result(graph_module.graph, name, f"{name}_paths")
        return PassResult(graph_module, bool(self.routed))


def _name_result(graph: fx.Graph, target: str, name: str) -> None:
    """Rename the value of the call to `target`, so that `gm.code` says it holds paths."""
    call = next(n for n in graph.nodes if n.op == "call_module" and n.target == target)
    with graph.inserting_after(call):
        renamed = graph.create_node("call_module", target, call.args, call.kwargs, name=name)
    renamed.meta = call.meta
    call.replace_all_uses_with(renamed)
    graph.erase_node(call)
