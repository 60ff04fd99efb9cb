"""The trainer's knobs, in one typed config. Defaults work on the demo world (CPU, tiny drafts)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from distill.heads import HeadsSpec
from distill.lora import LoraSpec
from distill.losses import LossName, Selection
from distill.router import RouterSpec


@dataclass(frozen=True)
class RouterConfig:
    """How the trainer learns the domain router (`trainer.router`)."""

    spec: RouterSpec = RouterSpec()
    rows: int = 2_000  # the most recent tagged prompts kept for training
    held_out_rows: int = 500
    held_out_fraction: float = 0.2
    refit_every: int = 50  # new tagged prompts between fits
    min_held_out: int = 20  # held-out prompts needed before a router is published
    steps: int = 200  # full-batch steps per fit


@dataclass(frozen=True)
class AdapterPolicy:
    """Per-domain LoRA adapters over the shared draft (`trainer.adapters`)."""

    min_traces: int = 100  # traces naming a domain before it gets an adapter
    max_domains: int = 8
    learning_rate: float = 3e-3  # an adapter's (LoRA wants a higher rate than full fine-tuning)
    # The LM head too: a domain's drafts differ from the shared one mostly in which tokens they favour.
    lora: LoraSpec = LoraSpec(rank=16, alpha=32, target_modules=("q_proj", "v_proj", "lm_head"))
    router: RouterConfig = RouterConfig()


@dataclass(frozen=True)
class TrainerConfig:
    draft_name: str = "draft"  # registry name of the draft being trained
    domain: str = "-"  # registry domain ("-": one draft for every domain)
    registry_dir: Path | None = None  # where drafts too large for Redis go (store.registry)
    # What to learn.
    loss: LossName = "fkl"
    jsd_beta: float = 0.5
    selection: Selection = "all"
    lora: LoraSpec | None = None  # an adapter; None: by size (lora_min_params)
    lora_min_params: int | None = 100_000_000  # drafts this large get LoraSpec() (None: always full)
    heads: HeadsSpec | None = None  # train draft heads on the target's hidden states instead
    adapters: AdapterPolicy | None = None  # one LoRA adapter per busy domain, and the router
    # How.
    learning_rate: float = 3e-4
    weight_decay: float = 0.0
    batch_size: int = 8  # traces per step; new ones first, the rest replayed
    max_seq_len: int = 2_048  # input tokens per trace (the output end); heads: rows per trace
    grad_clip: float = 1.0
    # The replay buffer.
    buffer_cap: int = 2_000
    recency_half_life: int = 500  # traces: a trace this much older is half as likely to be replayed
    # Checkpoints (and the acks that follow them).
    checkpoint_dir: Path = Path.home() / ".cache" / "osd" / "trainer"
    checkpoint_every: int = 10  # steps
    # The gate.
    gate_every: int = 50  # steps between evaluations of the candidate
    gate_window: int = 200  # the most recent held-out traces per domain to evaluate on
    gate_margin: float = 0.01  # candidate must beat live expected acceptance by this much
    gate_min_positions: int = 500  # held-out positions needed for a decision while new traces come
    gate_dry_min_positions: int = 100  # enough once they have stopped (or gate_min_positions if fewer)
    # Replay once new traces stop: a candidate trained since the last decision goes on learning from
    # the buffer in rounds, scored on the held-out traces after each, then is gated (trainer.loop).
    replay_round_steps: int = 10  # replayed steps between two held-out scores
    replay_patience: int = 2  # rounds without a new best score before it stops
    replay_max_rounds: int = 20  # at most (0: gate at once when new traces stop)
    # Watching a publish.
    watch_requests: int = 50  # requests of the new version, per watched domain, before judging
    watch_delta: float = 0.05  # roll back when live acceptance falls this far below the baseline
    # Spare cycles.
    max_in_flight: int = 2  # pause training while servers have more requests in flight than this
    pause_seconds: float = 0.5
    torch_threads: int = 1
    device: str = "cpu"  # where it trains: "cuda" shares the replicas' GPU, within gpu_memory_fraction
    gpu_memory_fraction: float = 0.15  # on CUDA, this process's cap (the replicas take 0.80)
    # Compute dtype of training and scoring (torch.autocast; the weights stay float32).
    # "auto": bfloat16 on CUDA, none elsewhere.
    autocast_dtype: Literal["auto", "bfloat16"] | None = "auto"
    sched_idle: bool = True  # Linux: the training thread runs only on otherwise idle CPU (SCHED_IDLE)
    niceness: int = 10  # where SCHED_IDLE is off or missing: the training thread's nice increment
    read_count: int = 64  # traces per read from the stream
    drift_check_seconds: float = 10.0  # how often the drift alerts are read
    drift_boost: float = 4.0  # replay weight of traces from domains with a drift alert

    def __post_init__(self):
        checks = {
            "learning_rate": self.learning_rate > 0,
            "batch_size": self.batch_size >= 1,
            "max_seq_len": self.max_seq_len >= 2,
            "buffer_cap": self.buffer_cap >= self.batch_size,
            "recency_half_life": self.recency_half_life > 0,
            "checkpoint_every": self.checkpoint_every >= 1,
            "gate_every": self.gate_every >= 1,
            "gate_min_positions": self.gate_min_positions >= 1,
            "gate_dry_min_positions": self.gate_dry_min_positions >= 1,
            "replay_round_steps": self.replay_round_steps >= 1,
            "replay_patience": self.replay_patience >= 1,
            "replay_max_rounds": self.replay_max_rounds >= 0,
            "watch_requests": self.watch_requests >= 1,
            "jsd_beta": 0.0 < self.jsd_beta < 1.0,
            "watch_delta": self.watch_delta >= 0,
            "gpu_memory_fraction": 0.0 < self.gpu_memory_fraction <= 1.0,
            "drift_check_seconds": self.drift_check_seconds > 0,
            "drift_boost": self.drift_boost >= 1,
            "lora_min_params": self.lora_min_params is None or self.lora_min_params >= 1,
            "autocast_dtype": self.autocast_dtype in ("auto", "bfloat16", None),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"invalid trainer settings: {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}"
            )

    @property
    def autocast(self) -> torch.dtype | None:
        """The dtype the forward passes compute in under torch.autocast, or None for none."""
        if self.autocast_dtype == "auto":
            return torch.bfloat16 if torch.device(self.device).type == "cuda" else None
        return torch.bfloat16 if self.autocast_dtype == "bfloat16" else None
