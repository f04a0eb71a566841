"""Named recipes: the paper's hyper-parameters, and a quick one for the embedded data.

A `Recipe` holds a run's defaults; `resolve` fills what the user did not set (CLI options
override every value) and derives the rest (batch 256*N/2, epochs per model, the learning
rate from the actual batch size). Every learning rate follows a linear scaling rule whose
arithmetic is written into the run's config (`lr_rule`) and printed when training starts.
Values the paper does not state are marked "ours".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from rmn_fx.errors import OptionError

PAPER_EPOCHS_SMALL = {"vgg16": 120, "resnet18": 120, "resnet50": 200, "efficientnet_b0": 300}  # CIFAR-100, Tiny ImageNet
PAPER_EPOCHS_IMAGENET = {"vgg16": 160, "resnet18": 160, "resnet50": 220, "efficientnet_b0": 400}
DEFAULT_EPOCHS = 120  # for models the paper did not train (ours)


@dataclass(frozen=True)
class LinearLR:
    """Peak learning rate `rate` at batch `per_batch`, scaled linearly with the batch size."""

    rate: float
    per_batch: int
    source: str

    def at(self, batch_size: int) -> float:
        return self.rate * batch_size / self.per_batch

    def describe(self, batch_size: int) -> str:
        return f"{self.rate:g} * batch {batch_size} / {self.per_batch} = {self.at(batch_size):.4g} ({self.source})"


@dataclass(frozen=True)
class OfPeak:
    """A learning rate set as a fraction of the run's peak, so a warm-up start or a final rate
    follows whichever optimizer's rule (and batch) sets the peak."""

    fraction: float

    def at(self, peak: float) -> float:
        return self.fraction * peak


TIMM_RMSPROP = LinearLR(0.016, 256, "timm's EfficientNet RMSprop rate; the paper gives none, ours")
DEIT_ADAMW = LinearLR(5e-4, 512, "DeiT's AdamW rate; the paper gives none, ours")


@dataclass(frozen=True)
class Recipe:
    """The defaults of one named recipe."""

    description: str
    data: str | None  # None: the user must give --data
    image_size: int
    remove_downsamplings: int
    epochs: int | dict[str, int]  # a dict: per model (base name), DEFAULT_EPOCHS otherwise
    stem_epochs: int
    lr_rules: dict[str, LinearLR]  # optimizer -> its peak-lr rule (the one --optimizer picks)
    lr_start: float | OfPeak  # the warm-up's first rate (a float: as given, e.g. the paper's)
    lr_end: float | OfPeak  # the cosine's last rate
    warmup_epochs: float
    optimizer: str
    momentum: float
    weight_decay: float
    batch_size: int | None  # None: 256 * N / 2, the paper's
    memory_momentum: float = 0.9
    rmsprop_models: tuple[str, ...] = ()  # base-name prefixes of models trained with RMSprop
    no_downsampling_removal: tuple[str, ...] = ()  # base-name prefixes
    classifier_init: str = "model"  # "zero": zero-initialise a from-scratch model's classifier
    # (base-name prefix, {recipe field: value}): defaults for a family, before the user's options
    model_defaults: tuple[tuple[str, dict], ...] = ()


_PAPER_SGD = LinearLR(0.48, 1024, "the paper's 0.48 at its batch 1024 (N = 8)")
_PAPER = {
    "stem_epochs": 40,
    "lr_rules": {"sgd": _PAPER_SGD, "rmsprop": TIMM_RMSPROP, "adamw": DEIT_ADAMW},
    "lr_start": 1e-5,
    "lr_end": 1e-5,
    "warmup_epochs": 5,
    "optimizer": "sgd",
    "momentum": 0.9,
    "weight_decay": 1e-5,
    "batch_size": None,
    "rmsprop_models": ("efficientnet",),  # the paper trains EfficientNet with RMSprop
}

