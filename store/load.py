"""Each replica's heartbeat: its load (requests in flight and queued) for the trainer's throttle,
the draft version it serves, and a snapshot of its Prometheus metrics for `/metrics`.

One hash per replica (`osd:load:<replica>`) that Redis expires unless refreshed, so a dead
replica stops counting after `ttl_seconds`. The set `osd:load` names the replicas, so a reader
looks at those keys only, never scanning the keyspace; it forgets names whose hash expired. The
metrics snapshot is JSON, written less often than the load and kept until the next one.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import redis

log = logging.getLogger(__name__)

REPLICAS = "osd:load"
PREFIX = "osd:load:"


@dataclass(frozen=True)
class ReplicaLoad:
    replica: str
    in_flight: int
    queued: int
    time: float
    draft_version: str = ""


def publish_load(
    client: redis.Redis,
    replica: str,
    in_flight: int,
    queued: int,
    ttl_seconds: float = 10.0,
    draft_version: str = "",
    metrics: list[dict] | None = None,
) -> None:
    """Refresh `replica`'s heartbeat; `metrics` (JSON-able) replaces its snapshot when given."""
    key = PREFIX + replica
    fields = {"in_flight": in_flight, "queued": queued, "time": time.time(), "draft_version": draft_version}
    if metrics is not None:
        fields["metrics"] = json.dumps(metrics, separators=(",", ":"))
    pipe = client.pipeline(transaction=True)
    pipe.hset(key, mapping=fields)
    pipe.pexpire(key, int(ttl_seconds * 1000))
    pipe.sadd(REPLICAS, replica)
    pipe.execute()


def read_load(client: redis.Redis) -> list[ReplicaLoad]:
    """Every live replica's latest load."""
    return [
        ReplicaLoad(
            replica=replica,
            in_flight=int(fields[b"in_flight"]),
            queued=int(fields[b"queued"]),
            time=float(fields[b"time"]),
            draft_version=fields.get(b"draft_version", b"").decode(),
        )
        for replica, fields in _live(client, "in_flight", "queued", "draft_version")
    ]


def read_metrics(client: redis.Redis) -> dict[str, list[dict]]:
    """Every live replica's latest metrics snapshot; a replica with none yet, or an unreadable
    one, is left out (and logged)."""
    snapshots = {}
    for replica, fields in _live(client, "metrics"):
        if fields.get(b"metrics") is None:
            continue
        try:
            snapshots[replica] = json.loads(fields[b"metrics"])
        except ValueError as err:
            log.warning("unreadable metrics snapshot of %s: %s", replica, err)
    return snapshots


def _live(client: redis.Redis, *names: str) -> list[tuple[str, dict[bytes, bytes]]]:
    """(replica, {field: value}) of `names` and "time", for each replica whose heartbeat lives."""
    names = ("time", *names)
    replicas = sorted(name.decode() for name in client.smembers(REPLICAS))
    pipe = client.pipeline(transaction=False)
    for replica in replicas:
        pipe.hmget(PREFIX + replica, names)
    live, gone = [], []
    for replica, values in zip(replicas, pipe.execute() if replicas else [], strict=True):
        if values[0] is None:  # expired
            gone.append(replica)
            continue
        live.append((replica, {n.encode(): v for n, v in zip(names, values, strict=True) if v is not None}))
    if gone:  # a replica publishing again just now is re-added by its next publish
        client.srem(REPLICAS, *gone)
    return live


def forget(client: redis.Redis, replica: str) -> None:
    """Remove a replica's heartbeat at once (it closed), rather than when it expires."""
    pipe = client.pipeline(transaction=True)
    pipe.delete(PREFIX + replica)
    pipe.srem(REPLICAS, replica)
    pipe.execute()
