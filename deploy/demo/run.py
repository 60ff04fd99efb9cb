"""`osd demo`: the main job, end to end, on embedded defaults.

It builds (or reuses) the demo pair, starts the stack as `osd serve` does (the embedded
redis-server, local Ray on loopback, the trainer actor and two server replicas), prints the
dashboard's address, and sends the demo workload over HTTP with the openai client: phases of
domains (prose, then code), every fourth request through the chat API (the pair's ChatML
template) and the rest as completions, `concurrency` clients that think between requests, so that
the trainer has spare cycles. A live display shows the phase, the requests done, the acceptance of
the last requests, the draft version serving them and the trainer; publishes, rollbacks, refusals
and drift alerts are printed as they happen. Then, with the trainer paused, it measures
(`deploy.demo.measure`) decoding speed on the last prompts of the run, with no speculation, the
starting draft and the live draft, and the two drafts' expected acceptance on the run's held-out
traces; it ends with the summary (`deploy.demo.report`), as tables and with `--json` as JSON and a
PNG plot.

`--train-steps N` runs lockstep instead of spare cycles: after every window of requests the
clients wait while the trainer trains exactly N steps and the replicas take what it published, so
that what is learnt does not depend on the machine's load.

`--proposer medusa|hydra` runs the same with draft heads over the target in place of the draft
model (K = k heads; every request logs the target's hidden states, so that the heads learn from
all of them). `--adapters` trains a LoRA adapter of the draft per domain instead of the shared
draft, and the router; every fourth request then names no domain, for the router to place.

State (Redis's data and the trainer's checkpoint) lives under `--state-dir`, one folder per preset
and proposer, so a second run starts from the draft the first one left live; `--fresh` starts
over, and so does a run whose demo pair is not the one the state was made with. `--keep-running`
leaves the stack up afterwards. Ctrl-C stops everything at any point.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import secrets
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import redis
from ray.exceptions import RayError
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import AutoTokenizer

from deploy.demo.build import DEFAULT_CACHE_DIR, PRESETS, DemoModels, build_demo_models, cached
from deploy.demo.client import Clients, Lockstep, Served
from deploy.demo.measure import held_out_acceptance, measure_speed
from deploy.demo.report import acceptance, plot, speedup_summary, summarise, tables
from deploy.demo.screenshot import dashboard_screenshot
from deploy.demo.workloads import Phase, WorkloadSpec, request_stream
from deploy.ray_serve import NAMESPACE, TRAINER_NAME, ActorControl, ServiceConfig
from deploy.serve import Endpoint, running, stop_on_signals, wait_for_ctrl_c
from serving.replica import ENGINES
from store.drift import read_alerts
from store.load import read_load
from store.redis_server import open_redis
from store.registry import Registry

DEFAULT_STATE_DIR = Path.home() / ".cache" / "osd" / "demo-state"
DRAFT = "draft"  # the registry name the trainer publishes under
ADAPTER_MIN_TRACES = 30  # with --adapters: a domain's requests before its adapter


@dataclass(frozen=True)
class DemoPlan:
    """One demo run: the workload, the clients, the stack's settings and how long it takes."""

    preset: str
    phases: tuple[Phase, ...]
    build_minutes: float  # building the pair from an empty cache, on 2 CPU cores
    run_minutes: float  # the rest, on 2 CPU cores
    concurrency: int = 4
    think_seconds: float = 1.0
    max_new_tokens: int = 48
    window: int = 16
    k: int = 3
    replicas: int = 2
    probe_prompts: int = 8  # the last prompts of the run, for the speed measurement
    chat_every: int = 4  # every n-th request goes through /v1/chat/completions
    held_out_fraction: float = 0.1
    trainer_settings: dict = field(default_factory=dict)
    train_steps: int | None = None  # lockstep: steps after every window; None: in spare cycles


