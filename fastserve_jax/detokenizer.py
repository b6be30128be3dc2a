"""Incremental detokenization and stop-string matching for one request.

Decoding a growing id list and emitting only the new suffix is exact for byte-level and
SentencePiece tokenizers alike, as long as (1) a few prompt tokens stay in front as
context, so a leading space is not stripped, and (2) text ending in an incomplete UTF-8
sequence (U+FFFD) is held back until the next token completes it.
"""

from __future__ import annotations

_CONTEXT = 4  # prompt tokens kept in front of the output for decoding context


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-_CONTEXT:])
        self.prefix = 0
        self.read = len(self.ids)
        self.stop = stop
        self._max_stop = max((len(s) for s in stop), default=0)

    def push(self, token_id: int, text_so_far: str) -> tuple[str, bool]:
        """Add one token; returns (the complete new output text, whether a stop string hit).

        On a hit the text is cut before the stop string (OpenAI and vLLM semantics)."""
        self.ids.append(token_id)
        dec = self.tokenizer.decode
        before = dec(self.ids[self.prefix:self.read], skip_special_tokens=True)
        now = dec(self.ids[self.prefix:], skip_special_tokens=True)
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return text_so_far, False
        delta = now[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        text = text_so_far + delta
        if self.stop:
            start = max(0, len(text_so_far) - self._max_stop + 1)
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                return text[:min(hits)], True
        return text, False
