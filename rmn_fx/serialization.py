"""Save and load converted models without pickling code.

A file is `torch.save` of a plain dict that `torch.load(..., weights_only=True)` reads:
    {"format": "rmn-fx", "format_version": 2, "config": <JSON text>, "state_dict": {...}}
The config says how to rebuild the architecture (the model name or, for a user's own
model, nothing: pass `model=` to `load`), with the routing (rule and options), the
conversion options and the stage plan. Version-1 files (memory routing, before rules
existed) load unchanged.
Loading rebuilds, checks that the stages found are the stored ones, and loads the tensors.
Writes are atomic: a temporary file in the target directory, renamed when complete.
"""

from __future__ import annotations

import json

import torch
from torch import fx, nn

from .conversion import left_out_said_elsewhere, transform
from .errors import ModelFileError, OptionError, UntrustedCodeError
from .files import atomic_write, read_torch_file
from .models import is_factory, state_dict_mismatch
from .nn.rules import RoutingConfig

FORMAT = "rmn-fx"
FORMAT_VERSION = 2  # 2: the routing rule and its options ("routing"); 1: memory routing only
READABLE_VERSIONS = (1, 2)


def save(gm: fx.GraphModule, path: str) -> None:
    """Write a converted model to `path` (atomically), its tensors on the CPU: a model
    trained on a GPU opens with a plain `torch.load` on a machine without one."""
    config = gm.meta.get("rmn_fx")
    if config is None:
        raise ModelFileError("this module was not made by rmn_fx.transform; only converted models can be saved")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(config),
        "state_dict": {name: value.detach().cpu() for name, value in gm.state_dict().items()},
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def read(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config and state_dict of an rmn-fx file, or a ModelFileError saying what is wrong."""
    payload = read_torch_file(path, ModelFileError, "model file", "give a file written by rmn-fx convert or rmn_fx.save")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(f"'{path}' is not an rmn-fx model file; convert a model with `rmn-fx convert`")
    version = payload.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ModelFileError(
            f"'{path}' has rmn-fx format version {version}; this rmn-fx reads versions {READABLE_VERSIONS} (use a matching release)"
        )
    try:
        config = json.loads(payload["config"])
        state = payload["state_dict"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"'{path}' is damaged: its config cannot be read ({exc})") from exc
    return config, state


def load(
    path: str,
    model: nn.Module | None = None,
    map_location: str | torch.device = "cpu",
    trust_factory: bool = False,
) -> fx.GraphModule:
    """Rebuild a converted model from `path`.

    model:         the base network (needed for a user's own model; overrides the file's name).
    trust_factory: let the file's `package.module:factory` source be imported and called.
                   Off by default: a file is data, and a torchvision/timm name is rebuilt
                   from the registries without running anything the file names.
    """
    config, state = read(path)
    source = config.get("source")
    base = model if model is not None else _base_from_source(path, source, trust_factory)
    with left_out_said_elsewhere():
        gm = transform(
            base,
            routing=_routing_of(path, config),
            stages=config["stages"],
            granularity=config.get("granularity", "stage"),
            routed=config["routed"],
            input_size=config["input_size"],
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
    mismatch = state_dict_mismatch(gm.state_dict(), state)
    if mismatch:
        raise ModelFileError(f"'{path}' does not fit the rebuilt model: {mismatch}; pass the model the file was converted from")
    gm.load_state_dict(state)
    return gm.to(map_location).eval()


def _routing_of(path: str, config: dict) -> RoutingConfig:
    try:
        return RoutingConfig.from_meta(config)
    except (KeyError, TypeError) as exc:
        raise ModelFileError(f"'{path}' is damaged: its routing cannot be read ({exc})") from exc
    except OptionError as exc:
        raise ModelFileError(f"'{path}' has a routing this rmn-fx cannot build ({exc}); use the rmn-fx release that wrote it") from exc


def _base_from_source(path: str, source, trust_factory: bool) -> str:
    """The model name to rebuild from, once it is known to run no code the file names."""
    if source is None:
        raise ModelFileError(f"'{path}' was converted from a user model; pass the base network: rmn_fx.load(path, model=MyNet())")
    name, classes = (source.get("model"), source.get("num_classes")) if isinstance(source, dict) else (None, None)
    if not isinstance(name, str) or not (classes is None or (isinstance(classes, int) and not isinstance(classes, bool))):
        raise ModelFileError(f"'{path}' is damaged: its model source {source!r} is not a model name and class count")
    if is_factory(name) and not trust_factory:
        raise UntrustedCodeError(
            f"'{path}' names the factory '{name}', which loading would import and call; pass the base network "
            "(rmn_fx.load(path, model=...)) or, if you trust the file, opt in with trust_factory=True (CLI: --trust-factory)"
        )
    return name
