"""models/tokenizer.py: a generic fast tokenizer loads without AutoTokenizer (and so without
torch), and behaves exactly as AutoTokenizer's; other tokenizer classes still go through it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from fastserve_jax.models import demo_model_path
from fastserve_jax.models.random_checkpoint import save_byte_tokenizer
from fastserve_jax.models.tokenizer import load_tokenizer, tokenizer_class

TEXTS = ["count from 3 to 12:", "count from 250 to 300: 250 251", "", " ", "héllo wörld \n\t<s></s><unk>", "0 999 1000"]


def _same(a, b) -> None:
    for text in TEXTS:
        assert a(text)["input_ids"] == b(text)["input_ids"], text
        assert a(text, add_special_tokens=False)["input_ids"] == b(text, add_special_tokens=False)["input_ids"]
        ids = b(text)["input_ids"]
        assert a.decode(ids) == b.decode(ids) and a.decode(ids, skip_special_tokens=True) == \
            b.decode(ids, skip_special_tokens=True)
    assert len(a) == len(b) and a.all_special_ids == b.all_special_ids
    assert (a.bos_token_id, a.eos_token_id, a.pad_token_id) == (b.bos_token_id, b.eos_token_id, b.pad_token_id)
    assert a.chat_template == b.chat_template
    if b.chat_template:
        msgs = [{"role": "user", "content": "count from 3 to 5:"}]
        assert a.apply_chat_template(msgs, tokenize=False) == b.apply_chat_template(msgs, tokenize=False)


@pytest.mark.parametrize("which", ["demo", "byte"])
def test_generic_fast_tokenizer_matches_auto_tokenizer(which, tmp_path):
    from transformers import AutoTokenizer
    path = demo_model_path() if which == "demo" else str(tmp_path)
    if which == "byte":
        save_byte_tokenizer(path, vocab_size=300, eos_token_id=2)
    assert tokenizer_class(path) in {"PreTrainedTokenizerFast", "TokenizersBackend"}
    _same(load_tokenizer(path), AutoTokenizer.from_pretrained(path))


def test_other_tokenizer_classes_go_through_auto_tokenizer(tmp_path):
    save_byte_tokenizer(str(tmp_path), vocab_size=300, eos_token_id=2)
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "tokenizer_class": "GPT2TokenizerFast"}))
    assert type(load_tokenizer(str(tmp_path))).__name__ == "GPT2Tokenizer"   # AutoTokenizer's pick, not ours
    os.remove(cfg_path)                          # no tokenizer config: AutoTokenizer decides from config.json
    shutil.copy(os.path.join(demo_model_path(), "config.json"), tmp_path)
    assert tokenizer_class(str(tmp_path)) is None
    from transformers import AutoTokenizer
    assert type(load_tokenizer(str(tmp_path))) is type(AutoTokenizer.from_pretrained(str(tmp_path)))


def test_loading_the_demo_tokenizer_imports_neither_torch_nor_auto_classes():
    code = ("import sys\nfrom fastserve_jax.models import demo_model_path\n"
            "from fastserve_jax.models.tokenizer import load_tokenizer\n"
            "tok = load_tokenizer(demo_model_path())\nassert tok('count from 3 to 5:')['input_ids']\n"
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('transformers.models.'))\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("which", ["demo", "byte"])
def test_the_detokenizer_decodes_as_the_tokenizer_does(which, tmp_path):
    """The Rust tokenizer's decode, which the detokenizer calls directly, gives exactly what
    transformers' decode gives: special tokens, spaces, text cut inside a UTF-8 sequence; and
    streaming a text token by token rebuilds it."""
    import random

    from fastserve_jax.detokenizer import IncrementalDetokenizer, decoder
    path = demo_model_path() if which == "demo" else str(tmp_path)
    if which == "byte":
        save_byte_tokenizer(path, vocab_size=300, eos_token_id=2)
    tok = load_tokenizer(path)
    fast = decoder(tok)
    assert fast.__code__ is not decoder(object()).__code__      # the direct path was taken
    rng = random.Random(0)
    ids = [i for text in TEXTS for i in tok(text)["input_ids"]]
    for _ in range(200):
        part = [rng.choice(ids + list(range(len(tok)))) for _ in range(rng.randint(0, 12))]
        assert fast(part) == tok.decode(part, skip_special_tokens=True), part
    for text in TEXTS:
        prompt, out = tok("count:")["input_ids"], tok(text, add_special_tokens=False)["input_ids"]
        d, got = IncrementalDetokenizer(tok, prompt, []), ""
        for t in out:
            got, _ = d.push(t, got)
        assert got == tok.decode(out, skip_special_tokens=True)


def test_a_missing_or_broken_tokenizer_is_named(tmp_path):
    save_byte_tokenizer(str(tmp_path), 300, None)
    os.remove(tmp_path / "tokenizer.json")               # no tokenizer files a fast tokenizer can load
    with pytest.raises(ValueError, match=rf"cannot load the tokenizer of '{tmp_path}'"):
        load_tokenizer(str(tmp_path))
    save_byte_tokenizer(str(tmp_path), 300, None)
    (tmp_path / "tokenizer.json").write_text("{")         # a truncated download
    with pytest.raises(ValueError, match=r"cannot load the tokenizer of .*JSONDecodeError"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text("{")
    with pytest.raises(ValueError, match=r"cannot load the tokenizer of .*JSONDecodeError"):
        load_tokenizer(str(tmp_path))
    empty = tmp_path / "none"
    empty.mkdir()                # no tokenizer file at all: transformers' five-line advice on slow tokenizers
    with pytest.raises(ValueError, match=rf"^no tokenizer in '{empty}': none of tokenizer.json, "):
        load_tokenizer(str(empty))


def test_eos_ids_join_the_tokenizers_eos_to_the_generation_configs(tmp_path):
    """A generation ends on generation_config.json's eos_token_id (one id or a list), else
    config.json's, and always on the tokenizer's own EOS too, as vLLM stops on both: a
    fine-tune whose tokenizer ends turns with a token its generation_config does not name
    (a ChatML <|im_end|> over a base model's </s>) ran past its turn."""
    from types import SimpleNamespace

    from fastserve_jax.models.tokenizer import eos_ids
    save_byte_tokenizer(str(tmp_path), vocab_size=300, eos_token_id=2)
    tok, cfg = load_tokenizer(str(tmp_path)), SimpleNamespace(eos_token_id=(9,))
    assert eos_ids(str(tmp_path), cfg, tok) == {9, 2}                    # no generation_config.json
    for gen, want in ((5, {5, 2}), ([5, 6], {5, 6, 2}), ([2, 6], {2, 6}), (None, {9, 2})):
        (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": gen}))
        assert eos_ids(str(tmp_path), cfg, tok) == want, gen
    save_byte_tokenizer(str(tmp_path), vocab_size=300, eos_token_id=None)    # a tokenizer without EOS
    assert eos_ids(str(tmp_path), cfg, load_tokenizer(str(tmp_path))) == {9}


@pytest.mark.parametrize("text", ["{eos: 2", "[2]", '{"eos_token_id": "</s>"}', '{"eos_token_id": [2, null]}',
                                  '{"eos_token_id": -1}', '{"eos_token_id": true}'])
def test_a_broken_generation_config_names_its_file_and_vllm_mode_serves_past_it(tmp_path, text):
    """generation_config.json's EOS ids that are no token ids, or a file that is no JSON object:
    a ValueError naming the file, whose advice (generation_config='vllm') then works: the file
    is ignored and config.json's and the tokenizer's EOS end generations. Until 2026-12-07 the
    EOS ids were read a second time without the mode: a bare int() or JSON error, a traceback
    for a list, under both modes."""
    from types import SimpleNamespace

    from fastserve_jax.models.tokenizer import eos_ids
    save_byte_tokenizer(str(tmp_path), vocab_size=300, eos_token_id=2)
    tok, cfg = load_tokenizer(str(tmp_path)), SimpleNamespace(eos_token_id=(9,))
    (tmp_path / "generation_config.json").write_text(text)
    with pytest.raises(ValueError, match=r"generation_config.json' .*pass generation_config='vllm'"):
        eos_ids(str(tmp_path), cfg, tok)
    assert eos_ids(str(tmp_path), cfg, tok, "vllm") == {9, 2}


def _byte_fallback_tokenizer(path: str):
    """A Llama-2-style tokenizer (SentencePiece as transformers converts it): BPE with byte
    fallback (<0xNN> tokens spell what the vocabulary lacks), "▁" for spaces, and the decoder
    that writes a run of byte tokens as one UTF-8 text, or U+FFFD per byte if the run is invalid."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}, "▁": 259, "o": 260,
             "k": 261}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            clean_up_tokenization_spaces=False).save_pretrained(path)
    return load_tokenizer(path)


def test_a_prompt_ending_inside_byte_spelled_characters_does_not_garble_the_output(tmp_path):
    """The detokenizer keeps the prompt's last ids in front of the output for context. "Say 龘龘"
    ends in six byte tokens, and its last four start inside the first 龘: with the byte-fallback
    decoder that run and the output's bytes after it decoded as U+FFFD, so the answer "龘 ok"
    streamed as three U+FFFD and " ok". The context now grows until it decodes cleanly, as vLLM's."""
    from fastserve_jax.detokenizer import IncrementalDetokenizer

    tok = _byte_fallback_tokenizer(str(tmp_path))
    prompt = tok("Say 龘龘")["input_ids"]
    assert tok.convert_ids_to_tokens(prompt[-4:]) == ["<0x98>", "<0xE9>", "<0xBE>", "<0x98>"]
    byte = lambda text: [3 + b for b in text.encode()]       # noqa: E731 (<0xNN> is id 3 + NN)
    for text, out in (("龘 ok", byte("龘") + [259, 260, 261]), ("\n龘!", byte("\n龘!")), ("é", byte("é"))):
        d, got = IncrementalDetokenizer(tok, prompt, []), ""
        for t in out:
            got, _ = d.push(t, got)
        assert d.flush(got)[0] == tok.decode(out) == text
