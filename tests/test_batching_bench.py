"""The batching benchmark's parts on the tiny demo pair: closed-loop clients against a batched
replica, the summary and ratios, and the cache-layout comparison."""

from __future__ import annotations

import asyncio
import itertools

from transformers import AutoModelForCausalLM

from benchmarks.batching import closed_loop, layout_step_seconds, ratios, summarize

PROMPTS = [[5, 17, 42, 9], [3, 77, 12, 8, 19], [7] * 12]


def test_closed_loop_clients_and_the_summary(tiny_replica):
    make, _ = tiny_replica
    replica = make("batching", max_batch=4)
    block = asyncio.run(closed_loop(replica, itertools.cycle(PROMPTS), 3, 8, 7))
    done, seconds = block
    assert len(done) == 7 and seconds > 0
    assert all(len(f.generation.token_ids) == 8 for _, f in done)
    summary = summarize([block, block])
    assert summary["requests"] == 14 and summary["tokens_per_s"] > 0
    assert summary["latency_p50_s"] <= summary["latency_p99_s"]
    assert 1.0 <= summary["tokens_per_step"] <= 3.0 and 0 <= summary["mean_k"] <= 2  # k = 2


def test_ratios_compare_configs_present_at_a_level():
    level = {"batched-spec": {"tokens_per_s": 300.0}, "loop-spec": {"tokens_per_s": 100.0}}
    assert ratios(level) == {"batched_spec_over_loop_spec": 3.0}


def test_the_cache_layouts_run_the_same_steps(tiny_demo):
    from deploy.demo.build import build_demo_models
    from tiny_models import TINY_DEMO

    target = AutoModelForCausalLM.from_pretrained(build_demo_models(TINY_DEMO, tiny_demo).target).eval()
    layout = layout_step_seconds(target, PROMPTS, k=3, steps=6, seed=0)
    assert layout["slot_cache_ms"] > 0 and layout["padded_dynamic_cache_ms"] > 0
    # holes: the padded layout grows by k + 1 a step, the slot cache by what was kept
    assert layout["padded_final_kv_length"] == 11 + 6 * 4 > layout["slot_final_kv_length"]
