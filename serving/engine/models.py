"""Thin helpers over Hugging Face causal LMs: loading, context length, and the two forwards the
engine and the draft proposer run: a prompt's prefill into a cache slot, and one batched step
over many sequences' slots (serving.engine.kv).

Everything model-specific lives here, so both use transformers' cache API the same way and
nothing is stashed on HF modules. What differs between architectures is read from the config,
as transformers itself reads it: each layer's attention kind and sliding window (one 4D mask per
kind), and what the LM forward does to the logits after the LM head (`output_logits`). A model
is served only if the step forward, so built, gives its own forward's logits (`step_mismatch`,
checked at load); docs/models.md lists the architectures tested.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import transformers
from packaging.version import Version
from transformers import AutoModelForCausalLM, DynamicCache, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import get_layer_types_and_kwargs

from serving.engine.device import step_width
from serving.engine.kv import SlotCache, slot_attention
from serving.engine.tree import node_depths, tree_visibility
from serving.errors import ModelLoadError

# The forward keyword that takes a KV cache: transformers 5.24 renamed past_key_values to cache.
CACHE_KEYWORD = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"


def with_cache(cache: object) -> dict:
    """A model forward's keyword arguments that read and extend `cache`, for any transformers 5."""
    return {CACHE_KEYWORD: cache, "use_cache": True}


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
    model = model.to(device).eval()
    if reason := step_mismatch(model):
        raise ModelLoadError(f"{name_or_path!r} ({model.config.model_type}) cannot be served: {reason}")
    return model


def context_length(model: PreTrainedModel) -> int | None:
    """The longest sequence the model's position scheme supports, when the config states one."""
    return getattr(model.config, "max_position_embeddings", None)


def vocab_size(model: PreTrainedModel) -> int:
    return model.get_output_embeddings().weight.shape[0]


ATTENTION_KINDS = ("full_attention", "sliding_attention")  # the layer types the slot masks express


def attention_windows(config: PretrainedConfig) -> dict[str, int | None]:
    """Each kind of attention layer in the model (transformers' layer types) and its sliding
    window, None for full causal attention; ModelLoadError for a kind the engine cannot mask."""
    types, kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    unknown = sorted(set(types) - set(ATTENTION_KINDS))
    if unknown:
        raise ModelLoadError(f"layers of kind {unknown} are not supported; only {ATTENTION_KINDS}")
    return {kind: extra.get("sliding_window") for kind, extra in zip(types, kwargs, strict=True)}


def output_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """The logits [..., V] the model's LM forward makes of final hidden states [..., H]: its LM head,
    then the scaling its config names (Granite's logits_scaling, Cohere's logit_scale, Gemma 2's
    final_logit_softcapping), as that forward applies it."""
    config = model.config.get_text_config()
    logits = model.get_output_embeddings()(hidden)
    if (scaling := getattr(config, "logits_scaling", None)) is not None:
        logits = logits / scaling
    if (scale := getattr(config, "logit_scale", None)) is not None:
        logits = logits * scale
    if (cap := getattr(config, "final_logit_softcapping", None)) is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def prefill(model: PreTrainedModel, cache: SlotCache, slot: int, input_ids: torch.Tensor) -> None:
    """Run ids [n] as a batch of one (no padding, the model's own causal mask) and store their
    keys and values in `slot`: a sequence's prompt, less the last token, when it joins. The cache
    keeps every position in every layer (sliding windows are the masks' business), as the slot does."""
    dynamic = DynamicCache()
    model.base_model(input_ids=input_ids.unsqueeze(0), **with_cache(dynamic))
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
    of serving.engine.tree) runs a root and its nodes, each at position root + depth, seeing its
    ancestors. n is the longest input, and at least `tokens` (the static layout's fixed verify
    width), rounded up to a step width (serving.engine.device) with a static cache: a bounded set of
    compiled graphs; `base` replaces model.base_model (a compiled one). Lengths are
    not advanced: the caller commits what it keeps. Returns (logits [len(slots), n, V], hidden
    [len(slots), n, H]), row i valid up to n_i; with `last_only`, only at each row's last input
    (logits [len(slots), V], hidden [len(slots), H]: the LM head skips the rest).
    """
    device = model.device
    n = max(tokens, *(x.shape[0] for x in inputs))
    if cache.static:  # a bounded set of shapes: one compiled graph each
        n = step_width(n)
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
    masks = {
        kind: slot_attention(lengths, visible, cache.window[1], model.dtype, depths, window)
        for kind, window in attention_windows(model.config).items()
    }  # one [rows, 1, n, width] per kind; a model with several takes them by kind
    mask = masks if len(masks) > 1 else next(iter(masks.values()))
    out = (model.base_model if base is None else base)(
        input_ids=ids, attention_mask=mask, position_ids=positions, **with_cache(cache)
    )
    hidden = out.last_hidden_state[torch.tensor(list(slots), device=device)]  # [len(slots), n, H]
    if last_only:
        ends = torch.tensor([x.shape[0] - 1 for x in inputs], device=device)
        hidden = hidden[torch.arange(len(slots), device=device), ends]  # [len(slots), H]
    return output_logits(model, hidden), hidden


TREE_PROBE = (-1, -1, 1)  # two children of the root, the second with a child: depth != column


def step_mismatch(model: PreTrainedModel, parents: tuple[int, ...] | None = None) -> str | None:
    """None when the step forward gives the model's own logits; else how it does not.

    After a two-token prefill, forward_slots runs a root and three nodes: a chain (`parents`
    None) or the tree `parents`. Each one's logits must be those of the model's plain forward over
    the prompt and its path from the root, within a tolerance for the dtype."""
    ids = (torch.arange(6, device=model.device) * 7 + 3) % vocab_size(model)  # [prompt 2, root, 3 nodes]
    tree = parents or (-1, 0, 1)
    paths = [[0]]  # per row (root, then each node): the rows from the root to it
    for parent in tree:
        paths.append(paths[0 if parent < 0 else 1 + parent] + [len(paths)])
    try:
        with torch.no_grad():
            plain = torch.stack(
                [model(input_ids=torch.cat([ids[:2], ids[2:][path]])[None]).logits[0, -1] for path in paths]
            )
            cache = SlotCache(model.config)
            slot = cache.acquire()
            prefill(model, cache, slot, ids[:2])
            step, _ = forward_slots(model, cache, [slot], [ids[2:]], trees=[parents])
    except (ModelLoadError, TypeError, ValueError, RuntimeError, IndexError, KeyError) as err:
        return f"the step forward (4D attention masks, explicit positions, a slot cache) fails: {err}"
    plain, step = plain.float(), step[0].float()  # [4, V]
    tolerance = max(1e-4, 16 * torch.finfo(model.dtype).eps) * float(plain.abs().max())
    if not torch.allclose(step, plain, rtol=0.0, atol=tolerance):
        return f"the step forward changes its logits (by up to {float((step - plain).abs().max()):.3g})"
    return None


def tree_support(model: PreTrainedModel) -> str | None:
    """None when `model` verifies trees exactly (each node of a small tree, at position root +
    depth, seeing its ancestors, gets the logits of its path's plain forward); else the reason."""
    return step_mismatch(model, TREE_PROBE)
