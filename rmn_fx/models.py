"""Resolve a model name to a randomly initialised nn.Module, and load local weights.

Names resolve to torchvision first, then timm; `timm:NAME` and `torchvision:NAME` force
one of them, and `package.module:factory` calls a factory of the user's own. Nothing is
ever downloaded: weights come from a local file (`load_weights`) or stay random.
"""

from __future__ import annotations

import difflib
import importlib
import warnings
from functools import cache

import torch
import torchvision
from torch import nn

from .errors import ModelNotFoundError, WeightsError
from .files import read_torch_file

TORCHVISION_INPUT_SIZE = (3, 224, 224)
CHECKPOINT_KEYS = ("state_dict", "model", "model_state_dict", "state_dict_ema", "model_ema")


@cache
def torchvision_names() -> tuple[str, ...]:
    """torchvision's image classification models."""
    return tuple(torchvision.models.list_models(module=torchvision.models))


@cache
def timm_names() -> tuple[str, ...]:
    import timm

    return tuple(timm.list_models())


def create_model(name: str, num_classes: int | None = None) -> nn.Module:
    """Build `name` with random weights; see the module docstring for the name forms."""
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    hub, sep, rest = name.partition(":")
    if sep and hub not in ("timm", "torchvision"):
        return _call_factory(name, kwargs)
    if hub == "torchvision" or (not sep and name in torchvision_names()):
        model_name = rest if sep else name
        if model_name not in torchvision_names():
            raise ModelNotFoundError(_unknown(model_name, torchvision_names(), "torchvision"))
        with warnings.catch_warnings():  # init_weights FutureWarnings of googlenet/inception
            warnings.simplefilter("ignore", FutureWarning)
            return torchvision.models.get_model(model_name, weights=None, **kwargs)
    import timm

    model_name = rest if sep else name
    if not timm.is_model(model_name):
        pool = timm_names() if sep else tuple(dict.fromkeys(torchvision_names() + timm_names()))
        raise ModelNotFoundError(_unknown(model_name, pool, "timm" if sep else "torchvision or timm"))
    return timm.create_model(model_name, pretrained=False, **kwargs)


def _unknown(name: str, pool, where: str) -> str:
    close = difflib.get_close_matches(name, pool, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "`python -c 'import timm; print(timm.list_models())'` lists timm's"
    return f"unknown model '{name}' (not in {where}); {hint}"


def _call_factory(spec: str, kwargs: dict) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelNotFoundError(f"cannot import model factory '{spec}' ({exc}); give MODULE:CALLABLE on the Python path") from exc
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ModelNotFoundError(f"factory '{spec}' returned {type(model).__name__}, not an nn.Module")
    return model


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


def load_weights(model: nn.Module, path: str) -> None:
    """Load a local state_dict into `model`, or say exactly how it does not fit."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or mismatched:
        first = (
            f"'{mismatched[0]}' is {tuple(state[mismatched[0]].shape)} in the file, {tuple(own[mismatched[0]].shape)} in the model"
            if mismatched
            else f"e.g. '{(missing or unexpected)[0]}'"
        )
        raise WeightsError(
            f"weights file '{path}' does not fit {type(model).__name__}: {len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(mismatched)} mis-shaped tensors ({first}); "
            "check the model name and --num-classes"
        )
    model.load_state_dict(state)
