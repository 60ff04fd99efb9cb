"""A replica's memory plan: how its weights and KV caches share its part of the device.

Sizes come from a Hugging Face config and a dtype, before any weights load (parameters are
counted on the meta device, which allocates nothing):
- weights: parameters x dtype bytes (unquantized; tied embeddings counted once);
- KV cache: each layer keeps a key and a value of kv_heads x head_dim per token, so a token costs
  2 x layers x kv_heads x head_dim x dtype bytes. Sliding-window layers and compressed caches are
  counted as full layers (the slot cache keeps every position): an upper bound for those models.

`plan_memory` is the plan (DESIGN.md, "Memory"), pure: numbers in, a `MemoryPlan` out. The
replica's budget is `gpu_memory_utilization` of the device. Out of it come the bytes in use
after the weights load (measured on CUDA by `plan_on_device`; else the weights), a reserve for
activations, CUDA graphs and allocator slack (ACTIVATION_RESERVE of the budget, not measured),
and a prefill's copy of one slot (a prompt is prefilled alone, then copied into its slot). The
rest holds max_batch slots of max_model_len + lookahead positions (`step_lookahead`: a static
step pads its input to a bucket of step widths, so 64, or k + 1 if wider), in the target's cache
and the draft's. max_model_len None is the target's context, reduced to a multiple of MIN_MODEL_LEN when
it does not fit. A plan that cannot fit raises MemoryPlanError, with the bytes needed and
available and what would fit. The trainer's share of the device is reported, and with the
replica's it may not exceed the device.

Config names are read through the config's standard attribute map, so GPT-2's n_layer, n_head
and n_embd answer as num_hidden_layers, num_attention_heads and hidden_size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from serving.engine.device import SERVING_MEMORY_FRACTION, step_lookahead

GIB = 2**30
MIN_MODEL_LEN = 256  # the shortest sequence a slot is planned for; reduced lengths are multiples of it
ACTIVATION_RESERVE = 0.05  # of the budget: activations, CUDA graphs, allocator slack (an allowance)


class MemoryPlanError(ValueError):
    """The models and the token budget do not fit the replica's share of the device."""


@dataclass(frozen=True)
class KVShape:
    """What one token leaves in each layer's cache: a key and a value of kv_heads x head_dim."""

    layers: int
    kv_heads: int
    head_dim: int


def kv_shape(config: PretrainedConfig) -> KVShape:
    """Layers, KV heads (num_key_value_heads, else num_attention_heads: no grouped-query
    attention) and head_dim (else hidden_size // num_attention_heads) of the text model."""
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return KVShape(text.num_hidden_layers, kv_heads, head_dim)


def kv_bytes_per_token(config: PretrainedConfig, dtype: torch.dtype) -> int:
    shape = kv_shape(config)
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * dtype.itemsize


