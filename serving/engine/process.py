"""The HF engine in a process of its own, as vLLM's EngineCore runs: `EngineProcess` is the replica's
side of it (an Engine, serving.engine.protocol), and `serve_engine` the child's, which serves an
HFEngine (serving.engine.core). The decode loop then never waits for the GIL of the process that
handles HTTP, streams text and writes traces.

They talk over a pipe, in msgpack frames; tensors travel as raw bytes with their dtype and shape,
draft weights in a safetensors file the replica writes for the child, and nothing is ever
unpickled. The replica sends submits, abandons, draft loads (answered: accepted, or refused with
the error the engine raised), `start` and `close`; the child sends each step's batch of Steps, and
with it and whenever it changes, the engine's state (requests running, versions served, swaps,
health), which `running`, `versions`, `status` and `check_health` read without a round trip.

The child ends when the replica closes it, or when the pipe breaks (the replica's process is gone);
if the child dies, every request it held fails at once (ServerBusyError) and check_health says why.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import multiprocessing
import shutil
import tempfile
import threading
from collections.abc import Mapping
from concurrent.futures import Future
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import msgpack
import torch
from safetensors.torch import load_file, save_file

from serving import errors
from serving.engine.protocol import Deliver, EngineRequest, Generation, Step, TokenLogprobs
from serving.engine.stats import SpecStats
from serving.engine.versions import unshared
from serving.errors import ServerBusyError
from store.registry import DraftVersion

log = logging.getLogger(__name__)

STATE_SECONDS = 0.1  # an idle child reports a changed state (an installed version, a left request) this often
START_SECONDS = 600.0  # loading and timing the models
LOAD_SECONDS = 600.0  # merging and checking a draft version
ERRORS = {
    cls.__name__: cls
    for cls in (*vars(errors).values(), ValueError, KeyError, TypeError, RuntimeError, OSError)
    if isinstance(cls, type) and issubclass(cls, Exception)
}  # what crosses the pipe as itself; anything else arrives as a RuntimeError


# The wire: pure functions, each a pair.
def pack_tensor(tensor: torch.Tensor) -> dict:
    tensor = tensor.detach().to("cpu").contiguous()
    raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
    return {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape), "data": raw}


def unpack_tensor(packed: dict) -> torch.Tensor:
    dtype = getattr(torch, packed["dtype"])
    if not packed["data"]:
        return torch.empty(packed["shape"], dtype=dtype)
    return torch.frombuffer(bytearray(packed["data"]), dtype=torch.uint8).view(dtype).reshape(packed["shape"])


def _maybe(value: Any, pack) -> Any:
    return None if value is None else pack(value)


def pack_step(step: Step) -> dict:
    logprobs, generation = step.logprobs, step.generation
    return {
        "token_ids": step.token_ids,
        "version": step.version,
        "logprobs": _maybe(logprobs, lambda p: [pack_tensor(t) for t in (p.chosen, p.top_ids, p.top_values)]),
        "generation": _maybe(generation, lambda g: {
            "token_ids": g.token_ids,
            "stats": dataclasses.asdict(g.stats),
            "finish_reason": g.finish_reason,
            **{name: _maybe(getattr(g, name), pack_tensor) for name in ("top_ids", "top_logprobs", "hidden")},
        }),
    }  # fmt: skip


def unpack_step(packed: dict) -> Step:
    logprobs, generation = packed["logprobs"], packed["generation"]
    if generation is not None:
        tensors = {n: _maybe(generation[n], unpack_tensor) for n in ("top_ids", "top_logprobs", "hidden")}
        generation = Generation(
            generation["token_ids"], SpecStats(**generation["stats"]), generation["finish_reason"], **tensors
        )
    return Step(
        packed["token_ids"],
        generation,
        _maybe(logprobs, lambda parts: TokenLogprobs(*map(unpack_tensor, parts))),
        packed["version"],
    )


def pack_error(err: BaseException) -> dict:
    message = err.args[0] if len(err.args) == 1 and isinstance(err.args[0], str) else str(err)
    return {"type": type(err).__name__, "message": message}  # KeyError's str() would quote its key


def unpack_error(packed: dict) -> Exception:
    return ERRORS.get(packed["type"], RuntimeError)(packed["message"])


def pack(*message: Any) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(frame: bytes) -> list:
    return msgpack.unpackb(frame, raw=False)


# The child's side.
def serve_engine(conn: Connection, arguments: bytes) -> None:
    """The engine process's main: build the HFEngine that `arguments` (packed: its keyword
    arguments, torch threads and log level) describe, then answer the replica until it closes
    the engine or the pipe breaks."""
    from serving.engine.core import HFEngine  # the child loads the models; the replica's process never does

    settings = unpack(arguments)[0]
    torch.set_num_threads(settings["threads"])
    logging.basicConfig(level=settings["log_level"], format="%(levelname)s engine %(name)s: %(message)s")
    sending = threading.Lock()
    try:
        kwargs = settings["engine"]
        if kwargs.get("heads_tree"):
            kwargs["heads_tree"] = tuple(kwargs["heads_tree"])  # msgpack gives lists
        engine = HFEngine(**kwargs)
    except Exception as err:
        conn.send_bytes(pack("failed", None, pack_error(err)))
        return

    def state() -> dict:
        try:
            engine.check_health()
            broken = None
        except RuntimeError as err:
            broken = str(err)
        return {
            "running": engine.running(), "versions": engine.versions(), "status": engine.status(),
            "broken": broken,
        }  # fmt: skip

    reported: list[dict] = [{}]  # the state the replica was last told

    def send(kind: str, *body: Any) -> None:
        """Send a message with the state as it is now."""
        with sending:
            reported[0] = state()
            conn.send_bytes(pack(kind, reported[0], *body))

    def deliver(events: list[tuple[str, Step | BaseException]]) -> None:
        send("steps", [
            [rid, "error", pack_error(e)] if isinstance(e, BaseException) else [rid, "step", pack_step(e)]
            for rid, e in events
        ])  # fmt: skip

    def load(call: int, meta: dict, path: str) -> None:
        """Check and stage a draft version; answer with None, or the error that refused it."""
        try:
            engine.load_draft(DraftVersion(**meta), load_file(path))
            send("reply", call, None)
        except Exception as err:
            send("reply", call, pack_error(err))

    send("ready", {
        "max_length": engine.max_length, "k": engine.k, "cost_ratio": engine.cost_ratio,
        "serves": engine.serves, "device": str(engine.device),
    })  # fmt: skip
    try:
        while True:
            if state() != reported[0]:  # changed between steps: a version installed, a request left
                send("state")
            if not conn.poll(STATE_SECONDS):
                continue
            kind, *body = unpack(conn.recv_bytes())
            if kind == "submit":
                engine.submit(EngineRequest(**body[0]))
            elif kind == "abandon":
                engine.abandon(body[0])
            elif kind == "remember":
                engine.remember(*body)
            elif kind == "load":  # merged and checked on a thread of its own: submits go on meanwhile
                threading.Thread(target=load, args=body, name="load-draft", daemon=True).start()
            elif kind == "start":
                engine.start(deliver)
            elif kind == "close":
                engine.close(body[0])
                send("closed")
                return
    except (EOFError, OSError):  # the replica's process is gone: stop at once
        engine.close(0.0)


# The replica's side.
class EngineProcess:
    """An HFEngine in a child process, behind the Engine protocol (see the module docstring)."""

    def __init__(self, engine_args: dict, start_timeout: float = START_SECONDS):
        """Start the child and wait until its engine has loaded its models (its error, re-raised,
        if it could not)."""
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked threads or CUDA state
        self._conn, child_conn = context.Pipe()
        settings = {
            "engine": engine_args, "threads": torch.get_num_threads(), "log_level": logging.getLogger().level,
        }  # fmt: skip
        self._process = context.Process(
            target=serve_engine, args=(child_conn, pack(settings)), name="osd-engine", daemon=True
        )
        self._process.start()
        child_conn.close()  # the child's end lives in the child only: its exit breaks the pipe
        try:
            kind, self._state, *body = self._first_message(start_timeout)
            if kind == "failed":
                raise unpack_error(body[0])
        except BaseException:
            self._process.join(10)
            if self._process.is_alive():
                self._process.kill()
            self._conn.close()
            raise
        ready = body[0]
        self.max_length, self.k, self.cost_ratio = ready["max_length"], ready["k"], ready["cost_ratio"]
        self.serves, self.device = ready["serves"], torch.device(ready["device"])
        self._dir = Path(tempfile.mkdtemp(prefix="osd-engine-"))  # draft versions, for the child to read
        self._sending = threading.Lock()
        self._deliver: Deliver = lambda events: None
        self._outstanding: set[str] = set()  # submitted, not yet left
        self._calls: dict[int, Future] = {}
        self._call_ids = itertools.count()
        self._closing = False
        self._broken: str | None = None
        self._reader = threading.Thread(target=self._read, name="engine-reader", daemon=True)
        self._reader.start()

    def _first_message(self, timeout: float) -> list:
        """The child's first word: ready, or why it failed."""
        if not self._conn.poll(timeout):
            raise RuntimeError(f"the engine process did not start within {timeout:.0f} s")
        try:
            return unpack(self._conn.recv_bytes())
        except EOFError:
            self._process.join(10)
            raise RuntimeError(
                f"the engine process exited while loading (exit code {self._process.exitcode}); its "
                "log says why. It is spawned: a script that starts a replica needs the "
                "`if __name__ == '__main__':` guard"
            ) from None

    def _send(self, frame: bytes) -> None:
        with self._sending:
            self._conn.send_bytes(frame)

    # The Engine protocol.
    def start(self, deliver: Deliver) -> None:
        self._deliver = deliver
        self._send(pack("start"))

    def submit(self, request: EngineRequest) -> None:
        if self._broken:
            self._deliver([(request.request_id, ServerBusyError(self._broken))])
            return
        self._outstanding.add(request.request_id)
        self._send(pack("submit", dataclasses.asdict(request)))

    def abandon(self, request_id: str) -> None:
        self._outstanding.discard(request_id)
        if not self._broken:
            self._send(pack("abandon", request_id))

    def remember(self, domain: str, token_ids: list[int]) -> None:
        if not self._broken:
            self._send(pack("remember", domain, token_ids))

    def load_draft(self, meta: DraftVersion, weights: Mapping[str, torch.Tensor]) -> None:
        if self._broken:
            raise RuntimeError(self._broken)
        call, future = next(self._call_ids), Future()
        path = self._dir / f"{call}.safetensors"
        save_file(unshared(weights), str(path))
        self._calls[call] = future
        try:
            self._send(pack("load", call, dataclasses.asdict(meta), str(path)))
            error = future.result(LOAD_SECONDS)
        finally:
            path.unlink()
        if error is not None:
            raise unpack_error(error)

    def versions(self) -> dict[str, str]:
        return self._state["versions"]

    def running(self) -> int:
        return self._state["running"]

    def status(self) -> dict:
        return self._state["status"]

    def metrics(self) -> list:
        return []  # what this engine counts, the replica counts by version and domain

    def check_health(self) -> None:
        if self._broken or self._state["broken"]:
            raise RuntimeError(self._broken or self._state["broken"])

    def close(self, timeout: float = 10.0) -> None:
        self._closing = True
        if self._process.is_alive():
            try:
                self._send(pack("close", timeout))
            except OSError:
                pass  # it is gone already
        self._reader.join(timeout + 5)
        self._process.join(5)
        if self._process.is_alive():
            log.warning("the engine process did not stop; killing it")
            self._process.kill()
            self._process.join(5)
        self._conn.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    # The reader thread.
    def _read(self) -> None:
        """Hand each step batch to the replica and resolve each load, until the child closes or dies."""
        while True:
            try:
                kind, self._state, *body = unpack(self._conn.recv_bytes())
            except (EOFError, OSError):
                break
            if kind == "steps":
                self._deliver([self._event(*event) for event in body[0]])
            elif kind == "reply":
                self._calls.pop(body[0]).set_result(body[1])
            elif kind == "closed":
                return
        self._process.join(5)
        self._broken = f"the engine process has exited (exit code {self._process.exitcode})"
        if not self._closing:
            log.critical("%s; failing %d requests", self._broken, len(self._outstanding))
        failure = ServerBusyError(self._broken)
        self._deliver([(rid, failure) for rid in self._outstanding])
        self._outstanding.clear()
        for future in self._calls.values():
            future.set_result(pack_error(RuntimeError(self._broken)))

    def _event(self, request_id: str, kind: str, packed: dict) -> tuple[str, Step | BaseException]:
        event = unpack_error(packed) if kind == "error" else unpack_step(packed)
        if kind == "error" or event.generation is not None:
            self._outstanding.discard(request_id)
        return request_id, event
