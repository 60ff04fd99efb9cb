"""Per-domain LoRA adapters and the router against one shared online draft, on the demo world.

Training, in one process: a mixed workload (the domains' requests interleaved, each naming its
domain) is decoded by the target; every trace goes to a local Redis, and after each request two
learners take --steps-per-query turns each on the same traces: the shared draft's
`OnlineTrainer` (all weights, every domain) and `DomainTrainers` (a LoRA adapter per domain once
--min-traces of its traces came, over the unchanged starting draft, and the router).

Evaluation: --eval-prompts fresh held-out prompts per domain, decoded greedily in rotation (outputs
identical) by: the starting draft; the shared online draft; each domain's adapter, chosen by the
domain the request names; and the adapter the router picks for the same request sent untagged
(the starting draft below --min-confidence). Per domain: acceptance α and tokens/s; the router's
accuracy on these prompts and the time it takes to pick; the size of an adapter against the
draft's. Switching between adapters is a lookup: each is merged into its own draft copy.

    osd bench adapters --json benchmarks/results/adapters_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from benchmarks.results import print_rows, write_report
from deploy.demo.build import DEFAULT_CACHE_DIR, PRESETS, build_demo_models
from deploy.demo.measure import rotate
from deploy.demo.workloads import Phase, WorkloadSpec, fixed_prompts, request_stream
from distill.router import ROUTER, SHARED, DomainRouter, served_domain
from serving.engine.hf import SpecEngine
from serving.engine.proposers import DraftModelProposer, NullProposer
from serving.engine.protocol import Generation
from serving.engine.versions import version_draft
from serving.tracing import trace_of
from store.redis_server import LocalRedis
from store.registry import Registry
from store.traces import StreamConfig, TraceWriter
from trainer.adapters import DomainTrainers
from trainer.config import AdapterPolicy, TrainerConfig
from trainer.loop import OnlineTrainer


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osd bench adapters", description=__doc__.splitlines()[0])
    p.add_argument("--demo", choices=sorted(PRESETS), default="full", help="demo pair preset")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    p.add_argument("--domains", default="prose,python,c")
    p.add_argument("--requests", type=int, default=150, help="training requests per domain")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--steps-per-query", type=int, default=2, help="turns of each learner after a request")
    p.add_argument("--min-traces", type=int, default=30, help="a domain's traces before its adapter")
    p.add_argument("--adapter-lr", type=float, default=AdapterPolicy.learning_rate)
    p.add_argument("--gate-min-positions", type=int, default=300)
    p.add_argument("--min-confidence", type=float, default=0.6, help="the router's, to use an adapter")
    p.add_argument("--eval-prompts", type=int, default=10, help="held-out prompts per domain")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the report here")
    return p


@dataclass
class Routed:
    """Decodes each request, sent untagged, with the engine of the domain the router picks."""

    router: DomainRouter | None
    engines: dict[str, SpecEngine]  # per domain, and SHARED for the starting draft
    min_confidence: float
    chosen: list[str]  # the domain picked for each request
    seconds: list[float]  # the time each pick took

    def generate(self, prompt, max_new_tokens: int, *, stop_token_ids: list[int]) -> Generation:
        began = time.perf_counter()
        domain = served_domain(SHARED, self.router, prompt, self.min_confidence)
        self.seconds.append(time.perf_counter() - began)
        self.chosen.append(domain)
        engine = self.engines.get(domain, self.engines[SHARED])
        return engine.generate(prompt, max_new_tokens, stop_token_ids=stop_token_ids)


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    console, began = Console(), time.perf_counter()
    preset = PRESETS[args.demo]
    models = build_demo_models(preset, args.cache_dir, console=console)
    tokenizer = AutoTokenizer.from_pretrained(models.target)
    domains = args.domains.split(",")
    corpus = models.held_out_corpus()
    per_domain = [
        list(request_stream(WorkloadSpec((Phase(d, args.requests),), max_new_tokens=args.max_new_tokens,
                                         seed=args.seed + i), corpus, tokenizer))
        for i, d in enumerate(domains)
    ]  # fmt: skip
    mixed = [r for group in itertools.zip_longest(*per_domain) for r in group if r is not None]
    target = AutoModelForCausalLM.from_pretrained(models.target).eval()
    plain = SpecEngine(target, NullProposer(), 0)
    policy = AdapterPolicy(min_traces=args.min_traces, learning_rate=args.adapter_lr)

    with LocalRedis() as server, tempfile.TemporaryDirectory() as scratch:
        client = server.client()
        stream = StreamConfig(stream="bench:traces", held_out_fraction=0.1)
        config = TrainerConfig(
            checkpoint_dir=Path(scratch), max_seq_len=preset.target.context, gate_every=20,
            gate_min_positions=args.gate_min_positions, watch_requests=10, max_in_flight=10**6,
        )  # fmt: skip
        shared = OnlineTrainer(config, models.draft, client, stream=stream)
        own = dataclasses.replace(config, checkpoint_dir=Path(scratch) / "adapters", adapters=policy)
        adapters = DomainTrainers(own, models.draft, client, stream=stream)
        writer = TraceWriter(client, stream)
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("training", total=len(mixed))
            for request in mixed:
                out = plain.generate(request.prompt.token_ids, request.max_new_tokens, stop_token_ids=[],
                                     top_logprobs=16)  # fmt: skip
                writer.append(trace_of(request.request_id, request.prompt.domain, "demo-target", ("none",),
                                       request.prompt.token_ids, out, {"temperature": 0.0}))  # fmt: skip
                writer.flush()
                for _ in range(args.steps_per_query):
                    shared.run_once()
                    adapters.run_once()
                progress.update(task, advance=1, description=f"training: {request.prompt.domain}")
        writer.close()
        registry = Registry(client)
        engines, sizes = evaluation_engines(registry, target, models.draft, domains, args.k)
        router_meta = registry.live(ROUTER)
        router = None if router_meta is None else DomainRouter.from_registry(registry.load(router_meta),
                                                                             router_meta.extra)  # fmt: skip
        trained = {"shared": shared.status(), "adapters": adapters.status()}

    rows, chosen, route_seconds = [], {}, []
    with console.status("decoding held-out prompts with every method, in rotation"):
        for i, domain in enumerate(domains):
            prompts = [p.token_ids for p in fixed_prompts(corpus, tokenizer, domain, args.eval_prompts,
                                                          seed=100 + i)]  # fmt: skip
            chosen[domain] = []
            routed = Routed(router, engines, args.min_confidence, chosen[domain], route_seconds)
            methods = {
                "starting draft": engines[SHARED],
                "shared online draft": engines["shared"],
                "adapter by tag": engines.get(domain, engines[SHARED]),
                "adapter by router": routed,
            }
            speed = rotate(methods, prompts, args.max_new_tokens)
            for method in methods:
                rows.append({"domain": domain, "method": method, "acceptance": speed["acceptance"][method],
                             "tokens_per_s": speed["tokens_per_s"][method]})  # fmt: skip
    own_share = {d: sum(c == d for c in picks) / len(picks) for d, picks in chosen.items()}
    report = {
        "benchmark": "adapters",
        "demo": args.demo,
        "domains": domains,
        "training_requests": len(mixed),
        "k": args.k,
        "adapter_policy": {
            "min_traces": args.min_traces,
            "learning_rate": args.adapter_lr,
            "lora": vars(policy.lora),
        },  # fmt: skip
        "sizes": sizes,
        "router": {
            "version": None if router_meta is None else router_meta.label,
            "fit": None if router_meta is None else router_meta.extra.get("fit"),
            "routed_to_own_domain": own_share,
            "min_confidence": args.min_confidence,
            "route_ms_median": round(statistics.median(route_seconds) * 1e3, 3),
        },  # fmt: skip
        "trainers": trained,
        "rows": rows,
        "seconds": round(time.perf_counter() - began, 1),
    }
    print_rows(console, f"held-out prompts, greedy, k={args.k} (outputs identical)",
               ("domain", "method", "α", "tokens/s"), rows)  # fmt: skip
    console.print(f"router: share of each domain's untagged prompts sent to its adapter {own_share}; "
                  f"sizes {sizes}")  # fmt: skip
    if args.json:
        write_report(args.json, report)
    return report


def evaluation_engines(
    registry: Registry, target: PreTrainedModel, draft_dir: Path, domains: list[str], k: int
) -> tuple[dict[str, SpecEngine], dict]:
    """Engines for the starting draft (SHARED), the shared online draft ("shared") and each domain's
    live adapter, merged into its own copy of the starting draft; and the sizes that costs."""
    base = AutoModelForCausalLM.from_pretrained(draft_dir).eval()
    engines = {SHARED: SpecEngine(target, DraftModelProposer(base), k)}

    def engine(meta) -> SpecEngine:
        return SpecEngine(target, DraftModelProposer(version_draft(base, meta, registry.load(meta))), k)

    engines["shared"] = engine(registry.live("draft"))
    adapter_bytes = {}
    for domain in domains:
        meta = registry.live("draft", domain)
        if meta is not None:
            engines[domain] = engine(meta)
            adapter_bytes[domain] = {"version": meta.label, "bytes": meta.size_bytes}
    draft_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    return engines, {"draft_bytes": draft_bytes, "adapters": adapter_bytes}


if __name__ == "__main__":
    main()
