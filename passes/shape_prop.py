"""Analysis: run a sample input through the graph and record shapes and layouts.

Records `meta["tensor_meta"]` as `torch.fx.passes.shape_prop.ShapeProp` does (without its
traceback printing, so a rejected input size gives one clean error naming the node) and,
on every node that holds a batched feature map, `meta["rmn_layout"]` (a FeatureLayout)
and `meta["rmn_resolution"]` (spatial positions per sample); `meta["rmn_rows"]` = k on
every tensor whose first axis holds k rows per sample (1: the batch axis itself; k > 1:
the batch folded with another axis). No mutation of the graph.

A tensor counts as batched only if a second probe, one sample larger, grows its first
dimension by one and leaves the rest: at the sample batch alone, a stacked dimension of
the same size (CrossViT's two heads' logits, [2, B, classes]) would read as the batch.
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


def sample_shape(node: fx.Node, rows: int = 1) -> tuple[int, ...]:
    """One sample's shape of `node`'s tensor, whose first axis holds `rows` rows per sample
    (k > 1: the batch folded in, kept as the sample's first axis): what `pack` joins and
    `unpack` restores."""
    shape = tensor_shape(node)
    return (rows, *shape[1:]) if rows > 1 else shape[1:]


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


class _ShapeProbe(PlainArgsInterpreter):
    """Runs the graph and keeps only the shape of every node that returns one tensor."""

    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}
        self.current: fx.Node | None = None

    def run_node(self, n: fx.Node):
        self.current = n
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            self.shapes[n] = tuple(result.shape)
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
        larger = self._probe_one_sample_more(graph_module)
        for node in graph_module.graph.nodes:
            shape = tensor_shape(node)
            rows = _rows_per_sample(shape, larger.get(node), batch) if shape else None
            if calls(node, pack):
                layout = _packed_layout(node)
            else:
                layout = infer_layout(shape, batch, image_hw) if rows == 1 else None
            for key in ("rmn_rows", "rmn_layout", "rmn_resolution"):  # a rerun after a rewrite starts afresh
                node.meta.pop(key, None)
            if rows:
                node.meta["rmn_rows"] = rows
            if layout is not None:
                node.meta["rmn_layout"] = layout
                node.meta["rmn_resolution"] = layout.resolution(shape)
        return PassResult(graph_module, False)

    def _probe_one_sample_more(self, graph_module: fx.GraphModule) -> dict[fx.Node, tuple[int, ...]]:
        """Every tensor node's shape on the sample batch plus one sample (its first again)."""
        probe = _ShapeProbe(graph_module)
        try:
            with training_mode(graph_module, False), torch.no_grad():
                probe.run(torch.cat([self.sample, self.sample[:1]]))
        except Exception as exc:
            raise InputSizeError(
                f"{type(graph_module).__name__} runs a batch of {self.sample.shape[0]} but not of "
                f"{self.sample.shape[0] + 1} (node '{probe.current}': {first_line(exc)}); routed, each procedure "
                "gets a sub-batch of any size, so the model must accept any batch size"
            ) from exc
        return probe.shapes


def _rows_per_sample(shape: tuple[int, ...], larger: tuple[int, ...] | None, batch: int) -> int | None:
    """k where the first axis holds k rows per sample (1: the batch axis itself; k > 1: the
    batch folded with another axis, as TNT's pixel tokens [B * patches, pixels, C]): it is
    k * batch on the sample and grows by k with one sample more, nothing else changing."""
    if larger is None or len(larger) != len(shape) or tuple(larger[1:]) != tuple(shape[1:]):
        return None
    k = larger[0] - shape[0]
    return k if k >= 1 and shape[0] == k * batch else None


def _packed_layout(node: fx.Node) -> PackedLayout | None:
    """The layout of `pack(a, b, ..., carried=...)`, from its tensors' layouts and shapes."""
    carried = node.kwargs.get("carried", ())
    layouts = [None if k in carried else source.meta.get("rmn_layout") for k, source in enumerate(node.args)]
    if not all(isinstance(layout, FeatureLayout) for k, layout in enumerate(layouts) if k not in carried):
        return None
    rows = node.kwargs.get("rows") or (1,) * len(node.args)  # a folded tensor's rows per sample
    shapes = [sample_shape(source, k) for source, k in zip(node.args, rows, strict=True)]
    return PackedLayout(tuple(zip(layouts, shapes, strict=True)))
