"""SpecEngine: lossless speculative decoding over any Hugging Face causal LM, in one decode loop.

Each step the proposer drafts k tokens, one target forward scores the last emitted token plus
the k drafts (k+1 positions), the rejection sampler keeps a prefix and adds one token, and the
target's KV cache is cut back to what was kept. With the null proposer (k = 0) the very same
loop is plain autoregressive decoding. Draft heads (`HeadsProposer`) read the target's hidden
state from that forward, so they cost no pass of their own; for greedy requests they may propose
a static tree instead of a chain, verified in the same one forward (serving.tree): the greedy
walk keeps a path and the cache keeps that path's positions. `stream` yields what each step
emitted (for streaming responses); `generate` is the same loop, consumed to the end.

Cache invariant: the target cache holds every token of the sequence except the last one, which
is always the first input of the next verify forward.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import DynamicCache, PreTrainedModel

from distill.heads import DraftHeads, heads_spec
from serving.errors import IncompatibleDraftError, InvalidRequestError
from serving.models import (
    context_length,
    forward,
    forward_hidden,
    forward_tree,
    keep_cache_positions,
    load_causal_lm,
    resolve_device,
    resolve_dtype,
    tree_support,
    truncate_cache,
    vocab_size,
)
from serving.proposers import (
    DraftModelProposer,
    HeadsProposer,
    NgramProposer,
    NullProposer,
    Proposal,
    Proposer,
)
from serving.sampling import SamplingParams, process_logits, rejection_sample
from serving.stats import SpecStats
from serving.tree import greedy_path, node_depths, static_tree

log = logging.getLogger(__name__)

ProposerName = Literal["draft", "ngram", "none", "medusa", "hydra"]
PROPOSERS: tuple[ProposerName, ...] = ("draft", "ngram", "none", "medusa", "hydra")


@dataclass(frozen=True)
class Generation:
    """New tokens only (a stop token that ended generation is included, as HF generate does).

    top_ids, top_logprobs [T, K]: with generate(top_logprobs=K), the target's K most likely
    tokens and their log-probs (temperature 1, before any sampling processing) at each of the T
    output positions: the distributions the trainer distills from.
    hidden [T, H]: with generate(hidden_states=True), the target's final hidden state at the
    position whose logits gave each output token (what draft heads read).
    """

    token_ids: list[int]
    stats: SpecStats
    finish_reason: Literal["stop", "length"]
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


@dataclass(frozen=True)
class _Verified:
    """What one verification kept: the emitted tokens [a + 1] (a accepted drafts and the target's
    next), the target's logits [a + 1, V] and hidden states [a + 1, H] (when asked) that gave them."""

    drafted: int  # drafts proposed (a tree: its depth)
    emitted: torch.Tensor
    logits: torch.Tensor
    hidden: torch.Tensor | None


@dataclass(frozen=True)
class Step:
    """The tokens one decode step emitted (1 to k + 1); the last step also carries the Generation."""

    token_ids: list[int]
    generation: Generation | None = None