def parameter_count(config: PretrainedConfig) -> int:
    """Parameters of the causal LM `config` describes, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # shared (tied) parameters once


def weight_bytes(config: PretrainedConfig, dtype: torch.dtype) -> int:
    return parameter_count(config) * dtype.itemsize


@dataclass(frozen=True)
class ModelSize:
    """What the plan needs from one model, in the dtype it serves in."""

    weights: int  # bytes
    kv_per_token: int  # bytes
    context: int | None  # max_position_embeddings, when the config states it


def model_size(config: PretrainedConfig, dtype: torch.dtype, weights: int | None = None) -> ModelSize:
    """`config`'s sizes in `dtype`; `weights`: a loaded model's bytes, else counted on meta."""
    return ModelSize(
        weight_bytes(config, dtype) if weights is None else weights,
        kv_bytes_per_token(config, dtype),
        getattr(config, "max_position_embeddings", None),
    )


def gib(n: float) -> str:
    """Bytes for people: GiB with 2 decimals, MiB below a tenth of one."""
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB / 10 else f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class MemoryPlan:
    """One replica's bytes: its share of the device, and what each part of it holds.
    Draft fields are 0 without a draft model."""

    device_bytes: int
    gpu_memory_utilization: float  # the replica's share of the device
    budget: int  # gpu_memory_utilization x device_bytes
    available: int  # what the plan may fill: the budget, or less when less is free
    trainer_share: float  # the trainer's share of the same device (reported)
    trainer_bytes: int
    target_weights: int
    draft_weights: int
    in_use: int  # after the weights load: measured, else the weights
    target_kv_per_token: int
    draft_kv_per_token: int
    slots: int  # max_batch
    k: int
    max_model_len: int
    capacity: int  # positions per slot: max_model_len + step_lookahead(k)
    target_kv: int  # slots x capacity x target_kv_per_token
    draft_kv: int
    prefill: int  # one more slot's cache: a prompt's, prefilled before it is copied into its slot
    reserve: int  # activations, CUDA graphs, allocator slack
    context: int | None  # the target's
    reduced: bool  # max_model_len is the target's context, reduced to fit

    @property
    def total(self) -> int:
        return self.in_use + self.target_kv + self.draft_kv + self.prefill + self.reserve

    @property
    def headroom(self) -> int:
        return self.available - self.total

    def render(self) -> str:
        """The plan in a few lines, for the start-up log and `osd check`."""
        share = f"{self.gpu_memory_utilization:.2f} of the device's {gib(self.device_bytes)}"
        short = f" (only {gib(self.available)} of it can be had: the rest is not free)"
        draft = self.draft_kv_per_token > 0
        length = f"max_model_len {self.max_model_len}" + (
            f", the target's context {self.context} reduced to fit" if self.reduced else ""
        )
        lookahead = self.capacity - self.max_model_len
        kv = f"KV cache: {self.slots} slots x {self.capacity} positions ({length}, + {lookahead} lookahead): "
        kv += f"target {gib(self.target_kv)} ({self.target_kv_per_token / 1024:g} KiB a token)"
        weights = f"weights: target {gib(self.target_weights)}"
        if draft:
            weights += f", draft {gib(self.draft_weights)}"
            kv += f", draft {gib(self.draft_kv)} ({self.draft_kv_per_token / 1024:g} KiB a token)"
        if self.in_use != self.target_weights + self.draft_weights:
            weights += f"; in use after loading {gib(self.in_use)}"
        trainer = (
            f"trainer: {self.trainer_share:.2f} of the device, {gib(self.trainer_bytes)}"
            if self.trainer_share
            else "trainer: no share of this device"
        )
        return "\n".join((
            f"replica: {gib(self.budget)}, {share}" + (short if self.available < self.budget else ""),
            weights,
            kv,
            f"prefill {gib(self.prefill)} (one slot more), activations and graphs {gib(self.reserve)}",
            trainer,
            f"total: {gib(self.total)} of {gib(self.available)} ({gib(self.headroom)} to spare)",
        ))  # fmt: skip


def plan_memory(
    target: ModelSize,
    draft: ModelSize | None = None,
    *,
    device_bytes: int,
    max_batch: int,
    k: int,
    max_model_len: int | None = None,
    gpu_memory_utilization: float = SERVING_MEMORY_FRACTION,
    trainer_share: float = 0.0,
    in_use: int | None = None,
    free_bytes: int | None = None,
) -> MemoryPlan:
    """The plan for `max_batch` slots of `max_model_len` tokens (+ step_lookahead(k) positions) on a
    device of `device_bytes`, or MemoryPlanError. `in_use`: bytes in use after both models' weights
    loaded (default: their weights). `free_bytes`: what the device has free after loading, when
    measured; the plan then fits in it too (another process may hold part of the replica's share).
    max_model_len None: the target's context, reduced to fit if need be."""
    if device_bytes < 1 or max_batch < 1 or k < 0 or (max_model_len is not None and max_model_len < 1):
        raise ValueError(
            f"need device_bytes >= 1, max_batch >= 1, k >= 0 and max_model_len >= 1, "
            f"got {device_bytes}, {max_batch}, {k}, {max_model_len}"
        )
    if not 0.0 < gpu_memory_utilization <= 1.0 or not 0.0 <= trainer_share < 1.0:
        raise ValueError(
            f"need 0 < gpu_memory_utilization <= 1 and 0 <= trainer_share < 1, "
            f"got {gpu_memory_utilization}, {trainer_share}"
        )
    if gpu_memory_utilization + trainer_share > 1.0 + 1e-9:
        raise MemoryPlanError(
            f"the replica's {gpu_memory_utilization:.2f} and the trainer's {trainer_share:.2f} of the device "
            f"add up to {gpu_memory_utilization + trainer_share:.2f}, more than the whole device; "
            f"at most {1 - trainer_share:.2f} is left for the replica"
        )
    context = target.context
    if max_model_len is None and context is None:
        raise ValueError("the target's config states no context length: give max_model_len")
    if max_model_len is not None and context is not None and max_model_len > context:
        raise ValueError(f"max_model_len {max_model_len} is beyond the target's context {context}")
    draft_weights, draft_per_token = (0, 0) if draft is None else (draft.weights, draft.kv_per_token)
    per_token = target.kv_per_token + draft_per_token  # a position in both caches
    used = target.weights + draft_weights if in_use is None else in_use
    budget = int(gpu_memory_utilization * device_bytes)
    available = budget if free_bytes is None else min(budget, used + free_bytes)
    reserve = int(ACTIVATION_RESERVE * budget)
    room = available - used - reserve  # for the slots and the prefill's copy of one
    lookahead = step_lookahead(k)

    def longest(slots: int) -> int:  # the largest max_model_len that fits `slots` slots
        return room // ((slots + 1) * per_token) - lookahead

    def most_slots(length: int) -> int:  # the largest max_batch that fits `length` tokens a slot
        return room // ((length + lookahead) * per_token) - 1

    def refuse(what: str, length: int) -> MemoryPlanError:
        need = (max_batch + 1) * (length + lookahead) * per_token
        fits = [f"max_model_len {n} at max_batch {max_batch}" for n in [longest(max_batch)] if n >= 1]
        fits += [f"max_batch {n} at max_model_len {length}" for n in [most_slots(length)] if n >= 1]
        device = (used + need) / (gpu_memory_utilization * (1 - ACTIVATION_RESERVE))
        fits.append(f"a device of {gib(device)} at gpu_memory_utilization {gpu_memory_utilization:.2f}")
        share = (
            "what the device has free" if available < budget
            else f"{gpu_memory_utilization:.2f} of {gib(device_bytes)}"
        )  # fmt: skip
        return MemoryPlanError(
            f"{what}: {max_batch} slots of {length} tokens (+ {lookahead} lookahead) and a prefill's copy "
            f"of one need {gib(need)} of KV cache ({per_token / 1024:g} KiB a token), but "
            f"{gib(max(room, 0))} is left of the replica's {gib(available)} ({share}) after "
            f"{gib(used)} of weights and {gib(reserve)} for activations; what fits: {' or '.join(fits)}"
        )

    minimal = min(MIN_MODEL_LEN, context or MIN_MODEL_LEN)
    if room < 0:
        raise refuse("the weights alone do not fit", max_model_len or minimal)
    reduced = False
    if max_model_len is not None:
        if longest(max_batch) < max_model_len:
            raise refuse("does not fit", max_model_len)
        length = max_model_len
    elif longest(max_batch) >= context:
        length = context
    elif longest(max_batch) >= minimal:
        length, reduced = longest(max_batch) // MIN_MODEL_LEN * MIN_MODEL_LEN, True
    else:
        raise refuse(f"not even {minimal} tokens a slot fit", minimal)
    capacity = length + lookahead
    return MemoryPlan(
        device_bytes=device_bytes, gpu_memory_utilization=gpu_memory_utilization, budget=budget,
        available=available, trainer_share=trainer_share, trainer_bytes=int(trainer_share * device_bytes),
        target_weights=target.weights, draft_weights=draft_weights, in_use=used,
        target_kv_per_token=target.kv_per_token, draft_kv_per_token=draft_per_token, slots=max_batch, k=k,
        max_model_len=length, capacity=capacity, target_kv=max_batch * capacity * target.kv_per_token,
        draft_kv=max_batch * capacity * draft_per_token, prefill=capacity * per_token, reserve=reserve,
        context=context, reduced=reduced,
    )  # fmt: skip


def loaded_size(model: PreTrainedModel) -> ModelSize:
    """A loaded model's sizes: its parameters' bytes as they are, its cache in its dtype."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return model_size(model.config, model.dtype, weights)


def plan_on_device(
    target: PreTrainedModel,
    draft: PreTrainedModel | None,
    *,
    max_batch: int,
    k: int,
    max_model_len: int | None = None,
    gpu_memory_utilization: float = SERVING_MEMORY_FRACTION,
    trainer_share: float = 0.0,
) -> MemoryPlan:
    """The plan for models just loaded on their CUDA device, measured there: the device's size and
    free memory (torch.cuda.mem_get_info), and what this process holds (the allocator's reserve)."""
    device = target.device
    free, total = torch.cuda.mem_get_info(device)
    return plan_memory(
        loaded_size(target), None if draft is None else loaded_size(draft),
        device_bytes=total, max_batch=max_batch, k=k, max_model_len=max_model_len,
        gpu_memory_utilization=gpu_memory_utilization, trainer_share=trainer_share,
        in_use=torch.cuda.memory_reserved(device), free_bytes=free,
    )  # fmt: skip
