"""The registry of routing rules: name -> RoutedStage subclass (as timm's `_registry`).

A rule is one file in this package that decorates its class with `@register_rule("name")`,
plus one import line in `rules/__init__.py`; nothing else names it.
"""

from __future__ import annotations

from rmn_fx.errors import OptionError

from ..routed_stage import RoutedStage

_RULES: dict[str, type[RoutedStage]] = {}


def register_rule(name: str):
    def decorate(cls: type[RoutedStage]) -> type[RoutedStage]:
        if name in _RULES:
            raise ValueError(f"routing rule {name!r} is registered twice")
        cls.rule = name
        _RULES[name] = cls
        return cls

    return decorate


def rule_names() -> list[str]:
    return list(_RULES)


def rule_class(name: str) -> type[RoutedStage]:
    if name not in _RULES:
        raise OptionError(f"unknown routing rule {name!r}; choose one of: {', '.join(_RULES)}")
    return _RULES[name]
