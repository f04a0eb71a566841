"""Resolve a model name to a randomly initialised nn.Module, and load local weights.

Names resolve to torchvision first (every list: classification, segmentation, video,
detection, optical flow, quantization), then timm; `timm:NAME` and `torchvision:NAME`
force one of them, and `package.module:factory` calls a factory of the user's own.
Nothing is ever downloaded: weights, backbone weights included, come from a local file
(`load_weights`) or stay random.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import warnings

import torch
import torchvision
from torch import nn

from .errors import (
    ModelBuildError,
    ModelNotFoundError,
    ModelTaskError,
    WeightsError,
    first_line,
)
from .files import read_torch_file

TORCHVISION_INPUT_SIZE = (3, 224, 224)
TORCHVISION_TASKS = ("classification", "segmentation", "video", "detection", "optical_flow", "quantization")
VIDEO_FRAMES = 16  # the clip length of torchvision's video references
HUBS = ("timm", "torchvision")
CHECKPOINT_KEYS = ("state_dict", "model", "model_state_dict", "state_dict_ema", "model_ema")


@functools.cache
def torchvision_tasks() -> dict[str, str]:
    """Every model torchvision lists, with its task (the `torchvision.models` subpackage
    that holds it; "classification" for the package itself)."""
    modules = {task: getattr(torchvision.models, task, torchvision.models) for task in TORCHVISION_TASKS}
    return {name: task for task, module in modules.items() for name in torchvision.models.list_models(module=module)}


@functools.cache
def torchvision_names(task: str = "classification") -> tuple[str, ...]:
    """torchvision's models for `task` (one of TORCHVISION_TASKS)."""
    return tuple(name for name, t in torchvision_tasks().items() if t == task)


@functools.cache
def timm_names() -> tuple[str, ...]:
    import timm

    return tuple(timm.list_models())


def is_factory(name: str) -> bool:
    """Whether `name` is a `package.module:factory` spec: building it imports and runs code."""
    hub, sep, _ = name.partition(":")
    return bool(sep) and hub not in HUBS


def create_model(name: str, num_classes: int | None = None) -> nn.Module:
    """Build `name` with random weights; see the module docstring for the name forms."""
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    builder = _builder(name)
    try:
        with warnings.catch_warnings():  # init_weights FutureWarnings of googlenet/inception
            warnings.simplefilter("ignore", FutureWarning)
            model = builder(**kwargs)
    except Exception as exc:
        raise ModelBuildError(f"building model '{name}' raised {type(exc).__name__}: {first_line(exc)}; fix the factory or the options it is called with") from exc
    if not isinstance(model, nn.Module):
        raise ModelNotFoundError(f"factory '{name}' returned {type(model).__name__}, not an nn.Module")
    return model


def torchvision_name(name: str) -> str | None:
    """The torchvision model that `name` resolves to, or None (timm, a factory, unknown)."""
    hub, sep, rest = name.partition(":")
    if sep and hub != "torchvision":
        return None
    model_name = rest if sep else name
    return model_name if model_name in torchvision_tasks() else None


def check_convertible(name: str) -> None:
    """Refuse, by task, the torchvision models that are not one network of one batch:
    detectors (convert their backbone, whose dict of feature maps keeps its names, so the
    detector still runs) and optical flow (two images per sample: out of reach)."""
    tv_name = torchvision_name(name)
    task = torchvision_tasks().get(tv_name) if tv_name else None
    if task == "detection":
        raise ModelTaskError(
            f"'{tv_name}' is a detector (it takes a list of images and returns boxes); convert its backbone in Python: "
            f"model.backbone.body = rmn_fx.transform(model.backbone.body, input_size=(3, H, W))"
        )
    if task == "optical_flow":
        raise ModelTaskError(f"'{tv_name}' estimates optical flow from two images per sample; rmn-fx converts networks of one input batch")


