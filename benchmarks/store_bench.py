"""Store benchmark on a real local redis-server: trace appends, registry notifications, memory.

- Trace appends: 256-token traces with top-16 ids and log-probs (ids of a --vocab vocabulary, so
  uint16 on the wire, and once of --wide-vocab, int32) into a stream capped at --max-len
  (trimmed as in production). A burst (append as fast as the caller can, then wait until Redis
  has them all) gives the sustained write throughput, median of --repeats runs; a paced run at
  --rate gives the latency the caller sees when serving at that rate. Both report the append
  call's p50/p99/max (encoding included), and the traces dropped by the writer (none expected).
- Registry: publish a --draft-mb draft and time until a `LiveWatcher` in the same process is
  told (pub/sub; its poll is set far beyond the test), then the weight load that follows.
- Memory: Redis's used_memory per 1,000 traces, and so traces per GB.

    osd bench store --json benchmarks/results/store_cpu.json
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from benchmarks.results import write_report
from store.redis_server import LocalRedis
from store.registry import LiveWatcher, Registry
from store.traces import StreamConfig, Trace, TraceWriter, encode


def make_trace(tokens: int, top_k: int, vocab: int, seed: int = 0) -> Trace:
    rng = np.random.default_rng(seed)
    steps = tokens // 3
    return Trace(
        request_id="req-0",
        time=time.time(),
        domain="python",
        target_id="bench-target",
        draft_versions=("draft:v1",),
        prompt_ids=rng.integers(0, vocab, 64).astype(np.int32),
        output_ids=rng.integers(0, vocab, tokens).astype(np.int32),
        top_ids=rng.integers(0, vocab, (tokens, top_k)).astype(np.int32),
        top_logprobs=-rng.exponential(2.0, (tokens, top_k)).astype(np.float16),
        drafted=np.full(steps, 4, np.uint8),
        accepted=rng.integers(0, 5, steps).astype(np.uint8),
        sampling={"temperature": 0.0, "top_p": 1.0, "top_k": 0},
    )


def quantiles_ms(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {
        "p50_ms": round(1e3 * ordered[len(ordered) // 2], 4),
        "p99_ms": round(1e3 * ordered[int(len(ordered) * 0.99)], 4),
        "max_ms": round(1e3 * ordered[-1], 4),
    }


def append_run(
    server: LocalRedis, base: Trace, count: int, rate: float | None, stream: str, max_len: int
) -> dict:
    """Append `count` traces (paced at `rate` per second, or a burst) and wait until all are written.
    The stream is capped at max_len, so a run longer than that measures the steady state, trims
    included (no trainer reads here, so every trimmed trace counts as unprocessed)."""
    client = server.client()
    writer = TraceWriter(client, StreamConfig(stream=stream, max_len=max_len), queue_cap=count)
    traces = [replace(base, request_id=f"{stream}-{i}") for i in range(count)]
    latencies = []
    start = time.perf_counter()
    for i, trace in enumerate(traces):
        if rate is not None and (wait := start + i / rate - time.perf_counter()) > 0:
            time.sleep(wait)
        began = time.perf_counter()
        writer.append(trace)
        latencies.append(time.perf_counter() - began)
    appended = time.perf_counter() - start
    if not writer.flush(timeout=120):
        raise RuntimeError("the writer did not drain within 2 minutes")
    total = time.perf_counter() - start
    writer.close()
    stats = writer.stats()
    client.delete(stream, StreamConfig(stream=stream).lost_key)
    client.close()
    return {
        "traces": count,
        "max_len": max_len,
        "offered_per_s": None if rate is None else rate,
        "append_seconds": round(appended, 3),
        "written_per_s": round(stats.written / total, 1),
        "dropped": stats.dropped,
        "caller_latency": quantiles_ms(latencies),
    }


def median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda run: run["written_per_s"])[len(runs) // 2]


def registry_run(server: LocalRedis, megabytes: float, repeats: int) -> dict:
    """Publish-to-notification latency for a draft of about `megabytes` MB, and its load time."""
    client = server.client(socket_timeout=30)
    registry = Registry(client, prefix="bench:registry")
    numel = int(megabytes * 1e6 / 4)
    notified = threading.Event()
    seen: dict[int, float] = {}

    def on_change(meta) -> None:
        seen[meta.version] = time.perf_counter()
        notified.set()

    weights = {"model.weight": torch.zeros(numel)}
    registry.publish("bench", weights)
    watcher = LiveWatcher(registry, "bench", on_change, poll_seconds=3600)
    notified.wait(10)
    publish_s, notify_s, load_s = [], [], []
    for i in range(repeats):
        weights = {"model.weight": torch.full((numel,), float(i))}
        notified.clear()
        began = time.perf_counter()
        meta = registry.publish("bench", weights)
        published = time.perf_counter()
        if not notified.wait(30):
            raise RuntimeError("the watcher was not notified within 30 s")
        publish_s.append(published - began)
        notify_s.append(seen[meta.version] - began)
        began = time.perf_counter()
        registry.load(meta)
        load_s.append(time.perf_counter() - began)
    watcher.stop()
    size = meta.size_bytes
    for key in client.scan_iter("bench:registry*"):
        client.delete(key)
    client.close()

    def median_ms(values: list[float]) -> float:
        return round(1e3 * statistics.median(values), 2)

    return {
        "draft_bytes": size,
        "repeats": repeats,
        "publish_ms": median_ms(publish_s),
        "publish_to_notification_ms": median_ms(notify_s),
        "publish_to_notification_max_ms": round(1e3 * max(notify_s), 2),
        "load_ms": median_ms(load_s),
    }


def memory_run(server: LocalRedis, base: Trace, count: int) -> dict:
    client = server.client()
    stream = "bench:memory"
    before = client.info("memory")["used_memory"]
    writer = TraceWriter(client, StreamConfig(stream=stream, max_len=count + 1), queue_cap=count)
    for i in range(count):
        writer.append(replace(base, request_id=f"mem-{i}"))
    writer.close()
    used = client.info("memory")["used_memory"] - before
    client.delete(stream)
    client.close()
    per_thousand = used * 1000 / count
    return {
        "traces": count,
        "bytes_per_1000_traces": int(per_thousand),
        "mb_per_1000_traces": round(per_thousand / 1e6, 2),
        "traces_per_gb": int(1e9 / (used / count)),
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osd bench store", description=__doc__.splitlines()[0])
    p.add_argument("--traces", type=int, default=20_000, help="traces per append run")
    p.add_argument("--max-len", type=int, default=5_000, help="stream cap during the append runs")
    p.add_argument("--repeats", type=int, default=5, help="burst and paced runs; medians are reported")
    p.add_argument("--rate", type=float, default=5_000, help="traces per second offered in the paced run")
    p.add_argument("--tokens", type=int, default=256, help="output tokens per trace")
    p.add_argument("--top-k", type=int, default=16, help="logged top-K per position")
    p.add_argument("--vocab", type=int, default=32_000, help="vocabulary of the trace ids (uint16 ids)")
    p.add_argument("--wide-vocab", type=int, default=151_936, help="a vocabulary needing int32 ids")
    p.add_argument("--draft-mb", type=float, default=10.0, help="draft size for the registry run")
    p.add_argument("--registry-repeats", type=int, default=10)
    p.add_argument("--json", type=Path, help="write the report here")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    console = Console()
    logging.getLogger("store.traces").setLevel(logging.ERROR)  # no trainer here: every trim is "unprocessed"
    base = make_trace(args.tokens, args.top_k, args.vocab)
    wide = make_trace(args.tokens, args.top_k, args.wide_vocab)
    with LocalRedis() as server:
        bursts, paceds = [], []
        for i in range(args.repeats):  # interleaved, so that a slow spell of the VM hits both
            with console.status(f"trace appends: burst {i + 1}/{args.repeats}"):
                bursts.append(append_run(server, base, args.traces, None, "bench:burst", args.max_len))
            with console.status(f"trace appends: paced at {args.rate:.0f}/s {i + 1}/{args.repeats}"):
                paceds.append(append_run(server, base, args.traces, args.rate, "bench:paced", args.max_len))
        burst, paced = median_run(bursts), median_run(paceds)
        with console.status(f"trace appends: burst, vocabulary {args.wide_vocab}"):
            wide_burst = append_run(server, wide, args.traces, None, "bench:wide", args.max_len)
        with console.status(f"registry: {args.draft_mb} MB draft"):
            registry = registry_run(server, args.draft_mb, args.registry_repeats)
        with console.status("memory"):
            memory = memory_run(server, base, 1000)
        version = server.client().info("server")["redis_version"]
    report = {
        "benchmark": "store",
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "redis_version": version,
        "trace": {
            "output_tokens": args.tokens,
            "top_k": args.top_k,
            "prompt_tokens": 64,
            "vocab": args.vocab,
        },
        "trace_bytes": {
            "vocab": sum(map(len, encode(base).values())),
            "wide_vocab": sum(map(len, encode(wide).values())),
        },
        "append_burst": burst,  # the median of the burst runs by written/s
        "append_burst_written_per_s_runs": [run["written_per_s"] for run in bursts],
        "append_burst_wide_vocab": wide_burst | {"vocab": args.wide_vocab},
        "append_paced": paced,  # the median of the paced runs by written/s
        "append_paced_runs": [
            {"written_per_s": run["written_per_s"], "p99_ms": run["caller_latency"]["p99_ms"]}
            for run in paceds
        ],
        "registry": registry,
        "memory": memory,
    }
    table = Table(
        title=f"store on redis {version}: {args.tokens}-token traces with top-{args.top_k}, "
        f"{report['trace_bytes']['vocab']} bytes (vocabulary {args.vocab})"
    )
    for column in ("run", "written/s", "dropped", "caller p50 ms", "caller p99 ms", "caller max ms"):
        table.add_column(column, justify="right")
    runs = (
        (f"burst, median of {args.repeats}", burst),
        (f"burst, vocabulary {args.wide_vocab}", wide_burst),
        (f"paced {args.rate:.0f}/s, median of {args.repeats}", paced),
    )
    for name, run in runs:
        latency = run["caller_latency"]
        table.add_row(
            name,
            f"{run['written_per_s']:.0f}",
            str(run["dropped"]),
            f"{latency['p50_ms']:.3f}",
            f"{latency['p99_ms']:.3f}",
            f"{latency['max_ms']:.3f}",
        )
    console.print(table)
    console.print(
        f"registry, {registry['draft_bytes'] / 1e6:.1f} MB draft: publish {registry['publish_ms']} ms, "
        f"publish to notification {registry['publish_to_notification_ms']} ms (median), "
        f"load {registry['load_ms']} ms"
    )
    console.print(
        f"memory: {memory['mb_per_1000_traces']} MB per 1,000 traces, "
        f"{memory['traces_per_gb']:,} traces per GB"
    )
    if args.json:
        write_report(args.json, report)
    return report


if __name__ == "__main__":
    main()
