"""Analysis: find the stem, the stages and the head of a backbone (no mutation).

The rule, for any feed-forward graph (see the README's "Anatomy" section):
1. Cut the main path into segments (single-entry single-exit blocks, see `main_path`).
2. A segment *drops* resolution when its output has at most 1/1.5 of its input's spatial
   positions (a strided conv, a pool, a patch merge; not a valid 3x3 conv's 149 -> 147).
   A segment is *heavy* when it owns a parameter of two or more dimensions (a conv kernel,
   a linear weight); norms, activations and pools are light.
3. The head follows the last cut whose output still has spatial positions (it starts at
   global pooling, flatten or token selection); in a dense-prediction model (its output
   has positions: segmentation) it starts at the first segment after the first drop that
   raises the resolution again (the decoder's upsampling back towards the input's size).
4. The stem runs to the first drop, or to the end of the outermost module holding it that
   is a chain of plain layers (no block: one tensor node per segment) with drops after it
   (a deep stem: ResNet-D's three convs, LeViT's strided convs). A stem that does not
   downsample (a CIFAR ResNet's: the first drop lies in a block) is the plain layers before
   the first block (a heavy segment of more than one layer). The stem then runs on through
   modules holding only light segments (ResNet's BN, ReLU and max-pool) until a module with
   a heavy segment starts.
5. Stages are the runs of segments between drops after the stem. A level with no heavy
   segment joins the next stage (or the head, at the end).
6. Every boundary sits at a module edge: a cut inside a module other than a container
   (Sequential, ModuleList) moves back to the module's start (the downsampling block opens
   its stage), or, for the stem's end, forward to the module's end. A stage boundary also
   moves back over light layers that open the module holding the drop (a norm before a
   strided conv), so that a downsampling module is never split.

Users may name stages instead, as module-path ranges ("blocks.0:blocks.5,blocks.6:blocks.11").
With granularity "block", every stage (found or named) is cut further into its blocks: the
segments between the main-path cuts inside it that carry one tensor, that no later node
reads past, and that split no module lying inside the stage, other than containers and
modules whose tensors are all computed by their submodules (a stage wrapper); a light
piece (no weight matrix) joins the block before it, or the one after it at the start of a
stage (a pool or a norm that opens a downsampling). Each block is then a part of its own,
numbered in forward order.
The result is stored on `graph_module.meta["rmn_stages"]` (a list of `Stage`) and every
node gets `meta["rmn_part"]`: "stem", "stage_<i>" or "head".
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

from rmn_fx.errors import NoDownsamplingError, StageError
from rmn_fx.nn.layout import FeatureLayout, pack, unpack

from .infra import PassBase, PassResult
from .main_path import main_path
from .shape_prop import calls, carries_tensors, tensor_shape
from .side_values import BATCH_SIZE, DEPENDENT, INDEPENDENT, classify

DROP_FACTOR = 1.5
GRANULARITIES = ("stage", "block")
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
ModuleRange = tuple[str, str]


@dataclass(frozen=True)
class Stage:
    """One stage: the nodes after `entry` up to and including `exit`."""

    index: int
    entry: str
    exit: str
    nodes: tuple[str, ...]
    modules: tuple[str, ...]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    in_layout: FeatureLayout
    out_layout: FeatureLayout
    params: int
    side_inputs: tuple[str, ...] = ()  # batch-independent values computed before the stage that it reads
    side_outputs: tuple[str, ...] = ()  # batch-independent non-tensor values it hands on beside its output
    batch_sizes: tuple[str, ...] = ()  # the batch size, read before the stage: the stage reads its input's
    carried: tuple[str, ...] = ()  # tensors with a batch axis, computed before it, that it reads: to carry in (`CarryBatchedSideInputs`)

    @property
    def name(self) -> str:
        return f"stage_{self.index}"

    @property
    def in_channels(self) -> int:
        return self.in_layout.channels(self.in_shape)

    @property
    def out_channels(self) -> int:
        return self.out_layout.channels(self.out_shape)


def suggest_stage_ranges(model: nn.Module) -> str | None:
    """Two stages splitting the longest list of same-typed blocks in half,
    as a --stages value: a starting point for networks without downsampling (plain ViTs)."""
    best: tuple[str, list[str]] | None = None
    for name, module in model.named_modules():
        children = dict(module.named_children())
        blocks = list(children.values())
        uniform = len(blocks) >= 2 and len({type(b) for b in blocks}) == 1 and all(_is_block(b) for b in blocks)
        if uniform and (best is None or len(blocks) > len(best[1])):
            best = (f"{name}." if name else "", list(children))
    if best is None:
        return None
    prefix, names = best
    half = len(names) // 2
    return f"{prefix}{names[0]}:{prefix}{names[half - 1]},{prefix}{names[half]}:{prefix}{names[-1]}"


def _is_block(module: nn.Module) -> bool:
    """A module made of parameterised submodules (a residual or transformer block)."""
    return any(any(True for _ in child.parameters()) for child in module.children())


def parse_stage_ranges(text: str | Sequence) -> list[ModuleRange]:
    """'a:b,c:d' (or a list of 'a:b' strings or pairs) -> [(a, b), (c, d)]; 'a' means 'a:a'."""
    items = [s for s in text.split(",") if s.strip()] if isinstance(text, str) else list(text)
    ranges = []
    for item in items:
        if isinstance(item, str):
            first, _, last = item.strip().partition(":")
            item = (first.strip(), (last or first).strip())
        if len(item) != 2 or not all(isinstance(p, str) and p for p in item):
            raise StageError(f"cannot read stage range {item!r}; write FIRST_MODULE:LAST_MODULE, e.g. blocks.0:blocks.5")
        ranges.append(tuple(item))
    if not ranges:
        raise StageError("no stage ranges given; write e.g. --stages blocks.0:blocks.5,blocks.6:blocks.11")
    return ranges


class GraphFacts:
    """What the stage rules need to know about a shape-annotated graph, indexed by position."""

    def __init__(self, graph_module: fx.GraphModule) -> None:
        self.gm = graph_module
        self.nodes = list(graph_module.graph.nodes)
        self.pos = {n: i for i, n in enumerate(self.nodes)}
        self.cuts = [c for c in main_path(graph_module.graph) if not calls(c, unpack)]  # its pack is the boundary
        self.cut_at = {self.pos[c]: k for k, c in enumerate(self.cuts)}  # node position -> cut index
        self.from_input = _descendants(self.cuts[0])  # the nodes computed from the input, the input included
        self.spans, self.splittable, self.delegating = self._module_spans()
        self._edges = [self._at_module_edge(k) for k in range(len(self.cuts))]
        self._reads = self._last_reads()
        self._heavy = [False] + [
            any(_owns_weight_matrix(graph_module, n) for n in self.segment(k)) for k in range(1, len(self.cuts))
        ]

    def _module_spans(self):
        """Per module path: the positions of its first and last tensor node; the paths a cut
        may pass through (containers, leaf calls); and the paths whose forward computes no
        tensor itself, only in submodules (timm's ConvNeXtStage, a stage wrapper).
        Reading a shape is no computation of its own: a module that returns its output's
        sizes beside it (MViT's (T, H, W)) still ends at its output, and the reads of those
        sizes go with the part after it."""
        spans: dict[str, tuple[int, int]] = {}
        splittable: set[str] = {""}
        owners: set[str] = set()  # paths that are some node's innermost module
        leaves = {n.target for n in self.nodes if n.op == "call_module"}
        for i, node in enumerate(self.nodes):
            if not carries_tensors(node):
                continue
            stack = list(node.meta.get("nn_module_stack", {}).values())
            if stack:
                owners.add(stack[-1][0])
            for path, cls in stack:
                first, _ = spans.get(path, (i, i))
                spans[path] = (first, i)
                if path in leaves or (isinstance(cls, type) and issubclass(cls, CONTAINERS)):
                    splittable.add(path)
        delegating = {p for p in spans if p not in owners or p in leaves}
        return spans, splittable, delegating

    def _last_reads(self) -> list[int]:
        """Per node position: the last position that reads it (the output aside; weights,
        which any part may read, count as never read)."""
        return [
            -1 if node.op == "get_attr" else max([i] + [self.pos[u] for u in node.users if u.op != "output"])
            for i, node in enumerate(self.nodes)
        ]

    def splits_cleanly(self, k: int, a: int) -> bool:
        """Cut k splits the part that starts at cut a into two single-input parts: nothing
        computed between them (cut k aside) is read after cut k. Values from before cut a
        (the input's shape, read by a decoder that upsamples to it) are not the part's."""
        lo, p = self.pos[self.cuts[a]], self.pos[self.cuts[k]]
        return max(self._reads[lo + 1 : p], default=-1) <= p

    def resolution(self, k: int) -> int | None:
        return self.cuts[k].meta.get("rmn_resolution")

    def segment(self, k: int) -> list[fx.Node]:
        """Nodes after cut k-1 up to and including cut k."""
        return self.nodes[self.pos[self.cuts[k - 1]] + 1 : self.pos[self.cuts[k]] + 1]

    def _resolutions_around(self, k: int) -> tuple[int | None, int | None]:
        """(resolution of the last cut before k whose resolution is known, resolution of cut k)."""
        before = next((r for j in range(k - 1, -1, -1) if (r := self.resolution(j)) is not None), None)
        return before, self.resolution(k)

    def drops(self, k: int) -> bool:
        """Segment k lowers the resolution (compared with the last cut whose resolution is known)."""
        before, after = self._resolutions_around(k)
        return before is not None and after is not None and after * DROP_FACTOR <= before

    def grows(self, k: int) -> bool:
        """Segment k raises the resolution (an upsampling), by the same factor as a drop."""
        before, after = self._resolutions_around(k)
        return before is not None and after is not None and after >= before * DROP_FACTOR

    def plain(self, k: int) -> bool:
        """Segment k is one layer (a conv, a norm, an activation, a pool): no block, branch
        or residual, which would put more than one tensor node computed from the input
        between two cuts (a table computed from weights alone does not count)."""
        return sum(1 for n in self.segment(k) if carries_tensors(n) and n in self.from_input) == 1

    def plain_stem_end(self, first_drop: int, end: int) -> int | None:
        """The end of the outermost module holding the first drop that is a chain of plain
        layers with more drops after it (a deep stem: ResNet-D's three convs, LeViT's four
        strided convs), as a cut index; None if no such module."""
        for path, _ in self.cuts[first_drop].meta.get("nn_module_stack", {}).values():
            first, last = self.spans[path]
            exit_cut = self.cut_at.get(last)
            if exit_cut is None or exit_cut >= end or not any(self.drops(k) for k in range(exit_cut + 1, end + 1)):
                continue
            if all(self.plain(k) for k in range(self.cut_before(first) + 1, exit_cut + 1)):
                return exit_cut
        return None

    def hidden_drop_after(self, k: int, end: int) -> fx.Node | None:
        """When the features at cut `end` have dropped from cut k's resolution though no cut
        between them drops (the network downsamples where more than one tensor is alive:
        NASNet's cells take the two previous cells' outputs), the first node on the way
        down; else None (a class token's [B, 1, C] is no drop: the features stay)."""
        before, final = self.resolution(k), self.resolution(end)
        if before is None or final is None or final * DROP_FACTOR > before:
            return None
        return next(
            (n for n in self.nodes[self.pos[self.cuts[k]] + 1 :] if (r := n.meta.get("rmn_resolution")) and final <= r and r * DROP_FACTOR <= before),
            None,
        )

    def heavy(self, k: int) -> bool:
        """Segment k owns a parameter of two or more dimensions."""
        return self._heavy[k]

    def covered_modules(self, lo: int, hi: int) -> tuple[str, ...]:
        """Outermost modules whose nodes all lie at positions lo+1..hi."""
        covered = [p for p, (first, last) in self.spans.items() if p and lo < first and last <= hi]
        return tuple(p for p in covered if p.rpartition(".")[0] not in covered)

    def cut_before(self, position: int) -> int:
        return max(k for k, c in enumerate(self.cuts) if self.pos[c] < position)

    def open_light_prefix(self, b: int) -> int:
        """Move boundary b back to the start of the largest module that runs across it with
        nothing heavy before it (torchvision ConvNeXt's norm-then-strided-conv downsample)."""
        p = self.pos[self.cuts[b]]
        best = b
        for first, last in self.spans.values():
            if first <= p < last:
                a = self.cut_before(first)
                if a < best and not any(self.heavy(k) for k in range(a + 1, b + 1)):
                    best = a
        return best

    def at_module_edge(self, k: int) -> bool:
        """No module other than a container has nodes on both sides of cut k."""
        return self._edges[k]

    def at_block_edge(self, k: int, a: int, b: int) -> bool:
        """Cut k may split stage (a, b) into blocks: every module it passes through is a
        container, only calls its submodules, or reaches outside the stage (the stage's own
        boundaries cut it already, as named stages cut torchvision's ViT `encoder`)."""
        lo, hi = self.pos[self.cuts[a]], self.pos[self.cuts[b]]
        return self._splits_only(k, lambda path, first, last: path in self.delegating or not (lo < first and last <= hi))

    def _at_module_edge(self, k: int) -> bool:
        return self._splits_only(k, lambda path, first, last: False)

    def _splits_only(self, k: int, may_split) -> bool:
        """Every module with nodes on both sides of cut k is a container, a leaf call, or
        one that `may_split(path, first, last)` allows."""
        return self.module_edge_after(self.pos[self.cuts[k]], may_split)

    def module_edge_after(self, p: int, may_split=lambda path, first, last: False) -> bool:
        """No module other than a container, a leaf call, or one that `may_split` allows has
        nodes both at or before position p and after it."""
        return not any(
            first <= p < last and not may_split(path, first, last)
            for path, (first, last) in self.spans.items()
            if path not in self.splittable
        )


def _descendants(node: fx.Node) -> set[fx.Node]:
    seen, todo = {node}, [node]
    while todo:
        for user in todo.pop().users:
            if user not in seen:
                seen.add(user)
                todo.append(user)
    return seen


def _owns_weight_matrix(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return any(p.dim() >= 2 for p in gm.get_submodule(node.target).parameters())
    if node.op == "get_attr":
        attr = _get_attr(gm, node.target)
        return isinstance(attr, nn.Parameter) and attr.dim() >= 2
    return False


def _get_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def detect_stage_cuts(facts: GraphFacts) -> list[tuple[int, int]]:
    """Apply the module docstring's rule; returns (entry cut index, exit cut index) per stage."""
    last_cut = len(facts.cuts) - 1
    first_drop = next((k for k in range(1, last_cut + 1) if facts.drops(k)), None)
    example = suggest_stage_ranges(facts.gm) or "FIRST:LAST,..."
    end = max(k for k in range(last_cut + 1) if (facts.resolution(k) or 0) > 1)  # the head follows
    if first_drop is None:
        _refuse_hidden_drops(facts, 0, end, example)
        raise NoDownsamplingError(
            f"the network never lowers its resolution, so it has no stages to find; "
            f"name them by module paths, e.g. --stages {example}"
        )
    if end == last_cut:  # dense prediction: the output has positions, and the head is the decoder
        end = next((k - 1 for k in range(first_drop + 1, end + 1) if facts.grows(k)), end)
    while end > first_drop and not facts.at_module_edge(end):
        end -= 1
    stem = max(first_drop, facts.plain_stem_end(first_drop, end) or 0)
    first_block = next((k for k in range(1, end + 1) if facts.heavy(k) and not facts.plain(k)), None)
    if first_block is not None and first_block <= first_drop:  # a stem that does not downsample: its plain layers
        stem = first_block - 1
        while stem > 0 and not facts.at_module_edge(stem):
            stem -= 1
        stem = stem or first_drop  # no plain layer before the first block: the first drop ends the stem after all
    while stem < end:
        following_edge = next((k for k in range(stem + 1, end + 1) if facts.at_module_edge(k)), end)
        if facts.at_module_edge(stem) and any(facts.heavy(k) for k in range(stem + 1, following_edge + 1)):
            break
        stem = following_edge
    if not any(facts.drops(k) for k in range(stem + 2, end + 1)):
        _refuse_hidden_drops(facts, stem, end, example)
        where = facts.cuts[stem].name
        raise NoDownsamplingError(
            f"found no downsampling after the stem (which ends at node '{where}'); "
            f"name the stages by module paths, e.g. --stages {example}"
        )
    splits = [stem]
    for k in range(stem + 2, end + 1):
        if facts.drops(k):
            b = k - 1
            while b > splits[-1] and not facts.at_module_edge(b):
                b -= 1
            b = max(facts.open_light_prefix(b), splits[-1])
            if b > splits[-1]:
                splits.append(b)
    splits.append(end)
    stages, start = [], None
    for a, b in itertools.pairwise(splits):
        if b <= a:
            continue
        start = a if start is None else start
        if any(facts.heavy(k) for k in range(a + 1, b + 1)):
            stages.append((start, b))
            start = None
    return stages  # a trailing level without weights is left to the head


def _refuse_hidden_drops(facts: GraphFacts, k: int, end: int, example: str) -> None:
    """Name the real cause when the network does downsample between cuts k and `end`, but
    only where several tensors are alive, so that no single-tensor cut lies between its levels."""
    node = facts.hidden_drop_after(k, end)
    if node is None:
        return
    stack = list(node.meta.get("nn_module_stack", {}).values())
    where = f"node '{node.name}'" + (f" in module '{stack[-1][0]}'" if stack else "")
    raise StageError(
        f"the network downsamples after node '{facts.cuts[k].name}' (at {where}), but only where more than one tensor is alive "
        f"(blocks that take several earlier outputs, or parallel resolutions), so no single-tensor cut lies between its levels; "
        f"name stages whose boundaries carry one tensor, e.g. --stages {example}"
    )


def block_cuts(facts: GraphFacts, stages: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Every stage (a, b) cut into its blocks (see the module docstring)."""
    blocks = []
    for a, b in stages:
        bounds = [k for k in range(a + 1, b) if facts.at_block_edge(k, a, b) and facts.splits_cleanly(k, a) and tensor_shape(facts.cuts[k]) is not None] + [b]
        own: list[tuple[int, int]] = []
        last_heavy = False  # whether the last block of `own` holds a weight matrix
        for start, end in itertools.pairwise([a, *bounds]):
            heavy = any(facts.heavy(k) for k in range(start + 1, end + 1))
            if own and not (heavy and last_heavy):  # a light piece, or the first heavy one after a light start
                own[-1], last_heavy = (own[-1][0], end), last_heavy or heavy
            else:
                own.append((start, end))
                last_heavy = heavy
        blocks.extend(own)
    if len(blocks) == len(stages):
        raise StageError(
            "granularity 'block' finds no cut inside any stage (every stage is a single block); "
            "route whole stages with granularity 'stage' (--granularity stage)"
        )
    return blocks


def named_stage_cuts(facts: GraphFacts, ranges: Sequence[ModuleRange]) -> list[tuple[int, int]]:
    """Cut indices of user-named module ranges, with one-line errors for every way to get it wrong."""
    known = [name for name, _ in facts.gm.named_modules() if name]
    stages = []
    for first_module, last_module in ranges:
        for path in (first_module, last_module):
            if path not in facts.spans:
                hint = difflib.get_close_matches(path, known, n=3)
                exists = path in known
                raise StageError(
                    f"module '{path}' "
                    + ("is never called in forward" if exists else "does not exist in the model")
                    + (f"; did you mean {', '.join(hint)}?" if hint and not exists else "; see `rmn-fx inspect` for module paths")
                )
        start, end = facts.spans[first_module][0], facts.spans[last_module][1]
        if end < start:
            raise StageError(f"stage range {first_module}:{last_module} is backwards: '{last_module}' runs before '{first_module}'")
        if end not in facts.cut_at and end + 1 < len(facts.nodes) and calls(facts.nodes[end + 1], pack):  # the tensors alive after it, packed
            end += 1
        if end not in facts.cut_at:
            raise StageError(
                f"a stage cannot end at '{last_module}': its output is not on the main path "
                "(another branch joins after it); end the stage at a later module"
            )
        a = max(k for k, c in enumerate(facts.cuts) if facts.pos[c] < start)
        b = facts.cut_at[end]
        if stages and a > stages[-1][1] and _glue_only(facts, stages[-1][1], a):
            stages[-1] = (stages[-1][0], a)  # code between two named stages that no module holds (a reshape) joins the first
        if stages and a != stages[-1][1]:
            prev = ranges[len(stages) - 1]
            problem = "overlaps" if a < stages[-1][1] else "leaves a gap after"
            raise StageError(
                f"stage {first_module}:{last_module} {problem} stage {prev[0]}:{prev[1]}; "
                "stages must follow each other in forward order without gaps"
            )
        stages.append((a, b))
    return stages


def _glue_only(facts: GraphFacts, k: int, m: int) -> bool:
    """The nodes after cut k up to cut m belong to no module (the top-level forward's own
    code, and the packs rmn-fx put there)."""
    nodes = facts.nodes[facts.pos[facts.cuts[k]] + 1 : facts.pos[facts.cuts[m]] + 1]
    return all(n.op != "call_module" and not n.meta.get("nn_module_stack") for n in nodes)


def planned_stage_cuts(facts: GraphFacts, plan: Sequence[tuple[str, str]]) -> list[tuple[int, int]]:
    """Cut indices of stages given as (entry, exit) node names."""
    cut_of = {c.name: k for k, c in enumerate(facts.cuts)}
    missing = [name for pair in plan for name in pair if name not in cut_of]
    if missing:
        raise StageError(f"the stage boundary '{missing[0]}' is no longer on the main path after the rewrite")
    return [(cut_of[entry], cut_of[exit_]) for entry, exit_ in plan]


def stem_side_values(facts: GraphFacts, a: int, b: int) -> set[fx.Node]:
    """The nodes inside the first stage (cuts a..b) that belong to the stem, because they
    compute nothing from the values of the stage's input:
    - values other than tensors computed from stem values alone: the sizes a stem module
      hands on beside its output (timm MViTv2's patch embedding returns its grid's size);
    - a tensor that later parts read, computed from the input's sizes, stem values and
      weights alone, with all it is computed from: a rotary position table built from the
      token grid in the first stage and read by every later block (timm's DeepSeek-ViT and
      Qwen3-ViT). Left in the stage, each procedure would compute its own copy, and a
      routed stage hands on one tensor only.
    Computed once before the stage, they reach its procedures as side inputs, whose
    independence of the batch `classify` then checks."""
    entry = facts.cuts[a]
    start, end = facts.pos[entry], facts.pos[facts.cuts[b]]
    inside = facts.nodes[start + 1 : end + 1]
    values: set[fx.Node] = set()
    from_sizes: set[fx.Node] = set()  # computed from the input's sizes, stem values and weights alone
    for node in inside:
        sources = node.all_input_nodes
        if not carries_tensors(node) and sources and all(facts.pos[s] < start or s in values for s in sources):
            values.add(node)
        if all(facts.pos[s] < start or s in from_sizes or (s is entry and reads_sizes_only(node)) for s in sources):
            from_sizes.add(node)
    for node in inside:
        if node in from_sizes and carries_tensors(node) and any(facts.pos[u] > end for u in node.users):
            values |= _ancestors_among(node, from_sizes)
    return values


SIZE_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout", "requires_grad"})
SIZE_METHODS = frozenset({"size", "dim", "ndimension", "numel", "get_device", "is_floating_point", "is_contiguous"})


def reads_sizes_only(node: fx.Node) -> bool:
    """`node` reads its tensor argument's sizes, dtype or device, not its values
    (`x.shape`, `x.size(1)`, `x.dim()`, `x.dtype`)."""
    if node.op == "call_method":
        return node.target in SIZE_METHODS
    return node.op == "call_function" and node.target is getattr and node.args[1] in SIZE_ATTRIBUTES


def _ancestors_among(node: fx.Node, among: set[fx.Node]) -> set[fx.Node]:
    """`node` and the nodes in `among` it is computed from, through nodes in `among`."""
    seen, todo = {node}, [node]
    while todo:
        for source in todo.pop().all_input_nodes:
            if source in among and source not in seen:
                seen.add(source)
                todo.append(source)
    return seen


def _stage_from_cuts(facts: GraphFacts, index: int, a: int, b: int, stem_reads: set[fx.Node] = frozenset()) -> Stage:
    entry, exit_ = facts.cuts[a], facts.cuts[b]
    members = [n for n in facts.nodes[facts.pos[entry] + 1 : facts.pos[exit_] + 1] if n not in stem_reads]
    inside = set(members)
    side_inputs = {
        source: None for node in members for source in node.all_input_nodes
        if source not in inside and source is not entry and source.op != "get_attr"
    }
    side_outputs = [node for node in members if node is not exit_ and any(user not in inside for user in node.users)]
    for node in side_outputs:
        if carries_tensors(node):
            raise StageError(
                f"stage {index} (nodes {members[0].name}..{exit_.name}) hands tensor '{node.name}' on to later nodes "
                "beside its output; a routed stage gives one tensor (each procedure would compute its own) - choose other boundaries"
            )
    layouts = [entry.meta.get("rmn_layout"), exit_.meta.get("rmn_layout")]
    for node, layout in zip((entry, exit_), layouts):
        if layout is None:
            raise StageError(
                f"stage {index} {'input' if node is entry else 'output'} '{node.name}' has shape "
                f"{tensor_shape(node)}; stages must take and give feature maps or token sequences"
            )
    modules = facts.covered_modules(facts.pos[entry], facts.pos[exit_])
    params: dict[int, torch.Tensor] = {}
    for node in members:
        if node.op == "call_module":
            params.update((id(p), p) for p in facts.gm.get_submodule(node.target).parameters())
        elif node.op == "get_attr":
            attr = _get_attr(facts.gm, node.target)
            if isinstance(attr, nn.Parameter):
                params[id(attr)] = attr
    return Stage(
        index=index,
        entry=entry.name,
        exit=exit_.name,
        nodes=tuple(n.name for n in members),
        modules=modules,
        in_shape=tensor_shape(entry),
        out_shape=tensor_shape(exit_),
        in_layout=layouts[0],
        out_layout=layouts[1],
        params=sum(p.numel() for p in params.values()),
        side_inputs=tuple(n.name for n in side_inputs),
        side_outputs=tuple(n.name for n in side_outputs),
    )


def _check_side_values(facts: GraphFacts, stages: Sequence[Stage]) -> list[Stage]:
    """A stage's procedures share the values it reads beside its input and hand on one
    procedure's values beside their output: the batch size read before the stage becomes
    the stage's own (its input's), a tensor with a batch axis that it reads is to be
    carried in with its input (`Stage.carried`), and any other value that changes with the
    batch is refused."""
    node_of = {n.name: n for n in facts.nodes}
    kinds = classify(facts.gm, [node_of[name] for stage in stages for name in (*stage.side_inputs, *stage.side_outputs)])
    checked = []
    for stage in stages:
        carried = tuple(n for n in stage.side_inputs if kinds[node_of[n]] == DEPENDENT and node_of[n].meta.get("rmn_rows") == 1)
        for name in (*stage.side_inputs, *stage.side_outputs):
            kind = kinds[node_of[name]]
            if kind == INDEPENDENT or (kind == BATCH_SIZE and name in stage.side_inputs) or name in carried:
                continue
            raise side_value_error(stage, name)
        sizes = tuple(n for n in stage.side_inputs if kinds[node_of[n]] == BATCH_SIZE)
        shared = tuple(n for n in stage.side_inputs if n not in sizes and n not in carried)
        checked.append(dataclasses.replace(stage, side_inputs=shared, batch_sizes=sizes, carried=carried))
    return checked


def side_value_error(stage: Stage, name: str) -> StageError:
    role, where = ("reads", "computed before it") if name in (*stage.side_inputs, *stage.carried) else ("hands on to later nodes", "beside its output")
    return StageError(
        f"stage {stage.index} (nodes {stage.nodes[0]}..{stage.exit}) {role} '{name}', {where}, whose value changes "
        "with the batch (its samples or their number), so its procedures cannot share it - choose other boundaries"
    )


class FindStages(PassBase):
    """Annotate stem / stages / head; `ranges` names the stages by module paths instead,
    `plan` by (entry, exit) node names found earlier (before a rewrite that keeps names);
    `granularity` "block" makes every block of a found or named stage a part of its own."""

    def __init__(
        self,
        ranges: Sequence[ModuleRange] | None = None,
        plan: Sequence[tuple[str, str]] | None = None,
        granularity: str = "stage",
    ) -> None:
        if granularity not in GRANULARITIES:
            raise StageError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
        self.ranges, self.plan, self.granularity = ranges, plan, granularity

    def requires(self, graph_module: fx.GraphModule) -> None:
        if not any("tensor_meta" in n.meta for n in graph_module.graph.nodes):
            raise RuntimeError("FindStages needs ShapePropagation first")

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        facts = GraphFacts(graph_module)
        if self.plan:
            cut_ranges = planned_stage_cuts(facts, self.plan)
        elif self.ranges:
            cut_ranges = named_stage_cuts(facts, self.ranges)
        else:
            cut_ranges = detect_stage_cuts(facts)
        if self.granularity == "block" and not self.plan:  # a plan already holds the blocks
            cut_ranges = block_cuts(facts, cut_ranges)
        stem_reads = stem_side_values(facts, *cut_ranges[0])
        stages = [_stage_from_cuts(facts, i + 1, a, b, stem_reads if i == 0 else frozenset()) for i, (a, b) in enumerate(cut_ranges)]
        stages = _check_side_values(facts, stages)
        first_entry = facts.pos[facts.cuts[cut_ranges[0][0]]]
        last_exit = facts.pos[facts.cuts[cut_ranges[-1][1]]]
        part_of = {name: stage.name for stage in stages for name in stage.nodes}
        for i, node in enumerate(facts.nodes):
            if node.op in ("placeholder", "output"):
                node.meta.pop("rmn_part", None)
            elif node.name in part_of:
                node.meta["rmn_part"] = part_of[node.name]
            else:
                node.meta["rmn_part"] = "stem" if i <= first_entry or node in stem_reads else "head"
                assert i <= first_entry or node in stem_reads or i > last_exit
        graph_module.meta["rmn_stages"] = stages
        graph_module.meta["rmn_part_modules"] = {
            "stem": facts.covered_modules(0, first_entry),
            **{stage.name: stage.modules for stage in stages},
            "head": facts.covered_modules(last_exit, len(facts.nodes)),
        }
        return PassResult(graph_module, False)
