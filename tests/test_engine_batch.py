"""Batched decoding (continuous batching): 1 to 16 concurrent sequences, joining and leaving
between steps, each still token-identical to the target's own greedy `generate` and, sampled,
distributed as the target; the controller's plans by measured costs; the static-cache, compiled layout."""

from __future__ import annotations

import pytest
import torch
from test_engine_lossless import hf_greedy
from test_engine_sampling import PROMPT, SAMPLES, joint_first_two, noise_bound, pair, tv  # noqa: F401
from test_heads import random_heads

from serving.engine.device import DeviceProfile, profile_for, step_lookahead
from serving.engine.hf import SpecEngine
from serving.engine.kv import CacheFullError
from serving.engine.proposers import DraftModelProposer, HeadsProposer, NgramProposer, NullProposer
from serving.engine.sampling import SamplingParams
from serving.engine.speculation import PROBE_EVERY, AcceptanceEstimate, Costs, StepCosts
from serving.engine.tree import static_tree
from tiny_models import ARCHS, VOCAB

VOCAB_SMALL = 8  # the sampling pair's vocabulary

GEN = torch.Generator().manual_seed(3)
PROMPTS = [torch.randint(3, VOCAB, (1 + (7 * i) % 23,), generator=GEN).tolist() for i in range(16)]
LENGTHS = [4 + (5 * i) % 29 for i in range(16)]  # max_new_tokens: sequences leave at different steps


@pytest.fixture(scope="module")
def references(model_dirs):
    return {
        arch: [
            hf_greedy(model_dirs[arch]["target"], p, n, eos=None)
            for p, n in zip(PROMPTS, LENGTHS, strict=True)
        ]
        for arch in ARCHS
    }


def run_batch(engine: SpecEngine, count: int, join_every: int = 0) -> dict[int, list[int]]:
    """Decode PROMPTS[:count] together: all at once, or one more joining every `join_every` steps."""
    pending, outputs, owners, steps = list(range(count)), {}, {}, 0
    while pending or engine.active:
        if pending and (join_every == 0 or steps % join_every == 0):
            for i in pending if join_every == 0 else pending[:1]:
                owners[id(engine.add(PROMPTS[i], LENGTHS[i], stop_token_ids=[]))] = i
            pending = [] if join_every == 0 else pending[1:]
        for decoding, step in engine.step():
            if step.generation is not None:
                outputs[owners[id(decoding)]] = step.generation.token_ids
        steps += 1
    return outputs


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("proposer", ["draft", "ngram", "none"])
@pytest.mark.parametrize("count,join_every", [(1, 0), (5, 0), (16, 0), (16, 2)])
def test_batched_greedy_matches_hf_generate(model_dirs, references, arch, proposer, count, join_every):
    draft = model_dirs[arch]["near"] if proposer == "draft" else None
    engine = SpecEngine.from_pretrained(
        model_dirs[arch]["target"], draft=draft, proposer=proposer, num_speculative_tokens=3
    )
    outputs = run_batch(engine, count, join_every)
    assert [outputs[i] for i in range(count)] == references[arch][:count]
    assert engine.cache.rows == 0 and not engine.active  # every slot given back


def test_one_batch_mixes_drafts_trees_and_plain_decoding(model_dirs, references):
    """Sequences on different proposers (two drafts, a heads tree, none) share each target forward."""
    engine = SpecEngine.from_pretrained(
        model_dirs["llama"]["target"], draft=model_dirs["llama"]["near"], num_speculative_tokens=3
    )
    small = DraftModelProposer(SpecEngine.from_pretrained(model_dirs["llama"]["small"]).target)
    tree = HeadsProposer(random_heads(engine.target, "medusa"), static_tree((2, 2, 1)))
    proposers = [engine.proposer, small, tree, NullProposer(), NgramProposer()]
    owners, outputs = {}, {}
    for i in range(10):
        decoding = engine.add(PROMPTS[i], LENGTHS[i], stop_token_ids=[], proposer=proposers[i % 5])
        owners[id(decoding)] = i
    while engine.active:
        for decoding, step in engine.step():
            if step.generation is not None:
                outputs[owners[id(decoding)]] = step.generation.token_ids
    assert [outputs[i] for i in range(10)] == references["llama"][:10]


