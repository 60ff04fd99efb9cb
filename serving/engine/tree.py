"""Tree verification (Medusa-style, static tree): many candidate continuations checked by one
target forward, for greedy requests.

A tree's nodes are drafted tokens; node j sits at depth d (1 = the token after the last emitted
one) under parent p (-1: the last emitted token, the root). The verify forward runs the root and
every node at once: each attends to the cached sequence, the root and its own ancestors (a 4D
additive attention mask) at position (root position + depth). Greedy acceptance then walks from
the root, each time to the child whose token is the target's argmax at the current node; the
longest such path is kept, plus the target's argmax after its last node. The target's output is
thus exactly its greedy decoding. Sampled requests use chain proposals instead, verified by the
rejection sampler (lossless).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tree:
    parents: tuple[int, ...]  # node j's parent node, -1 for the root
    ranks: tuple[int, ...]  # which of its head's candidates node j is (0: the most likely)

    @property
    def depths(self) -> tuple[int, ...]:
        return node_depths(self.parents)

    def up_to(self, depth: int) -> Tree:
        """The nodes no deeper than `depth` (parents come first, so indices stay valid)."""
        keep = [j for j, d in enumerate(self.depths) if d <= depth]
        return Tree(tuple(self.parents[j] for j in keep), tuple(self.ranks[j] for j in keep))


def node_depths(parents: tuple[int, ...]) -> tuple[int, ...]:
    """Each node's depth (1: a child of the root); parents come before their children."""
    depths: list[int] = []
    for parent in parents:
        depths.append(1 if parent < 0 else depths[parent] + 1)
    return tuple(depths)


def static_tree(branching: tuple[int, ...]) -> Tree:
    """The tree whose depth-d nodes are the top `branching[d-1]` candidates of head d under the
    rank-0 node of depth d-1 only, except at depth 1: e.g. (3, 2, 2) gives 3 + 2 + 2 nodes. Nodes
    are ordered by depth, parents before children."""
    if not branching or min(branching) < 1:
        raise ValueError(f"branching needs at least one depth, each >= 1, got {branching}")
    parents, ranks, previous = [], [], -1
    for width in branching:
        first = len(parents)
        for rank in range(width):
            parents.append(previous)
            ranks.append(rank)
        previous = first  # the next depth grows under this depth's most likely node
    return Tree(tuple(parents), tuple(ranks))


def tree_visibility(parents: tuple[int, ...]) -> torch.Tensor:
    """Which of the root and N nodes each one sees, bool [1 + N, 1 + N]: the root, its ancestors
    and itself."""
    n = len(parents)
    visible = torch.zeros(1 + n, 1 + n, dtype=torch.bool)
    visible[:, 0] = True
    for j, parent in enumerate(parents):
        row = 1 + j
        visible[row, row] = True
        if parent >= 0:
            visible[row] |= visible[1 + parent]
    return visible


def greedy_path(parents: tuple[int, ...], tokens: list[int], argmax: list[int]) -> list[int]:
    """The nodes greedy decoding accepts, root first: argmax [1 + N] is the target's argmax after
    the root and after each node; tokens [N] the drafted tokens."""
    path, current = [], -1
    while True:
        want = argmax[0 if current < 0 else 1 + current]
        child = next((j for j, p in enumerate(parents) if p == current and tokens[j] == want), None)
        if child is None:
            return path
        path.append(child)
        current = child
