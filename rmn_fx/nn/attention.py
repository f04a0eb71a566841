"""Conditional Attention: SE channel attention that also sees which procedure ran.

  s = 2 * sigmoid(FC2(concat(ReLU(FC1(GAP(y))), one_hot(route)))),   output = s * y

The route code is a one-hot vector of size N (the method leaves the encoding open). FC2
starts at zero, so s == 1 exactly and a freshly converted model computes the original
function; the factor 2 keeps the gate's range centred on that identity (0..2). CA is
shared by all procedures of a stage; the route enters only through the code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layout import LAYOUTS


class ConditionalAttention(nn.Module):
    def __init__(self, channels: int, branches: int, layout: str = "NCHW", reduction: int = 16) -> None:
        super().__init__()
        self.branches, self.layout = branches, layout
        hidden = self.hidden_units(channels, reduction)
        self.squeeze = nn.Linear(channels, hidden)
        self.excite = nn.Linear(hidden + branches, channels)
        nn.init.zeros_(self.excite.weight)
        nn.init.zeros_(self.excite.bias)

    @staticmethod
    def hidden_units(channels: int, reduction: int = 16) -> int:
        return max(1, channels // reduction)

    @classmethod
    def parameter_count(cls, channels: int, branches: int, reduction: int = 16) -> int:
        """Parameters of an attention over `channels` (known before it is built)."""
        hidden = cls.hidden_units(channels, reduction)
        return channels * hidden + hidden + (hidden + branches) * channels + channels

    def extra_repr(self) -> str:
        return f"branches={self.branches}, layout={self.layout}"

    def forward(self, y: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        return self.gate(y, F.one_hot(route, self.branches))

    def gate(self, y: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """Gate `y` given a route code [B, N] (one-hot, or its mean during stem training)."""
        layout = LAYOUTS[self.layout]
        squeezed = F.relu(self.squeeze(layout.pool(y)))
        code = code.to(squeezed.dtype)
        scale = 2.0 * torch.sigmoid(self.excite(torch.cat([squeezed, code], dim=1)))
        return y * layout.broadcast(scale, y.dim())
