"""The per-step controller: which proposer drafts for each sequence, and how much. Pure functions.

A sequence has up to two proposers: its learnt one (a draft model, draft heads or n-grams; None
without one) and the suffix index (serving.engine.suffix), whose candidates cost nearly nothing to
propose and come with count-based confidences. Each step the engine gives `plan` every sequence's
`Options`: how many drafts it has room for, its learnt proposer's recent acceptance alpha, and its
suffix candidates' chances (`suffix_chances`: each candidate's confidence, at most the suffix
index's recent acceptance for that sequence to the power of the candidate's depth; both
acceptances are `AcceptanceEstimate`s, a new sequence's started from its domain's). `plan` answers
with a `Choice` per sequence: none (plain decoding), the learnt proposer drafting the step's k, or
the suffix index's m most likely candidates.

The speedup model (DESIGN.md), for a batch: sequence i emits E(alpha_i, k) = (1 - alpha_i^(k+1)) /
(1 - alpha_i) tokens on average with its learnt proposer, 1 + (the sum of its chosen candidates'
chances) with the suffix index, 1 with none. A step's rows are padded to its widest, so its seconds
depend on the most drafts any row verifies, n, as measured by `SpecEngine.calibrate` on whole steps
and kept current by live ones (`Costs`): `verify[b][n]` for b sequences verifying n drafts that cost
nothing to propose, `learnt[b][k]` for b sequences drafting k with the learnt proposer, whose own
cost is their difference. For each width n and k (0, or as much of n as k_max allows), every
sequence takes the option worth the most: its expected tokens, less, for the learnt proposer, its
share of the proposer's cost at plain decoding's rate; the (n, k) with the most tokens per second
wins. So a long, confident suffix match goes first (it costs almost nothing to propose), the learnt
proposer serves where the index has little, and a batch too full for speculation to pay decodes
plainly. The learnt proposer starts drafting only where it promises `MARGIN` more than plain
decoding (it catches up on what it missed).

Both arms stay measured: while plain decoding wins, every `PROBE_EVERY` steps one sequence in turn
drafts one token (acceptance keeps being measured, for this choice and for the metrics operators
watch, and a draft that improves online gets its chance); while speculation wins, a plain step runs
every `PLAIN_EVERY` steps, so that the cost of plain steps follows the machine's load too.
"""

from __future__ import annotations

import functools
import itertools
from bisect import bisect_left
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

PROBE_EVERY = 64  # steps: a one-token draft for one sequence while plain decoding wins
PLAIN_EVERY = 32  # steps: a plain step while speculation wins (it costs only the arms' gap)
MARGIN = 0.1  # for the learnt proposer to start drafting, it must promise this much more than plain
# decoding: the model's error, and the drafts catching up after plain steps, are not in it (the
# engine keeps speculating while it promises more than plain decoding at all)


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
        at the measured batch size nearest to `batch`: half of the blend moves that batch size's
        whole row (the level that load and longer contexts set for every k), half the step's own
        cell (its shape). The costs follow what steps really take as they change."""
        i = min(range(len(self.batches)), key=lambda j: abs(self.batches[j] - batch))
        step = 1.0 + weight / 2 * (seconds / self.step_seconds(batch, k) - 1.0)
        rows = [list(row) for row in self.seconds]
        rows[i] = [cell * step for cell in rows[i]]
        rows[i][k] *= step
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


@dataclass(frozen=True)
class Costs:
    """An engine's measured step costs: `verify` with drafts that cost nothing to propose (n = 0
    is plain decoding), `learnt` with its learnt proposer drafting (None without one)."""

    verify: StepCosts
    learnt: StepCosts | None = None

    @property
    def cost_ratio(self) -> float:
        """c of the learnt proposer (of verification alone without one)."""
        return (self.learnt or self.verify).cost_ratio

    def step_seconds(self, batch: int, width: int, groups: Sequence[int] = (), k: int = 0) -> float:
        """Seconds of a step of `batch` sequences whose widest row verifies `width` drafts, `groups`
        of them (one count per learnt proposer) having drafted k with their learnt proposer."""
        seconds = self.verify.step_seconds(batch, width)
        if self.learnt is not None and k:
            for size in groups:  # the learnt proposer's own cost
                seconds += max(0.0, self.learnt.step_seconds(size, k) - self.verify.step_seconds(size, k))
        return seconds

    def observe(self, batch: int, width: int, groups: Sequence[int], k: int, seconds: float) -> Costs:
        """These costs with one timed step blended in: a step that drafted with a learnt proposer
        corrects that proposer's cost by how far the step was from these costs' estimate (its
        catching up on tokens it missed included), a step that did not corrects verification's."""
        if self.learnt is None or not (groups and k):
            return Costs(self.verify.observe(batch, width, seconds), self.learnt)
        error = (seconds - self.step_seconds(batch, width, groups, k)) / len(groups)
        size = max(groups)
        return Costs(self.verify, self.learnt.observe(size, k, self.learnt.step_seconds(size, k) + error))


@dataclass(frozen=True)
class Options:
    """What one sequence may draft this step."""

    room: int  # the most drafts it can use (tokens left to generate, less one)
    alpha: float | None = None  # its learnt proposer's recent acceptance; None: it has none
    group: int = 0  # sequences of one group draft in one batched call of their learnt proposer
    chances: tuple[float, ...] = ()  # its suffix candidates' chances of acceptance, parents first


