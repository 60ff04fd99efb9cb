"""`osd check`, the preflight, on tiny saved pairs (with tokenizers built here), and the memory
estimate (serving.memory) on real models' shapes, built as configs only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

from deploy.check import main, parser
from serving.memory import GIB, estimate, kv_bytes_per_token, kv_cache_bytes, kv_shape, parameter_count
from tiny_models import VOCAB, build

TOKENS = 120  # the tiny tokenizer's tokens: fewer than the models' VOCAB (128) rows
CHAT = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def tokenizer(tokens: int = TOKENS, swap: int | None = None, chat: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of `tokens` tokens; `swap`: that id gets another token."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, tokens)}
    if swap is not None:
        vocab = {("other" if i == swap else t): i for t, i in vocab.items()}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=word_level, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = CHAT if chat else None
    return fast


def save(path: Path, arch: str, layers: int, hidden: int, seed: int, vocab: int = VOCAB, tok=None) -> str:
    build(arch, layers, hidden, seed, vocab=vocab).save_pretrained(path)
    if tok is not None:
        tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, str]:
    """A target and drafts: same tokenizer; padded (fewer rows); disagreeing tokenizer; none."""
    root = tmp_path_factory.mktemp("check")
    return {
        "target": save(root / "target", "llama", 2, 64, seed=1, tok=tokenizer()),
        "draft": save(root / "draft", "llama", 1, 32, seed=2, tok=tokenizer()),
        "padded": save(root / "padded", "llama", 1, 32, seed=3, vocab=TOKENS, tok=tokenizer()),
        "disagrees": save(root / "disagrees", "llama", 1, 32, seed=4, tok=tokenizer(swap=7)),
        "bare": save(root / "bare", "llama", 1, 32, seed=5, vocab=TOKENS),
        "no-template": save(root / "no-template", "gpt2", 1, 32, seed=6, tok=tokenizer(chat=False)),
    }


def check(argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, printed report) of `osd check argv`."""
    try:
        main(argv)
        status = 0
    except SystemExit as exit_:
        status = exit_.code
    return status, " ".join(capsys.readouterr().out.split())  # lines joined: wrapping cannot split words


def test_a_good_pair_reports_every_item_and_a_speedup_bound(pair, capsys, tmp_path):
    out_json = tmp_path / "check.json"
    status, out = check(
        ["--target", pair["target"], "--draft", pair["draft"], "--json", str(out_json)], capsys
    )
    assert status == 0, out
    for item in ("architecture", "tokenizer", "vocabulary", "chat template", "trees", "context", "memory",
                 "cost ratio", "speedup bound", "ready to serve"):  # fmt: skip
        assert item in out
    assert "LlamaForCausalLM" in out and "agree on all 120 tokens" in out and "padded" not in out
    assert "FAIL" not in out
    report = json.loads(out_json.read_text())
    assert report["ready"] and report["cost_ratio_c"] > 0
    assert [b["alpha"] for b in report["speedup"]] == [0.5, 0.6, 0.7, 0.8]
    assert all(1 <= b["best_k"] <= 8 and b["speedup"] > 0 for b in report["speedup"])
    memory = report["memory"]
    assert memory["max_model_len"] == 256 and memory["max_batch"] == 8  # the target's context, the default
    # 2 layers x 2 KV heads x head_dim 16, float32; the draft: 1 layer
    assert memory["target"]["kv_cache"] == 2 * 2 * 2 * 16 * 4 * 8 * 256
    assert memory["draft"]["kv_cache"] == 2 * 1 * 2 * 8 * 4 * 8 * 256
    assert memory["total"] == sum(memory[m]["weights"] + memory[m]["kv_cache"] for m in ("target", "draft"))


def test_a_padded_draft_is_fine_and_reported_as_padded(pair, capsys):
    status, out = check(
        ["--target", pair["target"], "--draft", pair["padded"], "--max-model-len", "64"], capsys
    )
    assert status == 0, out
    assert "padded: the target has 128 output rows, the draft 120" in out
    assert "proposes ids below 120" in out and "serving up to 64 tokens" in out


def test_tokenizers_that_disagree_name_the_first_differing_token(pair, capsys):
    status, out = check(["--target", pair["target"], "--draft", pair["disagrees"]], capsys)
    assert status == 1
    assert "the tokenizers disagree at id 7: the target has 'w7', the draft 'other'" in out
    assert "cannot serve" in out and "cost ratio" not in out  # c is not measured for a pair that cannot serve


def test_a_draft_without_tokenizer_and_other_rows_cannot_serve(pair, capsys):
    status, out = check(["--target", pair["target"], "--draft", pair["bare"]], capsys)
    assert status == 1
    assert "the draft has 120 output rows and the target 128" in out and "cannot serve" in out


