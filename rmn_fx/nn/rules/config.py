"""RoutingConfig: which rule routes a converted model, and its options (typed, validated).

It travels from `transform` into the rewrite, into `gm.meta["rmn_fx"]["routing"]` and the
saved file, and back through `load`. Options belong to rules (each rule class declares the
ones it reads, with defaults); an option given to a rule that does not read it is an error,
and an option left as None takes the rule's default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from rmn_fx.errors import OptionError

from .registry import rule_class, rule_names

OPTION_FLAGS = {"attention": "--attention", "momentum": "--memory-momentum", "top_k": "--top-k"}  # field -> CLI option


@dataclass(frozen=True)
class RoutingConfig:
    rule: str = "memory"
    branches: int = 8
    attention: bool | None = None  # memory: Conditional Attention after the procedures
    momentum: float | None = None  # memory: the memories' moving average
    top_k: int | None = None  # gate: procedures per sample

    def __post_init__(self) -> None:
        cls = rule_class(self.rule)
        if isinstance(self.branches, bool) or not isinstance(self.branches, int) or self.branches < 1:
            raise OptionError(f"branches must be an integer >= 1, got {self.branches!r}")
        for name, flag in OPTION_FLAGS.items():
            value = getattr(self, name)
            if name in cls.options:
                if value is None:
                    object.__setattr__(self, name, cls.options[name])
            elif value is not None:
                owners = [r for r in rule_names() if name in rule_class(r).options]
                raise OptionError(f"{name} ({flag}) applies to routing {' or '.join(map(repr, owners))} only, not {self.rule!r}; leave it out")
        cls.check_options(self)

    def describe(self) -> str:
        """"gate routing (top_k=2)": the rule and the options it reads."""
        options = ", ".join(f"{k}={getattr(self, k)}" for k in OPTION_FLAGS if getattr(self, k) is not None)
        return f"{self.rule} routing" + (f" ({options})" if options else "")

    def as_meta(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_meta(cls, meta: dict) -> RoutingConfig:
        """The routing of a converted model's meta (files from before rules existed: memory)."""
        if "routing" in meta:
            return cls(**meta["routing"])
        return cls("memory", meta["branches"], meta["attention"], meta["momentum"])
