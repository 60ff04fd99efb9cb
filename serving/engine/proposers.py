"""Proposers: where draft tokens come from. One `Proposer` protocol, four implementations, and
suffix speculation's candidates (`SuffixProposer`), which the engine's controller asks for itself.

A proposer is shared by all requests (it may hold weights). It drafts for a batch of sequences
at once (`propose` takes one `DraftRow` per sequence); per-sequence state, such as a draft
model's cache slot, lives in the object `new_state(domain)` returns, is passed back in each row,
and is given up by `release`. After each verification the engine tells every
sequence's proposer what was kept (`observe`): how many of its drafts, and the target's final
hidden state at the position whose logits gave the last emitted token (what draft heads read).

Nothing here reads a device tensor back to the host: what a proposer needs to know on the host
(the sequence's ids, how many drafts were kept) comes from the engine, which moves a step's
results to the host in one transfer (serving.engine.hf), so a GPU step never waits on a sync here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import PreTrainedModel

from distill.heads import DraftHeads
from serving.engine.device import DeviceProfile, compiled, new_cache
from serving.engine.models import context_length, forward_slots, prefill
from serving.engine.sampling import SamplingParams, process_logits, race, sample
from serving.engine.suffix import Candidates, SuffixConfig, SuffixIndex, best
from serving.engine.tree import Tree
from serving.errors import IncompatibleDraftError
from store.registry import ALL_DOMAINS


@dataclass(frozen=True)
class Proposal:
    """Up to k drafted tokens.

    tokens: [k'] drafted ids, k' <= k (a proposer may offer fewer, even none).
    probs:  [k', V] q at each position after the request's sampling processing, or None when
        the proposer is deterministic (q one-hot at each drafted token).
    """

    tokens: torch.Tensor
    probs: torch.Tensor | None = None
    parents: tuple[int, ...] | None = None  # a tree (serving.engine.tree), greedy only: parents, -1 root


@dataclass(frozen=True)
class DraftRow:
    """What one sequence asks of its proposer in a step: up to k >= 1 tokens to follow token_ids."""

    state: Any
    token_ids: torch.Tensor  # [L] prompt plus output so far, on the device
    history: Sequence[int]  # the same L ids, on the host
    k: int
    params: SamplingParams
    generator: torch.Generator
    noise: torch.Tensor | None = None  # [k, V] a seeded request's race noise (serving.engine.sampling)

    def pick(self, probs: torch.Tensor, i: int) -> torch.Tensor:
        """Draft i's token [1] from q [1, V']: the race with the request's noise when it is seeded,
        else a draw from the generator (sampled requests; greedy ones take the argmax themselves)."""
        if self.noise is not None:
            return race(probs, self.noise[i : i + 1])
        return sample(probs, self.generator)


class Proposer(Protocol):
    name: str  # what metrics call it: draft, heads, ngram, none

    def new_state(self, domain: str = ALL_DOMAINS) -> Any:
        """Fresh per-sequence state (None for stateless proposers) for a request of `domain`."""

    def release(self, state: Any) -> None:
        """The sequence has finished or was abandoned: give up what its state holds."""

    def propose(self, rows: Sequence[DraftRow]) -> list[Proposal]:
        """A proposal of up to row.k tokens for each row, in order."""

    def observe(self, state: Any, accepted: int, hidden: torch.Tensor | None) -> None:
        """After a verification: `accepted` of the sequence's drafts were kept (0 when it drafted
        none), and hidden [H] is the target's state that gave its last emitted token."""

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Replace the proposer's weights (hot-swap); raise IncompatibleDraftError if they do not fit."""


def _empty(device: torch.device) -> Proposal:
    return Proposal(tokens=torch.empty(0, dtype=torch.long, device=device))


class _RowByRow:
    """A proposer that drafts for one row at a time (`_propose_row`) and has no weights; stateless
    unless it says otherwise (`new_state`)."""

    name = "stateless"

    def new_state(self, domain: str = ALL_DOMAINS) -> None:
        return None

    def release(self, state: None) -> None:
        pass

    def propose(self, rows: Sequence[DraftRow]) -> list[Proposal]:
        return [self._propose_row(row) for row in rows]

    def _propose_row(self, row: DraftRow) -> Proposal:
        raise NotImplementedError

    def observe(self, state: None, accepted: int, hidden: torch.Tensor | None) -> None:
        pass

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        if weights:
            raise IncompatibleDraftError(
                f"the {self.name} proposer has no weights; got {len(weights)} tensors"
            )


