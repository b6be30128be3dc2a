"""vLLM's LLMEngine methods over this engine's own (engine.py), so a script written for
vLLM's engine loop runs here as it is:

    engine.add_request("0", "count from 3 to 12:", SamplingParams(max_tokens=20))
    while engine.has_unfinished_requests():
        for out in engine.step():       # this engine's Request objects, read as vLLM's outputs
            if out.finished:
                print(out.request_id, out.outputs[0].text)

This engine's own order is add_request(prompt, params, request_id=None, arrival_time=None);
vLLM's (request_id, prompt, params) is told apart by the SamplingParams in third place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np

from fastserve_jax.prompts import one_prompt
from fastserve_jax.sampling_params import SamplingParams


def add_request_arguments(prompt, params, request_id, lora_request=None, priority=0):
    """(prompt, params, request_id) in this engine's order, from its own or vLLM's; a prompt
    dict (TextPrompt, TokensPrompt) read into its text or ids, its cache_salt into params.
    vLLM's lora_request and priority must ask for nothing (None, 0)."""
    no_lora_or_priority(lora_request, priority)
    if isinstance(request_id, SamplingParams) and not isinstance(params, SamplingParams):
        prompt, params, request_id = params, request_id, prompt         # vLLM's order
    if request_id is not None and not isinstance(request_id, str):
        raise ValueError(f"request_id must be a string, got {type(request_id).__name__}")
    if isinstance(prompt, (dict, tuple, np.ndarray)):     # a prompt dict, ids as a tuple or an array
        prompt, salt = one_prompt(prompt, 0)
        if salt is not None and isinstance(params, SamplingParams):
            params = dataclasses.replace(params, cache_salt=salt)
    return prompt, params, request_id


def no_lora_or_priority(lora_request, priority) -> None:
    """vLLM's lora_request and priority, one or one per prompt (LLM.generate's), must ask for
    nothing: None (or Nones), 0 (or 0s)."""
    if any(x is not None for x in (lora_request if isinstance(lora_request, Sequence) else [lora_request])):
        raise ValueError("lora_request: LoRA adapters are not implemented; pass None")
    if any(priority if isinstance(priority, Sequence) else [priority]):
        raise ValueError("priority: priority scheduling is not implemented (the --scheduler policy orders "
                         "requests); pass None or 0s")


class VllmEngineMethods:
    """Mixed into LLMEngine: vLLM's names for what the engine does under its own."""

    def has_unfinished_requests(self) -> bool:
        return self.has_unfinished()

    def get_num_unfinished_requests(self) -> int:
        return len(self._requests)

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        """Abort one request or several (vLLM's); an id that is not live is skipped."""
        for rid in [request_id] if isinstance(request_id, str) else list(request_id):
            self.abort(rid)

    def get_tokenizer(self):
        return self.tokenizer
