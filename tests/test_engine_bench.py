"""The engine benchmark (ours against HF generate and assisted generation) and the `osd` CLI."""

import json

import pytest

from benchmarks.engine import PRESETS, costed_speedup, parser, run
from benchmarks.engine import main as main_bench
from deploy.cli import main
from serving.engine.speculation import speedup_bound
from tiny_models import TINY_DEMO


def test_speedup_bound():
    assert speedup_bound(0.5, 1, 0.0) == pytest.approx(1.5)
    assert speedup_bound(0.0, 4, 0.1) == pytest.approx(1 / 1.4)
    assert speedup_bound(1.0, 3, 0.5) == pytest.approx(4 / 2.5)


def test_costed_speedup_interpolates_the_measured_verify_cost():
    verify = {0: 1.0, 1: 1.2, 3: 1.6}
    assert costed_speedup(2.0, 1.0, 0.25, verify) == pytest.approx(2.0 / (0.25 + 1.2))
    assert costed_speedup(2.0, 2.0, 0.0, verify) == pytest.approx(2.0 / 1.4)  # halfway from k=1 to k=3
    assert costed_speedup(1.0, 0.0, 0.3, verify) == pytest.approx(1.0)  # nothing drafted: an AR step
    assert costed_speedup(3.0, 3.0, 0.0, verify) == pytest.approx(3.0 / 1.6)


def test_bench_engine_writes_json(model_dirs, tmp_path):
    dirs = model_dirs["llama"]
    out = tmp_path / "bench.json"
    main(["bench", "engine", "--target", str(dirs["target"]), "--draft", str(dirs["near"]), "--k", "2",
          "--prompts", "2", "--prompt-len", "8", "--max-new-tokens", "12", "--repeats", "2",
          "--json", str(out)])  # fmt: skip
    (report,) = json.loads(out.read_text())["runs"]
    assert report["outputs_identical"] is True
    assert report["draft_cost_ratio_c"] > 0
    assert set(report["verify_cost_v"]) == {"0", "2"} and report["verify_cost_v"]["0"] == 1.0
    rows = {(row["decoding"], row["engine"], row["proposer"]): row for row in report["rows"]}
    methods = {("ours", "none"), ("ours", "ngram"), ("ours", "draft"), ("hf", "none"), ("hf", "draft")}
    assert set(rows) == {(decoding, *method) for decoding in ("greedy", "sampled") for method in methods}
    for row in rows.values():
        assert row["tokens"] == 24 and len(row["tokens_per_s_repeats"]) == 2
        assert min(row["tokens_per_s_repeats"]) <= row["tokens_per_s"] <= max(row["tokens_per_s_repeats"])
        if row["k"] == 0:
            assert row["speedup_vs_ar"] == 1.0 and row["acceptance_rate"] is None
        else:
            assert row["k"] == 2 and 0.0 <= row["acceptance_rate"] <= 1.0
            assert row["modelled_speedup"] > 0 and row["cost_ratio_c"] is not None
            assert row["costed_speedup"] > 0 and row["fraction_of_costed"] > 0
    ours, assisted = rows["greedy", "ours", "draft"], rows["greedy", "hf", "draft"]
    assert ours["acceptance_rate"] > 0.2  # the near draft agrees with its target often
    # Greedy, same draft, same k held fixed: HF assisted generation accepts exactly what we accept.
    assert assisted["acceptance_rate"] == ours["acceptance_rate"]
    assert assisted["mean_accepted_length"] == ours["mean_accepted_length"]
    assert rows["greedy", "ours", "ngram"]["cost_ratio_c"] == 0.0
    for decoding in ("greedy", "sampled"):
        assert set(report["speedup_vs_hf_assisted"][decoding]) == {"2"}
        assert set(report["speedup_vs_hf_generate"][decoding]) == {"ar", "best_spec", "best_spec_method"}


