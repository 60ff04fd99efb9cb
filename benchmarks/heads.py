"""Draft heads against the draft model and n-gram lookup on the demo pair, offline-trained.

Medusa and Hydra heads (K = --k) are trained on the target's greedy continuations of --prompts
prompts cut from the *training* files of --domain: the target's hidden state at each output
position, the tokens that followed, and the target's top-16 at the positions each head guesses
(`distill.heads.heads_loss`, forward KL on the top-16, as the online trainer does). Then, on
held-out prompts of the domain, greedy, in one process: plain decoding, the demo draft, n-gram
lookup, Medusa and Hydra heads in chain mode, and Hydra heads verified as a static tree
(--tree). Every method's output must equal plain decoding's. Per method: acceptance α (accepted
/ drafted; a tree counts its depth as drafted), τ (tokens per target forward), and tokens/s
(engines in rotation, `benchmarks.speed`), with the ratio to plain decoding.

    osd bench heads --json benchmarks/results/heads_cpu.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.results import print_rows, write_report
from benchmarks.speed import rotate
from deploy.demo.build import DEFAULT_CACHE_DIR, PRESETS, build_demo_models
from deploy.demo.corpus import build_corpus
from deploy.demo.pretrain import sample_batch, target_continuations, token_streams
from deploy.demo.workloads import fixed_prompts
from distill.heads import DraftHeads, HeadsBatch, HeadsSpec, heads_acceptance, heads_loss
from serving.engine import SpecEngine
from serving.proposers import DraftModelProposer, HeadsProposer, NgramProposer, NullProposer
from serving.tree import static_tree

TOP_K = 16


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


@torch.no_grad()
def training_rows(target, sequences: torch.Tensor, prompt_tokens: int, k: int) -> HeadsBatch:
    """HeadsBatch rows from full greedy sequences [n, L]: every output position with k more after it."""
    hidden = target.base_model(input_ids=sequences[:, :-1]).last_hidden_state  # [n, L-1, H]
    top = torch.log_softmax(target.get_output_embeddings()(hidden).float(), -1).topk(TOP_K)  # [n, L-1, 16]
    starts = range(prompt_tokens - 1, sequences.shape[1] - 1 - k)  # the hidden state giving token t+1
    rows = [
        (hidden[:, t], sequences[:, t + 1 : t + 1 + k], sequences[:, t + 2 : t + 2 + k],
         top.indices[:, t + 1 : t + 1 + k], top.values[:, t + 1 : t + 1 + k])
        for t in starts
    ]  # fmt: skip
    return HeadsBatch(*(torch.cat(parts) for parts in zip(*rows, strict=True)))


def train_heads(heads: DraftHeads, rows: HeadsBatch, epochs: int, batch: int = 256) -> float:
    optimizer = torch.optim.AdamW(heads.parameters(), lr=3e-3)
    generator, loss = torch.Generator().manual_seed(0), torch.tensor(float("nan"))
    for _ in range(epochs):
        for index in torch.randperm(rows.hidden.shape[0], generator=generator).split(batch):
            part = HeadsBatch(*(getattr(rows, f)[index] for f in HeadsBatch.__dataclass_fields__))
            loss = heads_loss(heads, part)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return float(loss.detach())


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    console, began = Console(), time.perf_counter()
    preset = PRESETS[args.demo]
    models = build_demo_models(preset, args.cache_dir, console=console)
    tokenizer = AutoTokenizer.from_pretrained(models.target)
    target = AutoModelForCausalLM.from_pretrained(models.target).eval().requires_grad_(False)
    torch.set_num_threads(1)  # as a replica decodes
    with console.status(f"target continuations of {args.prompts} {args.domain} training prompts"):
        corpus = build_corpus(preset.corpus)
        stream = token_streams({args.domain: corpus.train[args.domain]}, tokenizer)[args.domain]
        prompts = sample_batch([stream], args.prompts, 47, torch.Generator().manual_seed(0))
        sequences = target_continuations(target, prompts, args.max_new_tokens)
        rows = training_rows(target, sequences, prompts.shape[1], args.k)
    held_out = [p.token_ids for p in fixed_prompts(models.held_out_corpus(), tokenizer, args.domain,
                                                    args.eval_prompts, seed=1)]  # fmt: skip
    heads, training = {}, {}
    for kind in ("medusa", "hydra"):
        with console.status(f"training {kind} heads on {rows.hidden.shape[0]} positions"):
            heads[kind] = DraftHeads.for_target(HeadsSpec(kind, args.k), target)
            before = heads_acceptance(heads[kind], rows).tolist()
            loss = train_heads(heads[kind], rows, args.epochs)
            after = heads_acceptance(heads[kind], rows).tolist()
            training[kind] = {
                "final_loss": round(loss, 4),
                "acceptance_per_head": {"before": before, "after": after},
            }
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
        "training_positions": rows.hidden.shape[0],
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
