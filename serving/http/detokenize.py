"""Incremental detokenization: a growing sequence's text, a few tokens at a time.

Decoding a whole output again at every step costs O(n) per step and O(n^2) per request. Here each
step decodes only a short window: the tokens of the last piece (as context, for leading spaces and
merges) plus the new ones; the new text is what the window decodes to beyond what its context
alone decoded to. A piece that ends inside a multi-byte character is held until it completes.
Works on any Hugging Face tokenizer, with or without a Rust backend: only `decode` is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

INCOMPLETE = "\ufffd"  # what decode gives for bytes that do not yet make a character


@dataclass
class IncrementalText:
    """The text of `ids` so far, one `add` per step; the pieces joined equal the whole decode."""

    tokenizer: PreTrainedTokenizerBase
    ids: list[int] = field(default_factory=list)
    context: int = 0  # where the decode window starts: the first token of the last piece with text
    read: int = 0  # tokens whose text has been given out

    def add(self, new_ids: Sequence[int], final: bool = False) -> str | None:
        """The text the new tokens complete; None while it ends inside a character (the tokens
        are kept for the next call), unless `final`, which gives out whatever is left."""
        self.ids += new_ids
        if self.read == len(self.ids):
            return ""
        known = self._decode(self.ids[self.context : self.read])
        text = self._decode(self.ids[self.context :])
        if text.endswith(INCOMPLETE) and not final:
            return None
        piece = text[len(known) :]
        if piece:  # the window's context is the last piece with text: a skipped token has none
            self.context = self.read
        self.read = len(self.ids)
        return piece

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
