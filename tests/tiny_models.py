"""Tiny random Hugging Face models (Llama, Qwen2, GPT-2) built with from_config, random draft heads
for them, a tiny demo preset, and byte-level tokenizers with chat templates for saved pairs."""

from __future__ import annotations

from copy import deepcopy
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from deploy.demo.build import DemoPreset
from deploy.demo.corpus import CorpusSpec
from deploy.demo.pretrain import ModelSpec, TrainSpec
from deploy.demo.tokenizer import add_chat_template
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
    copy = AutoModelForCausalLM.from_config(deepcopy(model.config)).eval()  # its own, to resize freely
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
# The tiny demo with heads of 32 dimensions, the fewest vLLM's CPU attention serves.
VLLM_DEMO = replace(
    TINY_DEMO,
    name="tiny-vllm",
    target=ModelSpec(layers=1, hidden=32, heads=1, context=128),
    draft=ModelSpec(layers=1, hidden=32, heads=1, context=128),
)


def random_heads(target, kind: str, seed: int = 0, num_heads: int = 3) -> DraftHeads:
    """Heads with random blocks, so that their guesses differ from the LM head's own."""
    heads = DraftHeads.for_target(HeadsSpec(kind, num_heads), target)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in heads.blocks:
            block.weight.copy_(torch.randn(block.weight.shape, generator=generator) * 0.3)
    return heads


# Llama-3's layout of a conversation, written here: BOS, then a header and an end-of-turn per message.
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
ChatStyle = Literal["chatml", "llama3"]


def byte_tokenizer(style: ChatStyle) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens, no merges: any text round-trips) with a chat
    template: ChatML, as Qwen's (no BOS), or Llama-3's (a BOS the tokenizer adds to plain text too)."""
    bpe = Tokenizer(
        models.BPE(vocab={b: i for i, b in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, merges=[])
    )
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    if style == "chatml":
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
        add_chat_template(tokenizer)
        return tokenizer
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        extra_special_tokens=["<|start_header_id|>", "<|end_header_id|>"],
    )  # fmt: skip
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    tokenizer.chat_template = LLAMA3
    return tokenizer


def save_chat_pair(root: Path, style: ChatStyle, draft_rows: int | None = None) -> tuple[Path, Path]:
    """A tiny Llama target (the tokenizer's tokens plus padding rows, to 272) and a perturbed draft
    with `draft_rows` output rows (default: the target's; fewer: a padded-vocabulary pair), both
    saved with the tokenizer. Returns their directories."""
    tokenizer = byte_tokenizer(style)
    target = build("llama", layers=2, hidden=64, seed=40, vocab=272)
    target.generation_config.eos_token_id = tokenizer.eos_token_id
    draft = perturbed(target, 0.5, seed=41)
    if draft_rows is not None:
        draft.resize_token_embeddings(draft_rows)
    dirs = root / f"{style}-target", root / f"{style}-draft"
    for model, path in zip((target, draft), dirs, strict=True):
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return dirs
