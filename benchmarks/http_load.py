"""Load over HTTP: requests/s and latency as concurrency rises, speculative decoding on vs off, and
the pause a hot-swap puts into streams in flight.

Two `osd serve` children (no trainer, `--replicas` each), each on its own database of one Redis
started here: "spec" serves the demo target with a draft (k speculative tokens), "ar" the same
target with `--proposer none`. At each concurrency level, blocks alternate between the two
(spec, ar, spec, ar, ...) so that drift on this machine hits both alike; a block is a closed loop
of `concurrency` clients streaming greedy completions of held-out prompts of one domain until
`--block-requests` are done. Per level and server: requests/s, tokens/s, p50/p99 end-to-end
latency and time to first token, and the spec/ar ratio of tokens/s, which says where
speculation stops paying.

Swap pause: the spec server is then loaded at concurrency 4 while a new version of its draft is
published every `--swap-every` seconds (the same weights under a new version number: the swap
path is the same). Each request's longest gap between two streamed chunks is recorded; requests
in flight when a swap landed are compared with the others, next to the load time the replicas
report (`osd:draft_swap_load_seconds`, off the decode path). Loopback only.

    osd bench http --json benchmarks/results/http_load_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM

from benchmarks.demo_pair import add_arguments, demo_pair
from benchmarks.results import write_report
from benchmarks.serve_child import osd_serve
from store.redis_server import LocalRedis, free_port
from store.registry import Registry


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osd bench http", description=__doc__.splitlines()[0])
    add_arguments(p)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--replicas", type=int, default=2, help="replicas per server")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--blocks", type=int, default=3, help="blocks per server and level")
    p.add_argument("--block-requests", type=int, default=16, help="at least; 2x concurrency when higher")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--swap-seconds", type=float, default=30.0)
    p.add_argument("--swap-every", type=float, default=5.0)
    p.add_argument("--json", type=Path, help="write the report here")
    return p


@dataclass
class Done:
    """One streamed request as the client saw it (perf_counter seconds)."""

    start: float
    first: float
    end: float
    tokens: int
    gaps: list[float] = field(default_factory=list)  # between consecutive chunks

    @property
    def latency(self) -> float:
        return self.end - self.start


async def stream_one(http: httpx.AsyncClient, prompt: list[int], max_tokens: int) -> Done:
    body = {
        "model": "demo", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    start = time.perf_counter()
    times, tokens = [], 0
    async with http.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:  # the server failed the request mid-stream
                raise RuntimeError(f"stream failed: {event['error']}")
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif event["choices"] and event["choices"][0]["text"]:
                times.append(time.perf_counter())
    end = time.perf_counter()
    return Done(start, times[0] if times else end, end, tokens, list(np.diff(times)))


async def closed_loop(base: str, prompts, concurrency: int, max_tokens: int, more, failures: list):
    """`concurrency` clients, each sending its next request when its last one ends, while `more()`
    says so; returns (results, seconds)."""
    results: list[Done] = []

    async def client(http: httpx.AsyncClient) -> None:
        while more():
            try:
                results.append(await stream_one(http, next(prompts), max_tokens))
            except (httpx.HTTPError, RuntimeError) as err:
                failures.append(repr(err))

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as http:
        began = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        return results, time.perf_counter() - began


def count_to(n: int):
    """A `more` for closed_loop: true n times in all."""
    issued = itertools.count()
    return lambda: next(issued) < n


def summarize(runs: list[tuple[list[Done], float]]) -> dict:
    done = [d for results, _ in runs for d in results]
    seconds = sum(s for _, s in runs)
    latency = np.array([d.latency for d in done])
    ttft = np.array([d.first - d.start for d in done])
    return {
        "requests": len(done),
        "requests_per_s": round(len(done) / seconds, 3),
        "tokens_per_s": round(sum(d.tokens for d in done) / seconds, 1),
        "latency_p50_s": round(float(np.percentile(latency, 50)), 3),
        "latency_p99_s": round(float(np.percentile(latency, 99)), 3),
        "ttft_p50_s": round(float(np.percentile(ttft, 50)), 3),
        "ttft_p99_s": round(float(np.percentile(ttft, 99)), 3),
    }


async def swap_run(base: str, prompts, registry: Registry, weights, args, failures: list) -> dict:
    """Concurrency 4 on the spec server for --swap-seconds, publishing every --swap-every."""
    publishes: list[float] = []
    deadline = time.perf_counter() + args.swap_seconds

    async def publisher() -> None:
        """A publish at each planned time (late if the loop is): their number is fixed by the args."""
        start = time.perf_counter()
        for at in np.arange(args.swap_every / 2, args.swap_seconds - args.swap_every / 2, args.swap_every):
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            publishes.append(time.perf_counter())
            await asyncio.to_thread(registry.publish, "draft", weights)

    def running() -> bool:
        return time.perf_counter() < deadline

    _, (results, _) = await asyncio.gather(
        publisher(), closed_loop(base, prompts, 4, args.max_tokens, running, failures)
    )
    # A swap lands within a second of its publish (pub/sub, then the load off the decode path).
    during = [d for d in results if any(d.start <= p + 1.0 and p <= d.end for p in publishes)]
    others = [d for d in results if d not in during]

    def worst_gap(group: list[Done]) -> dict:
        gaps = [max(d.gaps) for d in group if d.gaps]
        if not gaps:
            return {"requests": len(group)}
        return {
            "requests": len(group),
            "max_chunk_gap_p50_s": round(float(np.percentile(gaps, 50)), 4),
            "max_chunk_gap_p99_s": round(float(np.percentile(gaps, 99)), 4),
            "max_chunk_gap_max_s": round(max(gaps), 4),
        }

    return {
        "publishes": len(publishes),
        "in_flight_at_a_swap": worst_gap(during),
        "others": worst_gap(others),
    }


def served_versions(base: str) -> tuple[list[str], float | None]:
    """The draft versions a server's replicas serve, and the longest last-swap load time any of
    them reports, from its /metrics."""
    families = {
        f.name: f for f in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=10).text)
    }
    versions = sorted({s.labels["draft_version"] for s in families["osd:draft_info"].samples})
    loads = [s.value for s in families["osd:draft_swap_load_seconds"].samples]
    return versions, round(max(loads), 4) if loads else None


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    console = Console()
    models, draft, held_out = demo_pair(args, console)
    prompts = itertools.cycle(held_out)
    common = ["--target", str(models.target), "--served-model-name", "demo", "--no-trainer",
              "--replicas", str(args.replicas)]  # fmt: skip
    failures: list[str] = []
    with (
        tempfile.TemporaryDirectory() as scratch,
        LocalRedis(data_dir=Path(scratch) / "redis") as redis_server,
    ):
        # One Redis, a database each: each server's /metrics and heartbeats are its own.
        spec_flags = [*common, "--redis-url", redis_server.url, "--draft", str(draft), "--k", str(args.k)]
        ar_flags = [*common, "--redis-url", redis_server.url.replace("/0", "/1"), "--proposer", "none"]
        with (
            osd_serve(spec_flags, free_port(), Path(scratch) / "spec.log", console) as (_, spec),
            osd_serve(ar_flags, free_port(), Path(scratch) / "ar.log", console) as (_, ar),
        ):
            levels = []
            for concurrency in args.concurrency:
                requests = max(args.block_requests, 2 * concurrency)
                runs = {"spec": [], "ar": []}
                with console.status(f"concurrency {concurrency}: {args.blocks} blocks per server"):
                    for _, (name, base) in itertools.product(
                        range(args.blocks), (("spec", spec), ("ar", ar))
                    ):
                        loop = closed_loop(
                            base, prompts, concurrency, args.max_tokens, count_to(requests), failures
                        )
                        runs[name].append(asyncio.run(loop))
                level = {
                    "concurrency": concurrency,
                    "spec": summarize(runs["spec"]),
                    "ar": summarize(runs["ar"]),
                }
                level["spec_over_ar_tokens_per_s"] = round(
                    level["spec"]["tokens_per_s"] / level["ar"]["tokens_per_s"], 3
                )
                levels.append(level)
            weights = {
                n: t.clone() for n, t in AutoModelForCausalLM.from_pretrained(draft).state_dict().items()
            }
            with console.status(f"swap pause: publishing every {args.swap_every:.0f} s under load"):
                swap = asyncio.run(
                    swap_run(spec, prompts, Registry(redis_server.client()), weights, args, failures)
                )
            swap["replicas_serve"], swap["draft_swap_load_seconds"] = served_versions(spec)
    report = {
        "benchmark": "http_load",
        "demo": args.demo,
        "domain": args.domain,
        "draft": args.draft,
        "k": args.k,
        "replicas": args.replicas,
        "max_tokens": args.max_tokens,
        "blocks": args.blocks,
        "failed_requests": len(failures),
        "failures": failures[:10],
        "levels": levels,
        "swap": swap,
    }
    print_table(console, report)
    if args.json:
        write_report(args.json, report)
    return report


def print_table(console: Console, report: dict) -> None:
    table = Table(title=f"HTTP load, {report['replicas']} replica(s) per server, k={report['k']}")
    for column in ("clients", "server", "req/s", "tok/s", "p50 s", "p99 s", "TTFT p50", "spec/ar"):
        table.add_column(column, justify="right")
    for level in report["levels"]:
        for name in ("spec", "ar"):
            row = level[name]
            ratio = str(level["spec_over_ar_tokens_per_s"]) if name == "spec" else ""
            table.add_row(
                str(level["concurrency"]), name, str(row["requests_per_s"]), str(row["tokens_per_s"]),
                str(row["latency_p50_s"]), str(row["latency_p99_s"]), str(row["ttft_p50_s"]), ratio,
            )  # fmt: skip
    console.print(table)
    console.print_json(data=report["swap"])


if __name__ == "__main__":
    main()
