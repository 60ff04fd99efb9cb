"""`osd bench e2e` on the tiny demo: osd serve with its trainer, requests over HTTP, a report."""

from __future__ import annotations

from benchmarks.e2e import PRESETS, main
from tiny_models import TINY_DEMO


def test_e2e_bench_serves_every_request_and_stops_the_server(tiny_demo, tmp_path, monkeypatch):
    monkeypatch.setitem(PRESETS, "tiny", TINY_DEMO)
    args = [
        "--demo",
        "tiny",
        "--cache-dir",
        str(tiny_demo),
        "--requests",
        "4",
        "--gap",
        "0",
        "--max-tokens",
        "8",
    ]
    report = main([*args, "--json", str(tmp_path / "e2e.json")])
    assert report["failed"] == 0 and report["server_exit_code"] == 0
    assert sum(v["requests"] for v in report["versions"]) == 4
    assert all(v["draft_version"].startswith("draft:") for v in report["versions"])
