"""The draft registry on a real redis-server: versions, atomic publish, rollback, watching, corruption."""

from __future__ import annotations

import json
import threading

import pytest
import redis
import torch
from polling import wait_for

from store.registry import (
    ALL_DOMAINS,
    EVENTS_CHANNEL,
    CorruptWeightsError,
    LiveWatcher,
    Registry,
    UnknownVersionError,
)


def weights(seed: int, size: int = 64) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"embed.weight": torch.randn(size, 8, generator=gen), "norm.weight": torch.ones(8) * seed}


NEVER = 3600.0  # seconds: a watcher poll that never comes during a test, so only pub/sub can tell


def listeners(client) -> set[str]:
    """The ids of the connections subscribed to a channel (in these tests, the registry's): a
    publish after one is listed here reaches it. Ids are never reused, so a new one is new."""
    return {c["id"] for c in client.client_list(_type="pubsub") if int(c["sub"]) > 0}


class CountingRegistry(Registry):
    """A registry that counts its look-ups of the live version: one per domain a watcher checks."""

    looks = 0

    def live_version(self, name: str, domain: str = ALL_DOMAINS) -> int | None:
        self.looks += 1
        return super().live_version(name, domain)


def assert_weights_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_publish_round_trips_weights_and_every_metadata_field(redis_client):
    registry = Registry(redis_client)
    meta = registry.publish(
        "draft", weights(1), domain="python", parent=None, train_steps=120, gate_acceptance=0.61,
        kind="lora", extra={"gate": {"live": 0.52, "candidate": 0.61}},
    )  # fmt: skip
    live = registry.live("draft", "python")
    assert live == meta and live.status == "live" and live.version == 1
    assert (live.train_steps, live.gate_acceptance, live.kind) == (120, 0.61, "lora")
    assert live.extra == {"gate": {"live": 0.52, "candidate": 0.61}} and live.created > 0
    assert_weights_equal(registry.load(live), weights(1))
    assert registry.live("draft") is None  # another domain: nothing published there


def test_publish_retires_the_previous_version_and_rollback_restores_it(redis_client):
    registry = Registry(redis_client)
    v1 = registry.publish("draft", weights(1))
    v2 = registry.publish("draft", weights(2), parent=v1.version)
    assert [v.status for v in registry.versions("draft")] == ["retired", "live"]
    back = registry.rollback("draft", reason="live acceptance fell 0.2 below the gate")
    assert back.version == v1.version and registry.live_version("draft") == 1
    rolled = registry.get("draft", "-", v2.version)
    assert rolled.status == "rejected" and "0.2" in rolled.extra["rolled_back"]
    assert_weights_equal(registry.load(registry.live("draft")), weights(1))
    with pytest.raises(UnknownVersionError, match="no earlier usable version"):
        registry.rollback("draft")


def test_rollback_to_a_named_version_and_gate_rejections(redis_client):
    registry = Registry(redis_client)
    for seed in range(1, 4):
        registry.publish("draft", weights(seed))
    candidate = registry.add("draft", weights(9), parent=3)
    assert registry.live_version("draft") == 3 and candidate.status == "candidate"
    rejected = registry.reject("draft", "-", candidate.version, reason="gate: 0.40 < live 0.55")
    assert rejected.status == "rejected" and rejected.extra["reason"].startswith("gate")
    assert registry.rollback("draft", to=1).version == 1
    with pytest.raises(UnknownVersionError):
        registry.rollback("draft", to=42)


def test_retention_keeps_the_newest_versions_the_live_one_and_its_parent(redis_client):
    registry = Registry(redis_client, keep=3)
    registry.publish("draft", weights(1))
    registry.publish("draft", weights(2), parent=1)
    for seed in range(3, 8):
        registry.reject("draft", "-", registry.add("draft", weights(seed), parent=2).version, "gate")
    assert [v.version for v in registry.versions("draft")] == [1, 2, 5, 6, 7]  # no publish needed
    registry.publish("draft", weights(8), parent=2)
    kept = [v.version for v in registry.versions("draft")]
    assert kept == [2, 6, 7, 8]  # the parent of the live version stays: it is the rollback target
    assert not redis_client.keys("osd:registry:draft:-:v:1*")  # metadata and chunks gone
    assert registry.rollback("draft").version == 2


