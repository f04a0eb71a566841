"""A learned top-k gate (mixture of experts over clones, as in sparse upcycling).

    g = softmax(W norm(GAP(x)) + b)        over the N procedures
    y = sum over the k largest g_j of w_j * P_j(x),   w_j = g_j / sum_topk g

`norm` standardises each channel of the key (BatchNorm without affine parameters: batch
statistics in training, running ones in eval, so a sample's route never depends on its
batch at inference). Without it every key shares one large mean component and a fresh
gate sends all samples to one procedure; the bias starts at zero for the same reason.

Each sample runs through its k procedures only (one dispatch over the (sample, slot)
pairs). With k = 1 the weight is g_j / stop_gradient(g_j): exactly 1 in value, so the
output is exact, yet the gate gets g_j's gradient. The weights sum to 1 for any W, so the
gate starts random (what breaks the clones' symmetry) and conversion stays exact.

In training mode each forward records the load-balancing loss N * sum_j f_j * mean_b g_bj
(f_j: the fraction of samples whose first choice is j; Switch Transformer), which the
recipe adds with its coefficient (`auxiliary_loss`), and counts the samples per procedure.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from rmn_fx.errors import OptionError

from ..compile_boundary import graph_break_at
from ..modes import training_mode
from ..routed_stage import PartSpec, RoutedStage, weigh
from ..routing import dispatch, run_procedure
from .registry import register_rule


@register_rule("gate")
class GatedStage(RoutedStage):
    options: ClassVar[dict[str, object]] = {"top_k": 1}
    forward = graph_break_at(RoutedStage.forward)  # torch.compile: the dispatch's sub-batch sizes depend on the data

    def __init__(self, procedure, spec: PartSpec, config) -> None:
        super().__init__(procedure, spec, config)
        self.top_k = config.top_k
        self.key_norm = nn.BatchNorm1d(spec.in_channels, affine=False)
        self.gate = nn.Linear(spec.in_channels, config.branches)
        nn.init.zeros_(self.gate.bias)
        self.register_buffer("samples", torch.zeros(config.branches, dtype=torch.long))
        self._balance_loss: torch.Tensor | None = None
        self._sum_over_ranks: Callable[[torch.Tensor], None] | None = None
        self.place_like_procedure(self.key_norm, self.gate)

    @classmethod
    def check_options(cls, config) -> None:
        k = config.top_k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= config.branches:
            raise OptionError(f"top_k (--top-k) must be an integer in 1..branches ({config.branches}), got {k!r}")

    @classmethod
    def rule_parameters(cls, spec: PartSpec, config) -> int:
        return spec.in_channels * config.branches + config.branches

    @classmethod
    def rule_buffer_numel(cls, spec: PartSpec, config) -> int:
        return 2 * spec.in_channels + 1  # the key norm's running mean and variance, its step count

    @property
    def paths_per_sample(self) -> int:
        return self.top_k

    def routing_flops_per_sample(self) -> int:
        return 2 * self.gate.weight.numel() + 2 * self.top_k * math.prod(self.spec.out_shape)

    def extra_repr(self) -> str:
        return f"top_k={self.top_k}"

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """The gate's softmax over procedures, [B, N]."""
        key = run_procedure(self.key_norm, self.key(x).to(self.gate.weight.dtype))
        return torch.softmax(self.gate(key), dim=1)

    def first_choice(self, x: torch.Tensor) -> torch.Tensor:
        with training_mode(self.key_norm, False):  # running statistics: no update
            return self.probabilities(x).argmax(dim=1)

    @torch.no_grad()
    def spread_over_procedures(self, x: torch.Tensor) -> None:
        """The key norm's running statistics := the batch's; row j of the gate := sample
        j mod B's normalised key, sharpened, so that sample j's largest logit is its own."""
        keys = self.key(x).to(self.gate.weight.dtype)
        mean, var = keys.mean(0), keys.var(0, unbiased=False)
        self.key_norm.running_mean.copy_(mean)
        self.key_norm.running_var.copy_(var)
        normalised = (keys - mean) / torch.sqrt(var + self.key_norm.eps)
        self.gate.weight.copy_(10.0 * self.row_per_procedure(normalised))
        self.gate.bias.zero_()

    def sample_counts(self) -> torch.Tensor:
        return self.samples

    def share_across_ranks(self, all_reduce: Callable[[torch.Tensor], None], every_procedure: bool) -> None:
        """Also count the samples of every rank, so the load the main rank reports is the
        whole batch's (the balance loss stays per rank, as in data-parallel MoE training)."""
        super().share_across_ranks(all_reduce, every_procedure)
        self._sum_over_ranks = all_reduce

    def auxiliary_loss(self) -> torch.Tensor | None:
        """The load-balancing loss of the latest training forward (None after any other)."""
        return self._balance_loss

    def stem_forward(self, x: torch.Tensor) -> torch.Tensor:
        self._balance_loss = None
        return super().stem_forward(x)

    def routed_forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.probabilities(x)
        top, chosen = g.topk(self.top_k, dim=1)
        weights = top / top.detach() if self.top_k == 1 else top / top.sum(dim=1, keepdim=True)
        self._balance_loss = None
        if self.training:
            self._record(g, chosen)
        inputs = x if self.top_k == 1 else x.repeat_interleave(self.top_k, dim=0)
        y = dispatch(inputs, chosen.reshape(-1), self.procedures, self._every_procedure)
        y = y.view(x.shape[0], self.top_k, *y.shape[1:])
        return weigh(weights.unsqueeze(2), y, anchored=self.top_k > 1).squeeze(1)

    def _record(self, g: torch.Tensor, chosen: torch.Tensor) -> None:
        first = torch.bincount(chosen[:, 0], minlength=self.branches).to(g.dtype) / g.shape[0]
        self._balance_loss = self.branches * (first * g.mean(dim=0)).sum()
        with torch.no_grad():
            counts = torch.bincount(chosen.reshape(-1), minlength=self.branches)
            if self._sum_over_ranks is not None:
                self._sum_over_ranks(counts)
            self.samples += counts
