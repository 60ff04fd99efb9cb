"""Workloads: seeded, held-out-only prompts that round-trip through the tokenizer, in phase order;
every n-th request a chat request; conversations and the repetitive workloads built from them."""

from __future__ import annotations

import dataclasses

import pytest

from deploy.demo.corpus import Corpus, CorpusSpec, Document, build_corpus, is_held_out
from deploy.demo.tokenizer import train_tokenizer
from deploy.demo.workloads import (
    DEFAULT_PHASES,
    Conversation,
    Phase,
    Prompt,
    WorkloadSpec,
    agent_loops,
    chat_messages,
    code_edits,
    demo_requests,
    fixed_prompts,
    request_stream,
)

RANGE = (32, 96)
SPEC = WorkloadSpec(
    phases=(Phase("prose", 5), Phase("python", 8), Phase("prose", 3), Phase("python", 4)),
    prompt_tokens=RANGE,
    max_new_tokens=48,
    temperature=0.7,
    top_p=0.9,
    seed=3,
)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return build_corpus(CorpusSpec(max_train_chars=200_000, max_held_out_chars=50_000))


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_tokenizer([d.text for docs in corpus.train.values() for d in docs], vocab_size=512)


def without(corpus: Corpus, domain: str) -> Corpus:
    return Corpus(
        train={d: docs for d, docs in corpus.train.items() if d != domain},
        held_out={d: docs for d, docs in corpus.held_out.items() if d != domain},
        skipped={domain: f"no usable {domain} files; the {domain} domain is skipped"},
    )


def one_domain_corpus(*held_out_texts: str) -> Corpus:
    docs = [Document("python", f"doc{i}.py", text) for i, text in enumerate(held_out_texts)]
    return Corpus(
        train={"python": [Document("python", "t.py", "x = 1\n")]}, held_out={"python": docs}, skipped={}
    )


def assert_valid_prompt(prompt: Prompt, corpus: Corpus, tokenizer, prompt_tokens=RANGE) -> None:
    """The text is a line-start slice of the named held-out document, and the ids are its encoding."""
    (doc,) = [d for d in corpus.held_out[prompt.domain] if d.source == prompt.source]
    assert doc.text.startswith(prompt.text, prompt.start)
    assert prompt.start == 0 or doc.text[prompt.start - 1] == "\n"
    assert list(prompt.token_ids) == tokenizer.encode(prompt.text, add_special_tokens=False)
    assert prompt_tokens[0] <= len(prompt.token_ids) <= prompt_tokens[1]
    assert sum(not ch.isspace() for ch in prompt.text) >= len(prompt.text) / 2


def test_same_seed_same_requests_and_another_seed_others(corpus, tokenizer):
    first = list(request_stream(SPEC, corpus, tokenizer))
    assert first == list(request_stream(SPEC, corpus, tokenizer))
    other = list(request_stream(dataclasses.replace(SPEC, seed=4), corpus, tokenizer))
    assert [r.prompt.text for r in first] != [r.prompt.text for r in other]
    assert [r.seed for r in first] != [r.seed for r in other]


def test_every_nth_request_is_a_chat_request_and_the_requests_stay_the_same(corpus, tokenizer):
    plain = list(request_stream(SPEC, corpus, tokenizer))
    chat = list(request_stream(dataclasses.replace(SPEC, chat_every=4), corpus, tokenizer))
    assert not any(r.chat for r in plain)
    assert [i for i, r in enumerate(chat) if r.chat] == [3, 7, 11, 15, 19]  # across phases
    assert [dataclasses.replace(r, chat=False) for r in chat] == plain  # prompts and seeds unchanged
    system, user = chat_messages(chat[7].prompt)  # phase 2: python
    assert system["role"] == "system" and "Python code" in system["content"]
    assert user == {"role": "user", "content": chat[7].prompt.text}


def test_prompts_are_cut_from_held_out_documents_of_their_domain(corpus, tokenizer):
    for request in request_stream(SPEC, corpus, tokenizer):
        prompt = request.prompt
        assert is_held_out(prompt.source)
        assert prompt.source not in {d.source for d in corpus.train[prompt.domain]}
        assert_valid_prompt(prompt, corpus, tokenizer)


