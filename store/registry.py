"""The draft registry: versioned draft weights per (draft name, domain), one `live` pointer each.

A version is immutable once written: its weights (safetensors bytes, chunked in Redis, or a file
URI for large drafts; a full model or only a LoRA adapter) and its metadata (JSON). Publishing
writes the weights and metadata first, then a Lua script moves `live` and updates statuses
atomically and announces the change on a pub/sub channel. A reader therefore never sees a
half-written version. Servers learn of changes through `LiveWatcher` (pub/sub, with a poll as a
fallback, so a missed message costs latency only); a version whose handling failed on a transient
error (Redis down, a timeout) is offered again at the next look, one refused for what it is
(corrupt, incompatible) is not. A SHA-256 checksum is verified on every load,
and every weight must be finite; corrupt weights raise `CorruptWeightsError` and the caller keeps
what it has. Nothing is unpickled. File URIs are read, and deleted by retention, only inside the
registry's `file_dir`: metadata read from Redis cannot point a server at any other file.

Keys, for name N and domain D (`-` when the draft serves every domain):
    osd:registry:N:D:next          INCR counter of version numbers
    osd:registry:N:D:versions      ZSET of version numbers
    osd:registry:N:D:v:<n>         metadata JSON
    osd:registry:N:D:v:<n>:blob:<i> weight chunks (absent for file URIs)
    osd:registry:N:D:live          the live version number
    osd:registry:N:domains         SET of the domains N has versions for
    osd:registry:events            pub/sub channel of JSON events
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import redis
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

log = logging.getLogger(__name__)

Status = Literal["candidate", "live", "rejected", "retired"]
Kind = Literal["full", "lora", "heads", "router"]  # a draft model or adapter, draft heads, the router
EVENTS_CHANNEL = "osd:registry:events"
ALL_DOMAINS = "-"
CHUNK_BYTES = 4 << 20
TRANSIENT_ERRORS = (redis.RedisError, ConnectionError, TimeoutError)  # not the version's fault: retried


class CorruptWeightsError(ValueError):
    """Stored weights that do not match their checksum, are missing, unreadable or not finite, or
    lie outside the registry's file directory."""


class UnknownVersionError(KeyError):
    """No such version (never published, or removed by retention)."""


@dataclass(frozen=True)
class DraftVersion:
    """A version's metadata. gate_acceptance: expected acceptance on the gate set when published."""

    name: str
    domain: str
    version: int
    parent: int | None
    created: float
    train_steps: int
    gate_acceptance: float | None
    status: Status
    kind: Kind
    sha256: str
    size_bytes: int
    chunks: int  # weight chunks in Redis; 0 when the weights live at `uri`
    uri: str | None = None
    extra: dict = field(default_factory=dict)  # anything else worth showing (gate numbers, reasons)

    @property
    def label(self) -> str:
        """How traces and metric series name this version: "<name>:v<n>", or "<name>/<domain>:v<n>"
        for a domain's own version."""
        scope = self.name if self.domain == ALL_DOMAINS else f"{self.name}/{self.domain}"
        return f"{scope}:v{self.version}"

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> DraftVersion:
        return cls(**json.loads(raw))


# KEYS: live, versions zset, new meta, old meta (or the same key), history ; ARGV: new version,
# new meta, old meta (or ""), event JSON, channel, history length. Moves live, rewrites both
# statuses and records the event in one step.
_PROMOTE = """
if ARGV[3] ~= '' then redis.call('SET', KEYS[4], ARGV[3]) end
redis.call('SET', KEYS[3], ARGV[2])
redis.call('SET', KEYS[1], ARGV[1])
redis.call('LPUSH', KEYS[5], ARGV[4])
redis.call('LTRIM', KEYS[5], 0, tonumber(ARGV[6]) - 1)
redis.call('PUBLISH', ARGV[5], ARGV[4])
return 1
"""
HISTORY_LENGTH = 1_000  # registry events kept for the dashboard's markers


