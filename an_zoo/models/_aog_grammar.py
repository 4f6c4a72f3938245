"""The AND-OR grammar of an AOGNet block: which node operations a block has and how they are wired.

Paper: `AOGNets: Compositional Grammatical Architectures for Deep Learning` - https://arxiv.org/abs/1711.05847

A block splits its channels into ``d`` primitives (a 1 x d grid). Every span of primitives gets an OR-node (its
alternatives) and a terminal T-node (the span read directly from the block input); every kept binary split of a
span gets an AND-node (the concatenation of its two halves). The construction follows the official grammar
(AOGNet-v2 ``models/aognet/AOG.py``, facts only): FIFO node creation with reuse (a DAG), symmetric-split pruning,
children stored in the order of CPython's ``list(set(ids))`` as the official code does (that order is the
AND-nodes' concatenation order), path counts, then same-width lateral edges ("extra node hierarchy" 4). Only max 2 children per split and primitives of
size 1 are supported, which is what every released AOGNet uses.
"""
from collections import deque
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

__all__ = ['AOGNode', 'AOGraph', 'build_aog', 'T_NODE', 'AND_NODE', 'OR_NODE']

T_NODE, AND_NODE, OR_NODE = 'T', 'AND', 'OR'


@dataclass(frozen=True)
class AOGNode:
    """One node of the graph.

    Attributes:
        id: Node id (creation order; 0 is the root OR-node).
        type: ``'T'``, ``'AND'`` or ``'OR'``.
        span: First and last primitive covered (inclusive).
        children: Child ids in the official order, lateral children last.
        parents: Ids of the nodes that list this one as a child (lateral edges included), ascending.
        npaths: Number of root-to-node paths in the graph without lateral edges.
        split: AND-nodes only: number of primitives in the left part.
    """
    id: int
    type: str
    span: Tuple[int, int]
    children: Tuple[int, ...]
    parents: Tuple[int, ...]
    npaths: int
    split: Optional[int] = None

    @property
    def width(self) -> int:
        return self.span[1] - self.span[0] + 1


@dataclass(frozen=True)
class AOGraph:
    """A block's graph: ``nodes[i].id == i``; ``order`` is the evaluation (and parameter registration) order, a
    post-order depth-first walk from the root over all children, lateral ones included."""
    num_primitives: int
    pruning_mode: int
    nodes: Tuple[AOGNode, ...]
    order: Tuple[int, ...]

    @property
    def root(self) -> AOGNode:
        return self.nodes[0]


def _post_order(children: List[List[int]], root: int = 0) -> List[int]:
    order: List[int] = []
    seen = set()

    def visit(v: int) -> None:  # depth <= 2 * d: recursion is fine
        seen.add(v)
        for c in children[v]:
            if c not in seen:
                visit(c)
        order.append(v)

    visit(root)
    return order


def _add_lateral_edges(types: List[str], spans: List[Tuple[int, int]], splits: List[Optional[int]],
                       children: List[List[int]]) -> None:
    """Same-width neighbours as extra children ("extra node hierarchy" 4), appended to the children lists."""
    for kind, forward_by_default in ((AND_NODE, True), (OR_NODE, False)):
        if kind == AND_NODE:  # by split position (last primitive of the left part), then start
            key = lambda v: (spans[v][0] + splits[v] - 1, spans[v][0])  # noqa: E731
        else:
            key = lambda v: spans[v][0]  # noqa: E731
        by_width: Dict[int, List[int]] = {}
        for v, t in enumerate(types):
            if t == kind:
                by_width.setdefault(spans[v][1] - spans[v][0] + 1, []).append(v)
        flip = False  # official quirk: a lone node's group flips the direction of the next group of 2 or more
        for width in sorted(by_width):
            group = sorted(by_width[width], key=key)
            if len(group) < 2:
                flip = True
                continue
            forward = forward_by_default != flip
            flip = False
            for i in range(len(group) - 1):
                if forward:
                    children[group[i]].append(group[i + 1])
                else:
                    children[group[i + 1]].append(group[i])


def build_aog(num_primitives: int, pruning_mode: int = 1, lateral: bool = True) -> AOGraph:
    """Build the AND-OR graph of a block with ``num_primitives`` primitives.

    Args:
        num_primitives: Number d of primitives (channel groups) of the block.
        pruning_mode: Symmetric-split pruning of OR-nodes: 1 keeps splits (l, w - l) with l <= w - l, walking l
            upwards; 2 keeps l >= w - l, walking l downwards.
        lateral: Add the same-width lateral edges (all released AOGNets do).
    """
    if num_primitives < 1:
        raise ValueError(f'num_primitives must be >= 1, got {num_primitives}')
    if pruning_mode not in (1, 2):
        raise ValueError(f'pruning_mode must be 1 or 2, got {pruning_mode}')
    types: List[str] = []
    spans: List[Tuple[int, int]] = []
    splits: List[Optional[int]] = []
    children: List[List[int]] = []
    ids: Dict[Tuple[str, Tuple[int, int], Optional[int]], int] = {}
    queue: deque = deque()

    def node(kind: str, span: Tuple[int, int], split: Optional[int] = None) -> int:
        """The id of the node (created and queued if new: one OR / T node per span, one AND node per split)."""
        key = (kind, span, split)
        if key not in ids:
            ids[key] = len(types)
            types.append(kind)
            spans.append(span)
            splits.append(split)
            children.append([])
            queue.append(ids[key])
        return ids[key]

    node(OR_NODE, (0, num_primitives - 1))
    while queue:
        v = queue.popleft()
        (a, b), width = spans[v], spans[v][1] - spans[v][0] + 1
        if types[v] == OR_NODE:
            kids = [node(T_NODE, (a, b))]
            lefts = range(1, width) if pruning_mode == 1 else range(width - 1, 0, -1)
            kept: List[int] = []
            for left in lefts:
                if width - left not in kept:  # drop the mirror image of a kept split
                    kept.append(left)
                    kids.append(node(AND_NODE, (a, b), left))
        elif types[v] == AND_NODE:
            left = splits[v]
            kids = [node(OR_NODE, (a, a + left - 1)), node(OR_NODE, (a + left, b))]
        else:
            kids = []
        # the official code stores list(set(children)): for small ints not always ascending, and it is the
        # concatenation order of an AND-node, so it is reproduced literally
        children[v] = list(set(kids))

    npaths = [0] * len(types)
    npaths[0] = 1
    for v in reversed(_post_order(children)):  # topological order of the graph without lateral edges
        for c in children[v]:
            npaths[c] += npaths[v]

    if lateral:
        _add_lateral_edges(types, spans, splits, children)
    parents: List[List[int]] = [[] for _ in types]
    for v, kids in enumerate(children):
        for c in kids:
            parents[c].append(v)

    nodes = tuple(
        AOGNode(id=v, type=types[v], span=spans[v], children=tuple(children[v]), parents=tuple(sorted(parents[v])),
                npaths=npaths[v], split=splits[v])
        for v in range(len(types)))
    return AOGraph(num_primitives, pruning_mode, nodes, tuple(_post_order(children)))
