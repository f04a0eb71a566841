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

    def broadcast(self, per_channel: torch.Tensor, ndim: int) -> torch.Tensor:
        """View a [B, C] tensor so that it broadcasts against a feature tensor of this layout."""
        shape = [per_channel.shape[0]] + [1] * (ndim - 1)
        shape[self.channel_dim] = per_channel.shape[1]
        return per_channel.view(shape)


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
