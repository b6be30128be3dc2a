"""Text output, on the tokenizers alone (no engine, no model): incremental detokenizing
(characters split across tokens, a request that ends inside one), logprob formats (chat's
`bytes`, completions' `text_offset`) and chat message parsing, for the demo's byte-level
BPE tokenizer and a Llama-style SentencePiece tokenizer with byte fallback built here."""

from __future__ import annotations

import pytest

from fastserve_jax.detokenizer import IncrementalDetokenizer, token_bytes
from fastserve_jax.models import demo_model_path
from fastserve_jax.models.tokenizer import load_tokenizer
from fastserve_jax.request import TokenLogprobs
from fastserve_jax.serve.openai_format import Formatter

TEXT = "héllo wörld 中文🙂 end"


@pytest.fixture(scope="module")
def demo():
    return load_tokenizer(demo_model_path())


def _sentencepiece():
    """Llama's layout: "▁" for spaces, byte-fallback tokens <0x00>..<0xFF>, a decoder that
    strips the text's first space; no merges (each character or byte is a token)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for ch in "▁abcdefghijklmnopqrstuvwxyzé":
        vocab.setdefault(ch, len(vocab))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module", params=["demo", "sentencepiece"])
def tok(request, demo):
    return demo if request.param == "demo" else _sentencepiece()


def _stream(tok, prompt, out, stop=(), finish=True):
    d, text, deltas = IncrementalDetokenizer(tok, prompt, list(stop)), "", []
    for t in out:
        new, hit = d.push(t, text)
        deltas.append(new[len(text):])
        text = new
        if hit:
            return text, deltas, True
    if finish:
        text, hit = d.flush(text)
    return text, deltas, False


def test_a_character_split_across_tokens_is_emitted_whole_once_complete(tok):
    prompt = tok("count:")["input_ids"]
    out = tok(TEXT, add_special_tokens=False)["input_ids"]
    text, deltas, _ = _stream(tok, prompt, out)
    assert not any("\ufffd" in d for d in deltas)
    assert text == tok.decode(prompt + out, skip_special_tokens=True)[len(tok.decode(prompt, skip_special_tokens=True)):]


def test_an_output_that_ends_inside_a_character_keeps_its_bytes_as_decode_does(tok):
    """max_tokens (or EOS) cut after the first bytes of 🙂: the text ends in U+FFFD, as
    tokenizer.decode gives it, rather than losing those tokens' text."""
    prompt = tok("count:")["input_ids"]
    out = tok("ab🙂", add_special_tokens=False)["input_ids"]
    cut = out[:-2]                                     # 🙂 is 4 byte tokens in both tokenizers
    text, deltas, _ = _stream(tok, prompt, cut)
    assert not any("\ufffd" in d for d in deltas)
    assert text.rstrip("\ufffd").endswith("ab") and text.count("\ufffd") == tok.decode(cut).count("\ufffd") > 0


class _Bytes:
    """Ids are bytes; id 300 is a token of a space and the first byte of a 3-byte character."""

    def decode(self, ids, skip_special_tokens=True):
        return b"".join(b" \xe4" if i == 300 else bytes([i]) for i in ids).decode("utf-8", "replace")


def test_flush_looks_for_stop_strings_in_the_text_it_releases():
    d = IncrementalDetokenizer(_Bytes(), [ord("x")], [" "])
    assert d.push(ord("a"), "") == ("a", False)
    assert d.push(300, "a") == ("a", False)          # " \xe4" held back: it ends inside a character
    assert d.flush("a") == ("a", True)
    d = IncrementalDetokenizer(_Bytes(), [ord("x")], [" "])
    assert d.flush(d.push(300, "", check_stop=False)[0], check_stop=False) == (" \ufffd", False)


