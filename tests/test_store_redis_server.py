"""The embedded redis-server launcher, its supervision, and connecting by URL."""

from __future__ import annotations

import os
import signal
import subprocess
import threading

import pytest
import redis
from polling import PATIENCE, wait_for

from store.redis_server import (
    LocalRedis,
    RedisConfig,
    RedisUnavailableError,
    connect,
    free_port,
    open_redis,
    read_restarts,
)


def test_missing_binary_names_the_install_command():
    with pytest.raises(RedisUnavailableError, match="apt-get install -y redis-server"):
        LocalRedis(binary="no-such-redis-server")


def test_local_server_binds_loopback_persists_with_aof_and_stops(tmp_path):
    server = LocalRedis(data_dir=tmp_path).start(timeout=PATIENCE)
    client = server.client()
    config = client.config_get("*")
    assert config["bind"].startswith("127.0.0.1") and config["appendonly"] == "yes"
    assert config["appendfsync"] == "everysec"
    assert not supervisors(server) and read_restarts(client) is None  # unsupervised unless asked
    client.set("kept", "yes")
    server.stop(timeout=PATIENCE)  # a clean shutdown fsyncs the AOF (the timeout only guards a hang)
    with pytest.raises(redis.ConnectionError):
        client.ping()
    server.start(timeout=PATIENCE)
    assert client.get("kept") == b"yes"
    server.close()
    assert (tmp_path / "appendonlydir").exists()  # a caller-owned data dir is left in place


def supervisors(server: LocalRedis) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"redis-supervisor-{server.port}"]


def recorded_restarts(client: redis.Redis) -> int | None:
    try:
        return read_restarts(client)
    except redis.RedisError:  # not back yet
        return None


def test_a_supervised_server_killed_comes_back_on_its_port_with_its_data(tmp_path, caplog):
    # appendfsync always: every acknowledged write is in the AOF before the kill (everysec may hold
    # a write back for up to 2 s while an fsync is slow, as on a busy machine, and lose it to kill -9)
    always = ["--appendfsync", "always"]
    server = LocalRedis(data_dir=tmp_path, supervise=True, extra_args=always).start(timeout=PATIENCE)
    try:
        client, port = server.client(), server.port
        assert read_restarts(client) == 0
        client.set("kept", "yes")
        client.xgroup_create("stream", "group", id="0", mkstream=True)
        client.xadd("stream", {"n": "1"})
        assert len(client.xreadgroup("group", "reader", {"stream": ">"})[0][1]) == 1  # now pending
        for restart in (1, 2):  # the second dies soon after its start: it comes back after a pause
            killed = server.process.pid
            os.kill(killed, signal.SIGKILL)  # as an operator's kill -9, not through the object
            wait_for(lambda n=restart: recorded_restarts(client) == n)  # the same client reconnects
            assert server.process.pid != killed and server.port == port and server.restarts == restart
            assert client.get("kept") == b"yes"
        # The consumer group survives from the AOF: its pending entry, and new ones after it.
        assert [e[1] for e in client.xreadgroup("group", "reader", {"stream": "0"})[0][1]] == [{b"n": b"1"}]
        client.xadd("stream", {"n": "2"})
        assert [e[1] for e in client.xreadgroup("group", "reader", {"stream": ">"})[0][1]] == [{b"n": b"2"}]
        assert f"redis-server on port {port} died (SIGKILL)" in caplog.text
    finally:
        server.close()


def test_a_deliberate_stop_is_not_healed_and_a_start_supervises_again(tmp_path):
    server = LocalRedis(data_dir=tmp_path, supervise=True).start(timeout=PATIENCE)
    client = server.client()
    assert supervisors(server)
    server.stop(timeout=PATIENCE)
    assert not supervisors(server) and server.process is None  # nothing is left to restart it
    with pytest.raises(redis.ConnectionError):
        client.ping()
    server.start(timeout=PATIENCE)
    try:
        assert read_restarts(client) == 0  # counted anew from each start
        os.kill(server.process.pid, signal.SIGKILL)
        wait_for(lambda: recorded_restarts(client) == 1)
    finally:
        server.close()


def test_redis_url_with_password(redis_server):
    admin = redis_server.client()
    admin.acl_setuser("osd", enabled=True, passwords=["+s3cret"], keys="*", commands=["+@all"])
    try:
        client = open_redis(f"redis://osd:s3cret@127.0.0.1:{redis_server.port}/0")
        assert client.ping()
        with pytest.raises(redis.AuthenticationError):
            open_redis(f"redis://osd:wrong@127.0.0.1:{redis_server.port}/0").ping()
    finally:
        admin.acl_deluser("osd")


def test_connect_starts_the_embedded_server_without_a_url(tmp_path):
    client, server = connect(RedisConfig(data_dir=tmp_path / "data"))
    try:
        assert client.ping() and server is not None and server.data_dir == tmp_path / "data"
        assert server.supervise and read_restarts(client) == 0  # healed when it dies, counted
    finally:
        server.close()


def test_connect_to_a_url_checks_it_answers(redis_server):
    client, server = connect(RedisConfig(url=redis_server.url))
    assert server is None and client.ping()
    with pytest.raises(RedisUnavailableError, match="cannot reach"):
        connect(RedisConfig(url=f"redis://127.0.0.1:{free_port()}/0"))


def test_rediss_url_connects_over_tls(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    tls_port = free_port()
    tls = ["--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
           "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"]  # fmt: skip
    with LocalRedis(extra_args=tls):
        client = open_redis(f"rediss://127.0.0.1:{tls_port}/0", ssl_ca_certs=str(cert))
        assert client.ping()
        with pytest.raises(redis.ConnectionError):  # plain text to the TLS port: the server hangs up
            open_redis(f"redis://127.0.0.1:{tls_port}/0", socket_timeout=PATIENCE).ping()
