"""`RunConfig`: everything a training run is made of, typed, and saved as RUN/config.json.

It is built once (`RunConfig.create`: recipe defaults + the user's options) and read back
on resume (`RunConfig.read`); the fields in `IDENTITY` make a run what it is, so a resume
may not change them. Checks that can only fail later (k-means sample cap, memory for the
procedures) run in `validate`, before any work.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from rmn_fx.errors import OptionError, RMNError
from rmn_fx.nn.rules import RoutingConfig, rule_class

from .presets import resolve

# what makes a run the run it is: a resume may not change these
IDENTITY = ("model", "routing", "branches", "top_k", "attention", "stages", "granularity", "routed", "weights", "input_size", "remove_downsamplings", "data")
CLASSIFIER_INITS = ("model", "zero")  # the model's own initialisation, or zeros
# how a run is executed on this machine: a resume may change these
MACHINE = ("device", "workers")


class RunError(RMNError):
    """A run directory cannot be used as asked (or training cannot go on)."""


@dataclass
class RunConfig:
    """A training run: the model and its conversion, the data, the recipe's values."""

    recipe: str
    model: str
    branches: int
    data: str
    epochs: int
    stem_epochs: int
    batch_size: int
    lr: float
    lr_rule: str  # how lr was derived, e.g. "sgd at 0.05 * batch 128 / 128 = 0.05 (ours)"
    lr_start: float
    lr_end: float
    warmup_epochs: float
    optimizer: str
    momentum: float  # the optimizer's
    weight_decay: float
    memory_momentum: float
    input_size: list[int]  # C, H, W of the training images
    classifier_init: str = "model"  # "zero": the classifier of a from-scratch model starts at zero
    remove_downsamplings: int = 0
    routing: str = "memory"  # the rule (rmn_fx.nn.rule_names())
    top_k: int | None = None  # gate: procedures per sample (None: the rule's default)
    attention: bool | None = None  # memory: Conditional Attention (None: the rule's default, on)
    balance_loss: float = 0.01  # gate: weight of the load-balancing loss (Switch Transformer's)
    stages: str | None = None
    granularity: str = "stage"  # "block": every block of a stage is a routed part
    routed: list[int] | None = None
    weights: str | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool | None = None
    workers: int = 0
    dead_window: int = 50
    revive: bool = True
    kmeans_samples: int | None = None
    sync_bn: bool = False
    max_loss: float | None = None  # None: 10 x the loss of a uniform guess, ln(classes)

    @classmethod
    def create(cls, recipe: str, model: str, branches: int, overrides: dict, settings: dict) -> RunConfig:
        """Recipe defaults, then the user's `overrides` of recipe values (None: not given),
        then the run `settings` (conversion and machine options)."""
        values = resolve(recipe, model, branches, overrides)
        if overrides.get("memory_momentum") is not None:  # given by the user: it must apply
            RoutingConfig(settings.get("routing", "memory"), branches, momentum=overrides["memory_momentum"])
        config = cls(recipe=recipe, model=model, branches=branches, **values, **settings)
        config.input_size = list(config.input_size)
        config.validate()
        return config

    def routing_config(self) -> RoutingConfig:
        """The typed routing of the run: the rule and the options it reads."""
        values = {"attention": self.attention, "top_k": self.top_k}
        if "momentum" in rule_class(self.routing).options:  # a recipe value, so always set
            values["momentum"] = self.memory_momentum
        return RoutingConfig(self.routing, self.branches, **values)

    def validate(self) -> None:
        """Refuse, before any work, what could only fail later."""
        self.routing_config()
        channels, height, width = self.input_size
        if channels != 3 or height != width:
            raise OptionError(f"training images are square RGB: give --input-size 3,S,S (or S), not {','.join(map(str, self.input_size))}")
        if self.kmeans_samples is not None and self.routing != "memory":
            raise OptionError(f"--kmeans-samples sets up memories, which routing {self.routing!r} has not; leave it out")
        if self.kmeans_samples is not None and self.kmeans_samples < self.branches:
            raise OptionError(
                f"--kmeans-samples {self.kmeans_samples} is below the branch count {self.branches}: k-means needs a key per memory; "
                f"give at least {self.branches}"
            )
        if self.classifier_init not in CLASSIFIER_INITS:
            raise OptionError(f"--classifier-init must be one of {', '.join(CLASSIFIER_INITS)}, not {self.classifier_init!r}")
        if self.sync_bn and self.device == "cpu":
            raise OptionError("--sync-bn needs CUDA (SyncBatchNorm has no CPU kernels); drop it or use --device cuda")

    @property
    def image_size(self) -> int:
        return self.input_size[1]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, where: str) -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise RunError(f"'{where}' has settings this rmn-fx does not know ({', '.join(unknown)}); resume it with the release that wrote it")
        try:
            return cls(**values)
        except TypeError as exc:
            raise RunError(f"'{where}' is damaged ({exc}); start a new run") from exc

    @classmethod
    def read(cls, path: str) -> RunConfig:
        try:
            with open(path) as f:
                return cls.from_dict(json.load(f), path)
        except (OSError, ValueError) as exc:
            raise RunError(f"cannot read '{path}' ({exc}); the run directory is damaged") from exc

    def changed(self, asked: dict) -> list[str]:
        """The options in `asked` that differ from this run's, except the machine's."""
        return sorted(k for k, v in asked.items() if k not in MACHINE and getattr(self, k) != v)

    def check_identity(self, asked: dict, run_dir: str) -> None:
        """Refuse to resume a run with a different model, branch count, data..."""
        for key in IDENTITY:
            if asked.get(key) is not None and asked[key] != getattr(self, key):
                raise RunError(
                    f"'{run_dir}' was trained with {key} {getattr(self, key)!r}, not {asked[key]!r}; "
                    f"resume without --{key.replace('_', '-')}, or start a new run with another -o"
                )
