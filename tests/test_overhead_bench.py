"""`osd bench overhead` end to end on the tiny demo preset, with the trainer as a Ray actor."""

from __future__ import annotations

from benchmarks.overhead import PRESETS, main
from tiny_models import TINY_DEMO


def test_overhead_bench_alternates_a_paused_and_a_running_trainer(
    tiny_demo, ray_session, tmp_path, monkeypatch
):
    monkeypatch.setitem(PRESETS, "tiny", TINY_DEMO)
    args = ["--demo", "tiny", "--cache-dir", str(tiny_demo), "--pairs", "1", "--block", "4",
            "--warmup", "3", "--max-new-tokens", "8", "--k", "2", "--rate", "20"]  # fmt: skip
    report = main([*args, "--json", str(tmp_path / "overhead.json")])
    off, on = report["modes"]["off"], report["modes"]["on"]
    assert off["requests"] == on["requests"] == 4
    assert off["trainer_steps"] == 0  # paused: not one step while its block was served
    for mode in (off, on):
        assert 0 < mode["service"]["p50_ms"] <= mode["latency"]["p50_ms"]  # latency includes queueing
    assert set(report["inflation"]) == {"latency_p50", "latency_p99", "service_p50", "service_p99"}
    assert report["trainer_final"]["live_version"] == 1  # the base draft, published at start-up
    assert (tmp_path / "overhead.json").exists()