def _builder(name: str):
    """The callable that builds `name` (found, not yet called)."""
    if is_factory(name):
        module_name, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ModelNotFoundError(f"cannot import model factory '{name}' ({exc}); give MODULE:CALLABLE on the Python path") from exc
    hub, sep, rest = name.partition(":")
    model_name = rest if sep else name
    if torchvision_name(name):
        builder = torchvision.models.get_model_builder(model_name)
        random = {p: None for p in inspect.signature(builder).parameters if p.startswith("weights")}  # weights, weights_backbone
        return functools.partial(builder, **random)
    if hub == "torchvision":
        raise ModelNotFoundError(_unknown(model_name, tuple(torchvision_tasks()), "torchvision"))
    import timm

    if not timm.is_model(model_name):
        pool = timm_names() if sep else tuple(dict.fromkeys((*torchvision_tasks(), *timm_names())))
        raise ModelNotFoundError(_unknown(model_name, pool, "timm" if sep else "torchvision or timm"))
    return functools.partial(timm.create_model, model_name, pretrained=False)


def _unknown(name: str, pool, where: str) -> str:
    close = difflib.get_close_matches(name, pool, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "`python -c 'import timm; print(timm.list_models())'` lists timm's"
    return f"unknown model '{name}' (not in {where}); {hint}"


def default_input_size(model: nn.Module, name: str | None = None) -> tuple[int, ...]:
    """The sample size `model` (built from `name`, if given) is made for: timm's pretrained
    config if the model has one; for torchvision's segmentation and video models, the
    preprocessing size of their weights (video: C,T,H,W with 16 frames, or more if the model
    needs them); else torchvision's 3x224x224, which every weight-less torchvision classifier
    takes (weights' sizes can differ: vit_h_14's are 518, its weight-less builder is 224)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if size:
        return tuple(size)
    tv_name = torchvision_name(name) if name else None
    task = torchvision_tasks()[tv_name] if tv_name else None
    if task in ("segmentation", "video"):
        weights = torchvision.models.get_model_weights(tv_name).DEFAULT  # metadata only, nothing is downloaded
        keywords = getattr(weights.transforms, "keywords", {})
        side = keywords.get("crop_size") or keywords.get("resize_size")
        height, width = (side, side) if isinstance(side, int) else (side[0], side[-1])
        if task == "video":
            return (3, max(VIDEO_FRAMES, weights.meta.get("min_temporal_size", 1)), height, width)
        return (3, height, width)
    return TORCHVISION_INPUT_SIZE


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state_dict from a local file: a bare one, or a checkpoint holding one."""
    obj = read_torch_file(path, WeightsError, "weights file", "give a state_dict saved with torch.save")
    if isinstance(obj, dict):
        obj = next((obj[k] for k in CHECKPOINT_KEYS if isinstance(obj.get(k), dict)), obj)
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"weights file '{path}' holds no state_dict (a dict of tensors)")
    if all(k.startswith("module.") for k in obj):  # saved from DistributedDataParallel
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def state_dict_mismatch(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str | None:
    """How `state` does not fit a module whose state_dict is `own`, named key by key
    (None when it fits)."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and own[k].shape != state[k].shape]
    if not (missing or unexpected or mismatched):
        return None
    counts = f"{len(missing)} missing{_examples(missing)}, {len(unexpected)} unexpected{_examples(unexpected)}, {len(mismatched)} mis-shaped tensors"
    shapes = [f"'{k}' is {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model" for k in mismatched[:2]]
    return "; ".join([counts, *shapes])


def _examples(keys: list[str]) -> str:
    return f" ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})" if keys else ""


def load_weights(model: nn.Module, path: str) -> None:
    """Load a local state_dict into `model`, or say exactly how it does not fit."""
    state = read_state_dict(path)
    mismatch = state_dict_mismatch(model.state_dict(), state)
    if mismatch:
        raise WeightsError(f"weights file '{path}' does not fit {type(model).__name__}: {mismatch}; check the model name and --num-classes")
    model.load_state_dict(state)
