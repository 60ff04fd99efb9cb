"""Engine benchmark: our engine against Hugging Face generate, side by side, on one target/draft pair.

One process, one set of prompts, the same number of new tokens (no early stop) for every method:
- ours: AR (the null proposer), speculative decoding with the draft, with n-gram lookup and with
  Hydra draft heads (demo pair only), at each k;
- HF: `generate` (AR), and assisted generation with the same draft at the same k. Its candidate
  generator is held at exactly k (constant schedule, no confidence early exit), checked every step.

Methods are timed --repeats times, interleaved so that drifting load hits them alike; tokens/s is
the median. The run is greedy first, where every method's output must be token-identical, then
sampled at --temperature (seeded; outputs are not compared). Each row has the tokens drafted per
step, α, τ, the cost ratio c (a draft decoding step over a target decoding step, both timed with
our engine; 0 for n-gram lookup) and DESIGN.md's bound S(α, k, c), which assumes k drafts every
step (n-gram lookup often finds fewer). HF assisted generation's counts are observed from outside:
a forward pre-hook on the target sees the tokens each step verifies, a streamer those it emits.

Without --target it runs on the demo pair (built or reused, see deploy/demo) and held-out
prompts of --domain, once with the initial draft and untrained heads (poor on code: low α) and
once with the draft and heads trained offline on that domain (high α; `deploy.demo.offline_distill`,
made on first use). The heads' c is one drafted token's time over a target decoding step.

    osd bench engine --json benchmarks/results/engine_cpu.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel
from transformers.generation.streamers import BaseStreamer
from transformers.utils import logging as hf_logging

from benchmarks.results import write_report
from deploy.demo.build import DEFAULT_CACHE_DIR, PRESETS, build_demo_models
from deploy.demo.offline_distill import (
    DistillSpec,
    distill_demo_draft,
    distill_demo_heads,
    heads_distill_spec,
    load_demo_heads,
)
from deploy.demo.workloads import fixed_prompts
from distill.heads import DraftHeads, HeadsSpec
from serving.engine.hf import SpecEngine, heads_cost_ratio
from serving.engine.kv import SlotCache
from serving.engine.models import forward_slots, prefill, resolve_device, resolve_dtype
from serving.engine.proposers import DraftModelProposer, HeadsProposer, NgramProposer, NullProposer, Proposer
from serving.engine.speculation import speedup_bound

Sample = tuple[list[int], int, int, int]  # new token ids, drafted, accepted, steps
Generate = Callable[[list[int], int, int], Sample]  # (prompt, max_new_tokens, seed) -> Sample


@dataclass(frozen=True)
class Method:
    engine: str  # "ours" or "hf"
    proposer: str  # "none" (AR), "ngram", "draft" or "heads"
    k: int
    generate: Generate
    model: str = "target"  # "draft" only for timing the draft alone, for c

    @property
    def label(self) -> str:
        return f"{self.engine} {self.proposer} k={self.k} on the {self.model}"


@dataclass(frozen=True)
class Row:
    decoding: str  # "greedy" or "sampled"
    engine: str
    proposer: str
    k: int
    tokens: int  # new tokens per repeat, over all prompts
    tokens_per_s: float  # median over repeats
    tokens_per_s_repeats: list[float]
    speedup_vs_ar: float  # over the same engine's AR row
    drafted_per_step: float  # k when the proposer always fills its proposal; n-gram lookup often does not
    acceptance_rate: float | None  # alpha; None where nothing is drafted (AR)
    mean_accepted_length: float  # tau
    cost_ratio_c: float | None  # c; None for AR, 0 for n-gram lookup
    modelled_speedup: float  # DESIGN.md's S(alpha, k, c); 1 for AR
    fraction_of_model: float  # speedup_vs_ar / modelled_speedup
    costed_speedup: float  # tau / (k_bar c + v(k_bar)): measured acceptance and measured step costs
    fraction_of_costed: float  # speedup_vs_ar / costed_speedup: what per-step overhead leaves


def costed_speedup(tau: float, drafted_per_step: float, c: float, verify_cost: dict[int, float]) -> float:
    """The speedup the measured costs allow: tau tokens per step over a step's cost in target steps,
    k̄ draft steps at c each plus one verify of k̄ + 1 tokens at v(k̄) (linear between measured k).

    DESIGN.md's S assumes v = 1 for every k, which holds on a GPU but not on a CPU, where a
    (k+1)-token forward runs matrix-matrix kernels instead of a matrix-vector one.
    """
    low = max(k for k in verify_cost if k <= drafted_per_step)
    high = min((k for k in verify_cost if k >= drafted_per_step), default=low)
    share = 0.0 if high == low else (drafted_per_step - low) / (high - low)
    verify = verify_cost[low] + share * (verify_cost[high] - verify_cost[low])
    return tau / (drafted_per_step * c + verify)


@torch.inference_mode()
def measure_verify_cost(target: PreTrainedModel, prompt: list[int], ks: list[int], repeats: int = 30) -> dict:
    """v(k): the median time of one target forward of k + 1 tokens after `prompt`, over that of a
    one-token forward (v(0) = 1); the slot's length is not advanced, so each rewrites the same place."""
    most = max(ks, default=0) + 1
    news = torch.tensor((prompt * most)[:most], device=target.device)  # any ids will do
    cache = SlotCache(target.config)
    slot = cache.acquire()
    prefill(target, cache, slot, torch.tensor(prompt, device=target.device))

    def seconds(n: int) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            forward_slots(target, cache, [slot], [news[:n]])
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    one = seconds(1)
    return {k: round(seconds(k + 1) / one, 4) for k in [0, *ks]} | {0: 1.0}


