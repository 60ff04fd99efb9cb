"""Server load, published by each replica for the trainer's throttle: requests in flight and
queued, one hash per replica (`osd:load:<replica>`) that expires unless refreshed, so a dead
replica stops counting after `ttl_seconds`."""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

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
    pipe.execute()


def read_load(client: redis.Redis) -> list[ReplicaLoad]:
    """Every live replica's latest load."""
    keys = sorted(client.scan_iter(match=PREFIX + "*", count=100))
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hgetall(key)
    loads = []
    for key, fields in zip(keys, pipe.execute() if keys else [], strict=True):
        if fields:
            loads.append(
                ReplicaLoad(
                    replica=key.decode().removeprefix(PREFIX),
                    in_flight=int(fields[b"in_flight"]),
                    queued=int(fields[b"queued"]),
                    time=float(fields[b"time"]),
                )
            )
    return loads
