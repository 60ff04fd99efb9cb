"""The trainer as a Ray actor: `kill -9` mid-training, Ray restarts it, it resumes from its checkpoint;
its status names its device and the GPUs Ray assigned it."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch
from polling import wait_for
from test_trainer_loop import STREAM, write
from test_trainer_loop import traffic as traffic  # noqa: F401 - the shared fixture

from store.traces import is_held_out
from trainer.actor import Trainer, TrainerActor
from trainer.checkpoint import load_checkpoint
from trainer.config import TrainerConfig


def test_kill_9_restarts_and_resumes_with_no_trace_lost(
    ray_session,
    redis_server,
    redis_client,
    model_dirs,
    traffic,
    tmp_path,  # noqa: F811
):
    write(redis_client, traffic[:100])
    config = TrainerConfig(
        checkpoint_dir=tmp_path / "ckpt", batch_size=4, checkpoint_every=3, gate_every=10**6,
        max_in_flight=100, pause_seconds=0.05,
        sched_idle=False, niceness=0,  # its progress must not hang on idle CPU on a busy machine
    )  # fmt: skip
    actor = TrainerActor.remote(
        config, str(model_dirs["llama"]["small"]), redis_server.url, "trainer-0", STREAM
    )

    def status():  # None while the actor restarts (or a busy machine delays it)
        try:
            return ray_session.get(actor.status.remote(), timeout=30)
        except ray_session.exceptions.GetTimeoutError:
            return None

    before = wait_for(lambda: (s := status()) and s["step"] >= 6 and s, every=0.2)
    assert (before["device"], before["accelerators"]) == ("cpu", [])  # Ray assigned it no GPU
    os.kill(before["pid"], signal.SIGKILL)

    after = wait_for(lambda: (s := status()) and s["pid"] != before["pid"] and s, every=0.2)
    saved = load_checkpoint(config.checkpoint_dir)
    assert saved is not None and after["step"] >= 3  # resumed from a checkpoint, not from zero
    training = [t for t in traffic[:100] if not is_held_out(t.request_id, STREAM.held_out_fraction)]
    done = wait_for(lambda: (s := status()) and s["state"] == "idle" and s["untrained"] == 0 and s, every=0.2)
    ray_session.get(actor.stop.remote())
    # Every training trace was acked after a checkpointed step (the idle trainer checkpointed the last).
    assert redis_client.xpending(STREAM.stream, STREAM.group)["pending"] == 0
    _, _, state = load_checkpoint(config.checkpoint_dir)
    assert state.trained_traces >= len(training) and done["trained_traces"] >= len(training)
    ray_session.kill(actor, no_restart=True)
    # None when the kill came right after a checkpoint: the restart then had nothing left to train.
    assert done["loss"] is None or np.isfinite(done["loss"])


def test_a_paused_trainer_takes_no_step_until_resumed_and_trains_a_budget_when_told(
    redis_server,
    redis_client,
    model_dirs,
    traffic,
    tmp_path,  # noqa: F811
):
    config = TrainerConfig(
        checkpoint_dir=tmp_path / "ckpt", batch_size=4, gate_every=10**6, max_in_flight=100,
        pause_seconds=0.05, torch_threads=torch.get_num_threads(),
    )  # fmt: skip
    trainer = Trainer(config, str(model_dirs["llama"]["small"]), redis_server.url, "trainer-p", STREAM)
    trainer.pause()  # returns once no step is in progress
    assert trainer.status()["state"] == "paused"
    assert os.sched_getscheduler(trainer._thread.native_id) == os.SCHED_IDLE  # the training thread only
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    write(redis_client, traffic[:40])
    status = trainer.train(3)  # a budget of steps, on the caller's thread, while the loop holds
    assert status["step"] == 3 and status["state"] == "paused"
    assert trainer.pause() is None and trainer.status()["step"] == 3  # still held: no step of its own
    trainer.resume()
    wait_for(lambda: trainer.status()["step"] > 3, every=0.2)
    trainer.stop()
    with pytest.raises(ValueError, match="steps"):
        trainer.train(0)