def ours(model: PreTrainedModel, proposer: Proposer, k: int, temperature: float) -> Generate:
    """Our engine with one proposer and k."""
    engine = SpecEngine(model, proposer, k)

    def generate(prompt: list[int], max_new_tokens: int, seed: int) -> Sample:
        out = engine.generate(prompt, max_new_tokens, temperature=temperature, seed=seed, stop_token_ids=[])
        return out.token_ids, out.stats.drafted, out.stats.accepted, out.stats.steps

    return generate


class AssistedSteps(BaseStreamer):
    """What one HF assisted `generate` call did, per step: the tokens each target forward took in
    (a forward pre-hook) and the tokens each step emitted (a streamer; the prompt comes first)."""

    def __init__(self) -> None:
        self.verified: list[int] = []
        self.emitted: list[int] = []

    def before_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.verified.append(kwargs["input_ids"].shape[1])

    def put(self, value: torch.Tensor) -> None:
        self.emitted.append(value.numel())

    def end(self) -> None:
        pass


def hf(target: PreTrainedModel, draft: PreTrainedModel | None, k: int, temperature: float) -> Generate:
    """HF generate (draft None) or assisted generation drafting exactly k tokens per step."""
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        if temperature
        else {"do_sample": False}
    )

    def generate(prompt: list[int], max_new_tokens: int, seed: int) -> Sample:
        torch.manual_seed(seed)
        ids = torch.tensor([prompt], device=target.device)
        kwargs = {
            "attention_mask": torch.ones_like(ids),
            "max_new_tokens": max_new_tokens,
            "eos_token_id": [],  # never stop early, as stop_token_ids=[] for our engine
            "pad_token_id": 0,
            **sampling,
        }
        if draft is None:
            out = target.generate(ids, **kwargs)[0, len(prompt) :].tolist()
            return out, 0, 0, len(out)
        draft.generation_config.update(
            num_assistant_tokens=k,
            num_assistant_tokens_schedule="constant",
            assistant_confidence_threshold=0.0,
        )
        steps = AssistedSteps()
        hook = target.register_forward_pre_hook(steps.before_forward, with_kwargs=True)
        try:
            out = target.generate(ids, assistant_model=draft, streamer=steps, **kwargs)[0, len(prompt) :]
        finally:
            hook.remove()
        # The first forward also prefills the prompt; later ones take the last token plus the drafts.
        drafted = [steps.verified[0] - len(prompt)] + [n - 1 for n in steps.verified[1:]]
        emitted = steps.emitted[1:]
        done = 0
        for step_drafted, step_emitted in zip(drafted, emitted, strict=True):
            if step_drafted != min(k, max_new_tokens - done - 1):  # what our engine drafts
                raise RuntimeError(f"HF assisted generation drafted {step_drafted} tokens, not k={k}")
            done += step_emitted
        return out.tolist(), sum(drafted), done - len(emitted), len(emitted)

    return generate


