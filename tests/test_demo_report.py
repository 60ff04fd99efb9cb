"""The demo's report (pure): windows per phase in finishing order, failures, events placed on the
request axis, the acceptance series, the requests per endpoint, the tables and the plot."""

from __future__ import annotations

import pytest
from rich.console import Console

from deploy.demo.client import Served
from deploy.demo.report import plot, speedup_summary, summarise, tables, window_stats
from deploy.demo.workloads import Phase


def served(
    index: int,
    phase: int,
    accepted: int,
    end: float,
    error: str | None = None,
    chat: bool = False,
    finish_reason: str = "length",
) -> Served:
    domain = ("prose", "python")[phase]
    return Served(index, phase, domain, (1, 2), start=end - 1.0, end=end, error=error,
                  draft_version="draft:v1", drafted=10, accepted=accepted, tokens=20, ttft=0.01, chat=chat,
                  finish_reason=None if error else finish_reason)  # fmt: skip


def test_windows_follow_the_finishing_order_and_failures_are_counted():
    log = [served(i, 0, 2, end=float(i)) for i in range(4)]
    # python: the late finishers accept more; request 7 finished first
    log += [served(4, 1, 1, 10.0), served(5, 1, 1, 11.0), served(6, 1, 9, 13.0), served(7, 1, 1, 9.5)]
    log += [served(8, 1, 9, 14.0), served(9, 1, 0, 15.0, error="APIConnectionError: boom")]
    events = [{"event": "publish", "version": 2, "previous": 1, "time": 11.5}]
    events += [{"event": "rollback", "version": 1, "previous": 2, "time": 14.5}]
    report = summarise(log, (Phase("prose", 4), Phase("python", 6)), 2, events, [], None)
    assert (report["requests"], report["failed"], report["errors"]) == (10, 1, ["APIConnectionError: boom"])
    prose, python = report["phases"]
    assert prose["first_window"]["acceptance"] == prose["last_window"]["acceptance"] == 0.2
    assert python["requests"] == 5
    assert python["first_window"]["acceptance"] == 0.1  # requests 7 and 4, the first to finish
    assert python["last_window"]["acceptance"] == 0.9
    assert (report["published"], report["rolled_back"]) == ([2], [2])
    assert [e["request"] for e in report["events"]] == [7, 9]  # finished before each event
    assert report["series"][0] == {"requests": 2, "phase": 0, "domain": "prose", "acceptance": 0.2}
    last = report["last_window"]
    assert last["tokens_per_s"] == pytest.approx(40 / 2.0) and last["latency_p99"] == 1.0


def test_window_stats_of_nothing_and_the_speedup_ratios():
    assert window_stats([]) == {"requests": 0}
    measured = {"prompts": 2, "tokens": 96, "tokens_per_s": {"no speculation": 100.0, "initial draft": 80.0,
                                                             "live draft": 125.0}}  # fmt: skip
    speedup = speedup_summary(measured, "v1", "draft:v4")
    assert (speedup["live_vs_ar"], speedup["initial_vs_ar"]) == (1.25, 0.8)


def test_tables_and_plot(tmp_path):
    log = [served(i, i // 4, 1 + i // 4, end=float(i)) for i in range(8)]
    report = summarise(log, (Phase("prose", 4), Phase("python", 4)), 2, [], [], None)
    console = Console(record=True, width=120)
    for table in tables(report):
        console.print(table)
    text = console.export_text()
    assert "python" in text and "+0.00" in text and "0.20" in text
    plot(report, tmp_path / "demo.png")
    assert (tmp_path / "demo.png").stat().st_size > 5_000


def test_chat_and_completion_requests_are_reported_apart():
    log = [served(i, i // 4, 1, end=float(i), chat=i % 4 == 3) for i in range(8)]
    log += [
        served(8, 1, 9, 8.0, chat=True, finish_reason="stop"),
        served(9, 1, 0, 9.0, error="boom", chat=True),
    ]
    report = summarise(log, (Phase("prose", 4), Phase("python", 6)), 2, [], [], None)
    chat, completions = report["endpoints"]["chat"], report["endpoints"]["completions"]
    assert (chat["requests"], chat["failed"], chat["stopped_early"]) == (4, 1, 1)
    assert chat["acceptance"] == round(11 / 30, 3) and chat["tokens_per_request"] == 20.0
    assert (completions["requests"], completions["failed"], completions["acceptance"]) == (6, 0, 0.1)
    console = Console(record=True, width=120)
    for table in tables(report):
        console.print(table)
    text = console.export_text()
    assert "ended early" in text and "│        chat │" in text
    only_completions = summarise(log[:3], (Phase("prose", 4),), 2, [], [], None)
    assert only_completions["endpoints"]["chat"]["requests"] == 0 and len(tables(only_completions)) == 2
