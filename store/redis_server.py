"""The Redis connection: an embedded local redis-server by default, or an existing one by URL.

`LocalRedis` runs `redis-server` on a free loopback port with its own data directory and AOF
persistence (appendfsync everysec), so acknowledged writes survive a crash with at most about a
second lost. `open_redis(url)` connects to an existing server instead (`redis://:password@host`,
`rediss://` for TLS). Nothing here decodes values: callers decide what bytes mean.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import redis

INSTALL_HINT = "install it with `apt-get update && apt-get install -y redis-server` (Debian/Ubuntu)"


class RedisUnavailableError(RuntimeError):
    """No redis-server binary to start, or a server that did not come up."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def open_redis(url: str, **kwargs) -> redis.Redis:
    """A client for `url`; bytes in, bytes out (no decoding), with short timeouts so that a hung
    server costs seconds, not forever. kwargs override redis-py's connection options."""
    options = {"socket_timeout": 5.0, "socket_connect_timeout": 2.0, "health_check_interval": 10} | kwargs
    return redis.Redis.from_url(url, **options)


def redacted(url: str) -> str:
    """`url` fit to print: any password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True)
class RedisConfig:
    """url: an existing server (`redis://[:password@]host:port/db`, `rediss://` for TLS); None
    starts the embedded local redis-server, keeping its data in data_dir."""

    url: str | None = None
    data_dir: Path = Path.home() / ".cache" / "osd" / "redis"


def connect(config: RedisConfig) -> tuple[redis.Redis, LocalRedis | None]:
    """A client for the configured server, and the embedded server when one was started (the
    caller stops it). A configured URL must answer a PING."""
    if config.url is None:
        server = LocalRedis(data_dir=config.data_dir).start()
        return server.client(), server
    client = open_redis(config.url)
    try:
        client.ping()
    except redis.RedisError as err:
        raise RedisUnavailableError(f"cannot reach redis at {config.url}: {err}") from err
    return client, None


class LocalRedis:
    """A redis-server child process on a loopback port, with AOF persistence in `data_dir`.

    Use as a context manager, or call start() and stop(). kill() and start() again on the same
    object simulate a crash and a restart from the AOF (same port, same data).
    """

    def __init__(
        self,
        data_dir: Path | str | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        maxmemory: str | None = None,
        password: str | None = None,
        binary: str = "redis-server",
        extra_args: Sequence[str] = (),
    ):
        found = shutil.which(binary)
        if found is None:
            raise RedisUnavailableError(f"no `{binary}` on PATH; {INSTALL_HINT}, or pass a redis_url")
        self.binary = found
        self._tmp = None if data_dir is not None else tempfile.TemporaryDirectory(prefix="osd-redis-")
        self.data_dir = Path(data_dir if data_dir is not None else self._tmp.name)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port or free_port(host)
        self.maxmemory = maxmemory
        if password is not None and not re.fullmatch(r'[^"\s]+', password):
            raise ValueError("a Redis password may not contain quotes or white space")
        self.password = password  # requirepass: clients then need it in the URL
        self.extra_args = list(extra_args)  # further redis-server options, e.g. ["--tls-port", "6380"]
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def client(self, **kwargs) -> redis.Redis:
        return open_redis(self.url, **kwargs)

    def start(self, timeout: float = 10.0) -> LocalRedis:
        if self.process is not None and self.process.poll() is None:
            return self
        args = [
            self.binary,
            "--bind", self.host,
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip
        if self.maxmemory:
            args += ["--maxmemory", self.maxmemory, "--maxmemory-policy", "noeviction"]
        if self.password:  # from a file only its owner reads, not the command line that `ps` shows
            conf = self.data_dir / "auth.conf"
            conf.touch(mode=0o600)
            conf.write_text(f'requirepass "{self.password}"\n')
            args.insert(1, str(conf))
        args += self.extra_args
        # Its own session: a Ctrl-C in the terminal reaches the owner, which stops it last, after
        # the replicas have flushed their traces.
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        client = self.client(socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                error = self.process.stderr.read().decode(errors="replace").strip()
                log = (self.data_dir / "redis.log").read_text(errors="replace")[-500:]
                raise RedisUnavailableError(f"redis-server exited at start-up: {error or log}")
            try:
                if client.ping():
                    return self
            except (redis.ConnectionError, redis.BusyLoadingError, redis.TimeoutError):
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RedisUnavailableError(f"redis-server on port {self.port} not ready after {timeout} s")
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        """Shut down cleanly: the AOF is flushed and fsynced before the process exits."""
        if self.process is None or self.process.poll() is not None:
            self._cleanup()
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self._cleanup()

    def kill(self) -> None:
        """SIGKILL, as a crash: keeps the data directory so that start() recovers from the AOF."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def _cleanup(self) -> None:
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None

    def close(self) -> None:
        """Stop, and delete the data directory when it was a temporary one."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
