"""Save and load converted models without pickling code.

A file is `torch.save` of a plain dict that `torch.load(..., weights_only=True)` reads:
    {"format": "rmn-fx", "format_version": 1, "config": <JSON text>, "state_dict": {...}}
The config says how to rebuild the architecture (the model name or, for a user's own
model, nothing: pass `model=` to `load`), with the conversion options and the stage plan.
Loading rebuilds, checks that the stages found are the stored ones, and loads the tensors.
Writes are atomic: a temporary file in the target directory, renamed when complete.
"""

from __future__ import annotations

import json

import torch
from torch import fx, nn

from .errors import ModelFileError
from .files import atomic_write, read_torch_file
from .transform import transform

FORMAT = "rmn-fx"
FORMAT_VERSION = 1


def save(gm: fx.GraphModule, path: str) -> None:
    """Write a converted model to `path` (atomically)."""
    config = gm.meta.get("rmn_fx")
    if config is None:
        raise ModelFileError("this module was not made by rmn_fx.transform; only converted models can be saved")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(config),
        "state_dict": gm.state_dict(),
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def read(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config and state_dict of an rmn-fx file, or a ModelFileError saying what is wrong."""
    payload = read_torch_file(path, ModelFileError, "model file", "give a file written by rmn-fx convert or rmn_fx.save")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(f"'{path}' is not an rmn-fx model file; convert a model with `rmn-fx convert`")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFileError(
            f"'{path}' has rmn-fx format version {version}; this rmn-fx reads version {FORMAT_VERSION} (use a matching release)"
        )
    try:
        config = json.loads(payload["config"])
        state = payload["state_dict"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"'{path}' is damaged: its config cannot be read ({exc})") from exc
    return config, state


def load(path: str, model: nn.Module | None = None, map_location: str | torch.device = "cpu") -> fx.GraphModule:
    """Rebuild a converted model from `path`; `model` is the base network for user models."""
    config, state = read(path)
    source = config.get("source")
    if model is None and source is None:
        raise ModelFileError(f"'{path}' was converted from a user model; pass the base network: rmn_fx.load(path, model=MyNet())")
    base = model if model is not None else source["model"]
    gm = transform(
        base,
        branches=config["branches"],
        attention=config["attention"],
        stages=config["stages"],
        routed=config["routed"],
        input_size=config["input_size"],
        momentum=config["momentum"],
        remove_downsamplings=config.get("remove_downsamplings", 0),
        num_classes=None if model is not None else source.get("num_classes"),
        verify=False,
    )
    if gm.meta["rmn_fx"]["stage_plan"] != config["stage_plan"]:
        raise ModelFileError(
            f"'{path}' was made with stages {config['stage_plan']}, but this model and rmn-fx give "
            f"{gm.meta['rmn_fx']['stage_plan']}; load it with the rmn-fx release and model code that wrote it"
        )
    gm.meta["rmn_fx"]["source"] = source
    try:
        gm.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelFileError(f"'{path}' does not fit the rebuilt model ({str(exc).splitlines()[0]})") from exc
    return gm.to(map_location).eval()
