"""ONNX: a procedure runs only when some sample chose it.

The exported dispatch (`rmn_fx.nn.routing.traceable_dispatch`) becomes, per procedure,
`rows = NonZero(route == j)`, `Gather(x, rows)` and the procedure's nodes; the procedures'
outputs are concatenated (`Concat`, axis 0) and put back in the batch's order by one
`Gather` on that concatenation. An empty procedure still runs every node on zero rows, and
in ONNX Runtime each costs a kernel call: at batch 1, N - 1 procedures per stage do nothing
but pay that. `skip_empty_procedures` moves each procedure's nodes into the `then` branch
of an `If (Size(rows) > 0)` whose `else` branch is an empty tensor, which the `Concat`
takes as it takes zero rows: the graph computes the same function. (torch.cond in the
exported program would do the same, but its branches are traced by Dynamo, which more
models fail.)

A procedure is wrapped only when its nodes are exactly those between its Gather and the
Concat (nothing outside reads them) and its output's non-batch dimensions are static;
otherwise it is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

INDEX_PASSTHROUGH = ("Unsqueeze", "Reshape", "Squeeze", "Transpose")  # ops between NonZero and a Gather's indices


@dataclass
class ProcedureRegion:
    rows: ir.Value  # 1-D indices of the procedure's samples
    nodes: list[ir.Node]  # the Gather and the procedure's nodes, in graph order
    output: ir.Value  # the procedure's output: an input of the Concat


def skip_empty_procedures(model: ir.Model) -> int:
    """Wrap every procedure of `model`'s main graph in an `If` on having samples; returns how many."""
    graph = model.graph
    wrapped = 0
    for concat in [node for node in graph if _concatenates_procedures(node)]:
        for k, output in enumerate(concat.inputs):
            region = procedure_region(graph, output, concat)
            if region is not None:
                _wrap_in_if(graph, concat, k, region)
                wrapped += 1
    return wrapped


def _concatenates_procedures(node: ir.Node) -> bool:
    """A Concat along the batch whose result is gathered along the batch: the procedures'
    outputs of a dispatch, put back in the batch's order."""
    return node.op_type == "Concat" and _axis(node) == 0 and any(
        user.op_type == "Gather" and _axis(user) == 0 and index == 0 for user, index in node.outputs[0].uses()
    )


def procedure_region(graph: ir.Graph, output: ir.Value, concat: ir.Node) -> ProcedureRegion | None:
    """The region from a procedure's Gather to its `output` (an input of `concat`), or None
    if it is not one. Its Gather is the latest on rows from a NonZero before `output`:
    earlier ones belong to earlier stages."""
    if output.shape is None or len(output.shape) < 2 or not all(isinstance(d, int) for d in output.shape[1:]):
        return None
    ancestors = _ancestors(output)
    gathers = [n for n in ancestors if n.op_type == "Gather" and _axis(n) == 0 and _from_nonzero(n.inputs[1])]
    if not gathers:
        return None
    order = {node: i for i, node in enumerate(graph)}
    gather = max(gathers, key=order.__getitem__)
    region = {gather} | (ancestors & _descendants(gather))
    for node in region:  # nothing outside the region may read its values
        for value in node.outputs:
            if value.is_graph_output() or any(user not in region and not (user is concat and value is output) for user, _ in value.uses()):
                return None
    return ProcedureRegion(gather.inputs[1], sorted(region, key=order.__getitem__), output)


def _wrap_in_if(graph: ir.Graph, concat: ir.Node, index: int, region: ProcedureRegion) -> None:
    y = region.output
    empty = np.zeros((0, *y.shape[1:]), dtype=y.dtype.numpy())
    size = ir.node("Size", [region.rows])
    zero = ir.node("Constant", [], {"value": ir.tensor(np.array(0, dtype=np.int64))})
    has_rows = ir.node("Greater", [size.outputs[0], zero.outputs[0]])
    else_value = ir.node("Constant", [], {"value": ir.tensor(empty)})
    graph.remove(region.nodes)
    then_branch = ir.Graph([], [y], nodes=region.nodes, name=f"{y.name}_then")
    else_branch = ir.Graph([], else_value.outputs, nodes=[else_value], name=f"{y.name}_else")
    branch = ir.node("If", [has_rows.outputs[0]], {"then_branch": then_branch, "else_branch": else_branch})
    for node, suffix in ((size, "rows"), (zero, "zero"), (has_rows, "has_rows"), (else_value, "empty"), (branch, "if")):
        node.outputs[0].name = f"{y.name}_{suffix}"  # names must be unique in the model (SSA)
    branch.outputs[0].type, branch.outputs[0].shape = y.type, ir.Shape([None, *y.shape[1:]])
    graph.insert_before(concat, [size, zero, has_rows, branch])
    concat.replace_input_with(index, branch.outputs[0])


def _from_nonzero(value: ir.Value) -> bool:
    """`value` is a NonZero's output, reshaped (through Unsqueeze / Reshape / Squeeze / Transpose)."""
    while value.producer() is not None and value.producer().op_type in INDEX_PASSTHROUGH:
        value = value.producer().inputs[0]
    return value.producer() is not None and value.producer().op_type == "NonZero"


def _axis(node: ir.Node) -> int:
    attr = node.attributes.get("axis")
    return 0 if attr is None else attr.as_int()


def _ancestors(value: ir.Value) -> set[ir.Node]:
    seen: set[ir.Node] = set()
    stack = [value.producer()]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(v.producer() for v in node.inputs if v is not None)
    return seen


def _descendants(node: ir.Node) -> set[ir.Node]:
    seen: set[ir.Node] = set()
    stack = [user for value in node.outputs for user, _ in value.uses()]
    while stack:
        user = stack.pop()
        if user in seen:
            continue
        seen.add(user)
        stack.extend(u for value in user.outputs for u, _ in value.uses())
    return seen
