"""Feature-dependent cross-connections (Tissera et al., ICPR 2020).

One mixer per part looks at every source path at once:
    a = softmax over sources of G(GAP(y_1) ... GAP(y_N)),   an N x N matrix per sample,
    G = FC(N*C -> max(C/16, N)) -> ReLU -> FC(-> N*N).
"""

from __future__ import annotations

import torch
from torch import nn

from .paths import MultiPathStage, hidden_units
from .registry import register_rule


@register_rule("cross-connections")
class CrossConnectedStage(MultiPathStage):
    @classmethod
    def build_mixer(cls, channels: int, branches: int) -> nn.Module:
        hidden = hidden_units(channels, branches)
        return nn.Sequential(nn.Linear(branches * channels, hidden), nn.ReLU(), nn.Linear(hidden, branches * branches))

    @classmethod
    def mixer_parameters(cls, channels: int, branches: int) -> int:
        hidden = hidden_units(channels, branches)
        return branches * channels * hidden + hidden + hidden * branches * branches + branches * branches

    def mixing_weights(self, keys: list[torch.Tensor]) -> torch.Tensor:
        n = self.branches
        logits = self.mixer(torch.cat(keys, dim=1).to(self.mixer[0].weight.dtype))
        return torch.softmax(logits.view(-1, n, n), dim=1)
