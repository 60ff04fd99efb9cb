"""`osd bench online` end to end on the tiny demo preset: serve, trace, train, score, plot."""

from __future__ import annotations

import json

import pytest

from benchmarks.online import PRESETS, parse_phases
from deploy.cli import main
from tiny_models import TINY_DEMO


def test_parse_phases():
    phases = parse_phases("prose:3, python:5")
    assert [(p.domain, p.requests) for p in phases] == [("prose", 3), ("python", 5)]


@pytest.mark.parametrize("proposer", ["draft", "hydra"])
def test_online_bench_scores_every_window_and_plots(tiny_demo, tmp_path, monkeypatch, proposer):
    monkeypatch.setitem(PRESETS, "tiny", TINY_DEMO)
    out = tmp_path / "online.json"
    args = ["--demo", "tiny", "--cache-dir", str(tiny_demo), "--phases", "prose:6,python:12",
            "--window", "6", "--max-new-tokens", "8", "--k", "2", "--gate-min-positions", "8",
            "--probe", "2", "--proposer", proposer]  # fmt: skip
    main(["bench", "online", *args, "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["proposer"] == proposer
    assert [w["requests"] for w in report["windows"]] == [6, 12, 18]
    assert [w["domain"] for w in report["windows"]] == ["prose", "python", "python"]
    for window in report["windows"]:
        for key in (
            "static",
            "online",
            "offline",
            "online_greedy",
            "offline_greedy",
            "served_acceptance_rate",
        ):
            assert 0.0 <= window[key] <= 1.0
    assert report["windows"][0]["online"] == report["windows"][0]["static"]  # nothing published yet
    assert [s["domain"] for s in report["phase_summary"]] == ["prose", "python"]
    assert all(e["event"] in ("publish", "rollback") for e in report["events"])
    summary = report["phase_summary"][1]
    assert summary["requests_to_recover"] in (6, 12)  # the window within 0.05 of the phase's plateau
    assert [(s["phase"], s["requests"], s["prompts"]) for s in report["speed"]] == [(0, 6, 2), (1, 18, 2)]
    for speed in report["speed"]:  # outputs agreed across drafts, or the probe would have raised
        assert set(speed["tokens_per_s"]) == {"no_speculation", "static", "online", "offline"}
        assert speed["tokens"] == 2 * 8 and speed["online_vs_static"] > 0
    assert out.with_suffix(".png").stat().st_size > 10_000
