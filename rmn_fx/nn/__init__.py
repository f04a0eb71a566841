"""The runtime: modules a converted model is made of, and the mechanics they share.
Imports nothing from the rest of rmn-fx but its errors."""

from .attention import ConditionalAttention
from .compile_boundary import eager_frames
from .routed_stage import PartSpec, RoutedStage, routed_stages
from .routing import MemoryRouter, dispatch
from .rules import RoutingConfig, create_stage, register_rule, rule_names

eager_frames(__name__)  # torch.compile: the runtime's code runs eagerly, the procedures compile

__all__ = [
    "ConditionalAttention",
    "MemoryRouter",
    "PartSpec",
    "RoutedStage",
    "RoutingConfig",
    "create_stage",
    "dispatch",
    "register_rule",
    "routed_stages",
    "rule_names",
]
