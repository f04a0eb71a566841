"""Cross-prediction (Tissera et al., Neural Computing and Applications, 2023).

Each source path i predicts where its tensor goes: p_i = softmax over destinations of
H_i(GAP(y_i)), H_i = FC(C -> max(C/16, N)) -> ReLU -> FC(-> N). A destination takes its
sources normalised over what they send it: a[i, j] = p[i, j] / sum_i p[i, j], which sums
to 1 over sources (so conversion is exact) and keeps every prediction in the gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from .paths import MultiPathStage, hidden_units
from .registry import register_rule


@register_rule("cross-prediction")
class CrossPredictedStage(MultiPathStage):
    @classmethod
    def build_mixer(cls, channels: int, branches: int) -> nn.Module:
        hidden = hidden_units(channels, branches)
        return nn.ModuleList(
            nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, branches)) for _ in range(branches)
        )

    @classmethod
    def mixer_parameters(cls, channels: int, branches: int) -> int:
        hidden = hidden_units(channels, branches)
        return branches * (channels * hidden + hidden + hidden * branches + branches)

    def mixing_weights(self, keys: list[torch.Tensor]) -> torch.Tensor:
        dtype = self.mixer[0][0].weight.dtype
        log_predictions = torch.stack([torch.log_softmax(h(k.to(dtype)), dim=1) for h, k in zip(self.mixer, keys)], dim=1)
        return torch.softmax(log_predictions, dim=1)  # p / sum_i p, in log space: no 0 / 0 when every p underflows