RECIPES: dict[str, Recipe] = {
    "quick": Recipe(
        description="minutes on a laptop CPU: the embedded digits data, 32x32, 8 epochs, SGD for every model (ours)",
        data="digits",
        image_size=32,
        remove_downsamplings=0,
        epochs=8,
        stem_epochs=3,
        lr_rules={
            "sgd": LinearLR(0.05, 128, "ours; 0.1 made the plain ResNet-18 unstable on some seeds"),
            "rmsprop": TIMM_RMSPROP,
            "adamw": LinearLR(1e-3, 64, "ours; 3e-3 kept a small ViT at chance on the digits"),
        },
        lr_start=OfPeak(0.2),  # 0.01 and 1e-4 at SGD's 0.05
        lr_end=OfPeak(0.002),
        warmup_epochs=1,
        optimizer="sgd",
        momentum=0.9,
        weight_decay=5e-4,
        batch_size=128,
        # Families that start slowly from scratch (README, "Does the quick recipe train every
        # family?"). EfficientNet gets a zero classifier (torchvision's init is sized for
        # 1,000 classes: the first loss is 4-5, not ln 10) and 4x the steps per epoch: either
        # alone stays at chance, both train it. ViTs get AdamW (SGD kept them at chance),
        # weight decay 0.05 and half the base batch; their classifier keeps timm's small
        # init (a zero one slowed a small ViT's start: loss 2.306 against 2.262 after 2 epochs).
        model_defaults=(
            ("efficientnet", {"batch_size": 32, "classifier_init": "zero"}),
            ("vit", {"optimizer": "adamw", "weight_decay": 0.05, "batch_size": 64}),
        ),
    ),
    "paper-cifar100": Recipe(
        description="the paper's CIFAR-100 setting: 32x32, first two downsamplings removed (not for VGG)",
        data=None,
        image_size=32,
        remove_downsamplings=2,
        epochs=PAPER_EPOCHS_SMALL,
        no_downsampling_removal=("vgg",),  # the paper keeps VGG's downsamplings on CIFAR
        **_PAPER,
    ),
    "paper-tinyimagenet": Recipe(
        description="the paper's Tiny ImageNet setting: 64x64, first two downsamplings removed",
        data=None,
        image_size=64,
        remove_downsamplings=2,
        epochs=PAPER_EPOCHS_SMALL,
        **_PAPER,
    ),
    "paper-imagenet": Recipe(
        description="the paper's ImageNet setting: 224x224",
        data=None,
        image_size=224,
        remove_downsamplings=0,
        epochs=PAPER_EPOCHS_IMAGENET,
        **_PAPER,
    ),
}


def base_name(model: str) -> str:
    """'timm:resnet18' -> 'resnet18'; 'pkg.mod:factory' -> 'factory'."""
    return model.rpartition(":")[2].rpartition(".")[2].lower()


def _matches(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name.startswith(p) for p in prefixes)


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise OptionError(f"unknown recipe '{name}'; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]


def resolve(recipe_name: str, model: str, branches: int, overrides: dict) -> dict:
    """The training values of a run: recipe defaults, per-model values, the user's overrides
    (None: not given), and the learning rate from the batch size and optimizer."""
    recipe = get_recipe(recipe_name)
    name = base_name(model)
    given = {k: v for k, v in overrides.items() if v is not None}
    family = next((values for prefix, values in recipe.model_defaults if name.startswith(prefix)), {})
    recipe = dataclasses.replace(recipe, **family)
    epochs = recipe.epochs.get(name, DEFAULT_EPOCHS) if isinstance(recipe.epochs, dict) else recipe.epochs
    optimizer = "rmsprop" if _matches(name, recipe.rmsprop_models) else recipe.optimizer
    values = {
        "data": recipe.data,
        "input_size": [3, recipe.image_size, recipe.image_size],
        "remove_downsamplings": 0 if _matches(name, recipe.no_downsampling_removal) else recipe.remove_downsamplings,
        "epochs": epochs,
        "stem_epochs": recipe.stem_epochs,
        "warmup_epochs": recipe.warmup_epochs,
        "optimizer": optimizer,
        "momentum": recipe.momentum,
        "weight_decay": recipe.weight_decay,
        "batch_size": recipe.batch_size or 256 * branches // 2,
        "memory_momentum": recipe.memory_momentum,
        "classifier_init": recipe.classifier_init,
        **given,
    }
    if "lr" in given:
        values["lr_rule"] = f"{given['lr']:g} (given with --lr)"
    else:
        if values["optimizer"] not in recipe.lr_rules:
            raise OptionError(f"unknown optimizer '{values['optimizer']}'; use one of {', '.join(recipe.lr_rules)}")
        rule = recipe.lr_rules[values["optimizer"]]
        values["lr"] = rule.at(values["batch_size"])
        values["lr_rule"] = f"{values['optimizer']} at " + rule.describe(values["batch_size"])
    for key in ("lr_start", "lr_end"):
        if key not in given:
            rate = getattr(recipe, key)
            values[key] = rate.at(values["lr"]) if isinstance(rate, OfPeak) else rate
    if values["data"] is None:
        raise OptionError(f"recipe '{recipe_name}' needs --data (e.g. cifar100:/data/cifar-100-python or imagefolder:/data/tiny-imagenet)")
    if not 0 <= values["stem_epochs"] <= values["epochs"]:
        raise OptionError(f"stem epochs ({values['stem_epochs']}) must lie between 0 and the epochs ({values['epochs']})")
    return values
