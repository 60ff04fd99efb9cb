"""Draft heads (Medusa, Hydra): their weights alone round-trip through safetensors, drafting with
them keeps greedy decoding exactly the target's on every test architecture, and the hidden states
they read are logged in the traces of a sampled fraction of requests."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest
import torch
from polling import PATIENCE, wait_for
from safetensors.torch import load, save
from transformers import AutoModelForCausalLM

from benchmarks import heads as heads_bench
from deploy.demo.build import PRESETS
from distill.heads import (
    DraftHeads,
    HeadsSpec,
    NoHiddenStatesError,
    heads_acceptance,
    heads_batch,
    heads_loss,
)
from serving.engine.hf import SpecEngine
from serving.engine.kv import slot_attention
from serving.engine.models import tree_support
from serving.engine.proposers import HeadsProposer, NullProposer
from serving.engine.tree import greedy_path, static_tree, tree_visibility
from serving.errors import IncompatibleDraftError
from serving.replica import Replica, ReplicaConfig, Request
from serving.tracing import trace_of
from store.registry import Registry
from store.traces import StreamConfig, TraceReader, TraceWriter
from tiny_models import ARCHS, TINY_DEMO, build, random_heads
from trainer.config import TrainerConfig
from trainer.learners import HeadsLearner
from trainer.loop import OnlineTrainer

PROMPT = [5, 3, 8, 1, 9, 2, 7]


@pytest.mark.parametrize("kind", ["medusa", "hydra"])
def test_heads_weights_are_theirs_alone_and_round_trip(kind):
    target = build("llama", 1, 32, seed=0)
    heads = random_heads(target, kind)
    state = heads.state_dict()
    assert set(state) == {f"blocks.{i}.{p}" for i in range(3) for p in ("weight", "bias")}  # no LM head
    widths = [block.in_features for block in heads.blocks]
    assert widths == ([32] * 3 if kind == "medusa" else [64, 96, 128])  # Hydra reads earlier tokens
    fresh = DraftHeads.for_target(HeadsSpec(kind, 3), target)
    proposer = HeadsProposer(fresh)
    proposer.load_weights(load(save(state)))
    hidden, following = torch.randn(4, 32), torch.randint(0, 64, (4, 3))
    assert torch.equal(fresh(hidden, following), heads(hidden, following))  # [4, K, V]
    with pytest.raises(IncompatibleDraftError, match="do not fit"):
        proposer.load_weights(random_heads(build("llama", 1, 48, seed=0), kind).state_dict())
    with pytest.raises(IncompatibleDraftError, match="does not have"):
        proposer.load_weights({"lm_head.weight": torch.zeros(64, 32)})


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["medusa", "hydra"])
@pytest.mark.parametrize("tree", [None, static_tree((3, 2, 2))], ids=["chain", "tree"])
def test_greedy_with_heads_is_the_targets_greedy(arch, kind, tree):
    target = build(arch, 2, 32, seed=1)
    expected = SpecEngine(target, NullProposer(), 0).generate(PROMPT, 24, stop_token_ids=[]).token_ids
    engine = SpecEngine(target, HeadsProposer(random_heads(target, kind), tree), num_speculative_tokens=3)
    out = engine.generate(PROMPT, 24, stop_token_ids=[], top_logprobs=4, hidden_states=True)
    assert out.token_ids == expected
    assert out.stats.drafted > 0  # the heads drafted
    reference = SpecEngine(target, NullProposer(), 0).generate(PROMPT, 24, stop_token_ids=[], top_logprobs=4)
    assert torch.equal(out.top_ids, reference.top_ids)  # the logged distributions are the same too
    with torch.no_grad():
        assert target.get_output_embeddings()(out.hidden).argmax(-1).tolist() == expected


def test_a_static_tree_its_attention_and_the_greedy_walk():
    tree = static_tree((3, 2, 1))  # 3 candidates, 2 under the first, 1 under the first of those
    assert (tree.parents, tree.ranks, tree.depths) == (
        (-1, -1, -1, 0, 0, 3),
        (0, 1, 2, 0, 1, 0),
        (1, 1, 1, 2, 2, 3),
    )
    assert tree.up_to(2).parents == (-1, -1, -1, 0, 0)
    visible = tree_visibility(tree.parents).unsqueeze(0)  # [1, 7, 7]
    mask = slot_attention(torch.tensor([2]), visible, width=9, dtype=torch.float32)[0, 0] == 0  # [7, 9]
    assert mask[:, :3].all()  # the cache and the root
    assert mask[6].tolist() == [
        True,
        True,
        True,
        True,
        False,
        False,
        True,
        False,
        True,
    ]  # node 5: 0, 3, itself
    assert mask[2].tolist() == [True, True, True, False, True, False, False, False, False]  # node 1: itself
    tokens = [7, 8, 9, 4, 5, 6]
    assert greedy_path(tree.parents, tokens, [7, 4, 0, 0, 6, 0, 1]) == [0, 3, 5]
    assert greedy_path(tree.parents, tokens, [9, 0, 0, 0, 0, 0, 0]) == [2]
    assert greedy_path(tree.parents, tokens, [1, 0, 0, 0, 0, 0, 0]) == []


def test_hidden_states_are_those_that_gave_each_token_and_sampled_traces_carry_them(redis_client, model_dirs):
    target_dir = model_dirs["llama"]["target"]
    engine = SpecEngine.from_pretrained(target_dir, model_dirs["llama"]["small"], num_speculative_tokens=3)
    out = engine.generate(PROMPT, 12, stop_token_ids=[], hidden_states=True)
    lm_head = engine.target.get_output_embeddings()
    assert out.hidden.shape == (12, engine.target.config.hidden_size)
    with torch.no_grad():  # greedy: each row gave its token
        assert lm_head(out.hidden).argmax(-1).tolist() == out.token_ids

    stream = StreamConfig(stream="t:hidden")
    config = ReplicaConfig(target=str(target_dir), hidden_fraction=1.0, stream=stream, replica_id="r-hidden")
    replica = Replica(config, redis_client)
    asyncio.run(replica.complete(Request(PROMPT, 12, stop_token_ids=[])))
    replica.close(timeout=PATIENCE)  # its trace written (the timeout only guards a hang)
    (delivery,) = TraceReader(redis_client, "c", stream).read(count=10)
    assert delivery.trace.hidden.dtype == np.float16
    assert np.allclose(delivery.trace.hidden, out.hidden.numpy(), atol=1e-2)


@pytest.mark.parametrize("kind", ["medusa", "hydra"])
def test_training_heads_on_traces_fits_them_to_the_targets_distributions(kind):
    target = build("llama", 2, 32, seed=3, init_std=0.15).requires_grad_(False)  # peaked: learnable
    engine = SpecEngine(target, NullProposer(), 0)
    generator = torch.Generator().manual_seed(0)
    traces = []
    for i in range(20):
        prompt = torch.randint(0, 128, (6,), generator=generator).tolist()
        out = engine.generate(prompt, 20, stop_token_ids=[], top_logprobs=16, hidden_states=True)
        traces.append(trace_of(f"r{i}", "-", "tiny", ("none",), prompt, out, {}))
    batch = heads_batch(traces, 3)
    assert batch.hidden.shape == (20 * 17, 32) and batch.top_ids.shape == (20 * 17, 3, 16)
    heads = DraftHeads.for_target(HeadsSpec(kind, 3), target)
    before = heads_acceptance(heads, batch)
    optimizer = torch.optim.Adam(heads.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        heads_loss(heads, batch).backward()
        optimizer.step()
    after = heads_acceptance(heads, batch)
    assert (after > before + 0.08).all(), (before, after)

    no_hidden = [dataclasses.replace(t, hidden=None) for t in traces]
    with pytest.raises(NoHiddenStatesError, match="hidden_fraction"):
        heads_batch(no_hidden, 3)


def test_a_heads_replica_serves_losslessly_and_swaps_in_published_heads_only(redis_client, model_dirs):
    target_dir = str(model_dirs["llama"]["target"])
    expected = SpecEngine.from_pretrained(target_dir).generate(PROMPT, 12, stop_token_ids=[]).token_ids
    config = ReplicaConfig(
        target=target_dir, proposer="hydra", num_speculative_tokens=3, heads_tree=(3, 2, 2), poll_seconds=0.1,
        stream=StreamConfig(stream="t:heads"), replica_id="r-heads", adaptive_k=False, engine_process=False,
    )  # fmt: skip
    replica = Replica(config, redis_client)
    # the heads' own c, timed at start for the dashboard's speedup (0 when timing noise hides it)
    assert replica.cost_ratio is not None and replica.cost_ratio >= 0

    def served() -> tuple[list[int], str]:
        finished = asyncio.run(replica.complete(Request(PROMPT, 12, stop_token_ids=[])))
        return finished.generation.token_ids, finished.draft_version

    assert served() == (expected, "draft:base")
    registry, spec = Registry(redis_client), replica.engine.host_base.spec
    trained = random_heads(AutoModelForCausalLM.from_pretrained(target_dir), "hydra").state_dict()
    registry.publish("draft", trained, kind="heads", extra={"heads": dataclasses.asdict(spec)})
    assert wait_for(lambda: replica.draft_version == "draft:v1")
    assert served() == (expected, "draft:v1")  # new heads, the target's own output
    draft_model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"]["small"]).state_dict()
    registry.publish("draft", draft_model)  # a draft model's weights: not for a heads replica
    assert wait_for(lambda: replica.refused == 1)
    assert served() == (expected, "draft:v1")
    replica.close()


def test_the_online_trainer_learns_gates_and_publishes_heads_skipping_traces_without_hidden_states(
    redis_client, tmp_path
):
    target = build("llama", 2, 32, seed=3, init_std=0.15)  # peaked distributions: learnable
    target.save_pretrained(tmp_path / "target")
    engine = SpecEngine(target, NullProposer(), 0)
    stream = StreamConfig(stream="t:heads-trainer", held_out_fraction=0.25)
    # One writer thread: the traces land in the order they were made, so training is reproducible.
    writer, generator = TraceWriter(redis_client, stream, writers=1), torch.Generator().manual_seed(1)
    for i in range(100):
        prompt = torch.randint(0, 128, (6,), generator=generator).tolist()
        out = engine.generate(prompt, 20, temperature=1.0, seed=i, stop_token_ids=[], top_logprobs=16,
                              hidden_states=i % 10 != 0)  # fmt: skip
        writer.append(trace_of(f"req-{i}", "code", "tiny", ("draft:v1",), prompt, out, {}))
    assert writer.flush(timeout=PATIENCE)
    writer.close()
    config = TrainerConfig(
        heads=HeadsSpec("hydra", 3), checkpoint_dir=tmp_path / "ckpt", batch_size=8, learning_rate=1e-2,
        gate_every=10**6, gate_min_positions=200, max_in_flight=100,
    )  # fmt: skip
    trainer = OnlineTrainer(config, tmp_path / "target", redis_client, stream=stream)
    assert trainer.registry.live("draft").kind == "heads"  # the starting heads, published as the baseline
    for _ in range(80):
        trainer.poll()
        trainer.train_step()
    assert trainer.skipped == 10  # every trace without hidden states, acked and left out
    decision = trainer.maybe_publish()
    assert decision.publish, decision.reason
    live = trainer.registry.live("draft")
    assert (live.version, live.kind, live.extra["heads"]) == (2, "heads", {"kind": "hydra", "num_heads": 3})


def test_tree_mode_is_checked_against_the_target(model_dirs):
    target = build("llama", 1, 32, seed=0)
    assert tree_support(target) is None  # Llama verifies trees through a 4D mask exactly
    engine = SpecEngine.from_pretrained(str(model_dirs["llama"]["target"]), proposer="medusa", tree=(3, 2))
    assert engine.proposer.tree == static_tree((3, 2))


def test_the_heads_benchmark_compares_every_method_on_the_tiny_demo(tiny_demo, tmp_path, monkeypatch):
    monkeypatch.setitem(PRESETS, "tiny", TINY_DEMO)
    args = ["--demo", "tiny", "--cache-dir", str(tiny_demo), "--prompts", "8", "--epochs", "1",
            "--eval-prompts", "2", "--max-new-tokens", "8", "--k", "2", "--tree", "2,1"]  # fmt: skip
    report = heads_bench.main([*args, "--json", str(tmp_path / "heads.json")])
    methods = {row["method"]: row for row in report["methods"]}
    assert set(methods) == {"no speculation", "draft model", "n-gram", "medusa heads", "hydra heads",
                            "hydra heads, tree 2,1"}  # fmt: skip
    assert all(row["tokens_per_s"] > 0 for row in methods.values())  # and every output was the same
    assert methods["no speculation"]["mean_accepted_length"] == 1.0


def test_the_demo_measures_the_speed_of_published_heads(tiny_demo, redis_client):
    """`osd demo --proposer hydra`'s closing measurement rebuilds the starting and the live heads
    (and `rotate` checks that their outputs are plain decoding's)."""
    from deploy.demo.build import build_demo_models
    from deploy.demo.measure import measure_speed
    from deploy.demo.report import speedup_summary
    from deploy.ray_serve import ServiceConfig

    models = build_demo_models(TINY_DEMO, tiny_demo)
    config = ServiceConfig(target=str(models.target), proposer="hydra", k=2)
    target = AutoModelForCausalLM.from_pretrained(models.target)
    registry = Registry(redis_client)
    weights = random_heads(target, "hydra", num_heads=2).state_dict()
    extra = {"heads": {"kind": "hydra", "num_heads": 2}}
    live = registry.publish("draft", weights, kind="heads", extra=extra)
    measured = measure_speed(models, config, registry, live, [PROMPT, PROMPT[:4]], max_new_tokens=6)
    speed = speedup_summary(measured, "draft:base", live.label)  # as `osd demo` reports it
    assert set(speed["tokens_per_s"]) == {"no speculation", "initial draft", "live draft"}
    assert speed["live_draft"] == "draft:v1" and speed["live_vs_ar"] > 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # an LM head of its own, and one tied to the embeddings
def test_the_heads_learner_holds_the_targets_lm_head_alone_and_learns_as_over_the_whole_target(
    arch, tmp_path
):
    target = build(arch, 2, 32, seed=3, init_std=0.15)
    target.save_pretrained(tmp_path / "target")
    spec = HeadsSpec("hydra", 3)
    learner = HeadsLearner(TrainerConfig(heads=spec), tmp_path / "target", spec)
    held = [v for v in vars(learner).values() if isinstance(v, torch.nn.Module)]
    assert held == [learner.lm_head, learner.embeddings]  # no decoder layer, no whole target
    whole = AutoModelForCausalLM.from_pretrained(tmp_path / "target")
    assert torch.equal(learner.lm_head.weight, whole.get_output_embeddings().weight)
    assert torch.equal(learner.embeddings.weight, whole.get_input_embeddings().weight)
    tied = whole.get_output_embeddings().weight is whole.get_input_embeddings().weight
    assert tied == (arch == "gpt2") and (learner.lm_head.weight is learner.embeddings.weight) == tied

    engine, generator, traces = SpecEngine(target, NullProposer(), 0), torch.Generator().manual_seed(0), []
    for i in range(6):
        prompt = torch.randint(0, 128, (6,), generator=generator).tolist()
        out = engine.generate(prompt, 16, stop_token_ids=[], top_logprobs=16, hidden_states=True)
        traces.append(trace_of(f"r{i}", "-", "tiny", ("none",), prompt, out, {}))
    ours, reference = learner.build(), DraftHeads.for_target(spec, whole)
    for heads in (ours, reference):
        optimizer = torch.optim.AdamW(heads.parameters(), lr=1e-2)
        for _ in range(5):
            optimizer.zero_grad()
            learner.loss(heads, traces).backward()
            optimizer.step()
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(tensor, reference.state_dict()[name], rtol=0, atol=0)
    assert learner.acceptance(ours, traces) == learner.acceptance(reference, traces)
