"""Greedy speculative decoding is token-identical to the target's own greedy `generate`."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from serving.engine.hf import SpecEngine
from serving.errors import InvalidRequestError
from tiny_models import ARCHS, VOCAB

MAX_NEW = 40
PROMPTS = [
    [5],  # a one-token prompt: nothing to prefill
    [3, 17, 17, 9, 41, 3, 17],
    torch.randint(3, VOCAB, (24,), generator=torch.Generator().manual_seed(0)).tolist(),
]


def hf_greedy(model_dir, prompt: list[int], max_new_tokens: int, eos: int | None = 2) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    model.generation_config.eos_token_id = eos  # None: never stop early
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def references(model_dirs):
    return {arch: [hf_greedy(model_dirs[arch]["target"], p, MAX_NEW) for p in PROMPTS] for arch in ARCHS}


@pytest.fixture(scope="module")
def acceptance_seen():
    """Accepted/drafted totals over the module, so we know partial acceptance was exercised."""
    totals = {"drafted": 0, "accepted": 0, "full_steps": 0, "partial_steps": 0}
    yield totals
    assert totals["partial_steps"] > 0 and totals["full_steps"] > 0, totals


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("k", [1, 3, 5, 8])
@pytest.mark.parametrize("proposer", ["draft", "ngram"])
def test_greedy_matches_hf_generate(model_dirs, references, acceptance_seen, arch, k, proposer):
    draft = model_dirs[arch]["near"] if proposer == "draft" else None
    engine = SpecEngine.from_pretrained(
        model_dirs[arch]["target"], draft=draft, proposer=proposer, num_speculative_tokens=k
    )
    for prompt, expected in zip(PROMPTS, references[arch], strict=True):
        result = engine.generate(prompt, MAX_NEW)
        assert result.token_ids == expected
        stats = result.stats
        acceptance_seen["drafted"] += stats.drafted
        acceptance_seen["accepted"] += stats.accepted
        acceptance_seen["full_steps"] += stats.accepted_per_position[-1] if stats.drafted else 0
        acceptance_seen["partial_steps"] += sum(
            d - a for d, a in zip(stats.drafted_per_position, stats.accepted_per_position, strict=True)
        )


@pytest.mark.parametrize("arch", ARCHS)
def test_null_proposer_is_plain_decoding(model_dirs, references, arch):
    engine = SpecEngine.from_pretrained(model_dirs[arch]["target"], proposer="none", num_speculative_tokens=4)
    for prompt, expected in zip(PROMPTS, references[arch], strict=True):
        result = engine.generate(prompt, MAX_NEW)
        assert result.token_ids == expected
        assert result.stats.drafted == 0 and result.stats.steps == len(expected)
        assert result.stats.mean_accepted_length == 1.0


def _self_draft_engine(model_dirs, arch: str, k: int) -> SpecEngine:
    """The target as its own draft: every draft is accepted, so stops land inside accepted drafts."""
    target = model_dirs[arch]["target"]
    return SpecEngine.from_pretrained(target, draft=target, num_speculative_tokens=k)


@pytest.mark.parametrize("arch", ARCHS)
def test_stop_token_inside_accepted_draft(model_dirs, arch):
    k, prompt = 5, PROMPTS[2]
    free_run = hf_greedy(model_dirs[arch]["target"], prompt, MAX_NEW, eos=None)
    # First position whose token is new and is not a bonus token (every (k+1)-th emitted token).
    position = next(i for i, t in enumerate(free_run) if t not in free_run[:i] and i % (k + 1) != k)
    stop = free_run[position]
    result = _self_draft_engine(model_dirs, arch, k).generate(prompt, MAX_NEW, stop_token_ids=[stop])
    assert result.token_ids == free_run[: position + 1]
    assert result.token_ids == hf_greedy(model_dirs[arch]["target"], prompt, MAX_NEW, eos=stop)
    assert result.finish_reason == "stop"
    assert result.stats.accepted == result.stats.drafted  # the stop arrived as an accepted draft token


@pytest.mark.parametrize("arch", ARCHS)
def test_max_new_tokens_reached_mid_draft(model_dirs, arch):
    k, prompt = 5, PROMPTS[1]
    free_run = hf_greedy(model_dirs[arch]["target"], prompt, MAX_NEW, eos=None)
    engine = _self_draft_engine(model_dirs, arch, k)
    for max_new in range(1, 2 * (k + 1) + 2):
        result = engine.generate(prompt, max_new, stop_token_ids=[])
        assert result.token_ids == free_run[:max_new]
        assert result.finish_reason == "length"
        assert result.stats.drafted == max_new - result.stats.steps  # never drafts past the budget


@pytest.mark.parametrize("arch", ARCHS)
def test_stream_yields_each_step_and_the_same_output(model_dirs, references, arch):
    engine = SpecEngine.from_pretrained(
        model_dirs[arch]["target"], draft=model_dirs[arch]["small"], num_speculative_tokens=3
    )
    for prompt, expected in zip(PROMPTS, references[arch], strict=True):
        steps = list(engine.stream(prompt, MAX_NEW))
        assert [t for step in steps for t in step.token_ids] == expected
        assert all(1 <= len(step.token_ids) <= 4 for step in steps)  # one step emits 1 to k + 1
        assert [step.generation is not None for step in steps] == [False] * (len(steps) - 1) + [True]
        assert steps[-1].generation.token_ids == expected and steps[-1].generation.stats.steps == len(steps)


def test_stream_checks_the_request_before_decoding_and_can_be_abandoned(model_dirs):
    engine = SpecEngine.from_pretrained(model_dirs["llama"]["target"], proposer="ngram")
    with pytest.raises(InvalidRequestError):
        engine.stream(PROMPTS[0], 0)  # raised by the call, not by the first iteration
    steps = engine.stream(PROMPTS[0], MAX_NEW, stop_token_ids=[])
    first = next(steps)
    steps.close()  # a client that went away: nothing more is decoded
    assert first.token_ids and first.generation is None
    with pytest.raises(StopIteration):
        next(steps)
