"""LoRA over a frozen base draft: only the adapter trains, and its weights round-trip."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.lora import LoraSpec, adapter_weights, load_adapter_weights, wrap_lora
from distill.losses import topk_loss, weighted_mean


def test_only_the_adapter_gets_gradients_and_its_weights_round_trip(model_dirs):
    base = AutoModelForCausalLM.from_pretrained(model_dirs["llama"]["small"])
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = wrap_lora(base, LoraSpec(rank=4, alpha=8))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    ids = torch.randint(0, 128, (2, 10))
    top_ids = torch.randint(0, 128, (2, 10, 4))
    loss = weighted_mean(
        topk_loss("fkl", model(input_ids=ids).logits, top_ids, torch.randn(2, 10, 4), ids), torch.ones(2, 10)
    )
    loss.backward()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    optimizer.step()
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        assert param.grad is None
        original = name.replace("base_model.model.", "").replace(".base_layer", "")
        torch.testing.assert_close(param, frozen[original], rtol=0, atol=0)

    weights = adapter_weights(model)
    size = sum(t.numel() * t.element_size() for t in weights.values())
    assert size < sum(t.numel() * t.element_size() for t in frozen.values()) / 5
    other = wrap_lora(
        AutoModelForCausalLM.from_pretrained(model_dirs["llama"]["small"]), LoraSpec(rank=4, alpha=8)
    )
    load_adapter_weights(other, weights)
    with torch.no_grad():
        torch.testing.assert_close(other(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(ValueError, match="differ"):
        load_adapter_weights(other, dict(list(weights.items())[1:]))