def test_phases_in_order_with_their_counts_and_the_spec_sampling_params(corpus, tokenizer):
    requests = list(request_stream(SPEC, corpus, tokenizer))
    assert [r.phase for r in requests] == [0] * 5 + [1] * 8 + [2] * 3 + [3] * 4
    assert [r.prompt.domain for r in requests] == ["prose"] * 5 + ["python"] * 8 + ["prose"] * 3 + [
        "python"
    ] * 4
    assert len({r.request_id for r in requests}) == len(requests)
    assert {(r.max_new_tokens, r.temperature, r.top_p) for r in requests} == {(48, 0.7, 0.9)}
    lengths = {len(r.prompt.token_ids) for r in requests}
    assert len(lengths) > 5  # lengths are drawn across the range, not fixed


def test_default_phases_shift_from_prose_to_code():
    assert [p.domain for p in DEFAULT_PHASES] == ["prose", "python", "c", "python"]


def test_missing_domain_is_rejected_naming_it_and_the_available_ones(corpus, tokenizer):
    no_c = without(corpus, "c")
    spec = WorkloadSpec(phases=(Phase("python", 2), Phase("c", 2)))
    with pytest.raises(ValueError, match=r"\['c'\] not in the corpus, which has \['prose', 'python'\]"):
        request_stream(spec, no_c, tokenizer)  # raised at once, not at the first request
    with pytest.raises(ValueError, match=r"\['c'\] not in the corpus"):
        fixed_prompts(no_c, tokenizer, "c", n=2, seed=0)


