"""What the trainer trains, behind one interface: a draft model (all its weights, or a LoRA adapter
on it) or draft heads on the target's hidden states. The loop (`trainer.loop`) reads, gates,
publishes and rolls back the same way for both; a learner says how to build the module, score it
on traces, compute its loss and move its weights, and what the registry records of a version.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

import torch
from transformers import AutoModelForCausalLM

from distill.acceptance import trace_acceptance
from distill.batches import make_batch
from distill.heads import DraftHeads, HeadsSpec, heads_batch, heads_loss
from distill.lora import adapter_weights, load_adapter_weights, wrap_lora
from distill.losses import token_weights, topk_acceptance, topk_loss, weighted_mean
from store.traces import Trace
from trainer.config import TrainerConfig


class Learner(Protocol):
    kind: str  # the registry's kind of a version: "full", "lora" or "heads"
    extra: dict  # what a server needs to rebuild a version besides its weights

    def build(self) -> torch.nn.Module:
        """A fresh module with the starting weights."""

    def usable(self, trace: Trace) -> bool:
        """Whether the trace can be trained and scored on."""

    def positions(self, trace: Trace) -> int:
        """How many positions `acceptance` scores the trace on (the gate's evidence), without a model."""

    def loss(self, module: torch.nn.Module, traces: Sequence[Trace]) -> torch.Tensor:
        """The training loss of `module` on usable traces."""

    def acceptance(
        self, module: torch.nn.Module, traces: Sequence[Trace], greedy: bool = False
    ) -> list[tuple[float, int]]:
        """Per trace: (summed expected acceptance, positions), as `distill.acceptance.trace_acceptance`;
        greedy: whether the module's argmax is the token the target emitted, instead."""

    def weights(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """What a version stores."""

    def load(self, module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None: ...


class DraftLearner:
    """A small causal LM trained on the target's logged top-K at every output position."""

    def __init__(self, config: TrainerConfig, draft: str | Path):
        self.config, self.draft = config, str(draft)
        self.kind = "lora" if config.lora else "full"
        self.extra = {"lora": asdict(config.lora)} if config.lora else {}

    def build(self) -> torch.nn.Module:
        model = AutoModelForCausalLM.from_pretrained(self.draft)
        return (wrap_lora(model, self.config.lora) if self.config.lora else model).to(self.config.device)

    def usable(self, trace: Trace) -> bool:
        return True

    def positions(self, trace: Trace) -> int:
        return int(make_batch([trace], self.config.max_seq_len).mask.sum())  # [1, L] -> those scored

    def loss(self, module: torch.nn.Module, traces: Sequence[Trace]) -> torch.Tensor:
        config = self.config
        rows = module.get_input_embeddings().weight.shape[0]  # fewer than the target's: serving.vocab
        batch = make_batch(list(traces), config.max_seq_len, vocab=rows).to(config.device)
        logits = module(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        weights = token_weights(
            config.selection, batch.mask, logits.detach(), batch.emitted, batch.top_logprobs
        )
        per_position = topk_loss(
            config.loss, logits, batch.top_ids, batch.top_logprobs, batch.emitted, config.jsd_beta
        )
        return weighted_mean(per_position, weights)

    def acceptance(
        self, module: torch.nn.Module, traces: Sequence[Trace], greedy: bool = False
    ) -> list[tuple[float, int]]:
        return trace_acceptance(module, list(traces), self.config.max_seq_len, greedy=greedy)

    def weights(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        weights = adapter_weights(module) if self.config.lora else module.state_dict()
        return _on_cpu(weights)

    def load(self, module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
        if self.config.lora:
            load_adapter_weights(module, weights)
        else:
            module.load_state_dict(weights)


class HeadsLearner:
    """Draft heads over a frozen target, trained on traces that logged the target's hidden states
    (a sampled fraction: the replicas' `hidden_fraction`); other traces are skipped."""

    def __init__(self, config: TrainerConfig, target: str | Path, spec: HeadsSpec):
        self.config, self.spec = config, spec
        self.target = AutoModelForCausalLM.from_pretrained(str(target)).eval().requires_grad_(False)
        self.target.to(config.device)
        self.kind, self.extra = "heads", {"heads": asdict(spec)}

    def build(self) -> DraftHeads:
        return DraftHeads.for_target(self.spec, self.target)

    def usable(self, trace: Trace) -> bool:
        return trace.hidden is not None and len(trace.output_ids) > self.spec.num_heads

    def positions(self, trace: Trace) -> int:
        k = self.spec.num_heads
        return (len(trace.output_ids) - k) * k if self.usable(trace) else 0

    def loss(self, module: DraftHeads, traces: Sequence[Trace]) -> torch.Tensor:
        batch = heads_batch(traces, self.spec.num_heads).to(self.config.device)
        return heads_loss(module, batch, self.config.loss)

    @torch.no_grad()
    def acceptance(
        self, module: DraftHeads, traces: Sequence[Trace], greedy: bool = False
    ) -> list[tuple[float, int]]:
        """Each trace's summed acceptance over its rows and heads (teacher-forced: head i reads the
        tokens that really came), from one batch of all of them; (0, 0) for a trace it cannot use."""
        k = self.spec.num_heads
        usable = [t for t in traces if self.usable(t)]
        if not usable:
            return [(0.0, 0)] * len(traces)
        batch = heads_batch(usable, k).to(self.config.device)
        logits = module(batch.hidden, batch.following)  # [N, K, V]
        if greedy:
            per_row = (logits.argmax(-1) == batch.emitted).float().sum(-1)  # [N]
        else:
            per_row = topk_acceptance(logits, batch.top_ids, batch.top_logprobs).sum(-1)
        sums = iter(per_row.split([len(t.output_ids) - k for t in usable]))
        return [
            (float(next(sums).sum()), (len(t.output_ids) - k) * k) if self.usable(t) else (0.0, 0)
            for t in traces
        ]

    def weights(self, module: DraftHeads) -> dict[str, torch.Tensor]:
        return _on_cpu(module.state_dict())

    def load(self, module: DraftHeads, weights: dict[str, torch.Tensor]) -> None:
        module.load_state_dict(weights)


def learner_for(config: TrainerConfig, base: str | Path) -> Learner:
    """Heads over the target `base` when `config.heads` is set, else the draft model `base`."""
    return HeadsLearner(config, base, config.heads) if config.heads else DraftLearner(config, base)


def _on_cpu(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of the weights on the CPU, whatever the trainer's device: what checkpoints and the
    registry store."""
    return {k: v.detach().to("cpu", copy=True) for k, v in weights.items()}