@pytest.mark.slow
def test_batched_samples_follow_the_target(pair):  # noqa: F811
    """16 seeded sequences per batch: the first two tokens' joint distribution is the target's."""
    target, draft = pair
    params = SamplingParams(0.9, top_k=6)
    engine = SpecEngine(target, DraftModelProposer(draft), num_speculative_tokens=3)
    counts = torch.zeros(VOCAB_SMALL, VOCAB_SMALL, dtype=torch.float64)
    for first in range(0, SAMPLES, 16):
        for seed in range(first, first + 16):
            engine.add(PROMPT, 2, temperature=0.9, top_k=6, seed=seed, stop_token_ids=[])
        while engine.active:
            for _, step in engine.step():
                if step.generation is not None:
                    a, b = step.generation.token_ids
                    counts[a, b] += 1
    expected = joint_first_two(target, params)
    assert tv(counts / SAMPLES, expected) < noise_bound(expected)


def test_static_compiled_layout_is_lossless_and_bounded(model_dirs, references):
    """The GPU layout on the CPU: fixed slots at full capacity, the step forwards through
    torch.compile (its "eager" backend standing in for CUDA graphs)."""
    profile = DeviceProfile(
        torch.float32,
        static_cache=True,
        slots=4,
        capacity=96,
        compile_mode="default",
        compile_backend="eager",
    )  # noqa: E501
    base = SpecEngine.from_pretrained(model_dirs["llama"]["target"], draft=model_dirs["llama"]["near"])
    engine = SpecEngine(base.target, DraftModelProposer(base.proposer.model, profile), 3, profile)
    outputs = run_batch(engine, 4)
    assert [outputs[i] for i in range(4)] == references["llama"][:4]
    assert engine.cache.layers[0].keys.shape[0] == 4 and engine.cache.capacity == 96  # never grew
    for _ in range(4):
        engine.add(PROMPTS[0], 4)
    with pytest.raises(CacheFullError):
        engine.add(PROMPTS[0], 4)


def test_a_step_padded_to_its_width_bucket_fits_a_full_slot(model_dirs):
    """A static slot keeps step_lookahead(k) positions past max_model_len: a draft falling 40
    tokens behind (steps at k = 0) catches up in one step padded to width 64 at the end of the
    sequence, and the output is still the target's."""
    max_len, k = 64, 3
    profile = DeviceProfile(
        torch.float32, static_cache=True, slots=1, capacity=max_len + step_lookahead(k),
        compile_mode="default", compile_backend="eager",
    )  # fmt: skip
    base = SpecEngine.from_pretrained(model_dirs["llama"]["target"], draft=model_dirs["llama"]["small"])
    engine = SpecEngine(base.target, DraftModelProposer(base.proposer.model, profile), k, profile, max_len)
    prompt = PROMPTS[3][:10] or [5]
    decoding = engine.add(prompt, max_len - len(prompt), stop_token_ids=[])
    engine.step(k)  # the draft's slot is filled
    while decoding.length < max_len - 8:
        engine.step(0)  # the draft falls behind
    while engine.active:
        engine.step(k)  # one catch-up of about 40 tokens, at width 64
    expected = base.generate(prompt, max_len - len(prompt), stop_token_ids=[]).token_ids
    assert decoding.output == expected


def test_the_device_picks_the_profile():
    cpu = profile_for(torch.device("cpu"))
    assert (cpu.dtype, cpu.static_cache, cpu.compile_mode, cpu.memory_fraction) == (
        torch.float32,
        False,
        None,
        None,
    )
    gpu = profile_for(torch.device("cuda"), slots=16, capacity=4096)
    assert (gpu.dtype, gpu.static_cache, gpu.slots, gpu.capacity) == (torch.bfloat16, True, 16, 4096)
    assert gpu.compile_mode == "reduce-overhead" and 0 < gpu.memory_fraction < 1
    with pytest.raises(ValueError):
        DeviceProfile(torch.float32, memory_fraction=1.5)