def test_run_takes_explicit_prompts(model_dirs):
    """A caller (the demo world) passes its own prompts; no draft means no draft or assisted rows."""
    args = parser().parse_args(
        [
            "--target",
            str(model_dirs["qwen2"]["target"]),
            "--k",
            "1",
            "--repeats",
            "1",
            "--max-new-tokens",
            "5",
            "--temperature",
            "0",
        ]
    )
    report = run(args, args.target, None, prompts=[[3, 4, 5, 3, 4], [7, 8]])
    assert report["prompts"] == 2 and report["prompt_len"] == 3.5
    assert {(r["decoding"], r["engine"], r["proposer"]) for r in report["rows"]} == {
        ("greedy", "ours", "none"),
        ("greedy", "ours", "ngram"),
        ("greedy", "hf", "none"),
    }
    assert report["outputs_identical"] is True
    assert report["draft"] is None and report["draft_cost_ratio_c"] is None
    assert report["speedup_vs_hf_assisted"] == {"greedy": {}}


def test_demo_pair_runs_initial_and_distilled_drafts_and_heads(tiny_demo, monkeypatch):
    """Without --target: the demo pair, held-out prompts, the initial draft with untrained heads and
    both trained offline on the domain (tiny preset for speed)."""
    monkeypatch.setitem(PRESETS, "tiny", TINY_DEMO)
    args = ["--demo", "tiny", "--cache-dir", str(tiny_demo), "--k", "1", "--prompts", "2", "--prompt-len",
            "12", "--max-new-tokens", "4", "--repeats", "1", "--temperature", "0.7"]  # fmt: skip
    initial, distilled = main_bench(args)["runs"]
    assert initial["draft"].endswith("draft") and distilled["draft"].endswith("draft-distilled-python")
    assert initial["heads"] == "untrained" and distilled["heads"].endswith("heads-distilled-python-hydra-k1")
    assert initial["target"] == distilled["target"] and initial["prompts"] == 2
    assert initial["outputs_identical"] and distilled["outputs_identical"]
    for run_ in (initial, distilled):
        # Both costs measured (timings: which is cheaper is the benchmark's finding, not a test's).
        assert run_["heads_cost_ratio_c"] > 0 and run_["draft_cost_ratio_c"] > 0
        heads = [r for r in run_["rows"] if r["proposer"] == "heads"]
        assert [r["decoding"] for r in heads] == ["greedy", "sampled"]
        assert all(r["cost_ratio_c"] == run_["heads_cost_ratio_c"] for r in heads)


def test_cli_rejects_unknown_commands(capsys):
    with pytest.raises(SystemExit):
        main(["serve-everything"])
    assert "invalid choice" in capsys.readouterr().err


def test_proposers_bench_runs_every_arm_on_every_workload_alike(tiny_demo, monkeypatch, tmp_path):
    """`osd bench proposers` on the tiny demo pair: every arm answers every workload as plain
    decoding does (the run stops otherwise); the controller's steps name their proposers."""
    monkeypatch.setitem(PRESETS, "tiny", TINY_DEMO)
    out = tmp_path / "proposers.json"
    main(["bench", "proposers", "--demo", "tiny", "--cache-dir", str(tiny_demo), "--k", "2", "--prompts", "2",
          "--concurrency", "1", "3", "--requests", "4", "--rounds", "1", "--max-tokens", "6", "--soak", "1",
          "--json", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    assert report["outputs_identical"] and report["controller_costs"]["verify"]["batches"] == [1, 2, 3]
    soak = report["soak"]  # a round of every workload, at least
    assert soak["requests"] >= 4 + 4 + 4 and soak["peak_tokens"] <= soak["budget_tokens"]
    assert soak["samples"][0]["documents"] <= soak["documents_held"] + soak["documents_evicted"]
    rows = {(r["workload"], r["clients"], r["arm"]): r for r in report["results"]}
    arms = ("plain", "ngram", "suffix", "draft", "heads", "controller")
    workloads = ("demo", "code-edits", "agent-loop")
    assert set(rows) == {(w, c, a) for w in workloads for c in (1, 3) for a in arms}
    for (_, _, arm), row in rows.items():
        assert row["tokens_per_s"] > 0 and row["tokens_per_step"] >= 1
        assert set(row["steps_by_proposer"]) <= {"none", "suffix", "draft", "heads", "ngram"}
        if arm == "plain":
            assert row["vs_plain"] == 1.0 and row["steps_by_proposer"] == {"none": 1.0}
