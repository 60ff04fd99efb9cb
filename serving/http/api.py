"""The OpenAI-compatible HTTP API: FastAPI routes over a serving replica.

`/v1/completions` and `/v1/chat/completions` (JSON, or SSE with `stream: true`: `data: {json}`
events ending with `data: [DONE]`, and a usage chunk with `stream_options.include_usage`),
`/v1/models`, `/health`, `/metrics` (Prometheus: every live replica's, see `serving.http.prometheus`),
`/alerts` (acceptance drift, see `store.drift`), `/dashboard` (see `serving.http.dashboard`),
and the admin routes of `serving.http.admin` when a token is set. Text is
tokenized here; the replica works in token ids. Each
response carries the request's speculative-decoding numbers and the draft version that served it
in an extra `metrics` field, as vLLM does. `metadata.domain` tags the request's trace, and the
response's `id` is the trace's request id.

Bad input gets a 4xx with an OpenAI-style body (`{"error": {"message", "type", "param",
"code"}}`), never a 500: malformed JSON or bytes, unknown fields of the wrong type, an unknown
model, max_tokens out of range, a negative temperature, an over-long prompt, too many logprobs.
A parameter that would change the output and is not supported (`UNSUPPORTED`: tools, n > 1, ...)
gets a 400 naming it; fields that change nothing (user, store, ...) are accepted. A full queue
answers 503. A client that disconnects mid-stream frees its slot at the next decode step.

Prompts: a completion's text gets the special tokens its tokenizer's config adds (BOS, for
most); chat messages (text, or arrays of text parts) go through the tokenizer's chat template
with the generation prompt; a tokenizer without a template gets "<role>: <content>" lines
followed by "assistant:". Log-probs are the target's own (temperature 1, before sampling
processing), the distribution traces log, in OpenAI's shapes for each endpoint.

Stop strings end the text at the first match and stop decoding; such a request, like any request
abandoned before its end, leaves no trace.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Literal

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import PreTrainedTokenizerBase

from serving.engine.protocol import Step, TokenLogprobs
from serving.errors import (
    EngineError,
    InvalidRequestError,
    RequestTimeoutError,
    ServerBusyError,
    StepFailedError,
)
from serving.http.admin import TrainerControl, admin_router
from serving.http.dashboard import dashboard_router
from serving.http.detokenize import IncrementalText
from serving.http.prometheus import render
from serving.replica import Finished, Replica
from serving.replica import Request as ReplicaRequest
from store.drift import DriftAlert, read_alerts
from store.load import read_metrics
from store.redis_server import read_restarts


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


MAX_LOGPROBS = 20  # the most top log-probs a request may ask for, unless configured otherwise


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """The fields both endpoints share. Fields this API has no use for (user, store, service_tier,
    ...) are accepted and ignored; those that would change the output are checked by `unsupported`."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name; it wins when both are given
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # an extension, as in vLLM
    n: int = 1
    seed: int | None = Field(None, ge=0, lt=2**63)  # torch takes a 64-bit seed
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    metadata: dict[str, str] | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionBody(Sampling):
    prompt: str | list[int]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0)  # the top log-probs per token, as a number
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatBody(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None


def unsupported(body: Sampling) -> str | None:
    """The first parameter set that this API would have to ignore to answer, if any: those change
    what a client gets back, so they are refused rather than silently dropped."""
    checks = {
        "n": body.n != 1,
        "logit_bias": bool(body.logit_bias),
        "presence_penalty": body.presence_penalty != 0.0,
        "frequency_penalty": body.frequency_penalty != 0.0,
    }
    if isinstance(body, CompletionBody):
        checks |= {"echo": body.echo, "suffix": body.suffix is not None, "best_of": (body.best_of or 1) > 1}
    if isinstance(body, ChatBody):
        plain_text = body.response_format in (None, {"type": "text"})
        checks |= {
            "tools": bool(body.tools), "tool_choice": body.tool_choice not in (None, "none"),
            "functions": bool(body.functions), "function_call": body.function_call not in (None, "none"),
            "response_format": not plain_text,
        }  # fmt: skip
    return next((name for name, used in checks.items() if used), None)


def requested_logprobs(body: Sampling, most: int) -> int | None:
    """How many top log-probs a request asks for per token (0: the chosen token's only), or None."""
    if isinstance(body, ChatBody):
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        wanted, param = (body.top_logprobs or 0) if body.logprobs else None, "top_logprobs"
    else:
        wanted, param = body.logprobs, "logprobs"
    if wanted is not None and wanted > most:
        raise APIError(400, f"{param} must be at most {most}, got {wanted}", param)
    return wanted


def error_body(message: str, param: str | None = None, code: str | None = None, status: int = 400) -> dict:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def create_app(
    replica: Replica,
    tokenizer: PreTrainedTokenizerBase,
    model_names: str | Sequence[str],
    admin_token: str | None = None,
    trainer: TrainerControl | None = None,
    max_logprobs: int = MAX_LOGPROBS,
) -> FastAPI:
    """The HTTP app for one replica serving the model under `model_names` (its id, then aliases);
    the admin routes only with a token."""
    names = (model_names,) if isinstance(model_names, str) else tuple(model_names)
    app = FastAPI(title="OSD Serve", version="0.1.0")
    context, config = replica.context, replica.config
    app.include_router(dashboard_router(
        replica.client, config.draft_name, config.domain, config.metrics, trainer, adapters=config.adapters
    ))  # fmt: skip
    if admin_token:
        app.include_router(
            admin_router(admin_token, replica.registry, config.draft_name, config.domain, trainer)
        )

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return JSONResponse(error_body(err.message, err.param, err.code, err.status), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(error_body(f"{param or 'body'}: {first.get('msg')}", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:  # e.g. undecodable bytes
        return JSONResponse(error_body(str(err.detail)), status_code=err.status_code, headers=err.headers)

    @app.get("/health")
    async def health():
        try:
            replica.check_health()
        except RuntimeError as err:
            return JSONResponse({"status": "error", "message": str(err)}, status_code=503)
        return {"status": "ok", **replica.status()}

    def standing_alerts() -> list[DriftAlert]:
        return read_alerts(replica.client, config.draft_name, config.metrics, adapters=config.adapters)

    @app.get("/metrics")
    def metrics() -> Response:  # sync: FastAPI runs it on a worker thread, off the event loop
        try:
            snapshots, alerts = read_metrics(replica.client), standing_alerts()
            restarts = read_restarts(replica.client)  # the embedded redis-server's, by `osd serve`
        except redis.RedisError:
            snapshots, alerts, restarts = {}, [], None  # this replica's own, below, still answer
        snapshots[replica.config.replica_id] = replica.metrics_snapshot()
        return Response(render(snapshots, alerts, restarts), media_type=CONTENT_TYPE_LATEST)

    @app.get("/alerts")
    def alerts() -> dict:
        try:
            standing = standing_alerts()
        except redis.RedisError as err:
            raise APIError(503, f"the metric store is unavailable: {err}", code="store_unavailable") from err
        return {"alerts": [a.to_json() for a in standing]}

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "owned_by": "osd-serve"} for name in names],
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        prompt = body.prompt if isinstance(body.prompt, list) else tokenizer.encode(body.prompt)
        return await respond(body, prompt, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody):
        return await respond(body, chat_prompt(tokenizer, body.messages), chat=True)

    async def respond(body: Sampling, prompt: list[int], chat: bool):
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        request = to_request(body, prompt, context, names, request_id, max_logprobs)
        logprobs = None if request.logprobs is None else LogprobsShape(chat, tokenizer, request.logprobs)
        pieces = decode_text(replica, request, tokenizer, stop_strings(body.stop))
        try:
            first = await anext(pieces)  # the request's own errors surface before any byte is sent
        except EngineError as err:
            raise failure(err) from err
        shape = Shape(chat, body.model, len(prompt), request.request_id, logprobs)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = shape.sse(first, pieces, include_usage)

            async def close() -> None:  # a coroutine function: Starlette runs any other in a thread
                await events.aclose()

            # A client that hangs up cancels the streaming, which leaves the events unclosed: closing
            # them after the response (the background task) ends the request at once, not at GC.
            return StreamingResponse(events, media_type="text/event-stream", background=BackgroundTask(close))
        try:
            whole = [first] + [piece async for piece in pieces]
        except EngineError as err:
            raise failure(err) from err
        return shape.whole(whole)

    return app


def failure(err: EngineError) -> APIError:
    """The HTTP answer to a request the replica failed: its fault (400), a full or stopped replica
    (503), its deadline (504), or a failed decode step (500, with the reason)."""
    for kind, status, code in (
        (InvalidRequestError, 400, None),
        (ServerBusyError, 503, "server_busy"),
        (RequestTimeoutError, 504, "request_timeout"),
        (StepFailedError, 500, "internal_error"),
    ):
        if isinstance(err, kind):
            return APIError(status, str(err), code=code)
    return APIError(500, str(err), code="internal_error")


def to_request(
    body: Sampling,
    prompt: list[int],
    context: int,
    names: Sequence[str],
    request_id: str,
    max_logprobs: int = MAX_LOGPROBS,
) -> ReplicaRequest:
    """Check what the engine does not know about (model, parameters, lengths) and build the
    replica's request, whose id (the response's, and its trace's) is `request_id`."""
    if body.model not in names:
        raise APIError(
            400, f"model {body.model!r} is not served here; try {names[0]!r}", "model", "model_not_found"
        )
    if (param := unsupported(body)) is not None:
        raise APIError(400, f"{param} is not supported by this server", param, "unsupported_parameter")
    if not prompt:
        raise APIError(400, "the prompt is empty", "prompt")
    stops = stop_strings(body.stop)
    if len(stops) > 4 or not all(stops):
        raise APIError(400, "stop takes up to 4 non-empty strings", "stop")
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = context - len(prompt) if body.new_tokens is None else body.new_tokens
    if max_tokens < 1:
        raise APIError(400, f"{param} must be >= 1, got {max_tokens}", param)
    if len(prompt) + max_tokens > context:
        message = f"prompt ({len(prompt)} tokens) plus {param} ({max_tokens}) exceed the context of {context}"
        raise APIError(400, message, param)
    logprobs = requested_logprobs(body, max_logprobs)
    domain = (body.metadata or {}).get("domain", "-")
    try:
        return ReplicaRequest(
            prompt, max_tokens, body.temperature, body.top_p, body.top_k, body.seed,
            domain=domain, request_id=request_id, logprobs=logprobs,
        )  # fmt: skip
    except InvalidRequestError as err:
        raise APIError(400, str(err), "metadata.domain") from err


def stop_strings(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[ChatMessage]) -> list[int]:
    """The prompt ids of a conversation: the chat template renders it, with the assistant's
    generation prompt, and its text is tokenized as is (a template writes its own BOS)."""
    turns = [{"role": m.role, "content": m.text} for m in messages]
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    else:
        text = "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant:"
    return tokenizer.encode(text, add_special_tokens=False)


@dataclass(frozen=True)
class Piece:
    """New text from one decode step; the last piece says why it ended."""

    text: str
    tokens: int  # completion tokens so far
    finish_reason: Literal["stop", "length"] | None = None
    finished: Finished | None = None  # the replica's account, when decoding ran to its end
    token_ids: tuple[int, ...] = ()  # the tokens this piece's text completes
    logprobs: TokenLogprobs | None = None  # theirs, when the request asked


async def decode_text(
    replica: Replica, request: ReplicaRequest, tokenizer: PreTrainedTokenizerBase, stops: list[str]
) -> AsyncIterator[Piece]:
    """The replica's steps as text, decoded incrementally. A stop string ends the text before it
    and stops decoding; text ending inside a multi-byte character is held back until the character
    completes, and so are its tokens and their log-probs (a piece carries log-probs only when the
    request asked for them: the trace's come with the replica's Finished)."""
    stream = IncrementalText(tokenizer)
    text, sent = "", 0
    held: list[Step] = []  # steps whose text is not out yet
    wanted = request.logprobs is not None

    def piece(text: str, reason: Literal["stop", "length"] | None = None, finished=None) -> Piece:
        tokens = tuple(t for step in held for t in step.token_ids)
        logprobs = [step.logprobs for step in held if step.logprobs is not None] if wanted else []
        held.clear()
        return Piece(
            text, len(stream.ids), reason, finished, tokens, TokenLogprobs.cat(logprobs) if logprobs else None
        )

    async with aclosing(replica.stream(request)) as events:  # closed, it leaves the replica at once
        async for event in events:
            if isinstance(event, Finished):
                text += stream.add((), final=True)
                yield piece(text[sent:], event.generation.finish_reason, event)
                return
            held.append(event)
            new = stream.add(event.token_ids)
            if new is None:
                continue
            text += new
            found = [i for i in (text.find(stop, max(0, sent - len(stop))) for stop in stops) if i >= 0]
            if found:
                yield piece(text[sent : min(found)], "stop")
                return  # leaving the replica's stream stops decoding
            yield piece(text[sent:])
            sent = len(text)


class LogprobsShape:
    """OpenAI's `logprobs` object for some of a response's tokens: for chat, `content` entries
    (token, logprob, bytes, top_logprobs); for completions, the parallel lists tokens,
    token_logprobs, top_logprobs (dicts) and text_offset. `top` is the number of top log-probs."""

    def __init__(self, chat: bool, tokenizer: PreTrainedTokenizerBase, top: int):
        self.chat, self.tokenizer, self.top = chat, tokenizer, top
        self.offset = 0  # completions: characters of text before the next token

    def render(self, token_ids: Sequence[int], logprobs: TokenLogprobs | None) -> dict | None:
        if logprobs is None:
            return None
        text = self.tokenizer.decode
        tops = [
            [(text([i]), lp) for i, lp in zip(ids[: self.top], values[: self.top], strict=True)]
            for ids, values in zip(logprobs.top_ids.tolist(), logprobs.top_values.tolist(), strict=True)
        ]
        tokens, chosen = [text([i]) for i in token_ids], logprobs.chosen.tolist()
        if self.chat:

            def entry(token: str, logprob: float) -> dict:
                return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

            content = [
                entry(token, lp) | {"top_logprobs": [entry(t, v) for t, v in top]}
                for token, lp, top in zip(tokens, chosen, tops, strict=True)
            ]
            return {"content": content, "refusal": None}
        offsets = []
        for token in tokens:
            offsets.append(self.offset)
            self.offset += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": chosen,
            "top_logprobs": [dict(top) for top in tops] if self.top else None,
            "text_offset": offsets,
        }


class Shape:
    """OpenAI response bodies for one request: whole, or as SSE chunks."""

    def __init__(
        self, chat: bool, model: str, prompt_tokens: int, request_id: str, logprobs: LogprobsShape | None
    ):
        self.chat, self.model, self.prompt_tokens, self.id = chat, model, prompt_tokens, request_id
        self.logprobs = logprobs
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list[dict]) -> dict:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def usage(self, tokens: int) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": tokens,
            "total_tokens": self.prompt_tokens + tokens,
        }

    @staticmethod
    def metrics(piece: Piece) -> dict | None:
        if piece.finished is None:
            return None
        stats = piece.finished.generation.stats
        return {
            "draft_version": piece.finished.draft_version,
            "spec_steps": stats.steps,
            "spec_drafted": stats.drafted,
            "spec_accepted": stats.accepted,
            "acceptance_rate": stats.acceptance_rate,
            "mean_accepted_length": stats.mean_accepted_length,
            "proposers": stats.by_proposer,
            "time_to_first_token": piece.finished.ttft_seconds,
            "seconds": piece.finished.seconds,
        }

    def _logprobs(self, pieces: Sequence[Piece]) -> dict | None:
        parts = [p.logprobs for p in pieces if p.logprobs is not None]
        if self.logprobs is None or not parts:
            return None
        return self.logprobs.render([t for p in pieces for t in p.token_ids], TokenLogprobs.cat(parts))

    def whole(self, pieces: Sequence[Piece]) -> dict:
        text, last, logprobs = "".join(p.text for p in pieces), pieces[-1], self._logprobs(pieces)
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": last.finish_reason,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": last.finish_reason}
        body = self._envelope("chat.completion" if self.chat else "text_completion", [choice])
        return body | {"usage": self.usage(last.tokens), "metrics": self.metrics(last)}

    def chunk(self, piece: Piece | None, finish_reason: str | None, role: bool = False) -> dict:
        text = None if piece is None else piece.text
        logprobs = None if piece is None else self._logprobs([piece])
        if self.chat:
            delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        return self._envelope(self.chunk_object, [choice])

    async def sse(self, first: Piece, rest: AsyncIterator[Piece], include_usage: bool) -> AsyncIterator[str]:
        """`data: {json}` events: the text as it comes, the finish, usage if asked, then [DONE]."""

        def event(body: dict) -> str:
            return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"

        async with aclosing(rest):  # closing the events closes the request's pieces
            piece, role = first, self.chat
            while True:
                if piece.text or piece.token_ids or role:
                    yield event(self.chunk(piece, None, role))
                    role = False
                if piece.finish_reason is not None:
                    yield event(self.chunk(None, piece.finish_reason) | {"metrics": self.metrics(piece)})
                    break
                try:
                    piece = await anext(rest)
                except EngineError as err:  # the status is sent: the error comes as an event, as OpenAI's do
                    answer = failure(err)
                    yield event(error_body(answer.message, code=answer.code, status=answer.status))
                    break
            if include_usage:
                yield event(self._envelope(self.chunk_object, []) | {"usage": self.usage(piece.tokens)})
            yield "data: [DONE]\n\n"
