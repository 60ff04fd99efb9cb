"""The whole loop over HTTP: `osd serve` (a child process, trainer on) answers a stream of requests
of one domain while the trainer learns from their traces; the acceptance each response reports is
tallied by the draft version that served it.

Requests go one at a time with --gap seconds between them (the trainer trains in the CPU that
serving leaves idle), greedy, to loopback only. The report lists, per draft version, the requests
it served and their acceptance rate (accepted / drafted), and counts failed requests.

    osd bench e2e --json benchmarks/results/e2e_cpu.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import Progress
from transformers import AutoTokenizer

from benchmarks.results import write_report
from benchmarks.serve_child import osd_serve
from deploy.demo.build import DEFAULT_CACHE_DIR, PRESETS, build_demo_models
from deploy.demo.workloads import Phase, WorkloadSpec, request_stream
from store.redis_server import free_port


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osd bench e2e", description=__doc__.splitlines()[0])
    p.add_argument("--demo", choices=sorted(PRESETS), default="full", help="demo pair preset")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    p.add_argument("--domain", default="python")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--gap", type=float, default=0.3, help="seconds between a response and the next request")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--json", type=Path, help="write the report here")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    console = Console()
    models = build_demo_models(PRESETS[args.demo], args.cache_dir, console=console)
    tokenizer = AutoTokenizer.from_pretrained(models.target)
    spec = WorkloadSpec(
        phases=(Phase(args.domain, args.requests),), max_new_tokens=args.max_tokens, seed=args.seed
    )
    requests = list(request_stream(spec, models.held_out_corpus(), tokenizer))
    port, tallies, failed = free_port(), {}, 0
    with tempfile.TemporaryDirectory() as scratch:
        flags = [
            "--target", str(models.target), "--draft", str(models.draft), "--model-name", "demo",
            "--redis-dir", f"{scratch}/redis", "--trainer-dir", f"{scratch}/trainer",
        ]  # fmt: skip
        with osd_serve(flags, port, Path(scratch) / "serve.log", console) as (server, base):
            with Progress(console=console, transient=True) as progress:
                task = progress.add_task("requests", total=len(requests))
                for request in requests:
                    body = {
                        "model": "demo", "prompt": request.prompt.token_ids, "max_tokens": args.max_tokens,
                        "temperature": 0, "metadata": {"domain": args.domain},
                    }  # fmt: skip
                    response = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
                    progress.update(task, advance=1)
                    if response.status_code != 200:
                        failed += 1
                        continue
                    metrics = response.json()["metrics"]
                    tally = tallies.setdefault(metrics["draft_version"], [0, 0, 0])
                    tally[0] += 1
                    tally[1] += metrics["spec_accepted"]
                    tally[2] += metrics["spec_drafted"]
                    progress.update(task, description=f"served by {metrics['draft_version']}")
                    time.sleep(args.gap)
            health = httpx.get(f"{base}/health", timeout=10).json()
    report = {
        "benchmark": "e2e",
        "demo": args.demo,
        "domain": args.domain,
        "requests": len(requests),
        "failed": failed,
        "server_exit_code": server.returncode,
        "swaps": health["swaps"],
        "versions": [
            {"draft_version": v, "requests": n, "acceptance_rate": round(a / d, 3) if d else None}
            for v, (n, a, d) in tallies.items()
        ],
    }
    console.print_json(data=report)
    if args.json:
        write_report(args.json, report)
    return report


if __name__ == "__main__":
    main()
