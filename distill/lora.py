"""LoRA adapters over a frozen base draft, through peft: wrap, read out and load adapter weights.

Training only an adapter keeps the base draft shared (one per server) and makes a published
version kilobytes to megabytes instead of a whole model. The registry stores the adapter's
tensors (`adapter_weights`) as kind "lora"; a server merges them into a copy of its base draft
(`merged_adapter`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import PreTrainedModel


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


def wrap_lora(draft: PreTrainedModel, spec: LoraSpec = LoraSpec()) -> PeftModel:
    """The draft with fresh LoRA adapters on spec.target_modules; only the adapters train. An LM
    head tied to the input embeddings is untied first when it is adapted, so that the adapter (and
    its merge) changes the output layer alone."""
    head = draft.get_output_embeddings()
    if "lm_head" in spec.target_modules and head.weight is draft.get_input_embeddings().weight:
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        draft.config.tie_word_embeddings = False
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        bias="none",
    )
    return get_peft_model(draft, config)


def adapter_weights(model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter's tensors only (what a registry version of kind "lora" holds)."""
    state = get_peft_model_state_dict(model, save_embedding_layers=False)  # the LoRA tensors alone
    return {name: t.detach().clone() for name, t in state.items()}


def load_adapter_weights(model: PeftModel, weights: dict[str, torch.Tensor]) -> None:
    """Replace the adapter's tensors; raises ValueError when they do not fit this adapter."""
    expected = get_peft_model_state_dict(model, save_embedding_layers=False)
    if set(weights) != set(expected):
        raise ValueError(f"adapter tensors differ: {sorted(set(weights) ^ set(expected))[:5]}")
    wrong = [n for n, t in weights.items() if t.shape != expected[n].shape]
    if wrong:
        raise ValueError(f"adapter tensors of the wrong shape: {wrong[:5]}")
    set_peft_model_state_dict(model, weights)


def merged_adapter(
    base: PreTrainedModel, spec: LoraSpec, weights: dict[str, torch.Tensor]
) -> PreTrainedModel:
    """`base` (changed in place) with a trained adapter merged into it: a plain model, as fast as
    the base at inference. Raises ValueError when the weights do not fit the spec."""
    model = wrap_lora(base, spec)
    load_adapter_weights(model, weights)
    return model.merge_and_unload()
