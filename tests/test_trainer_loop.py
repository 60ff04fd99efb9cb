"""The online trainer on a real redis-server, with traces the engine produced on tiny models."""

from __future__ import annotations

import dataclasses
import re
import time
from collections import Counter

import numpy as np
import pytest
import torch
from polling import wait_for

from serving.engine.hf import SpecEngine
from serving.tracing import trace_of
from store.load import REPLICAS, publish_load, read_load
from store.metrics import MetricsConfig, MetricsRecorder, request_counters
from store.traces import StreamConfig, TraceWriter, is_held_out
from trainer.checkpoint import load_checkpoint
from trainer.config import TrainerConfig
from trainer.loop import OnlineTrainer

STREAM = StreamConfig(stream="t:trainer", held_out_fraction=0.25)


@pytest.fixture(scope="module")
def traffic(model_dirs):
    """Traces of the tiny llama target (sampled, so outputs vary) with its top-16 logged."""
    engine = SpecEngine.from_pretrained(model_dirs["llama"]["target"])
    rng = np.random.default_rng(0)
    traces = []
    for i in range(160):
        prompt = rng.integers(3, 128, 6).tolist()
        out = engine.generate(prompt, 24, temperature=1.0, seed=i, stop_token_ids=[], top_logprobs=16)
        traces.append(
            trace_of(f"req-{i}", ["code", "prose"][i % 2], "tiny-llama", ("draft:v1",), prompt, out, {})
        )
    return traces


def write(client, traces) -> None:
    writer = TraceWriter(client, STREAM, writers=1)  # in the order given: training is reproducible
    for trace in traces:
        writer.append(trace)
    writer.close()


def config(tmp_path, **overrides) -> TrainerConfig:
    settings = dict(
        checkpoint_dir=tmp_path / "ckpt",
        batch_size=8,
        learning_rate=3e-3,
        gate_every=10**6,  # the tests call the gate themselves
        gate_min_positions=200,
        checkpoint_every=5,
        max_in_flight=100,
        watch_requests=5,
    )
    return TrainerConfig(**settings | overrides)


def train(trainer: OnlineTrainer, steps: int) -> None:
    for _ in range(steps):
        trainer.poll()
        trainer.train_step()
        if trainer.state.step % trainer.config.checkpoint_every == 0:
            trainer.checkpoint()


def test_training_on_traces_raises_expected_acceptance_and_the_gate_publishes(
    redis_client, model_dirs, traffic, tmp_path
):
    write(redis_client, traffic)
    settings = config(tmp_path, batch_size=4, learning_rate=1e-2, pause_seconds=0.01)
    trainer = OnlineTrainer(settings, model_dirs["llama"]["small"], redis_client, stream=STREAM)
    assert trainer.registry.live_version("draft") == 1  # the starting draft, published as the baseline
    trainer.poll()
    before = trainer.evaluate()
    assert before.candidate == pytest.approx(before.live) and not before.publish
    publish_load(redis_client, "replica-a", in_flight=100, queued=100)  # busy: run_once waits
    assert trainer.run_once() == "throttled" and trainer.state.step == 0
    decision = trainer.train(60)  # a budget of steps, whatever the load, then the gate
    assert trainer.state.step == 60 and trainer.reader.backlog().pending == 0  # checkpointed, acked
    assert decision.publish, decision.reason
    assert decision.candidate > decision.live + 0.05, decision
    live = trainer.registry.live("draft")
    assert (
        live.version == 2 and live.parent == 1 and live.gate_acceptance == pytest.approx(decision.candidate)
    )
    assert live.extra["gate"]["per_domain"].keys() == {"code", "prose"}
    assert trainer.watching is not None


def test_the_gate_refuses_a_damaged_candidate(redis_client, model_dirs, traffic, tmp_path):
    write(redis_client, traffic)
    trainer = OnlineTrainer(config(tmp_path), model_dirs["llama"]["small"], redis_client, stream=STREAM)
    train(trainer, 30)
    with torch.no_grad():
        for param in trainer.model.parameters():
            param.add_(torch.randn_like(param) * 2.0)
    decision = trainer.maybe_publish()
    assert not decision.publish and decision.candidate < decision.live
    assert trainer.registry.live_version("draft") == 1
    refused = trainer.registry.versions("draft")[-1]
    assert refused.status == "rejected" and refused.extra["gate"]["publish"] is False


