"""Traces into batches, and the offline acceptance estimate against what the engine realises."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.acceptance import mean_acceptance, trace_acceptance
from distill.batches import make_batch
from distill.losses import topk_acceptance
from serving.engine.hf import SpecEngine
from serving.tracing import trace_of
from store.traces import Trace
from tiny_models import VOCAB


def simple_trace(prompt: list[int], output: list[int], top_k: int = 3) -> Trace:
    length = len(output)
    top_ids = np.stack([np.array(output)] + [np.array(output) + i for i in range(1, top_k)], axis=1)
    return Trace(
        request_id="x",
        time=0.0,
        domain="d",
        target_id="t",
        draft_versions=(),
        prompt_ids=np.array(prompt),
        output_ids=np.array(output),
        top_ids=top_ids,
        top_logprobs=np.log(np.full((length, top_k), 1 / top_k)),
        drafted=np.zeros(0, np.uint8),
        accepted=np.zeros(0, np.uint8),
    )


def test_batch_aligns_each_output_token_with_the_position_predicting_it():
    batch = make_batch(
        [simple_trace([5, 6, 7], [8, 9]), simple_trace([5], [10, 11, 12])], max_len=16, pad_id=0
    )
    assert batch.input_ids.tolist() == [[5, 6, 7, 8], [5, 10, 11, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch.mask.tolist() == [[False, False, True, True], [True, True, True, False]]
    assert batch.emitted[0, 2:].tolist() == [8, 9] and batch.emitted[1, :3].tolist() == [10, 11, 12]
    assert batch.top_ids[0, 2].tolist() == [8, 9, 10]


def test_long_sequences_keep_their_output_end():
    batch = make_batch([simple_trace(list(range(20, 30)), [40, 41, 42])], max_len=4)
    assert batch.input_ids.tolist() == [[28, 29, 40, 41]]
    assert batch.mask.tolist() == [[False, True, True, True]]
    cut_into_output = make_batch([simple_trace([1, 2], [40, 41, 42, 43, 44])], max_len=3)
    assert cut_into_output.input_ids.tolist() == [[41, 42, 43]]
    assert cut_into_output.emitted.tolist() == [[42, 43, 44]]


def test_batches_refuse_mixed_top_k_and_nothing():
    with pytest.raises(ValueError, match="top-K"):
        make_batch([simple_trace([1], [2], top_k=2), simple_trace([1], [2], top_k=3)], max_len=8)
    with pytest.raises(ValueError, match="at least one"):
        make_batch([], max_len=8)


def test_engine_logs_the_targets_top_k_at_each_output_position(model_dirs):
    dirs = model_dirs["llama"]
    engine = SpecEngine.from_pretrained(dirs["target"], draft=dirs["near"], num_speculative_tokens=3)
    prompt = [3, 17, 42, 5, 9]
    out = engine.generate(prompt, 12, stop_token_ids=[], top_logprobs=4)
    assert out.top_ids.shape == out.top_logprobs.shape == (12, 4)
    assert out.top_ids[:, 0].tolist() == out.token_ids  # greedy: the emitted token is the top-1
    with torch.no_grad():
        logits = engine.target(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1 : -1]
    reference = torch.log_softmax(logits, -1).topk(4)
    torch.testing.assert_close(out.top_logprobs, reference.values, atol=1e-4, rtol=1e-4)
    assert sum(out.stats.accepted_per_step) + len(out.stats.accepted_per_step) >= 12


def test_trace_acceptance_matches_what_the_engine_realises(model_dirs):
    """k = 1 at temperature 1: each step accepts its one draft with probability sum min(p, q) at
    that position, which the trace-based estimate computes from the logged full distribution."""
    dirs = model_dirs["llama"]
    engine = SpecEngine.from_pretrained(dirs["target"], draft=dirs["near"], num_speculative_tokens=1)
    draft = engine.proposer.model
    expected, realised, traces = [], [], []
    for seed in range(40):
        prompt = [3 + seed, 17, 42, 5]
        out = engine.generate(prompt, 48, temperature=1.0, seed=seed, stop_token_ids=[], top_logprobs=VOCAB)
        trace = trace_of(f"r{seed}", "test", "tiny", ("v1",), prompt, out, {"temperature": 1.0})
        traces.append(trace)
        batch = make_batch([trace], max_len=256)
        with torch.no_grad():
            per_position = topk_acceptance(draft(batch.input_ids).logits, batch.top_ids, batch.top_logprobs)[
                0
            ]
        step_starts = np.cumsum([0] + [a + 1 for a in out.stats.accepted_per_step[:-1]])
        for start, drafted, accepted in zip(
            step_starts, out.stats.drafted_per_step, out.stats.accepted_per_step, strict=True
        ):
            if drafted:
                expected.append(per_position[len(prompt) - 1 + start].item())
                realised.append(accepted)
    expected, realised = np.array(expected), np.array(realised)
    error = np.sqrt((expected * (1 - expected)).sum()) / len(expected)  # sd of the realised mean
    assert len(expected) > 800
    assert abs(realised.mean() - expected.mean()) < 4 * error, (realised.mean(), expected.mean(), error)
    # The batched estimate over all logged positions agrees with the per-trace one.
    overall = mean_acceptance(trace_acceptance(draft, traces, max_len=256, batch_size=5))
    assert 0.2 < overall < 1.0
    assert abs(overall - expected.mean()) < 0.1


def test_a_trace_needs_the_logged_top_k(model_dirs):
    engine = SpecEngine.from_pretrained(model_dirs["llama"]["target"])
    out = engine.generate([3, 4, 5], 4, stop_token_ids=[])
    with pytest.raises(ValueError, match="top_logprobs"):
        trace_of("r", "d", "t", ("v1",), [3, 4, 5], out, {})
