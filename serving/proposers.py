"""Proposers: where draft tokens come from. One `Proposer` protocol, four implementations.

A proposer is shared by all requests (it holds weights); per-request state, such as a draft
model's KV cache, lives in the object `new_state()` returns and is passed back on every call.
A proposer with `wants_hidden = True` (draft heads) also gets, after each verification, the
target's final hidden state at the position whose logits gave the last emitted token (`observe`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import DynamicCache, PreTrainedModel

from distill.heads import DraftHeads
from serving.errors import IncompatibleDraftError
from serving.models import context_length, forward, truncate_cache
from serving.sampling import SamplingParams, process_logits, sample
from serving.tree import Tree


@dataclass(frozen=True)
class Proposal:
    """Up to k drafted tokens.

    tokens: [k'] drafted ids, k' <= k (a proposer may offer fewer, even none).
    probs:  [k', V] q at each position after the request's sampling processing, or None when
        the proposer is deterministic (q one-hot at each drafted token).
    """

    tokens: torch.Tensor
    probs: torch.Tensor | None = None
    parents: tuple[int, ...] | None = None  # a tree (serving.tree), greedy only: node j's parent, -1 the root


class Proposer(Protocol):
    def new_state(self) -> Any:
        """Fresh per-request state (None for stateless proposers)."""

    def propose(
        self,
        state: Any,
        token_ids: torch.Tensor,
        k: int,
        params: SamplingParams,
        generator: torch.Generator,
    ) -> Proposal:
        """Draft up to k tokens to follow token_ids [L] (prompt plus output so far)."""

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Replace the proposer's weights (hot-swap); raise IncompatibleDraftError if they do not fit."""


def _empty(device: torch.device) -> Proposal:
    return Proposal(tokens=torch.empty(0, dtype=torch.long, device=device))


def _refuse_weights(name: str, weights: Mapping[str, torch.Tensor]) -> None:
    if weights:
        raise IncompatibleDraftError(f"the {name} proposer has no weights; got {len(weights)} tensors")


class NullProposer:
    """Proposes nothing: the engine then decodes one token per step, plain autoregressively."""

    def new_state(self) -> None:
        return None

    def propose(self, state, token_ids, k, params, generator) -> Proposal:
        return _empty(token_ids.device)

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        _refuse_weights("null", weights)


def ngram_lookup(token_ids: torch.Tensor, k: int, n_min: int, n_max: int) -> torch.Tensor:
    """Prompt lookup: find the latest earlier occurrence of the last n tokens (longest n first,
    n_max down to n_min) and return up to k tokens that followed it; empty when none matches."""
    length = token_ids.shape[0]
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        windows = token_ids[: length - 1].unfold(0, n, 1)  # [length - n, n]; each has a successor
        hits = (windows == token_ids[length - n :]).all(-1).nonzero()
        if hits.numel():
            start = int(hits[-1]) + n
            return token_ids[start : start + k]
    return token_ids[:0]


class NgramProposer:
    """Drafts by copying what followed the latest earlier match of the current suffix."""

    def __init__(self, n_min: int = 1, n_max: int = 3):
        if not 1 <= n_min <= n_max:
            raise ValueError(f"need 1 <= n_min <= n_max, got n_min={n_min}, n_max={n_max}")
        self.n_min, self.n_max = n_min, n_max

    def new_state(self) -> None:
        return None

    def propose(self, state, token_ids, k, params, generator) -> Proposal:
        if k <= 0:
            return _empty(token_ids.device)
        return Proposal(tokens=ngram_lookup(token_ids, k, self.n_min, self.n_max))

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        _refuse_weights("n-gram", weights)


@dataclass
class DraftState:
    """A draft model's KV cache for one request and the token ids it holds."""

    cache: DynamicCache
    cached_ids: torch.Tensor  # [n] ids whose keys and values the cache holds


def common_prefix_length(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(a.shape[0], b.shape[0])
    mismatches = (a[:n] != b[:n]).nonzero()
    return int(mismatches[0]) if mismatches.numel() else n


class DraftModelProposer:
    """A small causal LM with the target's vocabulary drafts k tokens autoregressively.

    Its cache is reconciled with the sequence at each call: it keeps the longest prefix it
    shares with token_ids and runs the rest. That covers partial acceptance (drop rejected
    drafts) and full acceptance (the last draft and the bonus token were never run) alike.
    Greedy drafts are the argmax, a deterministic proposal (q one-hot), so they come without probs.
    """

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.max_length = context_length(model)

    def new_state(self) -> DraftState:
        device = self.model.device
        return DraftState(
            cache=DynamicCache(config=self.model.config),
            cached_ids=torch.empty(0, dtype=torch.long, device=device),
        )

    @torch.inference_mode()
    def propose(self, state: DraftState, token_ids, k, params, generator) -> Proposal:
        length = token_ids.shape[0]
        if self.max_length is not None:  # the last draft sits at position length + k - 2
            k = min(k, self.max_length - length + 1)
        if k <= 0:
            return _empty(token_ids.device)
        keep = min(common_prefix_length(state.cached_ids, token_ids), length - 1)
        truncate_cache(state.cache, keep)
        inputs = token_ids[keep:]
        tokens, probs = [], []
        for _ in range(k):
            logits = forward(self.model, inputs, state.cache, last_only=True)  # [1, V]
            if params.greedy:  # q is one-hot at the argmax: a deterministic draft
                inputs = logits.argmax(-1)  # [1]
            else:
                probs.append(process_logits(logits, params))  # [1, V]
                inputs = sample(probs[-1], generator)  # [1]
            tokens.append(inputs)
        drafted = torch.cat(tokens)  # [k]
        state.cached_ids = torch.cat([token_ids, drafted[:-1]])
        return Proposal(tokens=drafted, probs=torch.cat(probs) if probs else None)

    @torch.no_grad()
    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        load_checked(self.model, weights, "draft")


@dataclass
class HeadsState:
    """The target's hidden state [H] at the position whose logits gave the last emitted token."""

    hidden: torch.Tensor | None = None


class HeadsProposer:
    """Draft heads (`distill.heads`) draft from the target's hidden state; the first step of a
    request, with no hidden state yet, drafts nothing.

    Chain mode: up to K tokens, head i's guess (argmax when greedy, else sampled from its processed
    distribution q, returned as probs for the rejection sampler) being what head i+1 reads after
    it (Hydra). Tree mode (`tree`, greedy requests only; sampled ones still get a chain): the
    static tree's nodes, each the rank-r candidate of its depth's head under its parent's path,
    verified in one forward (serving.tree)."""

    wants_hidden = True

    def __init__(self, heads: DraftHeads, tree: Tree | None = None):
        self.heads, self.tree = heads, tree

    def new_state(self) -> HeadsState:
        return HeadsState()

    def observe(self, state: HeadsState, hidden: torch.Tensor) -> None:
        state.hidden = hidden

    @torch.inference_mode()
    def propose(self, state: HeadsState, token_ids, k, params, generator) -> Proposal:
        k = min(k, self.heads.spec.num_heads)
        if state.hidden is None or k <= 0:
            return _empty(token_ids.device)
        if self.tree is not None and params.greedy:
            return self._tree(state.hidden, token_ids[-1], self.tree.up_to(k))
        hidden, before = state.hidden.unsqueeze(0), token_ids[-1:].unsqueeze(0)  # [1, H], [1, 1]
        tokens, probs = [], []
        for i in range(k):
            logits = self.heads.head(i, hidden, before)  # [1, V]
            if params.greedy:
                token = logits.argmax(-1)  # [1]
            else:
                probs.append(process_logits(logits, params))  # [1, V]
                token = sample(probs[-1], generator)  # [1]
            tokens.append(token)
            before = torch.cat([before, token.unsqueeze(0)], dim=1)  # [1, i + 2]
        return Proposal(tokens=torch.cat(tokens), probs=torch.cat(probs) if probs else None)

    def _tree(self, hidden: torch.Tensor, root: torch.Tensor, tree: Tree) -> Proposal:
        """The tree's tokens, depth by depth: each parent's path (from the root) goes through the
        depth's head once, and its children take their ranks among the head's candidates."""
        paths: dict[int, list[int]] = {-1: [int(root)]}  # node -> tokens from the root to it
        tokens = [0] * len(tree.parents)
        for depth in range(1, max(tree.depths) + 1):
            nodes = [j for j, d in enumerate(tree.depths) if d == depth]
            parents = sorted({tree.parents[j] for j in nodes})
            before = torch.tensor([paths[p] for p in parents], device=hidden.device)  # [P, depth]
            logits = self.heads.head(depth - 1, hidden.expand(len(parents), -1), before)  # [P, V]
            top = logits.topk(1 + max(tree.ranks[j] for j in nodes), dim=-1).indices.tolist()
            for j in nodes:
                parent = tree.parents[j]
                tokens[j] = top[parents.index(parent)][tree.ranks[j]]
                paths[j] = paths[parent] + [tokens[j]]
        return Proposal(tokens=torch.tensor(tokens, device=hidden.device), parents=tree.parents)

    @torch.no_grad()
    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        load_checked(self.heads, weights, "heads")


def load_checked(module: torch.nn.Module, weights: Mapping[str, torch.Tensor], what: str) -> None:
    """Load `weights` into `module` after checking that they name its tensors with its shapes;
    IncompatibleDraftError otherwise, with the module untouched."""
    current = module.state_dict()
    unknown = sorted(set(weights) - set(current))
    if unknown:
        raise IncompatibleDraftError(f"weights name tensors the {what} does not have: {unknown[:5]}")
    wrong = [
        f"{name}: {tuple(t.shape)} != {tuple(current[name].shape)}"
        for name, t in weights.items()
        if t.shape != current[name].shape
    ]
    if wrong:
        raise IncompatibleDraftError(f"weights do not fit the {what} (vocabulary or sizes): {wrong[:5]}")
    given_storage = {current[name].data_ptr() for name in weights}
    missing = sorted(n for n in set(current) - set(weights) if current[n].data_ptr() not in given_storage)
    if missing:  # tied tensors (shared storage) may be given once
        raise IncompatibleDraftError(f"weights lack tensors the {what} needs: {missing[:5]}")
    module.load_state_dict(dict(weights), strict=False)
