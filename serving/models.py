"""Thin helpers over Hugging Face causal LMs: loading, context length, and the two forwards the
engine and the draft proposer run: a prompt's prefill into a cache slot, and one batched step
over many sequences' slots (serving.kv).

Everything model-specific lives here, so both use transformers' cache API the same way and
nothing is stashed on HF modules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel

from serving.errors import ModelLoadError
from serving.kv import SlotCache, slot_attention
from serving.tree import node_depths, tree_visibility


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


def prefill(model: PreTrainedModel, cache: SlotCache, slot: int, input_ids: torch.Tensor) -> None:
    """Run ids [n] as a batch of one (no padding, the model's own causal mask) and store their
    keys and values in `slot`: a sequence's prompt, less the last token, when it joins."""
    dynamic = DynamicCache(config=model.config)
    model.base_model(input_ids=input_ids.unsqueeze(0), cache=dynamic, use_cache=True)
    cache.fill(slot, dynamic)


def forward_slots(
    model: PreTrainedModel,
    cache: SlotCache,
    slots: Sequence[int],
    inputs: Sequence[torch.Tensor],
    trees: Sequence[tuple[int, ...] | None] | None = None,
    tokens: int = 1,
    base: Callable | None = None,
    last_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of new tokens for many sequences: inputs[i] [n_i] after the cached positions
    of slots[i] (the cache's other rows run padding). A row with a tree (`trees[i]`, the parents
    of serving.tree) runs a root and its nodes, each at position root + depth, seeing its
    ancestors. n is the longest input, and at least `tokens` (the static layout's fixed verify
    width: one compiled graph); `base` replaces model.base_model (a compiled one). Lengths are
    not advanced: the caller commits what it keeps. Returns (logits [len(slots), n, V], hidden
    [len(slots), n, H]), row i valid up to n_i; with `last_only`, only at each row's last input
    (logits [len(slots), V], hidden [len(slots), H]: the LM head skips the rest).
    """
    device = model.device
    n = max(tokens, *(x.shape[0] for x in inputs))
    lengths = cache.prepare(n, device)  # [rows]
    rows = lengths.shape[0]
    ids = torch.zeros(rows, n, dtype=torch.long, device=device)
    depths = torch.arange(n, device=device).repeat(rows, 1)  # [rows, n]
    visible = torch.ones(n, n, dtype=torch.bool, device=device).tril().repeat(rows, 1, 1)  # [rows, n, n]
    for slot, x, parents in zip(slots, inputs, trees or [None] * len(slots), strict=True):
        ids[slot, : x.shape[0]] = x
        if parents is not None:
            depths[slot, : x.shape[0]] = torch.tensor((0, *node_depths(parents)), device=device)
            visible[slot, : x.shape[0], : x.shape[0]] = tree_visibility(parents).to(device)
    positions = lengths.unsqueeze(1) + depths
    if (limit := context_length(model)) is not None:
        positions = positions.clamp_max(limit - 1)  # padding past a row's end; its outputs are unused
    mask = slot_attention(lengths, visible, cache.window[1], model.dtype)
    out = (model.base_model if base is None else base)(
        input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
    )
    hidden = out.last_hidden_state[torch.tensor(list(slots), device=device)]  # [len(slots), n, H]
    if last_only:
        ends = torch.tensor([x.shape[0] - 1 for x in inputs], device=device)
        hidden = hidden[torch.arange(len(slots), device=device), ends]  # [len(slots), H]
    return model.get_output_embeddings()(hidden), hidden


def tree_support(model: PreTrainedModel) -> str | None:
    """None when `model` verifies trees exactly (a chain-shaped tree, run through a 4D mask with
    explicit positions, gives the logits of its plain causal forward); else the reason it does not."""
    ids = torch.arange(1, 4, device=model.device) % vocab_size(model)
    try:
        with torch.no_grad():
            chain = model(input_ids=ids.unsqueeze(0)).logits[0]
            cache = SlotCache(model.config)
            tree, _ = forward_slots(model, cache, [cache.acquire()], [ids], trees=[(-1, 0)])
    except (TypeError, ValueError, RuntimeError, IndexError) as err:
        return f"its forward refuses a 4D attention mask: {err}"
    if not torch.allclose(chain, tree[0], atol=1e-4):
        return "a 4D attention mask changes its logits"
    return None
