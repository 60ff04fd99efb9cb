"""The trace stream on a real redis-server: encoding, the non-blocking writer, the consumer group."""

from __future__ import annotations

import json
import os
import pickle
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
from polling import PATIENCE, wait_for
from redis.backoff import NoBackoff
from redis.retry import Retry

from store.redis_server import LocalRedis
from store.traces import (
    SCHEMA_VERSION,
    StreamConfig,
    Trace,
    TraceDecodeError,
    TraceFollower,
    TraceReader,
    TraceWriter,
    WriterStats,
    decode,
    encode,
    is_held_out,
)


def make_trace(i: int, length: int = 12, top_k: int = 4, hidden: int | None = None) -> Trace:
    rng = np.random.default_rng(i)
    steps = length // 2
    return Trace(
        request_id=f"req-{i}",
        time=1_700_000_000.0 + i,
        domain=["prose", "python", "c"][i % 3],
        target_id="demo-target",
        draft_versions=("draft:v1", "draft:v2"),
        prompt_ids=rng.integers(0, 50_000, 7).astype(np.int32),
        output_ids=rng.integers(0, 50_000, length).astype(np.int32),
        top_ids=rng.integers(0, 150_000, (length, top_k)).astype(np.int32),
        top_logprobs=-rng.random((length, top_k)).astype(np.float16),
        drafted=rng.integers(0, 6, steps).astype(np.uint8),
        accepted=rng.integers(0, 3, steps).astype(np.uint8),
        sampling={"temperature": 0.7, "top_p": 0.9, "top_k": 0, "seed": i},
        hidden=None if hidden is None else rng.standard_normal((length, hidden)).astype(np.float16),
    )


