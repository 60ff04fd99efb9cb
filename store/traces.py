"""The trace stream: one Redis Stream entry per served request, written without blocking serving.

Servers append through `TraceWriter`: `append` encodes the trace, puts it on a bounded in-process
queue and returns; background threads pipeline the XADDs, so entries land in batches, roughly in
append order. When Redis is slow or down nothing
waits: the queue keeps the newest `queue_cap` traces, drops the oldest (counted), and writing
resumes when Redis answers again.

The trainer reads through `TraceReader`, a consumer in one consumer group: XREADGROUP for new
entries, its own pending entries first after a restart, XAUTOCLAIM for entries a dead consumer
left pending, and XACK only when the caller says the entries are committed. Delivery is at least
once across restarts and claims, keyed by stream id (`Delivery.entry_id`): a reader never hands
out an entry it delivered and has not yet seen acked, even when XAUTOCLAIM gives it back.

A replica that drafts from served text (suffix speculation) follows the stream through
`TraceFollower`: plain XREAD from the stream's end as it was when the follower started, outside
any group, so it reads every replica's traces and takes nothing from the trainer.

An entry has three fields, never pickle: the schema version `v`, a small JSON `meta` (ids,
domain, sampling, and the array shapes), and `data`, the arrays back to back: little-endian token
ids (uint16 when every id of the trace fits, which halves them for vocabularies up to 65,536, else
int32), float16 log-probs and hidden states, uint8 per-step counts. Entries of another schema
version, or malformed ones, are skipped, counted and acked.

Retention: the writer trims the stream to about `max_len` entries (MAXLEN ~) every `trim_every`
writes (by default 1,000, or a tenth of `max_len` if less), oldest first. Trimmed entries the
trainer's group had not yet acked are counted (`TraceBacklog.trimmed_unprocessed`), never
silently lost. A deterministic `held_out_fraction` of request ids forms the trainer's gate set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import redis

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
DEFAULT_STREAM = "osd:traces"
DEFAULT_GROUP = "trainer"


@dataclass(frozen=True)
class Trace:
    """What one request left behind (DESIGN.md, Trace contract). T output tokens, K top entries.

    prompt_ids [P], output_ids [T]: token ids (decoded as uint16 or int32, as written).
    top_ids [T, K], top_logprobs [T, K]: the target's top-K ids and log-probs at each output position.
    drafted [S], accepted [S]: tokens drafted and accepted at each of the S steps.
    hidden [T, H]: the target's last hidden state at each output position (sampled requests only).
    """

    request_id: str
    time: float
    domain: str
    target_id: str
    draft_versions: tuple[str, ...]
    prompt_ids: np.ndarray
    output_ids: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray
    drafted: np.ndarray
    accepted: np.ndarray
    sampling: dict = field(default_factory=dict)
    hidden: np.ndarray | None = None


class TraceDecodeError(ValueError):
    """An entry that is not a trace of this schema."""


_IDS = {2: np.dtype("<u2"), 4: np.dtype("<i4")}  # token ids: 2 bytes when every id fits, else 4
_HALF, _COUNT = np.dtype("<f2"), np.dtype("u1")


def encode(trace: Trace) -> dict[bytes, bytes]:
    """The stream fields of a trace: `v`, `meta` (JSON) and `data`, every array back to back.
    One binary field instead of one per array makes an entry about 1.5x cheaper for Redis to add."""
    steps, (length, top_k) = len(trace.drafted), np.shape(trace.top_ids)
    if np.shape(trace.output_ids) != (length,) or np.shape(trace.top_logprobs) != (length, top_k):
        raise ValueError("output_ids [T], top_ids [T, K] and top_logprobs [T, K] disagree in shape")
    if len(trace.accepted) != steps:
        raise ValueError("drafted and accepted need one count per step")
    if trace.hidden is not None and (np.ndim(trace.hidden) != 2 or len(trace.hidden) != length):
        raise ValueError("hidden needs one row per output token")
    id_arrays = [np.asarray(a) for a in (trace.prompt_ids, trace.output_ids, trace.top_ids)]
    if any(a.dtype.kind not in "iu" for a in id_arrays):
        raise ValueError("token ids must be integers")
    # One pass per array: the OR of all ids is negative if any id is, and below 2**16 iff all are.
    bits = [int(np.bitwise_or.reduce(a, axis=None)) for a in id_arrays if a.size]
    if any(b < 0 for b in bits):
        raise ValueError("token ids must be >= 0")
    meta = {
        "request_id": trace.request_id,
        "time": trace.time,
        "domain": trace.domain,
        "target_id": trace.target_id,
        "draft_versions": list(trace.draft_versions),
        "sampling": trace.sampling,
        "prompt_len": len(id_arrays[0]),
        "output_len": length,
        "steps": steps,
        "top_k": top_k,
        "hidden_size": None if trace.hidden is None else int(np.shape(trace.hidden)[1]),
        "id_bytes": 2 if all(b < 2**16 for b in bits) else 4,
    }
    try:
        meta_json = json.dumps(meta, separators=(",", ":")).encode()
    except TypeError as err:
        raise ValueError(f"trace metadata is not JSON: {err}") from err
    arrays = [*id_arrays, trace.top_logprobs, trace.drafted, trace.accepted]
    if trace.hidden is not None:
        arrays.append(trace.hidden)
    layout = _layout(meta)  # ids were range-checked above, so the casts to it are exact
    data = b"".join(np.asarray(a, dtype).tobytes() for a, (dtype, _) in zip(arrays, layout, strict=True))
    return {b"v": str(SCHEMA_VERSION).encode(), b"meta": meta_json, b"data": data}


def decode(fields: dict[bytes, bytes]) -> Trace:
    """The trace in a stream entry; TraceDecodeError for another schema version or bad fields."""
    version = fields.get(b"v")
    if version != str(SCHEMA_VERSION).encode():
        raise TraceDecodeError(f"schema version {version!r}, this reader knows {SCHEMA_VERSION}")
    try:
        meta, data = json.loads(fields[b"meta"]), fields[b"data"]
        layout = _layout(meta)
        if _size(layout) != len(data):
            raise ValueError(f"data holds {len(data)} bytes, the metadata describes {_size(layout)}")
        prompt, output, top_ids, top_logprobs, drafted, accepted, *hidden = _views(data, layout)
        return Trace(
            request_id=str(meta["request_id"]),
            time=float(meta["time"]),
            domain=str(meta["domain"]),
            target_id=str(meta["target_id"]),
            draft_versions=tuple(map(str, meta["draft_versions"])),
            prompt_ids=prompt,
            output_ids=output,
            top_ids=top_ids,
            top_logprobs=top_logprobs,
            drafted=drafted,
            accepted=accepted,
            sampling=dict(meta["sampling"]),
            hidden=hidden[0] if hidden else None,
        )
    except (KeyError, ValueError, TypeError) as err:  # json, layout and frombuffer errors
        raise TraceDecodeError(f"malformed trace entry: {err}") from err


def _layout(meta: dict) -> list[tuple[np.dtype, tuple[int, ...]]]:
    """(dtype, shape) of each array in `data`, in order, from the shapes in `meta`."""
    ids = _IDS[meta["id_bytes"]]
    prompt, length, top_k, steps = (int(meta[k]) for k in ("prompt_len", "output_len", "top_k", "steps"))
    hidden = None if meta["hidden_size"] is None else int(meta["hidden_size"])
    if min(prompt, length, top_k, steps, hidden or 0) < 0:
        raise ValueError("negative array sizes")
    layout = [
        (ids, (prompt,)),
        (ids, (length,)),
        (ids, (length, top_k)),
        (_HALF, (length, top_k)),
        (_COUNT, (steps,)),
        (_COUNT, (steps,)),
    ]
    if hidden is not None:
        layout.append((_HALF, (length, hidden)))
    return layout


def _size(layout: list[tuple[np.dtype, tuple[int, ...]]]) -> int:
    return sum(dtype.itemsize * math.prod(shape) for dtype, shape in layout)


def _views(buffer: bytes, layout: list[tuple[np.dtype, tuple[int, ...]]]) -> list[np.ndarray]:
    """Read-only arrays over consecutive slices of buffer."""
    views, offset = [], 0
    for dtype, shape in layout:
        count = math.prod(shape)
        views.append(np.frombuffer(buffer, dtype, count, offset).reshape(shape))
        offset += count * dtype.itemsize
    return views


def in_fraction(key: str, fraction: float) -> bool:
    """Whether `key` lies in a fixed `fraction` of all keys: a hash of it, the same everywhere."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def is_held_out(request_id: str, fraction: float) -> bool:
    """Whether a request belongs to the gate set."""
    return in_fraction(request_id, fraction)


