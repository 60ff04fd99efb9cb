"""The memory a model needs to serve, estimated from its config: weights and KV cache.

Pure functions of a Hugging Face config and a dtype, so any checkpoint's needs are known before
its weights are loaded (parameters are counted on the meta device, which allocates nothing).
`osd check` prints the estimate; it is where the engine's memory plan starts (DESIGN.md,
"Memory": a token budget of max model length x batch).

- weights: parameters x dtype bytes (unquantized; tied embeddings counted once);
- KV cache: each layer keeps a key and a value of kv_heads x head_dim per token, so a token costs
  2 x layers x kv_heads x head_dim x dtype bytes, and a batch of max_batch sequences of up to
  max_model_len tokens holds max_batch x max_model_len of them. Sliding-window layers and
  compressed caches are counted as full layers: an upper bound for those models.

Config names are read through the config's standard attribute map, so GPT-2's n_layer, n_head
and n_embd answer as num_hidden_layers, num_attention_heads and hidden_size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

GIB = 2**30


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


def kv_cache_bytes(config: PretrainedConfig, dtype: torch.dtype, max_batch: int, max_model_len: int) -> int:
    """The KV cache of max_batch sequences of max_model_len tokens each."""
    return kv_bytes_per_token(config, dtype) * max_batch * max_model_len


def parameter_count(config: PretrainedConfig) -> int:
    """Parameters of the causal LM `config` describes, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # shared (tied) parameters once


def weight_bytes(config: PretrainedConfig, dtype: torch.dtype) -> int:
    return parameter_count(config) * dtype.itemsize


@dataclass(frozen=True)
class ModelMemory:
    """One model's bytes: its weights, and its KV cache for the token budget."""

    weights: int
    kv_cache: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache


def model_memory(
    config: PretrainedConfig, dtype: torch.dtype, max_batch: int, max_model_len: int
) -> ModelMemory:
    return ModelMemory(weight_bytes(config, dtype), kv_cache_bytes(config, dtype, max_batch, max_model_len))


@dataclass(frozen=True)
class MemoryEstimate:
    """A replica's models for a token budget of max_batch x max_model_len (the draft caches the
    same sequences as the target). Activations, CUDA contexts and graphs are not in it."""

    dtype: torch.dtype
    max_batch: int
    max_model_len: int
    target: ModelMemory
    draft: ModelMemory | None = None

    @property
    def total(self) -> int:
        return self.target.total + (self.draft.total if self.draft else 0)


def estimate(
    target: PretrainedConfig,
    draft: PretrainedConfig | None,
    dtype: torch.dtype,
    max_batch: int,
    max_model_len: int,
) -> MemoryEstimate:
    """The memory of a target and an optional draft served in `dtype` for this token budget."""
    if max_batch < 1 or max_model_len < 1:
        raise ValueError(f"need max_batch >= 1 and max_model_len >= 1, got {max_batch}, {max_model_len}")
    draft_memory = None if draft is None else model_memory(draft, dtype, max_batch, max_model_len)
    return MemoryEstimate(
        dtype, max_batch, max_model_len, model_memory(target, dtype, max_batch, max_model_len), draft_memory
    )
