"""Suffix speculation's index (after SuffixDecoding, Oliaro et al., NeurIPS 2025): what followed
the current context's longest matching suffix in recent requests' prompts and outputs, as a tree
of candidate continuations with count-based confidences. Pure data structures: no tensors, no
model, no training.

`SuffixIndex` holds documents (token sequences, each tagged with a domain) within a token budget,
evicting the least recently used; a document is used when it is added, extended or supplies a
proposal. Every position is indexed by the `min_match` tokens that start there. A lookup reads
the most recent occurrences of the context's last `min_match` tokens, measures how far back each
one matches the context (up to `max_match`), and keeps those of the longest match: the
occurrences of the context's longest suffix seen before. What followed them, counted in a trie,
is the proposal (`Candidates`): a node's confidence is the share of those occurrences that go on
through it, so a confidence is the empirical chance that the node's path is the continuation.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SuffixConfig:
    """How a suffix index matches and proposes, and how much it holds."""

    budget_tokens: int = 1 << 18  # across every domain's documents; the least recently used go first
    min_match: int = 2  # the shortest suffix that counts as a match (the key every position is indexed by)
    max_match: int = 32  # how far back a match is measured
    max_occurrences: int = 64  # the most recent occurrences of a key a lookup reads
    max_tokens: int = 8  # the most candidates one proposal verifies (tree nodes, or a chain's tokens)
    min_confidence: float = 0.1  # a candidate less likely than this is not proposed

    def __post_init__(self) -> None:
        if min(self.budget_tokens, self.min_match, self.max_occurrences, self.max_tokens) < 1:
            raise ValueError(f"suffix settings must be positive: {self}")
        if self.max_match < self.min_match:
            raise ValueError(f"max_match ({self.max_match}) < min_match ({self.min_match})")
        if not 0.0 < self.min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be in (0, 1], got {self.min_confidence}")


@dataclass(frozen=True)
class Candidates:
    """A tree of candidate continuations, the most confident first (so parents before children,
    serving.engine.tree's order): node j is token tokens[j] under node parents[j] (-1: the
    context's last token), followed with probability confidences[j] by the count model; `match`
    is the matched suffix's length and `support` the number of its occurrences that were counted
    (0 and 0 when nothing matched)."""

    tokens: tuple[int, ...] = ()
    parents: tuple[int, ...] = ()
    confidences: tuple[float, ...] = ()
    match: int = 0
    support: int = 0

    @property
    def expected(self) -> float:
        """Tokens a greedy verification of the tree accepts on average, by the count model."""
        return sum(self.confidences)

    @property
    def is_chain(self) -> bool:
        return all(parent == j - 1 for j, parent in enumerate(self.parents))

    def first(self, m: int) -> Candidates:
        """The m most confident nodes: a tree still, since a parent comes before its children."""
        return Candidates(
            self.tokens[:m], self.parents[:m], self.confidences[:m], self.match, self.support
        )  # fmt: skip

    def chain(self) -> Candidates:
        """The most confident path from the root (the first of equally confident children)."""
        path, current = [], -1
        while children := [j for j, parent in enumerate(self.parents) if parent == current]:
            current = max(children, key=lambda j: self.confidences[j])
            path.append(current)
        return Candidates(
            tuple(self.tokens[j] for j in path), tuple(range(-1, len(path) - 1)),
            tuple(self.confidences[j] for j in path), self.match, self.support,
        )  # fmt: skip


def best(*candidates: Candidates) -> Candidates:
    """The candidates that promise the most accepted tokens (the first among equals)."""
    return max(candidates, key=lambda c: c.expected)


@dataclass
class _Document:
    domain: str
    tokens: list[int] = field(default_factory=list)


class SuffixIndex:
    """Documents within a token budget, indexed for `lookup` (see the module docstring)."""

    def __init__(self, config: SuffixConfig = SuffixConfig()):
        self.config = config
        self._docs: OrderedDict[int, _Document] = OrderedDict()  # least recently used first
        self._keys: dict[tuple, dict[int, list[int]]] = {}  # (domain, *key) -> document -> starts
        self._serial = 0
        self.tokens = 0  # held, across every document
        self.lookups = 0
        self.hits = 0  # lookups that matched

    def __len__(self) -> int:
        return len(self._docs)

    @property
    def keys(self) -> int:
        """Distinct keys indexed (each a domain and `min_match` tokens): what eviction must shrink."""
        return len(self._keys)

    def add(self, domain: str, tokens: Sequence[int]) -> int:
        """A new document; returns its id. One longer than the budget keeps its last tokens."""
        self._serial += 1
        self._docs[self._serial] = _Document(domain)
        self.extend(self._serial, tokens)
        return self._serial

    def extend(self, document: int, tokens: Sequence[int]) -> None:
        """Append tokens to a document (a request's own context, as it grows); a document that was
        evicted meanwhile is left out."""
        doc = self._docs.get(document)
        if doc is None:
            return
        self._docs.move_to_end(document)
        tokens = list(tokens)[-self.config.budget_tokens :]
        m = self.config.min_match
        first = max(0, len(doc.tokens) - m + 1)  # the first start not yet indexed
        doc.tokens += tokens
        self.tokens += len(tokens)
        for start in range(first, len(doc.tokens) - m + 1):
            key = (doc.domain, *doc.tokens[start : start + m])
            self._keys.setdefault(key, {}).setdefault(document, []).append(start)
        while self.tokens > self.config.budget_tokens:
            self._evict(next(iter(self._docs)))

    def remove(self, document: int) -> None:
        if document in self._docs:
            self._evict(document)

    def _evict(self, document: int) -> None:
        doc = self._docs.pop(document)
        self.tokens -= len(doc.tokens)
        m = self.config.min_match
        for start in range(len(doc.tokens) - m + 1):
            key = (doc.domain, *doc.tokens[start : start + m])
            holders = self._keys.get(key)
            if holders is not None and holders.pop(document, None) is not None and not holders:
                del self._keys[key]

    def lookup(self, domain: str, context: Sequence[int], depth: int, size: int | None = None) -> Candidates:
        """Candidates for what follows `context`, from the domain's documents: a tree at most
        `depth` deep, of at most `size` nodes (None: every node likely enough)."""
        self.lookups += 1
        m, config = self.config.min_match, self.config
        if depth < 1 or len(context) < m:
            return Candidates()
        holders = self._keys.get((domain, *context[len(context) - m :]))
        if not holders:
            return Candidates()
        occurrences: list[tuple[int, int, int]] = []  # (match length, document, continuation start)
        for document in reversed(holders):  # the most recently used documents first
            tokens = self._docs[document].tokens
            for start in reversed(holders[document]):
                if start + m < len(tokens):  # a continuation follows
                    length = _match_length(tokens, start, m, context, config.max_match)
                    occurrences.append((length, document, start + m))
                if len(occurrences) == config.max_occurrences:
                    break
            if len(occurrences) == config.max_occurrences:
                break
        if not occurrences:
            return Candidates()
        longest = max(length for length, _, _ in occurrences)
        chosen = [(document, start) for length, document, start in occurrences if length == longest]
        for document in {document for document, _ in chosen}:
            self._docs.move_to_end(document)
        self.hits += 1
        return _tree(
            [self._docs[document].tokens[start : start + depth] for document, start in chosen],
            longest, size, config.min_confidence,
        )  # fmt: skip


def _match_length(tokens: list[int], start: int, m: int, context: Sequence[int], most: int) -> int:
    """How many tokens before tokens[start + m] equal the context's last ones (at least m: the
    key; at most `most`)."""
    length = m
    while length < most and length < len(context) and start + m - length - 1 >= 0:
        if tokens[start + m - length - 1] != context[len(context) - length - 1]:
            break
        length += 1
    return length


def _tree(continuations: list[list[int]], match: int, size: int | None, min_confidence: float) -> Candidates:
    """The count trie of the continuations, its most confident nodes (at least min_confidence, at
    most `size`) kept, parents before children."""
    counts: dict[tuple[int, ...], int] = {}  # a path from the root -> how many continuations share it
    for continuation in continuations:
        for end in range(1, len(continuation) + 1):
            path = tuple(continuation[:end])
            counts[path] = counts.get(path, 0) + 1
    total = len(continuations)
    ranked = sorted(
        (path for path, count in counts.items() if count / total >= min_confidence),
        key=lambda path: (-counts[path], len(path)),  # a parent's count >= its child's: parents first
    )[:size]
    index = {path: j for j, path in enumerate(ranked)}
    return Candidates(
        tokens=tuple(path[-1] for path in ranked),
        parents=tuple(index[path[:-1]] if len(path) > 1 else -1 for path in ranked),
        confidences=tuple(counts[path] / total for path in ranked),
        match=match,
        support=total,
    )