# Trim the stream to about ARGV[2] entries (MAXLEN ~, whole radix nodes), oldest first, and add
# to KEYS[2] how many of the trimmed entries group ARGV[1] had not processed: never delivered, or
# delivered but still pending. Entries read by the group are the oldest ones, so of `len` entries
# with `lag` still undelivered, the first len - min(lag, len) were delivered; the pending ones among
# the trimmed lie between the old and the new first entry. No entry body is read, except the two
# first entries. Returns {trimmed, unprocessed}.
_TRIM = """
local stream, lost_key, group, cap = KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[2])
local len = redis.call('XLEN', stream)
if len <= cap then return {0, 0} end
local lag, pending = len, 0
for _, info in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
  local g = {}
  for i = 1, #info, 2 do g[info[i]] = info[i + 1] end
  if g['name'] == group then
    lag, pending = g['lag'] or len, g['pending']
  end
end
local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1][1]
local trimmed = redis.call('XTRIM', stream, 'MAXLEN', '~', cap)
if trimmed == 0 then return {0, 0} end
local lost = math.max(0, trimmed - (len - math.min(lag, len)))
if pending > 0 then
  local kept = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1]
  local bound = kept and ('(' .. kept[1]) or '+'
  lost = lost + #redis.call('XPENDING', stream, group, first, bound, pending)
end
if lost > 0 then redis.call('INCRBY', lost_key, lost) end
return {trimmed, lost}
"""


