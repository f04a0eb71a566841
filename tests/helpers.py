"""Shared test helpers: routing control and the parameter/FLOP accounting of the method."""

from __future__ import annotations

import torch
from torch import nn

from rmn_fx import RoutedStage
from rmn_fx.layout import LAYOUTS


def routed_stages(gm: nn.Module) -> list[RoutedStage]:
    return [m for m in gm.modules() if isinstance(m, RoutedStage)]


def spread_memories(gm: nn.Module, x: torch.Tensor) -> None:
    """Set each router's memories to the keys of the first samples of `x`, so that the batch
    spreads over min(B, N) procedures (right after conversion all memories are zero)."""

    def hook(stage, args):
        keys = LAYOUTS[stage.in_layout].pool(args[0]).detach()
        index = torch.arange(stage.branches) % keys.shape[0]
        stage.router.memory.copy_(keys[index])

    handles = [s.register_forward_pre_hook(hook) for s in routed_stages(gm)]
    try:
        with torch.no_grad():
            gm.eval()(x)
    finally:
        for h in handles:
            h.remove()


def record_routes(gm: nn.Module) -> tuple[list[list[torch.Tensor]], list]:
    """Routes of every routed stage, appended at each forward; returns (routes, handles)."""
    routes: list[list[torch.Tensor]] = [[] for _ in routed_stages(gm)]
    handles = [
        s.router.register_forward_hook(lambda m, a, out, i=i: routes[i].append(out.detach()))
        for i, s in enumerate(routed_stages(gm))
    ]
    return routes, handles


def attention_params(channels: int, branches: int) -> int:
    hidden = max(1, channels // 16)
    return channels * hidden + hidden + (hidden + branches) * channels + channels


def attention_flops(channels: int, branches: int) -> int:
    """FLOPs per sample of Conditional Attention's two linear layers (2 per multiply-add)."""
    hidden = max(1, channels // 16)
    return 2 * (channels * hidden + (hidden + branches) * channels)


def max_relative_error(want: torch.Tensor, got: torch.Tensor) -> float:
    return ((want - got).abs().max() / want.abs().max().clamp_min(1e-12)).item()
