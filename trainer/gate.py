"""Pure decisions: publish a candidate (the gate), keep or roll back a publish (the watch), and
stop replaying the buffer once new traces have stopped (`replay_stop`).

Gate: on the held-out traces of the last window, the candidate's expected acceptance must beat
the live version's by `margin` overall, with at least `min_positions` positions, and may not fall
more than `margin` below it on any domain held out as much (a handful of traces of a domain
that passed is noise, not a veto). Watch: after a publish, the live acceptance measured
by the servers on each domain is compared with the previous version's just before the swap;
when the drafted-weighted difference falls below -delta, roll back. Replay: rounds of replayed
steps go on while the held-out score keeps reaching new bests, up to a cap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class Tally:
    """Acceptance evidence: accepted (or summed expected acceptance) over positions (or drafted)."""

    accepted: float = 0.0
    positions: float = 0.0

    @property
    def rate(self) -> float | None:
        return self.accepted / self.positions if self.positions else None

    def __add__(self, other: Tally) -> Tally:
        return Tally(self.accepted + other.accepted, self.positions + other.positions)


@dataclass(frozen=True)
class GateDecision:
    publish: bool
    reason: str
    candidate: float | None
    live: float | None
    positions: int
    per_domain: dict[str, dict[str, float | None]] = field(default_factory=dict)

    def record(self) -> dict:
        """The numbers kept in the registry metadata."""
        return {
            "publish": self.publish,
            "reason": self.reason,
            "candidate": self.candidate,
            "live": self.live,
            "positions": self.positions,
            "per_domain": self.per_domain,
        }


def gate(
    candidate: dict[str, Tally], live: dict[str, Tally], margin: float, min_positions: int
) -> GateDecision:
    """Candidate and live expected acceptance per domain, on the same held-out positions."""
    total_c = sum(candidate.values(), Tally())
    total_l = sum(live.values(), Tally())
    positions = int(total_c.positions)
    per_domain = {
        d: {"candidate": candidate[d].rate, "live": live[d].rate, "positions": candidate[d].positions}
        for d in sorted(candidate)
    }

    def decision(publish: bool, reason: str) -> GateDecision:
        return GateDecision(publish, reason, total_c.rate, total_l.rate, positions, per_domain)

    if positions < min_positions:
        return decision(False, f"{positions} held-out positions, {min_positions} needed")
    gain = total_c.rate - total_l.rate
    if gain < margin:
        return decision(False, f"gain {gain:+.4f} below the margin {margin}")
    worse = [
        d for d, r in per_domain.items()
        if r["positions"] >= min_positions and r["candidate"] < r["live"] - margin
    ]  # fmt: skip
    if worse:
        return decision(False, f"worse than live on {', '.join(worse)}")
    return decision(True, f"gain {gain:+.4f} over live")


@dataclass(frozen=True)
class WatchVerdict:
    action: Literal["wait", "keep", "rollback"]
    reason: str
    baseline: float | None = None
    after: float | None = None


def watch(
    baseline: dict[str, Tally],
    after: dict[str, Tally],
    requests: dict[str, int],
    min_requests: int,
    delta: float,
) -> WatchVerdict:
    """Compare live acceptance after a publish with the previous version's, on the domains both saw.

    baseline, after: accepted over drafted per domain; requests: requests served since the swap.
    """
    domains = [d for d in after if d in baseline and baseline[d].positions and after[d].positions]
    if not domains or any(requests.get(d, 0) < min_requests for d in domains):
        return WatchVerdict("wait", f"waiting for {min_requests} requests per watched domain")
    weights = {d: after[d].positions for d in domains}
    total = sum(weights.values())
    before = sum(weights[d] * baseline[d].rate for d in domains) / total
    now = sum(weights[d] * after[d].rate for d in domains) / total
    if now < before - delta:
        return WatchVerdict(
            "rollback", f"acceptance {now:.3f} fell below baseline {before:.3f} - {delta}", before, now
        )
    return WatchVerdict("keep", f"acceptance {now:.3f} against baseline {before:.3f}", before, now)


def replay_stop(scores: Sequence[float], patience: int, max_rounds: int) -> str | None:
    """Why replaying the buffer should stop now, or None to go on for another round.

    scores: the candidate's held-out expected acceptance before replay (scores[0]) and after each
    round since. It stops once the best score (the first of equal ones: a tie is no gain) is
    `patience` rounds old, or after `max_rounds` rounds."""
    rounds = len(scores) - 1
    best = max(range(len(scores)), key=scores.__getitem__)
    if rounds - best >= patience:
        return f"no gain in {rounds - best} rounds, best {scores[best]:.4f} after round {best}"
    if rounds >= max_rounds:
        return f"{max_rounds} rounds, best {scores[best]:.4f} after round {best}"
    return None
