"""Server load, published by each replica for the trainer's throttle: requests in flight and
queued, one hash per replica (`osd:load:<replica>`) that Redis expires unless refreshed, so a dead
replica stops counting after `ttl_seconds`. The set `osd:load` names the replicas, so a reader
looks at those keys only, never scanning the keyspace; it forgets names whose hash expired."""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

REPLICAS = "osd:load"
PREFIX = "osd:load:"


@dataclass(frozen=True)
class ReplicaLoad:
    replica: str
    in_flight: int
    queued: int
    time: float


def publish_load(
    client: redis.Redis, replica: str, in_flight: int, queued: int, ttl_seconds: float = 10.0
) -> None:
    key = PREFIX + replica
    pipe = client.pipeline(transaction=True)
    pipe.hset(key, mapping={"in_flight": in_flight, "queued": queued, "time": time.time()})
    pipe.pexpire(key, int(ttl_seconds * 1000))
    pipe.sadd(REPLICAS, replica)
    pipe.execute()


def read_load(client: redis.Redis) -> list[ReplicaLoad]:
    """Every live replica's latest load."""
    replicas = sorted(name.decode() for name in client.smembers(REPLICAS))
    pipe = client.pipeline(transaction=False)
    for replica in replicas:
        pipe.hgetall(PREFIX + replica)
    loads, gone = [], []
    for replica, fields in zip(replicas, pipe.execute() if replicas else [], strict=True):
        if not fields:
            gone.append(replica)
            continue
        loads.append(
            ReplicaLoad(
                replica=replica,
                in_flight=int(fields[b"in_flight"]),
                queued=int(fields[b"queued"]),
                time=float(fields[b"time"]),
            )
        )
    if gone:  # a replica publishing again just now is re-added by its next publish
        client.srem(REPLICAS, *gone)
    return loads
