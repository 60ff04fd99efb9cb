"""A registry version's weights for a live draft or heads: a LoRA adapter merged into a copy of the
base draft, then checked against the module the weights go into. Pure of any engine: the HF engine
copies the result into its live draft, the vLLM engine sends it to its workers. `unshared` readies
weights for safetensors, which carries them to a worker or an engine process."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Literal

import torch

from distill.heads import HeadsSpec
from distill.lora import LoraSpec, merged_adapter
from serving.engine.proposers import DraftModelProposer, check_weights
from serving.errors import IncompatibleDraftError
from store.registry import DraftVersion


def version_weights(
    base: torch.nn.Module, meta: DraftVersion, weights: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A draft version's whole weights for a model shaped as `base` (left untouched): a LoRA
    adapter merged into a copy of it, else the version's weights as they are."""
    if meta.kind == "lora":
        return merged_adapter(copy.deepcopy(base), LoraSpec(**meta.extra["lora"]), weights).state_dict()
    return dict(weights)


def version_draft(
    base: torch.nn.Module, meta: DraftVersion, weights: Mapping[str, torch.Tensor]
) -> torch.nn.Module:
    """A draft version as a plain model, in a copy of `base` (IncompatibleDraftError or ValueError
    when its weights do not fit)."""
    model = copy.deepcopy(base)
    DraftModelProposer(model).load_weights(version_weights(base, meta, weights))
    return model.eval()


def checked_weights(
    base: torch.nn.Module | None,
    serves: Literal["draft", "heads"] | None,
    meta: DraftVersion,
    weights: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """`meta`'s whole weights for `base` (the host copy of a live draft or heads), checked;
    IncompatibleDraftError when the version is of another kind than what is served (heads for a
    draft, or the reverse), or does not fit."""
    if base is None or serves is None:
        raise IncompatibleDraftError(f"this engine serves no draft to load {meta.label} into")
    if serves == "heads":
        spec = base.spec
        if meta.kind != "heads" or HeadsSpec(**meta.extra.get("heads", {})) != spec:
            raise IncompatibleDraftError(f"this engine serves {spec}; {meta.label} is {meta.kind}")
        check_weights(base, weights, "heads")
        return dict(weights)
    if meta.kind == "heads":
        raise IncompatibleDraftError(f"this engine serves a draft model; {meta.label} is draft heads")
    whole = version_weights(base, meta, weights)
    check_weights(base, whole, "draft")
    return whole


def unshared(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`weights`, contiguous, as safetensors takes them: a tensor that shares storage with one
    before it (tied embeddings, as a merged LoRA draft's state_dict has them) is copied."""
    seen: set[int] = set()
    out = {}
    for name, tensor in weights.items():
        tensor = tensor.detach().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if storage in seen else tensor
        seen.add(storage)
    return out
