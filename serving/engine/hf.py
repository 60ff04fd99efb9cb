"""SpecEngine: lossless speculative decoding over any Hugging Face causal LM, for a batch of
sequences that join and leave between steps (continuous batching), in one decode loop.

`add` checks a request, prefills its prompt into a cache slot (serving.engine.kv) and makes it a
`Decoding`. Each `step`: every sequence drafts what the per-step controller chose for it
(serving.engine.speculation): k tokens from its learnt proposer (one batched call per proposer;
sequences may use different drafts), its suffix candidates (`suffix`: serving.engine.suffix), or
nothing; one target forward scores every sequence's last emitted token plus its drafts (ragged: each
row its own length, padded to the widest), the rejection sampler keeps a prefix per sequence and
adds one token, and each sequence's slot is cut back to what it kept. With nothing drafted the very
same loop is plain autoregressive decoding. Draft heads (`HeadsProposer`) read the target's hidden
state from that forward, so they cost no pass of their own; for greedy requests they may propose a
static tree instead of a chain, verified in the same forward (serving.engine.tree): the greedy walk
keeps a path and the slot keeps its positions. Without measured costs every sequence drafts k (its
suffix candidates where they promise more); once `calibrate` has measured step costs, the controller
plans each step from the batch size, each sequence's recent acceptance and its candidates' chances,
down to plain decoding. A request with a seed draws through the exponential race of
serving.engine.sampling: its text depends on the seed, the prompt and the target only, never on k,
the drafts or the batch.

`stream` and `generate` run one request alone through the same `add` and `step`.

Cache invariant: a sequence's slot holds every token of it except the last one, which is always
the first input of its next verify forward.

Device discipline: a step runs on the device from the drafts to the verification without reading
anything back; then what leaves it (each sequence's candidate tokens, how many drafts it kept, the
log-probs and hidden states its request asked for) crosses to the host in one batched transfer
(`to_host`), and everything after (stop tokens, lengths, stats, traces) works on host values. On a
GPU that is one synchronisation per step.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import statistics
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import PreTrainedModel

from distill.heads import DraftHeads, heads_spec
from serving.engine.device import (
    SERVING_MEMORY_FRACTION,
    DeviceProfile,
    apply_memory_budget,
    compiled,
    new_cache,
    profile_for,
)
from serving.engine.memory import MemoryPlan, plan_on_device
from serving.engine.models import (
    context_length,
    forward_slots,
    load_causal_lm,
    prefill,
    resolve_device,
    resolve_dtype,
    tree_support,
    vocab_size,
)
from serving.engine.proposers import (
    DraftModelProposer,
    DraftRow,
    HeadsProposer,
    NgramProposer,
    NullProposer,
    Proposal,
    Proposer,
    ScratchProposer,
    SuffixProposer,
    SuffixState,
)
from serving.engine.protocol import Generation, Step, TokenLogprobs
from serving.engine.sampling import SamplingParams, process_logits, race, rejection_sample, seeded_noise
from serving.engine.speculation import (
    MARGIN,
    NONE,
    PLAIN_EVERY,
    PROBE_EVERY,
    AcceptanceEstimate,
    Choice,
    Costs,
    Options,
    StepCosts,
    fixed,
    plan,
    shape,
    suffix_chances,
)
from serving.engine.stats import SpecStats
from serving.engine.suffix import Candidates
from serving.engine.tree import greedy_path, node_depths, static_tree
from serving.engine.vocab import check_pair
from serving.errors import IncompatibleDraftError, InvalidRequestError
from store.registry import ALL_DOMAINS

log = logging.getLogger(__name__)

ProposerName = Literal["draft", "ngram", "none", "medusa", "hydra"]
PROPOSERS: tuple[ProposerName, ...] = ("draft", "ngram", "none", "medusa", "hydra")
COST_BATCHES = (1, 2, 4, 8, 16, 32)  # batch sizes `calibrate` times, up to the engine's max_batch


@dataclass
class Decoding:
    """One sequence being decoded: its request, its slot, what it has emitted so far."""

    slot: int
    tokens: torch.Tensor  # [L + max_new_tokens] on the device; tokens[:length] is the sequence so far
    history: list[int]  # the sequence so far, on the host
    prompt_length: int
    max_new_tokens: int
    params: SamplingParams
    stop_ids: frozenset[int]
    generator: torch.Generator
    seed: int | None
    top_logprobs: int
    hidden_states: bool
    proposer: Proposer  # its learnt one (or n-grams, or none)
    draft_state: Any
    acceptance: AcceptanceEstimate  # its proposer's recent acceptance
    domain: str
    suffix: SuffixState | None  # with suffix speculation
    suffix_acceptance: AcceptanceEstimate  # its suffix drafts' recent acceptance
    stats: SpecStats = field(default_factory=SpecStats)
    tops: list[TokenLogprobs] = field(default_factory=list)  # per step, emitted positions
    hiddens: list[torch.Tensor] = field(default_factory=list)  # per step, emitted positions

    @property
    def length(self) -> int:
        return len(self.history)

    @property
    def generated(self) -> int:
        return len(self.history) - self.prompt_length

    @property
    def output(self) -> list[int]:
        return self.history[self.prompt_length :]

    def noise(self, k: int, vocab: int) -> torch.Tensor | None:
        """A seeded sampled request's race noise [k + 1, V] for this step's positions (the k drafts,
        then the bonus); None for the others."""
        if self.seed is None or self.params.greedy:
            return None
        return seeded_noise(self.seed, self.generated, k + 1, vocab, self.tokens.device)

    def row(self, k: int, noise: torch.Tensor | None) -> DraftRow:
        """What this sequence asks of its proposer for k drafts."""
        drafts_noise = None if noise is None else noise[:k]
        return DraftRow(
            self.draft_state, self.tokens[: self.length], self.history, k, self.params, self.generator,
            drafts_noise,
        )  # fmt: skip


@dataclass(frozen=True)
class _Verified:
    """One sequence's verification over its n = 1 + drafts positions, still on the device.

    tokens [n]: what each position emits if it is kept (a chain: the sampler's tokens, -1 past
    the first rejection; a tree: the target's argmax after the root and after each node).
    accepted [1]: a chain's kept drafts (a tree's path is walked on the host, from `nodes` [N],
    its drafted tokens). hidden [n, H]: the target's states. chosen [n], top_ids and top_values
    [n, K]: the log-probs the request asked for (which positions are kept is known only on the
    host, so all n cross)."""

    drafted: int  # drafts proposed (a tree: its depth)
    tokens: torch.Tensor
    hidden: torch.Tensor
    accepted: torch.Tensor | None = None
    nodes: torch.Tensor | None = None
    chosen: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    top_values: torch.Tensor | None = None
    traced_hidden: torch.Tensor | None = None  # hidden, when the request keeps its hidden states

    def crossing(self) -> list[torch.Tensor | None]:
        """What crosses to the host, in `_Host`'s order."""
        return [
            self.tokens, self.accepted, self.nodes, self.chosen, self.top_ids, self.top_values,
            self.traced_hidden,
        ]  # fmt: skip


