"""Trainer checkpoints: the draft's trainable weights and the optimizer state as safetensors, the
rest as JSON, written to a temporary directory and renamed into place, so that a `kill -9` at
any moment leaves either the previous checkpoint or the new one, never a torn one.

Beside them, the gate set: one file per held-out trace (`root/gate/<stream id>.trace`, its stream
fields as store.traces encodes them, in safetensors), written atomically before the trace is acked
and removed when it leaves the set, so that a restart gates on the same traces.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays
from safetensors.torch import load_file, save_file

from store.traces import Trace, TraceDecodeError, decode, encode

log = logging.getLogger(__name__)

CURRENT = "current"
GATE = "gate"


@dataclass
class TrainerState:
    step: int = 0
    live_version: int | None = None  # the registry version the draft was last synced to
    trained_traces: int = 0
    decided_step: int = 0  # the step of the last gate decision (a publish or a refusal, not a wait)
    history: list[dict] = field(default_factory=list)  # gate and watch decisions, newest last


def save_checkpoint(
    root: Path, weights: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, state: TrainerState
) -> Path:
    """Write weights, optimizer and state under root/current atomically; returns that directory."""
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".staging-{state.step}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, staging / "weights.safetensors")
    tensors, layout = _optimizer_tensors(optimizer)
    save_file(tensors, staging / "optimizer.safetensors")
    (staging / "state.json").write_text(json.dumps({"state": vars(state), "optimizer": layout}))
    final, old = root / CURRENT, root / ".previous"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(root: Path) -> tuple[dict[str, torch.Tensor], dict, TrainerState] | None:
    """(weights, optimizer state dict, trainer state) from root/current, or None when there is none.

    A crash between the two renames of `save_checkpoint` leaves only root/.previous: it is used.
    """
    for name in (CURRENT, ".previous"):
        path = root / name
        if (path / "state.json").exists():
            saved = json.loads((path / "state.json").read_text())
            optimizer = _optimizer_state(load_file(path / "optimizer.safetensors"), saved["optimizer"])
            return load_file(path / "weights.safetensors"), optimizer, TrainerState(**saved["state"])
    return None


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state dict split into tensors (safetensors) and everything else (JSON)."""
    state_dict = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], layout: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(layout["scalars"].items()):
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": layout["param_groups"]}


def save_held_out(root: Path, entry_id: bytes, trace: Trace) -> None:
    """Write a held-out trace of the gate set, by its stream id, atomically."""
    folder = root / GATE
    folder.mkdir(parents=True, exist_ok=True)
    fields = {name.decode(): np.frombuffer(value, np.uint8) for name, value in encode(trace).items()}
    path = _held_out_path(root, entry_id)
    staging = path.with_suffix(".staging")
    staging.write_bytes(save_arrays(fields))
    staging.replace(path)


def drop_held_out(root: Path, entry_id: bytes) -> None:
    _held_out_path(root, entry_id).unlink(missing_ok=True)


def load_held_out(root: Path) -> list[tuple[bytes, Trace]]:
    """The saved gate set: (stream id, trace) in stream order. An unreadable file is skipped, with a
    warning, and removed."""
    held = []
    for path in (root / GATE).glob("*.trace"):
        try:
            fields = {
                name.encode(): array.tobytes() for name, array in load_arrays(path.read_bytes()).items()
            }
            held.append((path.stem.encode(), decode(fields)))
        except (SafetensorError, TraceDecodeError) as err:
            log.warning("dropping unreadable held-out trace %s: %s", path.name, err)
            path.unlink()
    return sorted(held, key=lambda item: tuple(int(part) for part in item[0].split(b"-")))


def _held_out_path(root: Path, entry_id: bytes) -> Path:
    """Stream ids are `<ms>-<seq>`: safe as a file name."""
    name = entry_id.decode()
    if not all(part.isdigit() for part in name.split("-")):
        raise ValueError(f"not a stream id: {entry_id!r}")
    return root / GATE / f"{name}.trace"
