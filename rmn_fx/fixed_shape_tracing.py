"""The second capture path: a torch.fx trace that runs the sample input alongside.

Plain symbolic tracing fails where Python branches on a traced value (`if x.ndim == 4`,
`range(H // patch)`, `torch.ones(B, N)`: Gemma4's ViT). Here every proxy also carries the
value it has on the sample, so such code takes the sample's path, as `torch.export` does
for its static shapes, and the graph stays at the torch level, with call_module nodes, module
paths and training-mode behaviour (which an exported aten graph would fix to eval).

Two rules keep the graph honest:
- a branch, length or integer taken from a tensor's *values* (`if mask.any()`) is refused,
  naming the node: the graph would hold the sample's answer for every input;
- the model is traced at two batch sizes and the two graphs must read the same: code that
  depends on the batch size would otherwise be fixed to the sample's.
Sizes other than the batch are fixed to the sample's (the converted model runs at the
input size it was converted for, as its packed boundaries already do).
"""

from __future__ import annotations

import builtins
import contextlib
import operator
import os
import re

import torch
from torch import fx
from torch.fx import _symbolic_trace
from torch.fx.node import map_aggregate

from rmn_fx.passes.find_stages import SIZE_ATTRIBUTES, reads_sizes_only

from .errors import TraceError, first_line

# torch factories take sizes as separate integers, which their argument parser will not take from a proxy
SIZED_FACTORIES = ("ones", "zeros", "full", "empty", "arange", "rand", "randn", "randint", "linspace", "eye")


def _holds(value, kind: type) -> bool:
    """`value`, or an item of it however nested, is a `kind`."""
    found = False

    def visit(item):
        nonlocal found
        found = found or isinstance(item, kind)
        return item

    map_aggregate(value, visit)
    return found


def _attribute(root: torch.nn.Module, path: str):
    """root.<path> without nn.Module.__getattr__, which tracing patches to record nodes."""
    value = root
    for name in path.split("."):
        tables = [vars(value).get(t, {}) for t in ("_parameters", "_buffers", "_modules")] if isinstance(value, torch.nn.Module) else []
        table = next((t for t in tables if name in t), None)
        value = table[name] if table is not None else object.__getattribute__(value, name)
    return value


def _is_shape_query(node: fx.Node) -> bool:
    return reads_sizes_only(node) or (node.op == "call_function" and node.target is builtins.len)


@contextlib.contextmanager
def _modules_unpatched():
    """Module calls and attribute reads as outside tracing: a leaf module runs on real values."""
    patched = torch.nn.Module.__call__, torch.nn.Module.__getattr__
    torch.nn.Module.__call__ = _symbolic_trace._orig_module_call
    torch.nn.Module.__getattr__ = _symbolic_trace._orig_module_getattr
    try:
        yield
    finally:
        torch.nn.Module.__call__, torch.nn.Module.__getattr__ = patched


@contextlib.contextmanager
def _factories_recorded(tracer: fx.Tracer):
    """torch.ones(B, N), torch.arange(n), ... with a traced size become graph nodes."""
    originals = {name: getattr(torch, name) for name in SIZED_FACTORIES}

    def recorded(original):
        def factory(*args, **kwargs):
            if _holds((args, kwargs), fx.Proxy):
                return tracer.create_proxy("call_function", original, args, kwargs)
            return original(*args, **kwargs)

        return factory

    try:
        for name, original in originals.items():
            setattr(torch, name, recorded(original))
        yield
    finally:
        for name, original in originals.items():
            setattr(torch, name, original)


class SampleProxy(fx.Proxy):
    """A proxy that also holds its value on the sample (freed with the proxy, so that the
    trace keeps no more activations alive than a forward does) and answers len(), int()
    and indexing with it."""

    sample_value: object = None
    sizes_only: bool = False  # the value holds no tensor and comes from no tensor's values

    def __len__(self) -> int:
        value = value_on_sample(self)
        return len(value) if isinstance(value, torch.Tensor) else len(fixed_value(self, "len()"))

    def __index__(self) -> int:
        return operator.index(fixed_value(self, "an integer"))

    def __int__(self) -> int:
        return int(fixed_value(self, "int()"))

    def __float__(self) -> float:
        return float(fixed_value(self, "float()"))


def value_on_sample(item):
    """The sample's value of a proxy (an attribute read is computed from its owner's)."""
    if isinstance(item, fx.proxy.Attribute):
        return getattr(value_on_sample(item.root), item.attr)
    return item.sample_value if isinstance(item, fx.Proxy) else item


def _sizes_only(item) -> bool:
    if isinstance(item, fx.proxy.Attribute):
        return item.attr in SIZE_ATTRIBUTES or (_sizes_only(item.root) and not _holds(value_on_sample(item), torch.Tensor))
    return getattr(item, "sizes_only", False) if isinstance(item, fx.Proxy) else not _holds(item, torch.Tensor)