PLANS = {
    "full": DemoPlan(
        preset="full",
        phases=(Phase("prose", 48), Phase("python", 224), Phase("c", 96), Phase("python", 64)),
        build_minutes=11,
        run_minutes=6,
        trainer_settings={
            "gate_every": 30,
            "gate_min_positions": 300,
            "watch_requests": 12,
            "learning_rate": 1e-3,
        },  # fmt: skip
    ),
    "quick": DemoPlan(
        preset="quick",
        phases=(Phase("prose", 16), Phase("c", 112), Phase("python", 32)),
        build_minutes=2,
        run_minutes=2.5,
        # request ids are random, so the gate set's share of a phase is binomial: at a fifth, the c
        # phase's 112 requests hold fewer than 5 held-out traces about once in 2.5 million runs
        held_out_fraction=0.2,
        trainer_settings={
            "gate_every": 20,
            "gate_min_positions": 200,
            "watch_requests": 8,
            "learning_rate": 1e-3,
        },  # fmt: skip
    ),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osd demo", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the small pair and a short workload (under 5 min)")
    p.add_argument("--json", type=Path, help="write the summary here, and a PNG plot next to it")
    p.add_argument("--screenshot", type=Path, help="save a PNG of the dashboard here after the run")
    p.add_argument("--keep-running", action="store_true", help="leave the stack up afterwards (Ctrl-C stops)")
    p.add_argument("--fresh", action="store_true", help="forget the drafts and traces of earlier runs")
    p.add_argument("--concurrency", type=int, help="clients (default 4)")
    p.add_argument(
        "--proposer", choices=("draft", "medusa", "hydra"), default="draft", help="what drafts and learns"
    )
    p.add_argument("--adapters", action="store_true", help="a LoRA adapter per domain, and the router")
    p.add_argument(
        "--engine", choices=ENGINES, default="hf",
        help="the replicas' engine: this project's (default) or vLLM's (the vllm extra; draft model only)",
    )  # fmt: skip
    p.add_argument(
        "--train-steps", type=int, metavar="N",
        help="lockstep: after every window of requests the clients wait while the trainer trains "
        "exactly N steps and the replicas take what it publishes (default: the trainer learns in "
        "spare cycles). A run whose learning does not depend on the machine's load",
    )  # fmt: skip
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--seed", type=int, default=0, help="the workload's seed")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="where the demo models live")
    p.add_argument(
        "--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="Redis data and trainer checkpoints"
    )
    return p


def main(argv: list[str] | None = None) -> dict | None:
    args = parser().parse_args(argv)
    if args.proposer != "draft" and args.adapters:
        parser().error("--adapters are LoRA adapters of the draft model; drop --proposer")
    if args.engine == "vllm" and (args.proposer != "draft" or args.adapters):
        parser().error("--engine vllm serves the shared draft model: drop --proposer and --adapters")
    plan = PLANS["quick" if args.quick else "full"]
    if args.concurrency is not None:
        if args.concurrency < 1:
            parser().error(f"--concurrency must be at least 1, got {args.concurrency}")
        plan = dataclasses.replace(plan, concurrency=args.concurrency)
    if args.train_steps is not None:
        if args.train_steps < 1:
            parser().error(f"--train-steps must be at least 1, got {args.train_steps}")
        # the trainer trains while the clients wait: no think time is needed to leave it CPU
        plan = dataclasses.replace(plan, train_steps=args.train_steps, think_seconds=0.0)
    console = Console(soft_wrap=True)  # long lines whole, also in logs
    build = 0 if cached(PRESETS[plan.preset], args.cache_dir) else plan.build_minutes
    console.print(
        f"[bold]OSD Serve demo[/bold] ({plan.preset}): a target and a draft that learns online while "
        f"serving.\nExpected duration on 2 CPU cores: about {math.ceil(build + plan.run_minutes)} minutes"
        + (f" ({build:g} to build the demo models once, then {plan.run_minutes:g} to run)." if build else ".")
    )
    stop_on_signals()
    try:
        return demo(args, plan, console)
    except KeyboardInterrupt:
        console.print("stopping")
        return None