def test_missing_domains_can_be_dropped_keeping_phase_indices(corpus, tokenizer):
    phases = (Phase("prose", 2), Phase("python", 3), Phase("c", 4), Phase("python", 2))
    spec = WorkloadSpec(phases=phases, drop_missing_domains=True)
    requests = list(request_stream(spec, without(corpus, "c"), tokenizer))
    assert [r.phase for r in requests] == [0] * 2 + [1] * 3 + [3] * 2
    only_c = dataclasses.replace(spec, phases=(Phase("c", 2),))
    with pytest.raises(ValueError, match="not in the corpus"):
        request_stream(only_c, without(corpus, "c"), tokenizer)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: WorkloadSpec(phases=()), "at least one phase"),
        (lambda: Phase("python", -1), "requests must be at least 1, got -1"),
        (lambda: Phase("python", 0), "requests must be at least 1, got 0"),
        (lambda: WorkloadSpec(prompt_tokens=(0, 10)), r"1 <= min <= max, got \(0, 10\)"),
        (lambda: WorkloadSpec(prompt_tokens=(50, 40)), r"1 <= min <= max, got \(50, 40\)"),
        (lambda: WorkloadSpec(prompt_tokens=(5,)), "prompt_tokens must be"),
        (lambda: WorkloadSpec(max_new_tokens=0), "max_new_tokens must be at least 1"),
        (lambda: WorkloadSpec(chat_every=-1), "chat_every must be >= 0"),
        (lambda: WorkloadSpec(temperature=-0.5), "temperature must be >= 0"),
        (lambda: WorkloadSpec(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (lambda: WorkloadSpec(top_p=1.5), r"top_p must be in \(0, 1\]"),
    ],
)
def test_bad_specs_are_rejected(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_fixed_prompts_are_distinct_reproducible_and_held_out(corpus, tokenizer):
    prompts = fixed_prompts(corpus, tokenizer, "python", n=12, seed=5, prompt_tokens=(16, 40))
    assert len(prompts) == 12 and len({p.text for p in prompts}) == 12
    assert prompts == fixed_prompts(corpus, tokenizer, "python", n=12, seed=5, prompt_tokens=(16, 40))
    assert prompts != fixed_prompts(corpus, tokenizer, "python", n=12, seed=6, prompt_tokens=(16, 40))
    for prompt in prompts:
        assert prompt.domain == "python" and is_held_out(prompt.source)
        assert_valid_prompt(prompt, corpus, tokenizer, prompt_tokens=(16, 40))
    with pytest.raises(ValueError, match="n must be at least 1"):
        fixed_prompts(corpus, tokenizer, "python", n=0, seed=5)
    with pytest.raises(ValueError, match="prompt_tokens must be"):
        fixed_prompts(corpus, tokenizer, "python", n=1, seed=5, prompt_tokens=(9, 8))


def test_cuts_never_split_a_character(tokenizer):
    # A small byte-level vocabulary spells these characters in several byte tokens, so many
    # token cuts fall inside a character; those are redrawn, never decoded into U+FFFD.
    text = "".join(f"{i}: naïve café → 日本語のテキスト, résumé 🙂 ünïcödé\n" for i in range(60))
    corpus = one_domain_corpus(text)
    for prompt in fixed_prompts(corpus, tokenizer, "python", n=20, seed=0, prompt_tokens=(8, 40)):
        assert "\ufffd" not in prompt.text
        assert_valid_prompt(prompt, corpus, tokenizer, prompt_tokens=(8, 40))


def test_mostly_whitespace_windows_are_skipped(tokenizer):
    code = "".join(f"value_{i} = compute(value_{i - 1}, {i})\n" for i in range(1, 200))
    blank = "x" + " " * 300 + "\n"
    corpus = one_domain_corpus(code, blank * 100)
    prompts = fixed_prompts(corpus, tokenizer, "python", n=20, seed=0, prompt_tokens=(8, 40))
    assert {p.source for p in prompts} == {"doc0.py"}
    with pytest.raises(ValueError, match="no 8..40-token prompt found in the held-out python documents"):
        fixed_prompts(one_domain_corpus(blank * 100), tokenizer, "python", n=1, seed=0, prompt_tokens=(8, 40))


def test_a_domain_too_short_for_the_range_is_an_error_not_a_hang(tokenizer):
    corpus = one_domain_corpus("def f():\n    return 1\n")
    with pytest.raises(ValueError, match="no 32..96-token prompt found"):
        list(request_stream(WorkloadSpec(phases=(Phase("python", 1),)), corpus, tokenizer))


def test_token_ids_are_the_text_encoding_even_where_a_cut_would_merge_differently(tokenizer):
    # Cut after " " in "    ¤", the text ends in a run of spaces that encodes as other tokens.
    text = "".join(f"item_{i} = value_{i}    ¤ +    ¤ total_{i}\n" for i in range(100))
    corpus = one_domain_corpus(text)
    prompts = fixed_prompts(corpus, tokenizer, "python", n=40, seed=0, prompt_tokens=(8, 40))
    for prompt in prompts:
        assert_valid_prompt(prompt, corpus, tokenizer, prompt_tokens=(8, 40))

    def cut_ids(p: Prompt) -> list[int]:
        return tokenizer.encode(text[p.start :], add_special_tokens=False)[: len(p.token_ids)]

    assert any(list(p.token_ids) != cut_ids(p) for p in prompts)  # the re-merging case was exercised


def test_a_conversation_s_turns_carry_every_earlier_input_and_answer():
    chat = Conversation("python", ((1, 2), (3,), (4, 5)))
    assert chat.prompt([]) == [1, 2]
    assert chat.prompt([[7, 8]]) == [1, 2, 7, 8, 3]
    assert chat.prompt([[7, 8], [9]]) == [1, 2, 7, 8, 3, 9, 4, 5]
    with pytest.raises(ValueError, match="no turn 4"):
        chat.prompt([[7], [8], [9]])


def test_repetitive_workloads_repeat_what_came_before(corpus, tokenizer):
    edits = code_edits(corpus, tokenizer, 4, seed=1, file_tokens=(24, 48))
    for edit in edits:
        (prompt,) = edit.inputs
        text = tokenizer.decode(prompt)
        file, _, again = text.rstrip("\n").rpartition("\n\n")
        assert again == file.partition("\n")[0] + "  # edited"  # the file, then its first line changed
    loops = agent_loops(corpus, tokenizer, 3, seed=1, file_tokens=(8, 16), files=2)
    for loop in loops:
        first, again, second, twice = loop.inputs
        assert first == again and second == twice and first != second  # each file is read twice
    assert len({loop.inputs[0] for loop in loops}) == 3
    mixed = demo_requests(corpus, tokenizer, 5, seed=1)
    assert [c.domain for c in mixed] == [corpus.domains[i % len(corpus.domains)] for i in range(5)]
    assert code_edits(corpus, tokenizer, 4, seed=1, file_tokens=(24, 48)) == edits  # seeded