def test_a_publish_is_rolled_back_when_live_acceptance_drops(redis_client, model_dirs, traffic, tmp_path):
    write(redis_client, traffic)
    metrics = MetricsConfig(prefix="t:metrics")
    trainer = OnlineTrainer(
        config(tmp_path, gate_min_positions=1, gate_margin=0.0),  # publish any improvement
        model_dirs["llama"]["small"],
        redis_client,
        stream=STREAM,
        metrics=metrics,
    )
    train(trainer, 3)
    parent = trainer.registry.live("draft")
    assert trainer.maybe_publish().publish
    published, since = trainer.watching
    recorder = MetricsRecorder(redis_client, metrics)
    for i in range(10):  # the servers' view: 0.8 before the swap, 0.3 after, on both domains
        for domain in ("code", "prose"):
            recorder.record(
                parent.label,
                domain,
                request_counters(10, 40, 32, 42, [], [], None, None),
                since - 60 + i,
            )
            recorder.record(
                published.label,
                domain,
                request_counters(10, 40, 12, 22, [], [], None, None),
                since + 1 + i,
            )
    recorder.close()
    verdict = trainer.maybe_watch()
    assert (
        verdict.action == "rollback"
        and verdict.baseline == pytest.approx(0.8)
        and verdict.after == pytest.approx(0.3)
    )
    assert trainer.registry.live_version("draft") == parent.version
    assert trainer.registry.get("draft", "-", published.version).status == "rejected"
    assert trainer.watching is None and trainer.state.live_version == parent.version


def test_a_restarted_trainer_resumes_and_every_trace_is_trained_on(
    redis_client, model_dirs, traffic, tmp_path
):
    write(redis_client, traffic[:80])
    settings = config(tmp_path)
    first = OnlineTrainer(settings, model_dirs["llama"]["small"], redis_client, stream=STREAM)
    train(first, 7)  # checkpointed (and acked) at step 5; steps 6 and 7 are lost with the process
    acked_at_crash = first.reader.backlog()
    saved_weights, _, saved_state = load_checkpoint(settings.checkpoint_dir)
    assert saved_state.step == 5 and acked_at_crash.pending > 0
    del first  # as after kill -9: nothing more is written or acked

    second = OnlineTrainer(settings, model_dirs["llama"]["small"], redis_client, stream=STREAM)
    assert second.state.step == 5
    for name, tensor in second.model.state_dict().items():
        torch.testing.assert_close(tensor, saved_weights[name])
    train(second, 40)
    second.checkpoint()
    backlog = second.reader.backlog()
    assert backlog.pending == 0 and backlog.lag == 0  # everything read and acked
    training = [t for t in traffic[:80] if not is_held_out(t.request_id, STREAM.held_out_fraction)]
    # Acks follow a checkpointed step: the 5 steps before the crash plus the restart's account for
    # every training trace exactly once; those trained in steps 6-7 were re-delivered and retrained.
    assert second.state.trained_traces == len(training)


def test_an_idle_trainer_checkpoints_and_acks_what_it_trained(redis_client, model_dirs, traffic, tmp_path):
    write(redis_client, traffic[:6])  # less than a batch, and far fewer steps than checkpoint_every
    trainer = OnlineTrainer(config(tmp_path), model_dirs["llama"]["small"], redis_client, stream=STREAM)
    assert trainer.run_once() == "trained" and trainer.reader.backlog().pending > 0
    assert trainer.run_once() == "idle"  # no new trace: no step, but the trained ones are committed
    assert trainer.reader.backlog().pending == 0
    # Too few held-out positions to judge replay by, even now that traces have stopped: it says so.
    positions = trainer.held_out_positions()
    assert trainer.status()["activity"] == f"waiting for held-out traces: {positions} of 100 positions"
    assert load_checkpoint(tmp_path / "ckpt")[2].step == 1


