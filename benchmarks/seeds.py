"""Seeded sampling: what the seed-only coupling (serving.engine.sampling's race) costs against speculative
sampling's own rejection rule, side by side in one process on the demo pair.

For each domain's held-out prompts and each temperature, the same requests run unseeded (the
rejection sampler: accept x with probability min(1, p/q)) and seeded (the race: accept x when it
wins the target's race too, so the text depends on the seed alone), at a fixed k, interleaved
--repeats times. Rows: acceptance α, tokens per step τ, and tokens/s as a ratio to unseeded. It
also checks the property the race buys: each seeded text is the same at k = 1 and at k.

    osd bench seeds --json benchmarks/results/seeds_cpu.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console

from benchmarks.demo_pair import add_arguments, demo_pair
from benchmarks.results import print_rows, write_report
from serving.engine.hf import SpecEngine

COLUMNS = ("domain", "temperature", "sampling", "α", "τ", "tokens/s ÷ unseeded")


def run_arm(engine: SpecEngine, prompts: list[list[int]], tokens: int, temperature: float, seeded: bool):
    """(accepted, drafted, steps, seconds, texts) for every prompt once, each with its own seed."""
    accepted = drafted = steps = 0
    texts = []
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        out = engine.generate(
            prompt, tokens, temperature=temperature, seed=i if seeded else None, stop_token_ids=[]
        )
        accepted, drafted, steps = (
            accepted + out.stats.accepted,
            drafted + out.stats.drafted,
            steps + out.stats.steps,
        )
        texts.append(out.token_ids)
    return accepted, drafted, steps, time.perf_counter() - start, texts


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="osd bench seeds", description=__doc__.splitlines()[0])
    add_arguments(p)
    p.set_defaults(draft="base", prompts=12)
    p.add_argument("--domains", nargs="+", default=["prose", "python"], help="held-out prompts of each")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 1.0])
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    console = Console()
    torch.manual_seed(args.seed)
    rows, identical = [], True
    for domain in args.domains:
        args.domain = domain
        models, draft, prompts = demo_pair(args, console)
        engine = SpecEngine.from_pretrained(
            str(models.target), draft=str(draft), num_speculative_tokens=args.k
        )
        one = SpecEngine(engine.target, engine.proposer, num_speculative_tokens=1)
        for temperature in args.temperatures:
            totals = {False: [0, 0, 0, []], True: [0, 0, 0, []]}
            for _ in range(args.repeats):  # interleaved, so that drifting load hits both alike
                for seeded in (False, True):
                    a, d, s, seconds, texts = run_arm(
                        engine, prompts, args.max_new_tokens, temperature, seeded
                    )
                    total = totals[seeded]
                    total[0], total[1], total[2] = total[0] + a, total[1] + d, total[2] + s
                    total[3].append(seconds)
                    seeded_texts = texts if seeded else None
            *_, at_one = run_arm(one, prompts, args.max_new_tokens, temperature, seeded=True)
            identical = identical and at_one == seeded_texts
            unseeded_seconds = statistics.median(totals[False][3])
            for seeded, (a, d, s, seconds) in totals.items():
                rows.append({
                    "domain": domain, "temperature": temperature,
                    "sampling": "seeded race" if seeded else "unseeded",
                    "acceptance": round(a / d, 3) if d else None, "tau": round((a + s) / s, 3),
                    "speed_vs_unseeded": round(unseeded_seconds / statistics.median(seconds), 3),
                })  # fmt: skip
    report = {
        "benchmark": "seeds",
        "machine": f"{platform.machine()} ({torch.get_num_threads()} threads)",
        "demo": args.demo, "draft": args.draft, "k": args.k, "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
        "seeded_text_same_at_k1_and_k": identical, "rows": rows,
    }  # fmt: skip
    print_rows(console, f"Seeded race against unseeded sampling (k = {args.k})", COLUMNS, rows)
    console.print(f"seeded texts identical at k = 1 and k = {args.k}: {identical}")
    if args.json:
        write_report(args.json, report)
    return report


if __name__ == "__main__":
    main()
