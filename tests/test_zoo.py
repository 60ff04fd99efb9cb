"""The architecture zoo: greedy decoding through the engine is token-identical to Hugging Face
`generate(do_sample=False)` on twelve architectures, solo and batched, with a draft model and
with draft heads (chain, and tree where the target verifies trees). Each tiny random target is
configured so that its architecture's own code paths run (sliding windows shorter than the
text, soft-capping, multipliers, partial rotary, absolute positions); its draft is a perturbed
copy. The tests read their claims from docs/models.md's table, so the page cannot drift from
what is tested."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    GraniteConfig,
    Llama4TextConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
    Starcoder2Config,
)

from serving.engine.device import DeviceProfile
from serving.engine.hf import SpecEngine
from serving.engine.models import tree_support
from serving.engine.proposers import DraftModelProposer
from serving.errors import ModelLoadError
from tiny_models import CONTEXT, VOCAB, perturbed, random_heads

WINDOW = 8  # sliding windows shorter than prompt + output, so that they bind
BASE = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=CONTEXT, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    initializer_range=0.2,  # at 0.02 a tiny random model repeats one token
    tie_word_embeddings=False,  # tied random embeddings collapse Gemma's output to one token too
)  # fmt: skip

ZOO: dict[str, Callable[[], PretrainedConfig]] = {
    "llama": lambda: LlamaConfig(**BASE),
    "qwen2": lambda: Qwen2Config(**BASE, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "qwen3": lambda: Qwen3Config(**BASE, head_dim=32),
    "mistral": lambda: MistralConfig(**BASE, sliding_window=WINDOW),
    "gemma": lambda: GemmaConfig(**BASE, head_dim=16),
    "gemma2": lambda: Gemma2Config(
        **BASE,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=WINDOW,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0,
    ),
    "phi3": lambda: Phi3Config(**BASE, sliding_window=WINDOW, partial_rotary_factor=0.5),
    "olmo2": lambda: Olmo2Config(**BASE),
    "gpt2": lambda: GPT2Config(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=CONTEXT,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.2,
    ),
    "gpt_neox": lambda: GPTNeoXConfig(**BASE),
    "granite": lambda: GraniteConfig(
        **BASE,
        embedding_multiplier=4.0,
        residual_multiplier=0.5,
        attention_multiplier=0.1,
        logits_scaling=4.0,
    ),
    "starcoder2": lambda: Starcoder2Config(**BASE, sliding_window=WINDOW),
}

K = 3
MAX_NEW = 24
GEN = torch.Generator().manual_seed(7)
PROMPTS = [torch.randint(3, VOCAB, (n,), generator=GEN).tolist() for n in (1, 6, 11, 16)]
BATCH_NEW = [MAX_NEW, 13, 20, MAX_NEW]  # the batch's sequences leave at different steps
JOINS_AT = 3  # the last prompt joins the batch after this many steps

# --- the table in docs/models.md ---------------------------------------------------------------

TABLE = Path(__file__).resolve().parents[1] / "docs" / "models.md"
COLUMNS = {"draft": "draft model, solo and batched", "heads": "heads (chain)", "tree": "tree verification"}


@functools.cache
def table() -> dict[str, dict[str, str]]:
    """The table's cells by `model_type`, then by column heading."""
    rows = [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in TABLE.read_text().splitlines()
        if line.startswith("|") and not set(line) <= set("|-: ")
    ]
    header, *body = rows
    return {row[1].strip("`"): dict(zip(header, row, strict=True)) for row in body}


def supported(column: str) -> list[str]:
    """The architectures whose cell in `column` says yes."""
    return [arch for arch, row in table().items() if row[COLUMNS[column]] == "yes"]


def test_the_table_lists_the_zoo_and_says_why_not():
    assert list(table()) == list(ZOO)
    for arch, row in table().items():
        for heading in COLUMNS.values():
            assert row[heading] == "yes" or row[heading].startswith("no: "), (arch, heading, row[heading])


# --- the zoo -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    target: Path
    draft: Path
    expected: list[list[int]]  # HF greedy, MAX_NEW tokens after each prompt


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Callable[[str], Pair]:
    """`zoo(arch)`: the architecture's target and draft, saved, and HF's greedy output; built on
    first use."""
    root = tmp_path_factory.mktemp("zoo")

    @functools.cache
    def build(arch: str) -> Pair:
        torch.manual_seed(0)
        target = AutoModelForCausalLM.from_config(ZOO[arch]()).eval()
        target.save_pretrained(root / arch)
        perturbed(target, 0.03, seed=1).save_pretrained(root / f"{arch}-draft")
        reference = AutoModelForCausalLM.from_pretrained(root / arch).eval()  # HF's own loading
        reference.generation_config.eos_token_id = None  # never stop early
        outputs = [
            reference.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0)
            for p in PROMPTS
        ]
        expected = [out[0, len(p) :].tolist() for out, p in zip(outputs, PROMPTS, strict=True)]
        return Pair(root / arch, root / f"{arch}-draft", expected)

    return build