class NullProposer(_RowByRow):
    """Proposes nothing: the engine then decodes one token per step, plain autoregressively."""

    name = "none"

    def _propose_row(self, row: DraftRow) -> Proposal:
        return _empty(row.token_ids.device)


class ScratchProposer(_RowByRow):
    """Proposes k copies of the last token, at no cost: what calibration times verification with."""

    name = "scratch"

    def _propose_row(self, row: DraftRow) -> Proposal:
        return Proposal(tokens=row.token_ids[-1:].repeat(row.k))


def ngram_lookup(ids: Sequence[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Prompt lookup: find the latest earlier occurrence of the last n ids (longest n first,
    n_max down to n_min) and return up to k ids that followed it; empty when none matches."""
    ids, length = list(ids), len(ids)
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        suffix = ids[length - n :]
        for start in range(length - n - 1, -1, -1):  # latest first; each window has a successor
            if ids[start] == suffix[0] and ids[start : start + n] == suffix:
                return ids[start + n : start + n + k]
    return []


class NgramProposer(_RowByRow):
    """Drafts by copying what followed the latest earlier match of the current suffix."""

    name = "ngram"

    def __init__(self, n_min: int = 1, n_max: int = 3):
        if not 1 <= n_min <= n_max:
            raise ValueError(f"need 1 <= n_min <= n_max, got n_min={n_min}, n_max={n_max}")
        self.n_min, self.n_max = n_min, n_max

    def _propose_row(self, row: DraftRow) -> Proposal:
        tokens = ngram_lookup(row.history, row.k, self.n_min, self.n_max)
        return Proposal(tokens=torch.tensor(tokens, dtype=torch.long, device=row.token_ids.device))


OWN_BUDGET = 1 << 40  # a sequence's own index holds all of it: the context length bounds it


@dataclass
class SuffixState:
    """A sequence's domain and its own context, indexed as it grows (one document)."""

    domain: str
    own: SuffixIndex
    document: int


class SuffixProposer:
    """Suffix speculation (serving.engine.suffix): candidates for what follows a sequence, from
    the context's longest matching suffix in its own context or in recent requests of its domain
    (`shared`), whichever promises more accepted tokens. Not a `Proposer`: every step the engine's
    controller (serving.engine.speculation) asks it for each sequence's `candidates` and verifies
    the most likely of them where they pay (`proposal`). Greedy requests get a tree when the target
    verifies trees (`trees`), else, as sampled ones, the most confident chain (q one-hot, as
    n-grams: the rejection sampler keeps it lossless). A sequence joins its domain's shared index
    when it is released. No weights, no training: the index follows what is served."""

    def __init__(self, config: SuffixConfig | None = None, trees: bool = True):
        self.config, self.trees = config or SuffixConfig(), trees
        self.shared = SuffixIndex(self.config)

    def new_state(self, domain: str = ALL_DOMAINS) -> SuffixState:
        own = SuffixIndex(dataclasses.replace(self.config, budget_tokens=OWN_BUDGET))
        return SuffixState(domain, own, own.add(domain, []))

    def release(self, state: SuffixState, sequence: Sequence[int]) -> None:
        self.remember(state.domain, sequence)

    def remember(self, domain: str, sequence: Sequence[int]) -> None:
        """A finished request (prompt and output ids), from here or elsewhere, joins the index."""
        self.shared.add(domain, sequence)

    def candidates(self, state: SuffixState, history: Sequence[int], depth: int, greedy: bool) -> Candidates:
        """Up to `config.max_tokens` candidates, at most `depth` deep, to follow `history` (the
        sequence so far): a tree for a greedy request where trees are verified, else a chain."""
        state.own.extend(state.document, history[state.own.tokens :])
        depth = min(depth, self.config.max_tokens)
        tree = greedy and self.trees
        found = [
            index.lookup(state.domain, history, depth, self.config.max_tokens if tree else None)
            for index in (state.own, self.shared)
        ]
        return best(*(candidates if tree else candidates.chain() for candidates in found))

    @staticmethod
    def proposal(candidates: Candidates, device: torch.device) -> Proposal:
        return Proposal(
            torch.tensor(candidates.tokens, dtype=torch.long, device=device),
            parents=None if candidates.is_chain else candidates.parents,
        )


@dataclass
class DraftState:
    """A sequence's slot in the draft model's cache: its first `valid` positions hold the
    sequence's first ids, then `pending` drafts not yet verified (`observe` says how many were
    kept); `weights` is the proposer's weights generation the slot was computed with."""

    slot: int
    weights: int
    valid: int = 0
    pending: int = 0


CATCH_UP = 64  # a slot further behind its sequence than this is prefilled alone, not batched


class DraftModelProposer:
    """A small causal LM with the target's vocabulary drafts k tokens autoregressively, for every
    row of the batch in one forward per drafted token (its own cache: serving.engine.kv).

    Each row's slot is reconciled with its sequence first: it keeps the prefix known to match
    (the sequence as it was at its last proposal, plus the drafts `observe` says were kept) and
    runs the rest. That covers partial acceptance (drop rejected drafts), full acceptance (the last
    draft and the bonus token were never run) and steps that drafted nothing. New weights
    (`load_weights`, a hot-swap in place) invalidate every slot: each is prefilled again.
    Greedy and seeded drafts are deterministic proposals (q one-hot), so they come without probs.

    Padded vocabularies (serving.engine.vocab): the draft proposes only the ids below `shared_rows`, its
    q is zero on the target's other rows (`target_rows`), and ids it has no embedding for (tokens
    only the target can emit) are read as id 0: worse drafts after them, never a wrong output.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        profile: DeviceProfile | None = None,
        target_rows: int | None = None,
    ):
        self.model = model
        self.max_length = context_length(model)
        self.cache = new_cache(model, profile)
        self._base = compiled(model.base_model, profile)
        rows = model.get_output_embeddings().weight.shape[0]
        self.target_rows = target_rows or rows
        self.shared_rows = min(rows, self.target_rows)
        self.input_rows = model.get_input_embeddings().weight.shape[0]
        self.weights = 0  # generation: bumped by every load_weights

    name = "draft"

    def new_state(self, domain: str = ALL_DOMAINS) -> DraftState:
        return DraftState(slot=self.cache.acquire(), weights=self.weights)

    def release(self, state: DraftState) -> None:
        self.cache.release(state.slot)

    @torch.inference_mode()
    def propose(self, rows: Sequence[DraftRow]) -> list[Proposal]:
        limit = self.max_length or 2**62  # the last draft sits at position length + k - 2
        ks = [min(row.k, limit - len(row.history) + 1) for row in rows]
        inputs = {i: self._catch_up(row) for i, row in enumerate(rows) if ks[i] > 0}
        drafted: dict[int, list[torch.Tensor]] = {i: [] for i in inputs}
        probs: dict[int, list[torch.Tensor]] = {i: [] for i in inputs}
        for depth in range(max(ks, default=0)):
            active = [i for i in inputs if ks[i] > depth]
            slots = [rows[i].state.slot for i in active]
            last, _ = forward_slots(
                self.model, self.cache, slots, [self._known(inputs[i]) for i in active], base=self._base,
                last_only=True,
            )  # fmt: skip
            last = last[:, : self.shared_rows]  # [active, V']: the ids the target shares
            greedy = last.argmax(-1)  # [active]
            for j, i in enumerate(active):
                self.cache.lengths[slots[j]] += inputs[i].shape[0]
                row = rows[i]
                if row.params.greedy:  # q is one-hot at the argmax: a deterministic draft
                    inputs[i] = greedy[j : j + 1]  # [1]
                else:
                    q = process_logits(last[j : j + 1], row.params)  # [1, V']
                    inputs[i] = row.pick(q, depth)  # [1]
                    if row.noise is None:  # q itself, over the target's rows, for the sampler
                        probs[i].append(torch.nn.functional.pad(q, (0, self.target_rows - q.shape[-1])))
                drafted[i].append(inputs[i])
        proposals = []
        for i, row in enumerate(rows):
            if i not in inputs:
                proposals.append(_empty(row.token_ids.device))
                continue
            tokens = torch.cat(drafted[i])  # [k]
            row.state.valid, row.state.pending = len(row.history), tokens.shape[0] - 1  # the last is not run
            proposals.append(Proposal(tokens=tokens, probs=torch.cat(probs[i]) if probs[i] else None))
        return proposals

    def _catch_up(self, row: DraftRow) -> torch.Tensor:
        """Cut the row's slot back to what it shares with the sequence; return the ids [n >= 1] to
        run before the first draft, batched with the other rows' (behind by steps that drafted
        nothing, too). A new sequence, or one a long way behind, is prefilled alone first."""
        state, ids = row.state, row.token_ids
        if state.weights != self.weights:  # computed with weights since replaced
            state.weights, state.valid, state.pending = self.weights, 0, 0
        keep = min(state.valid, ids.shape[0] - 1)
        behind = ids.shape[0] - keep
        if behind > 1 and (keep == 0 or behind > CATCH_UP):
            prefill(self.model, self.cache, state.slot, self._known(ids[:-1]))
            keep = ids.shape[0] - 1
        self.cache.lengths[state.slot] = keep
        return ids[keep:]

    def _known(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [n] with those the draft has no embedding for read as 0."""
        return ids.masked_fill(ids >= self.input_rows, 0)

    def observe(self, state: DraftState, accepted: int, hidden: torch.Tensor | None) -> None:
        state.valid += min(accepted, state.pending)
        state.pending = 0

    @torch.no_grad()
    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Copy `weights` into the draft in place (its cache and compiled graphs stay); an output
        layer that the weights set apart from the input embeddings is untied first (once)."""
        check_weights(self.model, weights, "draft")
        head, embeddings = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        if head.weight is embeddings.weight:
            tied = [n for n, p in self.model.named_parameters(remove_duplicate=False) if p is head.weight]
            given = [weights[n] for n in tied if n in weights]
            if len(given) > 1 and not torch.equal(given[0], given[1]):
                head.weight = torch.nn.Parameter(head.weight.detach().clone())
        self.model.load_state_dict(dict(weights), strict=False)
        self.weights += 1


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
    verified in one forward (serving.engine.tree)."""

    def __init__(self, heads: DraftHeads, tree: Tree | None = None):
        self.heads, self.tree = heads, tree

    name = "heads"

    def new_state(self, domain: str = ALL_DOMAINS) -> HeadsState:
        return HeadsState()

    def release(self, state: HeadsState) -> None:
        pass

    def observe(self, state: HeadsState, accepted: int, hidden: torch.Tensor | None) -> None:
        state.hidden = hidden

    @torch.inference_mode()
    def propose(self, rows: Sequence[DraftRow]) -> list[Proposal]:
        return [self._propose_row(row) for row in rows]

    def _propose_row(self, row: DraftRow) -> Proposal:
        k, state, params = min(row.k, self.heads.spec.num_heads), row.state, row.params
        if state.hidden is None or k <= 0:
            return _empty(row.token_ids.device)
        if self.tree is not None and params.greedy:
            return self._tree(state.hidden, row.token_ids[-1], self.tree.up_to(k))
        hidden, before = state.hidden.unsqueeze(0), row.token_ids[-1:].unsqueeze(0)  # [1, H], [1, 1]
        tokens, probs = [], []
        for i in range(k):
            logits = self.heads.head(i, hidden, before)  # [1, V]
            if params.greedy:
                token = logits.argmax(-1)  # [1]
            else:
                q = process_logits(logits, params)  # [1, V]
                token = row.pick(q, i)  # [1]
                if row.noise is None:
                    probs.append(q)
            tokens.append(token)
            before = torch.cat([before, token.unsqueeze(0)], dim=1)  # [1, i + 2]
        return Proposal(tokens=torch.cat(tokens), probs=torch.cat(probs) if probs else None)

    def _tree(self, hidden: torch.Tensor, root: torch.Tensor, tree: Tree) -> Proposal:
        """The tree's tokens, depth by depth: each parent's path (from the root) goes through the
        depth's head once, and its children take their ranks among the head's candidates (all on
        the device: no token is read back)."""
        paths: dict[int, torch.Tensor] = {-1: root.view(1)}  # node -> ids [depth + 1] from the root to it
        tokens: list[torch.Tensor] = [root] * len(tree.parents)
        for depth in range(1, max(tree.depths) + 1):
            nodes = [j for j, d in enumerate(tree.depths) if d == depth]
            parents = sorted({tree.parents[j] for j in nodes})
            before = torch.stack([paths[p] for p in parents])  # [P, depth]
            logits = self.heads.head(depth - 1, hidden.expand(len(parents), -1), before)  # [P, V]
            top = logits.topk(1 + max(tree.ranks[j] for j in nodes), dim=-1).indices  # [P, R]
            for j in nodes:
                parent = tree.parents[j]
                tokens[j] = top[parents.index(parent), tree.ranks[j]]
                paths[j] = torch.cat([paths[parent], tokens[j].view(1)])
        return Proposal(tokens=torch.stack(tokens), parents=tree.parents)

    @torch.no_grad()
    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        load_checked(self.heads, weights, "heads")


def load_checked(module: torch.nn.Module, weights: Mapping[str, torch.Tensor], what: str) -> None:
    """Load `weights` into `module` after `check_weights`; the module is untouched when they fail it."""
    check_weights(module, weights, what)
    module.load_state_dict(dict(weights), strict=False)


def check_weights(module: torch.nn.Module, weights: Mapping[str, torch.Tensor], what: str) -> None:
    """IncompatibleDraftError unless `weights` name `module`'s tensors with its shapes (tensors
    tied to one another may be given once)."""
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
