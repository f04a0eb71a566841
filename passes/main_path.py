"""Analysis: the main path of a feed-forward graph.

The main path is the chain of nodes that every input-to-output data path passes through:
the dominators of the output node in the data-flow graph rooted at the image input.
Between two consecutive such cut nodes lies a single-entry single-exit block (a residual
block, a multi-branch cell, a conv). Only tensor-carrying nodes count as data: a batch
size read at the stem and used by the head does not make the stages it skips optional.
Needs `ShapePropagation` first.
"""

from __future__ import annotations

import networkx as nx
from torch import fx

from rmn_fx.errors import StageError

from .shape_prop import carries_tensors


def image_input(graph: fx.Graph) -> fx.Node:
    """The first placeholder; `trace` fixed any others to their defaults (FX guards them)."""
    return next(n for n in graph.nodes if n.op == "placeholder")


def data_flow_graph(graph: fx.Graph) -> nx.DiGraph:
    """Edges from every tensor-carrying node to its users (the output node included)."""
    flow = nx.DiGraph()
    for node in graph.nodes:
        if not carries_tensors(node):
            continue
        flow.add_node(node)
        for user in node.users:
            if carries_tensors(user) or user.op == "output":
                flow.add_edge(node, user)
    return flow


def main_path(graph: fx.Graph) -> list[fx.Node]:
    """Cut nodes from the image input to the last node before the output, in order."""
    start = image_input(graph)
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    flow = data_flow_graph(graph)
    if start not in flow or output not in flow or not nx.has_path(flow, start, output):
        raise StageError("the model's output does not depend on its input tensor; nothing to route")
    idom = nx.immediate_dominators(flow, start)
    chain = []
    node = idom[output]
    while node is not start:
        chain.append(node)
        node = idom[node]
    chain.append(start)
    return chain[::-1]
