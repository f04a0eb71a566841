"""What a run is built from: the device, the converted model, the optimizer.

Each builder reads the RunConfig and nothing else, so the trainer receives finished parts.
"""

from __future__ import annotations

import torch
from torch import nn

import rmn_fx
from rmn_fx.errors import OptionError, WeightsError
from rmn_fx.models import create_model, read_state_dict, state_dict_mismatch

from .config import RunConfig


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise OptionError("--device cuda, but this machine has no usable CUDA device; use --device cpu")
    return torch.device(choice)


def build_base(config: RunConfig, num_classes: int) -> tuple[nn.Module, list[str]]:
    """The base network for `num_classes`, with --weights loaded if given. Returns it and
    the names of weight tensors left at random initialisation: a classifier whose class
    count differs from the file's (a fine-tune to a new task)."""
    base = create_model(config.model, num_classes)
    if not config.weights:
        if config.classifier_init == "zero":
            zero_classifier(base, num_classes)
        return base, []
    return base, load_fine_tune_weights(base, config.weights, num_classes)


@torch.no_grad()
def zero_classifier(model: nn.Module, num_classes: int) -> None:
    """Zero the classifier (the last linear layer with `num_classes` outputs), so that a
    from-scratch model starts at the uniform guess, loss ln(classes)."""
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    if not heads:
        raise OptionError(f"--classifier-init zero found no linear layer with {num_classes} outputs in {type(model).__name__}; use --classifier-init model")
    nn.init.zeros_(heads[-1].weight)
    if heads[-1].bias is not None:
        nn.init.zeros_(heads[-1].bias)


def load_fine_tune_weights(model: nn.Module, path: str, num_classes: int) -> list[str]:
    """Load `path` into `model`; tensors whose only difference is the class count (the
    classifier of another task) keep their initialisation. Anything else must fit."""
    state = read_state_dict(path)
    own = model.state_dict()
    new_head = [k for k in own if k in state and own[k].shape != state[k].shape and own[k].shape[:1] == (num_classes,)]
    kept = {k: v for k, v in state.items() if k not in new_head}
    mismatch = state_dict_mismatch({k: v for k, v in own.items() if k not in new_head}, kept)
    if mismatch:
        raise WeightsError(f"weights file '{path}' does not fit {type(model).__name__}: {mismatch}; check the model name")
    model.load_state_dict({**own, **kept})
    return new_head


def build_model(config: RunConfig, num_classes: int) -> tuple[nn.Module, list[str]]:
    """The converted model (procedure 0 of every stage is the base network's stage)."""
    base, new_head = build_base(config, num_classes)
    model = rmn_fx.transform(
        base,
        routing=config.routing_config(),
        stages=config.stages,
        granularity=config.granularity,
        routed=config.routed,
        input_size=tuple(config.input_size),
        remove_downsamplings=config.remove_downsamplings,
    )
    model.meta["rmn_fx"]["source"] = {"model": config.model, "num_classes": num_classes}
    return model, new_head


OPTIMIZERS = ("sgd", "rmsprop", "adamw")


def build_optimizer(model: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    """SGD (Nesterov off, as the paper), RMSprop (timm's EfficientNet settings) or AdamW;
    no weight decay on norms and biases, as torchvision's and timm's recipes."""
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=config.lr, alpha=0.9, eps=1e-3, momentum=config.momentum)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=(config.momentum, 0.999))
    raise OptionError(f"unknown optimizer '{config.optimizer}'; use one of {', '.join(OPTIMIZERS)}")
