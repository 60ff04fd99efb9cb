"""The GPU benchmark stays importable and its model shapes are the ones it names (counted on the
meta device: no memory, no GPU). It runs only on a lent GPU machine, never here."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from benchmarks.gpu_bench import llama_config, parser


@pytest.mark.parametrize("name,billions", [("7b", 6.74), ("68m", 0.068), ("160m", 0.162)])
def test_the_shapes_have_the_sizes_they_are_named_for(name, billions):
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(name))
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, rel=0.02)


def test_the_defaults_are_the_issue_s_settings():
    args = parser().parse_args([])
    assert (args.alpha, args.k, args.context) == (0.75, 5, 512)
