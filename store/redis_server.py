"""The Redis connection: an embedded local redis-server by default, or an existing one by URL.

`LocalRedis` runs `redis-server` on a free loopback port with its own data directory and AOF
persistence (appendfsync everysec), so acknowledged writes survive a crash with at most about a
second lost. `open_redis(url)` connects to an existing server instead (`redis://:password@host`,
`rediss://` for TLS). Nothing here decodes values: callers decide what bytes mean.

Supervision (`supervise`, on for the embedded server `connect` starts): a thread waits on the
redis-server process and, when it dies, starts it again from its AOF on the same port with the
same data directory, logs a warning naming the exit code or signal, and records the count of
restarts in Redis itself (`RESTARTS_KEY`, read by `read_restarts` for `/metrics`), where the
replicas' processes can see it. A server that dies soon after its start waits longer before each
next one (up to `MAX_BACKOFF_SECONDS`). stop() ends supervision first: a deliberate stop is not
healed. Clients reconnect on their own: redis-py opens a new connection for the next command.
"""

from __future__ import annotations

import logging
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import redis

log = logging.getLogger(__name__)

INSTALL_HINT = "install it with `apt-get update && apt-get install -y redis-server` (Debian/Ubuntu)"
RESTARTS_KEY = "osd:redis:restarts"  # how often the supervisor restarted the embedded server
STABLE_SECONDS = 30.0  # a server that ran this long is restarted at once; one that died sooner waits
MAX_BACKOFF_SECONDS = 30.0


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


def read_restarts(client: redis.Redis) -> int | None:
    """How often the supervisor restarted the embedded redis-server since it started it, or None
    when no supervisor records it (an external Redis)."""
    raw = client.get(RESTARTS_KEY)
    return int(raw) if raw is not None and raw.isdigit() else None


def exit_reason(code: int) -> str:
    """A process's return code in words: "SIGKILL" for a signal, else "exit code N"."""
    if code >= 0:
        return f"exit code {code}"
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


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
    starts the embedded local redis-server, supervised, keeping its data in data_dir."""

    url: str | None = None
    data_dir: Path = Path.home() / ".cache" / "osd" / "redis"


def connect(config: RedisConfig) -> tuple[redis.Redis, LocalRedis | None]:
    """A client for the configured server, and the embedded server when one was started (the
    caller stops it; until then it is restarted whenever it dies). A configured URL must answer a
    PING."""
    if config.url is None:
        server = LocalRedis(data_dir=config.data_dir, supervise=True).start()
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
    object simulate a crash and a restart from the AOF (same port, same data); with `supervise`,
    the supervisor makes that restart itself (see the module docstring).
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
        supervise: bool = False,
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
        self.supervise = supervise
        self.restarts = 0  # by the supervisor, since start()
        self._began = 0.0  # monotonic time of the process's start
        self._lock = threading.Lock()  # one start at a time: start() or the supervisor
        self._halt = threading.Event()  # set: supervision is over
        self._supervisor: threading.Thread | None = None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def client(self, **kwargs) -> redis.Redis:
        return open_redis(self.url, **kwargs)

    def start(self, timeout: float = 10.0) -> LocalRedis:
        """Start redis-server unless it runs, waiting up to `timeout` s until it answers; with
        `supervise`, also its supervisor, which gives each restart as long."""
        with self._lock:
            if self.process is None or self.process.poll() is not None:
                self._launch(timeout)
        if self.supervise and (self._supervisor is None or not self._supervisor.is_alive()):
            self._halt, self.restarts = threading.Event(), 0
            self._record_restarts()
            self._supervisor = threading.Thread(
                target=self._supervise, args=(self._halt, timeout), name=f"redis-supervisor-{self.port}",
                daemon=True,
            )  # fmt: skip
            self._supervisor.start()
        return self

    def _launch(self, timeout: float) -> None:
        """Run redis-server and wait until it answers a PING (RedisUnavailableError otherwise)."""
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()  # the previous process's, which has exited
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
        self._began = time.monotonic()
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        with self.client(socket_timeout=0.5, socket_connect_timeout=0.5) as client:
            while True:
                if self.process.poll() is not None:
                    error = self.process.stderr.read().decode(errors="replace").strip()
                    tail = (self.data_dir / "redis.log").read_text(errors="replace")[-500:]
                    raise RedisUnavailableError(f"redis-server exited at start-up: {error or tail}")
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.BusyLoadingError, redis.TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    self.kill()
                    raise RedisUnavailableError(
                        f"redis-server on port {self.port} not ready after {timeout} s"
                    )
                time.sleep(0.02)

    def _supervise(self, halt: threading.Event, timeout: float) -> None:
        """Until `halt`: wait for the process to die, then start it again from the AOF."""
        backoff = 0.0
        while (process := self.process) is not None:
            code = process.wait()
            if halt.is_set():
                return
            lived = time.monotonic() - self._began
            backoff = 0.0 if lived >= STABLE_SECONDS else min(max(2 * backoff, 0.5), MAX_BACKOFF_SECONDS)
            log.warning(
                "redis-server on port %d died (%s) after %.1f s; restarting it from its AOF in %s%s",
                self.port, exit_reason(code), lived, self.data_dir,
                f", after a {backoff:.1f} s pause" if backoff else "",
            )  # fmt: skip
            if halt.wait(backoff):
                return
            with self._lock:
                if halt.is_set():
                    return
                if self.process is not process:  # start() was quicker
                    continue
                try:
                    self._launch(timeout)
                except (RedisUnavailableError, OSError) as err:
                    log.error("restarting redis-server on port %d failed: %s", self.port, err)
                    continue
                self.restarts += 1
            log.warning("redis-server on port %d is back (restart %d)", self.port, self.restarts)
            self._record_restarts()

    def _record_restarts(self) -> None:
        """Put the count of restarts where every process's /metrics reads it (`read_restarts`)."""
        try:
            with self.client() as client:
                client.set(RESTARTS_KEY, self.restarts)
        except redis.RedisError as err:  # the next restart writes the count again
            log.warning("could not record %d redis-server restart(s): %s", self.restarts, err)

    def stop(self, timeout: float = 10.0) -> None:
        """Shut down cleanly: supervision ends first (a deliberate stop is not healed), then the AOF
        is flushed and fsynced before the process exits."""
        with self._lock:  # the supervisor starts nothing from here on
            self._halt.set()
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._supervisor is not None:
            self._supervisor.join(timeout)  # it wakes once the process has exited
            self._supervisor = None
        self._cleanup()

    def kill(self) -> None:
        """SIGKILL, as a crash: keeps the data directory so that start(), or the supervisor,
        recovers from the AOF."""
        process = self.process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

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
