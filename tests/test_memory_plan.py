"""The memory plan (serving.engine.memory) on real models' shapes, built as configs only: weights counted
on the meta device, KV bytes from the config, and the plan's fits, reductions and refusals worked
out by hand for two real pairs on two real cards; then the CUDA entry point's plumbing."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

import serving.engine.hf as engine_module
from serving.engine.device import DeviceProfile
from serving.engine.hf import SpecEngine
from serving.engine.memory import (
    ACTIVATION_RESERVE,
    GIB,
    MIN_MODEL_LEN,
    MemoryPlanError,
    ModelSize,
    kv_bytes_per_token,
    kv_shape,
    model_size,
    parameter_count,
    plan_memory,
    plan_on_device,
)
from serving.engine.vllm import cpu_kv_cache_bytes
from tiny_models import CONTEXT, build

BF16 = torch.bfloat16
# Published configs (the shapes that size memory), from each model's config.json.
LLAMA_31_8B = LlamaConfig(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, tie_word_embeddings=False,
)  # fmt: skip
LLAMA_32_1B = LlamaConfig(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, tie_word_embeddings=True,
)  # fmt: skip
QWEN25_7B = Qwen2Config(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
    num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, tie_word_embeddings=False,
)  # fmt: skip
QWEN25_05B = Qwen2Config(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True,
)  # fmt: skip
K = 4  # the verify step runs 5 tokens; a slot holds max_model_len + 64 (step_lookahead)
LOOKAHEAD = 64
ON_80 = {"device_bytes": 80 * GIB, "max_batch": 8, "k": K}
ON_24 = {"device_bytes": 24 * GIB, "max_batch": 8, "k": K}


@pytest.fixture(scope="module")
def llama() -> tuple[ModelSize, ModelSize]:
    return model_size(LLAMA_31_8B, BF16), model_size(LLAMA_32_1B, BF16)


@pytest.fixture(scope="module")
def qwen() -> tuple[ModelSize, ModelSize]:
    return model_size(QWEN25_7B, BF16), model_size(QWEN25_05B, BF16)


def test_kv_bytes_of_real_shapes():
    assert kv_bytes_per_token(LLAMA_31_8B, BF16) == 128 * 1024  # 2 x 32 layers x 8 heads x 128 x 2 bytes
    assert kv_bytes_per_token(LLAMA_32_1B, BF16) == 32 * 1024  # 2 x 16 x 8 x 64 x 2
    assert kv_bytes_per_token(QWEN25_7B, BF16) == 56 * 1024  # 2 x 28 x 4 x 128 x 2
    assert kv_bytes_per_token(QWEN25_7B, torch.float32) == 112 * 1024
    assert kv_bytes_per_token(QWEN25_05B, BF16) == 12 * 1024  # 2 x 24 x 2 x 64 x 2


def test_kv_shape_reads_gpt2_and_neox_names():
    gpt2 = GPT2Config(n_layer=12, n_head=12, n_embd=768)  # GPT-2 small: no grouped-query attention
    assert (kv_shape(gpt2).layers, kv_shape(gpt2).kv_heads, kv_shape(gpt2).head_dim) == (12, 12, 64)
    assert model_size(gpt2, BF16).context == 1024  # n_positions
    neox = GPTNeoXConfig(num_hidden_layers=32, num_attention_heads=32, hidden_size=4096)  # Pythia-6.9B
    assert kv_bytes_per_token(neox, torch.float16) == 2 * 32 * 32 * 128 * 2


def test_weights_of_real_shapes_counted_on_the_meta_device(llama, qwen):
    assert parameter_count(LLAMA_31_8B) == 8_030_261_248
    assert parameter_count(QWEN25_05B) == 494_032_768  # tied embeddings counted once
    target, draft = llama
    assert target == ModelSize(2 * 8_030_261_248, 128 * 1024, 131072)
    assert draft == ModelSize(2 * 1_235_814_400, 32 * 1024, 131072)
    assert qwen[0].weights == 2 * 7_615_616_512 and qwen[1].weights == 2 * 494_032_768
    assert model_size(QWEN25_7B, BF16, weights=123).weights == 123  # a loaded model's own bytes


# --- Llama-3.1-8B + Llama-3.2-1B on an 80 GiB card, 8 slots --------------------------------------
# budget = 0.8 x 80 GiB = 64 GiB = 68,719,476,736 B; activations 5% of it: 3,435,973,836 B
# weights = 2 x (8,030,261,248 + 1,235,814,400) = 18,532,151,296 B (17.26 GiB)
# left for caches: 68,719,476,736 - 3,435,973,836 - 18,532,151,296 = 46,751,351,604 B
# a position in both caches: 128 + 32 = 160 KiB; 8 slots and the prefill's copy: 9 x 163,840 B
# = 1,474,560 B a position -> 31,705 positions -> max_model_len 31,705 - 64 = 31,641 (31,488 in 256s)
# The full 131,072-token context needs 9 x 131,136 x 160 KiB = 180 GiB: it cannot fit.
LLAMA_LONGEST = 31_641


def test_llama_8b_full_context_is_reduced_to_what_fits_on_80_gib(llama):
    plan = plan_memory(*llama, **ON_80)
    assert plan.budget == 64 * GIB and plan.reserve == int(ACTIVATION_RESERVE * 64 * GIB)
    assert plan.in_use == 18_532_151_296
    assert plan.reduced and plan.context == 131072
    assert plan.max_model_len == LLAMA_LONGEST // MIN_MODEL_LEN * MIN_MODEL_LEN == 31_488
    assert plan.capacity == 31_488 + LOOKAHEAD and plan.slots == 8
    assert plan.target_kv == 8 * plan.capacity * 128 * 1024 and plan.draft_kv == 8 * plan.capacity * 32 * 1024
    assert plan.prefill == plan.capacity * 160 * 1024  # one slot more, in both caches
    assert plan.total == plan.in_use + plan.target_kv + plan.draft_kv + plan.prefill + plan.reserve
    assert 0 <= plan.headroom == plan.budget - plan.total < 9 * MIN_MODEL_LEN * 160 * 1024
    plan_memory(*llama, **ON_80, max_model_len=LLAMA_LONGEST)  # fits
    with pytest.raises(MemoryPlanError):
        plan_memory(*llama, **ON_80, max_model_len=LLAMA_LONGEST + 1)


def test_llama_8b_full_context_asked_for_is_refused_with_the_numbers(llama):
    with pytest.raises(MemoryPlanError) as refused:
        plan_memory(*llama, **ON_80, max_model_len=131072)
    message = str(refused.value)
    assert "8 slots of 131072 tokens" in message and "need 180.09 GiB of KV cache" in message
    assert "43.54 GiB is left of the replica's 64.00 GiB" in message and "17.26 GiB of weights" in message
    # what fits: the longest sequences at 8 slots; 2 x 131,136 x 160 KiB = 40 GiB, plus the prefill's: 1 slot
    assert f"max_model_len {LLAMA_LONGEST} at max_batch 8" in message
    assert "max_batch 1 at max_model_len 131072" in message


def test_llama_8b_at_8k_by_8_fits_80_gib_as_asked(llama):
    plan = plan_memory(*llama, **ON_80, max_model_len=8192)
    assert not plan.reduced and plan.max_model_len == 8192 and plan.capacity == 8256
    assert plan.target_kv == 8 * 8256 * 128 * 1024 and plan.draft_kv == 8 * 8256 * 32 * 1024
    assert plan.headroom > 0
    lines = plan.render().splitlines()
    assert 3 <= len(lines) <= 8
    text = " ".join(lines)
    assert "64.00 GiB, 0.80 of the device's 80.00 GiB" in text
    assert "weights: target 14.96 GiB, draft 2.30 GiB" in text
    assert "8 slots x 8256 positions (max_model_len 8192, + 64 lookahead)" in text
    assert f"target {8 * 8256 * 128 / 2**20:.2f} GiB (128 KiB a token), draft" in text
    assert "trainer: no share of this device" in text and "of 64.00 GiB" in text


# --- Qwen2.5-7B + Qwen2.5-0.5B on a 24 GiB card, 8 slots -----------------------------------------
# KV a token: 7B: 28 layers x 4 kv heads x 128 head_dim x 2 (k, v) x 2 bytes = 57,344 B (56 KiB);
#             0.5B: 24 x 2 x 64 x 2 x 2 = 12,288 B (12 KiB); both: 69,632 B
# weights = 2 x (7,615,616,512 + 494,032,768) = 16,219,298,560 B (15.11 GiB)
# budget = int(0.8 x 24 GiB) = 20,615,843,020 B; activations int(5% of it) = 1,030,792,151 B
# left for caches: 20,615,843,020 - 1,030,792,151 - 16,219,298,560 = 3,365,752,309 B
# 9 x 69,632 = 626,688 B a position -> 5,370 positions -> max_model_len 5,306 (5,120 in 256s)
QWEN_LONGEST = 5_306


def test_qwen_7b_on_24_gib_reduces_its_32k_context(qwen):
    plan = plan_memory(*qwen, **ON_24)
    assert plan.budget == 20_615_843_020 and plan.reserve == 1_030_792_151
    assert plan.in_use == 16_219_298_560
    assert plan.target_kv_per_token == 57_344 and plan.draft_kv_per_token == 12_288
    assert plan.reduced and plan.max_model_len == 5_120 and plan.context == 32768
    assert "the target's context 32768 reduced to fit" in plan.render()
    assert plan_memory(*qwen, **ON_24, max_model_len=4096).headroom > 0
    with pytest.raises(MemoryPlanError, match=f"what fits: max_model_len {QWEN_LONGEST} at max_batch 8"):
        plan_memory(*qwen, **ON_24, max_model_len=32768)
    one = plan_memory(*qwen, device_bytes=24 * GIB, max_batch=1, k=K)  # 2 x 69,632 B a position
    assert 3_365_752_309 // (2 * 69_632) - LOOKAHEAD == 24_104 and one.max_model_len == 24_064 and one.reduced


def test_weights_alone_over_the_budget_are_refused(llama):
    # 0.8 x 16 GiB = 12.8 GiB, less than the pair's 17.26 GiB of weights
    with pytest.raises(MemoryPlanError) as refused:
        plan_memory(*llama, device_bytes=16 * GIB, max_batch=8, k=K)
    message = str(refused.value)
    assert message.startswith("the weights alone do not fit") and "17.26 GiB of weights" in message
    assert "12.80 GiB (0.80 of 16.00 GiB)" in message and "a device of" in message
    assert "max_batch" not in message.split("what fits")[1]  # no slot count helps


def test_not_even_the_minimal_length_fits(qwen):
    # 20 GiB: a budget of 16 GiB less 16,219,298,560 of weights and 858,993,459 (5%) leaves
    # 101,577,165 B for caches: 9 x 320 x 69,632 B = 200.5 MB do not fit; 4 x 320 x 69,632 B = 89.1 MB
    # (3 slots and the prefill's copy) do
    with pytest.raises(MemoryPlanError) as refused:
        plan_memory(*qwen, device_bytes=20 * GIB, max_batch=8, k=K)
    message = str(refused.value)
    assert message.startswith(f"not even {MIN_MODEL_LEN} tokens a slot fit")
    assert f"max_batch 3 at max_model_len {MIN_MODEL_LEN}" in message
    plan = plan_memory(*qwen, device_bytes=20 * GIB, max_batch=3, k=K, max_model_len=MIN_MODEL_LEN)
    assert plan.headroom >= 0


def test_the_trainer_share_is_reported_and_may_not_overcommit_the_device(qwen):
    plan = plan_memory(*qwen, **ON_24, trainer_share=0.15)
    assert plan.trainer_share == 0.15 and plan.trainer_bytes == int(0.15 * 24 * GIB)
    assert "trainer: 0.15 of the device, 3.60 GiB" in plan.render()
    with pytest.raises(MemoryPlanError, match="add up to 1.05"):
        plan_memory(*qwen, **ON_24, gpu_memory_utilization=0.9, trainer_share=0.15)
    whole = plan_memory(*qwen, **ON_24, gpu_memory_utilization=0.85, trainer_share=0.15)
    assert whole.budget == int(0.85 * 24 * GIB)


def test_measured_use_and_free_memory_bound_the_plan(qwen):
    measured = 16_219_298_560 + GIB  # weights plus a CUDA context and allocator blocks
    plan = plan_memory(*qwen, **ON_24, in_use=measured)
    assert plan.in_use == measured and "in use after loading 16.11 GiB" in plan.render()
    assert plan.max_model_len < plan_memory(*qwen, **ON_24).max_model_len
    # another process holds part of the replica's share: only 2 GiB is free after loading
    plan = plan_memory(*qwen, **ON_24, free_bytes=2 * GIB)
    assert plan.available == 16_219_298_560 + 2 * GIB < plan.budget and plan.headroom >= 0
    assert "the rest is not free" in plan.render()
    with pytest.raises(MemoryPlanError, match="what the device has free"):
        plan_memory(*qwen, **ON_24, max_model_len=4096, free_bytes=GIB)


def test_a_target_alone_and_a_short_context(qwen):
    target = qwen[0]
    plan = plan_memory(target, device_bytes=80 * GIB, max_batch=8, k=0)
    assert plan.max_model_len == 32768 and not plan.reduced and plan.capacity == 32768 + LOOKAHEAD
    assert plan.draft_weights == plan.draft_kv == plan.draft_kv_per_token == 0
    assert "draft" not in plan.render()
    tiny = ModelSize(weights=1000, kv_per_token=100, context=200)  # shorter than MIN_MODEL_LEN
    assert plan_memory(tiny, device_bytes=10**6, max_batch=2, k=3).max_model_len == 200
    with pytest.raises(MemoryPlanError, match="not even 200 tokens a slot fit"):
        plan_memory(tiny, device_bytes=5 * 10**4, max_batch=2, k=3)


@pytest.mark.parametrize(
    "knobs, message",
    [
        ({"max_batch": 0}, "max_batch >= 1"),
        ({"k": -1}, "k >= 0"),
        ({"max_model_len": 0}, "max_model_len >= 1"),
        ({"device_bytes": 0}, "device_bytes >= 1"),
        ({"gpu_memory_utilization": 0.0}, "0 < gpu_memory_utilization <= 1"),
        ({"gpu_memory_utilization": 1.5}, "0 < gpu_memory_utilization <= 1"),
        ({"trainer_share": -0.1}, "0 <= trainer_share < 1"),
        ({"max_model_len": 65536}, "max_model_len 65536 is beyond the target's context 32768"),
    ],
)
def test_bad_knobs_are_value_errors(qwen, knobs, message):
    with pytest.raises(ValueError, match=message):
        plan_memory(*qwen, **(ON_24 | knobs))


def test_a_target_without_a_stated_context_needs_a_length():
    target = ModelSize(weights=1000, kv_per_token=100, context=None)
    with pytest.raises(ValueError, match="give max_model_len"):
        plan_memory(target, device_bytes=10**9, max_batch=1, k=0)
    assert plan_memory(target, device_bytes=10**9, max_batch=1, k=0, max_model_len=512).max_model_len == 512


def test_plan_on_device_measures_the_device_and_what_the_models_hold(monkeypatch):
    """The CUDA entry point's plumbing, on CPU models: torch.cuda's two readings are stood in for
    (the device's free and total bytes, the allocator's reserve); the weights are the models' own."""
    target, draft = build("llama", 2, 64, seed=1), build("llama", 1, 32, seed=2)  # float32
    total, reserved, free = 10 * 2**20, 2 * 2**20, 5 * 2**20
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, total))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: reserved)
    plan = plan_on_device(target, draft, max_batch=2, k=3, trainer_share=0.15)
    for model, weights, per_token in ((target, plan.target_weights, plan.target_kv_per_token),
                                      (draft, plan.draft_weights, plan.draft_kv_per_token)):  # fmt: skip
        assert weights == 4 * sum(p.numel() for p in model.parameters())
        assert per_token == kv_bytes_per_token(model.config, torch.float32)
    assert (plan.device_bytes, plan.in_use, plan.trainer_share) == (total, reserved, 0.15)
    assert plan.budget == int(0.8 * total) and plan.available == reserved + free  # less than the budget
    assert plan.max_model_len == CONTEXT and plan.slots == 2


