"""A hypothesis strategy for random CNN backbones whose true stages are known.

A backbone is `stem` (a conv, norm, activation and optional max-pool, with at least one
downsampling), `stages` (each a Sequential of blocks; every stage after the first opens
with a downsampling: a strided block, a pool, or a strided conv), an optional 1x1
`head_conv` that belongs to the last stage (EfficientNet's conv_head), and a `head`
(global pooling + linear). Blocks are plain, residual or concatenation blocks, with
BatchNorm or GroupNorm and optional squeeze-excitation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st
from torch import nn

BLOCKS = ("plain", "residual", "concat")
DOWNSAMPLES = ("block", "pool", "conv")


def norm(kind: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "bn" else nn.GroupNorm(min(2, channels), channels)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc = nn.Conv2d(channels, max(1, channels // 4), 1)
        self.out = nn.Conv2d(max(1, channels // 4), channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.out(torch.relu(self.fc(x.mean((2, 3), keepdim=True)))))


class Block(nn.Module):
    def __init__(self, kind: str, cin: int, cout: int, stride: int, norm_kind: str, se: bool) -> None:
        super().__init__()
        self.kind = kind
        if kind == "concat":
            half = cout // 2
            self.left = nn.Conv2d(cin, half, 3, stride, 1, bias=False)
            self.right = nn.Sequential(nn.Conv2d(cin, cout - half, 1, stride, bias=False), nn.ReLU())
        else:
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.norm1 = norm(norm_kind, cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False) if kind == "residual" else nn.Identity()
        self.norm = norm(norm_kind, cout)
        self.se = SqueezeExcite(cout) if se else nn.Identity()
        if kind == "residual":
            self.shortcut = (
                nn.Identity() if stride == 1 and cin == cout
                else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(norm_kind, cout))
            )

    def forward(self, x):
        if self.kind == "concat":
            y = torch.cat([self.left(x), self.right(x)], dim=1)
        else:
            y = self.conv2(torch.relu(self.norm1(self.conv1(x))))
        y = self.se(self.norm(y))
        if self.kind == "residual":
            y = y + self.shortcut(x)
        return torch.relu(y)


@dataclass
class StageSpec:
    downsample: str | None
    blocks: list[str]
    width: int
    se: list[bool]


@dataclass
class BackboneSpec:
    stem_stride: int
    stem_pool: bool
    stem_width: int
    norm: str
    stages: list[StageSpec]
    head_conv: bool
    input_side: int
    classes: int = 5
    expected: list[tuple[str, ...]] = field(default_factory=list)

    def build(self) -> nn.Module:
        torch.manual_seed(0)
        return Backbone(self)

    @property
    def expected_blocks(self) -> list[tuple[str, ...]]:
        """The parts of granularity "block": every block of every stage; a pool that opens a
        stage belongs to its first block, a conv downsampling is a block of its own."""
        blocks = []
        for i, stage in enumerate(self.stages):
            names = [f"stages.{i}.{j}" for j in range(len(stage.blocks) + (stage.downsample in ("pool", "conv")))]
            if stage.downsample == "pool":
                names[:2] = [tuple(names[:2])]
            if len(names) == 1:  # the block is the whole stage: its outermost module
                names = [f"stages.{i}"]
            blocks.extend(name if isinstance(name, tuple) else (name,) for name in names)
        return blocks + [("head_conv",)] if self.head_conv else blocks


class Backbone(nn.Module):
    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__()
        stem = [nn.Conv2d(3, spec.stem_width, 3, spec.stem_stride, 1), norm(spec.norm, spec.stem_width), nn.ReLU()]
        if spec.stem_pool:
            stem.append(nn.MaxPool2d(3, 2, 1))
        self.stem = nn.Sequential(*stem)
        stages, cin = [], spec.stem_width
        for s in spec.stages:
            layers = []
            if s.downsample == "pool":
                layers.append(nn.MaxPool2d(2))
            elif s.downsample == "conv":
                layers.append(nn.Sequential(nn.Conv2d(cin, cin, 3, 2, 1), norm(spec.norm, cin)))
            for i, kind in enumerate(s.blocks):
                stride = 2 if i == 0 and s.downsample == "block" else 1
                layers.append(Block(kind, cin, s.width, stride, spec.norm, s.se[i]))
                cin = s.width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.head_conv = nn.Sequential(nn.Conv2d(cin, 2 * cin, 1), nn.ReLU()) if spec.head_conv else None
        features = 2 * cin if spec.head_conv else cin
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(features, spec.classes))

    def forward(self, x):
        x = self.stages(self.stem(x))
        if self.head_conv is not None:
            x = self.head_conv(x)
        return self.head(x)


@st.composite
def backbones(draw, max_stages: int = 4) -> BackboneSpec:
    count = draw(st.integers(2, max_stages))
    stem_stride = draw(st.sampled_from([1, 2]))
    stem_pool = stem_stride == 1 or draw(st.booleans())
    widths = st.sampled_from([4, 6, 8, 12])
    stages = []
    for i in range(count):
        blocks = draw(st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=3))
        stages.append(
            StageSpec(
                downsample=None if i == 0 else draw(st.sampled_from(DOWNSAMPLES)),
                blocks=blocks,
                width=draw(widths),
                se=[draw(st.booleans()) for _ in blocks],
            )
        )
    drops = (stem_stride == 2) + stem_pool + count - 1
    spec = BackboneSpec(
        stem_stride=stem_stride,
        stem_pool=stem_pool,
        stem_width=draw(widths),
        norm=draw(st.sampled_from(["bn", "gn"])),
        stages=stages,
        head_conv=draw(st.booleans()),
        input_side=2**drops * draw(st.sampled_from([2, 3, 4])),
    )
    spec.expected = [(f"stages.{i}",) for i in range(count)]
    if spec.head_conv:
        spec.expected[-1] += ("head_conv",)
    return spec
