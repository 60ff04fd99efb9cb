"""Throughput under concurrency: batched speculative decoding against the per-request loop.

One process, one redis-server started here (traces and metrics go where they always go), and one
`serving.replica.Replica` per configuration, all serving the demo pair (greedy, `--max-tokens`
new tokens per request, no early stop, held-out prompts of `--domain`):
- `loop-ar`, `loop-spec`: `max_batch` 1, one request decoded at a time (the replica before
  batching), plain decoding and speculation with a fixed k;
- `batched-ar`, `batched-spec`, `batched-spec-k`: `max_batch` 16 (continuous batching), plain
  decoding, speculation with k chosen per step by the load (`adaptive_k`), and with a fixed k.
At each concurrency, rounds alternate over the configurations so that drift on this machine hits
all alike; a block is a closed loop of `concurrency` clients until `--block-requests` (at least
2x concurrency) are done. Per level and configuration: tokens/s, requests/s, p50/p99 latency,
the mean k drafted per step, tokens per step; then the ratios batched/loop and spec/AR.

Cache layout: 8 sequences verifying k = 3 drafts a step for 48 steps, once in the slot cache
(serving.engine.kv: rollback sets a row's length) and once in a padded DynamicCache, the other layout
the issue names (left padding and a 2D mask; rejected positions stay behind as masked holes).

    osd bench batching --json benchmarks/results/batching_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel

from benchmarks.demo_pair import add_arguments, demo_pair
from benchmarks.results import print_rows, write_report
from serving.engine.kv import SlotCache
from serving.engine.models import forward_slots, prefill, with_cache
from serving.replica import Finished, Replica, ReplicaConfig, Request
from store.metrics import MetricsConfig
from store.redis_server import LocalRedis
from store.traces import StreamConfig

CONFIGS = {  # name -> (speculate, max_batch, adaptive_k)
    "loop-ar": (False, 1, False),
    "loop-spec": (True, 1, False),
    "batched-ar": (False, 16, False),
    "batched-spec": (True, 16, True),
    "batched-spec-k": (True, 16, False),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osd bench batching", description=__doc__.splitlines()[0])
    add_arguments(p)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS))
    p.add_argument("--rounds", type=int, default=4, help="blocks per configuration and level")
    p.add_argument("--block-requests", type=int, default=24, help="at least; 2x concurrency when higher")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--layout-steps", type=int, default=48, help="cache layout comparison; 0 skips it")
    p.add_argument("--json", type=Path, help="write the report here")
    return p


async def closed_loop(
    replica: Replica, prompts: Iterator[list[int]], concurrency: int, max_tokens: int, requests: int
) -> tuple[list[tuple[float, Finished]], float]:
    """`concurrency` clients, each sending its next request when the last is done, until `requests`
    are; returns (latency, Finished) per request and the block's wall time."""
    left = itertools.count()
    done: list[tuple[float, Finished]] = []

    async def client() -> None:
        while next(left) < requests:
            start = time.perf_counter()
            finished = await replica.complete(Request(next(prompts), max_tokens, stop_token_ids=[]))
            done.append((time.perf_counter() - start, finished))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return done, time.perf_counter() - start


def summarize(blocks: list[tuple[list[tuple[float, Finished]], float]]) -> dict:
    latencies = [latency for done, _ in blocks for latency, _ in done]
    stats = [f.generation.stats for done, _ in blocks for _, f in done]
    tokens = sum(len(f.generation.token_ids) for done, _ in blocks for _, f in done)
    wall = sum(seconds for _, seconds in blocks)
    steps = sum(s.steps for s in stats)
    return {
        "requests": len(latencies),
        "tokens_per_s": round(tokens / wall, 1),
        "requests_per_s": round(len(latencies) / wall, 2),
        "latency_p50_s": round(float(np.percentile(latencies, 50)), 3),
        "latency_p99_s": round(float(np.percentile(latencies, 99)), 3),
        "mean_k": round(sum(s.drafted for s in stats) / steps, 2),
        "tokens_per_step": round(tokens / steps, 2),
    }


def replica_for(name: str, target: Path, draft: Path, k: int, redis_client) -> Replica:
    speculate, max_batch, adaptive = CONFIGS[name]
    config = ReplicaConfig(
        target=str(target), draft=str(draft) if speculate else None, proposer=None if speculate else "none",
        num_speculative_tokens=k if speculate else 0, max_batch=max_batch, adaptive_k=adaptive,
        max_queue=64, replica_id=f"bench-{name}", stream=StreamConfig(stream=f"bench:batching:{name}"),
        metrics=MetricsConfig(prefix=f"bench:batching:{name}"),
    )  # fmt: skip
    return Replica(config, redis_client)


