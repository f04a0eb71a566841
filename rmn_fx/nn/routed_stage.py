"""RoutedStage: the seam every routing rule plugs into.

A routed part of a converted network is N procedures (exact clones of the original part)
and a rule that says, per sample, which procedures run and with what weights. Each rule is
a subclass in `rules/`, registered by name; the rewrite builds it from a `PartSpec` (what
the anatomy knows about the part) and a `RoutingConfig`. Every rule weighs identical
clones with weights that sum to 1 per destination, so a freshly built stage computes what
its procedure computes, whatever the rule's initial parameters.

Phases (`set_phase`): in "stem" (the first step of every recipe) each sample runs through
procedure 0 alone, as in the base network; in "routed" (the default) the rule decides.
The phase is not in the state dict: the training checkpoint records it.

Under torch.compile (`compile_boundary`), a rule whose dispatch sends samples to some of
the procedures marks its `forward` with `graph_break_at`: the compiled model runs the
part's code eagerly there and compiles each procedure alone.

Side values: a part may read values computed before it beside its input (grid sizes,
position tables, masks) and hand on non-tensor values beside its output (MViT's pooled
(T, H, W)); the stage rule admits only values that do not change with the batch. The
stage takes them after its input and gives them after its output; every procedure reads
the same side inputs, and the side outputs are those of the procedure that ran last. The
rules see procedures of one tensor in and one tensor out: hooks on each procedure add the
side inputs to its call and set its side outputs aside (`side_inputs`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .layout import layout_named

PHASES = ("stem", "routed")


@dataclass(frozen=True)
class PartSpec:
    """What a rule needs to know of the part it routes (filled by the rewrite).

    receives_paths / emits_paths: for multi-path rules, whether the part takes the N paths
    of the routed part before it, and hands its N paths on to the next one (instead of
    combining them into one tensor).
    """

    in_channels: int
    out_channels: int
    in_layout: str = "NCHW"
    out_layout: str = "NCHW"
    in_shape: tuple[int, ...] = ()  # one sample's input shape
    out_shape: tuple[int, ...] = ()  # one sample's output shape
    receives_paths: bool = False
    emits_paths: bool = False
    side_inputs: int = 0  # batch-independent values the part reads beside its input
    side_outputs: int = 0  # batch-independent values it hands on beside its output


class RoutedStage(nn.Module):
    """N clones of one part behind a routing rule (subclasses implement `routed_forward`)."""

    rule: ClassVar[str] = ""  # the registered name, set by `register_rule`
    options: ClassVar[dict[str, object]] = {}  # RoutingConfig fields this rule reads, with defaults
    multipath: ClassVar[bool] = False  # carries N tensors from one routed part to the next

    def __init__(self, procedure: nn.Module, spec: PartSpec, config) -> None:
        super().__init__()
        self.spec, self.config = spec, config  # config: the RoutingConfig it was built from
        self.in_layout = spec.in_layout
        self._phase = "routed"
        self._every_procedure = False
        self.procedures = nn.ModuleList([procedure] + [copy.deepcopy(procedure) for _ in range(config.branches - 1)])
        self._side_inputs: tuple | None = None  # while a forward runs: the values beside its input
        self._side_outputs: tuple = ()  # after a procedure ran: the values beside its output
        for clone in self.procedures:
            if spec.side_inputs:
                clone.register_forward_pre_hook(self._add_side_inputs)
            if spec.side_outputs:
                clone.register_forward_hook(self._set_side_outputs_aside)

    @contextlib.contextmanager
    def side_inputs(self, values: tuple):
        """Inside the block, every procedure called alone (`procedures[j](x)`) also reads
        `values`, the part's side inputs (what `forward` does around the rule)."""
        if len(values) != self.spec.side_inputs:
            raise TypeError(f"{type(self).__name__} reads {self.spec.side_inputs} side inputs beside its input, got {len(values)}")
        self._side_inputs = tuple(values)
        try:
            yield
        finally:
            self._side_inputs = None

    def _add_side_inputs(self, procedure, args):
        if self._side_inputs is None:
            raise RuntimeError("this procedure reads side inputs: call it inside `stage.side_inputs(values)` or through the stage")
        return (*args, *self._side_inputs)

    def _set_side_outputs_aside(self, procedure, args, output):
        self._side_outputs = tuple(output[1:])
        return output[0]

    def place_like_procedure(self, *modules: nn.Module | None) -> None:
        """Move the rule's own modules to the procedure's device and floating dtype."""
        like = next((p for p in self.procedures[0].parameters() if p.is_floating_point()), None)
        if like is not None:
            for module in modules:
                if module is not None:
                    module.to(like.device, like.dtype)

    @property
    def branches(self) -> int:
        return len(self.procedures)

    @property
    def paths_per_sample(self) -> int:
        """How many procedures each sample runs through (1 for hard routing, N for dense rules)."""
        raise NotImplementedError

    @classmethod
    def check_options(cls, config) -> None:
        """Raise OptionError if `config`'s options do not fit this rule."""

    @classmethod
    def rule_parameters(cls, spec: PartSpec, config) -> int:
        """Trainable parameters the rule adds to the N procedures (known before building)."""
        raise NotImplementedError

    @classmethod
    def rule_buffer_numel(cls, spec: PartSpec, config) -> int:
        """Buffer entries the rule adds (memories), for the memory check before copying."""
        return 0

    def routing_flops_per_sample(self) -> int:
        """FLOPs per sample of the rule's own matrix products (2 per multiply-add), as
        `torch.utils.flop_counter` counts them: its linear layers and path weighting."""
        raise NotImplementedError

    def first_choice(self, x) -> torch.Tensor | None:
        """The procedure each sample of the part's input `x` goes to first, [B] (what route
        statistics count), or None where every sample runs through every path. Pure: it
        changes no state, so evaluation hooks may call it."""
        return None

    def watch(self, record: Callable[[str, torch.Tensor], None]) -> list[RemovableHandle]:
        """Hooks that report what this part decides on every forward: `record("route", r)`
        with each sample's top procedure r [B], and, for rules that mix paths,
        `record(kind, weights)` with the weights they apply (see `MultiPathStage`). The
        caller removes the handles. By default: the rule's `first_choice`."""

        def hook(stage, args):
            route = stage.first_choice(args[0])
            if route is not None:
                record("route", route)

        return [self.register_forward_pre_hook(hook)]

    def spread_over_procedures(self, x) -> None:
        """Set the rule's routing state so that sample i of `x` (this part's input) goes to
        procedure i mod N, as far as the rule has such state: for checks and benchmarks
        that must exercise every procedure. Rules that run every path: nothing to set."""

    def row_per_procedure(self, rows: torch.Tensor) -> torch.Tensor:
        """Row i mod B of `rows` [B, ...] for each procedure i: [N, ...] (`spread_over_procedures`)."""
        return rows[torch.arange(self.branches, device=rows.device) % rows.shape[0]]

    def sample_counts(self) -> torch.Tensor | None:
        """Training samples each procedure has received so far [N] (load and dead-procedure
        reports), or None where every procedure receives every sample."""
        return None

    def auxiliary_loss(self) -> torch.Tensor | None:
        """A loss the rule adds to training, from its latest training forward (None: none)."""
        return None

    @property
    def phase(self) -> str:
        return self._phase

    def set_phase(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        self._phase = phase

    def share_across_ranks(self, all_reduce: Callable[[torch.Tensor], None], every_procedure: bool) -> None:
        """Data-parallel training: with `every_procedure` (SyncBN) every procedure runs on
        every step, on an empty sub-batch if need be, so that the collective layers inside
        run on all ranks. Rules with statistics also sum them over ranks with `all_reduce`."""
        self._every_procedure = every_procedure

    def key(self, x: torch.Tensor) -> torch.Tensor:
        """A sample's summary for routing: the global average of the part's input, [B, C]."""
        return layout_named(self.in_layout).pool(x)

    def forward(self, x, *side_inputs):
        if not (self.spec.side_inputs or self.spec.side_outputs):
            return self.stem_forward(x) if self._phase == "stem" else self.routed_forward(x)
        with self.side_inputs(side_inputs):
            y = self.stem_forward(x) if self._phase == "stem" else self.routed_forward(x)
        return (y, *self._side_outputs) if self.spec.side_outputs else y

    def stem_forward(self, x):
        return self.procedures[0](x)

    def routed_forward(self, x):
        raise NotImplementedError


def weigh(weights: torch.Tensor, paths: torch.Tensor, anchored: bool = True) -> torch.Tensor:
    """out[b, t] = sum_s weights[b, s, t] * paths[b, s]: paths [B, S, ...] -> [B, T, ...],
    for weights that sum to 1 over the S sources.

    `anchored` computes paths[b, 0] + sum_s weights[b, s, t] * (paths[b, s] - paths[b, 0]):
    the same value and the same gradients (a softmax's or a normalisation's Jacobian ignores
    a shift common to every source), but exactly paths[b, 0] when every path is equal, as a
    fresh conversion's clones are, however ill-conditioned the network (the plain weighted
    sum's rounding moved a random EfficientNetV2's output by 1e-4). The plain sum is for a
    single source whose weight is 1 in value but carries a gradient (a top-1 gate's
    g / stopgrad(g)), which the anchored form would drop. The caller decides, so that the
    program does not branch on a shape (torch.jit.trace records no such branch).
    One batched matrix product, so the FLOP counter sees the weighting (2 * S * T * D per
    sample for D entries per path)."""
    batch, sources = paths.shape[:2]
    flat = paths.reshape(batch, sources, -1)
    weights = weights.transpose(1, 2).to(flat.dtype)
    if anchored:
        anchor = flat[:, :1]
        mixed = anchor + torch.bmm(weights, flat - anchor)
    else:
        mixed = torch.bmm(weights, flat)
    return mixed.view(batch, weights.shape[1], *paths.shape[2:])


def routed_stages(model: nn.Module) -> list[RoutedStage]:
    """The RoutedStage modules of a converted model, in forward order."""
    return [m for m in model.modules() if isinstance(m, RoutedStage)]
