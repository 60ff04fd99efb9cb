"""The demo tokenizer: a byte-level BPE trained on the training split, saved as a HF tokenizer, and
its ChatML chat template (`add_chat_template`).

ChatML renders each message as `<|im_start|>{role}\n{content}<|im_end|>\n` and asks for a reply
with `<|im_start|>assistant\n`. `<|im_start|>` and `<|im_end|>` are added special tokens, one id
each, appended after the trained vocabulary; `deploy.demo.build` gives the models rows for them.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

EOS = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
CHAT_TOKENS = (IM_START, IM_END)
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE: every byte string round-trips, whatever the training texts held."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, pad_token=PAD)


def add_chat_template(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Give `tokenizer` the ChatML tokens (added special tokens, when missing) and template, in
    place; returns the tokens' ids. Idempotent: a tokenizer that has them keeps its ids."""
    missing = [t for t in CHAT_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    tokenizer.chat_template = CHATML
    return tokenizer.convert_tokens_to_ids(list(CHAT_TOKENS))
