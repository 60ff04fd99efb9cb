"""How the engine runs on a device: dtype, cache layout, compiled step forwards, memory budget.

`profile_for` picks a `DeviceProfile` from the device. On CUDA: bf16, the static slot cache
(serving.engine.kv: fixed slots at full capacity, so every step has the same shapes), step forwards
compiled whole (`fullgraph`: a graph break is an error, not a slow path) with torch.compile in
"reduce-overhead" mode (CUDA graphs, one per step shape), and a cap on the process's share of GPU
memory (`SERVING_MEMORY_FRACTION`, or `--gpu-memory-utilization`), so that a trainer on the same
GPU keeps its own. A step's input width is rounded up to a bucket of `STEP_WIDTHS` (the verify
step's k + 1 or tree, each draft step's catch-up), so each compiled forward has at most
len(STEP_WIDTHS) graphs, whatever the traffic. On the CPU: float32, the dynamic slot cache,
eager forwards. Prefills always run eager (their lengths vary). Everything here is plain data
and selection, so the CPU tests cover it (tests/test_engine_compiled.py compiles the steps with
inductor and fullgraph on the CPU).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from serving.engine.kv import SlotCache

SERVING_MEMORY_FRACTION = 0.80  # of the GPU, for the replica (target, draft, static caches, graphs)
STEP_WIDTHS = (1, 2, 4, 8, 16, 32, 64)  # a static step's input widths: its graphs
RECOMPILE_LIMIT = 2 * len(STEP_WIDTHS)  # graphs per compiled forward, with room to spare


def step_lookahead(k: int) -> int:
    """Positions a static slot holds past its longest sequence: a step pads its input up to its
    bucket, so the widest step width (or the verify step's k + 1, if wider)."""
    return max(k + 1, STEP_WIDTHS[-1])


def step_width(n: int) -> int:
    """The bucket a static step of n input tokens runs at: the first of STEP_WIDTHS >= n (past
    the last, the next multiple of it)."""
    return next((w for w in STEP_WIDTHS if w >= n), -(-n // STEP_WIDTHS[-1]) * STEP_WIDTHS[-1])


@dataclass(frozen=True)
class DeviceProfile:
    """How one replica's models run."""

    dtype: torch.dtype
    static_cache: bool = False  # fixed slots x capacity, every forward at full shape
    slots: int = 8  # static: sequences decoded at once
    capacity: int = 2048  # static: positions per slot (prompt, output and k lookahead)
    compile_mode: str | None = None  # torch.compile mode for step forwards; None: eager
    compile_backend: str = "inductor"
    memory_fraction: float | None = None  # cap on this process's share of the GPU

    def __post_init__(self):
        if self.slots < 1 or self.capacity < 2:
            raise ValueError(f"need slots >= 1 and capacity >= 2, got {self.slots}, {self.capacity}")
        if self.memory_fraction is not None and not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction must lie in (0, 1], got {self.memory_fraction}")


def profile_for(
    device: torch.device,
    dtype: torch.dtype | None = None,
    slots: int = 8,
    capacity: int = 2048,
    memory_fraction: float | None = SERVING_MEMORY_FRACTION,
) -> DeviceProfile:
    """The profile for `device`: the GPU fast path on CUDA, plain eager float32 elsewhere."""
    if device.type == "cuda":
        return DeviceProfile(
            dtype=dtype or torch.bfloat16, static_cache=True, slots=slots, capacity=capacity,
            compile_mode="reduce-overhead", memory_fraction=memory_fraction,
        )  # fmt: skip
    return DeviceProfile(dtype=dtype or torch.float32)


def apply_memory_budget(profile: DeviceProfile, device: torch.device) -> None:
    """Cap this process's GPU memory at the profile's fraction (a no-op off CUDA)."""
    if device.type == "cuda" and profile.memory_fraction is not None:
        torch.cuda.set_per_process_memory_fraction(profile.memory_fraction, device)


def new_cache(model: PreTrainedModel, profile: DeviceProfile | None) -> SlotCache:
    """A slot cache for `model` in the profile's layout (dynamic when there is no profile)."""
    if profile is None or not profile.static_cache:
        return SlotCache(model.config)
    return SlotCache(model.config, profile.slots, profile.capacity, static=True)


def compiled(module: torch.nn.Module, profile: DeviceProfile | None) -> Callable:
    """`module`, compiled for the profile's step forwards (itself when eager)."""
    if profile is None or profile.compile_mode is None:
        return module
    torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT  # a graph per step width, not eager after 8
    if profile.compile_backend == "inductor":
        return torch.compile(module, mode=profile.compile_mode, dynamic=False, fullgraph=True)
    return torch.compile(module, backend=profile.compile_backend, dynamic=False, fullgraph=True)
