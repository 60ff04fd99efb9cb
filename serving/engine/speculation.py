"""How many tokens to draft in a step, from the load and the acceptance: pure functions.

The speedup model (DESIGN.md) for a batch: a step of b sequences drafting k tokens each costs
T(b, k) seconds, measured by the engine on whole steps (`StepCosts`: drafting, the verify
forward and the per-sequence work around them), and sequence i emits
E(alpha_i, k) = (1 - alpha_i^(k+1)) / (1 - alpha_i) tokens on average. `choose_k` picks the k in
0..k_max with the most expected tokens per second; k = 0 is plain decoding, so speculation is
chosen only where the model says it beats it, by `MARGIN`. alpha_i is a sequence's recent
acceptance (`AcceptanceEstimate`), started from the engine's running estimate, itself started optimistic
(0.8) so that a new draft is tried before it is judged. Both arms stay measured: when k = 0
wins, the engine still drafts one token every `PROBE_EVERY` steps, so that acceptance keeps
being measured (for this choice, and for the metrics and drift alerts operators watch) and a
draft that improves online gets its chance; when k > 0 wins, a plain step runs every
`PLAIN_EVERY` steps, so that the cost of plain steps follows the machine's load as the
speculative ones do.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

PROBE_EVERY = 64  # steps: a one-token draft for one sequence while the load says k = 0
PLAIN_EVERY = 16  # steps: a plain step while the load says k > 0 (it costs only the arms' gap)
MARGIN = 0.1  # to start speculating, it must promise this much more than plain decoding: the
# model's error, and the drafts catching up after plain steps, are not in it (the engine keeps
# speculating while it promises more than plain decoding at all)


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens one step emits on average when each draft is accepted with probability alpha."""
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def speedup_bound(alpha: float, k: int, c: float) -> float:
    """DESIGN.md's S = (1 - alpha^(k+1)) / ((1 - alpha)(k c + 1)) (Leviathan et al.): the speedup over
    plain decoding when verifying k drafts costs one target step and each draft step c of one."""
    return expected_tokens(alpha, k) / (k * c + 1)


@dataclass(frozen=True)
class StepCosts:
    """Measured seconds of whole decode steps (proposing, verifying, sampling, bookkeeping):
    seconds[i][k] for batches[i] sequences (ascending) drafting k tokens each."""

    batches: tuple[int, ...]
    seconds: tuple[tuple[float, ...], ...]

    @classmethod
    def measured(cls, batches: Sequence[int], seconds: Sequence[Sequence[float]]) -> StepCosts:
        """Costs from timings, made monotone (more drafts or sequences never cost less): the
        running maximum along k, then along batch sizes, so timing noise cannot invert them."""
        rows = [list(itertools.accumulate(row, max)) for row in seconds]
        columns = [list(itertools.accumulate(column, max)) for column in zip(*rows, strict=True)]
        return cls(tuple(batches), tuple(zip(*columns, strict=True)))

    def observe(self, batch: int, k: int, seconds: float, weight: float = 0.1) -> StepCosts:
        """These costs with one timed step of `batch` sequences drafting k blended in (`weight`),
        at the measured batch size nearest to `batch` (scaled there by the costs' own ratio): the
        costs follow what steps really take as contexts grow and the machine's load changes."""
        i = min(range(len(self.batches)), key=lambda j: abs(self.batches[j] - batch))
        scaled = seconds * self.seconds[i][k] / self.step_seconds(batch, k)
        rows = [list(row) for row in self.seconds]
        rows[i][k] = (1.0 - weight) * rows[i][k] + weight * scaled
        return StepCosts.measured(self.batches, rows)

    def step_seconds(self, batch: int, k: int) -> float:
        return _interpolate(self.batches, [row[k] for row in self.seconds], batch)

    @property
    def max_k(self) -> int:
        return len(self.seconds[0]) - 1

    @property
    def cost_ratio(self) -> float:
        """c of the speedup model, as measured at batch 1: a step's extra time per drafted token
        (drafting it and verifying it) over a plain step's time."""
        if self.max_k == 0:
            return 0.0
        plain = self.step_seconds(1, 0)
        return (self.step_seconds(1, self.max_k) - plain) / (self.max_k * plain)


def _interpolate(xs: Sequence[int], ys: Sequence[float], x: int) -> float:
    """Piecewise linear through (xs, ys), extended by the nearest segment beyond the ends."""
    if len(xs) == 1:
        return ys[0] * x / xs[0]
    i = min(max(bisect_left(xs, x), 1), len(xs) - 1)
    slope = (ys[i] - ys[i - 1]) / (xs[i] - xs[i - 1])
    return ys[i - 1] + slope * (x - xs[i - 1])


def choose_k(alphas: Sequence[float], k_max: int, costs: StepCosts, margin: float = MARGIN) -> int:
    """The k in 0..k_max (and within the measured costs) with the most expected tokens per second
    for a batch whose sequences accept at `alphas`; 0 (plain decoding) unless that k is expected
    to beat it by `margin`."""
    batch = len(alphas)
    if batch == 0:
        return 0

    def rate(k: int) -> float:
        return sum(expected_tokens(a, k) for a in alphas) / costs.step_seconds(batch, k)

    best = max(range(min(k_max, costs.max_k) + 1), key=rate)
    return best if rate(best) >= (1.0 + margin) * rate(0) else 0


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
