"""Normalisation layers that exporters can trace on a data-dependent sub-batch.

Each procedure of a routed stage runs on its share of the batch, a size known only at run
time (an unbacked size to torch.export). Two norms branch on that size in code that
inference does not need, and torch.export refuses the branch
(`GuardOnDataDependentSymNode`):
- BatchNorm's kernel branches on `input.numel() == 0`; at inference it is the per-channel
  affine map y = (x - mean) / sqrt(var + eps) * weight + bias, which needs no branch;
- GroupNorm's Python wrapper checks that more than one value is normalised per group
  (`_verify_batch_size`), a check of the sample's shape that torch cannot prove for an
  unknown batch; the ATen op it then calls has no such branch.
The mode below routes those calls while it is active, whoever makes them (nn.BatchNorm*,
timm's BatchNormAct2d and GroupNormAct, functional code), and leaves training-mode
BatchNorm alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def affine_batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """`F.batch_norm` in inference mode, written with element-wise ops (channel dim 1)."""
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    shape = [1, -1] + [1] * (input.dim() - 2)
    return input * scale.view(shape) + shift.view(shape)


def unchecked_group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    """`F.group_norm` without its Python-side shape check (the ATen op it calls)."""
    return torch.group_norm(input, num_groups, weight, bias, eps, torch.backends.cudnn.enabled)


class ExportableNorms(TorchFunctionMode):
    """Inside the block, inference-mode `F.batch_norm` runs as `affine_batch_norm` and
    `F.group_norm` as `unchecked_group_norm`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm and not _training(args, kwargs) and _has_statistics(args, kwargs):
            return affine_batch_norm(*args, **kwargs)
        if func is F.group_norm:
            return unchecked_group_norm(*args, **kwargs)
        return func(*args, **kwargs)


def _training(args, kwargs) -> bool:
    return bool(kwargs["training"] if "training" in kwargs else (args[5] if len(args) > 5 else False))


def _has_statistics(args, kwargs) -> bool:
    mean = kwargs.get("running_mean", args[1] if len(args) > 1 else None)
    var = kwargs.get("running_var", args[2] if len(args) > 2 else None)
    return mean is not None and var is not None
