"""Demo workloads: seeded request streams whose prompts are cut from held-out documents only.

A workload is a schedule of domain phases (e.g. prose -> python -> c -> python); each request carries
its prompt, the domain and phase it belongs to, its sampling parameters, and whether it goes
through the chat API (every `chat_every`-th request: a system message and the prompt's text as the
user's message, `chat_messages`) or the completions API (the prompt's ids). The same corpus,
tokenizer, spec and seed always give the same requests.

What a prompt guarantees:
- its text is a slice of one held-out document of its domain that starts at a line boundary;
- `token_ids == tokenizer.encode(text, add_special_tokens=False)`: the ids are those of the text
  itself, so sending the text or the ids is the same request (a window is cut by tokens, decoded,
  and encoded again; a cut that splits a character, or a length that re-encoding moves out of the
  range, is drawn again);
- its length in tokens lies in the configured range, and at least half its characters are visible.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerFast

from deploy.demo.corpus import Corpus, Document
from serving.engine.sampling import SamplingParams

MAX_TRIES = 100  # draws per prompt before a domain is declared unable to give one
MAX_CHARS_PER_TOKEN = 16  # characters encoded per wanted token: enough text behind any cut
DOMAIN_NAMES = {"prose": "English prose", "python": "Python code", "c": "C code"}  # for chat_messages


@dataclass(frozen=True)
class Phase:
    domain: str
    requests: int

    def __post_init__(self) -> None:
        if self.requests < 1:
            raise ValueError(f"phase {self.domain!r}: requests must be at least 1, got {self.requests}")


DEFAULT_PHASES = (Phase("prose", 32), Phase("python", 64), Phase("c", 32), Phase("python", 32))


@dataclass(frozen=True)
class WorkloadSpec:
    """A schedule of phases and the parameters every request shares.

    `prompt_tokens` is the inclusive (min, max) range of prompt lengths. With `drop_missing_domains`
    phases whose domain the corpus lacks are skipped; without it they are an error. With
    `chat_every` = n > 0, requests n-1, 2n-1, ... (counted over the whole stream) are chat requests.
    """

    phases: tuple[Phase, ...] = DEFAULT_PHASES
    prompt_tokens: tuple[int, int] = (32, 96)
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    drop_missing_domains: bool = False
    chat_every: int = 0  # 0: no chat requests

    def __post_init__(self) -> None:
        if not self.phases:
            raise ValueError("a workload needs at least one phase")
        if self.chat_every < 0:
            raise ValueError(f"chat_every must be >= 0, got {self.chat_every}")
        _check_prompt_tokens(self.prompt_tokens)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        SamplingParams(temperature=self.temperature, top_p=self.top_p)  # the engine's own checks


@dataclass(frozen=True)
class Prompt:
    domain: str
    source: str  # the held-out document it was cut from (Document.source)
    start: int  # character offset of the cut in that document, always at a line start
    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Request:
    request_id: str
    phase: int  # index into WorkloadSpec.phases
    prompt: Prompt
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int  # the request's own sampling seed
    chat: bool = False  # sent to /v1/chat/completions as `chat_messages(prompt)`


def chat_messages(prompt: Prompt) -> list[dict[str, str]]:
    """A chat request for `prompt`: a system message naming its domain, then its text as the user's."""
    system = f"You continue the user's {DOMAIN_NAMES.get(prompt.domain, prompt.domain)}."
    return [{"role": "system", "content": system}, {"role": "user", "content": prompt.text}]


def request_stream(
    spec: WorkloadSpec, corpus: Corpus, tokenizer: PreTrainedTokenizerFast
) -> Iterator[Request]:
    """The spec's requests in phase order. Raises ValueError at once for a domain the corpus lacks."""
    _check_domains([p.domain for p in spec.phases], corpus, spec.drop_missing_domains)
    return _requests(spec, corpus, tokenizer)


def _requests(spec: WorkloadSpec, corpus: Corpus, tokenizer: PreTrainedTokenizerFast) -> Iterator[Request]:
    rng = random.Random(spec.seed)
    index = 0
    for phase_index, phase in enumerate(spec.phases):
        if phase.domain not in corpus.held_out:
            continue  # dropped: _check_domains allowed it
        for _ in range(phase.requests):
            yield Request(
                request_id=f"seed{spec.seed}-{index:05d}",
                phase=phase_index,
                prompt=_draw_prompt(rng, corpus.held_out[phase.domain], tokenizer, spec.prompt_tokens),
                max_new_tokens=spec.max_new_tokens,
                temperature=spec.temperature,
                top_p=spec.top_p,
                seed=rng.randrange(2**31),
                chat=spec.chat_every > 0 and index % spec.chat_every == spec.chat_every - 1,
            )
            index += 1


def fixed_prompts(
    corpus: Corpus,
    tokenizer: PreTrainedTokenizerFast,
    domain: str,
    n: int,
    seed: int,
    prompt_tokens: tuple[int, int] = (32, 96),
) -> list[Prompt]:
    """n distinct held-out prompts of one domain, the same for the same arguments: a benchmark set."""
    _check_prompt_tokens(prompt_tokens)
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    _check_domains([domain], corpus, drop_missing=False)
    rng = random.Random(seed)
    prompts: dict[str, Prompt] = {}
    for _ in range(n * MAX_TRIES):
        prompt = _draw_prompt(rng, corpus.held_out[domain], tokenizer, prompt_tokens)
        prompts.setdefault(prompt.text, prompt)
        if len(prompts) == n:
            return list(prompts.values())
    raise ValueError(f"could not cut {n} distinct prompts from the held-out {domain} documents")