def test_no_chat_template_is_a_note_and_gpt2_checks(pair, capsys):
    status, out = check(["--target", pair["no-template"], "--max-batch", "2"], capsys)
    assert status == 0, out
    assert "GPT2LMHeadModel" in out and 'chat prompts become "<role>: <content>" lines' in out
    assert "for 2 x 256 tokens" in out and "cost ratio" not in out  # no draft: no c


@pytest.mark.parametrize("what", ["missing", "not a causal LM", "no tokenizer"])
def test_a_target_that_cannot_serve_says_why_without_a_traceback(what, pair, capsys, tmp_path):
    from transformers import ViTConfig, ViTModel

    if what == "missing":
        target, expected = str(tmp_path / "nowhere"), "no such directory"
    elif what == "not a causal LM":
        target, expected = str(tmp_path / "vit"), "could not load a causal LM"
        vit = ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        image_size=8, patch_size=4)  # fmt: skip
        ViTModel(vit).save_pretrained(target)
    else:
        target, expected = pair["bare"], "the target has none"
    status, out = check(["--target", target, "--draft", pair["draft"]], capsys)
    assert status == 1
    assert expected in out and "FAIL" in out and "cannot serve" in out and "Traceback" not in out


def test_a_memory_budget_too_small_or_a_length_too_long_fails(pair, capsys):
    status, out = check(["--target", pair["target"], "--memory-gib", "0.0001"], capsys)
    assert status == 1 and "beyond --memory-gib 0.0001" in out
    status, out = check(["--target", pair["target"], "--max-model-len", "4096"], capsys)
    assert status == 1 and "--max-model-len 4096 is beyond the target's context" in out


def test_the_parser_is_osd_check():
    p = parser()
    assert p.prog == "osd check"
    args = p.parse_args(["--target", "t"])
    assert args.draft is None and args.max_batch == 8 and args.max_model_len is None


# --- serving.memory on real shapes, configs only ----------------------------------------------

LLAMA_31_8B = LlamaConfig(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, tie_word_embeddings=False,
)  # fmt: skip
QWEN25_7B = Qwen2Config(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
    num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, tie_word_embeddings=False,
)  # fmt: skip
QWEN25_05B = Qwen2Config(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True,
)  # fmt: skip


def test_kv_cache_of_real_shapes():
    assert kv_bytes_per_token(LLAMA_31_8B, torch.bfloat16) == 128 * 1024  # 2 x 32 x 8 x 128 x 2 bytes
    assert kv_cache_bytes(LLAMA_31_8B, torch.bfloat16, 1, 131072) == 16 * GIB  # its full context
    assert kv_bytes_per_token(QWEN25_7B, torch.bfloat16) == 56 * 1024  # 2 x 28 x 4 x 128 x 2
    assert kv_bytes_per_token(QWEN25_7B, torch.float32) == 112 * 1024
    assert kv_cache_bytes(QWEN25_7B, torch.bfloat16, 8, 4096) == 8 * 4096 * 56 * 1024
    assert kv_bytes_per_token(QWEN25_05B, torch.bfloat16) == 12 * 1024  # 2 x 24 x 2 x 64 x 2


def test_kv_shape_reads_gpt2_and_neox_names():
    from transformers import GPT2Config, GPTNeoXConfig

    gpt2 = GPT2Config(n_layer=12, n_head=12, n_embd=768)  # GPT-2 small: no grouped-query attention
    assert (kv_shape(gpt2).layers, kv_shape(gpt2).kv_heads, kv_shape(gpt2).head_dim) == (12, 12, 64)
    neox = GPTNeoXConfig(num_hidden_layers=32, num_attention_heads=32, hidden_size=4096)  # Pythia-6.9B
    assert kv_bytes_per_token(neox, torch.float16) == 2 * 32 * 32 * 128 * 2


def test_weights_of_real_shapes_counted_on_the_meta_device():
    assert parameter_count(LLAMA_31_8B) == 8_030_261_248
    assert parameter_count(QWEN25_05B) == 494_032_768  # tied embeddings counted once
    plan = estimate(LLAMA_31_8B, None, torch.bfloat16, max_batch=4, max_model_len=8192)
    assert plan.target.weights == 2 * 8_030_261_248 and plan.draft is None
    assert plan.target.kv_cache == 4 * 8192 * 128 * 1024 == 4 * GIB
    assert plan.total == plan.target.weights + 4 * GIB
    with pytest.raises(ValueError):
        estimate(LLAMA_31_8B, None, torch.bfloat16, max_batch=0, max_model_len=8192)