class _Nop:
    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def _bare_engine(tok, prompt, params, eos=None):
    """An LLMEngine with nothing but what finishing requests reads (no model, no device);
    `eos`: the request's EOS ids (the tokenizer's alone by default)."""
    from types import SimpleNamespace

    from fastserve_jax.engine import LLMEngine
    from fastserve_jax.request import Request
    from fastserve_jax.stats import EngineStats

    eng = object.__new__(LLMEngine)
    eng.stats, eng.cfg, eng.predictor = EngineStats(), SimpleNamespace(max_model_len=64), None
    eng.scheduler = eng.kv = eng.copies = eng.swap = _Nop()
    eng.tokenizer = tok
    req = Request("r", prompt, params, 0.0, eos_token_ids=frozenset({tok.eos_token_id} if eos is None else eos))
    eng._requests, eng._detok = {"r": req}, {"r": IncrementalDetokenizer.for_request(tok, prompt, params)}
    return eng, req


@pytest.mark.parametrize("end", ["length", "eos"])
def test_a_request_that_finishes_inside_a_character_keeps_its_text(demo, end):
    from fastserve_jax.sampling_params import SamplingParams

    prompt, ids = demo("count:")["input_ids"], demo("a🙂", add_special_tokens=False)["input_ids"][:3]
    out = ids + [demo.eos_token_id] if end == "eos" else ids
    eng, req = _bare_engine(demo, prompt, SamplingParams(max_tokens=len(out)))
    for t in out:
        eng._append(req, t, None, 0.0)
    assert req.finished and req.finish_reason == ("length" if end == "length" else "stop")
    assert req.output_text == demo.decode(out, skip_special_tokens=True) == "a\ufffd"


