"""Per-domain LoRA adapters over one shared draft, and the router: trained from tagged traces,
served per domain by a replica, hot-swapped one domain at a time, refused when broken."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import numpy as np
import pytest
import torch
from polling import PATIENCE, wait_for
from transformers import AutoModelForCausalLM, AutoTokenizer

from deploy.demo.workloads import fixed_prompts
from deploy.ray_serve import ServiceConfig, trainer_config
from distill.lora import LoraSpec, adapter_weights, wrap_lora
from distill.router import ROUTER, DomainRouter, RouterSpec, features, fit
from serving.engine.hf import SpecEngine
from serving.replica import Replica, ReplicaConfig, Request
from serving.tracing import trace_of
from store.metrics import MetricsConfig
from store.registry import Registry
from store.traces import StreamConfig, TraceWriter
from trainer.adapters import DomainTrainers
from trainer.config import AdapterPolicy, RouterConfig, TrainerConfig
from trainer.router import domain_accuracy, stack

LORA = AdapterPolicy().lora


def prompts(models, domain: str, n: int, seed: int, tokens: tuple[int, int] = (16, 40)) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(models.target)
    held_out = models.held_out_corpus()
    return [list(p.token_ids) for p in fixed_prompts(held_out, tokenizer, domain, n, seed, tokens)]


def served(replica, prompt: list[int], domain: str = "-", tokens: int = 6):
    return asyncio.run(replica.complete(Request(prompt, tokens, stop_token_ids=[], domain=domain)))


def adapter(models, seed: int) -> dict[str, torch.Tensor]:
    """A LoRA adapter of the demo draft with random B, so that it changes the draft's guesses."""
    model = wrap_lora(AutoModelForCausalLM.from_pretrained(models.draft), LORA)
    generator = torch.Generator().manual_seed(seed)
    weights = adapter_weights(model)
    return {k: torch.randn(v.shape, generator=generator) * 0.5 if "lora_B" in k else v
            for k, v in weights.items()}  # fmt: skip


def test_the_router_tells_the_demo_domains_apart_on_held_out_prompts(tiny_replica):
    _, models = tiny_replica
    spec, domains = RouterSpec(), ["c", "prose", "python"]
    span = (32, 96)  # the demo workload's prompt lengths
    train = [(features(p, spec), d) for d in domains for p in prompts(models, d, 60, 1, span)]
    held_out = [(features(p, spec), d) for d in domains for p in prompts(models, d, 50, 2, span)]
    router = DomainRouter(domains, spec)
    fit(router, *stack(train, domains), steps=200)
    x, labels = torch.stack([x for x, _ in held_out]), [d for _, d in held_out]
    assert domain_accuracy(router, x, labels) >= 0.9  # the threshold docs/architecture.md states
    again = DomainRouter.from_registry(router.state_dict(), router.metadata())
    prompt = prompts(models, "python", 1, seed=3)[0]
    assert again.route(prompt) == router.route(prompt)
    with pytest.raises(ValueError, match="do not fit"):
        DomainRouter.from_registry(router.state_dict(), router.metadata() | {"domains": ["c", "python"]})