class Registry:
    """Draft versions in Redis. `file_dir` (optional) holds weights over `inline_limit` bytes as files;
    without it every version is inline and file URIs are refused."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = "osd:registry",
        file_dir: Path | str | None = None,
        inline_limit: int = 256 << 20,
        keep: int = 10,
    ):
        self.client, self.prefix = client, prefix
        self.file_dir = None if file_dir is None else Path(file_dir)
        self.inline_limit, self.keep = inline_limit, keep
        self._promote = client.register_script(_PROMOTE)

    def _key(self, name: str, domain: str, *parts: object) -> str:
        return ":".join([self.prefix, name, domain, *map(str, parts)])

    def _domains_key(self, name: str) -> str:
        return f"{self.prefix}:{name}:domains"

    def domains(self, name: str) -> list[str]:
        """The domains `name` has versions for, sorted."""
        members = self.client.smembers(self._domains_key(name))
        return sorted(m.decode() if isinstance(m, bytes) else m for m in members)

    def add(
        self,
        name: str,
        weights: dict[str, torch.Tensor],
        domain: str = ALL_DOMAINS,
        parent: int | None = None,
        train_steps: int = 0,
        gate_acceptance: float | None = None,
        kind: Kind = "full",
        extra: dict | None = None,
    ) -> DraftVersion:
        """Store weights as a new candidate version (not live)."""
        blob = save_safetensors({k: v.detach().cpu().contiguous() for k, v in weights.items()})
        version = int(self.client.incr(self._key(name, domain, "next")))
        uri, chunks = None, 0
        if self.file_dir is not None and len(blob) > self.inline_limit:
            path = self.file_dir / name / domain / f"v{version}.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(blob)
            uri = path.resolve().as_uri()
        else:
            chunks = max(1, -(-len(blob) // CHUNK_BYTES))
        meta = DraftVersion(
            name=name,
            domain=domain,
            version=version,
            parent=parent,
            created=time.time(),
            train_steps=train_steps,
            gate_acceptance=gate_acceptance,
            status="candidate",
            kind=kind,
            sha256=hashlib.sha256(blob).hexdigest(),
            size_bytes=len(blob),
            chunks=chunks,
            uri=uri,
            extra=extra or {},
        )
        pipe = self.client.pipeline(transaction=True)
        for i in range(chunks):
            pipe.set(
                self._key(name, domain, "v", version, "blob", i),
                blob[i * CHUNK_BYTES : (i + 1) * CHUNK_BYTES],
            )
        pipe.set(self._key(name, domain, "v", version), meta.to_json())
        pipe.zadd(self._key(name, domain, "versions"), {str(version): version})
        pipe.sadd(self._domains_key(name), domain)
        pipe.execute()
        self._apply_retention(name, domain)  # rejected candidates too: a gate that never passes grows nothing
        return meta

    def publish(self, name: str, weights: dict[str, torch.Tensor], **kwargs) -> DraftVersion:
        """Add a version and make it live; its parent is, unless given, the live version it replaces."""
        kwargs.setdefault("parent", self.live_version(name, kwargs.get("domain", ALL_DOMAINS)))
        meta = self.add(name, weights, **kwargs)
        return self.promote(name, meta.domain, meta.version, event="publish")

    def promote(
        self, name: str, domain: str, version: int, event: str = "publish", reason: str = ""
    ) -> DraftVersion:
        """Make `version` live: the previous live one becomes retired (or rejected, on rollback)."""
        new = self.get(name, domain, version)
        old = self.live(name, domain)
        old_status: Status = "rejected" if event == "rollback" else "retired"
        old_meta = b""
        if old is not None and old.version != version:
            extra = old.extra | ({"rolled_back": reason or True} if event == "rollback" else {})
            old_meta = replace(old, status=old_status, extra=extra).to_json()
        live = replace(new, status="live")
        message = {"event": event, "name": name, "domain": domain, "version": version, "time": time.time()}
        previous = None if old is None else old.version
        message |= {"previous": previous, "reason": reason, "gate_acceptance": new.gate_acceptance}
        self._promote(
            keys=[
                self._key(name, domain, "live"),
                self._key(name, domain, "versions"),
                self._key(name, domain, "v", version),
                self._key(name, domain, "v", old.version if old else version),
                self.history_key,
            ],
            args=[version, live.to_json(), old_meta, json.dumps(message), EVENTS_CHANNEL, HISTORY_LENGTH],
        )
        self._apply_retention(name, domain)
        return live

    def rollback(
        self, name: str, domain: str = ALL_DOMAINS, to: int | None = None, reason: str = ""
    ) -> DraftVersion:
        """Make an earlier version live again: `to`, or else the live version's parent, or else the
        newest earlier version that is stored and not rejected. The version rolled back is marked rejected."""
        current = self.live(name, domain)
        if current is None:
            raise UnknownVersionError(f"{name}/{domain} has no live version to roll back")
        if to is None:
            stored = self.versions(name, domain)
            usable = {v.version for v in stored if v.version < current.version and v.status != "rejected"}
            if not usable:
                raise UnknownVersionError(f"{name}/{domain} v{current.version} has no earlier usable version")
            to = current.parent if current.parent in usable else max(usable)
        return self.promote(name, domain, to, event="rollback", reason=reason)

    def reject(self, name: str, domain: str, version: int, reason: str) -> DraftVersion:
        """Mark a candidate rejected (e.g. by the gate), with the reason kept in `extra`."""
        meta = self.get(name, domain, version)
        rejected = replace(meta, status="rejected", extra=meta.extra | {"reason": reason})
        message = {"event": "reject", "name": name, "domain": domain, "version": version, "reason": reason}
        event = json.dumps(message | {"time": time.time(), "gate_acceptance": meta.gate_acceptance})
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self._key(name, domain, "v", version), rejected.to_json())
        pipe.lpush(self.history_key, event)
        pipe.ltrim(self.history_key, 0, HISTORY_LENGTH - 1)
        pipe.publish(EVENTS_CHANNEL, event)
        pipe.execute()
        return rejected

    @property
    def history_key(self) -> str:
        return f"{self.prefix}:history"

    def history(self, since: float = 0.0) -> list[dict]:
        """Publish, rollback and reject events since `since` (unix seconds), oldest first; the last
        HISTORY_LENGTH are kept."""
        events = []
        for raw in reversed(self.client.lrange(self.history_key, 0, -1)):
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("time", 0) >= since:
                events.append(event)
        return events

    def get(self, name: str, domain: str, version: int) -> DraftVersion:
        raw = self.client.get(self._key(name, domain, "v", version))
        if raw is None:
            raise UnknownVersionError(f"{name}/{domain} has no version {version}")
        return DraftVersion.from_json(raw)

    def live_version(self, name: str, domain: str = ALL_DOMAINS) -> int | None:
        raw = self.client.get(self._key(name, domain, "live"))
        return None if raw is None else int(raw)

    def live(self, name: str, domain: str = ALL_DOMAINS) -> DraftVersion | None:
        version = self.live_version(name, domain)
        return None if version is None else self.get(name, domain, version)

    def versions(self, name: str, domain: str = ALL_DOMAINS) -> list[DraftVersion]:
        """Every stored version, oldest first."""
        numbers = self.client.zrange(self._key(name, domain, "versions"), 0, -1)
        keys = [self._key(name, domain, "v", int(n)) for n in numbers]
        return [DraftVersion.from_json(raw) for raw in (self.client.mget(keys) if keys else []) if raw]

    def load(self, meta: DraftVersion) -> dict[str, torch.Tensor]:
        """The version's weights, checksum verified and all finite; CorruptWeightsError otherwise."""
        if meta.uri is not None:
            try:
                blob = self._weights_file(meta.uri).read_bytes()
            except OSError as err:
                raise CorruptWeightsError(f"cannot read {meta.uri}: {err}") from err
        else:
            keys = [
                self._key(meta.name, meta.domain, "v", meta.version, "blob", i) for i in range(meta.chunks)
            ]
            parts = self.client.mget(keys)
            if any(part is None for part in parts):
                raise CorruptWeightsError(f"{meta.name}/{meta.domain} v{meta.version}: weight chunks missing")
            blob = b"".join(parts)
        if hashlib.sha256(blob).hexdigest() != meta.sha256:
            raise CorruptWeightsError(f"{meta.name}/{meta.domain} v{meta.version}: checksum mismatch")
        try:
            weights = load_safetensors(blob)
        except Exception as err:  # safetensors raises its own error types for malformed headers
            raise CorruptWeightsError(f"{meta.name}/{meta.domain} v{meta.version}: {err}") from err
        if bad := [n for n, t in weights.items() if t.is_floating_point() and not t.isfinite().all()]:
            raise CorruptWeightsError(f"{meta.label}: non-finite weights in {bad[:3]}")
        return weights

    def _weights_file(self, uri: str) -> Path:
        """The file behind a `file://` URI, which must lie inside `file_dir` (CorruptWeightsError)."""
        parsed = urlparse(uri)
        path, root = Path(parsed.path).resolve(), self.file_dir
        if parsed.scheme != "file" or root is None or not path.is_relative_to(root.resolve()):
            raise CorruptWeightsError(f"weights URI {uri!r} is outside the registry's file directory")
        return path

    def _apply_retention(self, name: str, domain: str) -> None:
        """Keep the newest `keep` versions, the live one and its parent (the rollback target);
        delete the rest, weights first."""
        live = self.live(name, domain)
        protected = set() if live is None else {live.version, live.parent}
        stored = self.versions(name, domain)
        for meta in stored[: max(0, len(stored) - self.keep)]:
            if meta.version in protected:
                continue
            pipe = self.client.pipeline(transaction=True)
            pipe.zrem(self._key(name, domain, "versions"), str(meta.version))
            pipe.delete(self._key(name, domain, "v", meta.version))
            pipe.delete(
                *[self._key(name, domain, "v", meta.version, "blob", i) for i in range(meta.chunks)] or ["-"]
            )
            pipe.execute()
            if meta.uri is not None:
                try:
                    self._weights_file(meta.uri).unlink(missing_ok=True)
                except CorruptWeightsError:
                    log.warning("%s: not deleting %s, outside the file directory", meta.label, meta.uri)


