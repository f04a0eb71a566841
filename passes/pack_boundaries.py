"""Rewrites: carry the tensors alive at a boundary as one tensor where more than one is.

Stages are delimited at single-tensor cuts of the main path (`main_path`). Some networks
lower their resolution only where several tensors are alive: NASNet's and PNASNet's cells
read the two previous cells' outputs, a decoder reads an early feature map. `PackBoundaries`
looks at each stretch between two consecutive cuts that lowers the resolution (a boundary
inside it, or the cut it ends at, is coarser than the cut it starts at) and, at every module edge inside
it where only batched feature tensors are alive, inserts `packed = pack(a, b, ...)` and
`unpack(packed)`, whose parts replace a, b, ... in every later read. The packed tensor is
a single-tensor cut, so the stage rule applies unchanged and a routed part takes and gives
one tensor; a routing key pools every tensor packed in it (`PackedLayout`). Packing copies
values and unpacking restores shapes and contiguity, so the function is unchanged.
Named stages also get a pack at their edges where several tensors are alive (TNT's
blocks take and give two streams, without a drop). A tensor whose batch is folded into its
first axis (TNT's pixel tokens) is packed with its rows per sample, as a segment only
carried (no key reads it), and folded back by `unpack`. `CarryBatchedSideInputs`, after the stages are found,
packs the tables with a batch axis that a stage reads into its entry, carried too.
`RemoveInnerPacks`, after the parts are outlined, removes the packs that no part boundary
needs. Needs `ShapePropagation` first, and reruns it where it packed.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence

from torch import fx

from rmn_fx.nn.layout import FeatureLayout, pack, unpack

from .find_stages import DROP_FACTOR, GraphFacts, ModuleRange, reads_sizes_only, side_value_error
from .infra import PassBase, PassResult
from .shape_prop import ShapePropagation, calls, carries_tensors, sample_shape


def live_tensors(facts: GraphFacts) -> list[tuple[fx.Node, ...]]:
    """Per position p: the tensors computed from the input's values at or before p whose
    values a node after p reads (the output reads after every position), in forward order.
    Sizes are no values: a decoder that reads the input's sizes does not keep the input
    alive, and a table computed from sizes alone is a side value of the parts that read it."""
    end = len(facts.nodes)
    from_values = _computed_from_values(facts.cuts[0])
    alive: dict[fx.Node, int] = {}  # tensor -> the position of its last read
    live = []
    for p, node in enumerate(facts.nodes):
        readers = [u for u in node.users if not reads_sizes_only(u)]
        if node in from_values and carries_tensors(node) and readers:
            alive[node] = max(end if u.op == "output" else facts.pos[u] for u in readers)
        alive = {n: last for n, last in alive.items() if last > p}
        live.append(tuple(alive))
    return live


def _computed_from_values(start: fx.Node) -> set[fx.Node]:
    """`start` and the nodes computed from its values (not from its sizes alone)."""
    seen, todo = {start}, [start]
    while todo:
        for user in todo.pop().users:
            if user not in seen and not reads_sizes_only(user):
                seen.add(user)
                todo.append(user)
    return seen


def crossed_positions(facts: GraphFacts) -> list[bool]:
    """Per position p: whether a module other than a container or a leaf call has nodes
    both at or before p and after it (no part boundary may lie there)."""
    depth = [0] * (len(facts.nodes) + 1)
    for path, (first, last) in facts.spans.items():
        if path not in facts.splittable:
            depth[first] += 1
            depth[last] -= 1
    crossed, inside = [], 0
    for change in depth[:-1]:
        inside += change
        crossed.append(inside > 0)
    return crossed


def _packable(tensors: tuple[fx.Node, ...]) -> bool:
    """Several tensors, each a batched feature map or token sequence or a tensor whose batch
    is folded into its first axis (carried), at least one of them a feature tensor."""
    layouts = [isinstance(n.meta.get("rmn_layout"), FeatureLayout) for n in tensors]
    return len(tensors) >= 2 and any(layouts) and all(f or n.meta.get("rmn_rows", 1) > 1 for f, n in zip(layouts, tensors, strict=True))


def packable_boundaries(facts: GraphFacts, ranges: Sequence[ModuleRange] = ()) -> list[tuple[fx.Node, ...]]:
    """The live sets to pack, each after the position of its latest tensor (see the module
    docstring): at a module edge, in a stretch between cuts that lowers the resolution, and
    at the edges of the stages `ranges` names; each set once."""
    live, crossed = live_tensors(facts), crossed_positions(facts)
    chosen: list[tuple[fx.Node, ...]] = []
    output = next(n for n in reversed(facts.nodes) if n.op == "output")
    for start, end in itertools.pairwise([*facts.cuts, output]):  # the last stretch: up to the output (a backbone's dict of maps)
        stretch: list[tuple[fx.Node, ...]] = []
        for p in range(facts.pos[start] + 1, facts.pos[end]):
            tensors = live[p]
            if crossed[p] or (stretch and set(stretch[-1]) == set(tensors)):
                continue
            if _packable(tensors):
                stretch.append(tensors)
        levels = [min(n.meta["rmn_resolution"] for n in tensors if "rmn_resolution" in n.meta) for tensors in stretch] + [end.meta.get("rmn_resolution")]
        level = start.meta.get("rmn_resolution")
        if stretch and level is not None and any(r is not None and r * DROP_FACTOR <= level for r in levels):
            chosen.extend(stretch)
    for first, last in ranges:  # a named stage's edges, where several tensors may be alive without a drop (TNT's two streams)
        edges = [facts.spans[path][i] + shift for path, i, shift in ((first, 0, -1), (last, 1, 0)) if path in facts.spans]
        for p in edges:
            if 0 <= p < len(live) and not crossed[p] and _packable(live[p]) and all(set(live[p]) != set(c) for c in chosen):
                chosen.append(live[p])
    return sorted(chosen, key=lambda tensors: max(facts.pos[n] for n in tensors))


def _insert_pack(graph: fx.Graph, live: tuple[fx.Node, ...], originals: tuple[fx.Node, ...], carried: tuple[int, ...] = ()) -> tuple[fx.Node, ...]:
    """`packed = pack(*live)` after the latest of `live`; its parts replace `live` in every
    read after it. `originals`: the tensors of the traced graph that `live` stand for (their
    shapes and names); `carried`: the positions of those only carried (`PackedLayout`); a
    tensor whose batch is folded into its first axis is carried, its rows per sample given
    to `pack` (`rows`), and gets them folded back by `unpack`. Returns the parts."""
    position = {n: i for i, n in enumerate(graph.nodes)}
    latest = max(live, key=position.__getitem__)
    readers = {n: [u for u in n.users if u.op == "output" or position[u] > position[latest]] for n in live}
    rows = tuple(original.meta.get("rmn_rows", 1) for original in originals)
    folded = tuple(k for k, r in enumerate(rows) if r > 1)
    carried = tuple(sorted({*carried, *folded}))
    kwargs = {"carried": carried} if carried else {}
    if folded:
        kwargs["rows"] = rows
    with graph.inserting_after(latest):
        packed = graph.create_node("call_function", pack, tuple(live), kwargs, name=f"{originals[live.index(latest)].name}_packed")
    shapes = tuple(sample_shape(n, r) for n, r in zip(originals, rows, strict=True))
    with graph.inserting_after(packed):
        unpacked = graph.call_function(unpack, (packed, shapes, folded) if folded else (packed, shapes))
    parts, previous = [], unpacked
    for k, (node, original) in enumerate(zip(live, originals, strict=True)):
        with graph.inserting_after(previous):
            previous = graph.create_node("call_function", operator.getitem, (unpacked, k), name=f"{original.name}_unpacked")
        for reader in readers[node]:
            reader.replace_input_with(node, previous)
        parts.append(previous)
    return tuple(parts)


class PackBoundaries(PassBase):
    """Insert `pack` / `unpack` where a stretch of the main path lowers the resolution with
    several tensors alive (see above), then annotate the new nodes with `shapes` (the
    ShapePropagation that ran before)."""

    def __init__(self, shapes: ShapePropagation, ranges: Sequence[ModuleRange] | None = None) -> None:
        self.shapes, self.ranges = shapes, ranges or ()

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        boundaries = packable_boundaries(GraphFacts(graph_module), self.ranges)
        current: dict[fx.Node, fx.Node] = {}  # a tensor -> the part that now stands for it after the last pack
        for live in boundaries:
            tensors = tuple(current.get(n, n) for n in live)
            current.update(zip(live, _insert_pack(graph_module.graph, tensors, live)))
        if boundaries:
            graph_module.graph.lint()
            graph_module.recompile()
            self.shapes(graph_module)
        return PassResult(graph_module, bool(boundaries))


class CarryBatchedSideInputs(PassBase):
    """Rewrite: a tensor with a batch axis that a stage reads, computed before it from sizes
    and weights alone (Gemma4's rotary tables and position ids, expanded to the batch),
    cannot be shared by the stage's procedures, which each get a share of the batch. It is
    packed with the stage's input at the stage's entry as a carried segment (no key reads
    it, no attention scales it), so that every sample's rows travel with the sample; then
    shapes and stages are found again (`find_stages`, as first run). Stages read from
    `FindStages` (`Stage.carried`)."""

    def __init__(self, shapes: ShapePropagation, find_stages: PassBase) -> None:
        self.shapes, self.find_stages = shapes, find_stages

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        stages = graph_module.meta["rmn_stages"]
        if not any(stage.carried for stage in stages):
            return PassResult(graph_module, False)
        node_of = {n.name: n for n in graph_module.graph.nodes}
        current: dict[fx.Node, fx.Node] = {}  # a tensor -> the part that now stands for it after the last pack
        for stage in stages:
            if stage.carried:
                originals = (node_of[stage.entry], *(node_of[name] for name in stage.carried))
                live = tuple(current.get(n, n) for n in originals)
                parts = _insert_pack(graph_module.graph, live, originals, carried=tuple(range(1, len(originals))))
                current.update(zip(originals, parts))
        graph_module.graph.lint()
        graph_module.recompile()
        self.shapes(graph_module)
        self.find_stages(graph_module)
        for stage in graph_module.meta["rmn_stages"]:
            if stage.carried:  # still read from before the stage: its boundaries do not carry it
                raise side_value_error(stage, stage.carried[0])
        return PassResult(graph_module, True)


class RemoveInnerPacks(PassBase):
    """In every outlined part, read the tensors a `pack` joined straight from it where the
    same part unpacks them again: only packs that cross from one part to the next remain."""

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        modified = False
        for part in graph_module.children():
            if isinstance(part, fx.GraphModule) and _bypass_packs(part.graph):
                part.recompile()
                modified = True
        return PassResult(graph_module, modified)


def _bypass_packs(graph: fx.Graph) -> bool:
    found = False
    for parts in [n for n in graph.nodes if calls(n, unpack)]:
        packed = parts.args[0]
        if not calls(packed, pack):
            continue
        for item in list(parts.users):
            item.replace_all_uses_with(packed.args[item.args[1]])
            graph.erase_node(item)
        graph.erase_node(parts)
        if not packed.users:
            graph.erase_node(packed)
        found = True
    if found:
        graph.lint()
    return found
