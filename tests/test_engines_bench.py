"""The engines benchmark (the HF engine against vLLM's): its alternation plan, its ratios, shares
and output comparisons, its closed-loop driver on the HF engine, and, where vLLM is installed, the
offline part end to end on a tiny demo pair."""

from __future__ import annotations

import pytest
from rich.console import Console

from benchmarks.engines import (
    Arm,
    Block,
    DraftConfig,
    Driver,
    Settings,
    http_report,
    http_servers,
    mismatches,
    offline,
    offline_report,
    plan,
    ratio,
    replica_config,
)
from benchmarks.engines import main as bench_main
from benchmarks.http_load import Done
from deploy.demo.build import build_demo_models
from serving.engine.hf import SpecEngine
from serving.replica import open_engine
from tiny_models import VLLM_DEMO


def test_the_plan_alternates_the_arms_and_reverses_them_every_other_round():
    assert plan(["a", "b", "c"], 3) == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert plan(["a"], 2) == ["a", "a"] and plan(["a", "b"], 0) == []


def test_ratio_and_mismatches():
    assert ratio(3.0, 2.0) == 1.5 and ratio(1.0, 3.0) == 0.333
    assert ratio(None, 2.0) is None and ratio(2.0, None) is None and ratio(1.0, 0.0) is None
    assert mismatches({0: [1, 2], 1: [3], 2: [4]}, {0: [1, 2], 1: [5], 3: [6]}) == (1, 2)  # keys 0 and 1
    assert mismatches({}, {0: "x"}) == (0, 0)


def block(seconds: float, outputs: dict, steps: int = 0, drafted: int = 0, accepted: int = 0) -> Block:
    return Block(seconds, sum(map(len, outputs.values())), outputs, steps, drafted, accepted)


def test_the_offline_report_has_rates_ratios_acceptance_and_identity():
    same, other = {0: [1, 2, 3, 4], 1: [5, 6, 7, 8]}, {0: [1, 2, 3, 4], 1: [5, 6, 7, 9]}
    runs = {
        Arm("hf", "plain", 1): [block(1.0, same, steps=8), block(3.0, same, steps=8)],  # 16 tokens in 4 s
        Arm("vllm", "plain", 1): [block(1.0, same, steps=8)],  # 8 tokens/s
        Arm("hf", "initial", 1): [block(1.0, same, steps=4, drafted=12, accepted=6)],
        Arm("vllm", "initial", 1): [block(0.5, other, steps=4, drafted=12, accepted=6)],
    }
    runs[Arm("vllm", "initial", 1)][0].failures.append("r-1: StepFailedError()")
    report = offline_report(runs, ["plain", "initial"])
    rows = {(r["engine"], r["draft"]): r for r in report["arms"]}
    assert rows["hf", "plain"]["tokens_per_s"] == 4.0 and rows["hf", "plain"]["tokens_per_s_blocks"] == [
        8,
        2.7,
    ]
    assert rows["hf", "plain"]["requests"] == 4
    assert (
        rows["hf", "plain"]["acceptance_rate"] is None and rows["hf", "plain"]["mean_accepted_length"] == 1.0
    )
    assert (
        rows["hf", "initial"]["acceptance_rate"] == 0.5
        and rows["hf", "initial"]["mean_accepted_length"] == 2.5
    )
    assert (
        rows["vllm", "initial"]["failures"] == ["r-1: StepFailedError()"] and report["failed_requests"] == 1
    )
    assert report["vllm_over_hf"] == [
        {"draft": "plain", "concurrency": 1, "ratio": 2.0},
        {"draft": "initial", "concurrency": 1, "ratio": 2.0},
    ]
    assert {(r["engine"], r["ratio"]) for r in report["spec_over_plain"]} == {("hf", 2.0), ("vllm", 2.0)}
    assert report["identical"] == [
        {"draft": "plain", "identical": True, "mismatches": 0, "compared": 2},
        {"draft": "initial", "identical": False, "mismatches": 1, "compared": 2},
    ]


def done(tokens: int, seconds: float) -> Done:
    return Done(0.0, 0.1, seconds, tokens)


def test_the_http_servers_are_osd_on_each_engine_and_ingress_then_vllm_s_own():
    assert http_servers(("proxy", "haproxy")) == {
        "osd-hf": ("hf", "proxy"), "osd-hf-haproxy": ("hf", "haproxy"),
        "osd-vllm": ("vllm", "proxy"), "osd-vllm-haproxy": ("vllm", "haproxy"), "vllm": ("vllm", None),
    }  # fmt: skip
    assert list(http_servers(("haproxy",))) == ["osd-hf-haproxy", "osd-vllm-haproxy", "vllm"]