class LiveWatcher:
    """Calls `on_change(version)` from a daemon thread whenever (name, domain)'s live version changes,
    or with domain None that of any domain of `name`: at start, on each pub/sub announcement, and
    on a poll every `poll_seconds` as a fallback. A version counts as handled once on_change
    returned, or raised anything but a transient error (TRANSIENT_ERRORS: it is offered again at
    the next look)."""

    def __init__(
        self,
        registry: Registry,
        name: str,
        on_change: Callable[[DraftVersion], None],
        domain: str | None = ALL_DOMAINS,
        poll_seconds: float = 2.0,
    ):
        self.registry, self.name, self.domain = registry, name, domain
        self.on_change, self.poll_seconds = on_change, poll_seconds
        self.seen: dict[str, int] = {}  # per domain, the last live version on_change handled
        self.started = threading.Event()  # set once the first look at the live version is over
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"live-watcher-{name}", daemon=True)
        self._thread.start()

    def _check(self) -> None:
        domains = self.registry.domains(self.name) if self.domain is None else [self.domain]
        for domain in domains:
            version = self.registry.live_version(self.name, domain)
            if version is None or version == self.seen.get(domain):
                continue
            try:
                self.on_change(self.registry.get(self.name, domain, version))
            except TRANSIENT_ERRORS as err:  # not seen: offered again at the next look
                log.warning(
                    "%s/%s v%d not loaded, retrying at the next look: %s", self.name, domain, version, err
                )
                continue
            except Exception:  # refused for what it is (e.g. corrupt weights): not offered again
                log.exception("handling %s/%s v%d failed", self.name, domain, version)
            self.seen[domain] = version

    def _run(self) -> None:
        pubsub, next_poll = None, 0.0
        while not self._stop.is_set():
            try:
                if pubsub is None:
                    pubsub = self.registry.client.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(EVENTS_CHANNEL)
                    next_poll = 0.0
                if time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + self.poll_seconds
                    try:
                        self._check()
                    finally:
                        self.started.set()
                if pubsub.get_message(timeout=min(0.5, self.poll_seconds)) is not None:
                    self._check()  # any registry event: look now
            except redis.RedisError as err:
                log.warning("registry watch for %s/%s failed, retrying: %s", self.name, self.domain, err)
                pubsub = None
                self._stop.wait(min(self.poll_seconds, 5.0))
            except Exception:  # e.g. an unreadable domain list: keep watching
                log.exception("watching %s/%s failed", self.name, self.domain)
        if pubsub is not None:
            pubsub.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
