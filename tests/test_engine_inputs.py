"""Loading through the real path, and bad input that must fail with a typed, clear error."""

from __future__ import annotations

import pytest
import torch

from serving.engine.hf import SpecEngine
from serving.engine.proposers import DraftModelProposer, NgramProposer, NullProposer
from serving.errors import IncompatibleDraftError, InvalidRequestError, ModelLoadError
from tiny_models import CONTEXT, VOCAB, build


@pytest.fixture(scope="module")
def engine(model_dirs):
    return SpecEngine.from_pretrained(
        model_dirs["llama"]["target"], draft=model_dirs["llama"]["small"], num_speculative_tokens=3
    )


def test_from_pretrained_picks_proposers(model_dirs):
    dirs = model_dirs["qwen2"]
    assert isinstance(
        SpecEngine.from_pretrained(dirs["target"], draft=dirs["small"]).proposer, DraftModelProposer
    )
    assert isinstance(SpecEngine.from_pretrained(dirs["target"], proposer="ngram").proposer, NgramProposer)
    assert isinstance(SpecEngine.from_pretrained(dirs["target"]).proposer, NullProposer)
    engine = SpecEngine.from_pretrained(str(dirs["target"]), dtype="bfloat16", device="cpu")
    assert engine.target.dtype == torch.bfloat16
    assert len(engine.generate([1, 2, 3], 5, stop_token_ids=[]).token_ids) == 5


def test_dtype_and_device_arguments(model_dirs):
    with pytest.raises(ValueError, match="unknown dtype"):
        SpecEngine.from_pretrained(model_dirs["llama"]["target"], dtype="float13")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"proposer": "draft"}, "draft model is needed"),
        ({"proposer": "beam"}, "proposer must be"),
        ({"proposer": "ngram", "draft": "x"}, "draft model is needed"),
    ],
)
def test_bad_proposer_choice(model_dirs, kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpecEngine.from_pretrained(model_dirs["llama"]["target"], **kwargs)


def test_missing_model_is_a_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="could not load"):
        SpecEngine.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ModelLoadError):
        SpecEngine.from_pretrained("no-such-org/no-such-model")  # a hub id, offline


def test_draft_vocabulary_must_match(model_dirs, tmp_path):
    build("llama", 1, 32, seed=0, vocab=VOCAB + 1).save_pretrained(tmp_path / "draft")
    with pytest.raises(IncompatibleDraftError, match="vocabulary"):
        SpecEngine.from_pretrained(model_dirs["llama"]["target"], draft=tmp_path / "draft")


@pytest.mark.parametrize("k", [-1, 1.5, True])
def test_bad_k(engine, k):
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpecEngine(engine.target, engine.proposer, num_speculative_tokens=k)


@pytest.mark.parametrize(
    "prompt,kwargs,match",
    [
        ([], {}, "empty"),
        (torch.tensor([], dtype=torch.long), {}, "empty"),
        ([1, 2], {"max_new_tokens": 0}, "max_new_tokens"),
        ([1, 2], {"max_new_tokens": CONTEXT - 1}, "exceeds the model's context"),
        ([1] * CONTEXT, {"max_new_tokens": 1}, "exceeds the model's context"),
        ([1, VOCAB], {}, r"must lie in \[0, 128\)"),
        ([-1, 3], {}, "must lie in"),
        ([1.0, 2.0], {}, "integer token ids"),
        (torch.tensor([[1, 2]]), {}, "1-D tensor"),
        (torch.tensor([1.0]), {}, "1-D tensor"),
        ([1, 2], {"temperature": -1.0}, "temperature"),
        ([1, 2], {"top_p": 0.0}, "top_p"),
        ([1, 2], {"top_p": 1.01}, "top_p"),
        ([1, 2], {"top_k": -3}, "top_k"),
        ([1, 2], {"seed": 1.5}, "seed"),
        ([1, 2], {"stop_token_ids": 2}, "stop_token_ids"),
        ([1, 2], {"stop_token_ids": ["</s>"]}, "stop_token_ids"),
        (5, {}, "prompt_ids"),
    ],
)
def test_bad_requests(engine, prompt, kwargs, match):
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(InvalidRequestError, match=match):
        engine.generate(prompt, **kwargs)


def test_prompt_at_the_context_limit_is_served(engine):
    out = engine.generate([1] * (CONTEXT - 8), 8, stop_token_ids=[])
    assert len(out.token_ids) == 8


def test_default_stop_is_the_models_eos(engine):
    assert engine.default_stop_ids == frozenset({2})
