"""The `osd` command line: one entry point for the demo, serving and benchmarks."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

DEMO_ARGS = ["--prompts", "2", "--prompt-len", "32", "--max-new-tokens", "48", "--k", "3"]


def demo(argv: list[str]) -> None:
    """Interim demo until the demo world lands: a small generation through the engine on random
    weights, plain decoding vs the n-gram and draft proposers, with their acceptance."""
    from benchmarks import engine_micro

    Console().print(
        "[bold]OSD Serve demo[/bold] (interim): speculative decoding on a random-weight target/draft pair.\n"
        "A random draft agrees with the target only by chance; trained demo models come with the demo world."
    )
    engine_micro.main(DEMO_ARGS + argv)


def bench(argv: list[str]) -> None:
    """`osd bench engine ...` runs benchmarks.engine_micro with the remaining arguments."""
    parser = argparse.ArgumentParser(prog="osd bench")
    parser.add_argument("which", choices=["engine"])
    parser.parse_args(argv[:1])
    from benchmarks import engine_micro

    engine_micro.main(argv[1:])


COMMANDS = {"demo": demo, "bench": bench}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="osd", description="OSD Serve: speculative decoding that learns online."
    )
    parser.add_argument("command", choices=sorted(COMMANDS), help="demo: the main job; bench: benchmarks")
    args = parser.parse_args(argv[:1])
    COMMANDS[args.command](argv[1:])


if __name__ == "__main__":
    main()