def draft_engine(pair: Pair) -> SpecEngine:
    return SpecEngine.from_pretrained(pair.target, draft=pair.draft, num_speculative_tokens=K)


def heads_engine(pair: Pair, kind: str, tree: tuple[int, ...] | None) -> SpecEngine:
    """Heads through the real path, then random weights hot-swapped in, so that they guess
    differently from the LM head."""
    engine = SpecEngine.from_pretrained(pair.target, proposer=kind, num_speculative_tokens=K, tree=tree)
    engine.proposer.load_weights(random_heads(engine.target, kind).state_dict())
    return engine


@pytest.mark.parametrize("arch", supported("draft"))
def test_draft_model_solo(zoo, arch):
    pair = zoo(arch)
    engine = draft_engine(pair)
    results = [engine.generate(prompt, MAX_NEW, stop_token_ids=[]) for prompt in PROMPTS]
    assert [r.token_ids for r in results] == pair.expected
    drafted, accepted = sum(r.stats.drafted for r in results), sum(r.stats.accepted for r in results)
    assert 0 < accepted < drafted  # drafts were kept and rejected: both ways through a step


@pytest.mark.parametrize("arch", supported("draft"))
def test_draft_model_batched(zoo, arch):
    """Three prompts of different lengths admitted together, a fourth mid-way."""
    pair = zoo(arch)
    engine = draft_engine(pair)
    owners, outputs = {}, {}
    for i in range(len(PROMPTS) - 1):
        owners[id(engine.add(PROMPTS[i], BATCH_NEW[i], stop_token_ids=[]))] = i
    steps = 0
    while engine.active:
        if steps == JOINS_AT:
            owners[id(engine.add(PROMPTS[-1], BATCH_NEW[-1], stop_token_ids=[]))] = len(PROMPTS) - 1
        for decoding, step in engine.step():
            if step.generation is not None:
                outputs[owners[id(decoding)]] = step.generation.token_ids
        steps += 1
    assert [outputs[i] for i in range(len(PROMPTS))] == [
        e[:n] for e, n in zip(pair.expected, BATCH_NEW, strict=True)
    ]
    assert engine.cache.rows == 0  # every slot given back


@pytest.mark.parametrize("arch", supported("heads"))
@pytest.mark.parametrize("kind", ["medusa", "hydra"])
def test_heads_chain(zoo, arch, kind):
    pair = zoo(arch)
    engine = heads_engine(pair, kind, tree=None)
    for prompt, expected in zip(PROMPTS[1:3], pair.expected[1:3], strict=True):
        result = engine.generate(prompt, MAX_NEW, stop_token_ids=[])
        assert result.token_ids == expected and result.stats.drafted > 0


@pytest.mark.parametrize("arch", list(ZOO))
def test_tree_support_is_as_the_table_says(zoo, arch):
    target = AutoModelForCausalLM.from_pretrained(zoo(arch).target).eval()
    assert (tree_support(target) is None) == (table()[arch][COLUMNS["tree"]] == "yes")


@pytest.mark.parametrize("arch", supported("tree"))
def test_heads_tree(zoo, arch):
    pair = zoo(arch)
    engine = heads_engine(pair, "hydra", tree=(3, 2, 2))
    assert engine.proposer.tree is not None  # tree mode stayed on
    for prompt, expected in zip(PROMPTS[1:3], pair.expected[1:3], strict=True):
        result = engine.generate(prompt, MAX_NEW, stop_token_ids=[])
        assert result.token_ids == expected and result.stats.drafted > 0


def test_static_compiled_layout_keeps_the_windows(zoo):
    """The GPU layout on the CPU (fixed slots at full capacity, steps through torch.compile's
    "eager" backend) with Gemma 2: a mask per layer kind, a window over the full width."""
    pair = zoo("gemma2")
    profile = DeviceProfile(
        torch.float32,
        static_cache=True,
        slots=4,
        capacity=64,
        compile_mode="default",
        compile_backend="eager",
    )
    loaded = draft_engine(pair)
    engine = SpecEngine(loaded.target, DraftModelProposer(loaded.proposer.model, profile), K, profile)
    owners = {id(engine.add(prompt, MAX_NEW, stop_token_ids=[])): i for i, prompt in enumerate(PROMPTS)}
    outputs = {}
    while engine.active:
        for decoding, step in engine.step():
            if step.generation is not None:
                outputs[owners[id(decoding)]] = step.generation.token_ids
    assert [outputs[i] for i in range(len(PROMPTS))] == pair.expected


def test_layers_the_engine_cannot_mask_are_refused_at_load(tmp_path):
    """Llama 4's chunked attention is not a sliding window: the load says so."""
    config = Llama4TextConfig(
        **BASE, intermediate_size_mlp=128, head_dim=16, num_local_experts=2, attention_chunk_size=WINDOW
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"cannot be served.*chunked_attention"):
        SpecEngine.from_pretrained(tmp_path)