def test_the_engine_sizes_its_static_caches_by_the_plan(tmp_path, monkeypatch):
    """from_pretrained's CUDA path on CPU models: the static profile CUDA gets and torch.cuda's two
    readings are stood in for. With no length asked, the 4096-token context that does not fit is
    reduced; the engine's slots, capacity and request length are the plan's."""
    for name, layers, hidden in (("target", 2, 64), ("draft", 1, 32)):
        model = build("llama", layers, hidden, seed=layers)
        model.config.max_position_embeddings = 4096
        model.save_pretrained(tmp_path / name)
    sizes = [model_size(AutoConfig.from_pretrained(tmp_path / n), torch.float32) for n in ("target", "draft")]
    weights, per_token = sum(s.weights for s in sizes), sum(s.kv_per_token for s in sizes)
    total = int((weights + 3 * 700 * per_token) / (0.8 * (1 - ACTIVATION_RESERVE)))  # 2 slots + prefill
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (total - weights, total))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: weights)
    monkeypatch.setattr(
        engine_module, "profile_for",
        lambda device, dtype, memory_fraction: DeviceProfile(torch.float32, static_cache=True),
    )  # fmt: skip
    engine = SpecEngine.from_pretrained(str(tmp_path / "target"), str(tmp_path / "draft"), max_batch=2)
    plan = engine.memory_plan
    assert plan.reduced and engine.max_length == plan.max_model_len == 512  # 700 - 64 in 256s
    assert (engine.cache.slots, engine.cache.capacity) == (2, plan.capacity) == (2, 512 + 64)
    assert engine.proposer.cache.capacity == plan.capacity
    with pytest.raises(MemoryPlanError, match="does not fit"):
        SpecEngine.from_pretrained(str(tmp_path / "target"), max_batch=2, max_model_len=4096)


def test_vllm_s_cpu_kv_cache_holds_the_batch_of_target_and_draft_at_float32():
    # Qwen 7B + 0.5B at float32: (112 + 24) KiB a token; 8 sequences of 4,096 + 4 tokens.
    assert cpu_kv_cache_bytes(QWEN25_7B, QWEN25_05B, 4096, 8, 4) == 136 * 1024 * 8 * 4100
    tiny = LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    assert cpu_kv_cache_bytes(tiny, None, 256, 8, 0) == 64 * 2**20  # the floor
