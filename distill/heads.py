"""Draft heads: small modules on the target's last hidden state that guess the tokens after the next.

At position t the target's final hidden state h_t [H] gives, through its LM head, the next token
x_{t+1}. Head i (1-based) guesses x_{t+1+i} from the same h_t:

- **Medusa** (Cai et al., 2024): K independent heads, each a residual block
  h_t + SiLU(W_i h_t) followed by the target's own LM head.
- **Hydra** (Ankner et al., 2024): head i also reads the input embeddings of the tokens before
  its guess, x_{t+1} .. x_{t+i} (the target's own next token, then the guesses of heads < i):
  h_t + SiLU(W_i [h_t; e(x_{t+1}); ...; e(x_{t+i})]), then the LM head. Heads are thus
  sequentially dependent.

The target's LM head and input embeddings are shared and frozen: they are held by reference, not
registered, so `state_dict()` (what the registry stores, as safetensors) holds only the heads' own
weights. Training feeds the tokens that really followed (teacher forcing); drafting feeds the
heads' own guesses. `heads_batch` turns traces that logged the target's hidden states into
training rows, `heads_loss` distils every head from the target's logged top-k at the position it
guesses, and `heads_acceptance` scores them for the gate. Shapes: N rows (positions), H hidden,
V vocabulary, K heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from distill.batches import TraceLike
from distill.losses import LossName, topk_acceptance, topk_loss

HeadsKind = Literal["medusa", "hydra"]


@dataclass(frozen=True)
class HeadsSpec:
    kind: HeadsKind = "medusa"
    num_heads: int = 3  # K: the most tokens one step can draft

    def __post_init__(self):
        if self.kind not in ("medusa", "hydra"):
            raise ValueError(f"heads kind must be 'medusa' or 'hydra', got {self.kind!r}")
        if self.num_heads < 1:
            raise ValueError(f"num_heads must be at least 1, got {self.num_heads}")


def heads_spec(proposer: str | None, k: int) -> HeadsSpec | None:
    """The heads a proposer name stands for ("medusa" or "hydra": one head per draft token), else None."""
    return HeadsSpec(proposer, max(1, k)) if proposer in ("medusa", "hydra") else None


class DraftHeads(nn.Module):
    """K Medusa or Hydra heads over a target's hidden size; see the module docstring."""

    def __init__(self, spec: HeadsSpec, lm_head: nn.Module, embeddings: nn.Embedding):
        super().__init__()
        self.spec = spec
        hidden = embeddings.embedding_dim
        self._shared = (lm_head, embeddings)  # a tuple: not registered, not in state_dict
        widths = [hidden * (1 + (i + 1 if spec.kind == "hydra" else 0)) for i in range(spec.num_heads)]
        self.blocks = nn.ModuleList(nn.Linear(width, hidden) for width in widths)
        for block in self.blocks:  # start as the identity: each head first guesses as the LM head does
            nn.init.zeros_(block.weight)
            nn.init.zeros_(block.bias)

    @classmethod
    def for_target(cls, spec: HeadsSpec, target: nn.Module) -> DraftHeads:
        """Heads sharing `target`'s LM head and input embeddings, on its device and dtype."""
        lm_head, embeddings = target.get_output_embeddings(), target.get_input_embeddings()
        return cls(spec, lm_head, embeddings).to(lm_head.weight.device, lm_head.weight.dtype)

    def like(self) -> DraftHeads:
        """Fresh (untrained) heads of the same spec over the same shared target modules."""
        lm_head = self._shared[0]
        return DraftHeads(self.spec, *self._shared).to(lm_head.weight.device, lm_head.weight.dtype)

    def head(self, i: int, hidden: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
        """Head i's logits [N, V] from hidden [N, H] and the tokens before its guess, before [N, >= i]
        (x_{t+1} .. x_{t+i}; Medusa heads ignore them)."""
        lm_head, embeddings = self._shared
        inputs = hidden
        if self.spec.kind == "hydra":
            inputs = torch.cat([hidden, embeddings(before[:, : i + 1]).flatten(1)], dim=-1)  # [N, (i+2)H]
        return lm_head(hidden + nn.functional.silu(self.blocks[i](inputs)))

    def forward(self, hidden: torch.Tensor, following: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits of every head [N, K, V]: hidden [N, H], following [N, K] the tokens
        x_{t+1} .. x_{t+K} that really came after each position."""
        return torch.stack([self.head(i, hidden, following) for i in range(self.spec.num_heads)], dim=1)


@dataclass(frozen=True)
class HeadsBatch:
    """Training rows for K heads: one per logged output position t+1 of a trace whose hidden states
    were logged and that has K more positions after it. N rows, k logged top entries."""

    hidden: torch.Tensor  # [N, H] the state whose logits gave token x_{t+1}
    following: torch.Tensor  # [N, K] x_{t+1} .. x_{t+K}: what the heads read (Hydra)
    emitted: torch.Tensor  # [N, K] x_{t+2} .. x_{t+K+1}: what the heads guess
    top_ids: torch.Tensor  # [N, K, k] the target's logged top-k at each guessed position
    top_logprobs: torch.Tensor  # [N, K, k]

    def to(self, device: torch.device | str) -> HeadsBatch:
        return HeadsBatch(*(t.to(device) for t in vars(self).values()))


class NoHiddenStatesError(ValueError):
    """Head training was given traces without the target's hidden states."""


def heads_rows(output_len: int, num_heads: int, max_rows: int | None = None) -> int:
    """How many rows a trace of `output_len` tokens gives: its positions with all K guessed ones
    logged, the last `max_rows` of them at most."""
    rows = max(0, output_len - num_heads)
    return rows if max_rows is None else min(rows, max_rows)


def heads_batch(traces: Sequence[TraceLike], num_heads: int, max_rows: int | None = None) -> HeadsBatch:
    """The rows of every trace that carries hidden states (see HeadsBatch), the last `max_rows` of
    each at most (None: all); NoHiddenStatesError when none does."""
    with_hidden = [t for t in traces if getattr(t, "hidden", None) is not None]
    if not with_hidden:
        raise NoHiddenStatesError(
            f"none of the {len(traces)} traces carries the target's hidden states, which head training "
            "needs: set the replicas' hidden_fraction above 0"
        )
    rows: dict[str, list[np.ndarray]] = {k: [] for k in ("hidden", "following", "emitted", "ids", "logprobs")}
    for trace in with_hidden:
        n = len(trace.output_ids) - num_heads  # rows j = 0 .. n-1 have all K guessed positions logged
        if n <= 0:
            continue
        first = n - heads_rows(len(trace.output_ids), num_heads, max_rows)  # rows first .. n-1 are kept
        window = np.lib.stride_tricks.sliding_window_view
        rows["hidden"].append(np.asarray(trace.hidden[first:n], np.float32))
        rows["following"].append(window(trace.output_ids[: n - 1 + num_heads], num_heads)[first:])  # [n, K]
        rows["emitted"].append(window(trace.output_ids[1:], num_heads)[first:n])
        ids, logprobs = (
            window(a[1:], num_heads, axis=0)[first:n] for a in (trace.top_ids, trace.top_logprobs)
        )
        rows["ids"].append(ids.transpose(0, 2, 1))  # [n, K, k]
        rows["logprobs"].append(logprobs.transpose(0, 2, 1))
    if not rows["hidden"]:
        raise ValueError(f"no trace has more than {num_heads} output tokens")

    def cat(name: str, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(rows[name])).to(dtype)

    return HeadsBatch(
        hidden=cat("hidden", torch.float32),
        following=cat("following", torch.long),
        emitted=cat("emitted", torch.long),
        top_ids=cat("ids", torch.long),
        top_logprobs=cat("logprobs", torch.float32),
    )


def heads_loss(heads: DraftHeads, batch: HeadsBatch, loss: LossName = "fkl") -> torch.Tensor:
    """Mean loss of every head against the target's logged distribution at the position it guesses."""
    logits = heads(batch.hidden, batch.following)  # [N, K, V]
    return topk_loss(loss, logits, batch.top_ids, batch.top_logprobs, batch.emitted).mean()


@torch.no_grad()
def heads_acceptance(heads: DraftHeads, batch: HeadsBatch) -> torch.Tensor:
    """Each head's expected acceptance sum_x min(p_hat(x), q(x)) over the batch's rows -> [K]."""
    logits = heads(batch.hidden, batch.following)
    return topk_acceptance(logits, batch.top_ids, batch.top_logprobs).mean(0)
