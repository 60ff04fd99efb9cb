"""Security: admin tokens (none, wrong, rotated away), hostile bytes in Redis (a pickle in the trace
stream, in a registry blob and in registry metadata: never executed), a registry entry pointing at a
file outside the registry's directory, loopback defaults, and a password-protected Redis."""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import replace
from pathlib import Path

import pytest
import redis
import torch
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from deploy.serve import Endpoint, parser
from serving.http.api import create_app
from store.redis_server import LocalRedis, RedisConfig, redacted
from store.registry import CorruptWeightsError, Registry
from store.traces import SCHEMA_VERSION, StreamConfig, TraceReader


class Bomb:
    """Unpickling it creates `marker`: proof that something executed it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_admin_routes_refuse_no_wrong_or_rotated_tokens(tiny_replica):
    make, models = tiny_replica
    replica, tokenizer = make("admin-tokens"), AutoTokenizer.from_pretrained(models.target)
    old = TestClient(create_app(replica, tokenizer, "demo", admin_token="old-token"))
    new = TestClient(create_app(replica, tokenizer, "demo", admin_token="new-token"))  # after a rotation
    assert old.get("/admin/versions", headers={"Authorization": "Bearer old-token"}).status_code == 200
    assert new.get("/admin/versions").status_code == 401
    assert new.get("/admin/versions", headers={"Authorization": "Bearer old-token"}).status_code == 403
    empty = {"Authorization": "Bearer "}
    assert new.post("/admin/rollback", json={}, headers=empty).status_code in (401, 403)
    assert new.get("/admin/versions", headers={"Authorization": "Bearer new-token"}).status_code == 200


def test_a_pickle_in_the_trace_stream_or_the_registry_is_never_executed(redis_client, tmp_path):
    marker = tmp_path / "executed"
    payload = pickle.dumps(Bomb(marker))
    stream = StreamConfig(stream="t:hostile")
    redis_client.xadd(stream.stream, {b"v": str(SCHEMA_VERSION).encode(), b"meta": payload, b"data": payload})
    reader = TraceReader(redis_client, "c", stream)
    assert reader.read(count=10) == [] and reader.skipped_unknown == 1

    registry = Registry(redis_client)
    meta = registry.publish("draft", {"w": torch.ones(4)})
    redis_client.set(f"osd:registry:draft:-:v:{meta.version}:blob:0", payload)  # weights replaced
    with pytest.raises(CorruptWeightsError):
        registry.load(meta)
    forged = replace(meta, sha256=hashlib.sha256(payload).hexdigest())  # even with its checksum
    with pytest.raises(CorruptWeightsError):
        registry.load(forged)
    redis_client.set(f"osd:registry:draft:-:v:{meta.version}", payload)  # metadata replaced
    with pytest.raises(ValueError):
        registry.live("draft")
    assert not marker.exists()


def test_weights_files_are_read_and_deleted_only_inside_the_registry_directory(redis_client, tmp_path):
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(b"not yours")
    registry = Registry(redis_client, file_dir=tmp_path / "registry", inline_limit=0, keep=1)
    meta = registry.publish("draft", {"w": torch.ones(4)})
    assert meta.uri.startswith("file://") and registry.load(meta)["w"].sum() == 4
    for uri in (outside.as_uri(), f"{meta.uri}/../../../../secret.safetensors", "http://127.0.0.1/x"):
        with pytest.raises(CorruptWeightsError, match="outside"):
            registry.load(replace(meta, uri=uri))
    with pytest.raises(CorruptWeightsError, match="outside"):
        Registry(redis_client).load(meta)  # no file directory: no file URIs at all
    # A forged entry that retention would delete: the file outside stays.
    forged = replace(meta, version=meta.version + 1, uri=outside.as_uri(), status="retired")
    redis_client.set(f"osd:registry:draft:-:v:{forged.version}", forged.to_json())
    redis_client.zadd("osd:registry:draft:-:versions", {str(forged.version): 0})
    registry.publish("draft", {"w": torch.zeros(4)})
    assert outside.read_bytes() == b"not yours"


def test_servers_bind_to_loopback_unless_told_otherwise():
    args = parser().parse_args(["--target", "x"])
    assert args.host == Endpoint().host == "127.0.0.1"
    assert RedisConfig().url is None  # the embedded redis-server, on loopback (below)


def test_a_redis_password_is_required_and_never_printed(tmp_path):
    with LocalRedis(data_dir=tmp_path, password="p@ss/w0rd") as server:
        assert server.client().ping()  # the URL carries the password, quoted
        assert "p@ss" not in redacted(server.url) and server.host == "127.0.0.1"
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=server.port).ping()
        assert "p@ss" not in " ".join(server.process.args)  # not on the command line `ps` shows
    with pytest.raises(ValueError, match="quotes"):
        LocalRedis(data_dir=tmp_path, password='a"b')
