"""Resolve a model name to a randomly initialised nn.Module, and load local weights.

Names resolve to torchvision first, then timm; `timm:NAME` and `torchvision:NAME` force
one of them, and `package.module:factory` calls a factory of the user's own. Nothing is
ever downloaded: weights come from a local file (`load_weights`) or stay random.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import warnings

import torch
import torchvision
from torch import nn

from .errors import ModelBuildError, ModelNotFoundError, WeightsError, first_line
from .files import read_torch_file

TORCHVISION_INPUT_SIZE = (3, 224, 224)
HUBS = ("timm", "torchvision")
CHECKPOINT_KEYS = ("state_dict", "model", "model_state_dict", "state_dict_ema", "model_ema")


@functools.cache
def torchvision_names() -> tuple[str, ...]:
    """torchvision's image classification models."""
    return tuple(torchvision.models.list_models(module=torchvision.models))


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
    if hub == "torchvision" or (not sep and name in torchvision_names()):
        if model_name not in torchvision_names():
            raise ModelNotFoundError(_unknown(model_name, torchvision_names(), "torchvision"))
        return functools.partial(torchvision.models.get_model, model_name, weights=None)
    import timm

    if not timm.is_model(model_name):
        pool = timm_names() if sep else tuple(dict.fromkeys(torchvision_names() + timm_names()))
        raise ModelNotFoundError(_unknown(model_name, pool, "timm" if sep else "torchvision or timm"))
    return functools.partial(timm.create_model, model_name, pretrained=False)


def _unknown(name: str, pool, where: str) -> str:
    close = difflib.get_close_matches(name, pool, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "`python -c 'import timm; print(timm.list_models())'` lists timm's"
    return f"unknown model '{name}' (not in {where}); {hint}"


def default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """timm's pretrained config if the model has one, else torchvision's 3x224x224."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return tuple(size) if size else TORCHVISION_INPUT_SIZE


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
