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


def tokenizer_dir(path: str) -> str:
    """The directory a tokenizer loads from: `path`, or a repo id's snapshot in the local Hugging
    Face cache (hf_files.local_model_dir). Raises ValueError where it holds no tokenizer file."""
    from fastserve_jax.models.hf_files import local_model_dir

    path = local_model_dir(path, "tokenizer")
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise ValueError(f"no tokenizer in {path!r}: none of {', '.join(TOKENIZER_FILES)} is there")
    return path


def load_tokenizer(model_path: str):
    """The tokenizer of a Hugging Face model directory (see the module docstring). Raises
    ValueError naming the directory when its tokenizer files are missing or broken."""
    model_path = tokenizer_dir(model_path)
    try:
        if tokenizer_class(model_path) in GENERIC_FAST and os.path.isfile(os.path.join(model_path, "tokenizer.json")):
            from transformers import PreTrainedTokenizerFast
            tok = PreTrainedTokenizerFast.from_pretrained(model_path)
        else:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(model_path)
    except Exception as e:  # JSONDecodeError, OSError, transformers' ValueErrors: none names the directory
        raise ValueError(f"cannot load the tokenizer of {model_path!r} (tokenizer.json, tokenizer_config.json "
                         f"or its tokenizer class's files missing or broken?): {type(e).__name__}: {' '.join(str(e).split())}") from None
    if not set(tok.get_vocab().values()) - set(tok.all_special_ids):
        # transformers 5 builds one from a tokenizer_config.json alone: every prompt was then empty
        raise ValueError(f"the tokenizer of {model_path!r} has no vocabulary, only special tokens: its "
                         "tokenizer.json (or tokenizer.model, vocab.json) is missing")
    return tok


def eos_ids(model_path: str, model_cfg, tokenizer, generation_config: str = "auto") -> frozenset[int]:
    """The token ids that end a generation: generation_config.json's eos_token_id (one or a
    list), else config.json's, and the tokenizer's own EOS as well (vLLM stops on both: a
    chat fine-tune's tokenizer may end turns with a token its configs do not name).
    `generation_config`: its mode ("vllm" ignores a broken file, see generation_config.py)."""
    from fastserve_jax.models.generation_config import eos_token_ids

    ids = eos_token_ids(model_path, generation_config)
    if ids is None:
        ids = list(model_cfg.eos_token_id)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return frozenset(int(i) for i in ids)
