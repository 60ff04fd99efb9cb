"""Incremental detokenization gives the text a whole decode gives, however the tokens arrive: for a
byte-level tokenizer (characters split across tokens, arbitrary ids) and a SentencePiece-style one
(a leading space the decoder strips at the start only, special tokens skipped)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from serving.http.detokenize import INCOMPLETE, IncrementalText
from tiny_models import byte_tokenizer

WORDS = ["▁the", "▁cat", "▁sat", "▁on", "▁mat", "▁a", "s", "ing", "ed", "▁", "."]


def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """Words with SentencePiece's ▁ for a space, and two special tokens."""
    vocab = {token: i for i, token in enumerate(["<s>", "</s>", "<unk>", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="first")
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **specials)


TOKENIZERS = {"bytes": byte_tokenizer("chatml"), "metaspace": metaspace_tokenizer()}


def chunks(ids: list[int], cuts: list[int]) -> list[list[int]]:
    bounds = sorted({0, len(ids), *(c % (len(ids) + 1) for c in cuts)})
    return [ids[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def streamed(tokenizer, parts: list[list[int]]) -> tuple[str, list[str | None]]:
    stream = IncrementalText(tokenizer)
    pieces = [stream.add(part) for part in parts]
    tail = stream.add((), final=True)
    return "".join(p for p in pieces if p) + tail, pieces


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@settings(max_examples=150, derandomize=True, deadline=None)
@given(ids=st.lists(st.integers(0, 255 + 3), max_size=40), cuts=st.lists(st.integers(0, 40), max_size=12))
def test_pieces_join_to_the_whole_decode(name, ids, cuts):
    tokenizer = TOKENIZERS[name]
    ids = [i % len(tokenizer) for i in ids]
    whole, _ = streamed(tokenizer, chunks(ids, cuts))
    assert whole == tokenizer.decode(ids, skip_special_tokens=True)


def test_a_split_character_is_held_until_it_completes():
    tokenizer = TOKENIZERS["bytes"]
    ids = tokenizer.encode("aé✓b", add_special_tokens=False)  # 1 + 2 + 3 + 1 bytes
    _, pieces = streamed(tokenizer, [[i] for i in ids])
    assert pieces == ["a", None, "é", None, None, "✓", "b"]
    assert not any(INCOMPLETE in p for p in pieces if p)


def test_leading_spaces_survive_between_pieces():
    tokenizer = TOKENIZERS["metaspace"]
    ids = tokenizer.encode("the cat sat on the mat", add_special_tokens=False)
    _, pieces = streamed(tokenizer, [[i] for i in ids])
    assert pieces == ["the", " cat", " sat", " on", " the", " mat"]


def test_each_step_decodes_a_window_not_the_whole_output():
    """The work per step stays bounded as the output grows."""
    tokenizer = TOKENIZERS["metaspace"]
    decoded: list[int] = []
    original = tokenizer.decode
    tokenizer.decode = lambda ids, **kw: decoded.append(len(ids)) or original(ids, **kw)
    try:
        ids = tokenizer.encode(" ".join(["the cat sat"] * 50), add_special_tokens=False)
        streamed(tokenizer, [[i] for i in ids])
    finally:
        del tokenizer.decode
    assert len(ids) == 150 and max(decoded) <= 2