def test_the_trainer_waits_while_servers_are_busy(redis_client, model_dirs, traffic, tmp_path):
    write(redis_client, traffic[:20])
    trainer = OnlineTrainer(
        config(tmp_path, max_in_flight=2, pause_seconds=0.01),
        model_dirs["llama"]["small"],
        redis_client,
        stream=STREAM,
    )
    publish_load(redis_client, "replica-a", in_flight=2, queued=1)
    assert trainer.run_once() == "throttled" and trainer.state.step == 0
    publish_load(redis_client, "replica-a", in_flight=1, queued=0, ttl_seconds=0.05)
    assert trainer.run_once() == "trained" and trainer.state.step == 1
    wait_for(lambda: read_load(redis_client) == [])  # the replica's load expires: it no longer counts
    assert not redis_client.smembers(REPLICAS)  # and its name is forgotten


def test_a_drift_alert_puts_its_domain_s_traces_first(redis_client, model_dirs, traffic, tmp_path):
    metrics = MetricsConfig(prefix="t:trainer:drift")
    write(redis_client, traffic[:40])
    trainer = OnlineTrainer(
        config(tmp_path, drift_check_seconds=0.01), model_dirs["llama"]["small"], redis_client,
        stream=STREAM, metrics=metrics,
    )  # fmt: skip
    recorder, now = MetricsRecorder(redis_client, metrics), time.time()
    for i in range(100):  # prose acceptance falls from 0.6 to 0.2; code holds
        counts = {"prose": 180 if i < 90 else 60, "code": 180}
        for domain, accepted in counts.items():
            recorder.record(
                "draft:v1", domain, Counter(accepted=accepted, drafted=300), at=now - (100 - i) * 10
            )
    recorder.close()
    trainer.poll()
    trainer.check_drift()
    assert trainer.prioritised == {"prose"}
    batch = trainer.buffer.batch(8, trainer.generator, trainer.prioritised)
    assert {e.trace.domain for e in batch} == {"prose"}  # untrained prose traces go first


def test_versions_made_live_past_the_gate_are_followed_watched_or_rolled_back(
    redis_client, model_dirs, tmp_path
):
    trainer = OnlineTrainer(config(tmp_path), model_dirs["llama"]["small"], redis_client, stream=STREAM)
    registry, start = trainer.registry, trainer.registry.live("draft")
    weights = {n: t.clone() for n, t in trainer.weights().items()}
    nan = registry.publish("draft", {n: torch.full_like(t, float("nan")) for n, t in weights.items()})
    assert nan.parent == start.version  # a publish's parent defaults to the version it replaced
    trainer.run_once()  # refused on load: rolled back at once, and remembered
    assert registry.live_version("draft") == start.version == trainer.state.live_version
    event = trainer.state.history[-1]
    assert event["action"] == "rollback" and "non-finite" in event["reason"]

    foreign = registry.publish("draft", {n: t * 1.01 for n, t in weights.items()})
    trainer.run_once()
    assert trainer.state.live_version == foreign.version and trainer.watching[0].version == foreign.version
    registry.rollback("draft")  # an operator's rollback is followed, not watched
    trainer.watching = None
    trainer.run_once()
    assert trainer.state.live_version == start.version and trainer.watching is None


def test_a_publish_is_checkpointed_first_so_a_restart_never_publishes_the_same_steps_twice(
    redis_client, model_dirs, traffic, tmp_path
):
    write(redis_client, traffic[:80])
    settings = config(tmp_path, gate_min_positions=1, gate_margin=0.0)  # publish any improvement
    first = OnlineTrainer(settings, model_dirs["llama"]["small"], redis_client, stream=STREAM)
    assert first.train(4).publish  # checkpointed at step 4, then published
    del first  # as after kill -9 right after the publish
    second = OnlineTrainer(settings, model_dirs["llama"]["small"], redis_client, stream=STREAM)
    assert (second.state.step, second.state.live_version) == (4, 2)
    second.train(3)
    candidates = [v for v in second.registry.versions("draft") if "gate" in v.extra]
    assert [v.train_steps for v in candidates] == [4, 7]  # the restart went on from the publish


