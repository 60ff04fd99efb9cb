"""Waiting in tests for what other threads and processes do.

A deadline here is a guard against a hang, never the assertion: it is generous (minutes), so that
a slow or busy machine only makes a test slower. What a test asserts is the state it waited for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

PATIENCE = 180.0  # seconds: far beyond what any wait takes on an idle 2-core machine


def wait_for(condition: Callable[[], T], timeout: float = PATIENCE, every: float = 0.02) -> T:
    """Poll `condition` until it returns something true, and return that; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"still waiting after {timeout:.0f} s for {condition}"
        time.sleep(every)
    return value
