"""Thin helpers over Hugging Face causal LMs: loading, context length, forward with a KV cache.

Everything model-specific the engine and the draft proposer need lives here, so both use
transformers' own cache API the same way and nothing is stashed on HF modules.
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer

from serving.errors import ModelLoadError
from serving.tree import node_depths, tree_attention


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


def forward_tree(
    model: PreTrainedModel, input_ids: torch.Tensor, cache: Cache, parents: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`forward_hidden` for a root token and the N tree nodes after it, input_ids [1 + N] (see
    serving.tree): each attends to the cache, its ancestors and itself, at position root + depth."""
    past = cache.get_seq_length()
    positions = torch.tensor([[past + d for d in (0, *node_depths(parents))]], device=input_ids.device)
    mask = tree_attention(parents, past, model.dtype, input_ids.device)
    out = model.base_model(
        input_ids=input_ids.unsqueeze(0), attention_mask=mask, position_ids=positions, cache=cache,
        use_cache=True,
    )  # fmt: skip
    hidden = out.last_hidden_state[0]  # [1 + N, H]
    return model.get_output_embeddings()(hidden), hidden


def keep_cache_positions(cache: Cache, keep: torch.Tensor) -> None:
    """Keep only the cached positions `keep` [n] (ascending), in that order: after a tree
    verification, the sequence's and the accepted path's."""
    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            raise TypeError(f"cannot select positions of a {type(layer).__name__} cache layer")
        layer.keys = layer.keys.index_select(-2, keep)
        layer.values = layer.values.index_select(-2, keep)


def tree_support(model: PreTrainedModel) -> str | None:
    """None when `model` verifies trees exactly (a 4D mask with explicit positions gives the logits
    of the plain causal forward on a chain-shaped tree); else the reason it does not."""
    ids = torch.arange(1, 4, device=model.device) % vocab_size(model)
    try:
        with torch.no_grad():
            chain = forward(model, ids, DynamicCache(config=model.config))
            tree, _ = forward_tree(model, ids, DynamicCache(config=model.config), parents=(-1, 0))
    except (TypeError, ValueError, RuntimeError) as err:
        return f"its forward refuses a 4D attention mask: {err}"
    if not torch.allclose(chain, tree, atol=1e-4):
        return "a 4D attention mask changes its logits"
    return None