def methods(
    target: PreTrainedModel,
    draft: PreTrainedModel | None,
    heads: DraftHeads | None,
    ks: list[int],
    temperature: float,
) -> list[Method]:
    """Every method compared, for one decoding mode."""
    found = [Method("ours", "none", 0, ours(target, NullProposer(), 0, temperature))]
    found += [Method("ours", "ngram", k, ours(target, NgramProposer(), k, temperature)) for k in ks]
    if heads is not None:
        found += [Method("ours", "heads", k, ours(target, HeadsProposer(heads), k, temperature)) for k in ks]
    found.append(Method("hf", "none", 0, hf(target, None, 0, temperature)))
    if draft is not None:
        found += [
            Method("ours", "draft", k, ours(target, DraftModelProposer(draft), k, temperature)) for k in ks
        ]
        found += [Method("hf", "draft", k, hf(target, draft, k, temperature)) for k in ks]
    return found


def measure(
    chosen: list[Method],
    prompts: list[list[int]],
    seeds: list[int],
    max_new_tokens: int,
    repeats: int,
    advance: Callable[[str], None],
) -> dict[str, tuple[list[float], list[Sample]]]:
    """Seconds of each repeat and the samples of the last one, per method label."""
    for method in chosen:  # warm-up
        method.generate(prompts[0], min(4, max_new_tokens), seeds[0])
    seconds: dict[str, list[float]] = {m.label: [] for m in chosen}
    samples: dict[str, list[Sample]] = {}
    for _ in range(repeats):
        for method in chosen:
            advance(method.label)
            start = time.perf_counter()
            samples[method.label] = [
                method.generate(p, max_new_tokens, s) for p, s in zip(prompts, seeds, strict=True)
            ]
            seconds[method.label].append(time.perf_counter() - start)
    return {label: (seconds[label], samples[label]) for label in seconds}


def make_rows(
    decoding: str, chosen: list[Method], results: dict, tokens: int, costs: dict, verify_cost: dict
) -> list[Row]:
    """One row per method; `costs`: c per proposer."""
    tokens_per_s = {m.label: [tokens / s for s in results[m.label][0]] for m in chosen}
    ar = {m.engine: statistics.median(tokens_per_s[m.label]) for m in chosen if m.k == 0}
    rows = []
    for m in chosen:
        drafted, accepted, steps = (sum(sample[i] for sample in results[m.label][1]) for i in (1, 2, 3))
        alpha = None if m.k == 0 else accepted / drafted if drafted else 0.0
        cost = None if m.k == 0 else costs[m.proposer]
        bound = 1.0 if m.k == 0 else speedup_bound(alpha, m.k, cost)
        median = statistics.median(tokens_per_s[m.label])
        tau, k_bar = (accepted + steps) / steps, drafted / steps
        costed = 1.0 if m.k == 0 else costed_speedup(tau, k_bar, cost, verify_cost)
        rows.append(
            Row(
                decoding=decoding,
                engine=m.engine,
                proposer=m.proposer,
                k=m.k,
                tokens=tokens,
                tokens_per_s=round(median, 1),
                tokens_per_s_repeats=[round(t, 1) for t in tokens_per_s[m.label]],
                speedup_vs_ar=round(median / ar[m.engine], 3),
                drafted_per_step=round(k_bar, 3),
                acceptance_rate=None if alpha is None else round(alpha, 4),
                mean_accepted_length=round(tau, 3),
                cost_ratio_c=None if cost is None else round(cost, 4),
                modelled_speedup=round(bound, 3),
                fraction_of_model=round(median / ar[m.engine] / bound, 3),
                costed_speedup=round(costed, 3),
                fraction_of_costed=round(median / ar[m.engine] / costed, 3),
            )
        )
    return rows


def comparisons(rows: list[Row], ks: list[int]) -> tuple[dict, dict]:
    """Ours over HF: draft vs assisted at each k; AR, and our best speculative row, vs generate."""
    tps = {(r.engine, r.proposer, r.k): r.tokens_per_s for r in rows}
    vs_assisted = {
        str(k): round(tps["ours", "draft", k] / tps["hf", "draft", k], 3)
        for k in ks
        if ("hf", "draft", k) in tps
    }
    spec = [r for r in rows if r.engine == "ours" and r.k > 0]
    best = max(spec, key=lambda r: r.tokens_per_s)
    vs_generate = {
        "ar": round(tps["ours", "none", 0] / tps["hf", "none", 0], 3),
        "best_spec": round(best.tokens_per_s / tps["hf", "none", 0], 3),
        "best_spec_method": f"{best.proposer} k={best.k}",
    }
    return vs_assisted, vs_generate


