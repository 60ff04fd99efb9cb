"""Faults and a soak against a real `osd serve` stack on loopback, under a live workload.

The stack (`chaos_stack`): `osd serve --config` with its embedded redis-server (found as its
child process) and `replicas` replicas of the demo pair and the trainer.
A `Workload` of paced HTTP clients sends greedy completions of held-out prompts (every fourth one
streamed) the whole time, and keeps every request's outcome. Each scenario injects one fault and
reports a `Result`: requests sent, succeeded and failed (with their errors), latency p50/p99
against the calm before the fault, traces lost (served requests whose trace, found by the
response id, had not reached the stream 30 s later) next to those the replicas counted as
dropped, the recovery time, and the scenario's own checks.

- redis-kill: SIGKILL the embedded redis-server, as an operator's kill -9; `osd serve` restarts it
  from its AOF on the same port. Measured: the seconds until it answers again (`back_s`).
  Recovery: from the kill until every replica writes traces again, the stream grows and the
  trainer trains again; the requests of `calm_seconds` more count as well.
- trainer-kill: kill -9 the trainer actor's process, once it has checkpointed. Recovery: until
  Ray's restart answers.
- replica-kill: kill -9 one Serve replica's process. Recovery: until its replacement serves the
  live draft.
- bad-draft: publish past the gate a draft with NaN weights (replicas refuse it, the trainer rolls
  it back), then one whose output rows are shuffled (served, then rolled back by the trainer's live
  watch). A probe prompt's greedy text is checked against the target's throughout.
- redis-oom: maxmemory set to what Redis uses, with noeviction, for `redis_down_seconds` (longer
  if no replica has yet shown the failed writes).
- soak: `soak_seconds` at the steady rate, with replica RSS and Redis memory sampled.

    osd bench chaos --json benchmarks/results/chaos_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
import numpy as np
import psutil
import redis
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.results import print_rows, write_report
from benchmarks.serve_child import osd_serve
from deploy.demo.build import DEFAULT_CACHE_DIR, PRESETS, DemoModels, build_demo_models
from deploy.demo.workloads import fixed_prompts
from serving.engine.hf import SpecEngine
from store.load import read_load
from store.metrics import read_series
from store.redis_server import free_port, open_redis
from store.registry import Registry
from store.traces import DEFAULT_STREAM, TraceDecodeError, decode

T = TypeVar("T")
SCENARIOS = ("redis-kill", "trainer-kill", "replica-kill", "bad-draft", "redis-oom", "soak")
TOKEN = "chaos-admin-token"
SETTLE_SECONDS = 30.0  # how long a served request's trace may take to reach the stream
PROBE = [5, 17, 42, 9, 33, 8]  # token ids of the greedy probe


@dataclass(frozen=True)
class ChaosConfig:
    """One run: the stack's size, the workload, how long faults last and the bounds checked."""

    replicas: int = 2
    rate: float = 4.0  # requests/s, paced (a client whose request runs late sends the next at once)
    clients: int = 4  # the most requests in flight
    max_tokens: int = 24
    calm_seconds: float = 5.0  # workload before each fault: the latency baseline
    redis_down_seconds: float = 10.0  # redis-oom: how long writes are refused
    soak_seconds: float = 600.0
    recovery_timeout: float = 120.0
    trace_max_len: int = 1_000  # the stream's cap: the soak shows Redis memory flattening at it
    rss_bound_mb: float = 64.0  # the most a replica's RSS may grow over the soak, after its warm-up
    trainer_settings: dict = field(
        default_factory=lambda: {
            "max_in_flight": 1_000,  # train beside the workload rather than wait for a lull
            "checkpoint_every": 5,
            "gate_every": 20,
            "gate_min_positions": 200,
            "watch_requests": 10,
        }
    )