def until_idle(trainer: OnlineTrainer, limit: int = 500) -> list[str]:
    """run_once until the trainer is idle; returns its activity after each iteration."""
    activities = []
    for _ in range(limit):
        idle = trainer.run_once() == "idle"
        activities.append(trainer.activity)
        if idle:
            return activities
    raise AssertionError(f"not idle after {limit} iterations: {activities[-3:]}")


def test_a_cold_start_replays_its_buffer_once_traces_stop_and_publishes_what_held_out_traces_favour(
    redis_client, model_dirs, traffic, tmp_path
):
    """A hundred traces of a new domain, then none: far fewer held-out positions than the gate
    needs while traces come, and no more coming."""
    write(redis_client, [dataclasses.replace(t, domain="chat") for t in traffic[:100]])
    settings = config(
        tmp_path, gate_every=50, gate_min_positions=10_000, gate_dry_min_positions=100,
        replay_round_steps=5, replay_patience=2, replay_max_rounds=40, learning_rate=1e-2,
    )  # fmt: skip
    trainer = OnlineTrainer(settings, model_dirs["llama"]["small"], redis_client, stream=STREAM)
    activities = until_idle(trainer)
    positions = trainer.held_out_positions()
    assert 100 <= positions < 10_000
    waiting = r"training on new traces \(\d+ untrained\); waiting for held-out traces: \d+ of 10000 positions"
    assert re.fullmatch(waiting, activities[0]), activities[0]
    training = [t for t in traffic[:100] if not is_held_out(t.request_id, STREAM.held_out_fraction)]
    assert trainer.state.trained_traces == len(training) and trainer.reader.backlog().pending == 0

    (decision,) = [e for e in trainer.state.history if e["kind"] == "gate"]
    scores, stop = decision["replay"]["scores"], decision["replay"]["stop"]
    best = scores.index(max(scores))
    assert best > 0 and scores[best] > scores[0] + 0.1  # replay went on while held-out acceptance rose
    assert len(scores) - 1 == best + 2 < 40 and stop.startswith("no gain in 2 rounds")  # then stopped
    best_so_far = f"{scores[best]:.3f}, best {scores[best]:.3f}"
    assert f"replaying the buffer (round {best + 1}, held-out acceptance {best_so_far})" in activities
    assert decision["candidate"] == pytest.approx(scores[best])  # the best round's weights were gated
    assert decision["publish"] and decision["positions"] == positions, decision["reason"]
    live = trainer.registry.live("draft")
    assert live.version == 2 and live.gate_acceptance > decision["live"] + 0.1
    assert activities[-2].startswith("idle: no new traces since the last decision (no gain in 2 rounds")
    assert activities[-1] == trainer.status()["activity"] == "idle: no new traces since the last decision"

    step = trainer.state.step
    assert trainer.run_once() == "idle" and trainer.state.step == step  # the buffer is not replayed again
    write(redis_client, [dataclasses.replace(t, domain="chat") for t in traffic[100:130]])
    until_idle(trainer)  # new traces trained on, then replay and a decision again
    gates = [e for e in trainer.state.history if e["kind"] == "gate"]
    assert len(gates) == 2 and gates[1]["step"] > step + 1 and "replay" in gates[1]
    assert len(trainer.registry.versions("draft")) == 3


def held_out_ids(trainer: OnlineTrainer) -> dict[str, list[bytes]]:
    return {domain: [h.entry_id for h in held] for domain, held in trainer.gate_set.items()}


def newest_held_out(traces, per_domain: int) -> dict[str, list[str]]:
    held_out = [t for t in traces if is_held_out(t.request_id, STREAM.held_out_fraction)]
    return {d: [t.request_id for t in held_out if t.domain == d][-per_domain:] for d in ("code", "prose")}


