"""Prompt logprobs on the host side (fastserve_jax/prompt_logprobs.py): which positions a
chunk asks for, how launches carry them, and how they are recorded; host arrays only, no
device. The device results against transformers: test_engine.py (chunked prefill) and
test_engine_parity.py (recompute preemption); the HTTP format: test_protocol_fields.py."""

from __future__ import annotations

import numpy as np
import pytest

from fastserve_jax import SamplingParams
from fastserve_jax.config import EngineConfig
from fastserve_jax.kv_cache import KVManager
from fastserve_jax.prompt_logprobs import needs_prompt_logprobs, record
from fastserve_jax.request import Request
from fastserve_jax.runner.keys import DecodeKey, PrefillKey, key_from_wire, key_to_wire
from fastserve_jax.runner.launch import LaunchBuilder, LaunchWork
from fastserve_jax.scheduler.base import ScheduledRequest


@pytest.mark.parametrize("bad", [-1, 21, True, 2.0, "2"])
def test_prompt_logprobs_are_validated_like_logprobs(bad):
    with pytest.raises(ValueError, match=r"prompt_logprobs must be an integer in \[0, 20\] or None"):
        SamplingParams(prompt_logprobs=bad)
    assert SamplingParams(prompt_logprobs=0).prompt_logprobs == 0


def _host(n: int, k: int = 20) -> tuple[np.ndarray, ...]:
    """Device results of n packed tokens: token j's target logprob -j, its top ids j + 100 ...,
    its rank j + 1."""
    j = np.arange(n)
    return (-j.astype(np.float32), (j[:, None] + 100 + np.arange(k)).astype(np.int32),
            -(j[:, None] + np.arange(k) / 10).astype(np.float32), (j + 1).astype(np.int32))


def test_launches_ask_each_prompt_position_once_over_chunks_and_recomputation():
    cfg = EngineConfig(max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32, block_size=4).resolve()
    kv = KVManager(32, 4)
    prompt = list(range(10, 20))                                     # 10 tokens: positions 0..8 are wanted
    a = Request("a", prompt, SamplingParams(max_tokens=4, prompt_logprobs=2), 0.0)
    b = Request("b", [5, 6, 7], SamplingParams(max_tokens=4), 0.0)   # wants none
    kv.allocate(a, 10)
    kv.allocate(b, 3)
    builder = LaunchBuilder(cfg)
    # a 6-token chunk beside a request without prompt logprobs: the prefill variant, targets
    # where a's tokens sit (b's first), what each position predicts
    ln = builder.build([ScheduledRequest(b, 3), ScheduledRequest(a, 6)], kv)[0]
    assert ln.key.prompt_logprobs and ln.targets[:9].tolist() == [-1, -1, -1, 11, 12, 13, 14, 15, 16]
    assert [(r.request_id, at, p, n) for r, at, p, n in ln.spans] == [("a", 3, 0, 6)]
    assert LaunchWork.of(ln, 64).targets is ln.targets
    record(ln.spans, _host(len(ln.targets)))
    assert a.prompt_logprobs[0] is None and [e.token_id for e in a.prompt_logprobs[1:]] == prompt[1:7]
    assert a.prompt_logprobs[1].logprob == -3 and list(a.prompt_logprobs[1].top) == [103, 104]
    a.num_computed_tokens = 6
    # a one-token chunk in mid-prompt goes into a prefill launch (a decode launch computes no
    # prompt logprobs); the last prompt position predicts no prompt token: a plain decode
    one = builder.build([ScheduledRequest(a, 1)], kv)[0]
    assert isinstance(one.key, PrefillKey) and one.key.prompt_logprobs and one.targets[0] == 17
    record(one.spans, _host(len(one.targets)))
    a.num_computed_tokens = 9
    assert not needs_prompt_logprobs(a, 1) and isinstance(builder.build([ScheduledRequest(a, 1)], kv)[0].key, DecodeKey)
    # dropped for recomputation mid-prompt, positions 0..6 recorded: its prefill asks for 7 and 8 only
    a.num_computed_tokens = 0
    again = builder.build([ScheduledRequest(a, 10)], kv)[0]
    assert again.targets[:10].tolist() == [-1] * 7 + [18, 19, -1] and again.spans[0][1:] == (7, 7, 2)
    # an entry computed twice (async scheduling's next chunk before this one is collected) is kept once
    record(ln.spans + again.spans, _host(len(again.targets)))
    assert [e.token_id for e in a.prompt_logprobs[1:]] == prompt[1:] and a.prompt_logprobs[1].logprob == -3
    plain = builder.build([ScheduledRequest(a, 10)], kv)[0]
    assert not plain.key.prompt_logprobs and plain.targets is None
    for key in (ln.key, plain.key):
        assert key_from_wire(key_to_wire(key)) == key
    assert key_to_wire(plain.key) == ["prefill", plain.key.tokens, plain.key.blocks]
