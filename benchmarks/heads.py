"""Draft heads against the draft model and n-gram lookup on the demo pair, offline-trained.

Medusa and Hydra heads (K = --k) are trained offline on the target's greedy continuations of
--prompts prompts cut from the *training* files of --domain (`deploy.demo.offline_distill`: the
target's hidden state at each output position against its top-16 at the positions each head
guesses, as the online trainer does; cached beside the demo pair). Then, on held-out prompts of
the domain, greedy, in one process: plain decoding, the demo draft, n-gram lookup, Medusa and
Hydra heads in chain mode, and Hydra heads verified as a static tree (--tree). Every method's
output must equal plain decoding's. Per method: acceptance α (accepted / drafted; a tree counts
its depth as drafted), τ (tokens per target forward), and tokens/s (engines in rotation,
`deploy.demo.measure.rotate`), with the ratio to plain decoding.

    osd bench heads --json benchmarks/results/heads_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.results import print_rows, write_report
from deploy.demo.build import DEFAULT_CACHE_DIR, PRESETS, build_demo_models
from deploy.demo.measure import rotate
from deploy.demo.offline_distill import distill_demo_heads, heads_distill_spec, load_demo_heads
from deploy.demo.workloads import fixed_prompts
from distill.heads import HeadsSpec
from serving.engine.hf import SpecEngine
from serving.engine.proposers import DraftModelProposer, HeadsProposer, NgramProposer, NullProposer
from serving.engine.tree import static_tree


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osd bench heads", description=__doc__.splitlines()[0])
    p.add_argument("--demo", choices=sorted(PRESETS), default="full", help="demo pair preset")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    p.add_argument("--domain", default="python")
    p.add_argument("--k", type=int, default=3, help="heads, and draft tokens per step")
    p.add_argument("--tree", default="3,2,2", help="the static tree's candidates per depth")
    p.add_argument("--prompts", type=int, default=256, help="training prompts")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--eval-prompts", type=int, default=12)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--json", type=Path, help="write the report here")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    console, began = Console(), time.perf_counter()
    preset = PRESETS[args.demo]
    models = build_demo_models(preset, args.cache_dir, console=console)
    tokenizer = AutoTokenizer.from_pretrained(models.target)
    target = AutoModelForCausalLM.from_pretrained(models.target).eval().requires_grad_(False)
    torch.set_num_threads(1)  # as a replica decodes
    held_out = [p.token_ids for p in fixed_prompts(models.held_out_corpus(), tokenizer, args.domain,
                                                    args.eval_prompts, seed=1)]  # fmt: skip
    spec = dataclasses.replace(heads_distill_spec(args.domain), prompts=args.prompts, epochs=args.epochs)
    heads, training = {}, {}
    for kind in ("medusa", "hydra"):
        path = distill_demo_heads(models, preset, spec, HeadsSpec(kind, args.k), console)
        heads[kind] = load_demo_heads(path, target)
        training[kind] = json.loads((path / "distilled.json").read_text())
    draft = AutoModelForCausalLM.from_pretrained(models.draft).eval()
    tree = static_tree(tuple(int(n) for n in args.tree.split(",")))
    engines = {
        "no speculation": SpecEngine(target, NullProposer(), 0),
        "draft model": SpecEngine(target, DraftModelProposer(draft), args.k),
        "n-gram": SpecEngine(target, NgramProposer(), args.k),
        "medusa heads": SpecEngine(target, HeadsProposer(heads["medusa"]), args.k),
        "hydra heads": SpecEngine(target, HeadsProposer(heads["hydra"]), args.k),
        f"hydra heads, tree {args.tree}": SpecEngine(target, HeadsProposer(heads["hydra"], tree), args.k),
    }
    with console.status("decoding held-out prompts with every method, in rotation"):
        speed = rotate(engines, held_out, args.max_new_tokens)
        counts = {}
        for name, engine in engines.items():
            drafted = accepted = steps = 0
            for prompt in held_out:
                stats = engine.generate(prompt, args.max_new_tokens, stop_token_ids=[]).stats
                drafted, accepted, steps = (
                    drafted + stats.drafted,
                    accepted + stats.accepted,
                    steps + stats.steps,
                )
            counts[name] = (drafted, accepted, steps)
    ar = speed["tokens_per_s"]["no speculation"]
    rows_out = [
        {
            "method": name,
            "acceptance": round(a / d, 3) if d else None,
            "mean_accepted_length": round((a + s) / s, 3),
            "tokens_per_s": speed["tokens_per_s"][name],
            "vs_no_speculation": round(speed["tokens_per_s"][name] / ar, 3),
        }
        for name, (d, a, s) in counts.items()
    ]
    report = {
        "benchmark": "heads",
        "demo": args.demo,
        "domain": args.domain,
        "k": args.k,
        "tree": args.tree,
        "training": training,
        "eval_prompts": len(held_out),
        "max_new_tokens": args.max_new_tokens,
        "methods": rows_out,
        "seconds": round(time.perf_counter() - began, 1),
    }
    print_rows(
        console,
        f"greedy, held-out {args.domain}, k={args.k} (outputs identical to plain decoding)",
        ("method", "α", "τ", "tokens/s", "vs plain"),
        rows_out,
    )
    if args.json:
        write_report(args.json, report)
    return report


if __name__ == "__main__":
    main()
