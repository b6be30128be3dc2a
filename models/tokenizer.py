"""Loading a checkpoint's tokenizer without paying for what it does not use, and the token
ids that end its generations (`eos_ids`).

`transformers.AutoTokenizer` reads the checkpoint's config.json through transformers' model
config classes, and those import torch whenever it is installed: 3-4 s of a start on a
2-core machine, for an engine that never runs torch. A checkpoint whose tokenizer is the
generic fast one (a `tokenizer.json` and `tokenizer_class` PreTrainedTokenizerFast or
TokenizersBackend, as the demo model and the random checkpoints have) loads through that
class directly, which imports neither. Any other tokenizer class (LlamaTokenizerFast,
GPT2Tokenizer, ...) may carry model-specific behaviour, so it goes through AutoTokenizer.
"""

from __future__ import annotations

import json
import os

GENERIC_FAST = frozenset({"PreTrainedTokenizerFast", "TokenizersBackend"})


# Files one of which a Hugging Face tokenizer loads from (fast, its config, sentencepiece, BPE).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def tokenizer_class(model_path: str) -> str | None:
    """The `tokenizer_class` the checkpoint's tokenizer_config.json names, None without one."""
    path = os.path.join(model_path, "tokenizer_config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        cls = json.load(f).get("tokenizer_class")
    return cls if isinstance(cls, str) else None


def load_tokenizer(model_path: str):
    """The tokenizer of a Hugging Face model directory (see the module docstring). Raises
    ValueError naming the directory when its tokenizer files are missing or broken."""
    if os.path.isdir(model_path) and not any(os.path.isfile(os.path.join(model_path, f)) for f in TOKENIZER_FILES):
        raise ValueError(f"no tokenizer in {model_path!r}: none of {', '.join(TOKENIZER_FILES)} is there")
    try:
        if tokenizer_class(model_path) in GENERIC_FAST and os.path.isfile(os.path.join(model_path, "tokenizer.json")):
            from transformers import PreTrainedTokenizerFast
            return PreTrainedTokenizerFast.from_pretrained(model_path)
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(model_path)
    except Exception as e:  # JSONDecodeError, OSError, transformers' ValueErrors: none names the directory
        raise ValueError(f"cannot load the tokenizer of {model_path!r} (tokenizer.json, tokenizer_config.json "
                         f"or its tokenizer class's files missing or broken?): {type(e).__name__}: {' '.join(str(e).split())}") from None


def eos_ids(model_path: str, model_cfg, tokenizer) -> frozenset[int]:
    """The token ids that end a generation: generation_config.json's eos_token_id (one or a
    list), else config.json's, and the tokenizer's own EOS as well (vLLM stops on both: a
    chat fine-tune's tokenizer may end turns with a token its configs do not name)."""
    gen = os.path.join(model_path, "generation_config.json")
    ids = None
    if os.path.isfile(gen):
        with open(gen) as f:
            ids = json.load(f).get("eos_token_id")
    if ids is None:
        ids = list(model_cfg.eos_token_id)
    ids = ids if isinstance(ids, list) else [ids]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return frozenset(int(i) for i in ids)
