"""`osd check`, the preflight, on tiny saved pairs (with tokenizers built here). The memory plan
itself, on real models' shapes, is tests/test_memory_plan.py's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, PreTrainedTokenizerFast

from deploy.check import main, parser
from serving.engine.memory import ACTIVATION_RESERVE, GIB, model_size
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


def save(
    path: Path, arch: str, layers: int, hidden: int, seed: int, vocab: int = VOCAB, tok=None, context=None
) -> str:
    model = build(arch, layers, hidden, seed, vocab=vocab)
    if context is not None:  # RoPE: any context; the config states it
        model.config.max_position_embeddings = context
    model.save_pretrained(path)
    if tok is not None:
        tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, str]:
    """A target and drafts: same tokenizer; padded (fewer rows); disagreeing tokenizer; none; and a
    target that states a 4096-token context."""
    root = tmp_path_factory.mktemp("check")
    return {
        "target": save(root / "target", "llama", 2, 64, seed=1, tok=tokenizer()),
        "draft": save(root / "draft", "llama", 1, 32, seed=2, tok=tokenizer()),
        "padded": save(root / "padded", "llama", 1, 32, seed=3, vocab=TOKENS, tok=tokenizer()),
        "disagrees": save(root / "disagrees", "llama", 1, 32, seed=4, tok=tokenizer(swap=7)),
        "bare": save(root / "bare", "llama", 1, 32, seed=5, vocab=TOKENS),
        "no-template": save(root / "no-template", "gpt2", 1, 32, seed=6, tok=tokenizer(chat=False)),
        "long": save(root / "long", "llama", 2, 64, seed=1, tok=tokenizer(), context=4096),
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
    memory = report["memory"]  # the plan, on this machine's memory
    assert memory["max_model_len"] == 256 and memory["slots"] == 8 and not memory["reduced"]  # the defaults
    assert memory["capacity"] == 256 + 64 and memory["k"] == 3 and memory["trainer_share"] == 0.15
    # 2 layers x 2 KV heads x head_dim 16, float32; the draft: 1 layer x 2 x 8
    assert memory["target_kv_per_token"] == 2 * 2 * 2 * 16 * 4 == 512
    assert memory["draft_kv_per_token"] == 2 * 1 * 2 * 8 * 4 == 128
    assert memory["target_kv"] == 8 * 320 * 512 and memory["draft_kv"] == 8 * 320 * 128
    assert memory["in_use"] == memory["target_weights"] + memory["draft_weights"] > 0
    assert memory["total"] + memory["headroom"] == memory["available"] <= memory["budget"]
    assert report["memory_plan"] and "memory plan: replica:" in out and "trainer: 0.15 of the device" in out


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
    assert status == 1 and "the weights alone do not fit" in out and "cannot serve" in out
    status, out = check(["--target", pair["target"], "--max-model-len", "4096"], capsys)
    assert status == 1 and "--max-model-len 4096 is beyond the target's context" in out


def device_gib(path: str, draft: str | None, positions: float) -> str:
    """--memory-gib for a device whose replica (0.8 of it) holds the models' float32 weights, the
    activation reserve, and room for exactly `positions` positions of their caches."""
    sizes = [model_size(AutoConfig.from_pretrained(p), torch.float32) for p in (path, draft) if p]
    room = positions * sum(s.kv_per_token for s in sizes) + sum(s.weights for s in sizes)
    return repr(room / (0.8 * (1 - ACTIVATION_RESERVE)) / GIB)


def test_a_plan_that_does_not_fit_is_refused_with_what_fits(pair, capsys):
    # room for 3.5 slots of 320 positions: 2 slots and the prefill's copy of one, at 256 + 64 lookahead
    memory = device_gib(pair["target"], pair["draft"], 3.5 * 320)
    argv = ["--target", pair["target"], "--draft", pair["draft"], "--memory-gib", memory]
    argv += ["--max-model-len", "256"]
    status, out = check(argv, capsys)
    assert status == 1 and "does not fit: 8 slots of 256 tokens (+ 64 lookahead)" in out
    assert "max_batch 2 at max_model_len 256" in out and "cannot serve" in out and "cost ratio" not in out
    status, out = check([*argv, "--max-batch", "2"], capsys)
    assert status == 0, out
    assert "for 2 x 256 tokens" in out and "2 slots x 320 positions" in out and "ready to serve" in out


def test_a_long_context_that_does_not_fit_is_reduced_and_noted(pair, capsys):
    # room for 9 x 1464 positions: 8 slots of 1400 + 64, and the prefill's copy; 1280 in 256s
    memory = device_gib(pair["long"], None, 9 * 1464)
    status, out = check(["--target", pair["long"], "--memory-gib", memory], capsys)
    assert status == 0, out
    assert "the target's context 4096 does not fit 8 slots: planned for 1280 tokens a sequence" in out
    assert "the target's context 4096 reduced to fit" in out and "ready to serve" in out


def test_the_replica_and_the_trainer_may_not_share_more_than_the_device(pair, capsys):
    status, out = check(["--target", pair["target"], "--gpu-memory-utilization", "0.9"], capsys)
    assert status == 1 and "the replica's 0.90 and the trainer's 0.15 of the device add up to 1.05" in out
    argv = ["--target", pair["target"], "--gpu-memory-utilization", "0.9", "--trainer-share", "0"]
    status, out = check(argv, capsys)
    assert status == 0, out
    assert "0.90 of the device's" in out and "trainer: no share of this device" in out


def test_the_parser_is_osd_check():
    p = parser()
    assert p.prog == "osd check"
    args = p.parse_args(["--target", "t"])
    assert args.draft is None and args.max_batch == 8 and args.max_model_len is None and args.k == 3
    assert args.memory_gib is None and args.gpu_memory_utilization == 0.8 and args.trainer_share == 0.15
