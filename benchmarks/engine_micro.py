"""Engine micro-benchmark: tokens/s of plain decoding vs speculative decoding for one target/draft pair.

Every configuration runs the same prompts in one process, so the ratios are side by side.
Without --target, a random-weight pair is built (target 4L-256d, draft 1L-128d, DESIGN.md's CPU
anchors): its draft agrees with the target only by chance, so it measures the engine's overhead,
not a useful speedup. Trained pairs come with the demo world.

    python -m benchmarks.engine_micro --json benchmarks/results/engine_micro_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.utils import logging as hf_logging

from serving.engine import SpecEngine
from serving.models import resolve_device, resolve_dtype
from serving.proposers import DraftModelProposer, NgramProposer, NullProposer, Proposer


@dataclass(frozen=True)
class Row:
    proposer: str
    k: int
    tokens: int
    seconds: float
    tokens_per_s: float
    speedup_vs_ar: float
    acceptance_rate: float
    mean_accepted_length: float
    modelled_speedup: float | None  # DESIGN.md's S(alpha, k, c); None where c does not apply


def modelled_speedup(alpha: float, k: int, c: float) -> float:
    """S = (1 - alpha^(k+1)) / ((1 - alpha)(k c + 1)), Leviathan et al.; alpha -> 1 gives (k+1)/(kc+1)."""
    gain = k + 1 if alpha >= 1.0 else (1 - alpha ** (k + 1)) / (1 - alpha)
    return gain / (k * c + 1)


def build_random_pair(directory: Path, vocab: int = 4096) -> tuple[Path, Path]:
    """Save a random 4L-256d target and 1L-128d draft sharing one vocabulary; return their dirs."""

    def save(name: str, layers: int, hidden: int, seed: int) -> Path:
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=max(hidden // 64, 2),
            max_position_embeddings=2048,
            eos_token_id=None,
        )
        path = directory / name
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
        return path

    return save("target", 4, 256, 0), save("draft", 1, 128, 1)


def time_engine(
    engine: SpecEngine, prompts: list[list[int]], max_new_tokens: int
) -> tuple[int, float, float, float]:
    """Greedy-generate every prompt; return tokens, seconds, acceptance rate, mean accepted length."""
    engine.generate(prompts[0], 4, stop_token_ids=[])  # warm-up
    tokens, drafted, accepted, steps = 0, 0, 0, 0
    start = time.perf_counter()
    for prompt in prompts:
        out = engine.generate(prompt, max_new_tokens, stop_token_ids=[])
        tokens += len(out.token_ids)
        drafted, accepted, steps = (
            drafted + out.stats.drafted,
            accepted + out.stats.accepted,
            steps + out.stats.steps,
        )
    seconds = time.perf_counter() - start
    return tokens, seconds, accepted / drafted if drafted else 0.0, (accepted + steps) / steps


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    with tempfile.TemporaryDirectory() as tmp:
        target_dir, draft_dir = (args.target, args.draft) if args.target else build_random_pair(Path(tmp))
        base = SpecEngine.from_pretrained(target_dir, draft=draft_dir, device=device, dtype=dtype)
    target, draft = base.target, base.proposer.model if draft_dir else None
    gen = torch.Generator().manual_seed(args.seed)
    prompts = [
        torch.randint(0, base.vocab_size, (args.prompt_len,), generator=gen).tolist()
        for _ in range(args.prompts)
    ]

    configs: list[tuple[str, int, Proposer]] = [("none", 0, NullProposer())]
    configs += [("ngram", k, NgramProposer()) for k in args.k]
    if draft is not None:
        configs += [("draft", k, DraftModelProposer(draft)) for k in args.k]

    results, c = [], None
    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("benchmark", total=len(configs) + (draft is not None))
        if draft is not None:  # c: a draft decoding step over a target decoding step
            _, draft_s, _, _ = time_engine(SpecEngine(draft, NullProposer(), 0), prompts, args.max_new_tokens)
            progress.advance(task)
        ar_seconds = None
        for name, k, proposer in configs:
            progress.update(task, description=f"{name} k={k}")
            tokens, seconds, alpha, tau = time_engine(
                SpecEngine(target, proposer, k), prompts, args.max_new_tokens
            )
            if name == "none":
                ar_seconds = seconds
                c = draft_s / seconds if draft is not None else None
            results.append(
                Row(
                    proposer=name,
                    k=k,
                    tokens=tokens,
                    seconds=round(seconds, 4),
                    tokens_per_s=round(tokens / seconds, 1),
                    speedup_vs_ar=round(ar_seconds / seconds, 3),
                    acceptance_rate=round(alpha, 4),
                    mean_accepted_length=round(tau, 3),
                    modelled_speedup=round(modelled_speedup(alpha, k, c), 3) if name == "draft" else None,
                )
            )
            progress.advance(task)
    return {
        "benchmark": "engine_micro",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
        },
        "target": str(args.target or "random 4L-256d Llama"),
        "draft": str(args.draft or "random 1L-128d Llama") if draft is not None else None,
        "dtype": str(dtype).removeprefix("torch."),
        "prompts": args.prompts,
        "prompt_len": args.prompt_len,
        "max_new_tokens": args.max_new_tokens,
        "decoding": "greedy",
        "draft_cost_ratio_c": None if c is None else round(c, 4),
        "rows": [asdict(r) for r in results],
    }


def print_table(report: dict, console: Console) -> None:
    title = (
        f"engine micro-benchmark: {report['target']} / {report['draft']}, c={report['draft_cost_ratio_c']}"
    )
    table = Table(title=title)
    for column in (
        "proposer",
        "k",
        "tokens/s",
        "speedup vs AR",
        "acceptance α",
        "mean accepted τ",
        "model S(α,k,c)",
    ):
        table.add_column(column, justify="right")
    for row in report["rows"]:
        modelled = "" if row["modelled_speedup"] is None else f"{row['modelled_speedup']:.2f}"
        table.add_row(
            row["proposer"],
            str(row["k"]),
            f"{row['tokens_per_s']:.0f}",
            f"{row['speedup_vs_ar']:.2f}",
            f"{row['acceptance_rate']:.2f}",
            f"{row['mean_accepted_length']:.2f}",
            modelled,
        )
    console.print(table)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osd bench engine", description=__doc__.splitlines()[0])
    p.add_argument("--target", help="target model directory or hub id (default: build a random pair)")
    p.add_argument("--draft", help="draft model directory or hub id (same vocabulary as the target)")
    p.add_argument("--k", type=int, nargs="+", default=[1, 3, 5], help="speculative tokens per step")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, ... (default: by device)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the report here")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    hf_logging.disable_progress_bar()  # this benchmark shows its own progress
    if args.draft and not args.target:
        parser().error("--draft needs --target")
    report = run(args)
    print_table(report, Console())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