def _check_prompt_tokens(prompt_tokens: tuple[int, int]) -> None:
    if len(prompt_tokens) != 2 or not 1 <= prompt_tokens[0] <= prompt_tokens[1]:
        raise ValueError(f"prompt_tokens must be (min, max) with 1 <= min <= max, got {prompt_tokens}")


def _check_domains(domains: list[str], corpus: Corpus, drop_missing: bool) -> None:
    missing = sorted({d for d in domains if d not in corpus.held_out})
    if not missing or (drop_missing and len(missing) < len(set(domains))):
        return
    reasons = "".join(f"; {corpus.skipped[d]}" for d in missing if d in corpus.skipped)
    hint = "" if drop_missing else " (set drop_missing_domains to skip their phases)"
    raise ValueError(
        f"workload domain(s) {missing} not in the corpus, which has {corpus.domains}{reasons}{hint}"
    )


def _draw_prompt(
    rng: random.Random,
    docs: list[Document],
    tokenizer: PreTrainedTokenizerFast,
    prompt_tokens: tuple[int, int],
) -> Prompt:
    """A held-out document, a line in it (longer lines likelier), a length; redrawn until the cut holds."""
    low, high = prompt_tokens
    for _ in range(MAX_TRIES):
        doc = rng.choice(docs)
        start = doc.text.rfind("\n", 0, rng.randrange(len(doc.text))) + 1
        prompt = _cut(doc, start, rng.randint(low, high), tokenizer)
        if prompt is not None and low <= len(prompt.token_ids) <= high:
            return prompt
    raise ValueError(
        f"no {low}..{high}-token prompt found in the held-out {docs[0].domain} documents in {MAX_TRIES} tries"
    )


def _cut(doc: Document, start: int, n_tokens: int, tokenizer: PreTrainedTokenizerFast) -> Prompt | None:
    """The first n_tokens of the document from `start`, or None for a blank line or a broken cut."""
    window = doc.text[start : start + n_tokens * MAX_CHARS_PER_TOKEN]
    if not window.split("\n", 1)[0].strip():
        return None
    ids = tokenizer.encode(window, add_special_tokens=False)[:n_tokens]
    text = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    if not window.startswith(text):  # the cut split a multi-byte character
        return None
    if sum(not ch.isspace() for ch in text) < len(text) / 2:
        return None
    ids = tokenizer.encode(text, add_special_tokens=False)
    return Prompt(doc.domain, doc.source, start, text, tuple(ids))


@dataclass(frozen=True)
class Conversation:
    """Requests that follow one another (one with a single input): turn t's prompt is every
    earlier turn's input and answer, then its own input, as an agent's context grows."""

    domain: str
    inputs: tuple[tuple[int, ...], ...]

    def prompt(self, answers: Sequence[Sequence[int]]) -> list[int]:
        """The prompt of the turn after `answers` (one per earlier turn)."""
        if len(answers) >= len(self.inputs):
            raise ValueError(f"a conversation of {len(self.inputs)} turns has no turn {len(answers) + 1}")
        earlier = [t for given, answer in zip(self.inputs, answers, strict=False) for t in (*given, *answer)]
        return earlier + list(self.inputs[len(answers)])


def demo_requests(
    corpus: Corpus, tokenizer: PreTrainedTokenizerFast, n: int, seed: int
) -> list[Conversation]:
    """n single requests, held-out prompts of the corpus's domains in turn (the demo's mix)."""
    domains = corpus.domains
    per = {d: fixed_prompts(corpus, tokenizer, d, -(-n // len(domains)), seed) for d in domains}
    chosen = [(domains[i % len(domains)], i // len(domains)) for i in range(n)]
    return [Conversation(domain, (per[domain][j].token_ids,)) for domain, j in chosen]


def code_edits(
    corpus: Corpus,
    tokenizer: PreTrainedTokenizerFast,
    n: int,
    seed: int,
    file_tokens: tuple[int, int] = (64, 128),
) -> list[Conversation]:
    """n requests that hold a held-out Python file and then begin it again with its first line
    changed: an edit asked for, whose answer repeats the prompt (the rest of the file)."""
    requests = []
    for prompt in fixed_prompts(corpus, tokenizer, "python", n, seed, file_tokens):
        first = prompt.text.partition("\n")[0]
        text = f"{prompt.text.rstrip()}\n\n{first}  # edited\n"
        requests.append(Conversation("python", (tuple(tokenizer.encode(text, add_special_tokens=False)),)))
    return requests


def agent_loops(
    corpus: Corpus,
    tokenizer: PreTrainedTokenizerFast,
    n: int,
    seed: int,
    file_tokens: tuple[int, int] = (24, 48),
    files: int = 2,
) -> list[Conversation]:
    """n conversations of 2 x `files` turns, each turn's input a tool's output (a held-out Python
    file) that the next turn reads again: earlier inputs and the answers that followed them come
    back in later requests."""
    snippets = [s.token_ids for s in fixed_prompts(corpus, tokenizer, "python", n * files, seed, file_tokens)]
    return [
        Conversation("python", tuple(s for s in snippets[i * files : (i + 1) * files] for _ in (0, 1)))
        for i in range(n)
    ]
