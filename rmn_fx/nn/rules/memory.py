"""Memory routing (RMN): nearest-memory hard routing and Conditional Attention.

The key is the global average of the stage input; each sample runs through the one
procedure its key is routed to; Conditional Attention (if on) gates the result, on each
sub-batch right after its procedure, with that procedure's route code (`followed_by`). Right after
construction the memories are zero (every sample takes procedure 0) and the attention is
the identity. In the stem phase every sample runs through procedure 0, memories stay put,
and the attention sees a uniformly random route in training (its mean, the uniform code,
in eval mode, so that evaluation is deterministic).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from rmn_fx.errors import OptionError

from ..attention import ConditionalAttention
from ..compile_boundary import graph_break_at
from ..followed import followed_by
from ..routed_stage import PartSpec, RoutedStage
from ..routing import MemoryRouter, dispatch
from .registry import register_rule


@register_rule("memory")
class MemoryRoutedStage(RoutedStage):
    options: ClassVar[dict[str, object]] = {"attention": True, "momentum": 0.9}
    forward = graph_break_at(RoutedStage.forward)  # torch.compile: the dispatch's sub-batch sizes depend on the data

    def __init__(self, procedure, spec: PartSpec, config) -> None:
        super().__init__(procedure, spec, config)
        self.router = MemoryRouter(config.branches, spec.in_channels, config.momentum)
        self.attention = ConditionalAttention(spec.out_channels, config.branches, spec.out_layout) if config.attention else None
        self.place_like_procedure(self.router, self.attention)
        self._attended: list[nn.Module] = []  # procedure j followed by the attention for route j, built on first use

    def train(self, mode: bool = True):
        super().train(mode)
        for attended in self._attended:  # not submodules (their modules are the stage's): their own flag
            attended.training = mode
        return self

    @classmethod
    def check_options(cls, config) -> None:
        if not 0.0 <= config.momentum < 1.0:
            raise OptionError(f"momentum (--memory-momentum) must lie in [0, 1), got {config.momentum!r}")

    @classmethod
    def rule_parameters(cls, spec: PartSpec, config) -> int:
        return ConditionalAttention.parameter_count(spec.out_channels, config.branches) if config.attention else 0

    @classmethod
    def rule_buffer_numel(cls, spec: PartSpec, config) -> int:
        return config.branches * spec.in_channels

    @property
    def paths_per_sample(self) -> int:
        return 1

    def routing_flops_per_sample(self) -> int:
        if self.attention is None:
            return 0
        return 2 * (self.attention.squeeze.weight.numel() + self.attention.squeeze.out_features * self.attention.excite.out_features)

    def first_choice(self, x: torch.Tensor) -> torch.Tensor:
        return self.router.nearest(self.key(x))

    @torch.no_grad()
    def spread_over_procedures(self, x: torch.Tensor) -> None:
        """Memory j := the key of sample j mod B."""
        self.router.memory.copy_(self.row_per_procedure(self.key(x)))

    def sample_counts(self) -> torch.Tensor:
        return self.router.samples

    def share_across_ranks(self, all_reduce: Callable[[torch.Tensor], None], every_procedure: bool) -> None:
        """Also sum the memories' statistics over ranks, so every rank keeps identical memories."""
        super().share_across_ranks(all_reduce, every_procedure)
        self.router.share_statistics(all_reduce)

    def routed_forward(self, x: torch.Tensor) -> torch.Tensor:
        route = self.router(self.key(x))
        procedures = self.procedures if self.attention is None else self.attended_procedures()
        return dispatch(x, route, procedures, self._every_procedure)

    def attended_procedures(self) -> list[nn.Module]:
        """Procedure j, then the attention for route j, for each j (GraphModules sharing the
        stage's modules, not in its state; built again if a procedure or the attention was
        replaced)."""
        current = [(attended.procedure, attended.then.attention) for attended in self._attended]
        if current != [(procedure, self.attention) for procedure in self.procedures]:
            self._attended = [followed_by(procedure, self.attention.for_route(j)) for j, procedure in enumerate(self.procedures)]
        return self._attended

    def stem_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.procedures[0](x)
        if self.attention is None:
            return y
        if self.training:
            route = torch.randint(self.branches, (x.shape[0],), device=x.device)
            return self.attention(y, route)
        uniform = torch.full((x.shape[0], self.branches), 1.0 / self.branches, device=x.device)
        return self.attention.gate(y, uniform)
