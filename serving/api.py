"""The OpenAI-compatible HTTP API: FastAPI routes over a serving replica.

`/v1/completions` and `/v1/chat/completions` (JSON, or SSE with `stream: true`: `data: {json}`
events ending with `data: [DONE]`, and a usage chunk with `stream_options.include_usage`),
`/v1/models`, `/health`, `/metrics` (Prometheus: every live replica's, see `serving.prometheus`),
`/alerts` (acceptance drift, see `store.drift`), `/dashboard` (see `serving.dashboard`),
and the admin routes of `serving.admin` when a token is set. Text is
tokenized here; the replica works in token ids. Each
response carries the request's speculative-decoding numbers and the draft version that served it
in an extra `metrics` field, as vLLM does. `metadata.domain` tags the request's trace, and the
response's `id` is the trace's request id.

Bad input gets a 4xx with an OpenAI-style body (`{"error": {"message", "type", "param",
"code"}}`), never a 500: malformed JSON or bytes, unknown fields of the wrong type, an unknown
model, n > 1, max_tokens out of range, a negative temperature, an over-long prompt. A full queue
answers 503. A client that disconnects mid-stream frees its slot at the next decode step.

Stop strings end the text at the first match and stop decoding; such a request, like any request
abandoned before its end, leaves no trace. Chat prompts use the tokenizer's chat template; a
tokenizer without one gets "<role>: <content>" lines followed by "assistant:".
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import PreTrainedTokenizerBase

from serving.admin import TrainerControl, admin_router
from serving.dashboard import dashboard_router
from serving.errors import InvalidRequestError
from serving.prometheus import render
from serving.server import Finished, Replica, ServerBusyError
from serving.server import Request as ReplicaRequest
from store.drift import DriftAlert, read_alerts
from store.load import read_metrics


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, ...)

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # an extension, as in vLLM
    n: int = 1
    seed: int | None = Field(None, ge=0, lt=2**63)  # torch takes a 64-bit seed
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    metadata: dict[str, str] | None = None


class CompletionBody(Sampling):
    prompt: str | list[int]
    max_tokens: int | None = 16  # OpenAI's default for completions


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatBody(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


def error_body(message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


def create_app(
    replica: Replica,
    tokenizer: PreTrainedTokenizerBase,
    model_name: str,
    admin_token: str | None = None,
    trainer: TrainerControl | None = None,
) -> FastAPI:
    """The HTTP app for one replica serving `model_name`; the admin routes only with a token."""
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
        return JSONResponse(error_body(err.message, err.param, err.code), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(error_body(f"{param or 'body'}: {first.get('msg')}", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:  # e.g. undecodable bytes
        return JSONResponse(error_body(str(err.detail)), status_code=err.status_code, headers=err.headers)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", **replica.status()}

    def standing_alerts() -> list[DriftAlert]:
        return read_alerts(replica.client, config.draft_name, config.metrics, adapters=config.adapters)

    @app.get("/metrics")
    def metrics() -> Response:  # sync: FastAPI runs it on a worker thread, off the event loop
        try:
            snapshots, alerts = read_metrics(replica.client), standing_alerts()
        except redis.RedisError:
            snapshots, alerts = {}, []  # this replica's own, below, still answer
        snapshots[replica.config.replica_id] = replica.metrics_snapshot()
        return Response(render(snapshots, alerts), media_type=CONTENT_TYPE_LATEST)

    @app.get("/alerts")
    def alerts() -> dict:
        try:
            standing = standing_alerts()
        except redis.RedisError as err:
            raise APIError(503, f"the metric store is unavailable: {err}", code="store_unavailable") from err
        return {"alerts": [a.to_json() for a in standing]}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "osd-serve"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        prompt = (
            body.prompt
            if isinstance(body.prompt, list)
            else tokenizer.encode(body.prompt, add_special_tokens=False)
        )
        return await respond(body, prompt, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody):
        return await respond(body, chat_prompt(tokenizer, body.messages), chat=True)

    async def respond(body: Sampling, prompt: list[int], chat: bool):
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        request = to_request(body, prompt, context, model_name, request_id)
        pieces = decode_text(replica, request, tokenizer, stop_strings(body.stop))
        try:
            first = await anext(pieces)  # the request's own errors surface before any byte is sent
        except InvalidRequestError as err:
            raise APIError(400, str(err)) from err
        except ServerBusyError as err:
            raise APIError(503, str(err), code="server_busy") from err
        shape = Shape(chat, model_name, len(prompt), request.request_id)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(shape.sse(first, pieces, include_usage), media_type="text/event-stream")
        text, last = first.text, first
        async for last in pieces:
            text += last.text
        return shape.whole(text, last)

    return app


def to_request(
    body: Sampling, prompt: list[int], context: int, model_name: str, request_id: str
) -> ReplicaRequest:
    """Check what the engine does not know about (model, n, lengths) and build the replica's request,
    whose id (the response's, and its trace's) is `request_id`."""
    if body.model != model_name:
        raise APIError(
            400, f"model {body.model!r} is not served here; try {model_name!r}", "model", "model_not_found"
        )
    if body.n != 1:
        raise APIError(400, "only n=1 is supported", "n")
    if not prompt:
        raise APIError(400, "the prompt is empty", "prompt")
    stops = stop_strings(body.stop)
    if len(stops) > 4 or not all(stops):
        raise APIError(400, "stop takes up to 4 non-empty strings", "stop")
    max_tokens = context - len(prompt) if body.max_tokens is None else body.max_tokens
    if max_tokens < 1:
        raise APIError(400, f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")
    if len(prompt) + max_tokens > context:
        message = (
            f"prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) exceed the context of {context}"
        )
        raise APIError(400, message, "max_tokens")
    domain = (body.metadata or {}).get("domain", "-")
    try:
        return ReplicaRequest(
            prompt, max_tokens, body.temperature, body.top_p, body.top_k, body.seed,
            domain=domain, request_id=request_id,
        )  # fmt: skip
    except InvalidRequestError as err:
        raise APIError(400, str(err), "metadata.domain") from err


def stop_strings(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[ChatMessage]) -> list[int]:
    turns = [{"role": m.role, "content": m.content} for m in messages]
    if tokenizer.chat_template:
        return list(tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True))
    text = "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant:"
    return tokenizer.encode(text, add_special_tokens=False)


@dataclass(frozen=True)
class Piece:
    """New text from one decode step; the last piece says why it ended."""

    text: str
    tokens: int  # completion tokens so far
    finish_reason: Literal["stop", "length"] | None = None
    finished: Finished | None = None  # the replica's account, when decoding ran to its end


async def decode_text(
    replica: Replica, request: ReplicaRequest, tokenizer: PreTrainedTokenizerBase, stops: list[str]
) -> AsyncIterator[Piece]:
    """The replica's steps as text. A stop string ends the text before it and stops decoding; text
    ending inside a multi-byte character is held back until the character completes."""
    ids: list[int] = []
    sent = 0
    async for event in replica.stream(request):
        if isinstance(event, Finished):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            yield Piece(text[sent:], len(ids), event.generation.finish_reason, event)
            return
        ids += event.token_ids
        text = tokenizer.decode(ids, skip_special_tokens=True)
        found = [i for i in (text.find(stop, max(0, sent - len(stop))) for stop in stops) if i >= 0]
        if found:
            yield Piece(text[sent : min(found)], len(ids), "stop")
            return  # leaving the replica's stream stops decoding
        if not text.endswith("\ufffd"):
            yield Piece(text[sent:], len(ids))
            sent = len(text)


class Shape:
    """OpenAI response bodies for one request: whole, or as SSE chunks."""

    def __init__(self, chat: bool, model: str, prompt_tokens: int, request_id: str):
        self.chat, self.model, self.prompt_tokens, self.id = chat, model, prompt_tokens, request_id
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
            "time_to_first_token": piece.finished.ttft_seconds,
            "seconds": piece.finished.seconds,
        }

    def whole(self, text: str, last: Piece) -> dict:
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": last.finish_reason,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason}
        body = self._envelope("chat.completion" if self.chat else "text_completion", [choice])
        return body | {"usage": self.usage(last.tokens), "metrics": self.metrics(last)}

    def chunk(self, text: str | None, finish_reason: str | None, role: bool = False) -> dict:
        if self.chat:
            delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return self._envelope(self.chunk_object, [choice])

    async def sse(self, first: Piece, rest: AsyncIterator[Piece], include_usage: bool) -> AsyncIterator[str]:
        """`data: {json}` events: the text as it comes, the finish, usage if asked, then [DONE]."""

        def event(body: dict) -> str:
            return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"

        piece, role = first, self.chat
        while True:
            if piece.text or role:
                yield event(self.chunk(piece.text, None, role))
                role = False
            if piece.finish_reason is not None:
                yield event(self.chunk(None, piece.finish_reason) | {"metrics": self.metrics(piece)})
                break
            piece = await anext(rest)
        if include_usage:
            yield event(self._envelope(self.chunk_object, []) | {"usage": self.usage(piece.tokens)})
        yield "data: [DONE]\n\n"
