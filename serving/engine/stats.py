"""Per-request speculative decoding statistics, in the terms DESIGN.md defines.

step: one target forward that verifies a proposal of k tokens (k may be 0: plain decoding).
acceptance rate: accepted / drafted. mean accepted length: (accepted + steps) / steps.
Counts are what verification decided, before output is cut at a stop token or the length limit.
Each step names the proposer that drafted it (draft, heads, ngram, suffix; none: it drafted nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecStats:
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    drafted_per_position: list[int] = field(default_factory=list)  # index i: draft position i+1
    accepted_per_position: list[int] = field(default_factory=list)
    drafted_per_step: list[int] = field(default_factory=list)  # index s: step s+1 (a trace logs these)
    accepted_per_step: list[int] = field(default_factory=list)
    proposer_per_step: list[str] = field(default_factory=list)

    def record(self, drafted: int, accepted: int, proposer: str = "draft") -> None:
        """Account one step that verified `drafted` tokens of `proposer` and accepted the first
        `accepted`."""
        if not 0 <= accepted <= drafted:
            raise ValueError(f"accepted ({accepted}) must be within 0..drafted ({drafted})")
        self.proposer_per_step.append(proposer if drafted else "none")
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted
        self.drafted_per_step.append(drafted)
        self.accepted_per_step.append(accepted)
        grow = drafted - len(self.drafted_per_position)
        if grow > 0:
            self.drafted_per_position.extend([0] * grow)
            self.accepted_per_position.extend([0] * grow)
        for i in range(drafted):
            self.drafted_per_position[i] += 1
            self.accepted_per_position[i] += int(i < accepted)

    @property
    def acceptance_rate(self) -> float:
        """alpha = accepted / drafted (0.0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """tau = (accepted + steps) / steps: tokens emitted per target forward (0.0 before any step)."""
        return (self.accepted + self.steps) / self.steps if self.steps else 0.0

    @property
    def acceptance_per_position(self) -> list[float]:
        """Rate at which draft position i (1..k) was accepted when drafted."""
        pairs = zip(self.accepted_per_position, self.drafted_per_position, strict=True)
        return [a / d if d else 0.0 for a, d in pairs]

    @property
    def by_proposer(self) -> dict[str, dict[str, int]]:
        """Steps, drafted and accepted tokens per proposer (none: the steps that drafted nothing)."""
        counts: dict[str, dict[str, int]] = {}
        steps = zip(self.proposer_per_step, self.drafted_per_step, self.accepted_per_step, strict=True)
        for name, drafted, accepted in steps:
            count = counts.setdefault(name, {"steps": 0, "drafted": 0, "accepted": 0})
            count["steps"] += 1
            count["drafted"] += drafted
            count["accepted"] += accepted
        return counts
