"""What the trainer trains, behind one interface: a draft model (all its weights, or a LoRA adapter
on it) or draft heads on the target's hidden states. The loop (`trainer.loop`) reads, gates,
publishes and rolls back the same way for both; a learner says how to build the module, score it
on traces, compute its loss and move its weights, and what the registry records of a version.

Sizes that fit beside serving: a draft trains in float32 (the master weights; the forward passes
may run under autocast, `autocast`), as a LoRA adapter once it has `lora_min_params` parameters,
and on at most `max_seq_len` tokens per trace. Heads hold the target's LM head and input
embeddings alone, read from its safetensors files (`load_lm_head`), never the whole target.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.utils import cached_file

from distill.acceptance import trace_acceptance
from distill.batches import make_batch
from distill.heads import DraftHeads, HeadsSpec, heads_batch, heads_loss, heads_rows
from distill.lora import LoraSpec, adapter_weights, load_adapter_weights, wrap_lora
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
    """A small causal LM trained on the target's logged top-K at every output position: all its
    weights, or a LoRA adapter (`config.lora`, or `LoraSpec()` for a draft of `lora_min_params`)."""

    def __init__(self, config: TrainerConfig, draft: str | Path):
        self.config, self.draft = config, str(draft)
        self.lora = config.lora or default_lora(config, AutoConfig.from_pretrained(self.draft))
        self.kind = "lora" if self.lora else "full"
        self.extra = {"lora": asdict(self.lora)} if self.lora else {}

    def build(self) -> torch.nn.Module:
        model = AutoModelForCausalLM.from_pretrained(self.draft, dtype=torch.float32)  # master weights
        return (wrap_lora(model, self.lora) if self.lora else model).to(self.config.device)

    def usable(self, trace: Trace) -> bool:
        return True

    def positions(self, trace: Trace) -> int:
        return int(make_batch([trace], self.config.max_seq_len).mask.sum())  # [1, L] -> those scored

    def loss(self, module: torch.nn.Module, traces: Sequence[Trace]) -> torch.Tensor:
        config = self.config
        rows = module.get_input_embeddings().weight.shape[0]  # fewer than the target's: serving.engine.vocab
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
        weights = adapter_weights(module) if self.lora else module.state_dict()
        return _on_cpu(weights)

    def load(self, module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
        if self.lora:
            load_adapter_weights(module, weights)
        else:
            module.load_state_dict(weights)


class HeadsLearner:
    """Draft heads over a frozen target's LM head and input embeddings (`load_lm_head`: those
    alone), trained on traces that logged the target's hidden states (a sampled fraction: the
    replicas' `hidden_fraction`); other traces are skipped."""

    def __init__(self, config: TrainerConfig, target: str | Path, spec: HeadsSpec):
        self.config, self.spec = config, spec
        self.lm_head, self.embeddings = (m.to(config.device) for m in load_lm_head(str(target)))
        self.kind, self.extra = "heads", {"heads": asdict(spec)}

    def build(self) -> DraftHeads:
        return DraftHeads(self.spec, self.lm_head, self.embeddings).to(self.config.device)

    def usable(self, trace: Trace) -> bool:
        return trace.hidden is not None and len(trace.output_ids) > self.spec.num_heads

    def positions(self, trace: Trace) -> int:
        return self._rows(trace) * self.spec.num_heads if self.usable(trace) else 0

    def _rows(self, trace: Trace) -> int:
        return heads_rows(len(trace.output_ids), self.spec.num_heads, self.config.max_seq_len)

    def loss(self, module: DraftHeads, traces: Sequence[Trace]) -> torch.Tensor:
        batch = heads_batch(traces, self.spec.num_heads, self.config.max_seq_len).to(self.config.device)
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
        batch = heads_batch(usable, k, self.config.max_seq_len).to(self.config.device)
        logits = module(batch.hidden, batch.following)  # [N, K, V]
        if greedy:
            per_row = (logits.argmax(-1) == batch.emitted).float().sum(-1)  # [N]
        else:
            per_row = topk_acceptance(logits, batch.top_ids, batch.top_logprobs).sum(-1)
        sums = iter(per_row.split([self._rows(t) for t in usable]))
        return [(float(next(sums).sum()), self.positions(t)) if self.usable(t) else (0.0, 0) for t in traces]

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