def costs(per_token: float, per_draft: float) -> StepCosts:
    """Step costs of 1 + per_token * (tokens in the batch) + per_draft * k, per batch size."""
    batches = (1, 4, 16)
    seconds = tuple(tuple(1 + per_token * b * (k + 1) + per_draft * k for k in range(5)) for b in batches)
    return StepCosts(batches, seconds)


def test_observed_steps_keep_the_costs_current():
    start = costs(0.0, 0.0)  # one second a step, whatever the batch and k
    slower = start
    for _ in range(200):
        slower = slower.observe(4, 2, 3.0)
    assert slower.step_seconds(4, 2) == pytest.approx(3.0, rel=0.01)
    assert slower.step_seconds(4, 1) == pytest.approx(3**0.5, rel=0.01)  # the row's level rose with it
    assert slower.step_seconds(1, 2) == 1.0  # other batch sizes stay as measured...
    assert slower.step_seconds(4, 3) >= 2.97 and slower.step_seconds(16, 2) >= 2.97  # ...but monotone
    between = start.observe(6, 1, 2.0, weight=1.0)  # lands on the nearest measured batch size, 4
    assert between.step_seconds(4, 0) == 1.5 and between.step_seconds(4, 1) == 2.25
    assert between.step_seconds(1, 1) == 1.0


def test_acceptance_estimate_counts_leading_accepts_and_first_rejections():
    estimate = AcceptanceEstimate(accepted=1.0, rejected=1.0, decay=1.0)
    estimate.update(drafted=4, accepted=4)  # four accepts, no rejection
    estimate.update(drafted=4, accepted=1)  # one accept, then a rejection
    estimate.update(drafted=0, accepted=0)  # nothing drafted: nothing learnt
    assert estimate.alpha == pytest.approx(6 / 8)
    prior = estimate.prior(weight=2.0)
    assert prior.alpha == pytest.approx(estimate.alpha) and prior.accepted + prior.rejected == pytest.approx(
        2.0
    )


def test_calibrated_engine_chooses_k_by_load_and_stays_lossless(model_dirs, references):
    engine = SpecEngine.from_pretrained(
        model_dirs["llama"]["target"], draft=model_dirs["llama"]["near"], num_speculative_tokens=3
    )
    measured = engine.calibrate(max_batch=4, repeats=1)
    assert measured.learnt.batches == measured.verify.batches == (1, 2, 4)
    assert measured.learnt.max_k == measured.verify.max_k == 3 and measured.cost_ratio > 0
    assert not engine.active and engine.cache.rows == 0
    engine.costs = measured
    outputs = run_batch(engine, 6, join_every=1)
    assert [outputs[i] for i in range(6)] == references["llama"][:6]
    assert engine.costs != measured  # the steps taken refined the costs
    engine.costs = Costs(costs(0.5, 0.0), costs(0.5, 1.0))  # speculation never pays: plain decoding
    engine.add(PROMPTS[1], LENGTHS[1], stop_token_ids=[])
    while engine.active:
        ((_, step),) = engine.step()
    # plain decoding, but for a one-token probe every PROBE_EVERY steps
    assert step.generation.stats.drafted <= 1 and step.generation.token_ids == references["llama"][1]


def test_measured_costs_are_monotone_and_a_probe_keeps_acceptance_measured(model_dirs):
    noisy = StepCosts.measured((1, 4), [[2.0, 1.0, 3.0], [1.5, 4.0, 3.5]])
    assert noisy.seconds == ((2.0, 2.0, 3.0), (2.0, 4.0, 4.0))
    assert noisy.step_seconds(2, 1) == pytest.approx(2 + 2 / 3) and noisy.cost_ratio == pytest.approx(0.25)
    engine = SpecEngine.from_pretrained(
        model_dirs["llama"]["target"], draft=model_dirs["llama"]["near"], num_speculative_tokens=3
    )  # noqa: E501
    engine.costs = Costs(costs(0.5, 0.0), costs(0.5, 1.0))  # speculation never pays
    engine.add(PROMPTS[0], 3 * PROBE_EVERY, stop_token_ids=[])
    while engine.active:
        ((_, step),) = engine.step()
    stats = step.generation.stats
    assert 2 <= stats.drafted <= stats.steps // PROBE_EVERY  # the last step has no room to draft
