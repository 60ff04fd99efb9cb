"""The `osd` command line: one entry point for the demo, serving and benchmarks."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table
from transformers.utils import logging as hf_logging


def demo(argv: list[str]) -> None:
    """`osd demo ...`: see deploy/demo/run.py."""
    from deploy.demo.run import main as demo_main

    demo_main(argv)


def demo_models(argv: list[str]) -> None:
    """`osd demo-models build|distill [--quick] [--cache-dir DIR]`: build (or reuse) the demo pair,
    or distill its draft offline on one domain's training prompts."""
    from deploy.demo.build import DEFAULT_CACHE_DIR, PRESETS, build_demo_models
    from deploy.demo.offline_distill import DistillSpec, distill_demo_draft

    parser = argparse.ArgumentParser(prog="osd demo-models")
    parser.add_argument("action", choices=["build", "distill"])
    parser.add_argument(
        "--domain", default="python", help="distill: the domain to distill on (default python)"
    )
    parser.add_argument("--quick", action="store_true", help="the small pair (under 2 minutes from scratch)")
    parser.add_argument(
        "--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help=f"default {DEFAULT_CACHE_DIR}"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even when a cached build exists")
    args = parser.parse_args(argv)
    console = Console()
    preset = PRESETS["quick" if args.quick else "full"]
    models = build_demo_models(preset, args.cache_dir, args.force, console)
    if args.action == "build":
        print_manifest(models.manifest, console)
        return
    out = distill_demo_draft(models, preset, DistillSpec(domain=args.domain), console)
    report = json.loads((out / "distilled.json").read_text())
    table = Table(title=f"offline-distilled draft ({args.domain}): held-out expected acceptance -> {out}")
    for column in ("domain", "initial draft", "distilled draft"):
        table.add_column(column, justify="right")
    for domain, before in report["expected_acceptance_before"].items():
        table.add_row(domain, f"{before:.2f}", f"{report['expected_acceptance_after'][domain]:.2f}")
    console.print(table)


def print_manifest(manifest: dict, console: Console) -> None:
    """The numbers a user checks after a build: sizes, losses and the draft's acceptance per domain."""
    held_out = manifest["held_out"]
    table = Table(
        title=f"demo pair '{manifest['preset']}': held-out, per domain (c = {manifest['cost_ratio_c']})"
    )
    for column in ("domain", "target loss", "draft loss", "draft expected acceptance", "greedy agreement"):
        table.add_column(column, justify="right")
    for domain, loss in held_out["target_loss"].items():
        table.add_row(
            domain,
            f"{loss:.2f}",
            f"{held_out['draft_loss'][domain]:.2f}",
            f"{held_out['expected_acceptance'][domain]:.2f}",
            f"{held_out['greedy_agreement'][domain]:.2f}",
        )
    console.print(table)
    for name in ("target", "draft"):
        info = manifest[name]
        console.print(
            f"{name}: {info['layers']}L-{info['hidden']}d, {info['parameters'] / 1e6:.2f}M parameters, "
            f"trained {info['train_seconds']:.0f} s on {', '.join(info['train_domains'])}"
        )


def bench(argv: list[str]) -> None:
    """`osd bench <name> ...` runs that benchmark (see BENCHMARKS) with the remaining arguments."""
    parser = argparse.ArgumentParser(prog="osd bench")
    parser.add_argument("which", choices=sorted(BENCHMARKS))
    which = parser.parse_args(argv[:1]).which
    importlib.import_module(f"benchmarks.{BENCHMARKS[which]}").main(argv[1:])


def check(argv: list[str]) -> None:
    """`osd check ...`: see deploy/check.py."""
    from deploy.check import main as check_main

    check_main(argv)


def serve(argv: list[str]) -> None:
    """`osd serve ...`: see deploy/serve.py."""
    from deploy.serve import main as serve_main

    serve_main(argv)


BENCHMARKS = {
    "adapters": "adapters",
    "batching": "batching",
    "chaos": "chaos",
    "coldstart": "coldstart",
    "engine": "engine",
    "engines": "engines",
    "store": "store_bench",
    "online": "online",
    "overhead": "overhead",
    "proposers": "proposers",
    "http": "http_load",
    "dashboard": "dashboard_load",
    "heads": "heads",
    "seeds": "seeds",
}
COMMANDS = {"demo": demo, "demo-models": demo_models, "bench": bench, "check": check, "serve": serve}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="osd", description="OSD Serve: speculative decoding that learns online."
    )
    parser.add_argument(
        "command",
        choices=sorted(COMMANDS),
        help="demo: the main job; demo-models: build the demo pair; bench: benchmarks; "
        "check: preflight a model pair; serve: the API",
    )
    args = parser.parse_args(argv[:1])
    hf_logging.disable_progress_bar()  # osd commands show their own progress
    COMMANDS[args.command](argv[1:])


if __name__ == "__main__":
    main()
