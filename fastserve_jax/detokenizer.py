"""Incremental detokenization and stop-string matching for one request.

Decoding a growing id list and emitting only the new suffix is exact for byte-level and
SentencePiece tokenizers alike, as long as (1) a few prompt tokens stay in front as
context, so a leading space is not stripped, and (2) text ending in an incomplete UTF-8
sequence (U+FFFD) is held back until the next token completes it (or, at the end, `flush`
releases it as decode writes it), and (3) with a byte-fallback decoder, which writes a whole
run of byte tokens as U+FFFD once it cannot be read, the window never starts inside a
character and starts again at the new bytes where the run turned unreadable (`_window`).

Per request (SamplingParams, vLLM's semantics): skip_special_tokens (decode drops special
tokens' text, or keeps it); spaces_between_special_tokens=False (as vLLM's detokenizer for
fast tokenizers: an added token right after another is written as its own text, without
the space a decoder such as WordPiece's puts between them); include_stop_str_in_output
(the text is cut after the matched stop string rather than before it, and a stop token's
or EOS's text is written too, and searched for stop strings).
"""

from __future__ import annotations

import json
import re
from typing import Callable
from weakref import WeakKeyDictionary

_CONTEXT = 4  # prompt tokens kept in front of the output for decoding context
_MAX_CONTEXT = 24  # ... grown up to this many where the last _CONTEXT decode to U+FFFD (_context)
_FALLBACK_CONTEXT = 128  # ... and this many where none of those starts on a character (vLLM: the whole prompt)
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")      # SentencePiece's byte-fallback tokens
_TOKEN_BYTES: WeakKeyDictionary = WeakKeyDictionary()   # tokenizer -> token_bytes' function
_CONTINUATIONS: WeakKeyDictionary = WeakKeyDictionary()  # tokenizer -> continuation_bytes'