@dataclass(frozen=True)
class _Host:
    """A `_Verified`'s crossing, on the host."""

    tokens: list[int]
    accepted: int | None
    nodes: list[int] | None
    chosen: torch.Tensor | None
    top_ids: torch.Tensor | None
    top_values: torch.Tensor | None
    hidden: torch.Tensor | None

    @staticmethod
    def of(parts: list[torch.Tensor | None]) -> _Host:
        tokens, accepted, nodes, *rest = parts
        return _Host(
            tokens.tolist(),
            None if accepted is None else accepted.tolist()[0],
            None if nodes is None else nodes.tolist(),
            *rest,
        )


def to_host(tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """The tensors on the host, in one batched transfer: those of a dtype are flattened into one
    buffer, the buffers are copied without blocking, then one synchronisation; None stays None.
    On the CPU they are returned as they are."""
    present = [t for t in tensors if t is not None]
    if not present or present[0].device.type == "cpu":
        return list(tensors)
    by_dtype: dict[torch.dtype, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        if t is not None:
            by_dtype[t.dtype].append(i)
    copies = {
        dtype: torch.cat([tensors[i].reshape(-1) for i in indices]).to("cpu", non_blocking=True)
        for dtype, indices in by_dtype.items()
    }
    torch.accelerator.synchronize(present[0].device)
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for dtype, indices in by_dtype.items():
        pieces = copies[dtype].split([tensors[i].numel() for i in indices])
        for i, piece in zip(indices, pieces, strict=True):
            out[i] = piece.view(tensors[i].shape)
    return out


class SpecEngine:
    """See the module docstring. Not thread-safe: one thread adds and steps."""

    def __init__(
        self,
        target: PreTrainedModel,
        proposer: Proposer,
        num_speculative_tokens: int = 4,
        profile: DeviceProfile | None = None,
        max_model_len: int | None = None,
        suffix: SuffixProposer | None = None,
    ):
        if isinstance(num_speculative_tokens, bool) or not isinstance(num_speculative_tokens, int):
            raise ValueError(f"num_speculative_tokens must be an int, got {num_speculative_tokens!r}")
        if num_speculative_tokens < 0:
            raise ValueError(f"num_speculative_tokens (k) must be >= 0, got {num_speculative_tokens}")
        self.target = target
        self.proposer, self.suffix = proposer, suffix
        self.k = num_speculative_tokens
        self.width = verify_width(self.k, suffix)
        self.device = target.device
        self.vocab_size = vocab_size(target)
        self.max_length = _max_length(context_length(target), max_model_len)
        eos = target.generation_config.eos_token_id
        self.default_stop_ids = frozenset([eos] if isinstance(eos, int) else eos or [])
        self.profile = profile
        self.cache = new_cache(target, profile)
        self._base = compiled(target.base_model, profile)
        self.active: list[Decoding] = []
        # per domain, across sequences: new ones start from them
        self.acceptance: defaultdict[str, AcceptanceEstimate] = defaultdict(_optimistic)
        self.suffix_acceptance: defaultdict[str, AcceptanceEstimate] = defaultdict(_optimistic)
        self.costs: Costs | None = None  # calibrate's measurement: the controller then plans each step
        self.steps = 0
        self.speculating = False  # whether the controller's last plan drafted
        self.memory_plan: MemoryPlan | None = None  # from_pretrained's, on CUDA

    @classmethod
    def from_pretrained(
        cls,
        target: str,
        draft: str | None = None,
        proposer: ProposerName | None = None,
        num_speculative_tokens: int = 4,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        tree: tuple[int, ...] | None = None,
        max_batch: int = 8,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = SERVING_MEMORY_FRACTION,
        trainer_share: float = 0.0,
        suffix: bool = False,
    ) -> SpecEngine:
        """Load a target (local directory or hub id) and a proposer, set up for the device
        (serving.engine.device: on CUDA, static caches for `max_batch` sequences and compiled steps).

        A request's prompt and output fit in `max_model_len` tokens (default: the target's
        context). On CUDA the memory plan (serving.engine.memory) sizes the caches after the weights have
        loaded, within `gpu_memory_utilization` of the device (`trainer_share` is the trainer's
        part of the same device), and is logged; MemoryPlanError, with the numbers, when it
        cannot fit. The default length is then reduced to what fits.

        proposer defaults to "draft" when a draft is given and "none" otherwise. `tree`: for
        heads, the branching of a static tree (serving.engine.tree.static_tree) verified in one forward
        for greedy requests; when the target cannot verify trees, chain mode, with the reason logged.
        `suffix`: suffix speculation beside the proposer (serving.engine.suffix), under the per-step
        controller; it drafts trees for greedy requests on the same condition.
        """
        proposer = proposer or ("draft" if draft is not None else "none")
        if proposer not in PROPOSERS:
            raise ValueError(f"proposer must be one of {PROPOSERS}, got {proposer!r}")
        if (proposer == "draft") != (draft is not None):
            raise ValueError("a draft model is needed by proposer='draft' and used by no other proposer")
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        target_model = load_causal_lm(target, device, dtype)
        draft_model = None if draft is None else load_causal_lm(draft, device, dtype)
        if draft_model is not None:
            try:
                check_pair(target, draft, vocab_size(target_model), vocab_size(draft_model))
            except IncompatibleDraftError as err:
                raise IncompatibleDraftError(
                    f"draft {draft!r} cannot propose for {target!r}: {err}"
                ) from None
        max_length = _max_length(context_length(target_model), max_model_len)
        profile = profile_for(device, dtype, memory_fraction=gpu_memory_utilization)
        index = None
        if suffix:
            if reason := tree_support(target_model):
                log.warning("suffix speculation drafts chains: %s cannot verify trees: %s", target, reason)
            index = SuffixProposer(trees=not reason)
        plan = None
        if profile.static_cache:
            plan = plan_on_device(
                target_model, draft_model, max_batch=max_batch, k=verify_width(num_speculative_tokens, index),
                max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
                trainer_share=trainer_share,
            )  # fmt: skip
            log.info("memory plan for %s:\n%s", target, plan.render())
            profile = dataclasses.replace(profile, slots=plan.slots, capacity=plan.capacity)
            max_length = plan.max_model_len
        apply_memory_budget(profile, device)
        if draft_model is not None:
            chosen: Proposer = DraftModelProposer(draft_model, profile, vocab_size(target_model))
        elif proposer in (
            "medusa",
            "hydra",
        ):  # untrained heads (guessing as the LM head does) until a version loads
            spec = heads_spec(proposer, num_speculative_tokens)
            if tree and (reason := tree_support(target_model)):
                log.warning("tree mode off, heads draft chains: %s cannot verify trees: %s", target, reason)
                tree = None
            chosen = HeadsProposer(
                DraftHeads.for_target(spec, target_model), static_tree(tree) if tree else None
            )
        else:
            chosen = NgramProposer() if proposer == "ngram" else NullProposer()
        engine = cls(target_model, chosen, num_speculative_tokens, profile, max_length, index)
        engine.memory_plan = plan
        return engine

    def generate(
        self,
        prompt_ids: Sequence[int] | torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop_token_ids: Iterable[int] | None = None,
        top_logprobs: int = 0,
        hidden_states: bool = False,
    ) -> Generation:
        """Generate up to max_new_tokens after prompt_ids.

        stop_token_ids=None stops at the target's EOS token(s); pass [] to never stop early.
        The output has the target's own distribution: token-identical to its greedy decoding
        at temperature 0, and distributed as its processed p when sampling.
        """
        *_, last = self.stream(
            prompt_ids, max_new_tokens, temperature, top_p, top_k, seed, stop_token_ids, top_logprobs,
            hidden_states,
        )  # fmt: skip
        return last.generation  # the last step carries it

    def stream(
        self,
        prompt_ids: Sequence[int] | torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop_token_ids: Iterable[int] | None = None,
        top_logprobs: int = 0,
        hidden_states: bool = False,
    ) -> Iterator[Step]:
        """generate, one decode step at a time, for a request alone on this engine: the request is
        checked now (InvalidRequestError), and each iteration yields the tokens one step emitted;
        the last carries the Generation. Closing the iterator early abandons the request."""
        if self.active:
            raise RuntimeError("stream() decodes one request alone; use add() and step() for a batch")
        decoding = self.add(
            prompt_ids, max_new_tokens, temperature, top_p, top_k, seed, stop_token_ids, top_logprobs,
            hidden_states,
        )  # fmt: skip
        return self._alone(decoding)

    def _alone(self, decoding: Decoding) -> Iterator[Step]:
        try:
            while True:
                ((_, step),) = self.step()
                yield step
                if step.generation is not None:
                    return
        finally:
            self.abandon(decoding)  # a no-op when it finished

    @torch.inference_mode()
    def add(
        self,
        prompt_ids: Sequence[int] | torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop_token_ids: Iterable[int] | None = None,
        top_logprobs: int = 0,
        hidden_states: bool = False,
        proposer: Proposer | None = None,
        domain: str = ALL_DOMAINS,
        suffix: bool = True,
    ) -> Decoding:
        """Check a request (InvalidRequestError), prefill its prompt and decode it from the next
        step on, drafting with `proposer` (default: the engine's) and, where the engine has suffix
        speculation and `suffix` holds, from its domain's suffix index, which it joins at its end."""
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
        ids = self._check_prompt(prompt_ids, max_new_tokens)
        prompt = torch.tensor(ids, dtype=torch.long, device=self.device)
        stop_ids = (
            self.default_stop_ids
            if stop_token_ids is None
            else frozenset(_ids(stop_token_ids, "stop_token_ids"))
        )
        if seed is not None and not _is_int(seed):
            raise InvalidRequestError(f"seed must be an integer or None, got {seed!r}")
        if not _is_int(top_logprobs) or not 0 <= top_logprobs <= self.vocab_size:
            raise InvalidRequestError(f"top_logprobs must be an integer in [0, {self.vocab_size}]")
        generator = torch.Generator(device=self.device)  # unseeded requests' draws
        generator.seed()
        proposer = proposer or self.proposer
        slot = self.cache.acquire()
        try:
            self.cache.reserve(prompt.shape[0] + max_new_tokens + self.width)
            if prompt.shape[0] > 1:
                prefill(self.target, self.cache, slot, prompt[:-1])
            draft_state = proposer.new_state(domain)
        except BaseException:
            self.cache.release(slot)
            raise
        suffix_state = self.suffix.new_state(domain) if self.suffix is not None and suffix else None
        decoding = Decoding(
            slot=slot, tokens=torch.cat([prompt, prompt.new_empty(max_new_tokens)]), history=list(ids),
            prompt_length=len(ids), max_new_tokens=max_new_tokens, params=params, stop_ids=stop_ids,
            generator=generator, seed=seed,
            top_logprobs=top_logprobs, hidden_states=hidden_states, proposer=proposer,
            draft_state=draft_state, acceptance=self.acceptance[domain].prior(), domain=domain,
            suffix=suffix_state, suffix_acceptance=self.suffix_acceptance[domain].prior(),
        )  # fmt: skip
        self.active.append(decoding)
        return decoding

    def abandon(self, decoding: Decoding) -> None:
        """Stop decoding a sequence (its client went away) and free what it held; a no-op once it
        has left."""
        if decoding not in self.active:
            return
        self.active.remove(decoding)
        self.cache.release(decoding.slot)
        decoding.proposer.release(decoding.draft_state)
        if decoding.suffix is not None:
            self.suffix.release(decoding.suffix, decoding.history)

    @torch.inference_mode()
    def step(self, k: int | None = None) -> list[tuple[Decoding, Step]]:
        """One decode step for every active sequence, each drafting what the controller plans
        (serving.engine.speculation: by the measured costs once `calibrate` has set them), or, with
        `k` given (or no costs), k tokens with its learnt proposer, its suffix candidates where
        they promise more. A sequence whose Step carries its Generation has finished and left."""
        batch = list(self.active)
        if not batch:
            return []
        began = time.perf_counter()
        candidates = [self._candidates(decoding) for decoding in batch]
        options = [
            Options(
                room=decoding.max_new_tokens - decoding.generated - 1,
                alpha=None if decoding.proposer.name == "none" else decoding.acceptance.alpha,
                group=id(decoding.proposer),
                chances=suffix_chances(
                    found.confidences, node_depths(found.parents), decoding.suffix_acceptance.alpha
                ),
            )
            for decoding, found in zip(batch, candidates, strict=True)
        ]
        choices, timed = self._choose(options, k)
        events = self._step(batch, choices, candidates)
        if timed:  # the plan's own step (not a probe): its time keeps the costs current, contention
            # for the GIL with the replica's event loop included
            width, groups = shape(options, choices)
            learnt_k = max((c.tokens for c in choices if c.proposer == "learnt"), default=0)
            self.costs = self.costs.observe(len(batch), width, groups, learnt_k, time.perf_counter() - began)
        return events

    def _candidates(self, decoding: Decoding) -> Candidates:
        """The sequence's suffix candidates, within what it has left to generate."""
        room = decoding.max_new_tokens - decoding.generated - 1  # drafts past it would be wasted
        if decoding.suffix is None or room < 1:
            return Candidates()
        return self.suffix.candidates(decoding.suffix, decoding.history, room, decoding.params.greedy)

    def _choose(self, options: list[Options], k: int | None) -> tuple[list[Choice], bool]:
        """Each sequence's choice this step, and whether the step's time measures the plan (not
        when k is given or fixed, nor for a probe). Now and then the other kind of step runs:
        while plain decoding wins, every PROBE_EVERY steps one sequence in turn drafts a token (a
        probe, to keep acceptance measured); while speculation wins, every PLAIN_EVERY steps a
        plain step runs (to keep the cost of plain steps measured under today's load)."""
        self.steps += 1
        if k is not None or self.costs is None:
            return fixed(options, self.k if k is None else k), False
        margin = 0.0 if self.speculating else MARGIN  # starting needs MARGIN (the drafts must catch up)
        choices = plan(options, self.k, self.costs, margin)
        self.speculating = any(choice.tokens for choice in choices)
        if not self.speculating and self.steps % PROBE_EVERY == 0:
            i = (self.steps // PROBE_EVERY) % len(options)
            choices[i] = _probe(options[i])
            return choices, False
        if self.speculating and self.steps % PLAIN_EVERY == 0:
            return [NONE] * len(options), True
        return choices, True

    def _step(
        self, batch: list[Decoding], choices: list[Choice], candidates: list[Candidates]
    ) -> list[tuple[Decoding, Step]]:
        """Propose what `choices` say, verify it all in one target forward, emit what is kept."""
        noises = [d.noise(c.tokens, self.vocab_size) for d, c in zip(batch, choices, strict=True)]
        proposals = self._propose(batch, choices, candidates, noises)
        inputs = [
            torch.cat([d.tokens[d.length - 1 : d.length], p.tokens])
            for d, p in zip(batch, proposals, strict=True)
        ]
        logits, hidden = forward_slots(
            self.target, self.cache, [d.slot for d in batch], inputs, [p.parents for p in proposals],
            tokens=self.width + 1 if self.cache.static else 1, base=self._base,
        )  # [B, n, V], [B, n, H]; row i valid up to len(inputs[i])  # fmt: skip
        verified = []
        for i, (decoding, proposal) in enumerate(zip(batch, proposals, strict=True)):
            n = inputs[i].shape[0]
            if proposal.parents is None:
                row = self._verify_chain(decoding, proposal, logits[i, :n], hidden[i, :n], noises[i])
            else:
                row = self._verify_tree(decoding, proposal, logits[i, :n], hidden[i, :n])
            verified.append(row)
        crossing = to_host([t for row in verified for t in row.crossing()])  # the step's one transfer
        width = len(crossing) // max(1, len(verified))
        hosts = [_Host.of(crossing[i * width : (i + 1) * width]) for i in range(len(batch))]
        return [
            (decoding, self._emit(decoding, row, proposal, choice, host))
            for decoding, row, proposal, choice, host in zip(
                batch, verified, proposals, choices, hosts, strict=True
            )
        ]

    def _propose(
        self,
        batch: list[Decoding],
        choices: list[Choice],
        candidates: list[Candidates],
        noises: list[torch.Tensor | None],
    ) -> list[Proposal]:
        """Each sequence's proposal: its chosen suffix candidates, or up to k tokens from its learnt
        proposer (one batched call per proposer), or nothing."""
        proposals = [Proposal(tokens=torch.empty(0, dtype=torch.long, device=self.device))] * len(batch)
        groups: dict[int, list[int]] = {}
        for i, (decoding, choice) in enumerate(zip(batch, choices, strict=True)):
            if choice.proposer == "suffix":
                proposals[i] = SuffixProposer.proposal(candidates[i].first(choice.tokens), self.device)
            elif choice.proposer == "learnt" and choice.tokens:
                groups.setdefault(id(decoding.proposer), []).append(i)
        for indices in groups.values():
            rows = [batch[i].row(choices[i].tokens, noises[i]) for i in indices]
            for i, proposal in zip(indices, batch[indices[0]].proposer.propose(rows), strict=True):
                proposals[i] = proposal
        return proposals

    def _verify_chain(
        self,
        decoding: Decoding,
        proposal: Proposal,
        logits: torch.Tensor,
        hidden: torch.Tensor,
        noise: torch.Tensor | None,
    ) -> _Verified:
        """The rejection sampler over the last emitted token and the k drafts after it (logits
        [1+k, V]). A seeded request's p is one-hot at its race's winner (`noise` [1+k, V]), so it
        is decided by comparison, as greedy ones are."""
        probs = process_logits(logits, decoding.params)  # [1+k, V]
        if noise is not None:
            winners = race(probs, noise[: probs.shape[0]]).unsqueeze(-1)  # [1+k, 1]
            probs = torch.zeros_like(probs).scatter_(-1, winners, 1.0)
        verification = rejection_sample(
            probs.unsqueeze(0),  # [1, 1+k, V]
            proposal.tokens.unsqueeze(0),
            None if proposal.probs is None else proposal.probs.unsqueeze(0),
            decoding.generator,
            one_hot=decoding.params.greedy or noise is not None,
        )
        tokens = verification.tokens[0]  # [1+k]
        return self._verified(
            decoding, proposal.tokens.shape[0], tokens, logits, hidden, verification.num_accepted
        )

    def _verify_tree(
        self, decoding: Decoding, proposal: Proposal, logits: torch.Tensor, hidden: torch.Tensor
    ) -> _Verified:
        """A greedy request's tree: the target's argmax after the root and after every node (logits
        [1+N, V], serving.engine.tree); the path is walked on the host."""
        if not decoding.params.greedy:
            raise RuntimeError("tree proposals are verified for greedy requests only")
        depth = max(node_depths(proposal.parents))
        return self._verified(decoding, depth, logits.argmax(-1), logits, hidden, nodes=proposal.tokens)

    @staticmethod
    def _verified(
        decoding: Decoding,
        drafted: int,
        tokens: torch.Tensor,
        logits: torch.Tensor,
        hidden: torch.Tensor,
        accepted: torch.Tensor | None = None,
        nodes: torch.Tensor | None = None,
    ) -> _Verified:
        """A verification with the log-probs (temperature 1) and hidden states its request keeps."""
        logprobs = {}
        if decoding.top_logprobs:
            all_logprobs = torch.log_softmax(logits.float(), dim=-1)  # [n, V]
            top = all_logprobs.topk(decoding.top_logprobs)
            chosen = all_logprobs.gather(-1, tokens.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # [n]
            logprobs = {"chosen": chosen, "top_ids": top.indices, "top_values": top.values}
        traced = hidden if decoding.hidden_states else None
        return _Verified(drafted, tokens, hidden, accepted, nodes, traced_hidden=traced, **logprobs)

    def _emit(
        self,
        decoding: Decoding,
        verified: _Verified,
        proposal: Proposal,
        choice: Choice,
        host: _Host,
    ) -> Step:
        """Keep what a verification accepted (on the host: which positions, then the slot is cut
        back to them), append it to the sequence, count it for the proposer that drafted it;
        finish the sequence at a stop token or its length."""
        if host.accepted is not None:  # a chain: the first accepted + 1 positions
            kept = list(range(host.accepted + 1))
            self.cache.lengths[decoding.slot] = decoding.length + host.accepted
        else:  # a tree: the root and the accepted path
            path = greedy_path(proposal.parents, host.nodes, host.tokens)
            self.cache.keep(decoding.slot, decoding.length, [decoding.length + node for node in path])
            kept = [0] + [1 + node for node in path]
        accepted, emitted = len(kept) - 1, [host.tokens[r] for r in kept]
        learnt = choice.proposer == "learnt"
        decoding.proposer.observe(decoding.draft_state, accepted if learnt else 0, verified.hidden[kept[-1]])
        estimates = {
            "learnt": (decoding.acceptance, self.acceptance[decoding.domain]),
            "suffix": (decoding.suffix_acceptance, self.suffix_acceptance[decoding.domain]),
        }.get(choice.proposer, ())
        for estimate in estimates:
            estimate.update(verified.drafted, accepted)
        name = decoding.proposer.name if learnt else choice.proposer
        decoding.stats.record(verified.drafted, accepted, name)
        start = decoding.length
        decoding.tokens[start : start + len(emitted)] = torch.tensor(emitted, device=self.device)
        new: list[int] = []
        reason: Literal["stop", "length"] | None = None
        for token in emitted:
            decoding.history.append(token)
            new.append(token)
            if token in decoding.stop_ids:
                reason = "stop"
                break
        if reason is None and decoding.generated >= decoding.max_new_tokens:
            reason = "length"
        rows = kept[: len(new)]
        logprobs = None
        if decoding.top_logprobs:
            logprobs = TokenLogprobs(host.chosen[rows], host.top_ids[rows], host.top_values[rows])
            decoding.tops.append(logprobs)
        if decoding.hidden_states:
            decoding.hiddens.append(host.hidden[rows])
        if reason is None:
            return Step(new, logprobs=logprobs)
        return Step(new, self._finish(decoding, reason), logprobs)

    def _finish(self, decoding: Decoding, reason: Literal["stop", "length"]) -> Generation:
        self.abandon(decoding)
        top = decoding.top_logprobs
        top_ids = torch.cat([t.top_ids for t in decoding.tops]) if top else None
        top_values = torch.cat([t.top_values for t in decoding.tops]) if top else None
        hidden = torch.cat(decoding.hiddens) if decoding.hidden_states else None
        return Generation(decoding.output, decoding.stats, reason, top_ids, top_values, hidden)

    @torch.inference_mode()
    def calibrate(self, max_batch: int, context: int = 64, repeats: int = 5) -> Costs:
        """Time whole decode steps for batch sizes up to max_batch, on scratch sequences after a
        `context`-token prompt (median of `repeats` steps after one): verifying n = 0..width drafts
        that cost nothing to propose (`Costs.verify`, as chains: live steps with trees correct
        them) and, with a learnt proposer, drafting k = 0..self.k with it (`Costs.learnt`). Setting
        `costs` to the result makes step() plan by them (serving.engine.speculation). The scratch
        sequences join no suffix index."""
        if self.active:
            raise RuntimeError("calibrate before serving: it needs the engine to itself")
        batches = tuple(b for b in COST_BATCHES if b < max_batch) + (max_batch,)
        context = min(context, (self.max_length or 2 * context) // 2)
        prompt = [i % self.vocab_size for i in range(1, context + 1)]
        new_tokens = min((repeats + 2) * (self.width + 1), (self.max_length or 2 * context) - context)

        def timed(proposer: Proposer, most: int) -> StepCosts:
            seconds = []
            for b in batches:
                row = []
                for k in range(most + 1):
                    batch = [
                        self.add(prompt, new_tokens, stop_token_ids=[], proposer=proposer, suffix=False)
                        for _ in range(b)
                    ]
                    run = functools.partial(self._step, batch, [Choice("learnt", k)] * b, [Candidates()] * b)
                    row.append(_median_seconds(run, repeats))
                    for decoding in batch:
                        self.abandon(decoding)
                seconds.append(row)
            return StepCosts.measured(batches, seconds)

        costs = Costs(
            timed(ScratchProposer(), self.width),
            None if self.proposer.name == "none" else timed(self.proposer, self.k),
        )
        self.acceptance.clear()  # what the scratch text taught is forgotten
        return costs

    def _check_prompt(self, prompt_ids: Sequence[int] | torch.Tensor, max_new_tokens: int) -> list[int]:
        """Validate a request's prompt and length, on the host; return the prompt's ids."""
        if not _is_int(max_new_tokens) or max_new_tokens < 1:
            raise InvalidRequestError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if isinstance(prompt_ids, torch.Tensor):
            if prompt_ids.dim() != 1 or prompt_ids.dtype.is_floating_point or prompt_ids.dtype == torch.bool:
                raise InvalidRequestError("prompt_ids must be a 1-D tensor of integer token ids")
            ids = prompt_ids.tolist()  # the caller's tensor (the API sends lists)
        else:
            ids = _ids(prompt_ids, "prompt_ids")
        if not ids:
            raise InvalidRequestError("prompt_ids is empty; at least one token is needed")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise InvalidRequestError(f"prompt_ids must lie in [0, {self.vocab_size}) for this model")
        if self.max_length is not None and len(ids) + max_new_tokens > self.max_length:
            raise InvalidRequestError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                f"model's context of {self.max_length} tokens"
            )
        return ids


def _max_length(context: int | None, max_model_len: int | None) -> int | None:
    """The longest prompt plus output a request may have: max_model_len, within the context."""
    if max_model_len is None:
        return context
    if max_model_len < 2 or (context is not None and max_model_len > context):
        raise ValueError(
            f"max_model_len must lie in [2, {context}] (the model's context), got {max_model_len}"
        )
    return max_model_len


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ids(values: Iterable[int], what: str) -> list[int]:
    """The values as a list of ints, or an InvalidRequestError naming `what`."""
    try:
        ids = list(values)
    except TypeError:
        raise InvalidRequestError(f"{what} must be a sequence of integer token ids") from None
    if not all(_is_int(t) for t in ids):
        raise InvalidRequestError(f"{what} must be a sequence of integer token ids")
    return ids


def verify_width(k: int, suffix: SuffixProposer | None) -> int:
    """The most drafts a sequence verifies in a step: k, or suffix speculation's candidates."""
    return max(k, suffix.config.max_tokens if suffix else 0)


def _probe(option: Options) -> Choice:
    """One token from the sequence's learnt proposer (else its most likely suffix candidate)."""
    if option.room < 1:
        return NONE
    if option.alpha is not None:
        return Choice("learnt", 1)
    return Choice("suffix", 1) if option.chances else NONE


def _optimistic() -> AcceptanceEstimate:
    """Acceptance before any is seen: 0.8, worth five drafts, so that a draft is tried first."""
    return AcceptanceEstimate(accepted=4.0, rejected=1.0, decay=0.99)


def _median_seconds(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_seconds_per_token(model: PreTrainedModel, prompt: Sequence[int], tokens: int = 48) -> float:
    """Plain decoding time per token of `model` through this engine (median of three runs)."""
    engine = SpecEngine(model, NullProposer(), num_speculative_tokens=0)
    engine.generate(prompt, 4, stop_token_ids=[])  # warm-up
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        engine.generate(prompt, tokens, stop_token_ids=[])
        runs.append((time.perf_counter() - start) / tokens)
    return sorted(runs)[1]


def cost_ratio(
    target: PreTrainedModel, draft: PreTrainedModel, prompt: Sequence[int], tokens: int = 48
) -> float:
    """c of the speedup model: a draft decoding step's time over a target decoding step's."""
    return decode_seconds_per_token(draft, prompt, tokens) / decode_seconds_per_token(target, prompt, tokens)


def heads_cost_ratio(
    target: PreTrainedModel, heads: DraftHeads, prompt: Sequence[int], tokens: int = 48
) -> float:
    """c for draft heads: a greedy chain proposal of all K heads, per token drafted, over a target
    decoding step (the heads read a hidden state, so none is computed here)."""
    proposer, k = HeadsProposer(heads), heads.spec.num_heads
    state = proposer.new_state()
    proposer.observe(
        state, 0, torch.zeros(target.config.hidden_size, dtype=target.dtype, device=target.device)
    )
    ids, greedy = torch.tensor(list(prompt), device=target.device), SamplingParams()
    rows = [DraftRow(state, ids, list(prompt), k, greedy, torch.Generator())]
    proposer.propose(rows)  # warm-up
    runs = max(1, tokens // k)
    start = time.perf_counter()
    for _ in range(runs):
        proposer.propose(rows)
    per_token = (time.perf_counter() - start) / (runs * k)
    return per_token / decode_seconds_per_token(target, prompt, tokens)
