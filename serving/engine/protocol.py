"""The boundary between a replica and its engine: what a replica asks (`EngineRequest`), what an
engine gives back (`Step`s, the last carrying the `Generation`), and what a replica needs of any
engine (`Engine`). serving.replica knows only this module; serving.engine.core serves the HF
engine behind it, serving.engine.vllm vLLM.

An engine decodes the requests submitted to it with continuous batching and hands what each step
emitted to the replica's `Deliver` callback, in one batch per step: (request id, Step), or
(request id, exception) for a request that failed (InvalidRequestError for a bad request,
StepFailedError for a failed step, ServerBusyError once the engine has stopped). A request leaves
the engine with its last Step or its exception, or when the replica abandons it. Draft versions
are checked by `load_draft` (refused with IncompatibleDraftError or ValueError) and served from a
later step on, to new requests and to those in flight on that draft.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from prometheus_client.core import Metric

from serving.engine.stats import SpecStats
from store.registry import ALL_DOMAINS, DraftVersion


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
class TokenLogprobs:
    """The target's log-probs (temperature 1, before any sampling processing) at n emitted
    positions: the emitted token's [n], and the K most likely tokens' ids and values [n, K]."""

    chosen: torch.Tensor
    top_ids: torch.Tensor
    top_values: torch.Tensor

    def __getitem__(self, rows: slice) -> TokenLogprobs:
        return TokenLogprobs(self.chosen[rows], self.top_ids[rows], self.top_values[rows])

    @staticmethod
    def cat(parts: Sequence[TokenLogprobs]) -> TokenLogprobs:
        return TokenLogprobs(
            *(torch.cat([getattr(p, f) for p in parts]) for f in ("chosen", "top_ids", "top_values"))
        )


@dataclass(frozen=True)
class Step:
    """The tokens one decode step emitted for a sequence (1 to k + 1), with their log-probs when
    the request asked for top_logprobs; its last step also carries the Generation."""

    token_ids: list[int]
    generation: Generation | None = None
    logprobs: TokenLogprobs | None = None
    version: str = ""  # the draft version that drafted them (an engine's label; "" from a bare SpecEngine)


@dataclass(frozen=True)
class EngineRequest:
    """One request, in token ids, as a replica submits it to an engine."""

    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: list[int] | None = None  # None: the target's EOS
    top_logprobs: int = 0  # the target's top-K at each output position (for traces and logprobs)
    hidden_states: bool = False  # the target's final hidden state at each output position (for heads)
    domain: str = ALL_DOMAINS  # as served: its adapter's, where the engine has one, and its suffix index's


Deliver = Callable[[list[tuple[str, Step | BaseException]]], None]


@dataclass
class Swaps:
    """The draft versions an engine has served since it started, and what the last one cost."""

    count: int = 0
    last_seconds: float | None = None  # from the load's start to serving it
    last_pause_seconds: float | None = None  # serving stopped for it (the copy in place, between two steps)

    def record(self, seconds: float, pause_seconds: float) -> None:
        """A version served `seconds` after its load began, decoding stopped for `pause_seconds`."""
        self.count += 1
        self.last_seconds, self.last_pause_seconds = seconds, pause_seconds

    def status(self) -> dict:
        """As /health and /metrics show it."""
        return {
            "swaps": self.count,
            "last_swap_seconds": self.last_seconds,
            "last_swap_pause_seconds": self.last_pause_seconds,
        }


class Engine(Protocol):
    """What a replica needs of an engine. `submit`, `abandon`, `remember` and `load_draft` may be
    called from any thread; `Deliver` is called on the engine's own thread."""

    max_length: int  # prompt plus output, per request
    k: int  # the most tokens drafted per step
    cost_ratio: float | None  # c of the speedup model: a drafted token's cost over a target step
    serves: Literal["draft", "heads"] | None  # the kind of registry version it loads; None: none

    def start(self, deliver: Deliver) -> None:
        """Begin decoding; from now on, what requests emit goes to `deliver`."""

    def submit(self, request: EngineRequest) -> None:
        """Queue a request; it is admitted when the batch has room."""

    def abandon(self, request_id: str) -> None:
        """Stop decoding a request (its caller left or ran out of time); a no-op once it has left."""

    def remember(self, domain: str, token_ids: list[int]) -> None:
        """A request served elsewhere (prompt and output, from another replica's trace), for a
        proposer that drafts from served text (suffix speculation); the others ignore it."""

    def load_draft(self, meta: DraftVersion, weights: Mapping[str, torch.Tensor]) -> None:
        """Check a registry version's weights (as the registry stores them: a LoRA adapter, whole
        draft weights or heads) and serve it to meta.domain's requests from a later step on."""

    def versions(self) -> dict[str, str]:
        """The version label each draft serves, by domain (ALL_DOMAINS: the shared draft)."""

    def running(self) -> int:
        """Requests in the batch now."""

    def status(self) -> dict:
        """Swaps and what they cost, for /health (`Swaps.status`)."""

    def metrics(self) -> list[Metric]:
        """Prometheus metrics the engine counts itself (vLLM's spec-decode counters), collected;
        the replica counts every engine's requests by draft version and domain."""

    def check_health(self) -> None:
        """Raise RuntimeError, saying why, once the engine can no longer decode."""

    def close(self, timeout: float) -> None:
        """Finish what was submitted, then stop."""