class SpecEngine:
    """Generates with a target model and a proposer; one request at a time (batch 1)."""

    def __init__(self, target: PreTrainedModel, proposer: Proposer, num_speculative_tokens: int = 4):
        if isinstance(num_speculative_tokens, bool) or not isinstance(num_speculative_tokens, int):
            raise ValueError(f"num_speculative_tokens must be an int, got {num_speculative_tokens!r}")
        if num_speculative_tokens < 0:
            raise ValueError(f"num_speculative_tokens (k) must be >= 0, got {num_speculative_tokens}")
        self.target = target
        self.proposer = proposer
        self.k = num_speculative_tokens
        self.device = target.device
        self.vocab_size = vocab_size(target)
        self.max_length = context_length(target)
        eos = target.generation_config.eos_token_id
        self.default_stop_ids = frozenset([eos] if isinstance(eos, int) else eos or [])

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
    ) -> SpecEngine:
        """Load a target (local directory or hub id) and a proposer.

        proposer defaults to "draft" when a draft is given and "none" otherwise. `tree`: for
        heads, the branching of a static tree (serving.tree.static_tree) verified in one forward
        for greedy requests; when the target cannot verify trees, chain mode, with the reason logged.
        """
        proposer = proposer or ("draft" if draft is not None else "none")
        if proposer not in PROPOSERS:
            raise ValueError(f"proposer must be one of {PROPOSERS}, got {proposer!r}")
        if (proposer == "draft") != (draft is not None):
            raise ValueError("a draft model is needed by proposer='draft' and used by no other proposer")
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        target_model = load_causal_lm(target, device, dtype)
        if proposer == "draft":
            draft_model = load_causal_lm(draft, device, dtype)
            if vocab_size(draft_model) != vocab_size(target_model):
                raise IncompatibleDraftError(
                    f"draft {draft!r} has a vocabulary of {vocab_size(draft_model)} tokens but target "
                    f"{target!r} has {vocab_size(target_model)}; they must share one tokenizer"
                )
            chosen: Proposer = DraftModelProposer(draft_model)
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
        return cls(target_model, chosen, num_speculative_tokens)

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
        """generate, one decode step at a time: the request is checked now (InvalidRequestError), and
        each iteration yields the tokens one step emitted; the last carries the Generation. Closing
        the iterator early abandons the request (a client that went away)."""
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
        prompt = self._check_prompt(prompt_ids, max_new_tokens)
        stop_ids = (
            self.default_stop_ids
            if stop_token_ids is None
            else frozenset(_ids(stop_token_ids, "stop_token_ids"))
        )
        if seed is not None and not _is_int(seed):
            raise InvalidRequestError(f"seed must be an integer or None, got {seed!r}")
        if not _is_int(top_logprobs) or not 0 <= top_logprobs <= self.vocab_size:
            raise InvalidRequestError(f"top_logprobs must be an integer in [0, {self.vocab_size}]")
        generator = torch.Generator(device=self.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        return self._decode(prompt, max_new_tokens, params, stop_ids, generator, top_logprobs, hidden_states)

    @torch.inference_mode()
    def _decode(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        params: SamplingParams,
        stop_ids: frozenset[int],
        generator: torch.Generator,
        top_logprobs: int,
        hidden_states: bool,
    ) -> Iterator[Step]:
        """The decode loop."""
        cache = DynamicCache(config=self.target.config)
        if prompt.shape[0] > 1:
            forward(self.target, prompt[:-1], cache, last_only=True)
        draft_state = self.proposer.new_state()
        wants_hidden = getattr(self.proposer, "wants_hidden", False)
        with_hidden = wants_hidden or hidden_states
        # The sequence lives in one buffer: tokens[:length] is emitted, drafts go right after it.
        tokens = torch.cat([prompt, prompt.new_empty(max_new_tokens)])  # [L + max_new_tokens]
        length, output, stats = prompt.shape[0], [], SpecStats()
        tops: list[torch.return_types.topk] = []  # per step: the target's top-K at each emitted position
        hiddens: list[torch.Tensor] = []  # per step: the target's hidden state at each emitted position

        def finish(new: list[int], reason: Literal["stop", "length"]) -> Step:
            n = len(output)
            top_ids = torch.cat([top.indices for top in tops])[:n] if top_logprobs else None
            top_values = torch.cat([top.values for top in tops])[:n] if top_logprobs else None
            hidden = torch.cat(hiddens)[:n] if hidden_states else None
            return Step(new, Generation(output, stats, reason, top_ids, top_values, hidden))

        while True:
            remaining = max_new_tokens - len(output)
            proposal = self.proposer.propose(
                draft_state, tokens[:length], min(self.k, remaining - 1), params, generator
            )
            if proposal.parents is None:
                verified = self._verify_chain(proposal, tokens, length, cache, params, generator, with_hidden)
            else:
                verified = self._verify_tree(proposal, tokens, length, cache, params)
            emitted, accepted = verified.emitted, verified.emitted.shape[0] - 1
            if wants_hidden:  # the state whose logits gave the last emitted token
                self.proposer.observe(draft_state, verified.hidden[-1])
            stats.record(verified.drafted, accepted)
            if top_logprobs:
                tops.append(torch.log_softmax(verified.logits.float(), dim=-1).topk(top_logprobs))
            if hidden_states:
                hiddens.append(verified.hidden)
            tokens[length : length + accepted + 1] = emitted
            length += accepted + 1
            new: list[int] = []
            for token in emitted.tolist():
                output.append(token)
                new.append(token)
                if token in stop_ids:
                    yield finish(new, "stop")
                    return
            if len(output) >= max_new_tokens:
                yield finish(new, "length")
                return
            yield Step(new)

    def _verify_chain(
        self,
        proposal: Proposal,
        tokens: torch.Tensor,
        length: int,
        cache: DynamicCache,
        params: SamplingParams,
        generator: torch.Generator,
        with_hidden: bool,
    ) -> _Verified:
        """One forward over the last emitted token and the k drafts after it, then the rejection
        sampler; the cache is cut back to what was kept."""
        drafted = proposal.tokens.shape[0]
        tokens[length : length + drafted] = proposal.tokens
        inputs = tokens[length - 1 : length + drafted]
        if with_hidden:  # heads draft from the target's hidden state: no pass of their own
            logits, hidden = forward_hidden(self.target, inputs, cache)  # [1+k, V], [1+k, H]
        else:
            logits, hidden = forward(self.target, inputs, cache), None  # [1+k, V]
        verification = rejection_sample(
            process_logits(logits, params).unsqueeze(0),  # [1, 1+k, V]
            proposal.tokens.unsqueeze(0),
            None if proposal.probs is None else proposal.probs.unsqueeze(0),
            generator,
        )
        accepted = int(verification.num_accepted[0])
        truncate_cache(cache, length + accepted)
        kept = slice(0, accepted + 1)
        return _Verified(
            drafted, verification.tokens[0, kept], logits[kept], None if hidden is None else hidden[kept]
        )

    def _verify_tree(
        self,
        proposal: Proposal,
        tokens: torch.Tensor,
        length: int,
        cache: DynamicCache,
        params: SamplingParams,
    ) -> _Verified:
        """One forward over the last emitted token and every tree node (serving.tree), then the
        greedy walk; the cache keeps the sequence and the accepted path."""
        if not params.greedy:
            raise RuntimeError("tree proposals are verified for greedy requests only")
        inputs = torch.cat([tokens[length - 1 : length], proposal.tokens])  # [1 + N]
        logits, hidden = forward_tree(self.target, inputs, cache, proposal.parents)  # [1+N, V], [1+N, H]
        argmax = logits.argmax(-1)
        path = greedy_path(proposal.parents, proposal.tokens.tolist(), argmax.tolist())
        nodes = torch.tensor(path, dtype=torch.long, device=inputs.device)
        keep_cache_positions(cache, torch.cat([torch.arange(length, device=inputs.device), length + nodes]))
        rows = torch.cat([nodes.new_zeros(1), 1 + nodes])  # the root and the path: each gave the next token
        return _Verified(max(node_depths(proposal.parents)), argmax[rows], logits[rows], hidden[rows])

    def _check_prompt(self, prompt_ids: Sequence[int] | torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Validate a request's prompt and length; return the prompt as ids [L] on the device."""
        if not _is_int(max_new_tokens) or max_new_tokens < 1:
            raise InvalidRequestError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if isinstance(prompt_ids, torch.Tensor):
            if prompt_ids.dim() != 1 or prompt_ids.dtype.is_floating_point or prompt_ids.dtype == torch.bool:
                raise InvalidRequestError("prompt_ids must be a 1-D tensor of integer token ids")
            ids = prompt_ids.to(self.device, torch.long)
        else:
            ids = torch.tensor(_ids(prompt_ids, "prompt_ids"), dtype=torch.long, device=self.device)
        if ids.shape[0] == 0:
            raise InvalidRequestError("prompt_ids is empty; at least one token is needed")
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise InvalidRequestError(f"prompt_ids must lie in [0, {self.vocab_size}) for this model")
        if self.max_length is not None and ids.shape[0] + max_new_tokens > self.max_length:
            raise InvalidRequestError(
                f"prompt ({ids.shape[0]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                f"model's context of {self.max_length} tokens"
            )
        return ids


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
    proposer.observe(state, torch.zeros(target.config.hidden_size, dtype=target.dtype, device=target.device))
    ids, greedy = torch.tensor(list(prompt), device=target.device), SamplingParams()
    proposer.propose(state, ids, k, greedy, None)  # warm-up
    runs = max(1, tokens // k)
    start = time.perf_counter()
    for _ in range(runs):
        proposer.propose(state, ids, k, greedy, None)
    per_token = (time.perf_counter() - start) / (runs * k)
    return per_token / decode_seconds_per_token(target, prompt, tokens)