@dataclass(frozen=True)
class Outcome:
    request_id: str | None
    start: float
    end: float
    wall_end: float  # unix seconds, to compare with stream ids
    status: int  # 0: no HTTP answer
    error: str | None  # None: served in full

    @property
    def ok(self) -> bool:
        return self.error is None


def now() -> tuple[float, float]:
    return time.monotonic(), time.time()


class Workload:
    """`clients` threads pacing greedy completions at `rate` requests/s in all; outcomes are kept."""

    def __init__(self, base: str, prompts: list[list[int]], config: ChaosConfig):
        self.base, self.prompts, self.config = base, prompts, config
        self.outcomes: list[Outcome] = []
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(config.clients)
        ]

    def __enter__(self) -> Workload:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)

    def between(self, start: float, end: float) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if start <= o.start < end]

    def _run(self, index: int) -> None:
        interval = self.config.clients / self.config.rate
        due, n = time.monotonic() + index * interval / self.config.clients, index
        with httpx.Client(base_url=self.base, timeout=60) as http:
            while not self._stop.is_set():
                self._stop.wait(max(0.0, due - time.monotonic()))
                due = max(due + interval, time.monotonic())
                outcome = self._send(http, self.prompts[n % len(self.prompts)], stream=n % 4 == 3)
                n += self.config.clients
                with self._lock:
                    self.outcomes.append(outcome)

    def burst(self, n: int, max_tokens: int) -> list[Outcome]:
        """`n` streamed requests of `max_tokens` at once (beside the paced ones), so that some are in
        flight or queued on every replica; returns once all ended, their outcomes kept with the rest."""

        def one(i: int) -> Outcome:
            with httpx.Client(base_url=self.base, timeout=60) as http:
                return self._send(http, self.prompts[i % len(self.prompts)], True, max_tokens)

        with ThreadPoolExecutor(n) as pool:
            outcomes = list(pool.map(one, range(n)))
        with self._lock:
            self.outcomes += outcomes
        return outcomes

    def _send(
        self, http: httpx.Client, prompt: list[int], stream: bool, max_tokens: int | None = None
    ) -> Outcome:
        body = {"model": "demo", "prompt": prompt, "max_tokens": max_tokens or self.config.max_tokens,
                "temperature": 0, "stream": stream}  # fmt: skip
        start, status, request_id = time.monotonic(), 0, None
        try:
            with http.stream("POST", "/v1/completions", json=body) as response:
                status = response.status_code
                text = response.read().decode()
            if status != 200:
                return Outcome(None, start, *now(), status, text[:200])
            if stream:
                if not text.rstrip().endswith("data: [DONE]"):
                    return Outcome(None, start, *now(), status, "stream ended without [DONE]")
                request_id = text.split('"id":"', 1)[1].split('"', 1)[0]
            else:
                request_id = httpx.Response(200, content=text).json()["id"]
            return Outcome(request_id, start, *now(), status, None)
        except (httpx.HTTPError, ValueError, IndexError) as err:
            return Outcome(request_id, start, *now(), status, f"{type(err).__name__}: {err}")


