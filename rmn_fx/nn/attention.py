"""Conditional Attention: SE channel attention that also sees which procedure ran.

  s = 2 * sigmoid(FC2(concat(ReLU(FC1(GAP(y))), one_hot(route)))),   output = s * y

The route code is a one-hot vector of size N (the method leaves the encoding open). FC2
starts at zero, so s == 1 exactly and a freshly converted model computes the original
function; the factor 2 keeps the gate's range centred on that identity (0..2). CA is
shared by all procedures of a stage; the route enters only through the code.

FC2 of a one-hot code is FC2's weight column for the route, so a hard route is looked up,
not multiplied: FC2 costs hidden x C multiply-adds per sample, and no one-hot tensor (nor
its host-side range check) is built. A sub-batch whose samples all took one procedure is
gated by `for_route(j)`, which the memory rule runs right after procedure j (`followed_by`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layout import layout_named


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
        """Gate `y` [B, C, ...] after procedure `route[i]` [B] ran on sample i."""
        return self._scaled(y, self._code_rows().index_select(0, route))

    def gate_route(self, y: torch.Tensor, route: int) -> torch.Tensor:
        """Gate `y` [B, C, ...], all of whose samples ran through procedure `route`."""
        return self._scaled(y, self.excite.weight[:, self.squeeze.out_features + route])  # one op: `_code_rows()[route]`

    def for_route(self, route: int) -> RouteAttention:
        """This attention for the outputs of procedure `route` alone, as a module (it shares
        this one's parameters)."""
        return RouteAttention(self, route)

    def gate(self, y: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """Gate `y` given a soft route code [B, N] (the uniform code of the stem phase in eval mode)."""
        return self._scaled(y, code.to(self.excite.weight.dtype) @ self._code_rows())

    def _code_rows(self) -> torch.Tensor:
        """FC2's weight on the code, one row per route: [N, C]."""
        return self.excite.weight[:, self.squeeze.out_features :].t()

    def _scaled(self, y: torch.Tensor, code_term: torch.Tensor) -> torch.Tensor:
        """y * 2 sigmoid(FC2(concat(h, code))), with FC2's code part given as `code_term` [B, C]."""
        layout = layout_named(self.layout)
        squeezed = F.relu(self.squeeze(layout.pool(y)))
        logits = F.linear(squeezed, self.excite.weight[:, : self.squeeze.out_features], self.excite.bias)
        if code_term.dtype != logits.dtype:  # autocast: the linear ran in half precision
            code_term = code_term.to(logits.dtype)
        scale = 2.0 * torch.sigmoid(logits + code_term)
        return layout.scale(y, scale)


class RouteAttention(nn.Module):
    """`ConditionalAttention.gate_route` for one fixed route: a module of one input that can
    follow its procedure in a GraphModule (`followed_by`)."""

    def __init__(self, attention: ConditionalAttention, route: int) -> None:
        super().__init__()
        self.attention, self.route = attention, route

    def extra_repr(self) -> str:
        return f"route={self.route}"

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.attention.gate_route(y, self.route)
