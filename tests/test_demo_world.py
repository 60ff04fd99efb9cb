"""The demo world: corpora and their held-out split, the tokenizer and its ChatML template, and the
cached model build (with the finishing step that gives a pair cached before it the template)."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from deploy.demo import build as build_module
from deploy.demo.build import CHAT_VERSION, PRESETS, build_demo_models, cached, finish_chat
from deploy.demo.corpus import build_corpus, is_held_out, prose_of
from deploy.demo.offline_distill import DistillSpec, distill, distill_demo_draft
from deploy.demo.pretrain import target_continuations
from deploy.demo.run import claim_state
from deploy.demo.tokenizer import CHATML, IM_END, IM_START, train_tokenizer
from distill.acceptance import expected_acceptance
from serving.engine.hf import SpecEngine
from serving.engine.vocab import check_pair
from serving.http.api import ChatMessage, chat_prompt
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


def test_the_built_pair_has_the_chatml_template_and_rows_for_its_tokens(tiny_models):
    _, models = tiny_models
    tokenizer = AutoTokenizer.from_pretrained(models.target)
    trained = len(tokenizer) - 2  # the BPE's own vocabulary, then the two chat tokens
    start, end = tokenizer.convert_tokens_to_ids([IM_START, IM_END])
    assert (start, end) == (trained, trained + 1)
    assert tokenizer.chat_template == CHATML and {IM_START, IM_END} <= set(tokenizer.all_special_tokens)
    assert tokenizer.encode(f"{IM_START}{IM_END}", add_special_tokens=False) == [start, end]  # one id each
    assert tokenizer.decode([start, 5, end], skip_special_tokens=True) == tokenizer.decode([5])
    chat = models.manifest["chat"]
    assert chat["version"] == CHAT_VERSION and chat["token_ids"] == {IM_START: start, IM_END: end}
    assert models.manifest["vocab_size"] == len(tokenizer)
    for path in (models.target, models.draft):
        assert AutoTokenizer.from_pretrained(path).get_vocab() == tokenizer.get_vocab()
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == model.config.vocab_size
        assert model.generation_config.eos_token_id == [tokenizer.eos_token_id, end]
    shared = check_pair(str(models.target), str(models.draft), len(tokenizer), len(tokenizer))
    assert shared.rows == len(tokenizer) and not shared.padded  # the draft may propose the chat tokens
    # a chat prompt decodes; the engine stops at <|im_end|> as at <|endoftext|>
    engine = SpecEngine.from_pretrained(models.target, draft=models.draft, num_speculative_tokens=2)
    assert engine.default_stop_ids == {tokenizer.eos_token_id, end}
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert 1 <= len(engine.generate(list(ids["input_ids"]), 4).token_ids) <= 4


def test_a_multi_turn_conversation_renders_as_chatml(tiny_models):
    _, models = tiny_models
    tokenizer = AutoTokenizer.from_pretrained(models.target)
    messages = [
        {"role": "system", "content": "You continue the user's Python code."},
        {"role": "user", "content": "def add(a, b):"},
        {"role": "assistant", "content": "    return a + b"},
        {"role": "user", "content": "def sub(a, b):\n"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou continue the user's Python code.<|im_end|>\n"
        "<|im_start|>user\ndef add(a, b):<|im_end|>\n"
        "<|im_start|>assistant\n    return a + b<|im_end|>\n"
        "<|im_start|>user\ndef sub(a, b):\n<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    start, end = tokenizer.convert_tokens_to_ids([IM_START, IM_END])

    def encode(piece: str) -> list[int]:
        return tokenizer.encode(piece, add_special_tokens=False)

    expected = [
        i for m in messages for i in [start, *encode(f"{m['role']}\n{m['content']}"), end, *encode("\n")]
    ] + [start, *encode("assistant\n")]  # the special tokens split the text; the rest is plain BPE
    assert encode(text) == expected
    assert chat_prompt(tokenizer, [ChatMessage(**m) for m in messages]) == expected  # what the API sends
    no_prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=False)
    assert no_prompt.endswith("def add(a, b):<|im_end|>\n")


def test_a_pair_cached_before_the_chat_template_is_finished_not_retrained(tiny_models, tmp_path, monkeypatch):
    fresh_root, fresh = tiny_models

    def pre_chat_finish(root, manifest):  # what builds wrote before the finishing step
        (root / "manifest.json").write_text(json.dumps(manifest))
        return manifest

    monkeypatch.setattr(build_module, "finish_chat", pre_chat_finish)
    old = build_demo_models(TINY_DEMO, tmp_path)
    assert "chat" not in old.manifest and AutoTokenizer.from_pretrained(old.target).chat_template is None
    shutil.copytree(old.draft, old.root / "draft-distilled-python")  # a derived draft: finished too
    monkeypatch.setattr(build_module, "finish_chat", finish_chat)
    monkeypatch.setattr(build_module, "pretrain", lambda *a, **k: pytest.fail("retrained"))

    finished = build_demo_models(TINY_DEMO, tmp_path)
    assert finished.manifest["built_at"] == old.manifest["built_at"]  # the same training, finished
    assert finished.manifest["chat"] == fresh.manifest["chat"]
    assert {p.name for p in tmp_path.iterdir()} == {"tiny"}  # no copy left behind
    for name in ("target", "draft", "draft-distilled-python"):
        made, built = finished.root / name, fresh_root / "tiny" / ("draft" if "distilled" in name else name)
        for file in (
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
            "generation_config.json",
        ):
            assert (made / file).read_text() == (built / file).read_text(), (name, file)
        weights, fresh_weights = load_file(made / "model.safetensors"), load_file(built / "model.safetensors")
        assert weights.keys() == fresh_weights.keys()
        assert all(torch.equal(weights[k], fresh_weights[k]) for k in weights), name  # as a fresh build
    # finishing again changes nothing
    before = {p: p.read_bytes() for p in finished.root.rglob("*") if p.is_file()}
    assert finish_chat(finished.root, finished.manifest) == finished.manifest
    assert {p: p.read_bytes() for p in finished.root.rglob("*") if p.is_file()} == before
    assert build_demo_models(TINY_DEMO, tmp_path).manifest == finished.manifest  # reused now


def test_demo_state_made_with_another_build_of_the_pair_starts_over(tiny_models, tmp_path):
    _, models = tiny_models
    state, console = tmp_path / "state", Console(file=io.StringIO())
    claim_state(state, models, console)
    (state / "trainer").mkdir()
    claim_state(state, models, console)  # the same pair: the state is kept
    assert (state / "trainer").is_dir()
    before_chat = {k: v for k, v in models.manifest.items() if k != "chat"}
    claim_state(state, dataclasses.replace(models, manifest=before_chat), console)
    assert not (state / "trainer").exists() and (state / "pair.json").exists()
    assert "starting over" in console.file.getvalue()


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