@dataclass(frozen=True)
class StreamConfig:
    """Where traces live and how much of them Redis keeps."""

    stream: str = DEFAULT_STREAM
    group: str = DEFAULT_GROUP
    max_len: int = 20_000  # entries; about 25 KB each at 256 tokens with top-16 (docs/benchmarks.md)
    held_out_fraction: float = 0.05

    def __post_init__(self):
        if self.max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {self.max_len}")
        if not 0.0 <= self.held_out_fraction < 1.0:
            raise ValueError(f"held_out_fraction must lie in [0, 1), got {self.held_out_fraction}")

    @property
    def lost_key(self) -> str:
        return f"{self.stream}:trimmed_unprocessed"


def ensure_group(client: redis.Redis, config: StreamConfig) -> None:
    """Create the stream and its consumer group (reading from the start) if missing."""
    try:
        client.xgroup_create(config.stream, config.group, id="0", mkstream=True)
    except redis.ResponseError as err:
        if "BUSYGROUP" not in str(err):
            raise


@dataclass(frozen=True)
class WriterStats:
    appended: int  # traces handed to append()
    written: int  # traces Redis acknowledged
    dropped: int  # traces dropped, oldest first, while Redis was slow or down
    queued: int  # traces not yet written: waiting, or in a batch being written now
    write_errors: int  # failed write attempts (each retried)
    connected: bool  # whether the last write attempt succeeded
    last_error: str | None


