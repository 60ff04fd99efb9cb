"""Online learning benchmark: a phased workload through the engine while the trainer learns.

One process, no HTTP: each request is served by the engine with the live draft (hot-swapped
between requests when the registry's live version changes), its trace goes to a local Redis
through the store, and the trainer (`trainer.loop.OnlineTrainer`, in process) then takes
--steps-per-query iterations. Each request's trace is scored as it is served, before any training
on it, for three drafts by expected acceptance (sum min(p, q) on the logged top-K) and by greedy
agreement: the static initial draft (no online training), the online draft as served, and the
draft distilled offline on --offline-domain (the upper bound); every --window requests make one
row.

--proposer medusa or hydra runs the same with draft heads (K = --k) in place of the draft model:
every trace logs the target's hidden states, the static heads are untrained, and the offline ones
are trained on the domain's training prompts (`deploy.demo.offline_distill`). Heads are scored
per head, teacher-forced (head i reads the tokens that really came before its guess).

At the end of each phase, --probe fresh prompts of the phase's domain (a workload of another seed)
are served greedily by four engines sharing the target, in rotation so that a slow spell of the
machine hits all alike: no speculation, and speculation with the static, online and offline
drafts. Their outputs must be identical (lossless); their tokens/s give the end-to-end gain.

    osd bench online --json benchmarks/results/online_cpu.json
    osd bench online --proposer hydra --json benchmarks/results/online_hydra_cpu.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.results import write_report
from deploy.demo.build import DEFAULT_CACHE_DIR, PRESETS, build_demo_models
from deploy.demo.measure import rotate
from deploy.demo.offline_distill import (
    DistillSpec,
    distill_demo_draft,
    distill_demo_heads,
    heads_distill_spec,
    load_demo_heads,
)
from deploy.demo.workloads import Phase, WorkloadSpec, request_stream
from distill.heads import DraftHeads, heads_spec
from serving.engine.hf import SpecEngine
from serving.engine.proposers import DraftModelProposer, HeadsProposer, NullProposer, Proposer
from serving.tracing import trace_of
from store.metrics import MetricsConfig, MetricsRecorder, request_counters
from store.redis_server import LocalRedis
from store.registry import Registry
from store.traces import StreamConfig, TraceWriter
from trainer.config import TrainerConfig
from trainer.learners import Learner
from trainer.loop import OnlineTrainer


def parse_phases(text: str) -> tuple[Phase, ...]:
    """ "prose:100,python:200" -> phases."""
    phases = []
    for part in text.split(","):
        domain, _, count = part.partition(":")
        phases.append(Phase(domain.strip(), int(count)))
    return tuple(phases)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osd bench online", description=__doc__.splitlines()[0])
    p.add_argument("--demo", choices=sorted(PRESETS), default="full", help="demo pair preset")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    p.add_argument("--phases", default="prose:100,python:300,c:100,python:150", help="domain:requests,...")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--proposer", choices=("draft", "medusa", "hydra"), default="draft", help="what learns")
    p.add_argument("--k", type=int, default=3, help="speculative tokens per step (heads: K)")
    p.add_argument("--window", type=int, default=25, help="requests per scoring window")
    p.add_argument("--steps-per-query", type=int, default=2, help="trainer iterations after each request")
    p.add_argument("--offline-domain", default="python", help="the domain of the offline-distilled draft")
    p.add_argument("--gate-min-positions", type=int, default=300, help="held-out positions the gate needs")
    p.add_argument("--probe", type=int, default=10, help="prompts per phase end for the tokens/s probe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the report here, and a PNG plot next to it")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    console = Console()
    preset = PRESETS[args.demo]
    models = build_demo_models(preset, args.cache_dir, console=console)
    target = AutoModelForCausalLM.from_pretrained(models.target).eval()
    heads = heads_spec(args.proposer, args.k)
    if heads is None:
        offline_dir = distill_demo_draft(models, preset, DistillSpec(domain=args.offline_domain), console)
        offline = AutoModelForCausalLM.from_pretrained(offline_dir)
    else:
        recipe = heads_distill_spec(args.offline_domain)
        offline = load_demo_heads(distill_demo_heads(models, preset, recipe, heads, console), target)
    tokenizer = AutoTokenizer.from_pretrained(models.target)
    spec = WorkloadSpec(phases=parse_phases(args.phases), max_new_tokens=args.max_new_tokens, seed=args.seed)
    corpus = models.held_out_corpus()
    requests = list(request_stream(spec, corpus, tokenizer))
    max_len = preset.target.context

    with LocalRedis() as server, tempfile.TemporaryDirectory() as scratch:
        client = server.client()
        stream = StreamConfig(stream="bench:traces", held_out_fraction=0.1)
        metrics = MetricsConfig(prefix="bench:metrics")
        config = TrainerConfig(
            checkpoint_dir=Path(scratch) / "trainer",
            max_seq_len=max_len,
            gate_every=20,
            gate_min_positions=args.gate_min_positions,
            watch_requests=10,
            max_in_flight=10**6,
            heads=heads,
        )
        base = models.target if heads else models.draft
        trainer = OnlineTrainer(config, base, client, stream=stream, metrics=metrics)
        registry = Registry(client)
        learner = trainer.learner
        drafts = {"static": learner.build(), "online": learner.build(), "offline": offline}
        drafts = {name: module.eval() for name, module in drafts.items()}
        engines = {name: SpecEngine(target, proposer_of(module), args.k) for name, module in drafts.items()}
        engine = engines["online"]
        speed_engines = {"no_speculation": SpecEngine(target, NullProposer(), 0), **engines}
        speeds, phase_ends = [], phase_boundaries(spec.phases)
        writer, recorder = TraceWriter(client, stream), MetricsRecorder(client, metrics)
        live = registry.live(config.draft_name, config.domain)
        events, windows, window = [], [], Window()
        started = time.perf_counter()
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("online", total=len(requests))
            for i, request in enumerate(requests):
                current = registry.live(config.draft_name, config.domain)
                if current.version != live.version:  # hot-swap between requests
                    engine.proposer.load_weights(registry.load(current))
                    kind = "rollback" if current.version < live.version else "publish"
                    events.append({"request": i, "event": kind, "version": current.version})
                    live = current
                out = engine.generate(
                    request.prompt.token_ids,
                    request.max_new_tokens,
                    temperature=request.temperature,
                    seed=request.seed,
                    stop_token_ids=[],
                    top_logprobs=16,
                    hidden_states=heads is not None,
                )
                sampling = {"temperature": request.temperature, "top_p": request.top_p, "seed": request.seed}
                trace = trace_of(
                    request.request_id, request.prompt.domain, "demo-target", (live.label,),
                    request.prompt.token_ids, out, sampling,
                )  # fmt: skip
                writer.append(trace)
                counters = request_counters(
                    out.stats.steps, out.stats.drafted, out.stats.accepted, len(out.token_ids),
                    out.stats.drafted_per_position, out.stats.accepted_per_position, None, None,
                )  # fmt: skip
                recorder.record(live.label, request.prompt.domain, counters)
                window.add(trace, out.stats, drafts, learner)  # scored before any training on it
                writer.flush()
                recorder.flush()
                for _ in range(args.steps_per_query):
                    trainer.run_once()
                if window.requests == args.window or i + 1 in phase_ends:
                    windows.append(window.row(i + 1, request))
                    window = Window()
                if i + 1 in phase_ends and args.probe:
                    progress.update(task, description=f"{request.prompt.domain}: tokens/s probe")
                    phase = (Phase(request.prompt.domain, args.probe),)
                    probe = WorkloadSpec(
                        phases=phase, max_new_tokens=args.max_new_tokens, seed=args.seed + 1 + i
                    )
                    prompts = [r.prompt.token_ids for r in request_stream(probe, corpus, tokenizer)]
                    speed = probe_speed(speed_engines, prompts, args.max_new_tokens)
                    speeds.append({"phase": request.phase, "requests": i + 1, **speed})
                progress.update(task, advance=1, description=f"{request.prompt.domain}: v{live.version}")
        seconds = time.perf_counter() - started
        writer.close()
        recorder.close()
    report = {
        "benchmark": "online",
        "demo": args.demo,
        "proposer": args.proposer,
        "phases": [vars(p) for p in spec.phases],
        "k": args.k,
        "window": args.window,
        "steps_per_query": args.steps_per_query,
        "seconds": round(seconds, 1),
        "windows": windows,
        "events": events,
        "phase_summary": summarise(windows, spec.phases),
        "speed": speeds,
    }
    console.print_json(data={k: report[k] for k in ("events", "phase_summary", "speed")})
    if args.json:
        write_report(args.json, report)
        plot(report, args.json.with_suffix(".png"))
    return report


class Window:
    """A window's tallies. Each request's trace is scored when it is served, by every draft as it is
    then (the online one as served), before the trainer has trained on it: no draft is scored on
    traces it has learnt from."""

    def __init__(self) -> None:
        self.requests, self.accepted, self.drafted = 0, 0, 0
        # draft (expected acceptance on the top-K) or draft_greedy (argmax agreement) -> [sum, positions]
        self.expected: dict[str, list[float]] = {}

    def add(self, trace, stats, drafts: dict, learner: Learner) -> None:
        self.requests += 1
        self.accepted, self.drafted = self.accepted + stats.accepted, self.drafted + stats.drafted
        for name, module in drafts.items():
            for measure, greedy in ((name, False), (f"{name}_greedy", True)):
                ((total, positions),) = learner.acceptance(module, [trace], greedy=greedy)
                tally = self.expected.setdefault(measure, [0.0, 0])
                tally[0], tally[1] = tally[0] + total, tally[1] + positions

    def row(self, requests_done: int, request) -> dict:
        return {
            "requests": requests_done,
            "phase": request.phase,
            "domain": request.prompt.domain,
            **{name: total / positions for name, (total, positions) in self.expected.items()},
            "served_acceptance_rate": self.accepted / self.drafted if self.drafted else None,
        }


def proposer_of(module: torch.nn.Module) -> Proposer:
    return HeadsProposer(module) if isinstance(module, DraftHeads) else DraftModelProposer(module)


MEASURES = ("static", "online", "offline", "static_greedy", "online_greedy", "offline_greedy")


def phase_boundaries(phases: tuple[Phase, ...]) -> set[int]:
    """The request counts at which each phase ends."""
    ends, total = set(), 0
    for phase in phases:
        total += phase.requests
        ends.add(total)
    return ends


def probe_speed(engines: dict[str, SpecEngine], prompts: list, max_new_tokens: int) -> dict:
    """Greedy tokens/s of each engine on the same prompts, in rotation, and the ratios that matter."""
    speed = rotate(engines, prompts, max_new_tokens)
    per_s = speed["tokens_per_s"]
    return speed | {
        "online_vs_static": round(per_s["online"] / per_s["static"], 3),
        "online_vs_no_speculation": round(per_s["online"] / per_s["no_speculation"], 3),
        "offline_vs_static": round(per_s["offline"] / per_s["static"], 3),
    }


def first_window(windows: list[dict], start: int, hits: list[bool]) -> int | None:
    """Requests into the phase (which began after request `start`) until the first window that hits."""
    return next((w["requests"] - start for w, hit in zip(windows, hits, strict=True) if hit), None)


def summarise(windows: list[dict], phases: tuple[Phase, ...]) -> list[dict]:
    """Per phase, on greedy acceptance: its first and last window; the requests into the phase until
    the online draft first reached 90% of the offline draft's and came within 0.05 of it; and
    recovery, the requests until it first came within 0.05 of its own plateau in the phase (the
    mean of the phase's last two windows). None: never within the phase."""
    summary, start = [], 0
    for index, phase in enumerate(phases):
        own = [w for w in windows if w["phase"] == index]
        plateau = sum(w["online_greedy"] for w in own[-2:]) / len(own[-2:]) if own else None
        summary.append(
            {
                "phase": index,
                "domain": phase.domain,
                "first": {k: own[0][k] for k in MEASURES} if own else None,
                "last": {k: own[-1][k] for k in MEASURES} if own else None,
                "requests_to_90pct_of_offline": first_window(
                    own, start, [w["online_greedy"] >= 0.9 * w["offline_greedy"] for w in own]
                ),
                "requests_to_within_0.05_of_offline": first_window(
                    own, start, [w["online_greedy"] >= w["offline_greedy"] - 0.05 for w in own]
                ),
                "online_plateau": plateau,
                "requests_to_recover": first_window(
                    own, start, [w["online_greedy"] >= plateau - 0.05 for w in own]
                ),
            }
        )
        start += phase.requests
    return summary


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows = report["windows"]
    x = [w["requests"] for w in windows]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    noun = "draft" if report["proposer"] == "draft" else f"{report['proposer']} heads"
    for key, style in (("offline", "--"), ("online", "-"), ("static", ":")):
        values = [w[f"{key}_greedy"] for w in windows]
        ax.plot(x, values, style, label=f"{key} {noun}", marker="o", markersize=3)
    for event in report["events"]:
        color = "tab:green" if event["event"] == "publish" else "tab:red"
        ax.axvline(event["request"], color=color, alpha=0.4, linewidth=1)
    start = 0
    for phase in report["phases"]:
        ax.text(start + 2, 0.02, phase["domain"], fontsize=8)
        ax.axvline(start, color="grey", linewidth=0.5)
        start += phase["requests"]
    ax.set_xlabel("requests served")
    ax.set_ylabel("greedy acceptance per " + ("position" if noun == "draft" else "head") + " (window)")
    ax.set_ylim(0, 1)
    ax.set_title(f"online distillation ({report['proposer']}): green = publish, red = rollback")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
