"""The replay buffer: traces waiting to be trained on, and those kept for replay.

Every new trace is trained on at least once: a batch takes untrained traces first (oldest first)
and fills up with replayed ones, drawn with weights that halve every `half_life` arrivals, and
multiplied by `boost` for traces of prioritised domains (those with a drift alert; their untrained
traces also go first). A batch of replayed traces alone comes only when asked: the trainer's
replay once new traces stop (scored on held-out traces between rounds), or a budget of steps.
The buffer keeps at most `cap` traces, evicting the oldest trained ones; the trainer reads from
the stream only while fewer than a batch of untrained traces wait, so untrained ones are never
evicted.
(OSD's research loop instead cleared its buffer every I requests.)
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from store.traces import Trace


@dataclass
class Entry:
    entry_id: bytes
    trace: Trace
    arrival: int
    trained: bool = False


class ReplayBuffer:
    def __init__(self, cap: int, half_life: int):
        self.cap, self.half_life = cap, half_life
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()  # arrival order
        self._arrivals = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def untrained(self) -> int:
        return sum(not e.trained for e in self._entries.values())

    def add(self, entry_id: bytes, trace: Trace) -> bool:
        """Add a trace; False (and nothing changes) when this stream id is already here."""
        if entry_id in self._entries:
            return False
        self._entries[entry_id] = Entry(entry_id, trace, self._arrivals)
        self._arrivals += 1
        while len(self._entries) > self.cap:
            oldest = next((e for e in self._entries.values() if e.trained), None)
            if oldest is None:
                break  # only untrained traces left: keep them
            del self._entries[oldest.entry_id]
        return True

    def batch(
        self,
        size: int,
        generator: torch.Generator,
        priority: frozenset[str] = frozenset(),
        boost: float = 1.0,
        replay_alone: bool = False,
    ) -> list[Entry]:
        """Up to `size` entries: untrained first (those of `priority` domains before the rest), then
        replayed by recency weight, times `boost` in `priority` domains. Empty when no untrained
        entry waits, unless `replay_alone`: replay alone would only overfit the past unless someone
        watches it (the trainer's held-out score between replay rounds) or asked for it (a budget)."""
        untrained = [e for e in self._entries.values() if not e.trained]
        chosen = sorted(untrained, key=lambda e: e.trace.domain not in priority)[:size]  # stable
        if not chosen and not replay_alone:
            return []
        replayable = [e for e in self._entries.values() if e.trained]
        if len(chosen) < size and replayable:
            ages = torch.tensor([self._arrivals - e.arrival for e in replayable], dtype=torch.float64)
            boosts = torch.tensor([boost if e.trace.domain in priority else 1.0 for e in replayable])
            weights = torch.pow(0.5, ages / self.half_life) * boosts
            count = min(size - len(chosen), len(replayable))
            picks = torch.multinomial(weights, count, replacement=False, generator=generator)
            chosen += [replayable[i] for i in picks.tolist()]
        return chosen

    def mark_trained(self, entries: list[Entry]) -> list[bytes]:
        """Mark entries trained; returns the stream ids trained for the first time."""
        first = [e.entry_id for e in entries if not e.trained]
        for entry in entries:
            entry.trained = True
        return first
