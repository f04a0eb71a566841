"""Shared test helpers: routing control and the parameter/FLOP accounting of the method."""

from __future__ import annotations

import torch
from torch import nn

from rmn_fx.measure import relative_error as max_relative_error  # noqa: F401 - re-exported for tests
from rmn_fx.measure import spread_routes  # noqa: F401 - re-exported for tests
from rmn_fx.nn.routed_stage import routed_stages


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
