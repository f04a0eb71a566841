"""Rewrite: replace outlined stages by RoutedStage modules.

Acts on the stages `FindStages` recorded; the top-level graph keeps its calls to
`stage_i`, whose target now is a RoutedStage (router + N procedures + attention).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import fx

from rmn_fx.nn.routed_stage import RoutedStage

from .infra import PassBase, PassResult


class RouteStages(PassBase):
    def __init__(self, branches: int, attention: bool, routed: Sequence[int], momentum: float = 0.9) -> None:
        self.branches, self.attention, self.routed, self.momentum = branches, attention, list(routed), momentum

    def requires(self, graph_module: fx.GraphModule) -> None:
        names = {stage.name for stage in graph_module.meta.get("rmn_stages", [])}
        if not names or not names <= set(graph_module._modules):
            raise RuntimeError("RouteStages needs OutlineParts first")

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        for stage in graph_module.meta["rmn_stages"]:
            if stage.index not in self.routed:
                continue
            routed = RoutedStage(
                graph_module.get_submodule(stage.name),
                branches=self.branches,
                in_channels=stage.in_channels,
                out_channels=stage.out_channels,
                in_layout=stage.in_layout.name,
                out_layout=stage.out_layout.name,
                attention=self.attention,
                momentum=self.momentum,
            )
            setattr(graph_module, stage.name, routed)
        return PassResult(graph_module, bool(self.routed))
