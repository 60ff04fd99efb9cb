"""Whether a draft can propose for a target: their vocabularies, checked once at start.

A draft and its target must give every token id the same meaning. Their output rows may still
differ by padding: checkpoints round their embedding matrices up (a Qwen2.5-7B target has 152,064
rows, its 0.5B draft 151,936, for one 151,665-token tokenizer). The ids below both row counts are
the shared vocabulary; the draft proposes only those, and the target's distribution keeps all of
its own rows. Pure functions over tokenizers' token lists; nothing here loads a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from serving.errors import IncompatibleDraftError


@dataclass(frozen=True)
class SharedVocabulary:
    """What a target and its draft share: ids [0, rows) mean the same token to both."""

    rows: int  # the ids the draft may propose
    target_rows: int
    draft_rows: int
    checked_tokens: int  # ids whose tokens were compared (0: no tokenizers, equal rows)

    @property
    def padded(self) -> bool:
        return self.target_rows != self.draft_rows


def token_list(tokenizer: PreTrainedTokenizerBase) -> list[str | None]:
    """Every id's token, added tokens included; None where the tokenizer defines no token."""
    tokens: list[str | None] = [None] * len(tokenizer)
    for token, i in tokenizer.get_vocab().items():
        if i < len(tokens):
            tokens[i] = token
    return tokens


def first_difference(target: Sequence[str | None], draft: Sequence[str | None]) -> int | None:
    """The first id the two token lists give different tokens (or only one gives one); None if none."""
    for i in range(max(len(target), len(draft))):
        if (target[i] if i < len(target) else None) != (draft[i] if i < len(draft) else None):
            return i
    return None


def shared_vocabulary(
    target_rows: int,
    draft_rows: int,
    target_tokens: Sequence[str | None] | None,
    draft_tokens: Sequence[str | None] | None,
) -> SharedVocabulary:
    """The shared vocabulary of a target and a draft with these output rows and token lists (None:
    no tokenizer), or IncompatibleDraftError saying why there is none.

    The tokenizers must agree on every id, and every id either defines must have a row in both
    models: then the rows beyond the tokens are padding. Without both tokenizers nothing can be
    compared, so the rows must be equal.
    """
    if target_tokens is None or draft_tokens is None:
        if target_rows != draft_rows:
            raise IncompatibleDraftError(
                f"the draft has {draft_rows} output rows and the target {target_rows}; vocabularies that "
                "differ can only be checked with both tokenizers, and one of them has none"
            )
        return SharedVocabulary(target_rows, target_rows, draft_rows, 0)
    if (i := first_difference(target_tokens, draft_tokens)) is not None:

        def name(tokens: Sequence[str | None]) -> str:
            return repr(tokens[i]) if i < len(tokens) and tokens[i] is not None else "no token"

        raise IncompatibleDraftError(
            f"the tokenizers disagree at id {i}: the target has {name(target_tokens)}, "
            f"the draft {name(draft_tokens)}"
        )
    rows = min(target_rows, draft_rows)
    if len(target_tokens) > rows:
        raise IncompatibleDraftError(
            f"the tokenizer has {len(target_tokens)} tokens but the "
            f"{'draft' if draft_rows < target_rows else 'target'} only {rows} output rows"
        )
    return SharedVocabulary(rows, target_rows, draft_rows, len(target_tokens))


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved with a model (local directory or hub id), or None when it has none."""
    try:
        return AutoTokenizer.from_pretrained(str(name_or_path))
    except (OSError, ValueError, TypeError):
        return None


def check_pair(target: str, draft: str, target_rows: int, draft_rows: int) -> SharedVocabulary:
    """`shared_vocabulary` for the models saved at `target` and `draft`, from their tokenizers."""
    tokenizers = load_tokenizer(target), load_tokenizer(draft)
    tokens = [None if t is None else token_list(t) for t in tokenizers]
    return shared_vocabulary(target_rows, draft_rows, *tokens)