def autocast(config: TrainerConfig) -> contextlib.AbstractContextManager:
    """Forward passes in `config.autocast` on the trainer's device (the weights stay float32), or as
    they are when it is None."""
    dtype = config.autocast
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(config.device).type, dtype=dtype)


def default_lora(config: TrainerConfig, model_config: PretrainedConfig) -> LoraSpec | None:
    """`LoraSpec()` for a draft of at least `config.lora_min_params` parameters (counted on the meta
    device: nothing is allocated), else None (full fine-tuning); ValueError when such a draft lacks
    the modules that spec adapts."""
    if config.lora_min_params is None:
        return None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    params = sum(p.numel() for p in model.parameters())  # tied weights once
    if params < config.lora_min_params:
        return None
    spec = LoraSpec()
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if missing := sorted(set(spec.target_modules) - names):
        raise ValueError(
            f"a draft of {params:,} parameters trains a LoRA adapter by default (lora_min_params "
            f"{config.lora_min_params:,}), but {model_config.model_type} has no modules named {missing}: "
            "set the trainer's lora (its target_modules), or lora_min_params None for full fine-tuning"
        )
    return spec


def load_lm_head(target: str) -> tuple[nn.Module, nn.Embedding]:
    """The target's LM head and input embeddings, frozen, in float32, and nothing else of it: the
    model is built with empty parameters (`init_empty_weights`: buffers such as an embedding scale
    stay real) and only those two modules are read from its safetensors files, by parameter name.
    `target` is a local directory or a hub id, resolved as transformers resolves it. A tied LM
    head is the input embeddings' tensor, held once."""
    model_config = AutoConfig.from_pretrained(target)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(model_config)
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    names = {module: name for name, module in model.named_modules()}
    tied = model.get_expanded_tied_weights_keys(all_submodels=True)  # {target: source} tensor names
    tied |= {source: name for name, source in tied.items()}
    files = _safetensors_files(target)
    prefix = f"{model.base_model_prefix}."
    loaded: dict[str, nn.Parameter] = {}  # by checkpoint key: a tied pair shares one parameter
    for module in (embeddings, head):
        for param_name, _ in list(module.named_parameters(recurse=False)):
            name = f"{names[module]}.{param_name}"
            candidates = [n for n in (name, tied.get(name)) if n]
            keys = [k for n in candidates for k in (n, n.removeprefix(prefix))]
            key = next((k for k in keys if k in files), None)
            if key is None:
                raise ValueError(f"{target}: no tensor {name} in its safetensors files (looked for {keys})")
            if key not in loaded:
                with safe_open(files[key], framework="pt") as f:
                    loaded[key] = nn.Parameter(f.get_tensor(key).float(), requires_grad=False)
            setattr(module, param_name, loaded[key])
    return head.eval(), embeddings.eval()


def _safetensors_files(target: str) -> dict[str, str]:
    """Tensor name -> the safetensors file holding it, for a checkpoint of one file or of shards."""
    index = cached_file(target, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
    if index is not None:
        weight_map = json.loads(Path(index).read_text())["weight_map"]
        paths = {shard: cached_file(target, shard) for shard in set(weight_map.values())}
        return {name: paths[shard] for name, shard in weight_map.items()}
    single = cached_file(target, "model.safetensors", _raise_exceptions_for_missing_entries=False)
    if single is None:
        raise ValueError(
            f"{target} has no safetensors weights (model.safetensors or its index), which heads read"
        )
    with safe_open(single, framework="pt") as f:
        return dict.fromkeys(f.keys(), single)
