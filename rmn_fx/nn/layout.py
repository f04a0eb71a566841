"""Where channels and spatial positions sit in a feature tensor.

Convolutional models carry NCHW tensors (NCTHW for video), Swin-style models NHWC
(NTHWC), transformers token sequences [B, L, C]. A feature map has one more dimension
than a sample (the batch); whether its channels come first or last is read off its shape:
the layout whose last two spatial sizes match the input's aspect ratio wins (channels
first on a tie). Routing keys and attention squeeze over every spatial position (and
frame) of that layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FeatureLayout:
    """Channel dimension and spatial dimensions of a batched feature tensor."""

    name: str
    channel_dim: int
    spatial_dims: tuple[int, ...]

    def resolution(self, shape) -> int:
        """Spatial positions per sample: the quantity whose drops delimit stages."""
        return math.prod(shape[d] for d in self.spatial_dims)

    def channels(self, shape) -> int:
        return shape[self.channel_dim]

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pooling to [B, C]."""
        return x.mean(dim=self.spatial_dims)

    def scale(self, x: torch.Tensor, per_channel: torch.Tensor) -> torch.Tensor:
        """x with each channel multiplied by its factor in `per_channel` [B, C]."""
        shape = [per_channel.shape[0]] + [1] * (x.dim() - 1)
        shape[self.channel_dim] = per_channel.shape[1]
        return x * per_channel.view(shape)


NCHW = FeatureLayout("NCHW", 1, (2, 3))
NHWC = FeatureLayout("NHWC", 3, (1, 2))
NCTHW = FeatureLayout("NCTHW", 1, (2, 3, 4))
NTHWC = FeatureLayout("NTHWC", 4, (1, 2, 3))
NLC = FeatureLayout("NLC", 2, (1,))
LAYOUTS = {layout.name: layout for layout in (NCHW, NHWC, NCTHW, NTHWC, NLC)}
MAP_LAYOUTS = {4: (NCHW, NHWC), 5: (NCTHW, NTHWC)}  # by rank: (channels first, channels last)


def infer_layout(shape, batch: int, image_hw: tuple[int, int]) -> FeatureLayout | None:
    """The layout of a tensor of `shape` inside a model fed `batch` samples whose last two
    sizes are `image_hw` (H, W of an image or of a video's frames).

    Returns None for anything that is not a per-sample feature map or token sequence
    (pooled vectors, tensors with folded batch dimensions, scalars).
    """
    if shape[0] != batch or not (len(shape) == 3 or len(shape) in MAP_LAYOUTS):
        return None
    if len(shape) == 3:
        return NLC
    height, width = image_hw

    def aspect_error(a: int, b: int) -> int:
        return abs(a * width - b * height)

    first, last = MAP_LAYOUTS[len(shape)]
    return first if aspect_error(shape[-2], shape[-1]) <= aspect_error(shape[-3], shape[-2]) else last


@dataclass(frozen=True)
class PackedLayout:
    """Several tensors of one batch carried as one [B, D] tensor (`pack`): a boundary
    between parts where more than one tensor is alive (NASNet's cells read the two previous
    cells' outputs). A segment with a FeatureLayout is a feature tensor: pooling pools every
    one and concatenates their channels, so a routing key sees all of them, and Conditional
    Attention scales their channels. A segment without one (layout None, named `carried`)
    is only carried through the part for the samples routed there: a table with a batch
    axis computed from sizes alone (Gemma4's rotary tables), which no key reads and no
    attention scales."""

    segments: tuple[tuple[FeatureLayout | None, tuple[int, ...]], ...]  # (layout or None, one sample's shape)

    @property
    def name(self) -> str:
        return "packed(" + ",".join(f"{layout.name if layout else CARRIED}:{'x'.join(map(str, shape))}" for layout, shape in self.segments) + ")"

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(shape for _, shape in self.segments)

    @property
    def features(self) -> list[tuple[int, FeatureLayout, tuple[int, ...]]]:
        """(index, layout, shape) of the feature segments (those that are not only carried)."""
        return [(i, layout, shape) for i, (layout, shape) in enumerate(self.segments) if layout is not None]

    @property
    def segment_channels(self) -> list[int]:
        return [layout.channels((1, *shape)) for _, layout, shape in self.features]

    def resolution(self, shape=None) -> int:
        """The level a boundary has reached: that of its coarsest feature tensor (the
        output of the latest downsampling)."""
        return min(layout.resolution((1, *s)) for _, layout, s in self.features)

    def channels(self, shape=None) -> int:
        return sum(self.segment_channels)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        parts = unpack(x, self.shapes)
        return torch.cat([layout.pool(parts[i]) for i, layout, _ in self.features], dim=1)

    def scale(self, x: torch.Tensor, per_channel: torch.Tensor) -> torch.Tensor:
        parts = list(unpack(x, self.shapes))
        for (i, layout, _), factors in zip(self.features, per_channel.split(self.segment_channels, dim=1), strict=True):
            parts[i] = layout.scale(parts[i], factors)
        return pack(*parts)


