"""The prompt forms vLLM's offline API takes, read into a text or token ids: `LLM.generate`'s
and `LLMEngine.add_request`'s (a string, token ids as a list, tuple or 1-D integer array, or
vLLM's prompt dicts TextPrompt / TokensPrompt, whose `cache_salt` becomes
SamplingParams.cache_salt)."""

from __future__ import annotations

from collections.abc import Collection
from typing import TypedDict

import numpy as np

from fastserve_jax.chat_template import check_text

Prompt = str | list[int]

NO_INPUTS = ("multi_modal_data", "mm_processor_kwargs", "multi_modal_uuids")     # TextPrompt's, TokensPrompt's


class _Salted(TypedDict, total=False):
    cache_salt: str


class TextPrompt(_Salted):
    """vLLM's prompt dict of text (`from vllm import TextPrompt`); multimodal keys must be empty."""
    prompt: str


class TokensPrompt(_Salted):
    """vLLM's prompt dict of token ids."""
    prompt_token_ids: list[int]


def prompt_list(prompts) -> list:
    """generate()'s first argument as a list of prompts (one prompt alone is a list of one).
    Any sized collection of prompts is taken, as vLLM takes them (a pandas Series, a datasets
    Column, a deque, dict values), and a 1-D array of strings (or of objects, as pandas'
    .to_numpy() of texts) is a list of texts."""
    if isinstance(prompts, np.ndarray):
        if prompts.ndim == 2:
            return list(prompts)
        if prompts.ndim == 1 and prompts.dtype.kind in "USO":     # texts (pandas' .to_numpy() is of objects)
            items = [x.item() if isinstance(x, np.generic) else x for x in prompts]
            return [items] if items and is_token(items[0]) else items
        return [prompts]            # one prompt's token ids (one_prompt checks their type)
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, Collection) and not isinstance(prompts, (bytes, bytearray)):
        items = list(prompts)
        return [items] if items and is_token(items[0]) else items
    raise ValueError(f"prompts must be a string, token ids, a prompt dict or a list of them, got "
                     f"{type(prompts).__name__}")


def is_token(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def one_prompt(p, i: int) -> tuple[Prompt, str | None]:
    """(a string or a list of token ids, its cache_salt) from any form generate() takes; a
    prompt dict's `cache_salt` (vLLM's TextPrompt and TokensPrompt carry it) becomes
    SamplingParams.cache_salt, and its multimodal keys must be empty."""
    salt = None
    if isinstance(p, dict):
        kinds = set(p) & {"prompt", "prompt_token_ids"}
        if len(kinds) != 1 or set(p) - kinds - {"cache_salt", *NO_INPUTS}:
            raise ValueError(f"prompt {i}: a prompt dict has exactly one of 'prompt' (text) or 'prompt_token_ids', "
                             f"and may have 'cache_salt', got keys {sorted(p)}")
        for k in NO_INPUTS:
            if p.get(k):
                raise ValueError(f"prompt {i}: {k!r} must be empty or None: fastserve-jax serves text models only")
        key = kinds.pop()
        salt, p = p.get("cache_salt"), p[key]
        if isinstance(p, str) != (key == "prompt"):
            raise ValueError(f"prompt {i}: {key!r} takes {'text' if key == 'prompt' else 'token ids'}, "
                             f"got {type(p).__name__}")
    if isinstance(p, str):
        return check_text(p, f"prompt {i}"), salt
    if isinstance(p, np.ndarray):
        if p.ndim != 1 or not np.issubdtype(p.dtype, np.integer):
            raise ValueError(f"prompt {i}: a token-id array must be 1-D of integers, got shape {p.shape} {p.dtype}")
        return p.tolist(), salt
    return (list(p) if isinstance(p, tuple) else p), salt
