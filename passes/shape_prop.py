"""Analysis: run a sample input through the graph and record shapes and layouts.

Records `meta["tensor_meta"]` as `torch.fx.passes.shape_prop.ShapeProp` does (without its
traceback printing, so a rejected input size gives one clean error naming the node) and,
on every node that holds a batched feature map, `meta["rmn_layout"]` (a FeatureLayout)
and `meta["rmn_resolution"]` (spatial positions per sample). No mutation of the graph.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

from rmn_fx.errors import InputSizeError, first_line
from rmn_fx.nn.layout import FeatureLayout, PackedLayout, infer_layout, pack
from rmn_fx.nn.modes import training_mode

from .infra import PassBase, PassResult

SAMPLE_BATCH = 2  # > 1 so that a folded batch dimension (windows, heads) is told apart


def sample_input(input_size: tuple[int, ...], batch: int = SAMPLE_BATCH, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *input_size, generator=generator)


def tensor_shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def carries_tensors(node: fx.Node) -> bool:
    return "tensor_meta" in node.meta


def calls(node: fx.Node, function) -> bool:
    """`node` calls `function` (a `pack` or `unpack` of `pack_boundaries`, say)."""
    return node.op == "call_function" and node.target is function


def _plain(value):
    """`value` with fx's immutable lists and dicts, however nested, as plain ones."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if type(value) is tuple:
        return tuple(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class PlainArgsInterpreter(fx.Interpreter):
    """An interpreter that passes every node the arguments the generated code passes it."""

    def fetch_args_kwargs_from_env(self, n: fx.Node):
        """Plain lists and dicts, not fx's immutable ones (a wrapped function may mutate
        them, as Swin3D's window sizes)."""
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        return _plain(args), _plain(kwargs)


class _ShapeRecorder(PlainArgsInterpreter):
    """Runs the graph and stores the shapes of what every node produces."""

    current: fx.Node | None = None

    def run_node(self, n: fx.Node):
        self.current = n
        result = super().run_node(n)
        found = False

        def extract(obj):
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _extract_tensor_metadata(obj)
            return obj

        meta = map_aggregate(result, extract)
        if found:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result


class ShapePropagation(PassBase):
    """Annotate shapes (`tensor_meta`), layouts and resolutions from one sample forward.

    Keeps the graph's output on the sample (`self.output`): the reference that a
    conversion is verified against, at no extra forward pass.
    """

    def __init__(self, sample: torch.Tensor) -> None:
        self.sample = sample
        self.output = None

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        recorder = _ShapeRecorder(graph_module)
        try:
            with training_mode(graph_module, False), torch.no_grad():
                self.output = recorder.run(self.sample)
        except Exception as exc:
            reason = first_line(exc)
            size = "x".join(map(str, self.sample.shape[1:]))
            raise InputSizeError(
                f"{type(graph_module).__name__} rejects a {size} input at node '{recorder.current}' "
                f"({reason}); pass an input size it accepts (--input-size C,H,W, or C,T,H,W for a video)"
            ) from exc
        batch, image_hw = self.sample.shape[0], tuple(self.sample.shape[-2:])
        for node in graph_module.graph.nodes:
            shape = tensor_shape(node)
            layout = _packed_layout(node) if calls(node, pack) else infer_layout(shape, batch, image_hw) if shape else None
            if layout is not None:
                node.meta["rmn_layout"] = layout
                node.meta["rmn_resolution"] = layout.resolution(shape)
        return PassResult(graph_module, False)


def _packed_layout(node: fx.Node) -> PackedLayout | None:
    """The layout of `pack(a, b, ...)`, from its tensors' layouts and shapes."""
    layouts = [source.meta.get("rmn_layout") for source in node.args]
    if not all(isinstance(layout, FeatureLayout) for layout in layouts):
        return None
    return PackedLayout(tuple((layout, tensor_shape(source)[1:]) for layout, source in zip(layouts, node.args, strict=True)))