@torch.inference_mode()
def layout_step_seconds(
    target: PreTrainedModel, prompts: list[list[int]], k: int, steps: int, seed: int
) -> dict:
    """Mean seconds of one verify step of len(prompts) sequences in each cache layout, the same
    random acceptance (about 0.6 per draft) for both; any ids stand in for drafts."""
    rng = np.random.default_rng(seed)
    accepted = [[int(min(k, rng.geometric(0.4) - 1)) for _ in prompts] for _ in range(steps)]
    drafts = torch.randint(0, target.config.vocab_size, (steps, len(prompts), k + 1))

    slot = SlotCache(target.config)
    slots = [slot.acquire() for _ in prompts]
    for s, prompt in zip(slots, prompts, strict=True):
        prefill(target, slot, s, torch.tensor(prompt[:-1]))
    start = time.perf_counter()
    for step in range(steps):
        forward_slots(target, slot, slots, list(drafts[step]))
        for s, a in zip(slots, accepted[step], strict=True):
            slot.lengths[s] += a + 1
    slot_seconds = (time.perf_counter() - start) / steps

    longest = max(map(len, prompts)) - 1
    ids = torch.tensor([[0] * (longest - len(p) + 1) + p[:-1] for p in prompts])  # left padding
    mask = (
        torch.arange(longest).unsqueeze(0)
        >= longest - torch.tensor([len(p) - 1 for p in prompts]).unsqueeze(1)
    ).long()
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = DynamicCache(config=target.config)
    target(input_ids=ids, attention_mask=mask, position_ids=positions, **with_cache(cache))
    next_position = positions[:, -1] + 1  # [B]
    start = time.perf_counter()
    for step in range(steps):
        new_positions = next_position.unsqueeze(1) + torch.arange(k + 1)
        mask = torch.cat([mask, torch.ones(len(prompts), k + 1, dtype=torch.long)], dim=1)
        target(
            input_ids=drafts[step],
            attention_mask=mask,
            position_ids=new_positions,
            **with_cache(cache),
        )
        kept = torch.tensor(accepted[step]) + 1  # the rest become holes: masked from now on
        mask[:, -(k + 1) :] = (torch.arange(k + 1) < kept.unsqueeze(1)).long()
        next_position += kept
    padded_seconds = (time.perf_counter() - start) / steps
    return {
        "sequences": len(prompts),
        "k": k,
        "steps": steps,
        "slot_cache_ms": round(1000 * slot_seconds, 2),
        "padded_dynamic_cache_ms": round(1000 * padded_seconds, 2),
        "padded_over_slot": round(padded_seconds / slot_seconds, 2),
        "padded_final_kv_length": mask.shape[1],
        "slot_final_kv_length": max(slot.lengths),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    console = Console()
    models, draft, held_out = demo_pair(args, console)
    layout = None
    if args.layout_steps:
        with console.status("cache layouts: slot cache vs padded DynamicCache"):
            target = AutoModelForCausalLM.from_pretrained(models.target).eval()
            layout = layout_step_seconds(target, held_out[:8], args.k, args.layout_steps, args.seed)
    levels = []
    with tempfile.TemporaryDirectory() as scratch, LocalRedis(data_dir=Path(scratch) / "redis") as redis:
        client = redis.client()
        with console.status("starting one replica per configuration (each times its steps)"):
            replicas = {
                name: replica_for(name, models.target, draft, args.k, client) for name in args.configs
            }
        try:
            for concurrency in args.concurrency:
                requests = max(args.block_requests, 2 * concurrency)
                prompts = itertools.cycle(held_out)
                runs: dict[str, list] = {name: [] for name in replicas}
                with console.status(
                    f"concurrency {concurrency}: {args.rounds} rounds of {len(replicas)} configs"
                ):
                    for _, (name, replica) in itertools.product(range(args.rounds), replicas.items()):
                        loop = closed_loop(replica, prompts, concurrency, args.max_tokens, requests)
                        runs[name].append(asyncio.run(loop))
                level = {"concurrency": concurrency} | {name: summarize(run) for name, run in runs.items()}
                level["ratios"] = ratios(level)
                levels.append(level)
                console.print(f"concurrency {concurrency}: {level['ratios']}")
        finally:
            for replica in replicas.values():
                replica.close()
    report = {
        "benchmark": "batching",
        "demo": args.demo,
        "domain": args.domain,
        "draft": args.draft,
        "k": args.k,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(),
        "configs": {
            name: dict(zip(("speculate", "max_batch", "adaptive_k"), CONFIGS[name], strict=True))
            for name in args.configs
        },  # noqa: E501
        "levels": levels,
        "cache_layout": layout,
    }
    rows = [
        {"clients": level["concurrency"], "config": name, **{key: level[name][key] for key in COLUMNS}}
        for level in levels
        for name in args.configs
    ]
    print_rows(console, f"batching, demo {args.demo}, k={args.k}", ("clients", "config", *COLUMNS), rows)
    if args.json:
        write_report(args.json, report)
    return report


COLUMNS = ("tokens_per_s", "latency_p50_s", "latency_p99_s", "mean_k", "tokens_per_step")


def ratios(level: dict) -> dict:
    """Tokens/s ratios of one level: batched over the loop, and speculation over plain decoding."""
    pairs = {
        "batched_spec_over_loop_spec": ("batched-spec", "loop-spec"),
        "batched_ar_over_loop_ar": ("batched-ar", "loop-ar"),
        "batched_spec_over_batched_ar": ("batched-spec", "batched-ar"),
        "batched_spec_k_over_batched_ar": ("batched-spec-k", "batched-ar"),
        "loop_spec_over_loop_ar": ("loop-spec", "loop-ar"),
    }
    return {
        key: round(level[a]["tokens_per_s"] / level[b]["tokens_per_s"], 2)
        for key, (a, b) in pairs.items()
        if a in level and b in level
    }


if __name__ == "__main__":
    main()