@pytest.mark.parametrize("text", [TEXT, "a b  c", "🙂🙂 é"])
def test_token_bytes_are_each_tokens_raw_bytes(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    raw = token_bytes(tok)
    joined = b"".join(raw(t) for t in ids)
    assert joined.decode("utf-8").lstrip(" ") == text.lstrip(" ")    # SentencePiece: the space it prepends
    assert raw(tok.eos_token_id) == tok.eos_token.encode()


def test_chat_logprob_bytes_hold_a_partial_characters_raw_bytes(demo):
    ids = demo("é🙂", add_special_tokens=False)["input_ids"]
    fmt = Formatter(True, "demo", demo, 1)
    content = fmt._logprobs(0, [TokenLogprobs(t, -0.5, {t: -0.5}) for t in ids])["content"]
    assert b"".join(bytes(c["bytes"]) for c in content) == "é🙂".encode()
    assert [c["top_logprobs"][0]["bytes"] for c in content] == [c["bytes"] for c in content]


@pytest.mark.parametrize("streamed,skip", [(False, True), (True, True), (False, False), (True, False)])
def test_text_offsets_index_into_the_returned_text(demo, streamed, skip):
    """Special tokens take no room in the text unless skip_special_tokens is false."""
    text = "é x🙂y" + demo.eos_token + "z"
    ids = demo(text, add_special_tokens=False)["input_ids"]
    returned = demo.decode(ids, skip_special_tokens=skip)
    lps = [TokenLogprobs(t, -0.5, {}) for t in ids]
    fmt = Formatter(False, "demo", demo, 0, skip_special_tokens=skip)
    parts = [fmt._logprobs(0, [lp]) for lp in lps] if streamed else [fmt._logprobs(0, lps)]
    offsets = [o for p in parts for o in p["text_offset"]]
    tokens = [t for p in parts for t in p["tokens"]]
    assert len(offsets) == len(ids) and offsets == sorted(offsets)
    for off, tid, tok_text in zip(offsets, ids, tokens):
        if "\ufffd" not in tok_text and (tid not in demo.all_special_ids or not skip):
            assert returned[off:off + len(tok_text)] == tok_text
    assert offsets[-1] == returned.index("z")


@pytest.mark.parametrize("streamed", [False, True])
def test_a_token_after_an_unfinished_character_starts_after_its_replacement(demo, streamed):
    """Bytes 0xE2 0x9D open a 3-byte character that "v" does not finish: the text is "\ufffdvx".
    The decoder writes that U+FFFD only when "v" arrives, and "v" was given offset 0 (a probe
    found one such miss in each of 80 seeded samples of a byte-level BPE model)."""
    raw = token_bytes(demo)
    byte_ids = {}
    for i in range(len(demo)):
        if len(raw(i)) == 1:
            byte_ids.setdefault(raw(i)[0], i)
    ids = [byte_ids[0xE2], byte_ids[0x9D], byte_ids[ord("v")], byte_ids[ord("x")]]
    assert demo.decode(ids) == "\ufffdvx"
    fmt, lps = Formatter(False, "demo", demo, 0), [TokenLogprobs(t, -0.5, {}) for t in ids]
    parts = [fmt._logprobs(0, [lp]) for lp in lps] if streamed else [fmt._logprobs(0, lps)]
    assert [o for p in parts for o in p["text_offset"]] == [0, 0, 1, 2]


def test_chat_text_parts_are_joined_by_newlines_as_vllm_does(demo):
    """For a template that reads content as a string (the demo's); see test_chat_template.py
    for one that reads parts."""
    from fastserve_jax.chat_template import render_chat
    from fastserve_jax.serve.protocol import parse_chat

    parts = [{"type": "text", "text": "first line"}, {"type": "text", "text": "second"}]
    job = parse_chat({"messages": [{"role": "system", "content": parts}, {"role": "user", "content": "x"}]})
    assert job.prompts[0][0] == {"role": "system", "content": parts}
    assert "first line\nsecond" in render_chat(demo, job.prompts[0])[0]


def test_completions_top_logprobs_hold_the_sampled_token_as_openai_and_vllm_do(demo):
    """OpenAI's legacy logprobs: "the API will always return the logprob of the sampled token,
    so there may be up to logprobs+1 elements"; logprobs=0 gives the sampled token alone."""
    a, b, c = demo(" 1 2 3", add_special_tokens=False)["input_ids"][:3]
    name = demo.decode
    lps = [TokenLogprobs(a, -2.0, {}), TokenLogprobs(b, -0.1, {b: -0.1}), TokenLogprobs(c, -3.0, {a: -0.2})]
    top = Formatter(False, "demo", demo, 0)._logprobs(0, lps)["top_logprobs"]
    assert top == [{name([a]): -2.0}, {name([b]): -0.1}, {name([c]): -3.0, name([a]): -0.2}]
    chat = Formatter(True, "demo", demo, 0)._logprobs(0, lps[:1])["content"]
    assert chat[0]["top_logprobs"] == []              # chat's top_logprobs: exactly top_logprobs of them



def test_prompt_logprobs_entries_hold_the_prompt_token_first(demo):
    """vLLM's prompt_logprobs (docs/serving.md): per prompt token, its own entry first, then the
    top ones; also where the token is among the top but not the likeliest (it came in rank order)."""
    a, b, c = demo(" 1 2 3", add_special_tokens=False)["input_ids"][:3]
    entries = [None, TokenLogprobs(b, -1.0, {a: -0.5, b: -1.0}, 2), TokenLogprobs(c, -4.0, {a: -0.1}, None)]
    out = Formatter(False, "demo", demo, None, prompt_logprobs=True)._prompt_logprobs(entries)
    assert out[0] is None and [list(e) for e in out[1:]] == [[str(b), str(a)], [str(c), str(a)]]
    assert out[1][str(b)] == {"logprob": -1.0, "rank": 2, "decoded_token": demo.decode([b])}
    assert out[1][str(a)]["rank"] == 1 and out[2][str(c)]["rank"] is None

# -- skip_special_tokens, spaces_between_special_tokens, include_stop_str_in_output (vLLM's) ----
def test_special_tokens_stay_in_the_text_when_not_skipped(tok):
    prompt = tok("count:")["input_ids"]
    out = tok("ab", add_special_tokens=False)["input_ids"] + [tok.eos_token_id, tok.bos_token_id] + \
        tok(" é🙂c", add_special_tokens=False)["input_ids"]
    d, text = IncrementalDetokenizer(tok, prompt, [], skip_special_tokens=False), ""
    for t in out:
        text, _ = d.push(t, text)
    text, _ = d.flush(text)
    whole = tok.decode(prompt + out, skip_special_tokens=False)
    assert text == whole[len(tok.decode(prompt, skip_special_tokens=False)):]
    assert tok.eos_token + tok.bos_token in text
    assert _stream(tok, prompt, out)[0] == text.replace(tok.eos_token + tok.bos_token, "")


def _wordpiece():
    """A WordPiece tokenizer (BERT's decoder joins tokens with spaces) with two special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordPiece(vocab={"[UNK]": 0, "hello": 1, "world": 2, "##s": 3}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece()
    tk.add_special_tokens([AddedToken(t, special=True) for t in ("[A]", "[B]")])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("skip,spaces,want", [(True, True, " worlds"), (False, True, " [A] [B] worlds"),
                                              (False, False, " [A][B] worlds"), (True, False, " worlds")])
def test_spaces_between_special_tokens_as_vllm_writes_them(skip, spaces, want):
    """False: a special (added) token right after another is written without the space the
    decoder puts before it (vLLM's fast detokenizer); it only matters where specials are kept."""
    wp = _wordpiece()
    ids = wp.encode("hello [A][B] worlds", add_special_tokens=False)
    d, text = IncrementalDetokenizer(wp, ids[:1], [], skip_special_tokens=skip,
                                     spaces_between_special_tokens=spaces), ""
    for t in ids[1:]:
        text, _ = d.push(t, text)
    assert d.flush(text)[0] == want


class _Pieces:
    """Id i is PIECES[i]: tokens of several characters."""
    PIECES = ["x", "ab", "cEN", "Dxy", "z"]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.PIECES[i] for i in ids)


@pytest.mark.parametrize("include,want", [(False, "abc"), (True, "abcEND")])
def test_include_stop_str_in_output_keeps_the_stop_string_and_cuts_after_it(include, want):
    d = IncrementalDetokenizer(_Pieces(), [0], ["END"], include_stop=include)
    assert d.push(1, "") == ("ab", False) and d.push(2, "ab") == ("abcEN", False)
    assert d.push(3, "abcEN") == (want, True)            # "xy" after the stop string is cut either way


def test_a_stop_string_is_found_where_it_reaches_into_the_new_text():
    """vLLM's window, per stop string: a short stop wholly in text written under min_tokens
    (not looked for then) does not end the request later; among stops at the same place the
    first listed wins (with include_stop_str_in_output, its end is where the text is cut)."""
    d = IncrementalDetokenizer(_Pieces(), [0], ["zzz", "x"])
    text, hit = d.push(0, "", check_stop=False)
    assert (text, hit) == ("x", False) and d.push(1, text) == ("xab", False)
    for stops, want in ((["abcE", "abc"], "abcE"), (["abc", "abcE"], "abc")):
        d = IncrementalDetokenizer(_Pieces(), [0], stops, include_stop=True)
        assert d.push(1, "") == ("ab", False) and d.push(2, "ab") == (want, True)


@pytest.mark.parametrize("skip", [True, False])
def test_include_stop_str_in_output_writes_the_stop_tokens_text(demo, skip):
    """As vLLM: EOS or a stop_token_ids token is detokenized only with include_stop_str_in_output
    (EOS is a special token: visible with skip_special_tokens false)."""
    from fastserve_jax.sampling_params import SamplingParams

    prompt, ids = demo("count:")["input_ids"], demo(" 3 4", add_special_tokens=False)["input_ids"]
    [seven] = demo(" 7", add_special_tokens=False)["input_ids"]
    for stop, end in ((demo.eos_token_id, "" if skip else demo.eos_token), (seven, " 7")):
        for include in (False, True):
            params = SamplingParams(max_tokens=9, stop_token_ids=[seven], include_stop_str_in_output=include,
                                    skip_special_tokens=skip)
            eng, req = _bare_engine(demo, prompt, params)
            for t in ids + [stop]:
                eng._append(req, t, None, 0.0)
            assert req.finish_reason == "stop" and req.output_text == " 3 4" + (end if include else "")
            assert req.stop_reason == (None if stop == demo.eos_token_id else seven)    # vLLM's: None at EOS


def test_a_stop_string_in_the_stop_tokens_text_is_the_stop_reason_with_include(demo):
    """vLLM's detokenizer looks for stop strings in the stop token's text where it writes it
    (include_stop_str_in_output): "</" inside "</s>" cuts there and is the stop_reason (until
    2026-12-07 the whole "</s>" came out, with stop_reason None)."""
    from fastserve_jax.sampling_params import SamplingParams

    eos = demo.eos_token
    params = SamplingParams(max_tokens=9, stop=[eos[:2]], include_stop_str_in_output=True, skip_special_tokens=False)
    eng, req = _bare_engine(demo, demo("count:")["input_ids"], params)
    eng._append(req, demo.eos_token_id, None, 0.0)
    assert (req.output_text, req.finish_reason, req.stop_reason) == (eos[:2], "stop", eos[:2])


def test_byte_tokens_of_the_prompt_stay_out_of_the_answer():
    """A byte-fallback decoder writes a whole run of byte tokens as U+FFFD once it cannot be
    read, the prompt's included: "Say 龘龘" (six byte tokens) then an answer cut after two
    bytes of 中 gave six U+FFFD where decode of the answer gives two; the window now restarts at
    the answer's ids, as vLLM's DecodeStream does on an invalid prefix."""
    sp = _sentencepiece()
    prompt = sp("say 龘龘")["input_ids"]
    for out in ([sp.convert_tokens_to_ids("<0xE4>"), sp.convert_tokens_to_ids("<0xB8>")],
                [sp.convert_tokens_to_ids("<0xE4>")] + sp("ok", add_special_tokens=False)["input_ids"][1:]):
        assert _stream(sp, prompt, out)[0] == sp.decode(out)


@pytest.mark.parametrize("cut", [1, 2])
def test_an_answer_that_finishes_the_prompts_last_character_writes_it(tok, cut):
    """A token-id prompt cut inside a character (a client continuing an answer max_tokens cut
    mid-character): the answer that completes it writes the whole character, as vLLM does;
    the completed character replaced the prompt's U+FFFD at the same length and was lost."""
    ids = tok("ab 中文 ok", add_special_tokens=False)["input_ids"]
    bytes_of_zh = [i for i, t in enumerate(ids) if tok.decode(ids[:i + 1]).endswith("\ufffd")]
    split = bytes_of_zh[0] + cut          # inside 中's bytes
    text, deltas, _ = _stream(tok, ids[:split], ids[split:])
    assert text.lstrip() == "中文 ok" and "\ufffd" not in "".join(deltas), (text, deltas)


@pytest.mark.parametrize("text", ["价格是龘龘龘龘", "hé 中文🙂 end"])
def test_an_answer_after_a_prompt_cut_anywhere_writes_the_characters_it_completes(tok, text):
    """At every cut of a token-id prompt, the answer is the text after the characters the
    prompt holds whole (as vLLM's): where the prompt's last four ids started inside an earlier
    character, the answer began with that character's stray bytes as U+FFFD, and a
    byte-fallback decoder, which writes a whole run of byte tokens as U+FFFD, had the answer
    write the prompt's complete characters again or lose its own (a probe, 2026-12-07)."""
    ids, raw = tok.encode(text, add_special_tokens=False), token_bytes(tok)
    full = tok.decode(ids)
    for cut in range(1, len(ids)):
        held = b"".join(raw(t) for t in ids[:cut])
        whole = next(held[:len(held) - k].decode() for k in range(4) if _valid(held[:len(held) - k]))
        if whole.startswith(" ") and not full.startswith(" "):     # SentencePiece's space before the text
            whole = whole[1:]
        answer, deltas, _ = _stream(tok, ids[:cut], ids[cut:])
        assert answer == full[len(whole):] and "".join(deltas) == answer, (cut, answer, deltas)


def _valid(b: bytes) -> bool:
    try:
        b.decode()
        return True
    except UnicodeDecodeError:
        return False


def test_a_configs_other_eos_ids_are_their_own_stop_reason(demo):
    """vLLM (update_from_generation_config) makes generation_config.json's EOS ids other than
    the tokenizer's stop tokens, so ending at one gives its id as stop_reason, as Llama 3 and
    Qwen answers show; only the tokenizer's EOS gives null (it gave null for every EOS id
    until 2026-12-07). With ignore_eos the tokenizer's EOS listed in stop_token_ids is a stop
    token like any other."""
    from fastserve_jax.sampling_params import SamplingParams

    prompt = demo("count:")["input_ids"]
    [seven] = demo(" 7", add_special_tokens=False)["input_ids"]
    both = frozenset({demo.eos_token_id, seven})        # seven: a generation_config EOS id
    for stop, params, eos, want in (
            (seven, SamplingParams(max_tokens=9), both, seven),
            (demo.eos_token_id, SamplingParams(max_tokens=9), both, None),
            (seven, SamplingParams(max_tokens=9, stop_token_ids=[seven]), both, seven),
            (demo.eos_token_id, SamplingParams(max_tokens=9, ignore_eos=True, stop_token_ids=[demo.eos_token_id]),
             frozenset(), demo.eos_token_id)):
        eng, req = _bare_engine(demo, prompt, params, eos)
        eng._append(req, stop, None, 0.0)
        assert (req.finish_reason, req.stop_reason) == ("stop", want)


def test_text_offset_skips_every_special_token_the_text_leaves_out_and_counts_those_it_holds():
    """text_offset indexes the choice's text: an added special token that no special-token
    attribute names (Llama 3's header and reserved tokens) is left out of it by
    skip_special_tokens as the named ones are, and takes no room (it took its length); a
    prompt echoed as sent that writes a special token's text holds it, so it takes room there,
    while the BOS the tokenizer added does not (both were given none)."""
    tok = load_tokenizer(demo_model_path())
    tok.add_tokens(["<|x|>"], special_tokens=True)
    x = tok.convert_tokens_to_ids("<|x|>")
    assert x not in tok.all_special_ids and tok.decode([1263, x, 36], skip_special_tokens=True) == "count "
    lps = [TokenLogprobs(t, -1.0, {}) for t in (1263, x, 36)]
    assert Formatter(False, "demo", tok, 0)._logprobs(0, lps)["text_offset"] == [0, 5, 5]
    assert Formatter(False, "demo", tok, 0, skip_special_tokens=False)._logprobs(0, lps)["text_offset"] == [0, 5, 10]
    sent = "count </s> 3"
    ids = tok.encode(sent)                      # BOS, "count", " ", "</s>", " ", "3"
    assert ids[0] == tok.bos_token_id and tok.eos_token_id in ids
    f = Formatter(False, "demo", tok, 0, echo=[sent], echo_ids=[ids])
    out = f._logprobs(0, [TokenLogprobs(36, -1.0, {})], [None] + [TokenLogprobs(t, -1.0, {}) for t in ids[1:]])
    offsets, tokens = out["text_offset"], out["tokens"]
    assert offsets[0] == 0 and [sent[at:at + len(t)] for t, at in zip(tokens[1:-1], offsets[1:-1])] == tokens[1:-1]
    assert offsets[-1] == len(sent)