def test_chunked_and_file_weights_load_back(redis_client, tmp_path, monkeypatch):
    monkeypatch.setattr("store.registry.CHUNK_BYTES", 1000)
    registry = Registry(redis_client)
    meta = registry.publish("big", weights(3, size=512))
    assert meta.chunks > 10 and meta.uri is None
    assert_weights_equal(registry.load(meta), weights(3, size=512))

    on_disk = Registry(redis_client, file_dir=tmp_path, inline_limit=1000)
    meta = on_disk.publish("huge", weights(4, size=512))
    assert meta.chunks == 0 and meta.uri.startswith("file://")
    assert_weights_equal(on_disk.load(meta), weights(4, size=512))


def test_a_corrupt_blob_is_refused_and_live_stays(redis_client, tmp_path):
    registry = Registry(redis_client)
    good = registry.publish("draft", weights(1))
    bad = registry.publish("draft", weights(2))
    key = f"osd:registry:draft:-:v:{bad.version}:blob:0"
    blob = bytearray(redis_client.get(key))
    blob[-1] ^= 0xFF
    redis_client.set(key, bytes(blob))
    with pytest.raises(CorruptWeightsError, match="checksum"):
        registry.load(bad)
    redis_client.delete(key)
    with pytest.raises(CorruptWeightsError, match="missing"):
        registry.load(bad)
    assert_weights_equal(registry.load(good), weights(1))


def test_a_concurrent_reader_never_sees_a_half_written_version(redis_client):
    registry = Registry(redis_client)
    registry.publish("draft", weights(0, size=2048))
    seen, errors, done = set(), [], threading.Event()

    def read_live() -> None:
        reader = Registry(redis_client)
        while not done.is_set():
            try:
                meta = reader.live("draft")
                loaded = reader.load(meta)  # checksum verified
                seen.add(meta.version)
                seed = int(loaded["norm.weight"][0])
                assert_weights_equal(loaded, weights(seed, size=2048))
            except Exception as err:  # noqa: BLE001 - any failure is the finding
                errors.append(err)

    thread = threading.Thread(target=read_live)
    thread.start()
    live = [1]
    try:
        for seed in range(1, 15):
            if seed % 5 == 0:
                live.append(registry.rollback("draft").version)
            else:
                live.append(registry.publish("draft", weights(seed, size=2048)).version)
            # The reader loads each version while the next one is being written.
            wait_for(lambda v=live[-1]: v in seen or errors)
    finally:
        done.set()
        thread.join()
    assert not errors, errors[:3]
    assert seen == set(live)


def test_publish_announces_and_the_watcher_follows_live(redis_client):
    registry = Registry(redis_client)
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    before = listeners(redis_client)
    pubsub.subscribe(EVENTS_CHANNEL)
    (ours,) = wait_for(lambda: listeners(redis_client) - before)
    changes: list[int] = []
    registry.publish("draft", weights(1))
    watcher = LiveWatcher(registry, "draft", lambda meta: changes.append(meta.version), poll_seconds=NEVER)
    wait_for(lambda: changes == [1])  # the version live at start-up
    wait_for(lambda: listeners(redis_client) - before - {ours})  # the watcher listens
    registry.publish("draft", weights(2))
    wait_for(lambda: changes == [1, 2])  # by pub/sub: its first poll is an hour away
    watcher.stop()
    event = json.loads(wait_for(pubsub.get_message)["data"])
    assert (event["event"], event["version"], event["previous"]) == ("publish", 1, None)


def test_a_refused_version_is_not_offered_again_and_watching_goes_on(redis_client):
    registry = Registry(redis_client)
    offered: list[int] = []

    def refuse_two(meta) -> None:
        offered.append(meta.version)
        if meta.version == 2:
            raise CorruptWeightsError("refused")

    registry.publish("draft", weights(1))
    watched = CountingRegistry(redis_client)
    watcher = LiveWatcher(watched, "draft", refuse_two, poll_seconds=0.05)
    wait_for(lambda: offered == [1])  # the version live at start-up
    registry.publish("draft", weights(2))
    wait_for(lambda: offered == [1, 2])
    looks = watched.looks
    wait_for(lambda: watched.looks >= looks + 3)  # three more looks at the live version, still 2
    assert offered == [1, 2]
    registry.publish("draft", weights(3))
    wait_for(lambda: offered == [1, 2, 3])
    watcher.stop()


