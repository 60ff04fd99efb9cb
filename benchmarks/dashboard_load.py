"""The dashboard with a long history: `--requests` requests recorded over the last 24 hours (3
domains, a new draft version every 2 hours, seeded random acceptance and latencies) into a local
Redis through the servers' own `MetricsRecorder`, then `/dashboard/data` for each range, timed
(median of `--repeats`) with the size of its answer and of its largest series. The answer's size
is bounded by the display bins, not by the history; the time is what a refresh costs the server.

    osd bench dashboard --json benchmarks/results/dashboard_cpu.json
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from fastapi import FastAPI
from fastapi.testclient import TestClient
from rich.console import Console

from benchmarks.results import print_rows, write_report
from serving.http.dashboard import RANGES, dashboard_router
from store.metrics import MetricsConfig, MetricsRecorder, request_counters
from store.redis_server import LocalRedis

DOMAINS = ("prose", "python", "c")
VERSION_SECONDS = 7200


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osd bench dashboard", description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=100_000)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the report here")
    return p


def fill(recorder: MetricsRecorder, requests: int, k: int, now: float, seed: int) -> None:
    """`requests` requests at uniform random times over the last 24 hours."""
    rng = random.Random(seed)
    for _ in range(requests):
        at = now - rng.uniform(0, RANGES["24h"])
        version = f"draft:v{1 + int((at - now + RANGES['24h']) // VERSION_SECONDS)}"
        steps = rng.randint(8, 24)
        per_position = [rng.randint(0, steps) for _ in range(k)]
        accepted = sorted(per_position, reverse=True)  # a later position is accepted no more often
        counters = request_counters(
            steps, steps * k, sum(accepted), steps + sum(accepted), [steps] * k, accepted,
            rng.lognormvariate(-3, 0.5), rng.lognormvariate(-5, 0.3),
        )  # fmt: skip
        recorder.record(version, rng.choice(DOMAINS), counters, at=at)


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    console = Console()
    with LocalRedis() as server:
        client, config = server.client(), MetricsConfig()
        recorder = MetricsRecorder(client, config)
        with console.status(f"recording {args.requests} requests over 24 hours"):
            began = time.perf_counter()
            fill(recorder, args.requests, args.k, time.time(), args.seed)
            recorder.close()
            fill_seconds = time.perf_counter() - began
        app = FastAPI()
        app.include_router(dashboard_router(client, "draft", "-", config))
        rows = []
        with TestClient(app) as http:
            for name in RANGES:
                seconds, body = [], None
                for _ in range(args.repeats):
                    began = time.perf_counter()
                    response = http.get("/dashboard/data", params={"range": name})
                    seconds.append(time.perf_counter() - began)
                    body = response.json()
                rows.append(
                    {
                        "range": name,
                        "requests_in_range": sum(b["requests"] for b in body["overall"]),
                        "seconds_p50": round(statistics.median(seconds), 3),
                        "response_bytes": len(response.content),
                        "max_points_per_series": max(
                            len(s) for group in ("by_domain", "by_version") for s in body[group].values()
                        ),
                    }
                )
    report = {
        "benchmark": "dashboard",
        "requests": args.requests,
        "fill_seconds": round(fill_seconds, 1),
        "ranges": rows,
    }
    print_rows(
        console,
        f"/dashboard/data with {args.requests} requests over 24 h",
        ("range", "requests in range", "time p50 s", "answer bytes", "max points per series"),
        rows,
    )
    if args.json:
        write_report(args.json, report)
    return report


if __name__ == "__main__":
    main()
