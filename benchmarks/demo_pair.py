"""The demo pair as the load benchmarks serve it: the preset's models, its draft (the base one, or
one distilled offline on a domain, built if missing) and held-out prompts of that domain."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from transformers import AutoTokenizer

from deploy.demo.build import DEFAULT_CACHE_DIR, PRESETS, DemoModels, build_demo_models
from deploy.demo.offline_distill import DistillSpec, distill_demo_draft
from deploy.demo.workloads import fixed_prompts


def add_arguments(p: argparse.ArgumentParser) -> None:
    """--demo, --cache-dir, --domain, --draft, --prompts and --seed."""
    p.add_argument("--demo", choices=sorted(PRESETS), default="full", help="demo pair preset")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    p.add_argument("--domain", default="python")
    p.add_argument(
        "--draft", choices=["distilled", "base"], default="distilled",
        help="the demo draft distilled offline on --domain (built if missing), or the base draft",
    )  # fmt: skip
    p.add_argument("--prompts", type=int, default=64, help="held-out prompts of --domain")
    p.add_argument("--seed", type=int, default=0)


def demo_pair(args: argparse.Namespace, console: Console) -> tuple[DemoModels, Path, list[list[int]]]:
    """The models, the draft's directory and the held-out prompts (32 to 96 tokens) that `args` name."""
    preset = PRESETS[args.demo]
    models = build_demo_models(preset, args.cache_dir, console=console)
    draft = models.draft
    if args.draft == "distilled":
        draft = distill_demo_draft(models, preset, DistillSpec(domain=args.domain), console)
    tokenizer = AutoTokenizer.from_pretrained(models.target)
    held_out = fixed_prompts(
        models.held_out_corpus(), tokenizer, args.domain, args.prompts, args.seed, (32, 96)
    )
    return models, draft, [list(p.token_ids) for p in held_out]
