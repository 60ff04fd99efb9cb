"""GPU measurements on Llama-7B shapes (random init, bf16), prepared to run in one go on a lent GPU
machine (H100/H200); never part of the tests or CI.

Everything runs on the project's own model path: Hugging Face LlamaForCausalLM, serving.engine.kv's
static slot cache, serving.engine.device's compiled step forwards (torch.compile "reduce-overhead", i.e.
CUDA graphs) and serving.engine.hf's decode loop. Side by side in one run:
1. per-step latency, eager vs compiled: the 7B verify step of 1..9 tokens (k = 0..8; compiled at
   k = 0, 1, 5 and 8, one graph each), and the one-token steps of a 68M draft (2 layers) and a
   160M draft (12 layers);
2. c of each draft (its step over the target's one-token step), eager and compiled;
3. verification cost against k (v(k) = step of k + 1 tokens over the one-token step);
4. tokens/s of plain (AR) vs speculative decoding, k = 5, at a synthetic acceptance alpha = 0.75:
   the 68M draft runs for its cost, but each drafted token is then replaced by the target's own
   next greedy token with probability alpha (else by another token). The target's greedy text is
   known from the AR run, and the speculative run must reproduce it exactly (checked). The bound
   S = E(alpha, k) / (k c + v(k)) from the measured costs is reported next to it;
5. decode latency while a trainer process trains the 160M draft on the same GPU (its memory capped
   at TrainerConfig.gpu_memory_fraction, this process at SERVING_MEMORY_FRACTION), against without.

The card's name is recorded; the JSON is rewritten after each section, so a run cut short keeps
what it measured.

    python -m benchmarks.gpu_bench --json benchmarks/results/gpu_h200.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from serving.engine.device import (
    SERVING_MEMORY_FRACTION,
    DeviceProfile,
    apply_memory_budget,
    compiled,
    new_cache,
)
from serving.engine.hf import SpecEngine
from serving.engine.models import forward_slots, prefill
from serving.engine.proposers import DraftModelProposer, DraftRow, NullProposer, Proposal
from serving.engine.speculation import expected_tokens
from store.registry import ALL_DOMAINS
from trainer.config import TrainerConfig

VOCAB = 32_000
SHAPES = {  # Llama-2-7B, and the two draft sizes of DESIGN.md's anchors
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "68m": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=2, num_attention_heads=12),
    "160m": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
}
COMPILED_WIDTHS = (1, 2, 6, 9)  # verify widths (k + 1) captured as graphs for section 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_bench", description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=512, help="tokens cached before the measured steps")
    p.add_argument("--repeats", type=int, default=50, help="timed steps per measurement (median)")
    p.add_argument("--alpha", type=float, default=0.75)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=256, help="per generation in section 4")
    p.add_argument("--trainer-seconds", type=float, default=40.0)
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/gpu.json"))
    return p


def llama_config(shape: str) -> LlamaConfig:
    heads = SHAPES[shape]["num_attention_heads"]
    return LlamaConfig(
        vocab_size=VOCAB, max_position_embeddings=4096, num_key_value_heads=heads, **SHAPES[shape]
    )


def build(shape: str, seed: int) -> PreTrainedModel:
    """A random-init Llama of the named shape, bf16, on the GPU (initialised there: seconds)."""
    torch.manual_seed(seed)
    config = llama_config(shape)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def cuda_ms(run: Callable[[], object], repeats: int, warmup: int = 5) -> float:
    """Median milliseconds of `run` on the GPU (CUDA events around each call)."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return round(statistics.median(times), 3)


def profile(compile_mode: str | None, capacity: int) -> DeviceProfile:
    return DeviceProfile(
        torch.bfloat16, static_cache=True, slots=1, capacity=capacity, compile_mode=compile_mode
    )


@torch.inference_mode()
def step_ms(
    model: PreTrainedModel, widths: Sequence[int], chosen: DeviceProfile, context: int, repeats: int
) -> dict:
    """Milliseconds of one step of each width after `context` cached tokens, in one static slot."""
    cache, base = new_cache(model, chosen), compiled(model.base_model, chosen)
    slot = cache.acquire()
    ids = torch.randint(0, VOCAB, (context + max(widths),), device="cuda")
    prefill(model, cache, slot, ids[:context])
    out = {}
    for n in widths:  # the slot's length is not advanced: each step rewrites the same positions
        out[n] = cuda_ms(
            lambda n=n: forward_slots(model, cache, [slot], [ids[context : context + n]], base=base), repeats
        )
    return out


class SyntheticProposer:
    """A real draft model runs (so its cost is real), then each drafted token is set to the
    target's next greedy token with probability alpha, else to another token."""

    name = "draft"

    def __init__(self, inner: DraftModelProposer, reference: torch.Tensor, alpha: float, seed: int = 0):
        self.inner, self.reference, self.alpha = inner, reference, alpha  # reference: prompt + greedy
        self.generator = torch.Generator(device="cuda").manual_seed(seed)

    def new_state(self, domain: str = ALL_DOMAINS):
        return self.inner.new_state(domain)

    def release(self, state) -> None:
        self.inner.release(state)

    def propose(self, rows: Sequence[DraftRow]) -> list[Proposal]:
        out = []
        for row, proposal in zip(rows, self.inner.propose(rows), strict=True):
            length, k = row.token_ids.shape[0], proposal.tokens.shape[0]
            truth = self.reference[length : length + k]
            right = torch.rand(k, generator=self.generator, device="cuda") < self.alpha
            out.append(Proposal(tokens=torch.where(right, truth, (truth + 1) % VOCAB)))
        return out

    def observe(self, state, accepted: int, hidden: torch.Tensor | None) -> None:
        self.inner.observe(state, accepted, hidden)

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        self.inner.load_weights(weights)


