"""Multi-path rules: every sample runs through all N paths, and paths cross between parts.

Part l's path j takes x[l,j] = sum_i a[l,i,j] * y[l-1,i], a mix of the N paths of the
routed part before it, with weights that sum to 1 over sources i (the rule's `mixing_weights`).
The first part of a chain takes the single incoming tensor on every path (no mixing: the
sources would be identical). Where the paths leave the routed parts (before the head, or
before a part that is not routed) they are combined by a learned, feature-dependent
softmax over paths: c = softmax(FC(GAP(y_1) ... GAP(y_N))), out = sum_j c_j * y_j.

Why not the mean: identical clones whose outputs are averaged get identical gradients,
so they stay identical forever (under Adam even scaled gradients give identical steps);
weights that vary per sample send each clone a different gradient from the first step,
while their sum of 1 keeps a fresh conversion exact for any initial values.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..layout import layout_named
from ..routed_stage import PartSpec, RoutedStage, weigh


def hidden_units(channels: int, branches: int) -> int:
    """Width of a routing MLP's hidden layer: max(C / 16, N)."""
    return max(channels // 16, branches)


def linear_flops(*modules: nn.Module | None) -> int:
    """FLOPs per sample of every linear layer in `modules`, each applied once."""
    return sum(2 * m.weight.numel() for module in modules if module is not None for m in module.modules() if isinstance(m, nn.Linear))


class MultiPathStage(RoutedStage):
    multipath = True

    def __init__(self, procedure, spec: PartSpec, config) -> None:
        super().__init__(procedure, spec, config)
        n = config.branches
        self.mixer = self.build_mixer(spec.in_channels, n) if spec.receives_paths else None
        self.combiner = None if spec.emits_paths else nn.Linear(n * spec.out_channels, n)
        # Hook points (no parameters, no state): each passes on the weights it is given, so
        # `watch` can report them without the forward keeping them.
        self.mixing_probe = nn.Identity() if self.mixer is not None else None
        self.combining_probe = nn.Identity() if self.combiner is not None else None
        self.place_like_procedure(self.mixer, self.combiner)

    def extra_repr(self) -> str:
        return f"receives_paths={self.spec.receives_paths}, emits_paths={self.spec.emits_paths}"

    @classmethod
    def build_mixer(cls, channels: int, branches: int) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def mixer_parameters(cls, channels: int, branches: int) -> int:
        raise NotImplementedError

    def mixing_weights(self, keys: list[torch.Tensor]) -> torch.Tensor:
        """a [B, sources, destinations] from each source path's key (its GAP), summing to 1 over sources."""
        raise NotImplementedError

    @classmethod
    def rule_parameters(cls, spec: PartSpec, config) -> int:
        n = config.branches
        mixer = cls.mixer_parameters(spec.in_channels, n) if spec.receives_paths else 0
        combiner = 0 if spec.emits_paths else n * spec.out_channels * n + n
        return mixer + combiner

    @property
    def paths_per_sample(self) -> int:
        return self.branches

    def routing_flops_per_sample(self) -> int:
        n = self.branches
        flops = linear_flops(self.mixer, self.combiner)
        if self.mixer is not None:
            flops += 2 * n * n * math.prod(self.spec.in_shape)
        if self.combiner is not None:
            flops += 2 * n * math.prod(self.spec.out_shape)
        return flops

    def watch(self, record):
        """Reports "mix" (the mixer's a [B, sources, destinations]), "combine" (the
        combiner's c [B, N]) and "route": each sample's top path, the one with the most
        weight in the part's last weighting (the combiner's c where the paths leave, else
        the mixer's total weight per source). The first part of a chain that hands its paths
        on weighs nothing and reports nothing."""
        last = self.combining_probe if self.combining_probe is not None else self.mixing_probe

        def hook_for(kind, probe):
            def hook(module, args, weights):
                record(kind, weights)
                if probe is last:
                    record("route", (weights if kind == "combine" else weights.sum(2)).argmax(1))

            return hook

        probes = [("mix", self.mixing_probe), ("combine", self.combining_probe)]
        return [probe.register_forward_hook(hook_for(kind, probe)) for kind, probe in probes if probe is not None]

    def stem_forward(self, x):
        if isinstance(x, tuple):
            raise RuntimeError("a multi-path stage in the stem phase received paths; set the same phase on every routed stage")
        return self.procedures[0](x)

    def routed_forward(self, x):
        if isinstance(x, tuple):
            mixed = weigh(self.mixing_probe(self.mixing_weights([self.key(p) for p in x])), torch.stack(x, dim=1))
            inputs = mixed.unbind(1)
        else:  # the first part of a chain: one tensor stands for every path
            inputs = [x] * self.branches
        outputs = [procedure(path) for procedure, path in zip(self.procedures, inputs)]
        if self.combiner is None:
            return tuple(outputs)
        pool = layout_named(self.spec.out_layout).pool
        logits = self.combiner(torch.cat([pool(y) for y in outputs], dim=1).to(self.combiner.weight.dtype))
        weights = self.combining_probe(torch.softmax(logits, dim=1))
        return weigh(weights.unsqueeze(2), torch.stack(outputs, dim=1)).squeeze(1)
