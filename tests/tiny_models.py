"""Tiny random Hugging Face models (Llama, Qwen2, GPT-2) built with from_config, random draft heads
for them, and a tiny demo preset."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedModel, Qwen2Config

from deploy.demo.build import DemoPreset
from deploy.demo.corpus import CorpusSpec
from deploy.demo.pretrain import ModelSpec, TrainSpec
from distill.heads import DraftHeads, HeadsSpec

VOCAB = 128
CONTEXT = 256


def _config(arch: str, layers: int, hidden: int, vocab: int = VOCAB):
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab,
            n_embd=hidden,
            n_layer=layers,
            n_head=4,
            n_positions=CONTEXT,
            bos_token_id=1,
            eos_token_id=2,
        )
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    return cls(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def build(arch: str, layers: int, hidden: int, seed: int, vocab: int = VOCAB, init_std: float | None = None):
    """A tiny random model of the given architecture (float32, eval mode)."""
    torch.manual_seed(seed)
    config = _config(arch, layers, hidden, vocab)
    if init_std is not None:
        config.initializer_range = init_std
    return AutoModelForCausalLM.from_config(config).eval()


def perturbed(model: PreTrainedModel, scale: float, seed: int) -> PreTrainedModel:
    """A copy of `model` with relative Gaussian noise on every weight: a draft that is often right."""
    copy = AutoModelForCausalLM.from_config(model.config).eval()
    copy.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in copy.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * scale * param.std().nan_to_num(0.02))
    return copy


ARCHS = ("llama", "qwen2", "gpt2")


SMALL_CORPUS = CorpusSpec(max_train_chars=150_000, max_held_out_chars=30_000)

# The demo build through the same code path, a few steps only.
TINY_DEMO = DemoPreset(
    name="tiny",
    corpus=SMALL_CORPUS,
    vocab_size=384,
    target=ModelSpec(layers=1, hidden=32, heads=2, context=128),
    target_train=TrainSpec(domains=("prose", "python", "c"), steps=3, batch=2, block=32, warmup=1),
    draft=ModelSpec(layers=1, hidden=16, heads=2, context=128),
    draft_train=TrainSpec(domains=("prose",), steps=2, batch=2, block=32, warmup=1),
    eval_windows=2,
)


def random_heads(target, kind: str, seed: int = 0, num_heads: int = 3) -> DraftHeads:
    """Heads with random blocks, so that their guesses differ from the LM head's own."""
    heads = DraftHeads.for_target(HeadsSpec(kind, num_heads), target)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in heads.blocks:
            block.weight.copy_(torch.randn(block.weight.shape, generator=generator) * 0.3)
    return heads
