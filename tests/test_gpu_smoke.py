"""The GPU smoke script stays importable and sound without a GPU: its shapes are the sizes they
are named for (counted on the meta device), and its settings make a valid service config. The
whole script runs on a lent GPU machine (`python -m benchmarks.gpu_smoke`); `--device cpu` runs
it here with tiny shapes, by hand (minutes: it starts `osd serve`)."""

from __future__ import annotations

import pytest
import torch
import yaml
from transformers import LlamaForCausalLM

from benchmarks.gpu_smoke import llama_config, parser, serve_config
from deploy.ray_serve import ServiceConfig


@pytest.mark.parametrize("name,billions", [("1b", 1.04), ("68m", 0.068)])
def test_the_shapes_have_the_sizes_they_are_named_for(name, billions):
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(name))
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, rel=0.05)


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_its_serve_settings_are_a_valid_service_config(tmp_path, device):
    settings = yaml.safe_load(serve_config(tmp_path / "t", tmp_path / "d", device, tmp_path).read_text())
    config = ServiceConfig.from_args(settings)
    assert (config.device, config.learns, config.request_timeout) == (device, True, 300)
    if device == "cuda":  # the replica and the trainer share the card
        assert (config.replica_gpus, config.trainer_gpus) == (0.75, 0.25)
    assert parser().parse_args([]).device == "cuda"