class Choice(NamedTuple):
    """What one sequence drafts this step: `tokens` from its learnt proposer (k) or the suffix
    index (its most likely candidates), or nothing."""

    proposer: Literal["none", "learnt", "suffix"]
    tokens: int = 0


NONE = Choice("none")


def expected(option: Options, choice: Choice) -> float:
    """Tokens the step emits on average for this sequence."""
    if choice.proposer == "learnt":
        return expected_tokens(option.alpha or 0.0, choice.tokens)
    if choice.proposer == "suffix":
        return 1.0 + sum(option.chances[: choice.tokens])
    return 1.0


def fixed(options: Sequence[Options], k: int) -> list[Choice]:
    """Without measured costs: each sequence drafts k with its learnt proposer, or all its suffix
    candidates where they promise more (or it has no learnt proposer)."""
    choices = []
    for option in options:
        learnt = Choice("learnt", min(k, option.room)) if option.alpha is not None else NONE
        suffix = Choice("suffix", len(option.chances))
        promising = option.alpha is None or expected(option, suffix) > expected(option, learnt)
        choices.append(suffix if option.chances and promising else learnt)
    return choices


def plan(options: Sequence[Options], k_max: int, costs: Costs, margin: float = MARGIN) -> list[Choice]:
    """The choices with the most expected tokens per second (module docstring); plain decoding
    unless they beat it by `margin`."""
    batch = len(options)
    learnt = costs.learnt is not None and any(option.alpha is not None for option in options)
    ks = range(1, min(k_max, costs.learnt.max_k) + 1) if learnt else range(0)
    widest = min(costs.verify.max_k, max([len(option.chances) for option in options] + list(ks), default=0))
    if widest == 0:
        return [NONE] * batch  # nothing to choose (and no batch at all)
    seconds = functools.cache(costs.step_seconds)  # each cost this plan reads, interpolated once
    plain = batch / seconds(batch, 0)
    price = {k: plain * (seconds(batch, k, (batch,), k) - seconds(batch, k)) / batch for k in (0, *ks)}
    rows = [_Row.of(option, ks) for option in options]
    most = sum(max(1.0, *row.drafted, row.suggested[-1]) for row in rows)  # every row's best, at no cost
    if most / seconds(batch, 1) < plain:  # not even the narrowest step can pay
        return [NONE] * batch
    best_rate, best = plain, (0, 0)
    for width in range(1, widest + 1):
        for k in {0, min(width, ks[-1]) if ks else 0}:  # learnt rows draft as much as the width allows
            choices = _assign(options, rows, width, k, price[k])
            tokens = sum(_tokens(row, choice) for row, choice in zip(rows, choices, strict=True))
            rate = tokens / seconds(batch, *shape(options, choices), k)
            if rate > best_rate:
                best_rate, best = rate, (width, k)
    width, k = best
    if best_rate < (1.0 + (margin if k else 0.0)) * plain:  # a draft must catch up after plain steps
        return [NONE] * batch
    return _assign(options, rows, width, k, price[k])


@dataclass(frozen=True)
class _Row:
    """A sequence's expected tokens by option: `drafted[k]` with its learnt proposer drafting k
    (none: empty), `suggested[m]` with its m most likely suffix candidates."""

    drafted: tuple[float, ...]
    suggested: tuple[float, ...]

    @classmethod
    def of(cls, option: Options, ks: range) -> _Row:
        drafted = ()
        if option.alpha is not None:
            drafted = tuple(expected_tokens(option.alpha, min(k, option.room)) for k in range(len(ks) + 1))
        return cls(drafted, tuple(itertools.accumulate(option.chances, initial=1.0)))


def _assign(
    options: Sequence[Options], rows: Sequence[_Row], width: int, k: int, row_price: float
) -> list[Choice]:
    """Each sequence's option worth the most in a step `width` drafts wide whose learnt rows draft
    k: its expected tokens, less `row_price` for a row its learnt proposer drafts."""
    choices = []
    for option, row in zip(options, rows, strict=True):
        choice, worth = NONE, 1.0
        if k and row.drafted and option.room and row.drafted[k] - row_price > worth:
            choice, worth = Choice("learnt", min(k, option.room)), row.drafted[k] - row_price
        m = min(len(row.suggested) - 1, width)
        if m and row.suggested[m] > worth:
            choice = Choice("suffix", m)
        choices.append(choice)
    return choices


def shape(options: Sequence[Options], choices: Sequence[Choice]) -> tuple[int, tuple[int, ...]]:
    """What a step with these choices costs by: its widest row's drafts, and how many rows each
    learnt proposer drafts for (ascending)."""
    groups = Counter(
        o.group for o, c in zip(options, choices, strict=True) if c.proposer == "learnt" and c.tokens
    )
    return max(c.tokens for c in choices), tuple(sorted(groups.values()))


def _tokens(row: _Row, choice: Choice) -> float:
    if choice.proposer == "learnt":
        return row.drafted[choice.tokens]
    return row.suggested[choice.tokens] if choice.proposer == "suffix" else 1.0


def suffix_chances(confidences: Sequence[float], depths: Sequence[int], alpha: float) -> tuple[float, ...]:
    """Suffix candidates' chances of acceptance: each one's confidence (the count model's), at
    most alpha (the sequence's measured per-token acceptance of suffix drafts) to the power of its
    depth: a match seen once is not trusted to its end."""
    return tuple(min(confidence, alpha**depth) for confidence, depth in zip(confidences, depths, strict=True))


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
