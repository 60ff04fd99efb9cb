"""The trainer as a Ray actor: its own process, restarted by Ray after a crash or `kill -9`.

The actor runs `OnlineTrainer.run_once` in a background thread at the lowest OS priority
(SCHED_IDLE: it gets only CPU time nothing else wants) with few torch threads, so serving keeps
the CPU it needs; `pause` and `resume` hold it between steps. `train(steps)` trains a given
number of steps at once instead, at the caller's priority: a budget that does not depend on idle
CPU. A restart re-runs the constructor, which resumes from the last checkpoint; traces trained
on after it were never acked, so the stream delivers them again. When Redis is unreachable the
trainer pauses and retries. On CUDA the process caps its GPU memory at `gpu_memory_fraction` of
the device it trains on (`claim_device`), and its status names the GPUs Ray assigned it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import asdict
from pathlib import Path

import ray
import redis
import torch

from store.redis_server import open_redis
from store.traces import StreamConfig
from trainer.adapters import DomainTrainers
from trainer.config import TrainerConfig
from trainer.loop import OnlineTrainer

log = logging.getLogger(__name__)


class Trainer:
    """Actor body; `TrainerActor` below is its Ray form (max_restarts=-1)."""

    def __init__(
        self,
        config: TrainerConfig,
        base: str | Path,  # the starting draft, or with config.heads the target
        redis_url: str,
        consumer: str = "trainer-0",
        stream: StreamConfig | None = None,
    ):
        torch.set_num_threads(config.torch_threads)
        self.device = claim_device(config)
        kind = DomainTrainers if config.adapters else OnlineTrainer
        self.trainer = kind(config, base, open_redis(redis_url), consumer, stream)
        self.state = "starting"
        self._stop, self._paused = threading.Event(), threading.Event()
        self._working = threading.Lock()  # held by the loop for one iteration, by `train` throughout
        self._thread = threading.Thread(target=self._run, name="trainer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        lower_priority(self.trainer.config)
        while not self._stop.is_set():
            with self._working:  # one piece of work at a time: pause and train wait for it
                wait = 0.1 if self._paused.is_set() else self._work()
            self._stop.wait(wait)

    def _work(self) -> float:
        """One iteration of the loop; returns how long to wait before the next."""
        try:
            self.state = self.trainer.run_once()
            return self.trainer.config.pause_seconds if self.state == "idle" else 0.0
        except redis.RedisError as err:
            self.state = "paused: redis unavailable"
            log.warning("trainer paused, redis unavailable: %s", err)
        except Exception:
            self.state = "paused: error"
            log.exception("trainer step failed")
        return 1.0

    def status(self) -> dict:
        try:
            backlog = asdict(self.trainer.reader.backlog())  # the stream's length, pending and lag
        except redis.RedisError:
            backlog = None
        return {
            "state": self.state,
            "pid": os.getpid(),
            **self.trainer.status(),
            "backlog": backlog,
            "device": str(self.device),  # where it trains
            "accelerators": accelerator_ids(),  # the GPUs Ray assigned it
            "time": time.time(),
        }

    def pause(self) -> None:
        """Stop training; returns once the step in progress has finished, so that no step runs
        from then on until `resume` (status says "paused"). Traces queue up meanwhile."""
        self._paused.set()
        with self._working:
            self.state = "paused"

    def resume(self) -> None:
        self._paused.clear()
        self.state = "resuming"  # until the loop's next iteration says what it did

    def train(self, steps: int) -> dict:
        """Train exactly `steps` steps now on what the stream holds, at this caller's priority and
        whatever the servers' load, then gate (`OnlineTrainer.train`); returns the status. The
        background loop waits meanwhile. A budget given explicitly: what is learnt then does not
        depend on how much idle CPU the loop got (`osd demo --train-steps`, the tests)."""
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        with self._working:
            self.trainer.train(steps)
        return self.status()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def claim_device(config: TrainerConfig) -> torch.device:
    """The device the trainer trains on. On CUDA, shared with the replicas, the process caps its
    memory there at `gpu_memory_fraction` (the allocator refuses beyond it)."""
    device = torch.device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_per_process_memory_fraction(config.gpu_memory_fraction, device)
    return device


def accelerator_ids() -> list[str]:
    """The GPU ids Ray assigned this process ([] outside Ray, or with none)."""
    if not ray.is_initialized():
        return []
    return list(ray.get_runtime_context().get_accelerator_ids().get("GPU", []))


def lower_priority(config: TrainerConfig) -> None:
    """Lower the calling thread's CPU priority (Linux priorities are per thread, and inherited by the
    threads it starts): SCHED_IDLE where available and chosen, else `niceness`."""
    if config.sched_idle and hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    elif config.niceness:
        os.nice(config.niceness)


TrainerActor = ray.remote(max_restarts=-1, max_task_retries=-1, num_cpus=0)(Trainer)