def demo(args: argparse.Namespace, plan: DemoPlan, console: Console) -> dict:
    """Build or reuse the models, start the stack, run, report; with --keep-running, wait for Ctrl-C."""
    models = build_demo_models(PRESETS[plan.preset], args.cache_dir, console=console)
    heads = args.proposer != "draft"
    variant = args.proposer if heads else "adapters" if args.adapters else None
    state = args.state_dir / (f"{plan.preset}-{variant}" if variant else plan.preset)
    if args.fresh:
        shutil.rmtree(state, ignore_errors=True)
    claim_state(state, models, console)
    token = os.environ.get("OSD_ADMIN_TOKEN") or secrets.token_urlsafe(12)
    endpoint = Endpoint(port=args.port, admin_token=token)
    cpus = os.cpu_count() or 1
    config = ServiceConfig(
        target=str(models.target), draft=None if heads else str(models.draft), k=plan.k,
        served_model_names=(f"osd-demo-{plan.preset}",), replicas=plan.replicas,
        replica_cpus=min(1.0, cpus / plan.replicas), torch_threads=max(1, cpus // plan.replicas),
        trainer_dir=str(state / "trainer"),
        trainer_settings=plan.trainer_settings, held_out_fraction=plan.held_out_fraction,
        proposer=args.proposer if heads else None, hidden_fraction=1.0 if heads else None,
        adapters=args.adapters, adapter_min_traces=ADAPTER_MIN_TRACES, engine=args.engine,
        adaptive_k=False,  # the demo shows acceptance learnt online: every step drafts plan.k tokens
    )  # fmt: skip
    with running(config, endpoint, state / "redis", console) as config:
        report = run(plan, models, config, endpoint, args.seed, console)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n")
            plot(report, args.json.with_suffix(".png"))
            console.print(f"summary: {args.json}; plot: {args.json.with_suffix('.png')}")
        if args.screenshot:
            try:
                dashboard_screenshot(endpoint.base_url, args.screenshot)
                console.print(f"dashboard screenshot: {args.screenshot}")
            except RuntimeError as err:
                console.print(f"[red]{err}[/red]")
        if args.keep_running:
            console.print(
                f"The stack stays up: API {endpoint.base_url}/v1, dashboard "
                f"{endpoint.base_url}/dashboard (admin token {token}). Ctrl-C stops it."
            )
            wait_for_ctrl_c()
    return report


def claim_state(state: Path, models: DemoModels, console: Console) -> None:
    """Mark `state` as made with this build of the demo pair; state made with another build (or
    before the pair had its chat tokens), whose draft versions and checkpoint would not fit the
    models, is removed first."""
    mark = state / "pair.json"
    pair = {key: models.manifest.get(key) for key in ("recipe_hash", "built_at", "vocab_size")}
    pair["chat"] = models.manifest.get("chat", {}).get("version")
    try:
        made_with = json.loads(mark.read_text())
    except (OSError, json.JSONDecodeError):
        made_with = None
    if made_with != pair and state.exists():
        console.print(f"The demo pair is not the one {state} was made with: starting over.")
        shutil.rmtree(state)
    state.mkdir(parents=True, exist_ok=True)
    mark.write_text(json.dumps(pair) + "\n")


def run(
    plan: DemoPlan, models: DemoModels, config: ServiceConfig, endpoint: Endpoint, seed: int, console: Console
) -> dict:
    """The workload against the running stack, the speed measurement and the report."""
    client = open_redis(config.redis)
    registry, trainer = Registry(client), ActorControl(TRAINER_NAME, NAMESPACE)
    tokenizer = AutoTokenizer.from_pretrained(models.target)
    spec = WorkloadSpec(
        phases=plan.phases, max_new_tokens=plan.max_new_tokens, seed=seed, chat_every=plan.chat_every
    )
    requests = list(request_stream(spec, models.held_out_corpus(), tokenizer))
    live = registry.live(DRAFT)  # none yet with adapters: the base draft serves until they come
    first = f"{DRAFT}:base" if live is None else live.label
    console.print(
        f"Dashboard: {endpoint.base_url}/dashboard   API: {endpoint.base_url}/v1 ({config.served_model!r})\n"
        f"Workload: {len(requests)} requests in phases "
        + " -> ".join(f"{p.domain} ({p.requests})" for p in plan.phases)
        + f", {plan.concurrency} clients, {plan.max_new_tokens} tokens each, "
        f"{sum(r.chat for r in requests)} of them through chat; starting from {first}"
        + (f"\nLockstep: the trainer trains {plan.train_steps} steps after every {plan.window} requests"
           if plan.train_steps else "")
    )  # fmt: skip
    board = Board(plan, len(requests), first, config.adapters)
    lockstep = None
    if plan.train_steps:
        trainer.pause()  # it trains only when told, between windows
        lockstep = Lockstep(plan.window, lambda: train_between(trainer, registry, client, plan, board))
    clients = Clients(
        endpoint.base_url, config.served_model, requests, plan.concurrency, plan.think_seconds, board.add,
        untagged_every=4 if config.adapters else 0, lockstep=lockstep,
    )  # fmt: skip
    began = time.time()
    with Live(board.render(), console=console, refresh_per_second=2) as live:
        clients.start()
        try:
            while clients.running:
                time.sleep(0.5)
                board.watch(registry, client, trainer, began, live.console)
                live.update(board.render())
        finally:
            clients.stop()
    console.print()
    board.watch(registry, client, trainer, began, console)
    last_domain = plan.phases[-1].domain  # with adapters, the speed probe's prompts get its adapter
    ended = (config.adapters and registry.live(DRAFT, last_domain)) or registry.live(DRAFT)
    trainer.pause()
    try:
        with console.status("measuring decoding speed: no speculation, starting draft, live draft"):
            prompts = [s.prompt for s in sorted(board.served, key=lambda s: s.end)[-plan.probe_prompts :]]
            measured = measure_speed(models, config, registry, ended, prompts, plan.max_new_tokens)
        label = f"{DRAFT}:base" if ended is None else ended.label
        speedup = speedup_summary(measured, f"{DRAFT}:base", label)
        with console.status("expected acceptance on the held-out traces: starting draft, live draft"):
            held_out = None if config.adapters else held_out_acceptance(config, registry, client, ended)
    finally:
        trainer.resume()
    report = summarise(board.served, plan.phases, plan.window, board.events, board.alerts, speedup)
    report = {
        "demo": plan.preset,
        "concurrency": plan.concurrency,
        "think_seconds": plan.think_seconds,
        "train_steps": plan.train_steps,
        "max_new_tokens": plan.max_new_tokens,
        "k": plan.k,
        "proposer": config.proposer or "draft",
        "replicas": plan.replicas,
        "started_from": first,
        "ended_with": speedup["live_draft"],
        "held_out": held_out,
    } | report
    for table in tables(report):
        console.print(table)
    console.print(
        f"requests {report['requests']} ({report['endpoints']['chat']['requests']} through chat), "
        f"failed {report['failed']}; published "
        f"{_versions(report['published'])}, rolled back {_versions(report['rolled_back'])}, refused "
        f"{_versions(report['refused'])}; drift alerts {len(report['alerts'])}.\n"
        f"Speedup vs no speculation on the last {speedup['prompts']} prompts (greedy, outputs identical): "
        f"live draft {speedup['live_vs_ar']:.2f}x, starting draft {speedup['initial_vs_ar']:.2f}x "
        f"({speedup['tokens_per_s']['no speculation']:.0f} tokens/s without speculation)."
    )
    if held_out:
        console.print(
            "Expected acceptance on the run's held-out traces, starting -> live draft: "
            + ", ".join(f"{d} {r['starting']:.2f} -> {r['live']:.2f}" for d, r in held_out.items())
        )
    return report


def _versions(versions: list) -> str:
    return ", ".join(f"v{v}" if isinstance(v, int) else v for v in versions) or "none"


def train_between(trainer: ActorControl, registry: Registry, client, plan: DemoPlan, board: Board) -> None:
    """Lockstep, between two windows: the trainer trains `plan.train_steps` steps on what the stream
    holds and gates; then every replica serves the live version before the next window starts."""
    try:
        board.trainer = trainer_line(trainer.train(plan.train_steps))
        live = registry.live(DRAFT)  # none with adapters: the base draft serves until they come
        if live is None:
            return
        deadline = time.monotonic() + 60
        while {load.draft_version for load in read_load(client)} != {live.label}:
            if time.monotonic() > deadline:  # a replica slow to swap: the next window goes on
                break
            time.sleep(0.05)
    except (redis.RedisError, RayError) as err:
        board.trainer = f"not answering ({type(err).__name__})"


def trainer_line(status: dict) -> str:
    """The trainer's status as the live display shows it."""
    line = f"{status['state']}, step {status['step']}, {status['trained_traces']} traces"
    return f"{line}; {status['activity']}" if status.get("activity") else line


class Board:
    """The live display's state: filled by the client threads (`add`) and by `watch`."""

    def __init__(self, plan: DemoPlan, total: int, version: str, adapters: bool):
        self.plan, self.adapters = plan, adapters
        self.served: list[Served] = []
        self.recent: deque[Served] = deque(maxlen=plan.window)
        self.events: list[dict] = []
        self.alerts: list[dict] = []
        self.version, self.trainer = version, "starting"
        self._lock = threading.Lock()
        self._seen_alerts: set[tuple] = set()
        self._next_slow = 0.0
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
        )
        self.task = self.progress.add_task("requests", total=total)

    def add(self, served: Served) -> None:
        with self._lock:
            self.served.append(served)
            if served.ok:
                self.recent.append(served)
                self.version = served.draft_version or self.version
        self.progress.update(self.task, advance=1)

    def watch(
        self, registry: Registry, client, trainer: ActorControl, since: float, console: Console
    ) -> None:
        """New registry events at once; the trainer and the drift alerts every 2 s. A store or
        trainer that does not answer is shown as such; the run goes on."""
        try:
            seen = len(self.events)
            self.events = [e for e in registry.history(since) if e.get("name") == DRAFT]
            for event in self.events[seen:]:
                console.print(f"[{time.strftime('%H:%M:%S')}] {describe(event)}")
            if time.monotonic() < self._next_slow:
                return
            self._next_slow = time.monotonic() + 2.0
            self.trainer = trainer_line(trainer.status())
            for alert in read_alerts(client, DRAFT, adapters=self.adapters):
                key = (alert.domain, alert.kind, alert.at)
                if key not in self._seen_alerts:
                    self._seen_alerts.add(key)
                    self.alerts.append(alert.to_json() | {"time": time.time()})
                    console.print(f"[{time.strftime('%H:%M:%S')}] drift alert: {alert.message}")
        except (redis.RedisError, RayError) as err:
            self.trainer = f"not answering ({type(err).__name__})"

    def render(self) -> Group:
        with self._lock:
            failed = sum(not s.ok for s in self.served)
            recent = acceptance(list(self.recent))
            phase = self.served[-1].phase if self.served else 0
        domain = self.plan.phases[phase].domain
        self.progress.update(self.task, description=f"phase {phase + 1}/{len(self.plan.phases)} {domain}")
        live = "-" if recent is None else f"{recent:.2f}"
        return Group(
            self.progress,
            f"acceptance (last {self.plan.window}) [bold]{live}[/bold]   draft {self.version}   "
            f"failed {failed}   trainer: {self.trainer}",
        )


def describe(event: dict) -> str:
    """A registry event as a line of the live display."""
    version, gate = event["version"], event.get("gate_acceptance")
    scope = "" if event.get("domain", "-") == "-" else f"{event['domain']} "  # a domain's adapter
    if event["event"] == "publish":
        return f"published {scope}v{version}" + (f" (gate: expected acceptance {gate:.2f})" if gate else "")
    if event["event"] == "rollback":
        return f"rolled back {scope}v{event['previous']} to v{version}: {event.get('reason', '')}"
    return f"refused {scope}v{version}: {event.get('reason', '')}"
