"""The stream chunks' fast path (Formatter.chunk_event) writes exactly the bytes of the
dict path (sse(Formatter.chunk)), for completions and chat, any text, any finish (the last
chunk with vLLM's stop_reason)."""

from __future__ import annotations

import json

import pytest

from fastserve_jax.request import TokenLogprobs
from fastserve_jax.serve.engine_loop import Delta
from fastserve_jax.serve.openai_format import Formatter, sse


class _Tok:
    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("text", ["", " 12", 'quote " and \\ back', "tab\tnew\nline", "é中🙂", "\x00\x1f"])
@pytest.mark.parametrize("finish,stop", [(None, None), ("stop", None), ("stop", 'say "é"\n'), ("stop", 7),
                                         ("length", None)])
def test_chunk_event_is_the_dict_path_byte_for_byte(chat, text, finish, stop):
    fmt = Formatter(chat, 'demo "model"', _Tok(), None)
    for index in (0, 3, 17):
        d = Delta(text, [5], None, finish_reason=finish, stop_reason=stop)
        fast = fmt.chunk_event(index, d)
        assert fast == sse(fmt.chunk(index, d))
        choice = json.loads(fast[len("data: "):])["choices"][0]
        assert choice["index"] == index and choice["finish_reason"] == finish
        assert choice.get("stop_reason", "absent") == ("absent" if finish is None else stop)   # on the last chunk


def test_chunk_event_with_logprobs_takes_the_dict_path():
    fmt = Formatter(False, "demo", _Tok(), 1)
    d = Delta(" b", [1], [TokenLogprobs(1, -0.5, {1: -0.5, 2: -1.5})])
    event = fmt.chunk_event(0, d)
    assert json.loads(event[6:])["choices"][0]["logprobs"]["tokens"] == ["b"]
