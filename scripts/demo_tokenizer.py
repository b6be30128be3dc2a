"""The demo model's tokenizer (scripts/train_demo_model.py): byte-level BPE built by hand.

No training: 4 special tokens, the 256 byte tokens, then merges that make ` 0` ... ` 999`
(no leading zeros), `count`, ` from`, ` to` single tokens. Any text encodes (every byte
has a token); decoding is exact. `build_tokenizer` writes the HF tokenizer files,
`verify_tokenizer` checks what the task and the engine rely on.
"""

from __future__ import annotations

import json
import os

from fastserve_jax.models import demo_task
from fastserve_jax.models.demo_task import MAX_NUMBER


SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]          # ids 0..3
UNK, BOS, EOS, PAD = SPECIAL
WORDS = ["count", " from", " to"]                     # ":" is already a byte token
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


def byte_to_unicode() -> dict[int, str]:
    """The byte-level alphabet: printable Latin-1 bytes stand for themselves, the other
    bytes are shifted to code points 256, 257, ... in byte order (the convention of the
    `tokenizers` ByteLevel pre-tokenizer, checked against it in `build_tokenizer`)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    b2u = byte_to_unicode()
    to_bl = lambda s: "".join(b2u[c] for c in s.encode("utf-8"))  # text -> byte-level string
    vocab = {t: i for i, t in enumerate(SPECIAL)}
    for b in range(256):
        vocab[b2u[b]] = len(vocab)
    merges: list[tuple[str, str]] = []

    def add_merge(left: str, right: str) -> None:
        merges.append((left, right))
        vocab.setdefault(left + right, len(vocab))

    sp = to_bl(" ")
    # ` N` is built left to right: ` 1` + `2` -> ` 12`, ` 12` + `3` -> ` 123`. Ranks go by
    # length, so a longer digit run ends as its first three digits, then single digits.
    for n in range(10):
        add_merge(sp, str(n))
    for n in range(10, MAX_NUMBER + 1):
        add_merge(sp + str(n // 10), str(n % 10))
    for w in WORDS:
        bl = to_bl(w)
        for k in range(2, len(bl) + 1):
            add_merge(bl[:k - 1], bl[k - 1])
    return vocab, merges


def build_tokenizer(out_dir: str):
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json; return the
    tokenizer loaded back through transformers.AutoTokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import AutoTokenizer

    if set(byte_to_unicode().values()) != set(pre_tokenizers.ByteLevel.alphabet()):
        raise RuntimeError("byte-level alphabet differs from the tokenizers library's ByteLevel")
    vocab, merges = vocab_and_merges()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])])
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    special_map = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(special_map, f, indent=2)
        f.write("\n")
    return AutoTokenizer.from_pretrained(out_dir)


def verify_tokenizer(tok) -> None:
    """Raise unless the tokenizer has the properties the task and the engine rely on."""
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (
        ids[BOS], ids[EOS], ids[PAD], ids[UNK]), "special token ids"
    demo_task.number_token_ids(tok)  # raises unless every ` N` is one token
    for w in WORDS + [":"]:
        assert len(tok.encode(w, add_special_tokens=False)) == 1, w
    prompt = demo_task.make_prompt(7, 10)
    assert len(tok.encode(prompt)) == 7 and tok.encode(prompt)[0] == tok.bos_token_id, tok.encode(prompt)
    ans = demo_task.expected_answer(7, 10)
    aids = tok.encode(ans, add_special_tokens=False)
    assert len(aids) == 4 and tok.decode(aids) == ans
    for text in ["count from 0 to 999:", " 0 00 007 1000 12345", "héllo wörld 🙂\n\ttabs  ", "日本語", "<s> not special? </s>",
                 "\x00\x01\xff", ""]:
        e = tok.encode(text, add_special_tokens=False)
        assert tok.decode(e) == text, (text, e, tok.decode(e))
        assert tok.unk_token_id not in e, text
    # incremental detokenization: the decoded prefix only grows
    full = tok.encode(demo_task.expected_answer(95, 130) + " and more: ünïcode", add_special_tokens=False)
    prev = ""
    for k in range(1, len(full) + 1):
        cur = tok.decode(full[:k])
        assert cur.startswith(prev.rstrip("\ufffd")), (prev, cur)
        prev = cur
    assert prev == demo_task.expected_answer(95, 130) + " and more: ünïcode"
    msgs = [{"role": "user", "content": prompt}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == prompt

