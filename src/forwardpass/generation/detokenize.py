"""Streaming detokenization that never splits a UTF-8 character across two pieces.

Byte-level BPE tokens can end in the middle of a multi-byte character ('🙂' is 4 bytes that
may arrive as 2 tokens); decoding each token alone would print replacement characters. The
stream decodes the tokens so far and releases only text that is complete.

    stream = TextStream(tokenizer)
    for token in tokens:
        print(stream.push(token), end="")
    print(stream.flush())
"""

from __future__ import annotations

from typing import Any


class TextStream:
    """Incremental decoder for one generation."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.tokens: list[int] = []
        self.emitted = 0  # characters of the decoded text already released

    def push(self, token: int) -> str:
        """Text completed by ``token`` ('' while a character is still partial)."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=self.skip)
        if text.endswith("\ufffd"):  # the last character is not complete yet
            return ""
        piece, self.emitted = text[self.emitted :], len(text)
        return piece

    def flush(self) -> str:
        """Whatever is left, even an incomplete character."""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=self.skip)
        piece, self.emitted = text[self.emitted :], len(text)
        return piece

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=self.skip)