def test_busy_domains_get_adapters_that_beat_the_shared_draft_there_and_serve_only_there(
    model_dirs, redis_client, tmp_path
):
    """Two domains with opposite statistics (prompts of low and of high token ids)."""
    target, draft = (str(model_dirs["llama"][name]) for name in ("target", "small"))
    stream = StreamConfig(stream="t:adapters", held_out_fraction=0.25)
    metrics = MetricsConfig(prefix="t:adapters:metrics", flush_seconds=0.05)
    # One writer thread: the traces land in the order they were made, so training is reproducible.
    engine, writer = SpecEngine.from_pretrained(target), TraceWriter(redis_client, stream, writers=1)
    rng = np.random.default_rng(0)

    def prompt(domain: str) -> list[int]:
        low = {"low": 3, "high": 64}[domain]
        return rng.integers(low, low + 60, 8).tolist()

    for i in range(200):
        domain = ("low", "high")[i % 2]
        ids = prompt(domain)
        out = engine.generate(ids, 24, temperature=1.0, seed=i, stop_token_ids=[], top_logprobs=16)
        writer.append(trace_of(f"req-{i}", domain, "tiny-llama", ("draft:base",), ids, out, {}))
    assert writer.flush(timeout=PATIENCE)
    writer.close()
    policy = AdapterPolicy(min_traces=20, lora=LORA, router=RouterConfig(refit_every=20, min_held_out=8))
    config = TrainerConfig(
        checkpoint_dir=tmp_path, batch_size=2, learning_rate=2e-2, gate_every=10, gate_min_positions=200,
        max_in_flight=100, watch_requests=5, adapters=policy,
    )  # fmt: skip
    trainers = DomainTrainers(config, draft, redis_client, stream=stream, metrics=metrics)
    for _ in range(400):
        trainers.run_once()
    registry = Registry(redis_client)
    for domain in ("low", "high"):
        live = registry.live("draft", domain)
        history = trainers.trainers[domain].state.history
        assert live is not None and live.kind == "lora" and live.version >= 2, history
        gate = live.extra["gate"]  # the adapter against the shared draft, on its own domain alone
        assert gate["per_domain"].keys() == {domain} and gate["candidate"] > gate["live"] + 0.01
    settings = ReplicaConfig(target, draft, num_speculative_tokens=2, adapters=True, poll_seconds=0.1,
                             router_min_confidence=0.0, stream=stream, metrics=metrics,
                             adaptive_k=False, engine_process=False)  # fmt: skip
    replica = Replica(settings, redis_client)
    try:
        assert replica.status()["adapters"] == {d: registry.live("draft", d).label for d in ("high", "low")}
        for domain in ("low", "high"):  # each domain's requests, and only they, get its adapter
            assert served(replica, prompt(domain), domain).draft_version.startswith(f"draft/{domain}:")
        assert served(replica, prompt("low"), "other").draft_version == "draft:base"  # no adapter
        wait_for(lambda: replica.status()["router"] is not None)  # learnt from the tags
        for domain in ("low", "high"):
            routed = {served(replica, prompt(domain)).draft_version.split(":")[0] for _ in range(5)}
            assert routed == {f"draft/{domain}"}
    finally:
        replica.close()


def test_a_budget_of_steps_reaches_every_busy_domain_s_adapter(model_dirs, redis_client, tmp_path):
    stream = StreamConfig(stream="t:adapters-budget", held_out_fraction=0.25)
    engine = SpecEngine.from_pretrained(model_dirs["llama"]["target"])
    writer = TraceWriter(redis_client, stream)
    for i in range(60):
        ids = [3 + i % 7, 9, 27 + i % 5, 4]
        out = engine.generate(ids, 8, temperature=1.0, seed=i, stop_token_ids=[], top_logprobs=16)
        domain = ("low", "high")[i % 2]
        writer.append(trace_of(f"req-{i}", domain, "tiny-llama", ("draft:base",), ids, out, {}))
    assert writer.flush(timeout=PATIENCE)
    writer.close()
    policy = AdapterPolicy(min_traces=20, lora=LORA, router=RouterConfig(refit_every=20, min_held_out=8))
    config = TrainerConfig(checkpoint_dir=tmp_path, batch_size=4, gate_every=10**6, adapters=policy)
    trainers = DomainTrainers(config, str(model_dirs["llama"]["small"]), redis_client, stream=stream)
    decisions = trainers.train(3)  # every trace counted, then each busy domain's adapter gets 3 steps
    assert trainers.seen == {"low": 30, "high": 30} and set(decisions) == {"low", "high"}
    assert {domain: t.state.step for domain, t in trainers.trainers.items()} == {"low": 3, "high": 3}


