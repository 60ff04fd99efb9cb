"""Pretraining and evaluating the demo models: token streams, random-window batches, AdamW, held-out numbers.

Small on purpose: the demo target trains in minutes on two CPU cores. Everything is seeded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from deploy.demo.corpus import Document
from distill.acceptance import expected_acceptance, greedy_agreement


@dataclass(frozen=True)
class ModelSpec:
    """A Llama-architecture model's shape."""

    layers: int
    hidden: int
    heads: int
    context: int = 512

    def config(self, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=self.hidden,
            intermediate_size=4 * self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            max_position_embeddings=self.context,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )


@dataclass(frozen=True)
class TrainSpec:
    """How long and how to train; `domains` are the corpus domains the model learns from."""

    domains: tuple[str, ...]
    steps: int
    batch: int = 16
    block: int = 256
    lr: float = 2e-3
    warmup: int = 30
    seed: int = 0


def token_streams(
    docs_by_domain: dict[str, list[Document]], tokenizer: PreTrainedTokenizerFast
) -> dict[str, torch.Tensor]:
    """Each domain's documents tokenized and joined, each followed by EOS -> {domain: ids [n]}."""
    streams = {}
    for domain, docs in docs_by_domain.items():
        encoded = tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"]
        ids = [t for doc_ids in encoded for t in (*doc_ids, tokenizer.eos_token_id)]
        streams[domain] = torch.tensor(ids, dtype=torch.long)
    return streams


def sample_batch(
    streams: Sequence[torch.Tensor], batch: int, block: int, generator: torch.Generator
) -> torch.Tensor:
    """Random windows of block+1 tokens, streams chosen uniformly per row -> ids [batch, block+1]."""
    rows = []
    which = torch.randint(len(streams), (batch,), generator=generator)
    for s in which.tolist():
        stream = streams[s]
        start = int(torch.randint(stream.numel() - block - 1, (1,), generator=generator))
        rows.append(stream[start : start + block + 1])
    return torch.stack(rows)


def learning_rate(step: int, spec: TrainSpec) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def pretrain(
    model: LlamaForCausalLM,
    streams: dict[str, torch.Tensor],
    spec: TrainSpec,
    on_step: Callable[[int, float], None] = lambda step, loss: None,
) -> float:
    """Train on windows from spec.domains' streams; return the mean loss of the last 20 steps."""
    generator = torch.Generator().manual_seed(spec.seed)
    chosen = [streams[d] for d in spec.domains]
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    recent: list[float] = []
    for step in range(spec.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, spec)
        ids = sample_batch(chosen, spec.batch, spec.block, generator)  # [batch, block+1]
        logits = model(input_ids=ids[:, :-1]).logits  # [batch, block, V]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent = (recent + [loss.item()])[-20:]
        on_step(step, recent[-1])
    model.eval()
    return sum(recent) / len(recent)


@torch.no_grad()
def target_continuations(
    target: PreTrainedModel, prompts: torch.Tensor, new_tokens: int, batch: int = 32
) -> torch.Tensor:
    """Greedy continuations of equal-length prompts [n, L] -> full sequences [n, L + new_tokens]."""
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    chunks = prompts.split(batch)
    return torch.cat(
        [target.generate(c, attention_mask=torch.ones_like(c), generation_config=config) for c in chunks]
    )


@dataclass(frozen=True)
class HeldOutReport:
    """Per-domain held-out numbers for a target and its draft.

    Losses are next-token losses on held-out text. Acceptance is measured where serving meets
    it: on the target's own greedy continuations of held-out prompts, at the output positions.
    """

    target_loss: dict[str, float]
    draft_loss: dict[str, float]
    expected_acceptance: dict[str, float]
    greedy_agreement: dict[str, float]


@torch.no_grad()
def evaluate(
    target: PreTrainedModel,
    draft: PreTrainedModel,
    streams: dict[str, torch.Tensor],
    windows: int,
    block: int,
    prompt_tokens: int = 32,
    new_tokens: int = 64,
) -> HeldOutReport:
    """Both models' held-out loss and the draft's expected acceptance on target outputs, per domain."""
    report: dict[str, dict[str, float]] = {"t": {}, "d": {}, "a": {}, "g": {}}
    for domain, stream in streams.items():
        generator = torch.Generator().manual_seed(1234)
        ids = sample_batch([stream], windows, min(block, stream.numel() - 2), generator)  # [windows, block+1]
        labels = ids[:, 1:].reshape(-1)
        for key, model in (("t", target), ("d", draft)):
            logits = model(input_ids=ids[:, :-1]).logits.flatten(0, 1)  # [windows * block, V]
            report[key][domain] = torch.nn.functional.cross_entropy(logits, labels).item()
        prompts = sample_batch([stream], windows, prompt_tokens - 1, generator)  # [windows, prompt_tokens]
        sequences = target_continuations(target, prompts, new_tokens)[:, :-1]
        outputs = slice(prompt_tokens - 1, None)  # positions that predict an output token
        t_logits = target(input_ids=sequences).logits[:, outputs]  # [windows, new_tokens, V]
        d_logits = draft(input_ids=sequences).logits[:, outputs]
        report["a"][domain] = expected_acceptance(t_logits, d_logits).mean().item()
        report["g"][domain] = greedy_agreement(t_logits, d_logits).mean().item()
    rounded = {key: {d: round(v, 4) for d, v in values.items()} for key, values in report.items()}
    return HeldOutReport(rounded["t"], rounded["d"], rounded["a"], rounded["g"])