def run(
    args: argparse.Namespace,
    target_dir: str,
    draft_dir: str | None,
    prompts: list[list[int]],
    heads_from: Path | HeadsSpec | None = None,
) -> dict:
    """Benchmark one pair on `prompts` (token ids); with heads saved at a path, or untrained ones of
    a spec."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    base = SpecEngine.from_pretrained(target_dir, draft=draft_dir, device=device, dtype=dtype)
    target, draft = base.target, base.proposer.model if draft_dir else None
    heads = None
    if isinstance(heads_from, Path):
        heads = load_demo_heads(heads_from, target).to(device, dtype)
    elif heads_from is not None:
        heads = DraftHeads.for_target(heads_from, target).to(device, dtype).eval()
    seeds = [args.seed + i for i in range(len(prompts))]
    tokens = len(prompts) * args.max_new_tokens
    decodings = {"greedy": 0.0} | ({"sampled": args.temperature} if args.temperature > 0 else {})
    chosen = {name: methods(target, draft, heads, args.k, t) for name, t in decodings.items()}
    # c: a draft decoding step over a target decoding step, both with our engine, timed in the greedy run.
    draft_ar = [Method("ours", "none", 0, ours(draft, NullProposer(), 0, 0.0), "draft")] if draft else []
    timed = {name: group + (draft_ar if name == "greedy" else []) for name, group in chosen.items()}

    results = {}
    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("benchmark", total=args.repeats * sum(map(len, timed.values())))
        for name, group in timed.items():

            def advance(label: str, name: str = name) -> None:
                progress.update(task, advance=1, description=f"{name}: {label}")

            results[name] = measure(group, prompts, seeds, args.max_new_tokens, args.repeats, advance)

    def seconds(method: Method) -> float:
        return statistics.median(results["greedy"][method.label][0])

    c = seconds(draft_ar[0]) / seconds(chosen["greedy"][0]) if draft_ar else None
    c_heads = heads_cost_ratio(target, heads, prompts[0]) if heads is not None else None
    costs = {"ngram": 0.0, "draft": c, "heads": c_heads}
    verify_cost = measure_verify_cost(target, prompts[0], args.k)
    rows = [
        row
        for name in decodings
        for row in make_rows(name, chosen[name], results[name], tokens, costs, verify_cost)
    ]
    outputs = [[sample[0] for sample in results["greedy"][m.label][1]] for m in chosen["greedy"]]
    vs = {name: comparisons([r for r in rows if r.decoding == name], args.k) for name in decodings}
    return {
        "benchmark": "engine",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
        },
        "target": str(target_dir),
        "draft": None if draft_dir is None else str(draft_dir),
        "heads": None if heads is None else str(heads_from) if isinstance(heads_from, Path) else "untrained",
        "dtype": str(dtype).removeprefix("torch."),
        "prompts": len(prompts),
        "prompt_len": round(statistics.mean(map(len, prompts)), 1),
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "temperature": args.temperature,
        "seed": args.seed,
        "draft_cost_ratio_c": None if c is None else round(c, 4),
        "heads_cost_ratio_c": None if c_heads is None else round(c_heads, 4),
        "verify_cost_v": {str(k): v for k, v in verify_cost.items()},
        "outputs_identical": all(out == outputs[0] for out in outputs),
        "speedup_vs_hf_assisted": {name: vs[name][0] for name in decodings},
        "speedup_vs_hf_generate": {name: vs[name][1] for name in decodings},
        "rows": [asdict(r) for r in rows],
    }


def _number(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def print_table(report: dict, console: Console) -> None:
    names = {("ours", "none"): "ours AR", ("ours", "ngram"): "ours n-gram", ("ours", "draft"): "ours draft"}
    names[("ours", "heads")] = "ours heads"
    names |= {("hf", "none"): "HF generate", ("hf", "draft"): "HF assisted"}
    for decoding in report["speedup_vs_hf_generate"]:
        table = Table(
            title=(
                f"{decoding}: {report['target']} / {report['draft']}, c={report['draft_cost_ratio_c']}; "
                f"heads {report['heads']}, c={report['heads_cost_ratio_c']}"
            ),
            caption=(
                "k̄: tokens drafted per step; S(α,k,c) takes c = 0 for n-gram lookup; "
                f"S_v = τ / (k̄c + v(k̄)), verify cost v = {report['verify_cost_v']}"
            ),
        )
        columns = ("method", "k", "k̄", "tokens/s", "vs AR", "α", "τ", "S(α,k,c)", "vs S", "S_v", "vs S_v")
        for column in columns:
            table.add_column(column, justify="right")
        for row in report["rows"]:
            if row["decoding"] == decoding:
                table.add_row(
                    names[row["engine"], row["proposer"]],
                    str(row["k"]),
                    _number(row["drafted_per_step"]),
                    f"{row['tokens_per_s']:.0f}",
                    _number(row["speedup_vs_ar"]),
                    _number(row["acceptance_rate"]),
                    _number(row["mean_accepted_length"]),
                    _number(row["modelled_speedup"]),
                    _number(row["fraction_of_model"]),
                    _number(row["costed_speedup"]),
                    _number(row["fraction_of_costed"]),
                )
        console.print(table)
        assisted = ", ".join(
            f"k={k}: {v:.2f}×" for k, v in report["speedup_vs_hf_assisted"][decoding].items()
        )
        generate = report["speedup_vs_hf_generate"][decoding]
        console.print(
            f"ours / HF: draft vs assisted {assisted or '–'}; AR vs generate {generate['ar']:.2f}×; "
            f"best spec ({generate['best_spec_method']}) vs generate {generate['best_spec']:.2f}×"
        )
    identical = report["outputs_identical"]
    console.print(f"greedy outputs identical across all methods: {'yes' if identical else '[red]NO[/red]'}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osd bench engine", description=__doc__.splitlines()[0])
    p.add_argument("--target", help="target model directory or hub id (default: the demo pair)")
    p.add_argument("--draft", help="draft model directory or hub id (same vocabulary as the target)")
    p.add_argument("--demo", choices=sorted(PRESETS), default="full", help="demo pair preset (default full)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="demo model cache")
    p.add_argument("--domain", default="python", help="demo: held-out prompts and distillation domain")
    p.add_argument("--k", type=int, nargs="+", default=[1, 3, 5], help="speculative tokens per step")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (random prompts with --target)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per method; tokens/s is the median")
    p.add_argument("--temperature", type=float, default=0.7, help="temperature of the sampled run")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, ... (default: by device)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the report here")
    return p


Pairing = tuple[str | None, Path | HeadsSpec | None]  # a draft, and heads saved at a path or untrained


def demo_inputs(args: argparse.Namespace) -> tuple[str, list[Pairing], list[list[int]]]:
    """The demo target; its initial draft with untrained Hydra heads, then the draft and the heads
    trained offline on args.domain; and held-out prompts of args.domain."""
    preset = PRESETS[args.demo]
    models = build_demo_models(preset, args.cache_dir)
    distilled = distill_demo_draft(models, preset, DistillSpec(domain=args.domain))
    heads = HeadsSpec("hydra", max(args.k))
    trained = distill_demo_heads(models, preset, heads_distill_spec(args.domain), heads)
    tokenizer = AutoTokenizer.from_pretrained(models.target)
    span = (max(1, args.prompt_len - 16), args.prompt_len)
    held_out = fixed_prompts(models.held_out_corpus(), tokenizer, args.domain, args.prompts, args.seed, span)
    pairings = [(str(models.draft), heads), (str(distilled), trained)]
    return str(models.target), pairings, [list(p.token_ids) for p in held_out]


def random_prompts(args: argparse.Namespace, vocab_size: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(args.seed)
    return [
        torch.randint(0, vocab_size, (args.prompt_len,), generator=gen).tolist() for _ in range(args.prompts)
    ]


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    hf_logging.disable_progress_bar()  # this benchmark shows its own progress
    if args.draft and not args.target:
        parser().error("--draft needs --target")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.target:
        vocab_size = AutoConfig.from_pretrained(args.target).vocab_size
        target, pairings, prompts = args.target, [(args.draft, None)], random_prompts(args, vocab_size)
    else:
        target, pairings, prompts = demo_inputs(args)
    console = Console()
    report = {"benchmark": "engine", "runs": []}
    for draft, heads in pairings:
        report["runs"].append(run(args, target, draft, prompts, heads))
        print_table(report["runs"][-1], console)
    if args.json:
        write_report(args.json, report)
    return report


if __name__ == "__main__":
    main()
