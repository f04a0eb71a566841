"""RoutedStage: a stage replaced by a memory router, N procedures and optional attention."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from .attention import ConditionalAttention
from .layout import LAYOUTS
from .routing import MemoryRouter, dispatch

PHASES = ("stem", "routed")


class RoutedStage(nn.Module):
    """N parallel procedures (clones of one stage) behind a nearest-memory router.

    The key is the global average of the stage input; each sample runs through the one
    procedure its key is routed to; Conditional Attention (if on) gates the result.
    Right after construction all procedures equal `procedure` and the attention is the
    identity, so the stage computes what `procedure` computes.

    Phases (`set_phase`): in "stem" (step 1 of the recipe) every sample runs through
    procedure 0, memories stay put, and the attention sees a uniformly random route in
    training (its mean, the uniform code, in eval mode, so that evaluation is
    deterministic); in "routed" (the default) samples go where the router sends them.
    The phase is not in the state dict: the training checkpoint records it.
    `share_across_ranks` prepares the stage for data-parallel training.
    """

    def __init__(
        self,
        procedure: nn.Module,
        branches: int,
        in_channels: int,
        out_channels: int,
        in_layout: str = "NCHW",
        out_layout: str = "NCHW",
        attention: bool = True,
        momentum: float = 0.9,
    ) -> None:
        super().__init__()
        self.in_layout = in_layout
        self._phase = "routed"
        self._every_procedure = False
        self.router = MemoryRouter(branches, in_channels, momentum)
        self.procedures = nn.ModuleList([procedure] + [copy.deepcopy(procedure) for _ in range(branches - 1)])
        self.attention = ConditionalAttention(out_channels, branches, out_layout) if attention else None
        like = next((p for p in procedure.parameters() if p.is_floating_point()), None)
        if like is not None:  # router and attention live where the procedure does, in its dtype
            self.router.to(like.device, like.dtype)
            if self.attention is not None:
                self.attention.to(like.device, like.dtype)

    @property
    def branches(self) -> int:
        return len(self.procedures)

    def set_phase(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        self._phase = phase

    def share_across_ranks(self, all_reduce: Callable[[torch.Tensor], None], every_procedure: bool) -> None:
        """Data-parallel training: memory statistics are summed over ranks by `all_reduce`
        (in place), so every rank keeps identical memories; with `every_procedure` (SyncBN)
        every procedure runs on every step, on an empty sub-batch if need be, so that the
        collective layers inside run on all ranks."""
        self.router.share_statistics(all_reduce)
        self._every_procedure = every_procedure

    def key(self, x: torch.Tensor) -> torch.Tensor:
        """The routing key of each sample: the global average of the stage input, [B, C]."""
        return LAYOUTS[self.in_layout].pool(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._phase == "stem":
            return self._stem_forward(x)
        route = self.router(self.key(x))
        y = dispatch(x, route, self.procedures, self._every_procedure)
        if self.attention is not None:
            y = self.attention(y, route)
        return y

    def _stem_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.procedures[0](x)
        if self.attention is None:
            return y
        if self.training:
            route = torch.randint(self.branches, (x.shape[0],), device=x.device)
            return self.attention(y, route)
        uniform = torch.full((x.shape[0], self.branches), 1.0 / self.branches, device=x.device)
        return self.attention.gate(y, uniform)


def routed_stages(model: nn.Module) -> list[RoutedStage]:
    """The RoutedStage modules of a converted model, in forward order."""
    return [m for m in model.modules() if isinstance(m, RoutedStage)]