class TraceWriter:
    """Appends traces without waiting on Redis; daemon threads write them in pipelined batches."""

    def __init__(
        self,
        client: redis.Redis,
        config: StreamConfig = StreamConfig(),
        queue_cap: int = 10_000,
        batch_size: int = 64,
        writers: int = 2,
        trim_every: int | None = None,  # default: every 1,000 writes, or a tenth of max_len if less
        retry_seconds: tuple[float, float] = (0.05, 1.0),
    ):
        if queue_cap < 1 or batch_size < 1 or writers < 1:
            raise ValueError("queue_cap, batch_size and writers must be >= 1")
        self.client, self.config = client, config
        self.queue_cap, self.batch_size = queue_cap, batch_size
        self.trim_every = trim_every or min(1_000, max(1, config.max_len // 10))
        self.retry_seconds = retry_seconds
        self._queue: deque[dict[bytes, bytes]] = deque()  # encoded traces
        self._cond = threading.Condition()
        self._closed = False
        self._appended = self._written = self._dropped = self._errors = 0
        self._connected, self._last_error = True, None
        self._in_flight = self._since_trim = 0  # traces being written; written since the last trim
        self._next_lost_warning, self._group_ready = 0.0, False
        self._trim = client.register_script(_TRIM)
        # Two connections overlap one batch's transfer with Redis processing the other's.
        self._threads = [
            threading.Thread(target=self._run, name=f"trace-writer-{i}", daemon=True) for i in range(writers)
        ]
        for thread in self._threads:
            thread.start()

    def append(self, trace: Trace) -> None:
        """Encode and queue one trace; never waits on Redis. A full queue drops its oldest trace.
        A trace that cannot be encoded raises ValueError here, in the caller."""
        fields = encode(trace)
        with self._cond:
            if self._closed:
                raise RuntimeError("the trace writer is closed")
            self._appended += 1
            if len(self._queue) >= self.queue_cap:
                self._queue.popleft()
                self._dropped += 1
            self._queue.append(fields)
            self._cond.notify()

    def stats(self) -> WriterStats:
        with self._cond:
            return WriterStats(
                appended=self._appended,
                written=self._written,
                dropped=self._dropped,
                queued=len(self._queue) + self._in_flight,
                write_errors=self._errors,
                connected=self._connected,
                last_error=self._last_error,
            )

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued trace is written or dropped; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (up to timeout), then stop the thread."""
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    def _run(self) -> None:
        delay = self.retry_seconds[0]
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                batch = [self._queue.popleft() for _ in range(min(self.batch_size, len(self._queue)))]
                self._in_flight += len(batch)
            try:
                self._write(batch)
            except redis.RedisError as err:
                self._requeue(batch, err)
                time.sleep(delay)
                delay = min(delay * 2, self.retry_seconds[1])
                continue
            delay = self.retry_seconds[0]
            with self._cond:
                self._written += len(batch)
                self._in_flight -= len(batch)
                self._connected, self._since_trim = True, self._since_trim + len(batch)
                trim_now = self._since_trim >= self.trim_every
                if trim_now:
                    self._since_trim = 0
                self._cond.notify_all()
            if trim_now:
                self._trim_quietly()

    def _write(self, batch: list[dict[bytes, bytes]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for fields in batch:
            pipe.xadd(self.config.stream, fields)
        pipe.execute()

    def _requeue(self, batch: list[dict[bytes, bytes]], err: Exception) -> None:
        """Put a failed batch back in front of newer traces, dropping the oldest beyond the cap."""
        with self._cond:
            if self._connected:
                log.warning("trace writes failing, queueing up to %d traces: %s", self.queue_cap, err)
            self._errors += 1
            self._connected, self._last_error = False, str(err)
            overflow = max(0, len(batch) + len(self._queue) - self.queue_cap)
            self._dropped += overflow
            self._queue.extendleft(reversed(batch[overflow:]))
            self._in_flight -= len(batch)
            self._cond.notify_all()

    def trim(self) -> tuple[int, int]:
        """Trim the stream to about max_len now: (entries trimmed, of which unprocessed)."""
        if not self._group_ready:  # so that a trainer that is not running yet still counts as behind
            ensure_group(self.client, self.config)
            self._group_ready = True
        trimmed, lost = self._trim(
            keys=[self.config.stream, self.config.lost_key], args=[self.config.group, self.config.max_len]
        )
        if lost and time.monotonic() >= self._next_lost_warning:  # at most once a minute
            self._next_lost_warning = time.monotonic() + 60.0
            log.warning(
                "trimming %s to max_len %d dropped traces the trainer had not processed; count in %s",
                self.config.stream, self.config.max_len, self.config.lost_key,
            )  # fmt: skip
        return trimmed, lost

    def _trim_quietly(self) -> None:
        try:
            self.trim()
        except redis.RedisError as err:  # retried at the next trim; the cap is soft meanwhile
            log.warning("trimming %s failed: %s", self.config.stream, err)


@dataclass(frozen=True)
class Delivery:
    entry_id: bytes  # the stream id: unique per entry, the key to deduplicate by
    trace: Trace
    held_out: bool  # in the gate set: evaluate on it, never train on it


@dataclass(frozen=True)
class TraceBacklog:
    length: int  # entries in the stream now
    pending: int  # delivered to the group but not yet acked
    lag: int | None  # entries not yet delivered to the group (None when Redis cannot tell)
    trimmed_unprocessed: int  # entries trimmed away before the group acked them, ever


class TraceReader:
    """One consumer of the trace stream's consumer group (the trainer's side)."""

    def __init__(
        self,
        client: redis.Redis,
        consumer: str,
        config: StreamConfig = StreamConfig(),
        claim_idle_ms: int = 30_000,
    ):
        self.client, self.consumer, self.config = client, consumer, config
        self.claim_idle_ms = claim_idle_ms
        self.skipped_unknown = self.claimed = 0
        self._own_pending_done = False
        self._holding: set[bytes] = set()  # delivered by this reader and not yet acked
        ensure_group(client, config)

    def read(self, count: int = 64, block_ms: int | None = None) -> list[Delivery]:
        """Up to `count` traces: this consumer's own pending entries first (after a restart), then
        entries another consumer left pending longer than claim_idle_ms, then new ones (waiting up
        to block_ms for them; None returns at once)."""
        entries = []
        if not self._own_pending_done:
            entries = self._group_read("0", count, None)
            self._own_pending_done = len(entries) < count
        if len(entries) < count:
            entries += self._claim(count - len(entries))
        if len(entries) < count:
            entries += self._group_read(">", count - len(entries), block_ms)
        return self._decode(entries)

    def ack(self, entry_ids: list[bytes]) -> int:
        """Acknowledge entries as committed; returns how many were pending."""
        if not entry_ids:
            return 0
        acked = self.client.xack(self.config.stream, self.config.group, *entry_ids)
        self._holding.difference_update(entry_ids)
        return acked

    def backlog(self) -> TraceBacklog:
        pipe = self.client.pipeline(transaction=False)
        pipe.xlen(self.config.stream)
        pipe.xinfo_groups(self.config.stream)
        pipe.get(self.config.lost_key)
        length, groups, lost = pipe.execute()
        group = next(g for g in groups if g["name"] == self.config.group.encode())
        return TraceBacklog(
            length=length, pending=group["pending"], lag=group.get("lag"), trimmed_unprocessed=int(lost or 0)
        )

    def _group_read(self, start: str, count: int, block_ms: int | None) -> list[tuple[bytes, dict]]:
        reply = self.client.xreadgroup(
            self.config.group, self.consumer, {self.config.stream: start}, count=count, block=block_ms
        )
        return [(entry_id, fields) for _, entries in reply or [] for entry_id, fields in entries if fields]

    def _claim(self, count: int) -> list[tuple[bytes, dict]]:
        reply = self.client.xautoclaim(
            self.config.stream, self.config.group, self.consumer, self.claim_idle_ms, "0-0", count=count
        )
        # Entries this reader still holds come back once idle long enough; it is not done with them.
        claimed = [
            (entry_id, fields) for entry_id, fields in reply[1] if fields and entry_id not in self._holding
        ]
        self.claimed += len(claimed)
        return claimed

    def _decode(self, entries: list[tuple[bytes, dict]]) -> list[Delivery]:
        deliveries, unreadable = [], []
        for entry_id, fields in entries:
            try:
                trace = decode(fields)
            except TraceDecodeError as err:
                log.warning("skipping trace %s: %s", entry_id, err)
                unreadable.append(entry_id)
                continue
            held_out = is_held_out(trace.request_id, self.config.held_out_fraction)
            deliveries.append(Delivery(entry_id, trace, held_out))
            self._holding.add(entry_id)
        self.skipped_unknown += len(unreadable)
        self.ack(unreadable)  # nothing will ever read them: do not leave them pending
        return deliveries


class TraceFollower:
    """Every trace appended from now on, in order, outside the consumer group (a replica's view of
    what all replicas serve). Entries trimmed before it reads them are missed; unreadable ones are
    skipped and counted."""

    def __init__(self, client: redis.Redis, config: StreamConfig = StreamConfig()):
        self.client, self.config = client, config
        newest = client.xrevrange(config.stream, count=1)
        self._last: bytes | str = newest[0][0] if newest else "0-0"
        self.skipped_unknown = 0

    def read(self, count: int = 256, block_ms: int | None = None) -> list[Trace]:
        """Up to `count` traces appended since the last read (waiting up to block_ms for the first;
        None returns at once)."""
        reply = self.client.xread({self.config.stream: self._last}, count=count, block=block_ms)
        traces = []
        for _, entries in reply or []:
            for entry_id, fields in entries:
                self._last = entry_id
                try:
                    traces.append(decode(fields))
                except TraceDecodeError:
                    self.skipped_unknown += 1
        return traces
