"""Routing rules, one file each; the imports below are the registry's entries.

A new rule: a file here with a `RoutedStage` subclass decorated `@register_rule("name")`
(declaring the RoutingConfig options it reads), and one import line below.
"""

from . import cross_connections, cross_prediction, gate, memory  # noqa: F401 - registers the rules
from .config import RoutingConfig
from .registry import register_rule, rule_class, rule_names

__all__ = ["RoutingConfig", "create_stage", "register_rule", "rule_class", "rule_names"]


def create_stage(procedure, spec, config: RoutingConfig):
    """The routed stage of `config.rule` around `procedure` (a string-to-class factory)."""
    return rule_class(config.rule)(procedure, spec, config)