def test_the_http_report_has_shares_of_the_offline_rates_and_compares_texts():
    arms = http_servers(("proxy", "haproxy"))
    runs = {
        "osd-hf": [([done(48, 1.0), done(48, 1.0)], 2.0)],  # 48 tokens/s
        "osd-hf-haproxy": [([done(48, 1.0)], 0.75)],  # 64
        "osd-vllm": [([done(48, 1.0)], 0.5)],  # 96
        "osd-vllm-haproxy": [([done(48, 1.0)], 0.48)],  # 100
        "vllm": [([done(48, 1.0)], 0.4)],  # 120
    }
    offline_rows = [
        {"engine": "hf", "draft": "plain", "concurrency": 16, "tokens_per_s": 96.0},
        {"engine": "vllm", "draft": "plain", "concurrency": 16, "tokens_per_s": 240.0},
        {"engine": "vllm", "draft": "plain", "concurrency": 1, "tokens_per_s": 10.0},  # another level
        {"engine": "vllm", "draft": "initial", "concurrency": 16, "tokens_per_s": 10.0},  # not plain
    ]
    completions = {name: {0: "a", 1: "b"} for name in arms} | {"vllm": {0: "a", 1: None}}
    report = http_report(arms, runs, completions, offline_rows, 16, ["ReadTimeout()"])
    shares = {s["server"]: s["share_of_offline"] for s in report["servers"]}
    assert shares == {"osd-hf": 0.5, "osd-hf-haproxy": 0.667, "osd-vllm": 0.4, "osd-vllm-haproxy": 0.417,
                      "vllm": 0.5}  # fmt: skip
    assert [s["ingress"] for s in report["servers"]] == ["proxy", "haproxy", "proxy", "haproxy", None]
    assert report["osd_vllm_over_vllm"] == {"proxy": 0.8, "haproxy": 0.833} and report["failed_requests"] == 1
    assert report["texts"] == {"identical": False, "mismatches": 1, "compared": 8}
    no_offline = http_report(arms, runs, {n: {0: "a"} for n in runs}, [], 16, [])
    assert all(s["share_of_offline"] is None for s in no_offline["servers"])
    assert no_offline["texts"]["identical"] is True


def test_nothing_to_run_and_empty_blocks_are_refused():
    with pytest.raises(SystemExit, match="nothing to run"):
        bench_main(["--no-offline", "--no-http"])
    with pytest.raises(SystemExit, match="must be >= 1"):
        bench_main(["--requests", "0"])


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The tiny demo pair whose heads vLLM's CPU attention serves."""
    return build_demo_models(VLLM_DEMO, tmp_path_factory.mktemp("engines-demo"))


def test_the_driver_serves_a_closed_loop_with_the_engine_s_greedy_outputs(pair):
    target = str(pair.target)
    settings = Settings(k=2, max_tokens=6, concurrency=2)
    driver = Driver(open_engine(replica_config(target, DraftConfig("plain", None), "hf", settings)))
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [5, 6, 7], [14]]
    try:
        first = driver.run(prompts, 2, 6, "a")
        second = driver.run(prompts[:2], 1, 6, "b")  # the same engine, the next block
    finally:
        driver.engine.close(30)
    reference = SpecEngine.from_pretrained(target)
    expected = {i: reference.generate(p, 6).token_ids for i, p in enumerate(prompts)}
    assert first.outputs == expected and first.failures == [] and first.seconds > 0
    assert first.tokens == sum(map(len, expected.values())) and first.steps >= first.tokens
    assert second.outputs == {0: expected[0], 1: expected[1]}


def test_the_offline_part_runs_both_engines_alternating_with_identical_outputs(pair, monkeypatch):
    """One draft config (vLLM's start is most of this test's time): speculative decoding at k = 3
    on both engines, one request at a time and two at once."""
    pytest.importorskip("vllm")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # vLLM's KV cache, 1 GiB per engine
    drafts = [DraftConfig("initial", str(pair.draft))]
    settings = Settings(
        k=3, max_tokens=8, concurrency=2, requests=3, blocks=2, vllm_eager=True, settle_seconds=0
    )
    prompts = [[5, 6, 7, 8], [40, 41, 42], [100, 101, 102, 103, 104]]
    report = offline(str(pair.target), drafts, prompts, settings, Console(quiet=True))
    assert report["failed_requests"] == 0
    assert [(r["engine"], r["concurrency"]) for r in report["arms"]] == [
        ("hf", 1), ("vllm", 1), ("hf", 2), ("vllm", 2)
    ]  # fmt: skip
    for row in report["arms"]:
        assert row["requests"] == 6 and len(row["tokens_per_s_blocks"]) == 2 and row["tokens_per_s"] > 0
        assert 0.0 <= row["acceptance_rate"] <= 1.0 and row["mean_accepted_length"] >= 1.0
    assert report["identical"] == [{"draft": "initial", "identical": True, "mismatches": 0, "compared": 6}]
    assert all(r["ratio"] > 0 for r in report["vllm_over_hf"]) and report["spec_over_plain"] == []