def test_a_swap_of_one_domains_adapter_leaves_the_others_untouched(tiny_replica, redis_client):
    make, models = tiny_replica
    replica = make("swap-one", adapters=True)
    registry, extra = Registry(redis_client), {"lora": dataclasses.asdict(LORA)}
    registry.publish("draft", adapter(models, 1), domain="python", kind="lora", extra=extra)
    registry.publish("draft", adapter(models, 2), domain="c", kind="lora", extra=extra)
    wait_for(lambda: len(replica.status()["adapters"]) == 2)
    c_prompt = prompts(models, "c", 1, seed=4)[0]
    before = served(replica, c_prompt, "c", tokens=12)
    engine = replica.engine.drafts["c"].proposer
    registry.publish("draft", adapter(models, 3), domain="python", kind="lora", extra=extra)
    wait_for(lambda: replica.status()["adapters"]["python"] == "draft/python:v2")
    after = served(replica, c_prompt, "c", tokens=12)
    assert replica.engine.drafts["c"].proposer is engine  # the c adapter was not touched
    assert (after.draft_version, after.generation.stats) == (before.draft_version, before.generation.stats)


def test_a_corrupt_adapter_or_router_is_refused_and_the_shared_draft_serves(
    tiny_replica, redis_client, caplog
):
    make, models = tiny_replica
    replica = make("corrupt", adapters=True)
    registry = Registry(redis_client)
    wrong = {"lora": dataclasses.asdict(LoraSpec(rank=2, target_modules=("q_proj",)))}  # not these weights
    with caplog.at_level(logging.ERROR, logger="serving.replica"):
        registry.publish("draft", adapter(models, 1), domain="c", kind="lora", extra=wrong)
        router = DomainRouter(["c", "python"], RouterSpec(buckets=64))
        extra = router.metadata() | {"domains": ["c"]}
        registry.publish(ROUTER, router.state_dict(), kind="router", extra=extra)
        wait_for(lambda: replica.refused == 2)
    assert "refused draft draft/c:v1, serving draft:base on" in caplog.text
    assert "refused router router:v1" in caplog.text
    assert replica.status()["adapters"] == {} and replica.status()["router"] is None
    assert served(replica, prompts(models, "c", 1, seed=4)[0], "c").draft_version == "draft:base"


def test_the_service_config_turns_adapters_on_for_a_draft_only(tiny_replica):
    _, models = tiny_replica
    target, draft = str(models.target), str(models.draft)
    config = ServiceConfig(target=target, draft=draft, adapters=True, adapter_min_traces=7)
    assert trainer_config(config).adapters == AdapterPolicy(min_traces=7)
    with pytest.raises(ValueError, match="adapters are LoRA adapters over a draft model"):
        ServiceConfig(target=str(models.target), proposer="hydra", adapters=True)


def test_the_adapters_benchmark_compares_every_method_on_the_tiny_demo(tiny_demo, monkeypatch):
    from benchmarks import adapters as adapters_bench
    from deploy.demo.build import PRESETS
    from tiny_models import TINY_DEMO

    monkeypatch.setitem(PRESETS, "tiny", TINY_DEMO)
    args = ["--demo", "tiny", "--cache-dir", str(tiny_demo), "--requests", "12", "--min-traces", "4",
            "--gate-min-positions", "20", "--eval-prompts", "2", "--max-new-tokens", "8"]  # fmt: skip
    report = adapters_bench.main(args)  # outputs were identical across methods, or it would raise
    methods = {(row["domain"], row["method"]) for row in report["rows"]}
    assert methods == {(d, m) for d in ("prose", "python", "c") for m in (
        "starting draft", "shared online draft", "adapter by tag", "adapter by router")}  # fmt: skip
    sizes = report["sizes"]
    assert set(sizes["adapters"]) == {"prose", "python", "c"}  # each domain got its adapter
    assert all(a["bytes"] < sizes["draft_bytes"] for a in sizes["adapters"].values())
