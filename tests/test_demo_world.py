"""The demo world: corpora and their held-out split, the tokenizer, and the cached model build."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoTokenizer

from deploy.demo import build as build_module
from deploy.demo.build import PRESETS, build_demo_models, cached
from deploy.demo.corpus import build_corpus, is_held_out, prose_of
from deploy.demo.offline_distill import DistillSpec, distill, distill_demo_draft
from deploy.demo.pretrain import target_continuations
from deploy.demo.tokenizer import train_tokenizer
from distill.acceptance import expected_acceptance
from serving.engine import SpecEngine
from tiny_models import SMALL_CORPUS, TINY_DEMO, build


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(SMALL_CORPUS)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_tokenizer((d.text for docs in corpus.train.values() for d in docs), 512)


def test_held_out_files_never_feed_training(corpus):
    train_sources = {doc.source for docs in corpus.train.values() for doc in docs}
    for domain, docs in corpus.held_out.items():
        assert docs, domain
        for doc in docs:
            assert is_held_out(doc.source) and doc.source not in train_sources
    assert not any(is_held_out(source) for source in train_sources)


def test_split_is_a_stable_tenth():
    sources = [f"pkg/module_{i}.py" for i in range(4000)]
    held = sum(map(is_held_out, sources))
    assert 0.08 < held / len(sources) < 0.12
    assert [is_held_out(s) for s in sources[:50]] == [is_held_out(s) for s in sources[:50]]


def test_prose_is_docstrings_and_comments():
    code = '''"""A module docstring that is long enough to count as prose."""
x = 1  # short
def f():
    """Return one, which is what this function has always returned."""
    # this comment has enough words to keep
    return 1
'''
    prose = prose_of(code)
    assert "module docstring" in prose and "always returned" in prose and "enough words" in prose
    assert "return 1" not in prose and "short" not in prose
    assert prose_of("def broken(:\n") == ""


def test_c_domain_is_skipped_with_a_message(tmp_path):
    corpus = build_corpus(dataclasses.replace(SMALL_CORPUS, include_dir=tmp_path / "no-include"))
    assert "c" not in corpus.domains and "c" in corpus.skipped
    assert "no-include" in corpus.skipped["c"]


def test_corpus_is_reproducible(corpus):
    assert build_corpus(SMALL_CORPUS).fingerprint() == corpus.fingerprint()


def test_tokenizer_round_trip(corpus, tokenizer, tmp_path):
    samples = [docs[0].text[:2000] for docs in corpus.held_out.values()]
    samples += ["naïve café — 日本語 🙂\ttabs\r\nand CRLF", "    indented = {'a': [1, 2]}\n"]
    for text in samples:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.encode(samples[0], add_special_tokens=False) == tokenizer.encode(
        samples[0], add_special_tokens=False
    )
    assert reloaded.eos_token_id == tokenizer.eos_token_id


@pytest.fixture(scope="module")
def tiny_models(tiny_demo):
    return tiny_demo, build_demo_models(TINY_DEMO, tiny_demo)


def test_tiny_build_through_the_real_path(tiny_models):
    tmp_path, models = tiny_models
    manifest = json.loads((tmp_path / "tiny" / "manifest.json").read_text())
    assert manifest == models.manifest
    assert manifest["target"]["train_steps"] == 3 and manifest["draft"]["train_domains"] == ["prose"]
    assert set(manifest["held_out"]["target_loss"]) == set(manifest["corpus"]["domains"])
    assert manifest["cost_ratio_c"] > 0 and len(manifest["corpus"]["fingerprint"]) == 16

    engine = SpecEngine.from_pretrained(models.target, draft=models.draft, num_speculative_tokens=2)
    tokenizer = AutoTokenizer.from_pretrained(models.target)
    out = engine.generate(tokenizer.encode("def main():", add_special_tokens=False), 8)
    assert 1 <= len(out.token_ids) <= 8
    assert set(models.held_out_corpus().domains) == set(manifest["corpus"]["domains"])

    again = build_demo_models(TINY_DEMO, tmp_path)  # reused, not rebuilt
    assert again.manifest["built_at"] == manifest["built_at"]
    assert cached(dataclasses.replace(TINY_DEMO, vocab_size=400), tmp_path) is None  # another recipe


def test_failed_build_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(build_module, "pretrain", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        build_demo_models(TINY_DEMO, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_distillation_raises_acceptance_on_its_data():
    target, draft = (
        build("llama", 1, 32, seed=s, vocab=64, init_std=0.2) for s in (0, 1)
    )  # peaked: they disagree
    spec = DistillSpec(
        domain="python", prompts=32, prompt_tokens=8, new_tokens=16, epochs=15, batch=8, lr=3e-3
    )
    prompts = torch.randint(
        3, 64, (spec.prompts, spec.prompt_tokens), generator=torch.Generator().manual_seed(0)
    )
    sequences = target_continuations(target, prompts, spec.new_tokens)

    def acceptance() -> float:
        with torch.no_grad():
            ids = sequences[:, :-1]
            outputs = slice(spec.prompt_tokens - 1, None)
            return (
                expected_acceptance(target(ids).logits[:, outputs], draft(ids).logits[:, outputs])
                .mean()
                .item()
            )

    before = acceptance()
    distill(draft, target, sequences, spec)
    assert acceptance() > before + 0.1


def test_offline_distill_of_the_demo_draft(tiny_models):
    _, models = tiny_models
    spec = DistillSpec(domain="python", prompts=4, prompt_tokens=8, new_tokens=8, epochs=1, batch=2)
    out = distill_demo_draft(models, TINY_DEMO, spec)
    report = json.loads((out / "distilled.json").read_text())
    assert set(report["expected_acceptance_after"]) == set(models.manifest["corpus"]["domains"])
    assert SpecEngine.from_pretrained(models.target, draft=out).generate([5, 6, 7], 4).token_ids
    with pytest.raises(ValueError, match="not in the demo corpus"):
        distill_demo_draft(models, TINY_DEMO, dataclasses.replace(spec, domain="klingon"))


def test_presets_are_named_consistently():
    assert {name: preset.name for name, preset in PRESETS.items()} == {"full": "full", "quick": "quick"}
    for preset in PRESETS.values():
        assert preset.draft_train.domains == ("prose",)