def assert_same(a: Trace, b: Trace) -> None:
    for name in ("request_id", "time", "domain", "target_id", "draft_versions", "sampling"):
        assert getattr(a, name) == getattr(b, name), name
    for name in ("prompt_ids", "output_ids", "top_ids", "top_logprobs", "drafted", "accepted"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    if a.hidden is None:
        assert b.hidden is None
    else:
        np.testing.assert_array_equal(a.hidden, b.hidden)


def data_bytes(trace: Trace, id_bytes: int) -> int:
    """The size of a trace's `data` field: ids at id_bytes, log-probs and hidden at 2, counts at 1."""
    ids = trace.prompt_ids.size + trace.output_ids.size + trace.top_ids.size
    halves = trace.top_logprobs.size + (0 if trace.hidden is None else trace.hidden.size)
    return id_bytes * ids + 2 * halves + trace.drafted.size + trace.accepted.size


@pytest.mark.parametrize("hidden", [None, 8])
def test_encode_decode_round_trips_every_field(hidden):
    trace = make_trace(3, hidden=hidden)
    fields = encode(trace)
    assert fields[b"v"] == str(SCHEMA_VERSION).encode()
    assert set(fields) == {b"v", b"meta", b"data"}
    assert len(fields[b"data"]) == data_bytes(trace, id_bytes=4)  # float16 log-probs and hidden
    assert_same(trace, decode(fields))


def test_ids_take_two_bytes_when_they_all_fit_and_four_otherwise():
    small = make_trace(4)
    small = Trace(**{**small.__dict__, "top_ids": small.top_ids % 65_536, "output_ids": small.output_ids})
    large = make_trace(4)  # top ids up to 150,000
    assert len(encode(small)[b"data"]) == data_bytes(small, id_bytes=2)
    assert len(encode(large)[b"data"]) == data_bytes(large, id_bytes=4)
    for trace in (small, large):
        assert_same(trace, decode(encode(trace)))


def test_encode_refuses_inconsistent_shapes():
    trace = make_trace(1)
    with pytest.raises(ValueError, match="shape"):
        encode(Trace(**{**trace.__dict__, "top_logprobs": trace.top_logprobs[:-1]}))
    with pytest.raises(ValueError, match="one count per step"):
        encode(Trace(**{**trace.__dict__, "accepted": trace.accepted[:-1]}))
    with pytest.raises(ValueError, match="not JSON"):
        encode(Trace(**{**trace.__dict__, "sampling": {"seed": object()}}))
    with pytest.raises(ValueError, match="one row per output token"):
        encode(Trace(**{**trace.__dict__, "hidden": np.zeros((1, 4), np.float16)}))


def test_a_bad_trace_fails_in_the_caller_and_the_writer_goes_on(redis_client):
    config = StreamConfig(stream="t:bad")
    writer = TraceWriter(redis_client, config)
    trace = make_trace(1)
    with pytest.raises(ValueError):
        writer.append(Trace(**{**trace.__dict__, "top_ids": trace.top_ids[:-1]}))
    writer.append(trace)
    writer.close(timeout=PATIENCE)
    assert writer.stats().written == 1 and redis_client.xlen(config.stream) == 1


def test_decode_refuses_other_versions_and_malformed_entries():
    fields = encode(make_trace(2))
    with pytest.raises(TraceDecodeError, match="schema version"):
        decode({**fields, b"v": b"99"})
    with pytest.raises(TraceDecodeError, match="malformed"):
        decode({**fields, b"data": fields[b"data"][:-4]})
    with pytest.raises(TraceDecodeError, match="malformed"):
        decode({**fields, b"data": fields[b"data"] + b"\0\0"})
    meta = json.loads(fields[b"meta"])
    bent = {**meta, "prompt_len": -meta["prompt_len"], "steps": meta["steps"] + meta["prompt_len"] * 2}
    with pytest.raises(TraceDecodeError, match="negative"):  # sizes that add up, one of them negative
        decode({**fields, b"meta": json.dumps(bent).encode()})
    with pytest.raises(TraceDecodeError, match="malformed"):
        decode({k: v for k, v in fields.items() if k != b"meta"})


def test_held_out_split_is_deterministic_and_near_its_fraction():
    ids = [f"req-{i}" for i in range(20_000)]
    held = [i for i in ids if is_held_out(i, 0.05)]
    assert held == [i for i in ids if is_held_out(i, 0.05)]
    assert 0.04 < len(held) / len(ids) < 0.06
    assert not any(is_held_out(i, 0.0) for i in ids[:100])


def test_writer_and_reader_round_trip_through_redis(redis_client):
    config = StreamConfig(stream="t:roundtrip", held_out_fraction=0.3)
    writer = TraceWriter(redis_client, config)
    traces = [make_trace(i, hidden=8 if i % 2 else None) for i in range(50)]
    for trace in traces:
        writer.append(trace)
    assert writer.flush(timeout=PATIENCE)
    writer.close()
    assert writer.stats().written == 50 and writer.stats().dropped == 0

    reader = TraceReader(redis_client, "c1", config)
    got = sorted(reader.read(count=100), key=lambda d: int(d.trace.request_id.split("-")[1]))
    assert [d.trace.request_id for d in got] == [t.request_id for t in traces]
    for delivery, trace in zip(got, traces, strict=True):
        assert_same(trace, delivery.trace)
        assert delivery.held_out == is_held_out(trace.request_id, 0.3)
    assert reader.backlog().pending == 50
    assert reader.ack([d.entry_id for d in got]) == 50
    assert reader.backlog().pending == 0 and reader.read(count=10) == []


def idle_pending(client, config: StreamConfig, idle_ms: int) -> int:
    """How many of the group's pending entries have been idle (not delivered again) for idle_ms.
    Redis measures idle time on its own clock since the last delivery, so it only grows."""
    return len(client.xpending_range(config.stream, config.group, "-", "+", 100, idle=idle_ms))


def test_a_dead_consumers_batch_is_claimed_and_nothing_acked_is_lost(redis_client):
    config = StreamConfig(stream="t:claim")
    writer = TraceWriter(redis_client, config)
    for i in range(30):
        writer.append(make_trace(i))
    writer.close(timeout=PATIENCE)

    dead = TraceReader(redis_client, "dead", config, claim_idle_ms=50)
    first = dead.read(count=10)
    dead.ack([d.entry_id for d in first[:4]])  # committed 4, then died mid-batch holding 6

    survivor = TraceReader(redis_client, "survivor", config, claim_idle_ms=50)
    wait_for(lambda: idle_pending(redis_client, config, 50) == 6)  # the dead one's entries are claimable
    trained: list[str] = []
    while batch := survivor.read(count=8):
        trained += [d.trace.request_id for d in batch]
        survivor.ack([d.entry_id for d in batch])
    assert survivor.claimed == 6
    committed = [d.trace.request_id for d in first[:4]] + trained
    assert sorted(committed) == sorted(f"req-{i}" for i in range(30))  # each exactly once here
    assert survivor.backlog().pending == 0


def test_a_restarted_consumer_reads_its_own_pending_entries_first(redis_client):
    config = StreamConfig(stream="t:restart")
    writer = TraceWriter(redis_client, config)
    for i in range(5):
        writer.append(make_trace(i))
    writer.close(timeout=PATIENCE)
    before = TraceReader(redis_client, "trainer-0", config).read(count=3)
    after = TraceReader(redis_client, "trainer-0", config).read(count=10)  # same name, new process
    assert [d.entry_id for d in after[:3]] == [d.entry_id for d in before]
    assert len(after) == 5


def test_unknown_schema_and_pickle_entries_are_skipped_counted_and_never_executed(redis_client, tmp_path):
    config = StreamConfig(stream="t:hostile")
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    payload = pickle.dumps(Exploit())
    redis_client.xadd(config.stream, {b"v": b"99", b"meta": b"{}"})
    redis_client.xadd(config.stream, {b"v": str(SCHEMA_VERSION).encode(), b"meta": payload})
    redis_client.xadd(config.stream, {b"data": payload})
    writer = TraceWriter(redis_client, config)
    writer.append(make_trace(7))
    writer.close(timeout=PATIENCE)

    reader = TraceReader(redis_client, "c", config)
    got = reader.read(count=10)
    assert [d.trace.request_id for d in got] == ["req-7"]
    assert reader.skipped_unknown == 3
    assert reader.backlog().pending == 1  # the bad entries were acked, not left pending
    assert not marker.exists()


def test_a_follower_reads_every_trace_from_its_start_on_and_takes_nothing_from_the_trainer(redis_client):
    config = StreamConfig(stream="t:follow")
    assert TraceFollower(redis_client, config).read() == []  # no stream yet: from its beginning
    early = TraceFollower(redis_client, config)
    writer = TraceWriter(redis_client, config)
    writer.append(make_trace(1))
    writer.flush(timeout=PATIENCE)
    late = TraceFollower(redis_client, config)  # starts after trace 1
    redis_client.xadd(config.stream, {b"v": b"99"})
    for i in (2, 3):
        writer.append(make_trace(i))
    writer.close(timeout=PATIENCE)
    got = early.read()
    assert [t.request_id for t in got][0] == "req-1" and early.skipped_unknown == 1
    assert sorted(t.request_id for t in got) == ["req-1", "req-2", "req-3"]
    assert_same(got[0], make_trace(1))
    assert early.read() == []  # read once
    assert [t.request_id for t in late.read(count=1)] == []  # the unreadable entry, skipped
    assert sorted(t.request_id for t in late.read()) == ["req-2", "req-3"]
    trainer = TraceReader(redis_client, "c", config)
    assert len(trainer.read(count=10)) == 3  # the followers took nothing from the group


def test_trimming_counts_every_entry_the_trainer_had_not_processed(redis_client):
    redis_client.config_set("stream-node-max-entries", 5)  # small radix nodes: MAXLEN ~ trims finely
    try:
        config = StreamConfig(stream="t:trim", max_len=10)
        writer = TraceWriter(redis_client, config, trim_every=10**9)  # trim only when told
        for i in range(30):
            writer.append(make_trace(i))
        assert writer.flush(timeout=PATIENCE)
        reader = TraceReader(redis_client, "c", config)
        delivered = reader.read(count=10)
        reader.ack([d.entry_id for d in delivered[:6]])  # 6 acked, 4 pending, 20 never delivered

        trimmed, lost = writer.trim()
        assert (trimmed, redis_client.xlen(config.stream)) == (20, 10)
        assert lost == 14  # the oldest 20: 6 acked, then 4 pending and 10 never delivered
        for i in range(30, 40):
            writer.append(make_trace(i))
        assert writer.flush(timeout=PATIENCE)
        assert writer.trim() == (10, 10)  # 10 never delivered; the 4 pending are not counted twice
        writer.close()
    finally:
        redis_client.config_set("stream-node-max-entries", 100)
    assert reader.backlog().trimmed_unprocessed == 24


def counts(stats: WriterStats) -> dict[str, int]:
    """A writer's accounting: every appended trace is written, dropped or still queued."""
    return {name: getattr(stats, name) for name in ("appended", "written", "dropped", "queued")}


def test_appending_never_blocks_while_redis_is_down_and_resumes_after_restart(tmp_path):
    """Redis first hangs (SIGSTOP: no reply ever comes, so an append that waited on it would never
    return), then crashes (SIGKILL) and restarts from its AOF. Every append returns while it hangs;
    the writer keeps the newest queue_cap traces, counts each one it dropped, and writes the kept
    ones once Redis is back."""
    config = StreamConfig(stream="t:outage")
    # appendfsync always: Redis writes and fsyncs the AOF before it replies, so every write that
    # flush() saw acknowledged survives the crash.
    with LocalRedis(data_dir=tmp_path / "redis", extra_args=["--appendfsync", "always"]) as server:
        # The writer's connection has no socket timeout, so a hung Redis holds its write for good,
        # and no retries inside redis-py, so every failed write is one of the writer's own.
        client = server.client(socket_timeout=None, retry=Retry(NoBackoff(), 0))
        assert client.config_get("appendfsync")["appendfsync"] == "always"
        # One writer thread: at most one batch is in flight, so what it keeps is exact.
        writer = TraceWriter(client, config, queue_cap=50, writers=1, retry_seconds=(0.02, 0.2))
        for i in range(20):
            writer.append(make_trace(i))
        assert writer.flush(timeout=PATIENCE)  # acknowledged, so in the AOF

        returned: list[int] = []

        def append_the_rest() -> None:
            for i in range(20, 220):
                writer.append(make_trace(i))
                returned.append(i)

        os.kill(server.process.pid, signal.SIGSTOP)  # hung: it accepts bytes and never answers
        try:
            appender = threading.Thread(target=append_the_rest, daemon=True)
            appender.start()
            appender.join(PATIENCE)  # a guard: an append that waited on Redis would hang here
            assert len(returned) == 200, "an append waited on a Redis that never answers"
            stats = writer.stats()
            assert (stats.appended, stats.written, stats.write_errors) == (220, 20, 0)  # nothing answered
            assert stats.written + stats.dropped + stats.queued == stats.appended
        finally:
            server.kill()  # the crash: the write it held fails, and so does every retry until start()

        # After the first failed write the queue holds the newest 50 (in flight or waiting) and
        # every other trace appended during the outage was dropped and counted.
        wait_for(lambda: writer.stats().write_errors > 0)
        stats = writer.stats()
        assert counts(stats) == {"appended": 220, "written": 20, "dropped": 150, "queued": 50}
        assert not stats.connected and stats.last_error

        server.start(timeout=PATIENCE)  # same port, same data directory: recovers from the AOF
        assert writer.flush(timeout=PATIENCE)
        writer.close(timeout=PATIENCE)
        stats = writer.stats()
        assert counts(stats) == {"appended": 220, "written": 70, "dropped": 150, "queued": 0}
        assert stats.connected
        ids = [decode(f).request_id for _, f in client.xrange(config.stream)]
        before_crash = [f"req-{i}" for i in range(20)]  # kept by the AOF
        assert ids == before_crash + [f"req-{i}" for i in range(170, 220)]  # the newest, in order
        client.close()


def test_a_slow_reader_is_not_handed_its_own_unacked_entries_twice(redis_client):
    config = StreamConfig(stream="t:dedupe")
    writer = TraceWriter(redis_client, config)
    for i in range(6):
        writer.append(make_trace(i))
    writer.close(timeout=PATIENCE)
    reader = TraceReader(redis_client, "slow", config, claim_idle_ms=10)
    first = reader.read(count=3)
    wait_for(lambda: idle_pending(redis_client, config, 10) == 3)  # XAUTOCLAIM now returns them to it
    second = reader.read(count=3)  # the three others, not its own three again
    assert {d.trace.request_id for d in first + second} == {f"req-{i}" for i in range(6)}
    reader.ack([d.entry_id for d in first + second])
    assert reader.backlog().pending == 0
