"""The replay buffer: untrained traces first, recency-weighted replay, and the drift boost."""

from __future__ import annotations

import numpy as np
import torch

from store.traces import Trace
from trainer.buffer import ReplayBuffer


def trace(i: int, domain: str) -> Trace:
    return Trace(
        request_id=f"r{i}", domain=domain, target_id="t", draft_versions=("draft:v1",),
        prompt_ids=np.array([1, 2]), output_ids=np.array([3]), top_ids=np.zeros((1, 2), np.int32),
        top_logprobs=np.zeros((1, 2), np.float32), drafted=np.array([1]), accepted=np.array([0]), time=0.0,
    )  # fmt: skip


def filled(n: int = 200) -> ReplayBuffer:
    buffer = ReplayBuffer(cap=1_000, half_life=10_000)  # ages barely matter
    for i in range(n):
        buffer.add(f"{i}".encode(), trace(i, ["prose", "code"][i % 2]))
    return buffer


def test_untrained_traces_of_a_prioritised_domain_go_first():
    buffer = filled(20)
    assert [e.trace.domain for e in buffer.batch(10, torch.Generator())] == ["prose", "code"] * 5
    assert {e.trace.domain for e in buffer.batch(10, torch.Generator(), frozenset({"code"}))} == {"code"}


def test_replay_favours_prioritised_domains_by_the_boost():
    buffer = filled()
    buffer.mark_trained(buffer.batch(199, torch.Generator()))  # all but one trained: a batch replays
    generator = torch.Generator().manual_seed(0)
    picks = [
        e.trace.domain for _ in range(200) for e in buffer.batch(5, generator, frozenset({"code"}), 4.0)[1:]
    ]
    share = picks.count("code") / len(picks)
    assert 0.75 < share < 0.85  # 4 : 1 odds
    plain = [e.trace.domain for _ in range(200) for e in buffer.batch(5, generator)[1:]]
    assert 0.4 < plain.count("code") / len(plain) < 0.6


def test_replay_alone_comes_only_when_asked_for():
    buffer = filled(20)
    buffer.mark_trained(buffer.batch(20, torch.Generator()))
    assert buffer.untrained == 0 and buffer.batch(8, torch.Generator()) == []  # spare cycles: no step
    replayed = buffer.batch(8, torch.Generator().manual_seed(0), replay_alone=True)
    assert len(replayed) == len({e.entry_id for e in replayed}) == 8 and all(e.trained for e in replayed)
