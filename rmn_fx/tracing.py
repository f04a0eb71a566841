"""Capture a model as a torch.fx GraphModule that keeps module paths.

Tracing uses the leaf modules and autowrapped functions that timm registers for FX
(`timm.layers._fx`) and treats torchvision.ops modules as leaves, as torchvision's own
feature extraction does. Every node keeps `meta["nn_module_stack"]`, the module paths it
was called under, which the stage analysis uses to place boundaries at module edges.

The model is traced in eval mode: Python branches on `self.training` take their inference
path, so training-only branches (Inception's and GoogLeNet's auxiliary classifiers) are
left out; `left_out_modules` names them, so that users are told. Dropout, DropPath and
StochasticDepth stay modules, so they still act in training mode.
"""

from __future__ import annotations

import inspect
import math

import torch
import torchvision.ops
from torch import fx, nn

from .errors import TraceError, first_line
from .fixed_shape_tracing import trace_at_sample
from .nn.modes import training_mode


def _module_classes(namespace) -> set[type]:
    return {obj for obj in vars(namespace).values() if isinstance(obj, type) and issubclass(obj, nn.Module)}


def _timm_leaves() -> tuple[set[type], set]:
    try:
        from timm.layers import DropPath, _fx
    except ImportError:  # timm is optional for tracing plain torch models
        return set(), set()
    return set(_fx.get_notrace_modules()) | {DropPath}, set(_fx.get_notrace_functions())


class RMNTracer(fx.Tracer):
    """torch.fx tracer with timm's and torchvision's leaves that remembers where it failed."""

    def __init__(self) -> None:
        timm_modules, timm_functions = _timm_leaves()
        self.leaf_types = tuple(_module_classes(torchvision.ops) | timm_modules)
        super().__init__(
            autowrap_modules=(math, torchvision.ops),
            autowrap_functions=tuple(f for f in timm_functions if callable(f)),
            param_shapes_constant=True,
        )
        self.failed_module: tuple[str, str] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:  # the innermost module raises first
                self.failed_module = (self.path_of_module(m) or "<root>", type(m).__name__)
            raise


def _concrete_args(model: nn.Module) -> dict:
    """Fix every forward argument after the image to its default, so the graph has one input."""
    params = list(inspect.signature(model.forward).parameters.values())
    fixed = {}
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is inspect.Parameter.empty:
            raise TraceError(
                f"{type(model).__name__}.forward needs argument '{p.name}' besides the image; "
                "wrap the model so that forward(x) takes the image only"
            )
        fixed[p.name] = p.default
    return fixed


CAPTURES = ("fx", "fx at the sample's shapes")  # how a graph was captured (`gm.meta["rmn_capture"]`)


def trace(model: nn.Module, sample: torch.Tensor | None = None) -> fx.GraphModule:
    """Trace `model` (in eval mode) to a GraphModule whose nodes keep their module paths.

    Where plain symbolic tracing fails and a `sample` input is given, tracing runs it
    alongside, so that Python control flow on sizes takes the sample's path
    (`fixed_shape_tracing`); `gm.meta["rmn_capture"]` says which capture made the graph.
    """
    if isinstance(model, fx.GraphModule):
        return model
    tracer = RMNTracer()
    concrete_args = _concrete_args(model)
    capture = CAPTURES[0]
    try:
        with training_mode(model, False):
            graph = tracer.trace(model, concrete_args=concrete_args)
    except TraceError:
        raise
    except Exception as exc:
        where = (
            f"module '{tracer.failed_module[0]}' ({tracer.failed_module[1]})"
            if tracer.failed_module
            else f"{type(model).__name__}.forward"
        )
        failure = f"torch.fx cannot trace {where}: {first_line(exc)}"
        if sample is None:
            raise TraceError(f"{failure}; {_MAKE_TRACEABLE}") from exc
        try:
            with training_mode(model, False):
                graph = trace_at_sample(RMNTracer, model, sample, concrete_args)
        except TraceError as again:
            raise TraceError(f"{failure}, nor with the sample's sizes fixed: {again}; {_MAKE_TRACEABLE}") from again
        capture = CAPTURES[1]
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    gm.train(model.training)
    gm.meta["rmn_capture"] = capture
    return gm


_MAKE_TRACEABLE = (
    "make it traceable (e.g. remove data-dependent control flow) or register it as a leaf with timm.layers.register_notrace_module"
)


def left_out_modules(model: nn.Module, graph_module: fx.GraphModule) -> list[tuple[str, int]]:
    """The outermost submodules of `model` with parameters that the traced graph never
    uses, each with its parameter count: training-only branches, left out of the trace."""
    used = {name for name, _ in graph_module.named_parameters(remove_duplicate=False)}
    left: list[tuple[str, int]] = []
    for path, module in model.named_modules():
        names = [f"{path}.{name}" for name, _ in module.named_parameters(remove_duplicate=False)]
        if path and names and not any(n in used for n in names) and not any(path.startswith(p + ".") for p, _ in left):
            left.append((path, sum(p.numel() for p in module.parameters())))
    return left


def describe_left_out(left_out: list[tuple[str, int]]) -> str:
    """One line for users: what the converted model leaves out, why, and what to do."""
    modules = ", ".join(f"{path} ({count:,} parameters)" for path, count in left_out)
    return (
        f"the model's eval-mode forward never calls {modules}: a training-only branch such as an auxiliary "
        "classifier, which the converted model leaves out; train without its loss, or build the model without it"
    )
