"""Which proposer pays, by workload and load: plain decoding, n-gram lookup, suffix speculation,
the learnt draft, draft heads and the per-step controller, side by side on the demo pair.

Workloads (`deploy.demo.workloads`, held-out text only): `demo`, held-out prompts of every domain
in turn; `code-edits`, a Python file then its first line again, changed, so the answer repeats the
prompt; `agent-loop`, conversations whose tool outputs (files) are read twice, so earlier inputs
and answers come back in later requests. Arms, one engine each over the same target: `plain`;
`ngram`, `draft` (distilled offline on Python, `benchmarks.demo_pair`), `heads` (Hydra, trained
offline as `osd bench heads` does) at a fixed k; `suffix`, suffix speculation alone (its
candidates wherever it has any); `controller`, the draft and suffix speculation under the per-step
controller, by the step costs the engine measured at start (`SpecEngine.calibrate`).

At each concurrency (1: one request at a time, solo; then 4, 8, 16), each workload's requests run
as a closed loop of that many clients through the engine's continuous batching, each client taking
the next conversation and sending its turns one after the other. Each arm first serves one block
untimed (the controller's costs and acceptances settle, as in a server that has been serving),
then rounds rotate over the arms so that drift on this machine hits all alike; the suffix index
starts empty in every block. Greedy:
every arm's answers must equal plain decoding's (the run stops if not). Per arm: tokens/s and its
ratio to plain decoding, acceptance, tokens per step, and the share of steps each proposer drafted.

With `--soak SECONDS`, the controller then serves every workload alone (new prompts each round) at
the highest concurrency that long, its suffix index checked against its budget after every step.

    osd bench proposers --soak 600 --json benchmarks/results/proposers_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import psutil
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.demo_pair import add_arguments, demo_pair
from benchmarks.results import print_rows, write_report
from deploy.demo.build import PRESETS, DemoModels
from deploy.demo.offline_distill import distill_demo_heads, heads_distill_spec, load_demo_heads
from deploy.demo.workloads import Conversation, agent_loops, code_edits, demo_requests
from distill.heads import HeadsSpec
from serving.engine.hf import Decoding, SpecEngine
from serving.engine.models import tree_support
from serving.engine.proposers import (
    DraftModelProposer,
    HeadsProposer,
    NgramProposer,
    NullProposer,
    SuffixProposer,
)
from serving.engine.suffix import SuffixIndex

ARMS = ("plain", "ngram", "suffix", "draft", "heads", "controller")
WORKLOADS = ("demo", "code-edits", "agent-loop")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osd bench proposers", description=__doc__.splitlines()[0])
    add_arguments(p)
    p.add_argument("--k", type=int, default=3, help="draft tokens per step (heads: the number of heads)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    p.add_argument(
        "--requests", type=int, default=24,
        help="requests a block, at least twice the most clients (agent loops: a quarter, conversations)",
    )  # fmt: skip
    p.add_argument("--rounds", type=int, default=2, help="blocks per arm, workload and level")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument(
        "--soak", type=int, default=0, metavar="SECONDS", help="then the controller alone this long"
    )
    p.add_argument("--json", type=Path, help="write the report here")
    return p


def run_block(
    engine: SpecEngine,
    conversations: list[Conversation],
    concurrency: int,
    max_tokens: int,
    after_step: Callable[[], None] = lambda: None,
) -> tuple[list[list[list[int]]], float, list[Decoding]]:
    """The conversations through `engine` as a closed loop of `concurrency` clients, each with one
    request in flight (its conversation's next turn), `after_step` called after every step;
    returns each conversation's answers, the wall time and every request's finished sequence."""
    answers: list[list[list[int]]] = [[] for _ in conversations]
    waiting, serving = list(range(len(conversations))), {}  # id(decoding) -> conversation
    done: list[Decoding] = []

    def send(i: int) -> None:
        chat = conversations[i]
        serving[
            id(engine.add(chat.prompt(answers[i]), max_tokens, stop_token_ids=[], domain=chat.domain))
        ] = i

    began = time.perf_counter()
    while waiting or serving:
        while waiting and len(serving) < concurrency:
            send(waiting.pop(0))
        for decoding, step in engine.step():
            if step.generation is not None:
                i = serving.pop(id(decoding))
                answers[i].append(step.generation.token_ids)
                done.append(decoding)
                if len(answers[i]) < len(conversations[i].inputs):
                    send(i)
        after_step()
    return answers, time.perf_counter() - began, done


def engines(
    args: argparse.Namespace, models: DemoModels, draft_dir: Path, console: Console
) -> dict[str, SpecEngine]:
    """One engine per arm (and plain decoding), over one target; the controller's costs measured."""
    target = AutoModelForCausalLM.from_pretrained(models.target).eval().requires_grad_(False)
    draft = AutoModelForCausalLM.from_pretrained(draft_dir).eval()
    trees = tree_support(target) is None

    def heads() -> HeadsProposer:
        spec = heads_distill_spec(args.domain)
        path = distill_demo_heads(models, PRESETS[args.demo], spec, HeadsSpec("hydra", args.k), console)
        return HeadsProposer(load_demo_heads(path, target))

    made = {
        "plain": lambda: SpecEngine(target, NullProposer(), 0),
        "ngram": lambda: SpecEngine(target, NgramProposer(), args.k),
        "suffix": lambda: SpecEngine(target, NullProposer(), args.k, suffix=SuffixProposer(trees=trees)),
        "draft": lambda: SpecEngine(target, DraftModelProposer(draft), args.k),
        "heads": lambda: SpecEngine(target, heads(), args.k),
        "controller": lambda: SpecEngine(
            target, DraftModelProposer(draft), args.k, suffix=SuffixProposer(trees=trees)
        ),
    }
    chosen = {name: made[name]() for name in dict.fromkeys(("plain", *args.arms))}
    if "controller" in chosen:
        with console.status("controller: timing its steps"):
            chosen["controller"].costs = chosen["controller"].calibrate(max(args.concurrency))
    return chosen


def workloads(
    args: argparse.Namespace, models: DemoModels, context: int, seed: int
) -> dict[str, list[Conversation]]:
    """The workloads asked for, their files sized to the target's context (512: code edits of 64 to
    128 tokens, agent loops reading files of 25 to 51 four times)."""
    corpus, tokenizer = models.held_out_corpus(), AutoTokenizer.from_pretrained(models.target)
    requests = max(args.requests, 2 * max(args.concurrency))
    chats, edit, read = max(1, requests // 4), (context // 8, context // 4), (context // 20, context // 10)
    made = {
        "demo": lambda: demo_requests(corpus, tokenizer, requests, seed),
        "code-edits": lambda: code_edits(corpus, tokenizer, requests, seed, edit),
        "agent-loop": lambda: agent_loops(corpus, tokenizer, chats, seed, read),
    }
    return {name: made[name]() for name in args.workloads}


def soak(args: argparse.Namespace, models: DemoModels, engine: SpecEngine, console: Console) -> dict:
    """The controller serving every workload, new prompts each round, at the highest concurrency
    for `args.soak` seconds: the suffix index's size is checked after every step (never over its
    budget) and sampled, with the process's memory, every 10 s."""
    index, budget = engine.suffix.shared, engine.suffix.config.budget_tokens
    process, samples, peak, steps, requests = psutil.Process(), [], 0, 0, 0
    began = time.perf_counter()

    def check() -> None:
        nonlocal peak, steps
        steps, peak = steps + 1, max(peak, index.tokens)
        if index.tokens > budget:
            raise RuntimeError(f"the suffix index holds {index.tokens} tokens, over its budget of {budget}")
        if time.perf_counter() - began >= 10 * len(samples):
            samples.append({
                "t": round(time.perf_counter() - began), "tokens": index.tokens, "documents": len(index),
                "keys": index.keys, "rss_mb": round(process.memory_info().rss / 2**20, 1),
            })  # fmt: skip

    with console.status(f"soak: the controller for {args.soak} s"):
        for seed in itertools.count(args.seed + 1):
            for conversations in workloads(args, models, engine.max_length, seed).values():
                *_, done = run_block(engine, conversations, max(args.concurrency), args.max_tokens, check)
                requests += len(done)
            if time.perf_counter() - began >= args.soak:
                break
    return {
        "seconds": round(time.perf_counter() - began, 1),
        "requests": requests,
        "steps_checked": steps,
        "budget_tokens": budget,
        "peak_tokens": peak,
        "documents_held": len(index),
        "documents_evicted": requests - len(index),
        "samples": samples,
    }


def summarize(tokens: int, seconds: float, done: list[Decoding]) -> dict:
    """One arm's row: tokens/s, acceptance, tokens per step, each proposer's share of the steps."""
    steps: Counter[str] = Counter()
    for decoding in done:
        steps.update({name: count["steps"] for name, count in decoding.stats.by_proposer.items()})
    drafted, accepted = sum(d.stats.drafted for d in done), sum(d.stats.accepted for d in done)
    total_steps = sum(steps.values())
    return {
        "tokens_per_s": round(tokens / seconds, 1),
        "acceptance": round(accepted / drafted, 3) if drafted else None,
        "tokens_per_step": round(tokens / total_steps, 2),
        "steps_by_proposer": {name: round(n / total_steps, 3) for name, n in sorted(steps.items())},
    }


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    console, began = Console(), time.perf_counter()
    torch.set_num_threads(1)  # as a replica decodes
    models, draft_dir, _ = demo_pair(args, console)
    arms = engines(args, models, draft_dir, console)
    loads = workloads(args, models, arms["plain"].max_length, args.seed)
    results = []
    for workload, conversations in loads.items():
        for concurrency in args.concurrency:
            seconds, done, tokens = Counter(), {name: [] for name in arms}, 0
            with console.status(
                f"{workload}, {concurrency} clients: a warm-up, then {args.rounds} rounds of {len(arms)} arms"
            ):
                for timed in (False, *[True] * args.rounds):
                    reference = None
                    for name, engine in arms.items():
                        if engine.suffix is not None:  # every block learns from itself only
                            engine.suffix.shared = SuffixIndex(engine.suffix.config)
                        answers, wall, finished = run_block(
                            engine, conversations, concurrency, args.max_tokens
                        )
                        if reference is None:
                            reference = answers
                            tokens += timed * sum(len(a) for c in answers for a in c)
                        elif answers != reference:
                            raise RuntimeError(f"{name} answered {workload} differently from plain decoding")
                        if timed:
                            seconds[name] += wall
                            done[name] += finished
            plain_rate = tokens / seconds["plain"]
            for name in arms:
                row = summarize(tokens, seconds[name], done[name])
                row["vs_plain"] = round(row["tokens_per_s"] / plain_rate, 3)
                results.append({"workload": workload, "clients": concurrency, "arm": name} | row)
            console.print(
                f"{workload}, {concurrency} clients: "
                + ", ".join(f"{r['arm']} {r['vs_plain']}x" for r in results[-len(arms) :])
            )
    report = {
        "benchmark": "proposers",
        "demo": args.demo,
        "draft": args.draft,
        "domain": args.domain,
        "k": args.k,
        "max_tokens": args.max_tokens,
        "requests": args.requests,
        "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(),
        "outputs_identical": True,
        "controller_costs": dataclasses.asdict(arms["controller"].costs) if "controller" in arms else None,
        "results": results,
    }
    if args.soak:
        report["soak"] = soak(args, models, arms["controller"], console)
        console.print(f"soak: {report['soak']}")
    report["seconds"] = round(time.perf_counter() - began, 1)
    columns = ("workload", "clients", "arm", "tokens_per_s", "vs_plain", "acceptance", "tokens_per_step")
    print_rows(
        console,
        f"proposers, demo {args.demo}, k={args.k}, greedy (outputs identical)",
        columns,
        [{c: r[c] for c in columns} for r in results],
    )
    if args.json:
        write_report(args.json, report)
    return report


if __name__ == "__main__":
    main()
