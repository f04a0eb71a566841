"""Ops that exporters can trace on a data-dependent sub-batch.

Each procedure of a routed stage runs on its share of the batch, a size known only at run
time (an unbacked size to torch.export). Some ops branch on that size in code that
inference does not need, and torch.export refuses the branch
(`GuardOnDataDependentSymNode`):
- BatchNorm's kernel branches on `input.numel() == 0`; at inference it is the per-channel
  affine map y = (x - mean) / sqrt(var + eps) * weight + bias, which needs no branch;
- GroupNorm's Python wrapper checks that more than one value is normalised per group
  (`_verify_batch_size`), a check of the sample's shape that torch cannot prove for an
  unknown batch; the ATen op it then calls has no such branch;
- `torch.roll` (Swin's shifted windows) returns early on `numel() == 0`; a roll is a
  gather along each rolled dimension, whose size is the sample's (known), not the batch's;
- a reshape that infers a size (`x.reshape(B, -1, C)` in timm's Swin, or
  `x.reshape(B * P, N, -1)` in MobileViT, the batch folded into another axis) divides by
  the batch, which must then be nonzero (a runtime assert that an empty procedure fails);
  where the batch cancels out of that division, the inferred size is a constant, so it is
  given as one (`resolved_shape`);
- scaled dot-product attention checks whether a mask of batch 1 broadcasts against the
  query's batch (`sdp::check_attn_mask_shape`, a guard on the sub-batch being 1); the mask
  expanded to the query's leading sizes (a view) needs no such check.
The mode below routes those calls while it is active, whoever makes them (nn.BatchNorm*,
timm's BatchNormAct2d and GroupNormAct, functional code, Tensor methods), and leaves
training-mode BatchNorm alone.
"""

from __future__ import annotations

import math

import sympy
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


def gathered_roll(input, shifts, dims=None):
    """`torch.roll` as an `index_select` per rolled dimension (no branch on the size)."""
    if dims is None:  # roll the flattened tensor
        return gathered_roll(input.flatten(), shifts, 0).view(input.shape)
    shifts, dims = (shifts, dims) if isinstance(dims, (tuple, list)) else ((shifts,), (dims,))
    for shift, dim in zip(shifts, dims, strict=True):
        size = input.shape[dim]
        index = torch.remainder(torch.arange(size, device=input.device) - shift, size)
        input = input.index_select(dim, index)
    return input


RESHAPES = (torch.reshape, torch.Tensor.reshape, torch.Tensor.view)


def resolved_shape(input: torch.Tensor, shape) -> tuple | None:
    """`shape` with its -1 replaced by the size it infers, when that size is the same
    for every batch (the batch cancels out of numel / known sizes); None when there is no -1
    or the size depends on the batch (then the op infers it as usual)."""
    if -1 not in shape:
        return None
    known = math.prod(d for d in shape if d != -1)
    if isinstance(known, int) and known == 0:
        return None
    inferred = _expr(input.numel()) / _expr(known)
    if not (inferred.is_Integer and inferred > 0):
        return None
    return tuple(int(inferred) if d == -1 else d for d in shape)


def _expr(size) -> sympy.Expr:
    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(size)


def _reshape(func, args, kwargs):
    input, *rest = args
    shape = kwargs.get("shape", rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)) else rest)
    resolved = resolved_shape(input, tuple(shape)) if isinstance(input, torch.Tensor) and not kwargs.keys() - {"shape"} else None
    return func(*args, **kwargs) if resolved is None else func(input, resolved)


SDPAS = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)


def broadcast_mask_attention(query, key, value, attn_mask=None, *args, **kwargs):
    """Scaled dot-product attention with a batched mask expanded to the query's leading sizes."""
    if attn_mask is not None and 2 < attn_mask.dim() <= query.dim():
        attn_mask = attn_mask.expand(*query.shape[:-2], *attn_mask.shape[-2:])
    return F.scaled_dot_product_attention(query, key, value, attn_mask, *args, **kwargs)


class ExportableOps(TorchFunctionMode):
    """Inside the block, inference-mode `F.batch_norm` runs as `affine_batch_norm`,
    `F.group_norm` as `unchecked_group_norm`, `torch.roll` as `gathered_roll`, attention
    with a mask as `broadcast_mask_attention`, and a reshape whose inferred size does not
    depend on the batch gets that size as a constant (`resolved_shape`)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm and not _training(args, kwargs) and _has_statistics(args, kwargs):
            return affine_batch_norm(*args, **kwargs)
        if func is F.group_norm:
            return unchecked_group_norm(*args, **kwargs)
        if func in (torch.roll, torch.Tensor.roll):
            return gathered_roll(*args, **kwargs)
        if func in RESHAPES:
            return _reshape(func, args, kwargs)
        if func in SDPAS:
            return broadcast_mask_attention(*args, **kwargs)
        return func(*args, **kwargs)


def _training(args, kwargs) -> bool:
    return bool(kwargs["training"] if "training" in kwargs else (args[5] if len(args) > 5 else False))


def _has_statistics(args, kwargs) -> bool:
    mean = kwargs.get("running_mean", args[1] if len(args) > 1 else None)
    var = kwargs.get("running_var", args[2] if len(args) > 2 else None)
    return mean is not None and var is not None
