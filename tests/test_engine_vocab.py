"""Vocabularies: a draft whose output rows are the target's minus padding serves losslessly and
proposes only shared ids; tokenizers that disagree, or rows no tokenizer can vouch for, are
refused at start naming why; traces of such a pair train the draft (full and LoRA) without NaNs;
a hot-swapped version of such a draft keeps drafting over the target's rows."""

from __future__ import annotations

import asyncio

import pytest
import torch
from polling import wait_for
from test_engine_lossless import hf_greedy
from transformers import AutoModelForCausalLM

from distill.acceptance import mean_acceptance, trace_acceptance
from distill.batches import make_batch
from distill.lora import wrap_lora
from distill.losses import topk_loss
from serving.engine.hf import SpecEngine
from serving.engine.proposers import DraftModelProposer
from serving.engine.vocab import shared_vocabulary
from serving.errors import IncompatibleDraftError
from serving.replica import Replica, ReplicaConfig, Request
from serving.tracing import trace_of
from store.metrics import MetricsConfig
from store.registry import Registry
from store.traces import StreamConfig
from tiny_models import byte_tokenizer, save_chat_pair

DRAFT_ROWS = 264  # the tokenizer has 259 tokens; the target 272 rows
PROMPTS = [[71, 72, 10], [200, 3, 258, 7, 99, 12, 40], [5]]


@pytest.fixture(scope="module")
def padded_pair(tmp_path_factory):
    return save_chat_pair(tmp_path_factory.mktemp("padded"), "chatml", draft_rows=DRAFT_ROWS)


def test_a_padded_pair_is_lossless_solo_and_batched_and_proposes_shared_ids_only(padded_pair, monkeypatch):
    target, draft = padded_pair
    engine = SpecEngine.from_pretrained(str(target), draft=str(draft), num_speculative_tokens=3)
    assert (engine.proposer.shared_rows, engine.proposer.target_rows) == (DRAFT_ROWS, 272)
    proposed = []
    propose = DraftModelProposer.propose
    monkeypatch.setattr(
        DraftModelProposer,
        "propose",
        lambda self, rows: proposed.extend(propose(self, rows)) or proposed[-len(rows) :],
    )
    expected = [hf_greedy(target, p, 24, eos=None) for p in PROMPTS]
    assert [engine.generate(p, 24, stop_token_ids=[]).token_ids for p in PROMPTS] == expected
    batch = [engine.add(p, 24, stop_token_ids=[]) for p in PROMPTS]
    while engine.active:
        engine.step()
    assert [d.output for d in batch] == expected
    drafted = torch.cat([p.tokens for p in proposed])
    assert drafted.numel() > 0 and int(drafted.max()) < DRAFT_ROWS
    sampled = engine.generate(PROMPTS[1], 24, temperature=1.0, stop_token_ids=[])  # q padded to 272 rows
    assert sampled.stats.drafted > 0


def test_tokenizers_that_disagree_are_refused_naming_the_first_differing_token(tmp_path):
    target, _ = save_chat_pair(tmp_path / "a", "chatml")
    _, draft = save_chat_pair(tmp_path / "b", "llama3")
    with pytest.raises(IncompatibleDraftError, match="id 256.*<\\|endoftext\\|>.*<\\|begin_of_text\\|>"):
        SpecEngine.from_pretrained(str(target), draft=str(draft))


def test_shared_vocabulary_rules():
    tokens = byte_tokenizer("chatml")
    listed = [tokens.convert_ids_to_tokens(i) for i in range(len(tokens))]
    assert shared_vocabulary(272, 264, listed, listed).rows == 264
    assert shared_vocabulary(264, 272, listed, listed).rows == 264  # a draft with more rows: padding too
    assert shared_vocabulary(128, 128, None, None).checked_tokens == 0
    with pytest.raises(IncompatibleDraftError, match="only 200 output rows"):
        shared_vocabulary(272, 200, listed, listed)
    with pytest.raises(IncompatibleDraftError, match="both tokenizers"):
        shared_vocabulary(272, 264, listed, None)


@pytest.mark.parametrize("loss", ["fkl", "rkl", "jsd", "tvd", "ce"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_traces_of_a_padded_pair_train_its_draft(padded_pair, loss, lora):
    """The target's top-K includes ids beyond the draft's rows (its padding rows are random here):
    they leave the support, and training steps stay finite, lower the loss and raise expected
    acceptance."""
    target, draft = padded_pair
    engine = SpecEngine.from_pretrained(str(target), draft=str(draft), num_speculative_tokens=3)
    traces = []
    for i, prompt in enumerate(PROMPTS * 3):
        out = engine.generate(prompt, 20, temperature=1.0, seed=i, stop_token_ids=[], top_logprobs=16)
        traces.append(trace_of(f"r{i}", "-", "target", ("draft:base",), prompt, out, {"temperature": 1.0}))
    assert any(int(t.top_ids.max()) >= DRAFT_ROWS for t in traces)  # the case this test is about
    model = engine.proposer.model
    model = wrap_lora(model) if lora else model
    model.train()
    before = mean_acceptance(trace_acceptance(model, traces, 64))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    values = []
    for _ in range(15):
        batch = make_batch(traces, 64, vocab=DRAFT_ROWS)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        per_position = topk_loss(loss, logits, batch.top_ids, batch.top_logprobs, batch.emitted)
        value = (per_position * batch.mask).sum() / batch.mask.sum()
        assert torch.isfinite(value)
        values.append(float(value))
        optimizer.zero_grad()
        value.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()
    assert values[-1] < values[0]
    if loss != "ce":  # cross-entropy fits the sampled tokens, not the distribution acceptance measures
        assert mean_acceptance(trace_acceptance(model, traces, 64)) > before


def test_a_hot_swapped_version_of_a_padded_draft_still_drafts_over_the_targets_rows(
    padded_pair, redis_server
):
    target, draft = padded_pair
    client = redis_server.client()
    config = ReplicaConfig(
        target=str(target), draft=str(draft), draft_name="padded", num_speculative_tokens=3, adaptive_k=False,
        stream=StreamConfig(stream="t:padded"), metrics=MetricsConfig(prefix="t:padded:m"),
    )  # fmt: skip
    replica = Replica(config, client)
    try:
        weights = AutoModelForCausalLM.from_pretrained(draft).state_dict()
        Registry(client).publish("padded", {name: t * 1.01 for name, t in weights.items()})
        wait_for(lambda: replica.status()["swaps"] == 1)
        finished = asyncio.run(replica.complete(Request(PROMPTS[1], 24, temperature=1.0, stop_token_ids=[])))
        assert finished.draft_version == replica.draft_version != "padded:base"
        assert finished.generation.stats.drafted > 0 and len(finished.generation.token_ids) == 24
    finally:
        replica.close()
