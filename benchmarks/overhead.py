"""Serving latency with the trainer off and on, at the same request rate.

One serving loop in this process (the engine, batch 1, first come first served) takes requests
that arrive open-loop at --rate per second (Poisson, fixed seed), so latency is completion minus
arrival, queueing included. Every request's trace goes to a local Redis, and the loop publishes
its load (in flight, queued) for the trainer's throttle, as a replica does. The trainer is the
Ray actor serving deploys (its own process, default TrainerConfig: SCHED_IDLE, one torch
thread). Blocks come in pairs that serve the same --block requests with the same arrival gaps,
once with the trainer paused and once running (the order alternating between pairs), so that
only the trainer differs and a slow spell of the VM hits both modes alike. Without --rate, the
rate is --utilization times the measured service rate. The served draft stays the initial one
(no hot-swap), so that service times stay comparable across blocks.

    osd bench overhead --json benchmarks/results/overhead_cpu.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from transformers import AutoTokenizer

from benchmarks.online import parse_phases
from benchmarks.results import write_report
from deploy.demo.build import DEFAULT_CACHE_DIR, PRESETS, build_demo_models
from deploy.demo.workloads import WorkloadSpec, request_stream
from serving.engine.hf import SpecEngine
from serving.tracing import trace_of
from store.load import publish_load
from store.redis_server import LocalRedis
from store.traces import TraceWriter
from trainer.actor import TrainerActor
from trainer.config import TrainerConfig

MODES = ("off", "on")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osd bench overhead", description=__doc__.splitlines()[0])
    p.add_argument("--demo", choices=sorted(PRESETS), default="full", help="demo pair preset")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    p.add_argument("--domain", default="python", help="the domain of the requests")
    p.add_argument("--pairs", type=int, default=4, help="pairs of blocks, trainer off and on")
    p.add_argument("--block", type=int, default=50, help="requests per block")
    p.add_argument("--warmup", type=int, default=10, help="requests before the first block (trainer on)")
    p.add_argument("--rate", type=float, help="requests per second offered (default: from --utilization)")
    p.add_argument("--utilization", type=float, default=0.5, help="offered load over the service rate")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--k", type=int, default=3, help="speculative tokens per step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the report here")
    return p


def quantiles(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {
        "p50_ms": round(1e3 * statistics.median(ordered), 1),
        "p99_ms": round(1e3 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
        "mean_ms": round(1e3 * statistics.fmean(ordered), 1),
    }


class Server:
    """The serving side: the engine, the trace writer and the load the throttle reads."""

    def __init__(self, engine: SpecEngine, client, max_new_tokens: int):
        self.engine, self.client, self.max_new_tokens = engine, client, max_new_tokens
        self.writer = TraceWriter(client)

    def serve(self, request) -> float:
        """Generate one request (greedy) and log its trace; returns the service time."""
        began = time.perf_counter()
        out = self.engine.generate(
            request.prompt.token_ids, self.max_new_tokens, stop_token_ids=[], top_logprobs=16
        )
        trace = trace_of(
            request.request_id, request.prompt.domain, "demo-target", ("draft:v1",),
            request.prompt.token_ids, out, {"temperature": 0.0},
        )  # fmt: skip
        self.writer.append(trace)
        return time.perf_counter() - began

    def run_block(self, requests: list, gaps: np.ndarray) -> tuple[list[float], list[float]]:
        """Serve requests arriving after the given gaps (seconds); (latencies, service times)."""
        arrivals = time.perf_counter() + np.cumsum(gaps)
        latencies, services = [], []
        for i, request in enumerate(requests):
            if (wait := arrivals[i] - time.perf_counter()) > 0:
                publish_load(self.client, "bench", in_flight=0, queued=0)
                time.sleep(wait)
            queued = int(np.searchsorted(arrivals, time.perf_counter()) - i - 1)
            publish_load(self.client, "bench", in_flight=1, queued=max(queued, 0))
            services.append(self.serve(request))
            latencies.append(time.perf_counter() - arrivals[i])
        publish_load(self.client, "bench", in_flight=0, queued=0)
        return latencies, services


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    if args.pairs < 1 or args.block < 1:
        raise SystemExit("need at least one pair of blocks of at least one request")
    console = Console()
    preset = PRESETS[args.demo]
    models = build_demo_models(preset, args.cache_dir, console=console)
    tokenizer = AutoTokenizer.from_pretrained(models.target)
    total = args.warmup + args.pairs * args.block
    spec = WorkloadSpec(
        phases=parse_phases(f"{args.domain}:{total}"), max_new_tokens=args.max_new_tokens, seed=args.seed
    )
    requests = list(request_stream(spec, models.held_out_corpus(), tokenizer))
    engine = SpecEngine.from_pretrained(models.target, draft=models.draft, num_speculative_tokens=args.k)
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(
            address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
            _node_ip_address="127.0.0.1",
        )  # fmt: skip
    rng = np.random.default_rng(args.seed)
    results = {mode: {"latency": [], "service": [], "steps": 0} for mode in MODES}
    with LocalRedis() as server, tempfile.TemporaryDirectory() as scratch:
        client = server.client()
        serving = Server(engine, client, args.max_new_tokens)
        config = TrainerConfig(checkpoint_dir=Path(scratch) / "trainer", max_seq_len=preset.target.context)
        trainer = TrainerActor.remote(config, str(models.draft), server.url)
        with console.status("warm-up (trainer on)"):
            ray.get(trainer.status.remote())  # started
            warm = [serving.serve(r) for r in requests[: args.warmup]]
        rate = args.rate or args.utilization / statistics.median(warm)
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(f"blocks at {rate:.2f} requests/s", total=2 * args.pairs)
            for pair in range(args.pairs):
                start = args.warmup + pair * args.block
                block, gaps = requests[start : start + args.block], rng.exponential(1.0 / rate, args.block)
                for mode in MODES if pair % 2 == 0 else MODES[::-1]:
                    progress.update(task, description=f"pair {pair + 1}/{args.pairs}: trainer {mode}")
                    # pause returns once the step in progress has finished: none runs in an "off" block
                    ray.get(trainer.resume.remote() if mode == "on" else trainer.pause.remote())
                    step_before = ray.get(trainer.status.remote())["step"]
                    latency, service = serving.run_block(block, gaps)
                    results[mode]["latency"] += latency
                    results[mode]["service"] += service
                    results[mode]["steps"] += ray.get(trainer.status.remote())["step"] - step_before
                    progress.update(task, advance=1)
        final = ray.get(trainer.status.remote())
        ray.get(trainer.stop.remote())
        ray.kill(trainer)
        serving.writer.close()
    if started_ray:
        ray.shutdown()
    report = summarise(results, rate, args, final)
    report["machine"] = {"platform": platform.platform(), "torch_threads": torch.get_num_threads()}
    show(console, report)
    if args.json:
        write_report(args.json, report)
    return report


def summarise(results: dict, rate: float, args: argparse.Namespace, final: dict) -> dict:
    modes = {
        mode: {
            "requests": len(r["latency"]),
            "latency": quantiles(r["latency"]),
            "service": quantiles(r["service"]),
            "trainer_steps": r["steps"],
        }
        for mode, r in results.items()
    }
    off, on = modes["off"], modes["on"]
    return {
        "benchmark": "overhead",
        "demo": args.demo,
        "domain": args.domain,
        "k": args.k,
        "max_new_tokens": args.max_new_tokens,
        "rate_per_s": round(rate, 3),
        "pairs": args.pairs,
        "block": args.block,
        "modes": modes,
        "inflation": {
            f"{what}_{q}": round(on[what][f"{q}_ms"] / off[what][f"{q}_ms"] - 1, 3)
            for what in ("latency", "service")
            for q in ("p50", "p99")
        },
        "trainer_final": {k: final[k] for k in ("step", "trained_traces", "live_version", "history")},
    }


def show(console: Console, report: dict) -> None:
    table = Table(title=f"serving at {report['rate_per_s']} requests/s, trainer off vs on")
    for column in (
        "trainer",
        "requests",
        "latency p50",
        "latency p99",
        "service p50",
        "service p99",
        "steps",
    ):
        table.add_column(column, justify="right")
    for mode, m in report["modes"].items():
        table.add_row(
            mode, str(m["requests"]),
            f"{m['latency']['p50_ms']} ms", f"{m['latency']['p99_ms']} ms",
            f"{m['service']['p50_ms']} ms", f"{m['service']['p99_ms']} ms", str(m["trainer_steps"]),
        )  # fmt: skip
    console.print(table)
    console.print({k: f"{v:+.1%}" for k, v in report["inflation"].items()})


if __name__ == "__main__":
    main()
