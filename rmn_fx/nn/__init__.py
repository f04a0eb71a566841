"""The runtime: modules a converted model is made of, and the mechanics they share.
Imports nothing from the rest of rmn-fx but its errors."""

from .attention import ConditionalAttention
from .routed_stage import RoutedStage, routed_stages
from .routing import MemoryRouter, dispatch

__all__ = ["ConditionalAttention", "MemoryRouter", "RoutedStage", "dispatch", "routed_stages"]