CARRIED = "carried"  # the name of a packed segment that is only carried (no layout)


_PARSED: dict[str, PackedLayout] = {}  # by name: `layout_named` parses each once


def layout_named(name: str) -> FeatureLayout | PackedLayout:
    """The layout a name (`FeatureLayout.name`, `PackedLayout.name`) stands for (parsed
    once per name: keys and attention look it up on every forward; a dict, not
    `functools.cache`, which torch.compile warns that it traces through)."""
    if name in LAYOUTS:
        return LAYOUTS[name]
    if name not in _PARSED:
        _PARSED[name] = _parse_packed(name)
    return _PARSED[name]


def _parse_packed(name: str) -> PackedLayout:
    inner = name.removeprefix("packed(").removesuffix(")")
    if inner == name:
        raise ValueError(f"unknown feature layout {name!r}; known: {', '.join(LAYOUTS)} and packed(...)")
    segments = []
    for item in inner.split(","):
        layout, _, shape = item.partition(":")
        segments.append((None if layout == CARRIED else LAYOUTS[layout], tuple(int(v) for v in shape.split("x"))))
    return PackedLayout(tuple(segments))


def pack(*tensors: torch.Tensor, carried: tuple[int, ...] = (), rows: tuple[int, ...] = ()) -> torch.Tensor:
    """Tensors of one batch as one [B, D] tensor: each sample's values, tensor after tensor.
    `carried`: the positions of tensors that are only carried (see `PackedLayout`); it
    changes nothing here and tells shape propagation, and readers of `gm.code`, which.
    `rows`: rows per sample of each tensor's first axis (k > 1: its batch is folded into it,
    as TNT's pixel tokens [B * patches, ...]; given, so that no size is inferred from a
    sub-batch's, which torch.export cannot do for an empty one); () means 1 for all."""
    if not any(k > 1 for k in rows):
        return torch.cat([t.flatten(1) for t in tensors], dim=1)  # flatten, not reshape(B, -1): a sub-batch may be empty
    batch = tensors[rows.index(1)].shape[0]
    return torch.cat([t.reshape(batch, k * math.prod(t.shape[1:])) if k > 1 else t.flatten(1) for t, k in zip(tensors, rows, strict=True)], dim=1)


def unpack(packed: torch.Tensor, shapes: tuple[tuple[int, ...], ...], folded: tuple[int, ...] = ()) -> tuple[torch.Tensor, ...]:
    """The tensors `pack` joined, given one sample's shape of each (contiguous, as they
    were, so that the layers after them compute exactly what they computed before).
    `folded`: the positions of tensors whose batch was folded into their first axis (TNT's
    pixel tokens, [B * patches, ...]), which get it back."""
    sizes = [math.prod(shape) for shape in shapes]
    parts = [part.reshape(packed.shape[0], *shape).contiguous() for part, shape in zip(packed.split(sizes, dim=1), shapes)]
    return tuple(part.flatten(0, 1) if k in folded else part for k, part in enumerate(parts))
