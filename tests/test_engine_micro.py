"""The engine micro-benchmark and the `osd` CLI that fronts it."""

import json

import pytest

from benchmarks.engine_micro import modelled_speedup
from deploy.cli import main


def test_modelled_speedup():
    assert modelled_speedup(0.5, 1, 0.0) == pytest.approx(1.5)
    assert modelled_speedup(0.0, 4, 0.1) == pytest.approx(1 / 1.4)
    assert modelled_speedup(1.0, 3, 0.5) == pytest.approx(4 / 2.5)


def test_bench_engine_writes_json(model_dirs, tmp_path):
    dirs = model_dirs["llama"]
    out = tmp_path / "bench.json"
    main(["bench", "engine", "--target", str(dirs["target"]), "--draft", str(dirs["near"]), "--k", "2",
          "--prompts", "2", "--prompt-len", "8", "--max-new-tokens", "12", "--json", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    rows = {row["proposer"]: row for row in report["rows"]}
    assert set(rows) == {"none", "ngram", "draft"}
    assert rows["none"]["speedup_vs_ar"] == 1.0 and rows["none"]["tokens"] == 24
    assert rows["draft"]["acceptance_rate"] > 0.2  # the near draft agrees with its target often
    assert report["draft_cost_ratio_c"] > 0


def test_cli_rejects_unknown_commands(capsys):
    with pytest.raises(SystemExit):
        main(["serve-everything"])
    assert "invalid choice" in capsys.readouterr().err
