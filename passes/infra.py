"""A small pass infrastructure modelled on `torch.fx.passes.infra`.

torch marks its infra as not backward-compatible, so rmn-fx mirrors its interface
(PassBase / PassResult / PassManager) instead of importing it. A pass is a callable over a
GraphModule that returns a PassResult; the manager lints and recompiles after every pass
that modified the graph and runs the registered checks.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import NamedTuple

from torch import fx


class PassResult(NamedTuple):
    graph_module: fx.GraphModule
    modified: bool


class PassBase(abc.ABC):
    """A pass: `requires` (preconditions), `call` (the work), `ensures` (postconditions)."""

    def __call__(self, graph_module: fx.GraphModule) -> PassResult:
        self.requires(graph_module)
        result = self.call(graph_module)
        self.ensures(result.graph_module)
        return result

    @abc.abstractmethod
    def call(self, graph_module: fx.GraphModule) -> PassResult: ...

    def requires(self, graph_module: fx.GraphModule) -> None:
        """Raise if `graph_module` lacks what this pass needs."""

    def ensures(self, graph_module: fx.GraphModule) -> None:
        """Raise if this pass did not leave `graph_module` as promised."""


class PassManager:
    """Runs passes in order; after each modifying pass: lint, recompile, then the checks."""

    def __init__(
        self,
        passes: Sequence[Callable[[fx.GraphModule], PassResult]],
        checks: Sequence[Callable[[fx.GraphModule], None]] = (),
    ) -> None:
        self.passes = list(passes)
        self.checks = list(checks)

    def __call__(self, graph_module: fx.GraphModule) -> PassResult:
        modified = False
        for p in self.passes:
            result = p(graph_module)
            graph_module = result.graph_module
            if result.modified:
                modified = True
                graph_module.graph.lint()
                graph_module.recompile()
                for check in self.checks:
                    check(graph_module)
        return PassResult(graph_module, modified)