def tokens_per_s(engine: SpecEngine, prompt: list[int], new_tokens: int) -> tuple[float, list[int], dict]:
    engine.generate(prompt, new_tokens, stop_token_ids=[])  # warm-up: every graph captured
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = engine.generate(prompt, new_tokens, stop_token_ids=[])
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    stats = {
        "acceptance_rate": round(out.stats.acceptance_rate, 3),
        "tau": round(out.stats.mean_accepted_length, 3),
    }
    return round(new_tokens / seconds, 1), out.token_ids, stats


def train_draft(seconds: float, fraction: float, report: mp.Queue) -> None:
    """The trainer's share of the GPU: the 160M draft trained on random tokens, batch 16 x 256."""
    torch.cuda.set_per_process_memory_fraction(fraction)
    model = build("160m", seed=3).float().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    report.put("started")
    tokens, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        ids = torch.randint(0, VOCAB, (16, 256), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += ids.numel()
    report.put(round(tokens / seconds))


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_bench needs a CUDA GPU; it is not part of the CPU tests")
    report: dict = {
        "benchmark": "gpu",
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "context": args.context,
        "synthetic_acceptance": "each drafted token is the target's next greedy token with probability alpha",
        "sections": {},
    }

    def save(section: str, result: dict, began: float) -> None:
        report["sections"][section] = result | {"seconds": round(time.perf_counter() - began, 1)}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(section, json.dumps(report["sections"][section]), flush=True)

    capacity = args.context + args.new_tokens + 16
    eager, graphs = profile(None, capacity), profile("reduce-overhead", capacity)
    apply_memory_budget(graphs, torch.device("cuda"))
    began = time.perf_counter()
    models = {name: build(name, seed) for seed, name in enumerate(SHAPES)}
    save(
        "build",
        {"parameters_m": {n: round(sum(p.numel() for p in m.parameters()) / 1e6) for n, m in models.items()}},
        began,
    )

    began = time.perf_counter()
    steps = {
        "7b_eager": step_ms(models["7b"], range(1, 10), eager, args.context, args.repeats),
        "7b_graphs": step_ms(models["7b"], COMPILED_WIDTHS, graphs, args.context, args.repeats),
    }
    for draft in ("68m", "160m"):
        steps[f"{draft}_eager"] = step_ms(models[draft], [1], eager, args.context, args.repeats)
        steps[f"{draft}_graphs"] = step_ms(models[draft], [1], graphs, args.context, args.repeats)
    save("step_ms", steps, began)

    began = time.perf_counter()
    costs = {
        f"c_{draft}_{mode}": round(steps[f"{draft}_{mode}"][1] / steps[f"7b_{mode}"][1], 4)
        for draft in ("68m", "160m")
        for mode in ("eager", "graphs")
    }
    costs["v_eager"] = {n - 1: round(ms / steps["7b_eager"][1], 3) for n, ms in steps["7b_eager"].items()}
    costs["v_graphs"] = {n - 1: round(ms / steps["7b_graphs"][1], 3) for n, ms in steps["7b_graphs"].items()}
    save("costs", costs, began)

    began = time.perf_counter()
    prompt = torch.randint(0, VOCAB, (args.context,), generator=torch.Generator().manual_seed(1)).tolist()
    target, k = models["7b"], args.k
    ar_engine = SpecEngine(target, NullProposer(), 0, graphs)
    ar_rate, reference, _ = tokens_per_s(ar_engine, prompt, args.new_tokens)
    full = torch.tensor(prompt + reference, device="cuda")
    synthetic = SyntheticProposer(DraftModelProposer(models["68m"], graphs), full, args.alpha)
    spec_rate, spec_tokens, spec_stats = tokens_per_s(
        SpecEngine(target, synthetic, k, graphs), prompt, args.new_tokens
    )
    c, v = costs["c_68m_graphs"], costs["v_graphs"].get(k)
    bound = expected_tokens(args.alpha, k) / (k * c + v) if v is not None else None
    save("end_to_end", {
        "alpha": args.alpha, "k": k, "new_tokens": args.new_tokens, "ar_tokens_per_s": ar_rate,
        "spec_tokens_per_s": spec_rate, "speedup": round(spec_rate / ar_rate, 3), **spec_stats,
        "bound_from_costs": None if bound is None else round(bound, 3), "lossless": spec_tokens == reference,
    }, began)  # fmt: skip

    began = time.perf_counter()
    alone = step_ms(target, [1], graphs, args.context, args.repeats)[1]
    context = mp.get_context("spawn")
    queue = context.Queue()
    trainer = context.Process(
        target=train_draft, args=(args.trainer_seconds, TrainerConfig.gpu_memory_fraction, queue), daemon=True
    )
    trainer.start()
    queue.get(timeout=300)  # built and training
    shared = step_ms(target, [1], graphs, args.context, args.repeats)[1]
    trainer_tokens_per_s = queue.get(timeout=args.trainer_seconds + 120)
    trainer.join(timeout=30)
    save("with_trainer", {
        "step_ms_alone": alone, "step_ms_with_trainer": shared, "slowdown": round(shared / alone, 3),
        "trainer_tokens_per_s": trainer_tokens_per_s, "serving_memory_fraction": SERVING_MEMORY_FRACTION,
        "trainer_memory_fraction": TrainerConfig.gpu_memory_fraction,
    }, began)  # fmt: skip
    return report


if __name__ == "__main__":
    main()
