"""Small models for CLI and error tests, importable as `tiny_models:FACTORY`."""

from __future__ import annotations

import torch
from timm.layers import register_notrace_module
from torch import nn


def conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def tiny_cnn(num_classes: int = 10) -> nn.Module:
    """A three-stage plain CNN: stem, stages at 16, 8 and 4 pixels for a 32x32 input."""
    return nn.Sequential(
        conv(3, 8, 2),
        nn.Sequential(conv(8, 8), conv(8, 8)),
        nn.Sequential(conv(8, 16, 2), conv(16, 16)),
        nn.Sequential(conv(16, 32, 2), conv(32, 32)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, num_classes),
    )


def tiny_gn(num_classes: int = 10) -> nn.Module:
    """tiny_cnn with GroupNorm: no batch statistics, so data-parallel and single-process
    training compute the same steps."""
    model = tiny_cnn(num_classes)
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.BatchNorm2d):
                setattr(parent, name, nn.GroupNorm(4, child.num_features))
    return model


class TwoInputCells(nn.Module):
    """NASNet's pattern: each cell reads the two previous cells' outputs, so two tensors are
    alive wherever the network downsamples."""

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.cell1 = nn.Conv2d(8, 8, 3, 1, 1)
        self.cell2_a, self.cell2_b = nn.Conv2d(8, 8, 3, 2, 1), nn.Conv2d(8, 8, 3, 2, 1)
        self.cell3_a, self.cell3_b = nn.Conv2d(8, 8, 3, 2, 1), nn.Conv2d(8, 8, 3, 4, 1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))

    def forward(self, x):
        x0 = self.stem(x)
        x1 = self.cell1(x0)
        x2 = self.cell2_a(x1) + self.cell2_b(x0)
        x3 = self.cell3_a(x2) + self.cell3_b(x1)
        return self.head(x3)


def no_downsampling(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(conv(3, 8), conv(8, 8), conv(8, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


class DataDependent(nn.Module):
    """Branches on tensor values in Python: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = tiny_cnn()

    def forward(self, x):
        if x.mean() > 0:
            x = -x
        return self.body(x)


def untraceable(num_classes: int = 10) -> nn.Module:
    return DataDependent()


def fixed_size(num_classes: int = 10) -> nn.Module:
    """Flattens a 32x32 map into a linear layer: any other input size is rejected."""
    return nn.Sequential(tiny_cnn(32)[:4], nn.Flatten(), nn.Linear(32 * 4 * 4, num_classes))


def not_a_module():
    return torch.zeros(1)


def raising(num_classes: int = 10) -> nn.Module:
    """A factory with a bug: building the model fails."""
    raise ValueError("width must be positive")


class TableBias(nn.Module):
    """Adds a bias computed by a small MLP from a fixed table, once per forward whatever the
    batch (as Swin V2's relative-position bias): FLOPs that do not grow with the batch."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("table", torch.linspace(-1, 1, 64).view(64, 1))
        self.mlp = nn.Sequential(nn.Linear(1, 32), nn.ReLU(), nn.Linear(32, channels))

    def forward(self, x):
        return x + self.mlp(self.table).mean(0).view(1, -1, 1, 1)


def tiny_table(num_classes: int = 10) -> nn.Module:
    """tiny_cnn whose stages each add a batch-independent table bias."""
    model = tiny_cnn(num_classes)
    for index, channels in ((1, 8), (2, 16), (3, 32)):
        model[index].append(TableBias(channels))
    return model


@register_notrace_module  # a leaf to torch.fx, as timm registers its own
class SignFlip(nn.Module):
    """Branches on tensor values inside a leaf module: torch.fx keeps it whole, torch.export
    cannot capture it."""

    def forward(self, x):
        return -x if x.mean() < 0 else x


def tiny_sign_flip(num_classes: int = 10) -> nn.Module:
    """tiny_cnn with a `SignFlip` before its head: it converts, but does not export."""
    model = tiny_cnn(num_classes)
    model.insert(4, SignFlip())
    return model
