"""Rewrite: outline the stem, each stage and the head into submodules of their own.

Reads the `rmn_part` annotation of `FindStages` and returns a new GraphModule whose
top-level code reads stem -> stage_1 -> ... -> stage_S -> head; each part is a
GraphModule that keeps the original module paths below it (`stage_1.layer1.0.conv1`).
Values that skip parts (a batch size read at the stem and used by the head) are passed
along; `get_attr` nodes are copied into every part that reads them. A stage takes its
input tensor first, then its side inputs, and gives its output first, then its side
outputs (see `Stage`), so that a routed stage can tell the tensor it routes from the
batch-independent values beside it; where it read the batch size from before it, it reads
its input's (`x.size(0)`), which a routed stage's procedure sees as its sub-batch's.
"""

from __future__ import annotations

import operator

from torch import fx, nn

from .infra import PassBase, PassResult


def _extract_part(gm: fx.GraphModule, nodes: list[fx.Node], name: str, read_later: set[fx.Node], first_inputs=(), first_output=None, batch_sizes=()):
    """Copy `nodes` into a GraphModule; returns it with its outer inputs and outputs (those
    of `nodes` in `read_later`), the `first_inputs` (outer nodes) leading the inputs and
    `first_output` leading the outputs. The outer `batch_sizes` become the batch size of
    the first input, read inside."""
    members = set(nodes)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inputs: list[fx.Node] = []
    for source in first_inputs:
        inputs.append(source)
        env[source] = graph.placeholder(source.name)
    for source in batch_sizes:
        env[source] = graph.call_method("size", (env[first_inputs[0]], 0))

    def lookup(source: fx.Node) -> fx.Node:
        if source not in env:
            if source.op == "get_attr":
                env[source] = graph.get_attr(source.target)
            else:
                inputs.append(source)
                env[source] = graph.placeholder(source.name)
        return env[source]

    for node in nodes:
        for source in node.all_input_nodes:
            if source not in members:
                lookup(source)
        env[node] = graph.node_copy(node, lookup)
    outputs = [n for n in nodes if n in read_later]
    if first_output is not None:
        outputs = [first_output] + [n for n in outputs if n is not first_output]
    graph.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[n] for n in outputs))
    graph.lint()
    return fx.GraphModule(gm, graph, class_name=name), inputs, outputs


def _read_by_later_parts(members: dict[str, list[fx.Node]], stages: dict, node_of: dict[str, fx.Node]) -> set[fx.Node]:
    """The nodes that a part other than their own, or the output, takes as an input: the
    values a part hands on. A batch size that a stage reads its input's instead of is not
    handed on to it (no dead output in the part before)."""
    read: set[fx.Node] = set()
    for part, nodes in members.items():
        inside = set(nodes)
        stage = stages.get(part)
        own_sizes = {node_of[n] for n in stage.batch_sizes} if stage is not None else set()
        read |= {s for n in nodes for s in n.all_input_nodes if s not in inside and s not in own_sizes}
    output = next(n for n in node_of.values() if n.op == "output")
    return read | set(output.all_input_nodes)


def part_order(graph: fx.Graph) -> list[str]:
    order: list[str] = []
    for node in graph.nodes:
        part = node.meta.get("rmn_part")
        if part is not None and node.op != "get_attr" and part not in order:
            order.append(part)
    return order


class OutlineParts(PassBase):
    """Replace the flat graph by calls to `stem`, `stage_i` and `head` submodules."""

    def requires(self, graph_module: fx.GraphModule) -> None:
        if "rmn_stages" not in graph_module.meta:
            raise RuntimeError("OutlineParts needs FindStages first")

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        top = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        parts = nn.Module()
        stages = {stage.name: stage for stage in graph_module.meta["rmn_stages"]}
        node_of = {n.name: n for n in graph_module.graph.nodes}
        for node in graph_module.graph.nodes:
            if node.op == "placeholder":
                env[node] = top.node_copy(node, env.__getitem__)
        members = {
            part: [n for n in graph_module.graph.nodes if n.meta.get("rmn_part") == part and n.op != "get_attr"]
            for part in part_order(graph_module.graph)
        }
        read_later = _read_by_later_parts(members, stages, node_of)
        for part, nodes in members.items():
            stage = stages.get(part)
            ends = {}
            if stage is not None:
                ends = {
                    "first_inputs": [node_of[n] for n in (stage.entry, *stage.side_inputs)],
                    "first_output": node_of[stage.exit],
                    "batch_sizes": [node_of[n] for n in stage.batch_sizes],
                }
            submodule, inputs, outputs = _extract_part(graph_module, nodes, part, read_later, **ends)
            parts.add_module(part, submodule)
            call = top.call_module(part, tuple(env[i] for i in inputs))
            if len(outputs) == 1:
                env[outputs[0]] = call
            else:
                for k, out in enumerate(outputs):
                    env[out] = top.create_node("call_function", operator.getitem, (call, k), name=out.name)
        output = next(n for n in graph_module.graph.nodes if n.op == "output")
        top.node_copy(output, env.__getitem__)
        outlined = fx.GraphModule(parts, top, class_name=type(graph_module).__name__)
        outlined.meta.update(graph_module.meta)
        outlined.train(graph_module.training)  # a new Module starts in training mode
        return PassResult(outlined, True)

    def ensures(self, graph_module: fx.GraphModule) -> None:
        for stage in graph_module.meta["rmn_stages"]:
            sub = graph_module.get_submodule(stage.name)
            inputs = [n.name for n in sub.graph.nodes if n.op == "placeholder"]
            if inputs != [stage.entry, *stage.side_inputs]:
                raise AssertionError(f"{stage.name} must take its input, then its side inputs; it takes {inputs}")
