"""Rewrite: remove the first k downsamplings of a backbone (small-image recipes).

The paper trains on 32x32 and 64x64 images (CIFAR, Tiny ImageNet) with the first two
downsamplings removed, as CIFAR variants of ResNet do by hand. Here the rule is general:
the first k main-path segments that drop resolution (see `find_stages`) are found, and in
each, every operation whose output has fewer positions than its input is made to keep the
resolution:
- a convolution gets stride 1 (its kernel and weights stay), which keeps the map size
  when its padding is "same" (2p == d(k-1)); otherwise the pass refuses;
- a pooling module whose job is downsampling becomes `nn.Identity` (same name, so the
  code still reads `maxpool = self.maxpool(...)`), a pooling function gets kernel 1.
Anything else that downsamples (a strided slice, an opaque leaf module) is refused with
the node named. Node names do not change, so a stage plan found before the rewrite still applies after.
The rewritten segments are listed on `meta["rmn_removed_drops"]` as (before, after) node
names, for a check once shapes are propagated again: `check_removed`.
"""

from __future__ import annotations

import torch.nn.functional as F
from timm.layers import Conv2dSame
from torch import fx, nn

from rmn_fx.errors import StageError

from .find_stages import DROP_FACTOR, GraphFacts
from .infra import PassBase, PassResult

POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
POOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d}
CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class RemoveDownsampling(PassBase):
    """Make the first `count` resolution drops of the main path keep the resolution."""

    def __init__(self, count: int) -> None:
        self.count = count

    def requires(self, graph_module: fx.GraphModule) -> None:
        if not any("rmn_resolution" in n.meta for n in graph_module.graph.nodes):
            raise RuntimeError("RemoveDownsampling needs ShapePropagation first")

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        if self.count == 0:
            return PassResult(graph_module, False)
        facts = GraphFacts(graph_module)
        drops = [k for k in range(1, len(facts.cuts)) if facts.drops(k)]
        if len(drops) < self.count:
            raise StageError(
                f"asked to remove {self.count} downsamplings, but the network has {len(drops)}; "
                f"use --remove-downsamplings {len(drops)} or fewer"
            )
        for k in drops[: self.count]:
            strided = [n for n in facts.segment(k) if _downsamples(n)]
            for node in strided:
                _keep_resolution(graph_module, node)
        graph_module.meta["rmn_removed_drops"] = [(facts.cuts[k - 1].name, facts.cuts[k].name) for k in drops[: self.count]]
        return PassResult(graph_module, True)


def check_removed(graph_module: fx.GraphModule) -> None:
    """Raise if a rewritten segment still lowers the resolution (after a new ShapePropagation)."""
    nodes = {n.name: n for n in graph_module.graph.nodes}
    for before, after in graph_module.meta.get("rmn_removed_drops", ()):
        kept = nodes[before].meta.get("rmn_resolution"), nodes[after].meta.get("rmn_resolution")
        if kept[0] != kept[1]:
            raise StageError(
                f"the downsampling between '{before}' and '{after}' could not be removed "
                f"({kept[0]} -> {kept[1]} positions); use --remove-downsamplings 0"
            )


def _downsamples(node: fx.Node) -> bool:
    after = node.meta.get("rmn_resolution")
    before = [a.meta.get("rmn_resolution") for a in node.all_input_nodes]
    before = [r for r in before if r is not None]
    return after is not None and bool(before) and after * DROP_FACTOR <= max(before)


def _keep_resolution(gm: fx.GraphModule, node: fx.Node) -> None:
    if node.op == "call_function" and node.target in POOL_FUNCTIONS:
        node.args, node.kwargs = (node.args[0], 1), {"stride": 1, "padding": 0}
        return
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        # a leaf module (torchvision's Conv2dNormActivation, a stem block) is opened up
        strided = [(name, m) for name, m in module.named_modules() if _is_strided(m)]
        for name, inner in strided:
            path = f"{node.target}.{name}" if name else node.target
            if isinstance(inner, POOL_MODULES):
                parent, _, attr = path.rpartition(".")
                setattr(gm.get_submodule(parent), attr, nn.Identity())
            else:
                _unstride(path, inner)
        if strided:
            return
        what = f"module '{node.target}' ({type(module).__name__})"
    else:
        what = f"node '{node.name}' ({node.op} {getattr(node.target, '__name__', node.target)})"
    raise StageError(
        f"cannot remove the downsampling done by {what}: only strided convolutions and pools "
        "can be made to keep the resolution; use --remove-downsamplings 0 or a larger input size"
    )


def _is_strided(module: nn.Module) -> bool:
    if not isinstance(module, (*POOL_MODULES, *CONV_MODULES)):
        return False
    stride = module.stride if module.stride is not None else module.kernel_size
    return any(s > 1 for s in ((stride,) if isinstance(stride, int) else stride))


def _unstride(target: str, conv: nn.Module) -> None:
    padding = conv.padding
    if isinstance(padding, str):
        same = padding == "same"
    else:
        same = all(2 * p == d * (k - 1) for p, d, k in zip(padding, conv.dilation, conv.kernel_size))
    if not same and not isinstance(conv, Conv2dSame):  # Conv2dSame pads from its stride at run time
        raise StageError(
            f"cannot remove the downsampling of conv '{target}' (kernel {tuple(conv.kernel_size)}, "
            f"padding {padding}): with stride 1 it would shrink the map; use --remove-downsamplings 0"
        )
    conv.stride = (1,) * len(conv.kernel_size)
