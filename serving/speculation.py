"""How many tokens to draft in a step, from the load and the acceptance: pure functions.

The speedup model (DESIGN.md) for a batch: a step of b sequences drafting k tokens each costs
verify(b, k + 1) + k * draft(b) seconds (measured: `StepCosts`), and sequence i emits
E(alpha_i, k) = (1 - alpha_i^(k+1)) / (1 - alpha_i) tokens on average. `choose_k` picks the k in
0..k_max with the most expected tokens per second; k = 0 is plain decoding, so speculation is
chosen only where the model says it beats it. alpha_i is a sequence's recent acceptance
(`AcceptanceEstimate`), started from the engine's running estimate. When k = 0 wins, the engine
still drafts one token every `PROBE_EVERY` steps, so that acceptance keeps being measured (for
this choice, and for the metrics and drift alerts operators watch) and a draft that improves
online gets its chance.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

PROBE_EVERY = 32  # steps: a one-token draft when k = 0 was chosen


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens one step emits on average when each draft is accepted with probability alpha."""
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


@dataclass(frozen=True)
class StepCosts:
    """Measured seconds per step, by batch size b (ascending `batches`).

    verify[i][n - 1]: one target forward of n tokens for each of batches[i] sequences.
    draft[i]: one drafted token for each of batches[i] sequences.
    """

    batches: tuple[int, ...]
    verify: tuple[tuple[float, ...], ...]
    draft: tuple[float, ...]

    @classmethod
    def measured(
        cls, batches: Sequence[int], verify: Sequence[Sequence[float]], draft: Sequence[float]
    ) -> StepCosts:
        """Costs from timings, made monotone (more tokens or sequences never cost less): the
        running maximum along tokens, then along batch sizes, so timing noise cannot invert them."""
        rows = [list(itertools.accumulate(row, max)) for row in verify]
        columns = [list(itertools.accumulate(column, max)) for column in zip(*rows, strict=True)]
        return cls(
            tuple(batches),
            tuple(zip(*columns, strict=True)),
            tuple(itertools.accumulate(draft, max)),
        )

    def verify_seconds(self, batch: int, tokens: int) -> float:
        return _interpolate(self.batches, [row[tokens - 1] for row in self.verify], batch)

    def draft_seconds(self, batch: int) -> float:
        return _interpolate(self.batches, self.draft, batch)

    @property
    def max_k(self) -> int:
        return len(self.verify[0]) - 1


def _interpolate(xs: Sequence[int], ys: Sequence[float], x: int) -> float:
    """Piecewise linear through (xs, ys), extended by the nearest segment beyond the ends."""
    if len(xs) == 1:
        return ys[0] * x / xs[0]
    i = min(max(bisect_left(xs, x), 1), len(xs) - 1)
    slope = (ys[i] - ys[i - 1]) / (xs[i] - xs[i - 1])
    return ys[i - 1] + slope * (x - xs[i - 1])


def choose_k(alphas: Sequence[float], k_max: int, costs: StepCosts) -> int:
    """The k in 0..k_max (and within the measured costs) with the most expected tokens per second
    for a batch whose sequences accept at `alphas`."""
    batch = len(alphas)
    if batch == 0:
        return 0

    def rate(k: int) -> float:
        seconds = costs.verify_seconds(batch, k + 1) + k * costs.draft_seconds(batch)
        return sum(expected_tokens(a, k) for a in alphas) / seconds

    return max(range(min(k_max, costs.max_k) + 1), key=rate)


@dataclass
class AcceptanceEstimate:
    """Recent per-draft acceptance, as leading accepts and first rejections, decayed each step:
    a step that accepted a of d drafts saw a accepts, then one rejection when a < d."""

    accepted: float = 1.0
    rejected: float = 1.0
    decay: float = 0.9

    def update(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        self.accepted = self.decay * self.accepted + accepted
        self.rejected = self.decay * self.rejected + (accepted < drafted)

    @property
    def alpha(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def prior(self, weight: float = 2.0) -> AcceptanceEstimate:
        """A fresh estimate for a new sequence, worth `weight` observations at this one's alpha."""
        return AcceptanceEstimate(weight * self.alpha, weight * (1.0 - self.alpha), self.decay)