@dataclass
class Stack:
    """A running stack: its HTTP address, the `osd serve` process (the embedded redis-server's
    parent) and its log, the URL of that redis-server and the models it serves."""

    base: str
    serve: psutil.Process
    log: Path
    redis_url: str
    models: DemoModels

    @property
    def client(self) -> redis.Redis:
        return open_redis(self.redis_url)

    def redis_server(self) -> psutil.Process | None:
        return embedded_redis(self.serve)

    def admin(self, method: str, path: str, **kwargs) -> dict:
        response = httpx.request(method, f"{self.base}/admin{path}", timeout=30,
                                 headers={"Authorization": f"Bearer {TOKEN}"}, **kwargs)  # fmt: skip
        response.raise_for_status()
        return response.json()

    def trainer(self) -> dict | None:
        try:
            return self.admin("GET", "/trainer")
        except httpx.HTTPError:
            return None

    def store_up(self) -> bool:
        """Whether every replica's last trace write succeeded."""
        return all(v == 1 for v in self.metric("trace_store_up").values())

    def metric(self, name: str) -> dict[str, float]:
        """The value of `osd:<name>` per replica, from /metrics."""
        text = httpx.get(f"{self.base}/metrics", timeout=30).text
        return {
            sample.labels.get("replica", ""): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == f"osd:{name}"
        }

    def replica_pids(self, expect: int, timeout: float = 30.0) -> dict[str, int]:
        """replica id -> pid of each replica answering /health, until `expect` have answered."""
        found: dict[str, int] = {}
        deadline = time.monotonic() + timeout
        while len(found) < expect and time.monotonic() < deadline:
            try:
                health = httpx.get(f"{self.base}/health", timeout=5).json()
                found[health["replica"]] = health["pid"]
            except (httpx.HTTPError, ValueError, KeyError):
                time.sleep(0.2)
        return found

    def probe(self) -> str:
        body = {"model": "demo", "prompt": PROBE, "max_tokens": 16, "temperature": 0}
        return httpx.post(f"{self.base}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]

    def traces(self) -> tuple[set[str], float]:
        """The request ids of every trace in the stream, and the unix time of its oldest entry
        (older ones were trimmed by the stream's cap)."""
        ids, entries = set(), self.client.xrange(DEFAULT_STREAM)
        for _, fields in entries:
            try:
                ids.add(decode(fields).request_id)
            except TraceDecodeError:
                continue
        oldest = int(entries[0][0].split(b"-")[0]) / 1000 if entries else float("inf")
        return ids, oldest


def embedded_redis(serve: psutil.Process) -> psutil.Process | None:
    """The embedded redis-server running now: the child of `osd serve` of that name."""
    for child in serve.children():
        with contextlib.suppress(psutil.Error):
            if child.name() == "redis-server" and child.status() != psutil.STATUS_ZOMBIE:
                return child
    return None


def listening_port(process: psutil.Process) -> int:
    (port,) = {c.laddr.port for c in process.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    return port


def newest_trace(client: redis.Redis) -> tuple[int, int]:
    """The stream id of the newest trace, as (ms, seq); (0, 0) for none."""
    entries = client.xrevrange(DEFAULT_STREAM, count=1)
    return tuple(map(int, entries[0][0].split(b"-"))) if entries else (0, 0)


def worker_logs(pids: Iterable[int]) -> list[Path]:
    """Where the replicas with these pids log their warnings: each one's worker stderr, and the Serve
    replica logs of its Ray session (found by pid, not as the newest session: another Ray instance
    on the machine may have started since)."""
    root = Path(tempfile.gettempdir(), "ray")
    errs = [log for pid in pids for log in root.glob(f"session_*/logs/worker-*-{pid}.err")]
    sessions = {log.parent for log in errs}
    return sorted([*errs, *(log for logs in sessions for log in logs.glob("serve/replica_*.log"))])


def grown(before: dict[str, float], after: dict[str, float]) -> float:
    """How much per-replica counters grew; a replica missing from one side (its heartbeat expired
    during an outage, or it is new) counts from zero."""
    return sum(max(0.0, value - before.get(replica, 0.0)) for replica, value in after.items())


def wait_until(condition: Callable[[], T], timeout: float, every: float = 0.25) -> T | bool:
    """The first true value of `condition` within `timeout` s (an error counts as false), else False."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if value := condition():
                return value
        except (httpx.HTTPError, redis.RedisError, ValueError, KeyError):
            pass
        time.sleep(every)
    return False


@contextmanager
def chaos_stack(models: DemoModels, workdir: Path, config: ChaosConfig) -> Iterator[Stack]:
    """`osd serve` with its embedded redis-server (its AOF in workdir/redis; its output in
    workdir/serve.log) on free loopback ports, until exit."""
    settings = {
        "target": str(models.target), "draft": str(models.draft), "served_model_names": ["demo"],
        "replicas": config.replicas, "replica_cpus": 0.5, "torch_threads": 1,
        "trainer_dir": str(workdir / "trainer"),
        "trace_max_len": config.trace_max_len, "trainer_settings": config.trainer_settings,
        "adaptive_k": False,  # every step drafts: the live watch judges drafts by their acceptance
    }  # fmt: skip
    (workdir / "serve.yaml").write_text(yaml.safe_dump(settings))
    log, redis_dir = workdir / "serve.log", workdir / "redis"
    flags = ["--config", str(workdir / "serve.yaml"), "--admin-token", TOKEN, "--redis-dir", str(redis_dir)]
    with osd_serve(flags, free_port(), log) as (process, base):
        serve = psutil.Process(process.pid)
        if (server := embedded_redis(serve)) is None:
            raise RuntimeError("osd serve started no redis-server of its own: is $OSD_REDIS_URL set?")
        yield Stack(base, serve, log, f"redis://127.0.0.1:{listening_port(server)}/0", models)


@dataclass
class Result:
    scenario: str
    requests: int
    succeeded: int
    failed: int
    errors: dict[str, int]
    latency_p50_s: float | None
    latency_p99_s: float | None
    calm_p50_s: float | None
    traces_expected: int
    traces_lost: int
    traces_trimmed: int  # older than the stream's oldest entry: retired by its cap
    traces_dropped: int  # counted by the replicas (the stream's queue cap)
    recovery_s: float | None
    checks: dict = field(default_factory=dict)


def percentile(outcomes: list[Outcome], q: float) -> float | None:
    served = [o.end - o.start for o in outcomes if o.ok]
    return round(float(np.percentile(served, q)), 3) if served else None


def account(
    stack: Stack, load: Workload, scenario: str, calm: float, start: float, end: float,
    dropped_before: dict[str, float], recovery: float | None, checks: dict,
) -> Result:  # fmt: skip
    """The Result of the requests the fault met, those in flight at `start` or started before `end`,
    against the calm ones, ended before `start`. A served request's trace counts as lost when it has
    not reached the stream `settle_seconds` later (writers back off for up to a second)."""
    since_calm = load.between(calm, end)
    outcomes = [o for o in since_calm if o.end > start]
    served = [o for o in outcomes if o.ok]
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        traced, oldest = stack.traces()
        missing = [o for o in served if o.request_id not in traced and o.wall_end >= oldest]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    trimmed = sum(o.request_id not in traced and o.wall_end < oldest for o in served)  # by the cap
    errors = Counter(f"{o.status}: {o.error[:80]}" for o in outcomes if not o.ok)
    return Result(
        scenario=scenario, requests=len(outcomes), succeeded=len(served), failed=len(outcomes) - len(served),
        errors=dict(errors), latency_p50_s=percentile(outcomes, 50), latency_p99_s=percentile(outcomes, 99),
        calm_p50_s=percentile([o for o in since_calm if o.end <= start], 50), traces_expected=len(served),
        traces_lost=len(missing), traces_trimmed=trimmed,
        traces_dropped=int(grown(dropped_before, stack.metric("traces_dropped_total"))),
        recovery_s=None if recovery is None else round(recovery, 2), checks=checks,
    )  # fmt: skip


# Scenarios: each runs with the workload on, from `calm` (its calm began) and returns its Result.
def redis_kill(stack: Stack, load: Workload, config: ChaosConfig, calm: float) -> Result:
    live_before = Registry(stack.client).live_version("draft")
    dropped = stack.metric("traces_dropped_total")
    restarts_before = stack.metric("redis_restarts_total").get("", 0.0)
    victim, newest_before = stack.redis_server(), newest_trace(stack.client)
    port = listening_port(victim)
    start = time.monotonic()
    victim.kill()  # SIGKILL, as an operator's kill -9: `osd serve` restarts it

    def answers() -> psutil.Process | None:
        server = stack.redis_server()
        return server if server is not None and server.pid != victim.pid and stack.client.ping() else None

    server = wait_until(answers, config.recovery_timeout, every=0.02) or None
    back = time.monotonic()
    newest_at_back, step_at_back = newest_trace(stack.client), (stack.trainer() or {}).get("step", 0)

    def whole() -> bool:  # traces land again, the stream grows, the trainer trains
        return (
            stack.store_up() and newest_trace(stack.client) > newest_at_back
            and (stack.trainer() or {}).get("step", 0) > step_at_back
        )  # fmt: skip

    recovered = server is not None and wait_until(whole, config.recovery_timeout)
    recovery = time.monotonic() - start if recovered else None
    time.sleep(config.calm_seconds)  # the workload goes on: requests after the restart count too
    end = time.monotonic()
    counted = wait_until(
        lambda: stack.metric("redis_restarts_total").get("") == restarts_before + 1, config.recovery_timeout
    )
    checks = {
        "back_s": round(back - start, 2) if server else None,
        "same_port": server is not None and listening_port(server) == port,
        "pid_before": victim.pid, "pid_after": server and server.pid,
        "restart_counted_on_metrics": counted,
        "restart_logged": "died (SIGKILL)" in stack.log.read_text(errors="replace"),
        "stream_kept": newest_at_back >= newest_before,  # the AOF kept every trace before the kill
        "traces_and_training_again": recovered,
        "trainer_step_at_back": step_at_back, "trainer_step_after": (stack.trainer() or {}).get("step"),
        "live_version_before": live_before,
        "live_version_after": Registry(stack.client).live_version("draft"),
    }  # fmt: skip
    return account(stack, load, "redis-kill", calm, start, end, dropped, recovery, checks)


def trainer_kill(stack: Stack, load: Workload, config: ChaosConfig, calm: float) -> Result:
    every = config.trainer_settings["checkpoint_every"]
    # Killed mid-training: once it has checkpointed at least once, so that resuming means something.
    wait_until(lambda: (stack.trainer() or {}).get("step", 0) > every, config.recovery_timeout)
    before = stack.trainer()
    dropped = stack.metric("traces_dropped_total")
    registry = Registry(stack.client)
    start = time.monotonic()
    os.kill(before["pid"], signal.SIGKILL)
    restarted = wait_until(
        lambda: (stack.trainer() or {}).get("pid") not in (None, before["pid"]), config.recovery_timeout
    )
    recovery = time.monotonic() - start if restarted else None
    time.sleep(config.calm_seconds)
    after = stack.trainer() or {}
    end = time.monotonic()
    steps = [e["train_steps"] for e in map(asdict, registry.versions("draft")) if e["extra"].get("gate")]
    checks = {
        "pid_before": before["pid"], "pid_after": after.get("pid"),
        "step_before": before.get("step"), "step_after_restart": after.get("step"),
        "resumed_from_checkpoint": (after.get("step") or 0) >= before["step"] // every * every,
        "publishes_distinct_train_steps": len(steps) == len(set(steps)),
        "backlog_after": after.get("backlog"),  # trimmed_unprocessed: traces never trained on
    }  # fmt: skip
    return account(stack, load, "trainer-kill", calm, start, end, dropped, recovery, checks)


def replica_kill(stack: Stack, load: Workload, config: ChaosConfig, calm: float) -> Result:
    pids = stack.replica_pids(config.replicas)
    victim, pid = sorted(pids.items())[0]
    dropped = stack.metric("traces_dropped_total")
    with ThreadPoolExecutor(1) as pool:  # a burst of long streams, so that the kill finds work in flight
        burst = pool.submit(load.burst, 4 * config.replicas, 3 * config.max_tokens)
        busy = lambda: any(r.queued and r.replica == victim for r in read_load(stack.client))  # noqa: E731
        wait_until(busy, 10, 0.01)
        start = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        burst.result()
    registry = Registry(stack.client)

    def replaced() -> str | None:
        """The live version, once every replica (the replacement too) serves it; the trainer may
        publish meanwhile, so it is read anew each time."""
        live = f"draft:v{registry.live_version('draft')}"
        loads = [r for r in read_load(stack.client) if r.replica != victim]
        return live if len(loads) >= config.replicas and all(r.draft_version == live for r in loads) else None

    live = wait_until(replaced, config.recovery_timeout) or None
    recovery = time.monotonic() - start if live else None
    time.sleep(config.calm_seconds)
    end = time.monotonic()
    in_flight = [o for o in load.between(calm, end) if o.start < start < o.end]
    checks = {
        "killed": victim, "replacement_serves": live, "in_flight_at_kill": len(in_flight),
        "in_flight_failed": sum(not o.ok for o in in_flight),
        # sent after the kill, before the proxy saw the replica gone
        "sent_after_kill_failed": sum(not o.ok for o in load.between(start, end)),
    }  # fmt: skip
    return account(stack, load, "replica-kill", calm, start, end, dropped, recovery, checks)


def bad_draft(stack: Stack, load: Workload, config: ChaosConfig, calm: float) -> Result:
    registry = Registry(stack.client)
    weights = AutoModelForCausalLM.from_pretrained(stack.models.draft).state_dict()
    expected = greedy_probe(stack.models)
    probes = [stack.probe() == expected]
    dropped = stack.metric("traces_dropped_total")
    start = time.monotonic()
    nan = {n: torch.full_like(t, float("nan")) if t.is_floating_point() else t for n, t in weights.items()}
    poisoned = registry.publish("draft", nan, extra={"origin": "chaos: NaN weights"})
    refused = wait_until(  # rolled back (the trainer may have published on since)
        lambda: registry.get("draft", "-", poisoned.version).status == "rejected", config.recovery_timeout
    )
    nan_back = time.monotonic() - start
    probes.append(stack.probe() == expected)
    generator = torch.Generator().manual_seed(0)
    shuffled = {n: t.clone() for n, t in weights.items()}
    relabelled = [n for n in shuffled if n.endswith(("lm_head.weight", "embed_tokens.weight"))]
    order = torch.randperm(shuffled[relabelled[0]].shape[0], generator=generator)  # every row
    for name in relabelled:
        shuffled[name] = shuffled[name][order]  # the same draft over relabelled tokens
    wrong = registry.publish("draft", shuffled, extra={"origin": "chaos: shuffled output tokens"})
    published = time.monotonic()
    swapped = wait_until(
        lambda: any(r.draft_version == wrong.label for r in read_load(stack.client)), config.recovery_timeout
    )
    probes.append(stack.probe() == expected)

    def verdict() -> str | None:  # the trainer's live watch on the shuffled version: keep or rollback
        events = (stack.trainer() or {}).get("history", [])
        return next(
            (e["action"] for e in events if e["kind"] == "watch" and e["version"] == wrong.version), None
        )

    judged = wait_until(lambda: verdict() is not None, config.recovery_timeout)
    action, judged_after = verdict(), time.monotonic() - published
    recovery = time.monotonic() - start if refused and judged else None
    probes.append(stack.probe() == expected)
    end = time.monotonic()
    series = read_series(stack.client, since=time.time() - 3600)
    checks = {
        "nan_version": poisoned.version, "nan_refused_and_rolled_back": refused,
        "nan_served": sum(p.counts["requests"] for p in series if p.version == poisoned.label),
        "nan_rolled_back_s": round(nan_back, 2),
        "replicas_refused": int(sum(stack.metric("draft_refused_total").values())),
        "shuffled_version": wrong.version, "shuffled_served": swapped, "shuffled_verdict": action,
        "shuffled_judged_s": round(judged_after, 2),
        "live_after": registry.live_version("draft"), "probe_greedy_equal": all(probes),
        "probes": len(probes),
    }  # fmt: skip
    return account(stack, load, "bad-draft", calm, start, end, dropped, recovery, checks)


def redis_oom(stack: Stack, load: Workload, config: ChaosConfig, calm: float) -> Result:
    client = stack.client
    dropped = stack.metric("traces_dropped_total")
    errors_before = stack.metric("traces_write_errors_total")
    start = time.monotonic()
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", client.info("memory")["used_memory"] // 2)  # every write refused
    # Full for redis_down_seconds, and until a replica has shown it (however slow it is to).
    flagged = wait_until(lambda: 0 in stack.metric("trace_store_up").values(), config.recovery_timeout)
    time.sleep(max(0.0, start + config.redis_down_seconds - time.monotonic()))
    client.config_set("maxmemory", 0)
    back = time.monotonic()
    recovered = wait_until(stack.store_up, config.recovery_timeout)
    recovery = time.monotonic() - back if recovered else None
    end = time.monotonic()
    time.sleep(2.0)  # every replica's next heartbeat: snapshots in Redis are fresh again
    errors = grown(errors_before, stack.metric("traces_write_errors_total"))
    pids = stack.replica_pids(config.replicas).values()
    logged = any("maxmemory" in log.read_text(errors="replace") for log in worker_logs(pids))
    checks = {"store_up_0_in_metrics": flagged, "write_errors": int(errors), "oom_in_replica_log": logged}
    return account(stack, load, "redis-oom", calm, start, end, dropped, recovery, checks)


def redis_mb(client: redis.Redis) -> dict[str, float]:
    """Redis memory (MB) by what holds it: the trace stream, the registry, metric series, the rest."""
    prefixes = {b"osd:traces": "stream", b"osd:registry": "registry", b"osd:metrics": "metrics"}
    parts = dict.fromkeys([*prefixes.values(), "other"], 0)
    for key in client.scan_iter(count=1_000):
        part = next((p for prefix, p in prefixes.items() if key.startswith(prefix)), "other")
        parts[part] += client.memory_usage(key, samples=0) or 0
    return {part: round(size / 2**20, 2) for part, size in parts.items()}


def soak(stack: Stack, load: Workload, config: ChaosConfig, calm: float) -> Result:
    pids = stack.replica_pids(config.replicas)
    processes = [psutil.Process(pid) for pid in pids.values()]
    dropped = stack.metric("traces_dropped_total")
    parts_before = redis_mb(stack.client)
    start = time.monotonic()
    samples = []
    while time.monotonic() < start + config.soak_seconds:
        rss = [p.memory_info().rss / 2**20 for p in processes]
        samples.append((time.monotonic() - start, rss, stack.client.info("memory")["used_memory"] / 2**20,
                        stack.client.xlen(DEFAULT_STREAM)))  # fmt: skip
        time.sleep(min(5.0, config.soak_seconds / 20))
    end = time.monotonic()
    parts = redis_mb(stack.client)
    metrics_growth = parts["metrics"] - parts_before["metrics"]  # kept for `retention_seconds` (7 days)
    warm = len(samples) // 4  # after a quarter: caches and allocator pools are warm
    growth = max(max(s[1][i] for s in samples[warm:]) - samples[warm][1][i] for i in range(len(processes)))
    capped = [s for s in samples if s[3] >= config.trace_max_len]
    redis_at_cap = capped[0][2] if capped else None
    checks = {
        "seconds": config.soak_seconds, "replica_rss_mb_warm": [round(v, 1) for v in samples[warm][1]],
        "replica_rss_mb_end": [round(v, 1) for v in samples[-1][1]],
        "replica_rss_growth_mb": round(growth, 1), "rss_bound_mb": config.rss_bound_mb,
        "redis_mb_start": round(samples[0][2], 1), "redis_mb_at_cap": redis_at_cap and round(redis_at_cap, 1),
        "redis_mb_max": round(max(s[2] for s in samples), 1), "redis_mb_end": round(samples[-1][2], 1),
        "stream_len_max": max(s[3] for s in samples), "trace_max_len": config.trace_max_len,
        "redis_parts_mb_start": parts_before, "redis_parts_mb_end": parts,
        "registry_versions": len(Registry(stack.client).versions("draft")),
        "metrics_mb_per_hour": round(metrics_growth / config.soak_seconds * 3600, 2),
    }  # fmt: skip
    return account(stack, load, "soak", calm, start, end, dropped, None, checks)


RUNS = {"redis-kill": redis_kill, "trainer-kill": trainer_kill, "replica-kill": replica_kill,
        "bad-draft": bad_draft, "redis-oom": redis_oom, "soak": soak}  # fmt: skip


def greedy_probe(models: DemoModels) -> str:
    """The target's own greedy text for the probe, decoded as the API decodes it."""
    engine = SpecEngine.from_pretrained(str(models.target))
    tokenizer = AutoTokenizer.from_pretrained(models.target)
    return tokenizer.decode(engine.generate(PROBE, 16).token_ids, skip_special_tokens=True)


def prompts_of(models: DemoModels, n: int = 16) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(models.target)
    held_out = fixed_prompts(models.held_out_corpus(), tokenizer, "python", n, seed=0, prompt_tokens=(16, 32))
    return [list(p.token_ids) for p in held_out]


def run_scenarios(
    stack: Stack, config: ChaosConfig, scenarios: tuple[str, ...], console: Console | None = None
) -> list[Result]:
    """Run `scenarios` in order on one stack, each after `calm_seconds` of plain workload."""
    results = []
    with Workload(stack.base, prompts_of(stack.models), config) as load:
        for name in scenarios:
            calm = time.monotonic()
            time.sleep(config.calm_seconds)
            if console:
                console.print(f"[bold]{name}[/bold]")
            results.append(RUNS[name](stack, load, config, calm))
            if console:
                console.print(asdict(results[-1]))
    return results


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osd bench chaos", description=__doc__.splitlines()[0])
    p.add_argument("--demo", choices=sorted(PRESETS), default="quick", help="demo pair preset")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    p.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    p.add_argument(
        "--redis-down", type=float, default=ChaosConfig.redis_down_seconds, help="seconds out of memory"
    )
    p.add_argument("--soak", type=float, default=ChaosConfig.soak_seconds, help="seconds")
    p.add_argument("--rate", type=float, default=ChaosConfig.rate, help="requests/s")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/chaos_cpu.json"))
    return p


COLUMNS = ("scenario", "requests", "failed", "traces lost", "dropped", "recovery s", "p50 s", "calm p50 s")


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    console = Console()
    config = ChaosConfig(redis_down_seconds=args.redis_down, soak_seconds=args.soak, rate=args.rate)
    models = build_demo_models(PRESETS[args.demo], args.cache_dir, console=console)
    with (
        tempfile.TemporaryDirectory(prefix="osd-chaos-") as tmp,
        chaos_stack(models, Path(tmp), config) as stack,
    ):
        results = run_scenarios(stack, config, tuple(args.scenarios), console)
    rows = [
        {"scenario": r.scenario, "requests": r.requests, "failed": r.failed, "lost": r.traces_lost,
         "dropped": r.traces_dropped, "recovery": r.recovery_s, "p50": r.latency_p50_s, "calm": r.calm_p50_s}
        for r in results
    ]  # fmt: skip
    print_rows(console, "chaos", COLUMNS, rows)
    report = {"machine": f"{os.cpu_count()} CPUs", "demo": args.demo, "config": asdict(config),
              "results": [asdict(r) for r in results]}  # fmt: skip
    write_report(args.json, report)
    console.print(f"wrote {args.json}")