class FlakyRegistry(CountingRegistry):
    """A registry whose first weight load fails as a load does while Redis restarts."""

    def __init__(self, client, error: Exception):
        super().__init__(client)
        self.error = error

    def load(self, meta):
        error, self.error = self.error, None
        if error is not None:
            raise error
        return super().load(meta)


@pytest.mark.parametrize("error", [redis.ConnectionError("Connection refused"), TimeoutError("timed out")])
def test_a_version_whose_load_failed_on_a_transient_error_is_offered_again(redis_client, error, caplog):
    registry = Registry(redis_client)
    published = registry.publish("draft", weights(1))
    flaky = FlakyRegistry(redis_client, error)
    offered, loaded = [], []

    def swap(meta) -> None:  # as a replica's: a load's Redis error is not caught, content errors are
        offered.append(meta.version)
        loaded.append(flaky.load(meta))

    watcher = LiveWatcher(flaky, "draft", swap, poll_seconds=0.05)
    wait_for(lambda: watcher.seen == {ALL_DOMAINS: 1})  # retried on a later look, with no new publish
    assert offered == [1, 1]
    assert_weights_equal(loaded[0], weights(1))
    assert f"draft/{ALL_DOMAINS} v{published.version} not loaded, retrying" in caplog.text
    looks = flaky.looks
    wait_for(lambda: flaky.looks >= looks + 3)  # handled now: not offered again
    assert offered == [1, 1]
    watcher.stop()


def test_each_domain_has_its_own_versions_labels_and_live_pointer(redis_client):
    registry = Registry(redis_client)
    shared = registry.publish("draft", weights(1))
    python = registry.publish("draft", weights(2), domain="python", kind="lora")
    assert (shared.label, python.label) == ("draft:v1", "draft/python:v1")
    assert registry.domains("draft") == ["-", "python"] and registry.domains("other") == []
    registry.publish("draft", weights(3), domain="python", kind="lora")
    assert registry.live_version("draft") == 1 and registry.live_version("draft", "python") == 2


def test_a_watcher_of_every_domain_sees_each_domains_changes(redis_client):
    registry = Registry(redis_client)
    seen: list[str] = []
    registry.publish("draft", weights(1))
    before = listeners(redis_client)
    watcher = LiveWatcher(registry, "draft", lambda m: seen.append(m.label), domain=None, poll_seconds=NEVER)
    wait_for(lambda: seen == ["draft:v1"])
    wait_for(lambda: listeners(redis_client) - before)  # the watcher listens: only pub/sub tells it below
    registry.publish("draft", weights(2), domain="c")  # a domain that did not exist at start-up
    wait_for(lambda: seen == ["draft:v1", "draft/c:v1"])
    registry.publish("draft", weights(3), domain="python")
    wait_for(lambda: seen[-1] == "draft/python:v1")
    assert sorted(seen) == ["draft/c:v1", "draft/python:v1", "draft:v1"]
    watcher.stop()


def test_publishes_rollbacks_and_rejections_are_kept_in_a_history(redis_client):
    registry = Registry(redis_client)
    registry.publish("draft", weights(1))
    registry.publish("draft", weights(2))
    candidate = registry.add("draft", weights(3), gate_acceptance=0.41)
    registry.reject("draft", "-", candidate.version, "gate: 0.41 < live 0.45")
    registry.rollback("draft", reason="watch")
    events = registry.history()
    assert [(e["event"], e["version"]) for e in events] == [
        ("publish", 1), ("publish", 2), ("reject", 3), ("rollback", 1),
    ]  # fmt: skip
    assert events[2]["gate_acceptance"] == 0.41 and events[3]["previous"] == 2
    assert registry.history(since=events[3]["time"]) == events[3:]
    redis_client.lpush(registry.history_key, b"\x80\x04not json")  # never unpickled: skipped
    assert len(registry.history()) == 4
