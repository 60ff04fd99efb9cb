"""The store benchmark end to end, at a size that runs in seconds."""

import json

from benchmarks.store_bench import main


def test_store_bench_reports_every_run(tmp_path):
    out = tmp_path / "store.json"
    report = main(
        [
            "--traces",
            "300",
            "--repeats",
            "3",
            "--rate",
            "2000",
            "--draft-mb",
            "0.2",
            "--registry-repeats",
            "2",
        ]
        + ["--json", str(out)]
    )
    assert json.loads(out.read_text())["append_burst"] == report["append_burst"]
    assert len(report["append_burst_written_per_s_runs"]) == len(report["append_paced_runs"]) == 3
    for run in (report["append_burst"], report["append_paced"], report["append_burst_wide_vocab"]):
        assert run["dropped"] == 0 and run["written_per_s"] > 0
    assert report["trace_bytes"]["wide_vocab"] > report["trace_bytes"]["vocab"]
    assert report["registry"]["load_ms"] > 0 and report["memory"]["traces_per_gb"] > 0
