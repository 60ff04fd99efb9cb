"""The demo's clients: a workload sent over HTTP with the openai client, as users send it.

`concurrency` client threads take the workload's requests in order; each sends one request
(greedy or sampled as the request says, its domain in `metadata`; to `/v1/chat/completions` as
messages when the request is a chat request, else to `/v1/completions` as token ids), waits for
the whole response, records what it saw (`Served`, the same fields for both endpoints), then
thinks for `think_seconds` before its next one. The think time is the idle time real traffic has;
the trainer trains in it. Requests are never retried, so every failure is counted. With a
`Lockstep`, requests go in windows instead: a window's requests start once every request of the
one before has ended and the work between windows is done.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import openai

from deploy.demo.workloads import Request, chat_messages


@dataclass(frozen=True)
class Served:
    """One request as the client saw it. Times are unix seconds; latency is end-to-end."""

    index: int  # position in the workload
    phase: int
    domain: str
    prompt: tuple[int, ...]  # the workload's prompt ids (a chat request sends their text as a message)
    start: float
    end: float
    error: str | None = None
    draft_version: str | None = None
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0
    ttft: float | None = None  # as the server measured it
    chat: bool = False  # sent through /v1/chat/completions
    finish_reason: str | None = None  # "stop": an EOS or stop string came before max_tokens

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def latency(self) -> float:
        return self.end - self.start


def send(client: openai.OpenAI, model: str, index: int, request: Request, tagged: bool = True) -> Served:
    """One request, a chat or a completion as `request.chat` says, naming its domain when `tagged`;
    a failure is returned as a `Served` with its error, never raised."""
    start = time.time()
    prompt = request.prompt
    fields = dict(index=index, phase=request.phase, domain=prompt.domain, prompt=prompt.token_ids,
                  chat=request.chat)  # fmt: skip
    sampling = dict(
        model=model,
        max_tokens=request.max_new_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
        extra_body={"metadata": {"domain": prompt.domain}} if tagged else None,
    )
    try:
        if request.chat:
            response = client.chat.completions.create(messages=chat_messages(prompt), **sampling)
        else:
            response = client.completions.create(prompt=list(prompt.token_ids), **sampling)
    except openai.OpenAIError as err:
        return Served(**fields, start=start, end=time.time(), error=f"{type(err).__name__}: {err}")
    metrics = (response.model_extra or {}).get("metrics") or {}
    return Served(
        **fields,
        start=start,
        end=time.time(),
        draft_version=metrics.get("draft_version"),
        drafted=metrics.get("spec_drafted", 0),
        accepted=metrics.get("spec_accepted", 0),
        tokens=response.usage.completion_tokens if response.usage else 0,
        ttft=metrics.get("time_to_first_token"),
        finish_reason=response.choices[0].finish_reason if response.choices else None,
    )


class Lockstep:
    """Windows of `size` requests, one after the other: after the last request of a window ends,
    `between()` runs (on that client's thread) before any request of the next window starts."""

    def __init__(self, size: int, between: Callable[[], None]):
        if size < 1:
            raise ValueError(f"a window needs at least one request, got {size}")
        self.size, self.between = size, between
        self._ended = 0  # requests ended
        self._open = 1  # windows whose requests may start
        self._cond = threading.Condition()

    def admit(self, index: int, stop: threading.Event) -> bool:
        """Wait until request `index` may start; False when `stop` was set meanwhile."""
        with self._cond:
            while index // self.size >= self._open:
                if stop.is_set():
                    return False
                self._cond.wait(0.1)
        return True

    def ended(self) -> None:
        """A request ended, served or failed; the one that closes a window runs `between`."""
        with self._cond:
            self._ended += 1
            closes = self._ended % self.size == 0
        if closes:
            try:
                self.between()
            finally:  # whatever happened between, the next window goes
                with self._cond:
                    self._open += 1
                    self._cond.notify_all()


class Clients:
    """The client threads, started by `start`; `stop` makes them finish their current request and
    exit. `on_served` is called (from the client threads) with each result."""

    def __init__(
        self,
        base_url: str,
        model: str,
        requests: Iterable[Request],
        concurrency: int,
        think_seconds: float,
        on_served: Callable[[Served], None],
        untagged_every: int = 0,  # every n-th request names no domain (the router's case); 0: none
        lockstep: Lockstep | None = None,
    ):
        if concurrency < 1 or think_seconds < 0:
            raise ValueError(f"need concurrency >= 1 and think_seconds >= 0: {concurrency}, {think_seconds}")
        self.client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="demo", max_retries=0, timeout=300)
        self.model, self.think_seconds, self.on_served = model, think_seconds, on_served
        self.untagged_every, self.lockstep = untagged_every, lockstep
        self._queue = iter(enumerate(requests))
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._threads = [
            threading.Thread(target=self._run, name=f"client-{i}", daemon=True) for i in range(concurrency)
        ]

    def start(self) -> Clients:
        for thread in self._threads:
            thread.start()
        return self

    def _next(self) -> tuple[int, Request] | None:
        with self._lock:
            return next(self._queue, None)

    def _run(self) -> None:
        while not self._stop.is_set() and (item := self._next()) is not None:
            index, request = item
            if self.lockstep is not None and not self.lockstep.admit(index, self._stop):
                return
            tagged = not self.untagged_every or index % self.untagged_every != 0
            self.on_served(send(self.client, self.model, index, request, tagged))
            if self.lockstep is not None:
                self.lockstep.ended()
            self._stop.wait(self.think_seconds)

    @property
    def running(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
