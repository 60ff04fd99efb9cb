"""What the trainer holds and computes in, so that it fits beside serving on a GPU, checked on CPU:
bf16 autocast over float32 master weights, LoRA by default for large drafts (real shapes counted
on the meta device), a bounded sequence length, and its memory cap on the device it trains on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from distill.batches import make_batch
from distill.heads import HeadsSpec, heads_batch
from distill.lora import LoraSpec
from serving.engine.hf import SpecEngine
from serving.tracing import trace_of
from store.traces import Trace
from trainer.actor import claim_device
from trainer.config import TrainerConfig
from trainer.learners import DraftLearner, HeadsLearner, autocast, default_lora

# Llama-3.2-1B's shapes (1.24B parameters, tied embeddings): a draft of a real size.
LLAMA_1B = LlamaConfig(
    vocab_size=128_256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131_072, tie_word_embeddings=True,
)  # fmt: skip


@pytest.fixture(scope="module")
def traces(model_dirs) -> list[Trace]:
    """Sampled traces of the tiny llama target, with its top-16 and hidden states logged."""
    engine = SpecEngine.from_pretrained(model_dirs["llama"]["target"])
    rng = np.random.default_rng(0)
    made = []
    for i in range(8):
        prompt = rng.integers(3, 128, 6).tolist()
        out = engine.generate(
            prompt, 24, temperature=1.0, seed=i, stop_token_ids=[], top_logprobs=16, hidden_states=True
        )
        made.append(trace_of(f"req-{i}", "code", "tiny-llama", ("draft:v1",), prompt, out, {}))
    return made


def test_autocast_is_bf16_on_cuda_by_default_and_off_on_cpu():
    assert TrainerConfig(device="cuda").autocast == torch.bfloat16
    assert TrainerConfig(device="cuda:1").autocast == torch.bfloat16
    assert TrainerConfig().autocast is None  # CPU
    assert TrainerConfig(autocast_dtype="bfloat16").autocast == torch.bfloat16
    assert TrainerConfig(device="cuda", autocast_dtype=None).autocast is None
    with pytest.raises(ValueError, match="autocast_dtype"):
        TrainerConfig(autocast_dtype="float8")


def test_a_draft_trains_under_bf16_autocast_with_float32_master_weights(model_dirs, traces):
    config = TrainerConfig(autocast_dtype="bfloat16", learning_rate=3e-3, lora_min_params=None)
    learner = DraftLearner(config, model_dirs["llama"]["small"])
    model = learner.build()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
    logits_dtypes, losses = [], []
    model.lm_head.register_forward_hook(lambda module, args, out: logits_dtypes.append(out.dtype))
    model.train()
    for _ in range(8):  # one fixed batch
        with autocast(config):
            loss = learner.loss(model, traces)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert set(logits_dtypes) == {torch.bfloat16}  # the forward ran in bf16
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the master weights did not
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    learnt = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(learnt) == len(before)  # every weight got a gradient through the bf16 forward
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())  # and moved
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_large_drafts_train_a_lora_adapter_by_default(model_dirs):
    small = model_dirs["llama"]["small"]
    params = sum(p.numel() for p in DraftLearner(TrainerConfig(), small).build().parameters())
    assert DraftLearner(TrainerConfig(), small).kind == "full"  # far below 100M parameters
    assert DraftLearner(TrainerConfig(lora_min_params=params + 1), small).kind == "full"
    learner = DraftLearner(TrainerConfig(lora_min_params=params), small)
    assert (learner.kind, learner.lora, learner.extra) == ("lora", LoraSpec(), {"lora": vars(LoraSpec())})
    model = learner.build()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert set(learner.weights(model)) == {n.replace(".default", "") for n in trainable}
    explicit = LoraSpec(rank=4, alpha=8)  # an explicit spec wins, whatever the size
    assert DraftLearner(TrainerConfig(lora=explicit, lora_min_params=None), small).lora == explicit


def test_a_draft_of_a_real_size_is_counted_on_the_meta_device_and_gets_lora(tmp_path):
    LLAMA_1B.save_pretrained(tmp_path / "llama-1b")  # the config alone: no weights exist
    learner = DraftLearner(TrainerConfig(), tmp_path / "llama-1b")
    assert learner.kind == "lora" and learner.lora == LoraSpec()
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(LLAMA_1B).parameters())
    assert 1.2e9 < params < 1.3e9
    assert default_lora(TrainerConfig(lora_min_params=params + 1), LLAMA_1B) is None
    assert default_lora(TrainerConfig(lora_min_params=None), LLAMA_1B) is None  # always full
    gpt2_large = GPT2Config(n_embd=1280, n_layer=36, n_head=20)  # 774M, no q_proj: the default does not fit
    with pytest.raises(ValueError, match=r"no modules named .*q_proj.*set the trainer's lora"):
        default_lora(TrainerConfig(), gpt2_large)


def test_traces_are_cut_to_max_seq_len(model_dirs, traces):
    assert TrainerConfig().max_seq_len == 2_048  # not the target's context
    long_prompt = trace_with(traces[0], prompt=3_000, output=100)
    long_output = trace_with(traces[0], prompt=6, output=3_000)
    learner = DraftLearner(TrainerConfig(), model_dirs["llama"]["small"])
    batch = make_batch([long_prompt, long_output], TrainerConfig().max_seq_len)
    assert batch.input_ids.shape == (2, 2_048)  # the output end of each
    assert batch.mask.sum(-1).tolist() == [100, 2_048]
    assert [learner.positions(t) for t in (long_prompt, long_output)] == [100, 2_048]
    heads = HeadsSpec("medusa", 3)
    rows = heads_batch([long_output], 3, max_rows=2_048)
    assert rows.hidden.shape[0] == 2_048
    torch.testing.assert_close(rows.hidden[-1], torch.from_numpy(long_output.hidden[-4].astype(np.float32)))
    heads_learner = HeadsLearner(TrainerConfig(heads=heads), model_dirs["llama"]["target"], heads)
    assert heads_learner.positions(long_output) == 2_048 * 3


def trace_with(trace: Trace, prompt: int, output: int) -> Trace:
    """`trace` with its prompt and its output repeated to these lengths."""

    def repeat(a: np.ndarray, n: int) -> np.ndarray:
        return np.resize(a, (n, *a.shape[1:]))

    return Trace(
        request_id="long", time=0.0, domain="code", target_id="t", draft_versions=(),
        prompt_ids=repeat(trace.prompt_ids, prompt), output_ids=repeat(trace.output_ids, output),
        top_ids=repeat(trace.top_ids, output), top_logprobs=repeat(trace.top_logprobs, output),
        drafted=trace.drafted, accepted=trace.accepted, hidden=repeat(trace.hidden, output),
    )  # fmt: skip


def test_on_cuda_the_trainer_caps_its_memory_on_the_device_it_trains_on(monkeypatch):
    capped = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)  # what Ray's assignment made current
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: capped.append((f, d)))
    assert claim_device(TrainerConfig(device="cuda")) == torch.device("cuda", 1)
    assert claim_device(TrainerConfig(device="cuda:0", gpu_memory_fraction=0.2)) == torch.device("cuda", 0)
    assert capped == [(0.15, torch.device("cuda", 1)), (0.2, torch.device("cuda", 0))]
    assert claim_device(TrainerConfig()) == torch.device("cpu") and len(capped) == 2  # no cap off CUDA
