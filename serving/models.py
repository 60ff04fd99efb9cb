"""Thin helpers over Hugging Face causal LMs: loading, context length, forward with a KV cache.

Everything model-specific the engine and the draft proposer need lives here, so both use
transformers' own cache API the same way and nothing is stashed on HF modules.
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.cache_utils import Cache

from serving.errors import ModelLoadError


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None picks CUDA when available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None picks bfloat16 on CUDA and float32 elsewhere; strings name torch dtypes ("float16")."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16' or 'float16'")
    return resolved


def load_causal_lm(name_or_path: str, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    """Load any AutoModelForCausalLM from a local directory or a hub id, ready for inference."""
    try:
        model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=dtype)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load a causal LM from {name_or_path!r}: {err}") from err
    return model.to(device).eval()


def context_length(model: PreTrainedModel) -> int | None:
    """The longest sequence the model's position scheme supports, when the config states one."""
    return getattr(model.config, "max_position_embeddings", None)


def vocab_size(model: PreTrainedModel) -> int:
    return model.get_output_embeddings().weight.shape[0]


def truncate_cache(cache: Cache, length: int) -> None:
    """Drop cached positions beyond `length` (transformers 5: crop takes a negative count)."""
    excess = cache.get_seq_length() - length
    if excess > 0:
        cache.crop(-excess)


@functools.cache
def _accepts_logits_to_keep(model_cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_cls.forward).parameters


def forward(
    model: PreTrainedModel, input_ids: torch.Tensor, cache: Cache, last_only: bool = False
) -> torch.Tensor:
    """Run ids [n] after the cached positions, appending them to `cache`; returns logits [n or 1, V]."""
    kwargs = {"logits_to_keep": 1} if last_only and _accepts_logits_to_keep(type(model)) else {}
    logits = model(input_ids=input_ids.unsqueeze(0), cache=cache, use_cache=True, **kwargs).logits[0]
    return logits[-1:] if last_only else logits


def forward_hidden(
    model: PreTrainedModel, input_ids: torch.Tensor, cache: Cache
) -> tuple[torch.Tensor, torch.Tensor]:
    """`forward`, also returning the final hidden states that the LM head reads: (logits [n, V],
    hidden [n, H]). Runs the base model and the LM head apart, so it fits models whose logits are
    the LM head of the last hidden state (Llama, Qwen, GPT-2, ...)."""
    hidden = model.base_model(input_ids=input_ids.unsqueeze(0), cache=cache, use_cache=True)
    hidden = hidden.last_hidden_state[0]  # [n, H]
    return model.get_output_embeddings()(hidden), hidden