def fixed_value(proxy: fx.Proxy, use: str):
    """The sample's value of `proxy`, where the graph may fix it (sizes, not values)."""
    if not _sizes_only(proxy):
        raise TraceError(
            f"{_source_line(proxy.node)} uses node '{proxy.node.name}' as {use}, and its value comes from a tensor's "
            "values, so the graph would keep the sample's answer for every input"
        )
    return value_on_sample(proxy)


def _source_line(node: fx.Node) -> str:
    """'file.py:12 (`if x.mean() > 0:`)': the innermost frame of the model's code that made `node`."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in \S+\n\s*(.*)', node.stack_trace or "")
    ours = [f for f in frames if not re.search(r"[/\\](torch|rmn_fx)[/\\]", f[0])]
    if not ours:
        return "the model's code"
    path, line, code = ours[-1]
    return f"{os.path.basename(path)}:{line} (`{code.strip()}`)"


def sample_tracer_class(base: type[fx.Tracer]) -> type[fx.Tracer]:
    """`base` (a tracer with its leaves) extended to carry the sample's values."""

    class SampleTracer(base):
        def __init__(self, sample: torch.Tensor) -> None:
            super().__init__()
            self.record_stack_traces = True  # errors quote the user's line
            self.proxy_buffer_attributes = True  # buffers used in arithmetic with sizes (RoPE tables)
            self.param_shapes_constant = False  # every shape comes from the sample's values here
            self.sample = sample
            self.placeholders = 0

        def proxy(self, node: fx.Node) -> fx.Proxy:
            return SampleProxy(node, self)

        def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
            proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
            proxy.sample_value = value = self._run(kind, target, args, kwargs)
            inputs = []
            map_aggregate((args, kwargs), lambda a: inputs.append(a) if isinstance(a, fx.Proxy) else a)
            proxy.sizes_only = _is_shape_query(proxy.node) or (
                kind not in ("placeholder", "get_attr") and all(_sizes_only(i) for i in inputs) and not _holds(value, torch.Tensor)
            )
            return proxy

        def _run(self, kind, target, args, kwargs):
            args, kwargs = map_aggregate((args, kwargs), value_on_sample)
            if kind == "placeholder":
                self.placeholders += 1
                return self.sample.clone() if self.placeholders == 1 else None  # the image; other arguments are fixed
            if kind == "get_attr":
                return _attribute(self.root, target)
            if kind == "call_function":
                return target(*args, **kwargs)
            if kind == "call_method":
                return getattr(args[0], target)(*args[1:], **kwargs)
            if kind == "call_module":
                with _modules_unpatched():
                    return self.root.get_submodule(target)(*args, **kwargs)
            return None

        def to_bool(self, obj: fx.Proxy) -> bool:
            return bool(fixed_value(obj, "a condition"))

        def iter(self, obj: fx.Proxy):
            return iter([obj[i] for i in range(len(obj))])

        def trace(self, root, concrete_args=None):
            with torch.no_grad(), _factories_recorded(self):
                return super().trace(root, concrete_args)

    return SampleTracer


def trace_at_sample(tracer_class: type[fx.Tracer], model: torch.nn.Module, sample: torch.Tensor, concrete_args: dict) -> fx.Graph:
    """The graph of `model` with Python control flow on sizes fixed at `sample`'s, checked
    to read the same at one sample more (so that the batch size is not fixed)."""
    sample_tracer = sample_tracer_class(tracer_class)
    graphs: list[fx.Graph] = []
    for batch in (sample, torch.cat([sample, sample[:1]])):
        tracer = sample_tracer(batch)
        try:
            graphs.append(tracer.trace(model, concrete_args))
        except TraceError:
            raise
        except Exception as exc:
            raise TraceError(first_line(exc)) from exc
    graph, other = graphs
    if _signature(graph) != _signature(other):
        raise TraceError(
            f"its Python code branches on the batch size (the graphs at batches {sample.shape[0]} and {sample.shape[0] + 1} differ)"
        )
    return graph


def _signature(graph: fx.Graph) -> list:
    """What a graph computes, with node names as positions and tensor constants unnamed
    (a second trace of the same model names its constants anew)."""
    position = {node: i for i, node in enumerate(graph.nodes)}

    def target(node: fx.Node):
        return "<constant>" if node.op == "get_attr" and node.target.startswith("_tensor_constant") else str(node.target)

    def arguments(node: fx.Node):
        return repr(map_aggregate((node.args, node.kwargs), lambda a: f"%{position[a]}" if isinstance(a, fx.Node) else a))

    return [(node.op, target(node), arguments(node)) for node in graph.nodes]