def test_a_restarted_trainer_gates_on_the_same_held_out_traces(redis_client, model_dirs, traffic, tmp_path):
    write(redis_client, traffic[:120])
    settings = config(tmp_path, gate_window=8, gate_min_positions=10**6)  # no decision: the gate waits
    first = OnlineTrainer(settings, model_dirs["llama"]["small"], redis_client, stream=STREAM)
    first.train(20)  # every trace read: the training ones trained on and acked
    assert first.reader.backlog().lag == 0
    requests = {d: [h.trace.request_id for h in held] for d, held in first.gate_set.items()}
    assert requests == newest_held_out(traffic[:120], 8)  # each domain's window: its newest 8
    assert len(newest_held_out(traffic[:120], 10**6)["prose"]) > 8  # older ones left it
    assert len(list((tmp_path / "ckpt" / "gate").iterdir())) == 16  # and the disk
    gate_set, decision = held_out_ids(first), first.evaluate()
    del first  # as after kill -9

    second = OnlineTrainer(settings, model_dirs["llama"]["small"], redis_client, stream=STREAM)
    assert held_out_ids(second) == gate_set  # before reading anything: the same traces, in order
    assert second.evaluate() == decision
    write(redis_client, traffic[120:160])
    second.train(10)
    requests = {d: [h.trace.request_id for h in held] for d, held in second.gate_set.items()}
    assert requests == newest_held_out(traffic[:160], 8)


def test_held_out_traces_delivered_again_after_a_crash_are_held_once(
    redis_client, model_dirs, traffic, tmp_path, monkeypatch
):
    write(redis_client, traffic[:40])
    settings = config(tmp_path, batch_size=200)
    first = OnlineTrainer(settings, model_dirs["llama"]["small"], redis_client, stream=STREAM)
    monkeypatch.setattr(first.reader, "ack", lambda entry_ids: 0)  # it dies before any ack
    first.poll()
    gate_set = held_out_ids(first)
    assert sum(map(len, gate_set.values())) > 0 and first.reader.backlog().pending == 40
    del first

    second = OnlineTrainer(settings, model_dirs["llama"]["small"], redis_client, stream=STREAM)
    second.poll()  # its pending entries come again, held-out ones among them
    assert held_out_ids(second) == gate_set and second.reader.backlog().pending == len(second.buffer)


def test_the_live_version_is_scored_from_its_weights_without_a_second_model(
    redis_client, model_dirs, traffic, tmp_path
):
    write(redis_client, traffic[:80])
    trainer = OnlineTrainer(config(tmp_path), model_dirs["llama"]["small"], redis_client, stream=STREAM)
    train(trainer, 10)
    modules = [v for v in vars(trainer).values() if isinstance(v, torch.nn.Module)]
    assert modules == [trainer.model]  # the live version waits as weights on the CPU
    candidate = {n: t.clone() for n, t in trainer.weights().items()}
    decision = trainer.evaluate()
    for name, tensor in trainer.weights().items():  # scoring the live version left the candidate as it was
        torch.testing.assert_close(tensor, candidate[name], rtol=0, atol=0)
    live = trainer.learner.build().eval()
    trainer.learner.load(live, trainer.registry.load(trainer.registry.live("draft")))
    held = [h.trace for held in trainer.gate_set.values() for h in held]
    per_trace = trainer.learner.acceptance(live, held)
    assert decision.live == pytest.approx(sum(s for s, _ in per_trace) / sum(n for _, n in per_trace))
    assert trainer.evaluate() == decision  # from the cached live scores, the same
    trainer.config = dataclasses.replace(trainer.config, gate_min_positions=1, gate_margin=0.0)
    assert decision.candidate > decision.live and trainer.maybe_publish().publish  # any gain publishes
    after = trainer.evaluate()
    assert after.candidate == pytest.approx(after.live)  # the live version is the candidate now


def test_the_loop_trains_and_scores_under_autocast(redis_client, model_dirs, traffic, tmp_path):
    write(redis_client, traffic[:40])
    settings = config(tmp_path, autocast_dtype="bfloat16", gate_min_positions=1)
    trainer = OnlineTrainer(settings, model_dirs["llama"]["small"], redis_client, stream=STREAM)
    dtypes = []
    trainer.model.lm_head.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    train(trainer, 3)
    decision = trainer.evaluate()
    assert dtypes and set(dtypes) == {torch.bfloat16} and np.isfinite(trainer.last_loss)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert 0 < decision.candidate <= 1 and 0 < decision.live <= 1