def decoder(tokenizer, skip_special_tokens: bool = True):
    """ids -> text, as `tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)` returns it.

    For a transformers fast tokenizer that does not clean up tokenization spaces this is the
    Rust tokenizer's own decode, which is all transformers' decode calls then: the wrapper
    around it cost 6 of the 9.6 us of a call on 13 ids of the demo tokenizer, and the
    engine's thread decodes twice per generated token."""
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    cls = type(tokenizer)
    backend = getattr(tokenizer, "_tokenizer", None)
    if (isinstance(tokenizer, TokenizersBackend) and backend is not None
            and cls.decode is PreTrainedTokenizerBase.decode and cls._decode is TokenizersBackend._decode
            and not tokenizer.clean_up_tokenization_spaces):
        fast = backend.decode
        return lambda ids: fast(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def token_bytes(tokenizer) -> Callable[[int], bytes]:
    """id -> the raw bytes the token adds to a text (OpenAI's logprob `bytes`), also for a
    token holding only part of a character's UTF-8 bytes (alone it decodes to U+FFFD): by
    GPT-2's byte alphabet for a byte-level BPE, `<0xNN>` as its byte and "▁" as a space for
    a SentencePiece with byte fallback, an added (special) token's own text. Any other
    tokenizer: the UTF-8 of the token decoded alone."""
    try:
        return _TOKEN_BYTES[tokenizer]
    except (KeyError, TypeError):
        pass
    kinds = _decoder_kinds(tokenizer)
    alphabet = _byte_alphabet() if "ByteLevel" in kinds else {}
    added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    cache: dict[int, bytes] = {}

    def raw(token_id: int) -> bytes:
        out = cache.get(token_id)
        if out is not None:
            return out
        piece = None if token_id in added or not kinds else tokenizer.convert_ids_to_tokens(token_id)
        byte = _BYTE_PIECE.fullmatch(piece) if piece and "ByteFallback" in kinds else None
        if token_id in added:
            out = added[token_id].encode()
        elif piece and alphabet and all(c in alphabet for c in piece):
            out = bytes(alphabet[c] for c in piece)
        elif byte:
            out = bytes([int(byte[1], 16)])
        elif piece and "Metaspace" in kinds:
            out = piece.replace("\u2581", " ").encode()
        else:
            out = tokenizer.decode([token_id]).encode()
        cache[token_id] = out
        return out

    try:
        _TOKEN_BYTES[tokenizer] = raw
    except TypeError:         # not weakly referable: computed per call
        pass
    return raw


def _decoder_kinds(tokenizer) -> set[str]:
    """The types in the fast tokenizer's decoder tree ("Metaspace" also for a Replace of "▁")."""
    tree = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    stack, kinds = [json.loads(tree.__getstate__())] if tree is not None else [], set()
    while stack:
        node = stack.pop()
        stack += node.get("decoders", [])
        kinds.add(node["type"])
        if node["type"] == "Replace" and node.get("pattern", {}).get("String") == "\u2581":
            kinds.add("Metaspace")
    return kinds


def continuation_bytes(tokenizer) -> frozenset[int]:
    """The ids of a byte-fallback tokenizer's <0x80>..<0xBF> tokens (UTF-8 continuation bytes),
    else none. Its decoder writes a run of byte tokens as one character or all as U+FFFD, so
    a decode window must not start inside a character (IncrementalDetokenizer.push)."""
    try:
        return _CONTINUATIONS[tokenizer]
    except (KeyError, TypeError):
        pass
    out: frozenset[int] = frozenset()
    if "ByteFallback" in _decoder_kinds(tokenizer):
        vocab = tokenizer.get_vocab()
        out = frozenset(vocab[t] for t in (f"<0x{b:02X}>" for b in range(0x80, 0xC0)) if t in vocab)
    try:
        _CONTINUATIONS[tokenizer] = out
    except TypeError:
        pass
    return out


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: character -> the byte it stands for (printable Latin-1
    bytes stand for themselves, the others for chr(256), chr(257), ... in byte order)."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    extra = iter(range(256, 512))
    return {chr(b if b in keep else next(extra)): b for b in range(256)}


def _context(prompt_ids: list[int], decode: Callable[[list[int]], str]) -> list[int]:
    """The prompt's last _CONTEXT ids, or the shortest longer suffix (up to _MAX_CONTEXT) that
    starts on a character, else the last _FALLBACK_CONTEXT ids (vLLM takes the whole prompt,
    which its decode stream reads once; here each output token decoded it again while no
    text came, 3 s for 204 tokens after a 32k-token prompt). Four ids can start inside a
    character spelled in byte tokens (SentencePiece's <0xNN>); a byte-fallback decoder then
    turned that run and the output's bytes after it into U+FFFD, so "Say 龘龘" answered
    "龘 ok" streamed "\ufffd\ufffd\ufffd ok". A prompt that ends inside a character (a
    token-id prompt cut in one) decodes to a trailing U+FFFD at every length: the suffix is
    judged without it (_window leaves it to the output that completes the character), and
    not taken where that leaves nothing (the suffix may start inside an earlier character):
    it fell back to the last four ids, which did, and the answer began with that character's
    stray bytes as U+FFFD, or wrote the prompt's character again (a probe, 2026-12-07)."""
    for n in range(_CONTEXT, min(len(prompt_ids), _MAX_CONTEXT) + 1):
        text = decode(list(prompt_ids[-n:]))
        if "\ufffd" not in text or (cut := text.rstrip("\ufffd")) and "\ufffd" not in cut:
            return list(prompt_ids[-n:])
    return list(prompt_ids[-_FALLBACK_CONTEXT:])


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str], decode=None, *,
                 include_stop: bool = False, skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True) -> None:
        """`decode`: `decoder(tokenizer, skip_special_tokens)`, which a caller making many of
        these computes once. The keywords are SamplingParams' (module docstring)."""
        self.tokenizer = tokenizer
        self.decode = decode or decoder(tokenizer, skip_special_tokens)
        self.ids = _context(prompt_ids, self.decode)
        self.prefix = 0
        self.read = len(self.ids)
        self._continuations = continuation_bytes(tokenizer)
        self.stop = stop
        self.matched: str | None = None       # the stop string that hit (vLLM's stop_reason)
        self.include_stop = include_stop
        # added token id -> its text, where one right after another is written without a space
        self._added: dict[int, str] | None = None
        if not (skip_special_tokens or spaces_between_special_tokens):
            self._added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
        self._after_added = False

    @classmethod
    def for_request(cls, tokenizer, prompt_ids: list[int], params, decoders: dict | None = None):
        """The detokenizer of a request with these SamplingParams; `decoders`: {skip_special_tokens:
        decoder(tokenizer, skip_special_tokens)}, computed once by the caller."""
        skip = params.skip_special_tokens
        return cls(tokenizer, prompt_ids, params.stop, (decoders or {}).get(skip),
                   include_stop=params.include_stop_str_in_output, skip_special_tokens=skip,
                   spaces_between_special_tokens=params.spaces_between_special_tokens)

    def push(self, token_id: int, text_so_far: str, check_stop: bool = True,
             stop_token: bool = False) -> tuple[str, bool]:
        """Add one token; returns (the complete new output text, whether a stop string hit).

        On a hit the text is cut before the stop string (OpenAI and vLLM semantics), or after
        it with include_stop. `check_stop` False (a request below its min_tokens): no stop
        string is looked for in this token's text, as vLLM does. `stop_token`: the token ends
        the request (EOS, stop_token_ids): its text is written only with include_stop, and
        then a stop string is looked for in it too, as vLLM's detokenizer does (a stop string
        there is the stop_reason; until 2026-12-07 it was not looked for)."""
        if stop_token and not self.include_stop:
            return text_so_far, False
        self.ids.append(token_id)
        before, now = self._window()
        if len(now) <= len(before) or now.endswith("\ufffd"):
            self._after_added = False
            return text_so_far, False
        if self.ids[self.read] not in self._continuations:      # the next window starts a character
            self.prefix = self.read
        self.read = len(self.ids)
        delta = now[len(before):]
        if self._added is not None:
            added = self._added.get(token_id)
            if added is not None and self._after_added:
                delta = added
            self._after_added = added is not None
        return self._add(text_so_far, delta, check_stop)

    def flush(self, text_so_far: str, check_stop: bool = True) -> tuple[str, bool]:
        """The output text once no token follows (the request finished): with the text push
        held back, so an output that ends inside a character ends in U+FFFD as
        `tokenizer.decode` of its ids does, rather than losing those tokens' text."""
        before, now = self._window()
        self.prefix = self.read = len(self.ids)
        if len(now) <= len(before):
            return text_so_far, False
        return self._add(text_so_far, now[len(before):], check_stop)

    def _window(self) -> tuple[str, str]:
        """(the text of the window before the ids held back, the text with them). Two cases
        where the window's own text changes as ids come (both gave wrong output until
        2026-12-07):
        - The prompt ends inside a character (a token-id prompt cut in one), so the context
          decodes to a trailing U+FFFD: that is not text yet, and the output that completes
          the character writes all of it, as vLLM does (the completed character replaced the
          U+FFFD at the same length and was lost). A byte-fallback decoder writes the
          whole run of byte tokens as U+FFFD there, characters complete before the cut too:
          those are the text of the context without its last ids (`_prompt_text`; until
          2026-12-07 the answer wrote them again). A prompt ending in a U+FFFD it really
          holds has that character written again: rare, and not told apart.
        - Adding ids rewrote the window's text (a byte-fallback decoder writes a whole run of
          byte tokens as U+FFFD once it cannot be read, the prompt's bytes before the output's
          included): the window restarts at the held ids, as vLLM's DecodeStream does on its
          "invalid prefix"; the prompt's bytes came out as U+FFFD in the answer before."""
        before = self.decode(self.ids[self.prefix:self.read])
        now = self.decode(self.ids[self.prefix:])
        if self.prefix == 0:        # the prompt's context (after the first text written, prefix > 0)
            before = self._prompt_text(before, now)
        if not now.startswith(before):
            self.prefix = self.read
            before, now = "", self.decode(self.ids[self.read:])
        return before, now

    def _prompt_text(self, text: str, now: str) -> str:
        """The prompt context's text but a character it ends inside (`text` decodes that to
        U+FFFD): the text stripped of its trailing U+FFFD, or, longer where a byte-fallback
        decoder wrote complete characters before the cut as U+FFFD too, the text of the
        context without its last ids (up to 4, one character's bytes) that `now` starts with."""
        best = text.rstrip("\ufffd")
        if best == text:
            return text
        for k in range(1, min(4, self.read - 1) + 1):
            cut = self.decode(self.ids[:self.read - k])
            if not cut.endswith("\ufffd"):
                return cut if len(cut) > len(best) and now.startswith(cut) else best
        return best

    def _add(self, text_so_far: str, delta: str, check_stop: bool) -> tuple[str, bool]:
        """A stop string counts where it reaches into `delta` (vLLM's window); the one that
        starts first wins, the first listed among those starting at the same place."""
        text = text_so_far + delta
        if self.stop and check_stop:
            hits = [(i, n) for n, s in enumerate(self.stop)
                    if (i := text.find(s, max(0, len(text_so_far) - len(s) + 1))) >= 0]
            if hits:
                at, n = min(hits)
                self.matched = self.stop[n]
                return text[:at + len(self.stop[n]) if self.include_stop else at], True
        return text, False
