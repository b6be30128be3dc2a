"""The request fields vLLM's clients send beyond OpenAI's core set (serve/protocol.py's
docstring): the parser accepts what the engine honours and what asks for nothing, and
rejects the rest with a 400 naming the field; then, through the server with the demo
model, ignore_eos, stop_token_ids, logit_bias, min_tokens, echo and continuous usage change
what comes back."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest

from fastserve_jax.models import demo_task
from fastserve_jax.serve import bench_client
from fastserve_jax.serve.app import ServerConfig
from fastserve_jax.serve.errors import APIError
from fastserve_jax.serve.protocol import parse_chat, parse_completion
from server_harness import ENGINE_KW, LiveServer

USER = [{"role": "user", "content": "count from 3 to 12:"}]
# the payloads of vLLM's benchmark request functions (backend_request_func.py)
VLLM_COMPLETION = {"model": "demo", "prompt": "count from 3 to 12:", "temperature": 0.0, "best_of": 1,
                   "max_tokens": 20, "logprobs": None, "stream": True, "stream_options": {"include_usage": True},
                   "ignore_eos": False}
VLLM_CHAT = {"model": "demo", "messages": USER, "temperature": 0.0, "max_completion_tokens": 20, "stream": True,
             "stream_options": {"include_usage": True}, "ignore_eos": False}


def test_token_id_arrays_take_integral_numbers_as_int_fields_do():
    """5.0 is 5 in token-id arrays too (vLLM's lax list[int]); int fields already took it, and
    a prompt of [1.0, 2.0] was a 400. 1.5 and true are still refused."""
    job = parse_completion({"prompt": [[1.0, 2], [3.0]], "stop_token_ids": [5.0], "allowed_token_ids": [7.0, 8]})
    assert job.prompts == [[1, 2], [3]] and all(type(t) is int for p in job.prompts for t in p)
    assert job.stop_token_ids == (5,) and job.allowed_token_ids == (7, 8)
    assert parse_completion({"prompt": [4.0, 5]}).prompts == [[4, 5]]
    for body, param in (({"prompt": [1.5]}, "prompt"), ({"prompt": [True]}, "prompt"),
                        ({"prompt": "x", "stop_token_ids": [-1.0]}, "stop_token_ids"),
                        ({"prompt": "x", "allowed_token_ids": [float("nan")]}, "allowed_token_ids")):
        with pytest.raises(APIError) as e:
            parse_completion(body)
        assert e.value.param == param


def test_vllm_benchmark_payloads_and_default_valued_fields_parse():
    job = parse_completion(VLLM_COMPLETION)
    assert job.include_usage and not job.ignore_eos and job.stop_token_ids == () and not job.echo
    assert parse_chat(VLLM_CHAT).max_tokens == 20
    # top_logprobs 0 without logprobs asks for nothing: vLLM refuses only a positive one (or -1)
    assert parse_chat({"messages": USER, "top_logprobs": 0}).logprobs is None
    # completions' max_tokens: left out OpenAI's 16, an explicit null the rest of the context (vLLM's)
    assert parse_completion({"prompt": "x"}).max_tokens == 16
    assert parse_completion({"prompt": "x", "max_tokens": None}).max_tokens is None
    job = parse_completion({"prompt": "x", "n": 2, "best_of": 2, "ignore_eos": True, "stop_token_ids": [5, 9],
                            "min_tokens": 0, "logit_bias": {}, "response_format": {"type": "text"}, "echo": True,
                            "suffix": None, "stream": True,
                            "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    assert job.ignore_eos and job.stop_token_ids == (5, 9) and job.echo and job.continuous_usage
    assert (job.repetition_penalty, job.min_p) == (None, None)         # left out: the model's default
    for parse, body in ((parse_completion, {"prompt": "x"}), (parse_chat, {"messages": USER})):
        job = parse(body | {"repetition_penalty": 1.1, "min_p": 0.05})
        assert (job.repetition_penalty, job.min_p) == (1.1, 0.05)
    # as in vLLM: include_usage is true unless it says false once stream_options is sent (no usage
    # came before 2026-12-07), continuous usage counts only with it, {} is no option streamed or
    # not (a 400 without stream), OpenAI's include_obfuscation is taken (a 400)
    usage = lambda opts, stream=True: (lambda j: (j.include_usage, j.continuous_usage))(
        parse_completion({"prompt": "x", "stream": stream, "stream_options": opts}))
    assert usage({"continuous_usage_stats": True}) == usage({"include_usage": True, "continuous_usage_stats": True}) \
        == (True, True)
    assert usage({"include_usage": False, "continuous_usage_stats": True}) == (False, False)
    assert usage({}) == (True, False) and usage({}, False) == usage(None) == (False, False)
    assert usage({"include_usage": True, "include_obfuscation": False}) == (True, False)
    assert usage({"include_usage": None, "continuous_usage_stats": True}) == (False, False)   # vLLM's bool(None)
    # more of vLLM's: "required" with no tools is "none" with tools dropped (OpenAI's), a text
    # format's null json_schema, and a bool among vllm_xargs (each a 400 until 2026-12-07)
    job = parse_chat({"messages": USER, "tools": [], "tool_choice": "required",
                      "response_format": {"type": "text", "json_schema": None}, "vllm_xargs": {"flag": True}})
    assert job.chat_options.tools is None and job.ignored == ("vllm_xargs",)
    chat = parse_chat({"messages": USER + [{"role": "assistant", "content": None, "tool_calls": []}] + USER,
                       "tools": [], "tool_choice": "none", "parallel_tool_calls": False, "logit_bias": None,
                       "min_tokens": None, "best_of": None})
    assert chat.prompts[0][1] == {"role": "assistant", "content": ""}
    # vLLM's output and chat-template fields, at their defaults and not
    defaults = {"skip_special_tokens": True, "spaces_between_special_tokens": True, "include_stop_str_in_output": False}
    assert parse_completion(dict(defaults, prompt="x")) == parse_completion({"prompt": "x"})
    job = parse_chat(dict(defaults, messages=USER, add_generation_prompt=True, continue_final_message=False,
                          chat_template_kwargs=None))
    assert job == parse_chat({"messages": USER})
    job = parse_chat({"messages": USER, "add_generation_prompt": False, "continue_final_message": True,
                      "chat_template_kwargs": {"enable_thinking": False}, "skip_special_tokens": False,
                      "include_stop_str_in_output": True, "spaces_between_special_tokens": False})
    assert job.chat_options.continue_final_message and not job.chat_options.add_generation_prompt
    assert job.chat_options.template_kwargs == {"enable_thinking": False}
    assert (job.skip_special_tokens, job.spaces_between_special_tokens, job.include_stop_str_in_output) == \
        (False, False, True)
    # vLLM's prompt and request fields and OpenAI's store, metadata, service_tier and hints, on both endpoints
    extras = {"truncate_prompt_tokens": -1, "add_special_tokens": False, "prompt_logprobs": 0, "request_id": "r-1",
              "store": False, "metadata": {"k": "v"}, "service_tier": "auto", "stream": True, "prompt_cache_key": "k",
              "safety_identifier": "u-1", "prediction": {"type": "content", "content": [{"type": "text", "text": "a"}]}}
    for job in (parse_completion(dict(extras, prompt="x")), parse_chat(dict(extras, messages=USER, echo=True))):
        assert (job.truncate_prompt_tokens, job.add_special_tokens, job.prompt_logprobs, job.request_id) == \
            (-1, False, 0, "r-1")
        assert job.ignored == ("store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier", "prediction")
    assert job.echo and parse_completion({"prompt": "x"}).add_special_tokens is None
    assert parse_chat({"messages": USER, "bad_words": [" 7", "7 8"]}).bad_words == (" 7", "7 8")
    assert parse_completion({"prompt": "x", "bad_words": []}) == parse_completion({"prompt": "x", "bad_words": None})


REJECTED = [
    ({"min_tokens": -1}, "min_tokens", "must be in [0, inf]"),
    ({"min_tokens": 2.5}, "min_tokens", "must be an integer"),
    ({"best_of": 3}, "best_of", "best_of=3 with n=1"),
    ({"n": 2, "best_of": 1}, "best_of", "send best_of equal to n"),
    ({"logit_bias": [1]}, "logit_bias", "must be an object"),
    ({"logit_bias": {"-5": 1}}, "logit_bias", "strings of digits"),
    ({"logit_bias": {"x": 1}}, "logit_bias", "strings of digits"),
    ({"logit_bias": {"5": True}}, "logit_bias", "to numbers"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "at most 300"),
    ({"response_format": {"type": "json_object"}}, "response_format", "structured (JSON) output"),
    ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format", "not supported"),
    ({"response_format": "text"}, "response_format", '{"type": "text"}'),
    ({"ignore_eos": 1}, "ignore_eos", "true or false"),
    ({"cache_salt": ""}, "cache_salt", "non-empty string"),
    ({"cache_salt": 5}, "cache_salt", "must be a string"),
    ({"stop_token_ids": [1, -2]}, "stop_token_ids", "integers >= 0"),
    ({"stop_token_ids": list(range(65))}, "stop_token_ids", "at most 64"),
    ({"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": "yes"}},
     "continuous_usage_stats", "true or false"),
    ({"stream": True, "stream_options": {"other": True}}, "stream_options", "continuous_usage_stats"),
    ({"frobnicate": 1}, "frobnicate", "unknown or unsupported field(s) ['frobnicate']"),
    ({"skip_special_tokens": "false"}, "skip_special_tokens", "true or false"),
    ({"spaces_between_special_tokens": 0}, "spaces_between_special_tokens", "true or false"),
    ({"include_stop_str_in_output": 1}, "include_stop_str_in_output", "true or false"),
    ({"repetition_penalty": 0}, "repetition_penalty", "must be a number in [1e-30, 1e+30]"),
    ({"repetition_penalty": 1e300}, "repetition_penalty", "must be a number in"),     # a float32 overflow warning before
    ({"repetition_penalty": 10**309}, "repetition_penalty", "must be a finite number"),   # a 500 (OverflowError) before
    ({"temperature": -10**309}, "temperature", "must be a finite number"),
    ({"n": 10**400}, "n", "got 10000000000000000000...(401 characters)"),       # all 401 digits before
    ({"repetition_penalty": "1.1"}, "repetition_penalty", "must be a number"),
    ({"min_p": 1.5}, "min_p", "must be in [0.0, 1.0]"),
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens", "must be -1 (what the context holds) or >= 1"),
    ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens", "must be in [-1, inf]"),
    ({"truncate_prompt_tokens": "5"}, "truncate_prompt_tokens", "must be an integer"),
    ({"add_special_tokens": 1}, "add_special_tokens", "true or false"),
    ({"prompt_logprobs": -1}, "prompt_logprobs", "(-1, every token of the vocabulary, is not supported)"),
    ({"prompt_logprobs": 21}, "prompt_logprobs", "at most 20 (--max-logprobs)"),
    ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs", "not available with \"stream\": true"),
    ({"request_id": 5}, "request_id", "must be a string"),
    ({"request_id": ""}, "request_id", "1 to 256 printable characters"),
    ({"store": "yes"}, "store", "true or false"),
    ({"metadata": {"k": 1}}, "metadata", "an object of strings"),
    ({"prompt_cache_key": 3}, "prompt_cache_key", "must be a string"),
    ({"prediction": {"type": "content"}}, "prediction", '{"type": "content", "content"'),
    ({"prediction": {"type": "content", "content": [{"type": "image_url"}]}}, "prediction", "text parts"),
    ({"prediction": "abc"}, "prediction", "got string"),
    ({"service_tier": 1}, "service_tier", "must be a string"),
    ({"allowed_token_ids": []}, "allowed_token_ids", "must be a non-empty array of token ids"),
    ({"allowed_token_ids": [1, "2"]}, "allowed_token_ids", "must be a non-empty array of token ids"),
    ({"allowed_token_ids": list(range(321))}, "allowed_token_ids", "at most 320 distinct tokens"),
    ({"bad_words": "x"}, "bad_words", "must be an array of strings"),
    ({"bad_words": ["x", 7]}, "bad_words", "must be an array of strings"),
    ({"bad_words": ["x", " "]}, "bad_words", "a character other than whitespace"),
    ({"stop": [str(i) for i in range(65)]}, "stop", "at most 64"),
    ({"use_beam_search": True}, "use_beam_search", "beam search is not supported"),
    ({"logits_processors": ["my.module.Proc"]}, "logits_processors", "send [] or null"),
    ({"mm_processor_kwargs": {"fps": 1}}, "mm_processor_kwargs", "no images"),
    ({"kv_transfer_params": {"do_remote_decode": True}}, "kv_transfer_params", "no disaggregated prefill"),
    ({"modalities": ["text", "audio"]}, "modalities", "text only"),
    ({"reasoning_effort": 3}, "reasoning_effort", "must be a string"),
    ({"include_reasoning": "yes"}, "include_reasoning", "true or false"),
    ({"length_penalty": "1"}, "length_penalty", "must be a number"),
    ({"vllm_xargs": {"k": [[1]]}}, "vllm_xargs", "strings, numbers or lists of them"),
    ({"vllm_xargs": {"k": None}}, "vllm_xargs", "strings, numbers or lists of them"),
    ({"reasoning_effort": "bogus"}, "reasoning_effort", "must be one of"),
]
REJECTED_COMPLETION = [
    ({"echo": True, "logprobs": 21}, "logprobs", "at most 20 (--max-logprobs)"),
    ({"max_tokens": 0}, "max_tokens", "must be in [1, inf]"),           # 0 only with echo
    ({"echo": True, "max_tokens": 0, "min_tokens": 1}, "min_tokens", "must be 0 with 'max_tokens' 0"),
    ({"suffix": "end"}, "suffix", "not supported"),
    ({"add_generation_prompt": False}, "add_generation_prompt", "unknown or unsupported field(s)"),
    ({"chat_template_kwargs": {}}, "chat_template_kwargs", "unknown or unsupported field(s)"),
    ({"tools": []}, "tools", "unknown or unsupported field(s) ['tools']"),
]
REJECTED_CHAT = [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "no tool (function) calling"),
    ({"tool_choice": "auto"}, "tool_choice", 'only "none" or null'),
    ({"parallel_tool_calls": "no"}, "parallel_tool_calls", "true or false"),
    ({"continue_final_message": True}, "continue_final_message", "cannot both be true"),
    ({"add_generation_prompt": "no"}, "add_generation_prompt", "true or false"),
    ({"chat_template_kwargs": "enable_thinking=false"}, "chat_template_kwargs", "must be an object"),
    ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs", "may not set"),
    ({"chat_template_kwargs": {"tokenize": True, "messages": []}}, "chat_template_kwargs", "['messages', 'tokenize']"),
    ({"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "c"}]}]}, "messages",
     "tool_calls must be null or []"),
    ({"messages": [{"role": "assistant", "content": "x", "audio": {"id": "a"}}]}, "messages", "no audio output"),
    ({"messages": [{"role": "assistant", "content": "x", "refusal": 3}]}, "messages", "refusal must be a string"),
    ({"messages": [{"role": "user", "content": "x", "id": "m1"}]}, "messages", "unsupported field(s) ['id']"),
    ({"messages": [{"role": "user", "content": None}]}, "messages", "must be a string"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [{"id": "c"}]}]}, "messages",
     "tool_calls must be null or []"),
    ({"messages": [{"role": "user", "content": "x", "reasoning_content": "r"}]}, "messages", "unsupported field(s)"),
    ({"messages": [{"role": "assistant", "content": "x", "reasoning_content": 3}]}, "messages",
     "reasoning_content must be a string"),
]


def test_integral_floats_are_integers_as_vllm_parses_them():
    """`max_tokens: 5.0` (what a client's arithmetic sends) is 5, as pydantic's lax mode gives
    vLLM; a fraction, a string or a bool is still a 400 naming the field."""
    job = parse_completion({"prompt": "x", "max_tokens": 5.0, "n": 2.0, "seed": -3.0, "logprobs": 1.0})
    assert (job.max_tokens, job.n, job.seed, job.logprobs) == (5, 2, -3, 1) and type(job.max_tokens) is int
    assert parse_completion({"prompt": "x", "max_tokens": 5.0}) == parse_completion({"prompt": "x", "max_tokens": 5})
    for bad in (5.5, "5", True, float("inf")):
        with pytest.raises(APIError, match="max_tokens"):
            parse_completion({"prompt": "x", "max_tokens": bad})


def test_a_turn_sent_back_as_openais_sdk_dumps_it_is_accepted():
    """`messages.append(resp.choices[0].message.model_dump())` sends the answer back with its null
    refusal, annotations, audio, function_call and tool_calls; a tool result names its call."""
    from fastserve_jax.serve.protocol import parse_messages

    answer = {"role": "assistant", "content": " 3 4 5", "refusal": None, "annotations": None, "audio": None,
              "function_call": None, "tool_calls": None}
    tool = {"role": "tool", "content": "42", "tool_call_id": "call_1"}
    assert parse_messages([USER[0], answer, tool, USER[0]]) == [
        USER[0], {"role": "assistant", "content": " 3 4 5"}, tool, USER[0]]


INERT = {"reasoning_effort": "low", "include_reasoning": True, "length_penalty": 1.0, "vllm_xargs": {"k": 1, "l": [1, "a"]},
         "use_beam_search": False, "logits_processors": [], "mm_processor_kwargs": {}, "kv_transfer_params": {},
         "modalities": ["text"]}


@pytest.mark.parametrize("chat", [False, True])
def test_vllms_fields_that_change_nothing_here_are_accepted(chat):
    """LangChain's and LiteLLM's `reasoning_effort` option, and vLLM's fields at values that ask
    for nothing, were unknown fields (400s) until 2026-12-07; those that may change something
    elsewhere are logged as ignored."""
    parse = parse_chat if chat else parse_completion
    plain = {"messages": USER} if chat else {"prompt": "x"}
    job = parse(dict(plain, **INERT))
    assert job.ignored == ("reasoning_effort", "include_reasoning", "length_penalty", "vllm_xargs")
    assert dataclasses.replace(job, ignored=()) == parse(plain)


def test_message_keys_at_null_read_as_left_out_and_any_role_may_name_a_tool_call():
    """Clients that write every optional field of one message model as null got a 400 until
    2026-12-07 (at the top level a null field was already read as left out); vLLM's custom
    messages take tool_call_id on any role."""
    from fastserve_jax.serve.protocol import parse_messages

    nulls = {"role": "system", "content": "s", "name": None, "tool_calls": None, "tool_call_id": None, "id": None}
    named = {"role": "user", "content": "x", "tool_call_id": "c"}
    assert parse_messages([nulls, named]) == [{"role": "system", "content": "s"}, named]


@pytest.mark.parametrize("chat,extra,param,message", [(c, *r) for r in REJECTED for c in (False, True)] +
                         [(False, *r) for r in REJECTED_COMPLETION] + [(True, *r) for r in REJECTED_CHAT],
                         ids=lambda v: str(v)[:40])
def test_unsupported_values_are_400s_naming_the_field(chat, extra, param, message):
    body = dict({"messages": USER} if chat else {"prompt": "x"}, **extra)
    with pytest.raises(APIError) as e:
        (parse_chat if chat else parse_completion)(body)
    err = e.value.body()["error"]
    assert e.value.status == 400 and message in err["message"], err
    assert err["param"] == param or param in err["message"], err


def test_logit_bias_is_clamped_to_openais_range_as_vllms_server_does():
    """-1e9 to ban a token is common in clients written for vLLM (which clamps); a 400 here
    until 2026-12-07. NaN is still refused."""
    body = json.loads('{"prompt": "x", "logit_bias": {"5": -1e9, "6": 101, "7": 1e400, "8": -2.5, "9": %d}}' % 10**400)
    assert parse_completion(body).logit_bias == {5: -100.0, 6: 100.0, 7: 100.0, 8: -2.5, 9: 100.0}
    with pytest.raises(APIError, match="to numbers"):
        parse_completion(json.loads('{"prompt": "x", "logit_bias": {"5": NaN}}'))


@pytest.fixture(scope="module")
def live():
    # with prefix caching, so that every field here is also served past cached blocks
    srv = LiveServer(ServerConfig(model_name="demo"), dict(ENGINE_KW, enable_prefix_caching=True)).start()
    yield srv
    srv.stop()


def _post(live, path: str, body: dict) -> tuple[int, dict | list[dict]]:
    """(status, the JSON body), or for a stream (status, its events' objects before [DONE])."""
    status, _, data = asyncio.run(bench_client.request(live.url, "POST", path, json.dumps(body).encode(),
                                                       {"Content-Type": "application/json"}))
    if not body.get("stream") or status != 200:
        return status, json.loads(data)
    events = [e[len("data: "):] for e in data.decode().split("\n\n") if e]
    assert events[-1] == "[DONE]"
    return status, [json.loads(e) for e in events[:-1]]


def test_vllm_benchmark_payloads_are_served(live):
    status, chunks = _post(live, "/v1/completions", VLLM_COMPLETION)
    assert status == 200 and demo_task.check_answer(3, 12, "".join(c["choices"][0]["text"] for c in chunks[:-1]))
    assert chunks[-1]["usage"]["completion_tokens"] == demo_task.answer_num_tokens(3, 12)
    status, chunks = _post(live, "/v1/chat/completions", VLLM_CHAT)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert status == 200 and demo_task.check_answer(3, 12, text)
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": []}] + USER
    status, out = _post(live, "/v1/chat/completions", {"messages": history, "max_tokens": 4, "tools": [],
                                                       "tool_choice": "none", "response_format": {"type": "text"}})
    assert status == 200 and out["usage"]["completion_tokens"] >= 1, out


def test_ignore_eos_and_stop_token_ids(live):
    answer = demo_task.answer_num_tokens(3, 12)
    body = {"prompt": demo_task.make_prompt(3, 12), "max_tokens": answer + 6, "temperature": 0}
    _, out = _post(live, "/v1/completions", body)
    assert out["choices"][0]["finish_reason"] == "stop" and out["usage"]["completion_tokens"] == answer
    _, out = _post(live, "/v1/completions", dict(body, ignore_eos=True))
    assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] == answer + 6
    assert out["choices"][0]["text"].startswith(demo_task.expected_answer(3, 12))
    tok = live.state.engine.engine.tokenizer
    seven = tok.encode(" 7", add_special_tokens=False)
    assert len(seven) == 1
    _, out = _post(live, "/v1/completions", dict(body, stop_token_ids=seven))
    assert out["choices"][0]["text"] == " 3 4 5 6" and out["choices"][0]["finish_reason"] == "stop"
    _, out = _post(live, "/v1/chat/completions", {"messages": USER, "temperature": 0, "stop_token_ids": seven})
    assert out["choices"][0]["message"]["content"] == " 3 4 5 6"
    status, err = _post(live, "/v1/completions", dict(body, stop_token_ids=[10 ** 6]))
    assert status == 400 and err["error"]["param"] == "stop_token_ids" and "vocabulary" in err["error"]["message"]



def test_logit_bias_and_min_tokens(live):
    answer = demo_task.answer_num_tokens(3, 12)
    body = {"prompt": demo_task.make_prompt(3, 12), "max_tokens": answer + 6, "temperature": 0}
    tok = live.state.engine.engine.tokenizer
    [three], [seven] = (tok.encode(t, add_special_tokens=False) for t in (" 3", " 7"))
    _, out = _post(live, "/v1/completions", dict(body, logit_bias={str(three): -100, str(seven): 100}))
    assert out["choices"][0]["text"].startswith(" 7 7")          # " 3" banned, " 7" forced
    _, out = _post(live, "/v1/completions", dict(body, min_tokens=answer + 3, stream=True,
                                                  stream_options={"include_usage": True}))
    assert out[-1]["usage"]["completion_tokens"] >= answer + 3    # past the EOS it ends with alone
    text = "".join(c["choices"][0]["text"] for c in out[:-1])
    assert text.startswith(demo_task.expected_answer(3, 12))
    _, out = _post(live, "/v1/chat/completions", {"messages": USER, "temperature": 0, "stop_token_ids": [seven],
                                                  "min_tokens": 6})
    content = out["choices"][0]["message"]["content"]       # " 7", the 5th token, is banned: the model goes on
    assert content.startswith(" 3 4 5 6 ") and not content.startswith(" 3 4 5 6 7") and \
        out["usage"]["completion_tokens"] > 6, out
    for extra, param, message in ((dict(logit_bias={"1000000": 1}), "logit_bias", "vocabulary"),
                                  (dict(min_tokens=answer + 7), "min_tokens", "at most")):
        status, err = _post(live, "/v1/completions", dict(body, **extra))
        assert status == 400 and err["error"]["param"] == param and message in err["error"]["message"], err


def test_bad_words(live):
    """vLLM's bad_words on the demo model's greedy count (async scheduling on: the next step's
    bans wait for a token still in flight where a word's prefix may end with it)."""
    body = {"prompt": demo_task.make_prompt(3, 12), "max_tokens": 16, "temperature": 0}

    def numbers(extra, chat=False):
        if chat:
            _, out = _post(live, "/v1/chat/completions", {"messages": USER, "max_tokens": 16, "temperature": 0, **extra})
            return out["choices"][0]["message"]["content"].split()
        status, out = _post(live, "/v1/completions", dict(body, **extra))
        assert status == 200, out
        return out["choices"][0]["text"].split()

    def counts(seq):
        return [int(x) for x in seq] == list(range(int(seq[0]), int(seq[0]) + len(seq)))

    got = numbers({"bad_words": [" 7"]})                   # one token, " 7" (and "7")
    assert got[:4] == ["3", "4", "5", "6"] and "7" not in got and counts(got[4:]) and len(got) == 16, got
    for chat in (False, True):
        got = numbers({"bad_words": ["8 9"]}, chat)        # " 9" banned right after " 8" only
        assert got[:6] == ["3", "4", "5", "6", "7", "8"] and got[6] != "9" and counts(got[6:]), got
    got = numbers({"bad_words": ["7 8"]})                  # the model goes back to " 4" after " 7", again and again
    assert got[:5] == ["3", "4", "5", "6", "7"] and ("7", "8") not in set(zip(got, got[1:])), got
    # the prompt is not matched: ": 3" (":" then " 3") bans nothing at the first step
    assert numbers({"bad_words": [": 3"]}) == demo_task.expected_answer(3, 12).split()
    # 300 logit_bias entries and 21 banned tokens (each digit with and without a space, and "x") overflow
    # the sampler's 320 slots: refused, never truncated
    status, err = _post(live, "/v1/completions", dict(body, bad_words=[str(d) for d in range(10)] + ["x"],
                                                      logit_bias={str(t): 1 for t in range(400, 700)}))
    assert status == 400 and err["error"]["param"] == "bad_words" and "at most 320" in err["error"]["message"], err


def test_allowed_token_ids(live):
    """vLLM's allowed_token_ids: every other token is out, greedy and sampled, on both endpoints;
    logit_bias still acts among the allowed ones; an id past the vocabulary is a 400."""
    tok = live.state.engine.engine.tokenizer
    [three], [five] = (tok.encode(t, add_special_tokens=False) for t in (" 3", " 5"))
    body = {"prompt": demo_task.make_prompt(3, 12), "max_tokens": 12, "ignore_eos": True,
            "allowed_token_ids": [three, five], "logprobs": 1}
    for extra in ({"temperature": 0}, {"temperature": 1.0, "seed": 7}, {"temperature": 0, "logit_bias": {str(five): 100}}):
        status, out = _post(live, "/v1/completions", dict(body, **extra))
        got = out["choices"][0]["logprobs"]["tokens"]
        assert status == 200 and len(got) == 12 and set(got) <= {" 3", " 5"}, out
        if "logit_bias" in extra:
            assert set(got) == {" 5"}
        if extra == {"temperature": 0}:                     # the count's own first token; logprobs stay the raw model's
            assert got[0] == " 3"
            _, plain = _post(live, "/v1/completions", dict(body, allowed_token_ids=None, temperature=0))
            assert abs(plain["choices"][0]["logprobs"]["token_logprobs"][0] -
                       out["choices"][0]["logprobs"]["token_logprobs"][0]) < 1e-5
    status, out = _post(live, "/v1/chat/completions", {"messages": USER, "max_tokens": 6, "temperature": 0,
                                                       "ignore_eos": True, "allowed_token_ids": [five]})
    assert status == 200 and out["choices"][0]["message"]["content"] == " 5" * 6, out
    status, err = _post(live, "/v1/completions", dict(body, allowed_token_ids=[three, 10 ** 6]))
    assert status == 400 and err["error"]["param"] == "allowed_token_ids" and "vocabulary" in err["error"]["message"]


def test_echo_whole_and_streamed(live):
    pairs = [(3, 6), (20, 22)]
    prompts = [demo_task.make_prompt(a, b) for a, b in pairs]
    body = {"prompt": prompts, "n": 2, "max_tokens": 12, "temperature": 0, "echo": True}
    _, out = _post(live, "/v1/completions", body)
    for c in out["choices"]:
        prompt = prompts[c["index"] // 2]
        assert c["text"].startswith(prompt) and demo_task.check_answer(*pairs[c["index"] // 2], c["text"][len(prompt):])
    _, chunks = _post(live, "/v1/completions", dict(body, stream=True))
    for want in out["choices"]:
        mine = [c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == want["index"]]
        assert mine[0].startswith(prompts[want["index"] // 2]) and "".join(mine) == want["text"]
    # a token-id prompt is echoed decoded
    tok = live.state.engine.engine.tokenizer
    ids = tok.encode(prompts[0])
    _, out = _post(live, "/v1/completions", dict(body, prompt=ids, n=1))
    assert out["choices"][0]["text"] == tok.decode(ids) + demo_task.expected_answer(*pairs[0])


def test_echo_with_logprobs_puts_the_prompts_logprobs_first(live):
    """lm-eval-harness's loglikelihood request (echo, logprobs, few tokens): each choice's
    logprobs cover its prompt tokens, the first with null logprob and top_logprobs (OpenAI's,
    vLLM's), then the generated tokens as without echo; streamed, the prompt's part comes in
    each choice's first chunk. Before, echo with logprobs was a 400."""
    tok = live.state.engine.engine.tokenizer
    prompts = [demo_task.make_prompt(3, 6), demo_task.make_prompt(20, 22)]
    body = {"prompt": prompts, "n": 2, "max_tokens": 3, "temperature": 0, "echo": True, "logprobs": 2}
    status, out = _post(live, "/v1/completions", body)
    assert status == 200, out
    for c in out["choices"]:
        prompt = prompts[c["index"] // 2]
        ids, lp = tok.encode(prompt), c["logprobs"]
        n = len(ids)
        assert lp["tokens"][:n] == [tok.decode([t]) for t in ids] and len(lp["tokens"]) == n + 3
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n + 3
        for t, x, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
            # the top 2, and the token itself where it is not among them (OpenAI's logprobs + 1)
            assert x <= 0 and len(top) == 2 + (t not in list(top)[-2:]) and top[t] == x <= max(top.values()) + 1e-5
        assert c["text"] == prompt + "".join(lp["tokens"][n:])
        # text_offset indexes into the returned text (a special token, not in it, takes no room)
        assert lp["text_offset"][0] == 0 and all(
            t in tok.all_special_tokens or c["text"][at:at + len(t)] == t for t, at in zip(lp["tokens"], lp["text_offset"]))
        assert c["logprobs"]["token_logprobs"][1:n] == out["choices"][c["index"] ^ 1]["logprobs"]["token_logprobs"][1:n]
        _, alone = _post(live, "/v1/completions", {"prompt": prompt, "max_tokens": 3, "temperature": 0, "logprobs": 2})
        assert alone["choices"][0]["logprobs"]["tokens"] == lp["tokens"][n:]
        assert alone["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(lp["token_logprobs"][n:], abs=1e-5)
    _, chunks = _post(live, "/v1/completions", dict(body, stream=True))
    for want in out["choices"]:
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == want["index"]]
        n = len(tok.encode(prompts[want["index"] // 2]))
        assert len(mine[0]["logprobs"]["tokens"]) == n + 1 and mine[0]["logprobs"]["token_logprobs"][0] is None
        got = {k: sum((m["logprobs"][k] for m in mine), []) for k in ("tokens", "text_offset", "token_logprobs")}
        assert got["tokens"] == want["logprobs"]["tokens"] and got["text_offset"] == want["logprobs"]["text_offset"]
        assert got["token_logprobs"][1:] == pytest.approx(want["logprobs"]["token_logprobs"][1:], abs=1e-5)


def test_echo_with_max_tokens_0_answers_the_prompt_alone(live):
    """max_tokens 0 with echo (vLLM's; older lm-eval-harness versions score prompts so): the
    prompt's text and logprobs, no generated token, no completion tokens in the usage,
    finish_reason "length"; whole and streamed, with n = 2."""
    tok = live.state.engine.engine.tokenizer
    prompt = demo_task.make_prompt(3, 6)
    n = len(tok.encode(prompt))
    body = {"prompt": prompt, "n": 2, "max_tokens": 0, "temperature": 0, "echo": True, "logprobs": 2}
    status, out = _post(live, "/v1/completions", body)
    assert status == 200, out
    _, ref = _post(live, "/v1/completions", dict(body, max_tokens=3, n=1))
    want = ref["choices"][0]["logprobs"]
    assert out["usage"] == {"prompt_tokens": n, "completion_tokens": 0, "total_tokens": n,   # the prompt once
                            "prompt_tokens_details": {"cached_tokens": 0}}
    for c in out["choices"]:
        assert c["text"] == prompt and c["finish_reason"] == "length", c
        assert c["logprobs"]["tokens"] == want["tokens"][:n] and c["logprobs"]["text_offset"] == want["text_offset"][:n]
        assert c["logprobs"]["token_logprobs"][1:] == pytest.approx(want["token_logprobs"][1:n], abs=1e-5)
    _, chunks = _post(live, "/v1/completions", dict(body, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1]["usage"]["completion_tokens"] == 0
    for i in (0, 1):
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == i]
        assert "".join(m["text"] for m in mine) == prompt and mine[-1]["finish_reason"] == "length"
        assert sum((m["logprobs"]["tokens"] for m in mine), []) == want["tokens"][:n]
    _, plain = _post(live, "/v1/completions", {"prompt": prompt, "max_tokens": 0, "echo": True})
    assert plain["choices"][0]["text"] == prompt and plain["choices"][0]["logprobs"] is None


@pytest.mark.parametrize("chat", [False, True])
def test_continuous_usage_stats_on_every_chunk(live, chat):
    body = {"max_tokens": 30, "temperature": 0, "n": 2, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    body.update({"messages": USER} if chat else {"prompt": demo_task.make_prompt(3, 12)})
    _, chunks = _post(live, "/v1/chat/completions" if chat else "/v1/completions", body)
    final = chunks[-1]
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 2 * demo_task.answer_num_tokens(3, 12)
    seen = {0: 0, 1: 0}
    for c in chunks[:-1]:
        i, u = c["choices"][0]["index"], c["usage"]
        assert u["prompt_tokens"] == final["usage"]["prompt_tokens"]     # one prompt, counted once
        assert u["completion_tokens"] >= seen[i] and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
        seen[i] = u["completion_tokens"]
    assert sum(seen.values()) == final["usage"]["completion_tokens"]
    if chat:   # the opening role chunks: nothing generated yet
        assert [c["usage"]["completion_tokens"] for c in chunks[:2]] == [0, 0]


def test_usage_counts_the_prompt_tokens_found_in_the_prefix_cache(live):
    """OpenAI's usage.prompt_tokens_details.cached_tokens, whole and streamed (n choices of one
    prompt count it once), and vLLM's prefix-cache counters on /metrics."""
    shot = "".join(f"{demo_task.make_prompt(a, a + 4)} {' '.join(map(str, range(a, a + 5)))}\n" for a in range(3, 12))
    body = {"prompt": shot + demo_task.make_prompt(5, 9), "max_tokens": 5, "temperature": 0}
    _, first = _post(live, "/v1/completions", body)
    _, again = _post(live, "/v1/completions", dict(body, n=2))
    n_prompt = again["usage"]["prompt_tokens"]
    assert n_prompt > 64 and first["usage"]["prompt_tokens"] == n_prompt
    assert n_prompt - 16 <= again["usage"]["prompt_tokens_details"]["cached_tokens"] < n_prompt
    assert again["choices"][0]["text"] == again["choices"][1]["text"] == first["choices"][0]["text"]
    _, chunks = _post(live, "/v1/completions", dict(body, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1]["usage"]["prompt_tokens_details"] == again["usage"]["prompt_tokens_details"]
    m = live.metrics()
    model = (("engine", "0"), ("model_name", "demo"))
    hits = m[("vllm:prefix_cache_hits_total", model)]
    assert hits >= 3 * (n_prompt - 16) and m[("vllm:prefix_cache_queries_total", model)] > hits
    assert m[("fastserve_prefix_cache_hits_total", ())] == hits
    # vLLM's cache_salt: blocks are shared only among requests of the same salt
    cached = [_post(live, "/v1/completions", dict(body, cache_salt=salt))[1]["usage"]["prompt_tokens_details"]
              ["cached_tokens"] for salt in ("tenant-a", "tenant-a", "tenant-b")]
    assert cached[0] == 0 and cached[1] >= n_prompt - 16 and cached[2] == 0


def test_a_kv_pool_smaller_than_the_context_bounds_chats_default_max_tokens():
    """With --num-device-blocks below max_model_len's worth, a chat without max_tokens was
    refused with a 400 naming max_tokens, a field the client never sent, and /v1/models
    advertised max_model_len. The limit is now the pool's (admission.context_limit)."""
    from fastserve_jax.config import EngineConfig
    from fastserve_jax.models import demo_model_path
    from fastserve_jax.models.tokenizer import load_tokenizer
    from fastserve_jax.serve.engine_loop import EngineInfo
    from fastserve_jax.serve.prepare import prepare

    tok = load_tokenizer(demo_model_path())
    info = EngineInfo(tok, EngineConfig(max_model_len=2048), len(tok), 16, 99, False)
    assert info.context_limit == 99 * 16
    [(ids, params)], _ = prepare(parse_chat({"messages": USER}), info)
    assert len(ids) + params.max_tokens == 99 * 16
    with pytest.raises(APIError, match="this server's context limit .* is 1584 tokens"):
        prepare(parse_completion({"prompt": "count from 3 to 12:", "max_tokens": 1600}), info)


def test_server_seeds_are_llms_and_minus_one_is_no_seed():
    """-1 was taken modulo 2**64 (one fixed seed for every call, where vLLM draws at random), and
    other negative seeds gave other draws than `LLM`'s for the same request."""
    from fastserve_jax.config import EngineConfig
    from fastserve_jax.models import demo_model_path
    from fastserve_jax.models.tokenizer import load_tokenizer
    from fastserve_jax.sampling_params import choice_seed
    from fastserve_jax.serve.engine_loop import EngineInfo
    from fastserve_jax.serve.prepare import prepare

    tok = load_tokenizer(demo_model_path())
    info = EngineInfo(tok, EngineConfig(max_model_len=2048), len(tok), 16, 999, False)
    seeds = lambda seed: [p.seed for _, p in prepare(parse_completion({"prompt": "x", "n": 3, "seed": seed}), info)[0]]
    assert seeds(-1) == [None] * 3
    for seed in (-2, 5, 2**32, 2**64 - 1):
        assert seeds(seed) == [choice_seed(seed, j) for j in range(3)] and None not in seeds(seed)


def _text(chunks: list[dict], chat: bool) -> str:
    """A stream's text (chunks before the usage chunk, one choice)."""
    return "".join(c["choices"][0]["delta"].get("content", "") if chat else c["choices"][0]["text"]
                   for c in chunks if c["choices"])


def _both(live, path: str, body: dict) -> dict:
    """The whole response, checked equal in text and finish reason to the same request streamed."""
    chat = path.endswith("chat/completions")
    status, out = _post(live, path, body)
    assert status == 200, out
    _, chunks = _post(live, path, dict(body, stream=True))
    choice = out["choices"][0]
    assert _text(chunks, chat) == (choice["message"]["content"] if chat else choice["text"])
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == choice["finish_reason"]
    return choice


def test_include_stop_str_in_output_whole_and_streamed(live):
    """The matched stop string stays (vLLM's include_stop_str_in_output), as does the text of a
    stop token or EOS; the default cuts them. Streamed, nothing is held back for stop strings."""
    tok = live.state.engine.engine.tokenizer
    [seven] = tok.encode(" 7", add_special_tokens=False)
    body = {"prompt": demo_task.make_prompt(3, 12), "max_tokens": 20, "temperature": 0}
    for extra, cut in ((dict(stop=[" 7", "9"]), " 3 4 5 6"), (dict(stop_token_ids=[seven]), " 3 4 5 6")):
        assert _both(live, "/v1/completions", dict(body, **extra))["text"] == cut
        c = _both(live, "/v1/completions", dict(body, include_stop_str_in_output=True, **extra))
        assert c["text"] == cut + " 7" and c["finish_reason"] == "stop"
    c = _both(live, "/v1/chat/completions", {"messages": USER, "temperature": 0, "stop": " 5",
                                              "include_stop_str_in_output": True})
    assert c["message"]["content"] == " 3 4 5"
    answer = demo_task.expected_answer(3, 12)
    eos = tok.eos_token
    for skip, end in ((True, ""), (False, eos)):
        c = _both(live, "/v1/completions", dict(body, include_stop_str_in_output=True, skip_special_tokens=skip))
        assert c["text"] == answer + end and c["finish_reason"] == "stop"
    c = _both(live, "/v1/completions", dict(body, skip_special_tokens=False))
    assert c["text"] == answer                     # EOS ends the text without being part of it


def test_skip_special_tokens_whole_and_streamed_with_logprobs(live):
    """Special tokens the model samples (here forced by logit_bias) are in the text with
    skip_special_tokens false, and text_offset counts them; spaces_between_special_tokens
    changes nothing for the demo's byte-level tokenizer (no spaces between tokens)."""
    tok = live.state.engine.engine.tokenizer
    pad = tok.pad_token_id
    body = {"prompt": demo_task.make_prompt(3, 12), "max_tokens": 3, "temperature": 0,
            "logit_bias": {str(pad): 100}, "logprobs": 0}
    assert _both(live, "/v1/completions", body)["text"] == ""
    for spaces in (True, False):
        c = _both(live, "/v1/completions", dict(body, skip_special_tokens=False, spaces_between_special_tokens=spaces))
        assert c["text"] == tok.pad_token * 3 and c["logprobs"]["text_offset"] == [0, 5, 10]
        chat = _both(live, "/v1/chat/completions", {"messages": USER, "max_tokens": 2, "temperature": 0,
                                                    "logit_bias": {str(pad): 100}, "skip_special_tokens": False,
                                                    "spaces_between_special_tokens": spaces})
        assert chat["message"]["content"] == tok.pad_token * 2


def test_chat_template_fields_whole_and_streamed(live):
    """continue_final_message: the answer continues the final (assistant) message; a template
    given chat_template_kwargs reads them; bad values are 400s naming the field."""
    body = {"messages": USER + [{"role": "assistant", "content": " 3 4 5"}], "temperature": 0,
            "add_generation_prompt": False, "continue_final_message": True}
    assert _both(live, "/v1/chat/completions", body)["message"]["content"] == " 6 7 8 9 10 11 12"
    assert _both(live, "/v1/chat/completions", {"messages": USER, "temperature": 0, "add_generation_prompt": False,
                                                "chat_template_kwargs": {"enable_thinking": False}})[
        "message"]["content"] == demo_task.expected_answer(3, 12)
    tok = live.state.engine.engine.tokenizer
    template = tok.chat_template
    tok.chat_template = "{{ messages[0]['content'] }} to {{ upto | default(12) }}:"
    try:
        c = _both(live, "/v1/chat/completions", {"messages": [{"role": "user", "content": "count from 3"}],
                                                 "temperature": 0, "chat_template_kwargs": {"upto": 6}})
        assert c["message"]["content"] == " 3 4 5 6"
    finally:
        tok.chat_template = template
    for extra, param in ((dict(add_generation_prompt=True), "continue_final_message"),
                         (dict(chat_template_kwargs={"continue_final_message": False}), "chat_template_kwargs"),
                         (dict(chat_template_kwargs=[]), "chat_template_kwargs")):
        status, err = _post(live, "/v1/chat/completions", dict(body, **extra))
        assert status == 400 and err["error"]["param"] == param, err


def test_truncate_prompt_tokens_and_add_special_tokens(live):
    """vLLM's: the prompt's last k tokens (-1: what the context holds next to max_tokens); a text
    encoded without BOS; a k past the context is a 400."""
    tok = live.state.engine.engine.tokenizer
    ids = tok.encode(demo_task.make_prompt(3, 12))          # BOS first
    out = _post(live, "/v1/completions", {"prompt": [7] * 40 + ids, "max_tokens": 20, "temperature": 0,
                                          "truncate_prompt_tokens": len(ids), "echo": True})[1]
    assert out["usage"]["prompt_tokens"] == len(ids)
    assert out["choices"][0]["text"] == tok.decode(ids) + demo_task.expected_answer(3, 12)
    limit = live.state.engine.engine.context_limit
    out = _post(live, "/v1/completions", {"prompt": "count " * 2000, "max_tokens": 3, "truncate_prompt_tokens": -1})[1]
    assert out["usage"]["prompt_tokens"] == limit - 3
    out = _post(live, "/v1/completions", {"prompt": "count " * 200, "max_tokens": 1, "truncate_prompt_tokens": 9,
                                          "echo": True})[1]       # a text keeps its BOS, as vLLM's tokenizer
    assert out["usage"]["prompt_tokens"] == 9 and out["choices"][0]["text"].startswith(tok.bos_token + "count")
    status, err = _post(live, "/v1/completions", {"prompt": "x", "truncate_prompt_tokens": limit + 1})
    assert status == 400 and err["error"]["param"] == "truncate_prompt_tokens"
    for path, body in (("/v1/completions", {"prompt": demo_task.make_prompt(3, 12)}), ("/v1/chat/completions",
                                                                                      {"messages": USER})):
        counts = [_post(live, path, dict(body, max_tokens=1, **extra))[1]["usage"]["prompt_tokens"]
                  for extra in ({}, {"add_special_tokens": True}, {"add_special_tokens": False})]
        assert counts[0] == counts[1] == counts[2] + 1, (path, counts)        # BOS


def test_prompt_logprobs_request_id_ignored_fields_and_chat_echo(live):
    tok = live.state.engine.engine.tokenizer
    prompt = demo_task.make_prompt(3, 12)
    ids = tok.encode(prompt)
    out = _post(live, "/v1/completions", {"prompt": prompt, "max_tokens": 1, "prompt_logprobs": 2,
                                          "request_id": "abc-1", "store": True, "metadata": {"team": "x"},
                                          "service_tier": "default"})[1]
    assert out["id"] == "cmpl-abc-1"
    plp = out["choices"][0]["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    for t, entry in zip(ids[1:], plp[1:]):
        assert str(t) in entry and 2 <= len(entry) <= 3
        assert sorted(v["rank"] for v in entry.values())[:2] == [1, 2]
        mine = entry[str(t)]
        assert mine["decoded_token"] == tok.decode([t]) and mine["logprob"] <= 0
        assert mine["rank"] == 1 + sum(v["logprob"] > mine["logprob"] for v in entry.values()) or mine["rank"] > 2
    # the model counts: in a prompt holding the count, each number is the likeliest next token
    whole = tok.encode(prompt + demo_task.expected_answer(3, 12))
    plp = _post(live, "/v1/completions", {"prompt": whole, "max_tokens": 1, "prompt_logprobs": 1})[1][
        "choices"][0]["prompt_logprobs"]
    tail = list(zip(whole, plp))[len(ids):]
    assert all(e[str(t)]["rank"] == 1 and len(e) == 1 for t, e in tail), tail
    chat = _post(live, "/v1/chat/completions", {"messages": USER, "max_tokens": 1, "prompt_logprobs": 0,
                                                "request_id": "abc-2"})[1]
    assert chat["id"] == "chatcmpl-abc-2" and chat["prompt_logprobs"][0] is None
    assert all(len(e) == 1 for e in chat["prompt_logprobs"][1:]) and "prompt_logprobs" not in chat["choices"][0]
    status, chunks = _post(live, "/v1/completions", {"prompt": prompt, "max_tokens": 2, "stream": True,
                                                     "request_id": "abc-3"})
    assert status == 200 and {c["id"] for c in chunks} == {"cmpl-abc-3"}

    # chat's echo (vLLM's): the last message's content before the answer where the answer continues
    # its role (add_generation_prompt false), and the response takes that role; else nothing
    body = {"messages": USER, "temperature": 0, "echo": True, "add_generation_prompt": False}
    whole = _post(live, "/v1/chat/completions", body)[1]["choices"][0]["message"]
    assert whole == {"role": "user", "content": USER[0]["content"] + demo_task.expected_answer(3, 12)}
    status, chunks = _post(live, "/v1/chat/completions", dict(body, stream=True, n=2, seed=1))
    assert [c["choices"][0]["delta"] for c in chunks[:4]] == [{"role": "user", "content": ""}] * 2 + \
        [{"content": USER[0]["content"]}] * 2
    assert _text(chunks, chat=True).startswith(USER[0]["content"])
    plain = _post(live, "/v1/chat/completions", dict(body, add_generation_prompt=True))[1]["choices"][0]["message"]
    assert plain["role"] == "assistant" and not plain["content"].startswith(USER[0]["content"])


def test_text_offset_indexes_a_decoded_echo_with_its_special_tokens(live):
    """A token-id prompt, and a text prompt cut by truncate_prompt_tokens, are echoed decoded,
    BOS included: text_offset counts the special tokens written there too (it counted none, so
    every offset after the BOS was 3 characters short), whole and streamed."""
    tok = live.state.engine.engine.tokenizer
    ids = tok.encode(demo_task.make_prompt(3, 12))          # BOS first
    for extra in ({"prompt": ids}, {"prompt": "count " * 20 + demo_task.make_prompt(3, 12),
                                    "truncate_prompt_tokens": len(ids)}):
        body = dict(extra, max_tokens=3, temperature=0, echo=True, logprobs=1)
        status, out = _post(live, "/v1/completions", body)
        assert status == 200, out
        _, chunks = _post(live, "/v1/completions", dict(body, stream=True))
        for got in (out["choices"], [c["choices"][0] for c in chunks]):
            text = "".join(c["text"] for c in got)
            tokens = sum((c["logprobs"]["tokens"] for c in got), [])
            offsets = sum((c["logprobs"]["text_offset"] for c in got), [])
            assert text.startswith(tok.bos_token) and tokens[0] == tok.bos_token
            assert [text[at:at + len(t)] for t, at in zip(tokens, offsets)] == tokens, (text, offsets)


def test_a_truncation_that_cuts_nothing_leaves_the_echo_as_sent(live):
    """truncate_prompt_tokens -1, or a k the prompt is within, keeps the whole prompt, so echo
    writes it as sent, as without the field (it wrote the ids decoded, BOS included), also where
    the prompt writes a special token's text (until 2026-12-07 that one was echoed decoded)."""
    for prompt, answer in ((demo_task.make_prompt(3, 12), " 3 4"), ("</s> " + demo_task.make_prompt(3, 12), None)):
        body = {"prompt": prompt, "max_tokens": 2, "temperature": 0, "echo": True, "logprobs": 1}
        want = _post(live, "/v1/completions", body)[1]["choices"][0]
        assert want["text"].startswith(prompt) and (answer is None or want["text"] == prompt + answer)
        for k in (-1, 100):
            got = _both(live, "/v1/completions", dict(body, truncate_prompt_tokens=k))
            assert got["text"] == want["text"], (k, got["text"])
            assert got["logprobs"]["text_offset"] == want["logprobs"]["text_offset"]


def test_echo_logprobs_hold_logprobs_plus_one_also_with_more_prompt_logprobs(live):
    """echo with logprobs 1 and prompt_logprobs 5: each prompt token's top_logprobs holds its
    likeliest token and itself (OpenAI's "up to logprobs + 1", vLLM's cut), not the 5 the
    prompt_logprobs field carries (it held all 5 and the token, 6 entries)."""
    body = {"prompt": demo_task.make_prompt(3, 12), "max_tokens": 2, "temperature": 0, "echo": True,
            "logprobs": 1, "prompt_logprobs": 5}
    c = _post(live, "/v1/completions", body)[1]["choices"][0]
    tops, plp = c["logprobs"]["top_logprobs"], c["prompt_logprobs"]
    assert tops[0] is None and all(1 <= len(top) <= 2 for top in tops[1:]), tops
    for top, entry in zip(tops[1:], plp[1:]):
        assert len(entry) >= 5
        best = min(entry.values(), key=lambda v: v["rank"] or 99)
        assert top[best["decoded_token"]] == best["logprob"]


def test_echo_with_logprobs_returns_the_prompt_logprobs_it_computed_as_vllm(live):
    """echo with logprobs k computes the prompt's logprobs (k alternatives, as vLLM's
    prompt_logprobs = logprobs); vLLM's choice carries them in prompt_logprobs too, where ours
    wrote none unless prompt_logprobs was asked for, and chat's echo computed none (until 2026-12-07)."""
    body = {"prompt": demo_task.make_prompt(3, 6), "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 2}
    c = _post(live, "/v1/completions", body)[1]["choices"][0]
    plp, tops = c["prompt_logprobs"], c["logprobs"]["top_logprobs"]
    assert plp[0] is None and len(plp) == len(tops) - 1, (plp, tops)
    for top, entry in zip(tops[1:], plp[1:]):
        assert 2 <= len(entry) <= 3 and {v["decoded_token"]: v["logprob"] for v in entry.values()} == top
    assert "prompt_logprobs" not in _post(live, "/v1/completions", dict(body, echo=False))[1]["choices"][0]
    # chat's echo computes them with top_logprobs alternatives (0 by default) and the response carries them
    chat = {"messages": USER, "max_tokens": 1, "echo": True}
    for extra, alternatives in (({}, 0), ({"logprobs": True, "top_logprobs": 2}, 2)):
        plp = _post(live, "/v1/chat/completions", dict(chat, **extra))[1]["prompt_logprobs"]
        assert plp[0] is None and all(alternatives <= len(e) <= alternatives + 1 for e in plp[1:]), plp
    assert "prompt_logprobs" not in _post(live, "/v1/chat/completions", dict(chat, echo=False))[1]


def test_truncating_a_text_prompt_to_its_special_tokens_keeps_them(live):
    """A text prompt keeps its BOS within truncate_prompt_tokens (docs/serving.md, as vLLM's
    left-truncating tokenizer): also at k = 1, which kept the last text token instead."""
    tok = live.state.engine.engine.tokenizer
    out = _post(live, "/v1/completions", {"prompt": demo_task.make_prompt(3, 12), "max_tokens": 1,
                                          "truncate_prompt_tokens": 1, "echo": True, "logprobs": 0})[1]
    assert out["usage"]["prompt_tokens"] == 1 and out["choices"][0]["logprobs"]["tokens"][0] == tok.bos_token


def test_bench_tells_the_demo_models_own_misses_from_wrong_answers(live):
    """The demo model counts 478 to 548 only to 547 by itself: bench counted it as the engine's
    wrong answer and exited 1 in a default run (2026-12-07). An answer that comes back the same
    when sent alone is the model's own miss, named apart, unless more answers do so than the
    model misses (an engine wrong whatever the load), and a wrong answer is said in words."""
    from fastserve_jax.serve import bench_answers, bench_cmd

    def item(a, b, want=None):
        return (dict(prompt=demo_task.make_prompt(a, b), max_tokens=demo_task.answer_num_tokens(*(want or (a, b))),
                     temperature=0, stream=True, stream_options={"include_usage": True}), want or (a, b))

    m = bench_cmd.run_rate(live.url, [item(478, 548), item(3, 12)], [0.0, 0.0], None, ())
    assert (m["completed"], m["wrong"], m["model_misses"], m["problems"]) == (2, 0, 1, [])
    # every answer wrong alike alone (here: checked against the wrong count) counts as wrong
    m = bench_cmd.run_rate(live.url, [item(3, 12, (3, 13))] * 3, [0.0] * 3, None, ())
    assert (m["wrong"], m["model_misses"]) == (3, 0)
    assert m["problems"][0].startswith("request 0 (count from 3 to 13): ")
    # a failure in words: the error body's message, not its JSON (a full admission queue printed raw)
    full = bench_client.Result(status=503, error=json.dumps({"error": {"message": "the admission queue is full"}}))
    assert bench_answers.answer_problems([full], [item(3, 12)]) == [
        "request 0 (count from 3 to 12) failed: status 503: the admission queue is full"]


def test_bench_random_dataset_draws_the_servers_tokens_and_checks_exact_lengths(live, tmp_path, capsys):
    """`bench --dataset random` (bench_random.py), for models other than the demo: prompts of
    token ids from the server's own /tokenize, the trace's lengths cut to the context limit it
    reports, answers of exactly max_tokens tokens (ignore_eos), a wrong length counted."""
    from fastserve_jax.serve import bench_answers, bench_cmd
    from fastserve_jax.serve.bench_random import length_problem, random_workload, server_vocabulary
    from fastserve_jax.serve.cli import main
    from fastserve_jax.workload import TraceRequest, save_trace

    ids, limit = server_vocabulary(live.url)
    status, _, body = asyncio.run(bench_client.request(live.url, "GET", "/v1/models"))
    assert limit == json.loads(body)["data"][0]["max_model_len"] and ids.size > 20
    rows = [TraceRequest(0, 5, 3), TraceRequest(0, 2 * limit, 7), TraceRequest(0, 40, 3 * limit)]
    work = random_workload(rows, ids, limit, 1.0, "trace", seed=3)
    assert [(len(p["prompt"]), p["max_tokens"]) for p, _ in work] == [(5, 3), (limit - 7, 7), (40, limit // 2)]
    assert [want for _, want in work] == [3, 7, limit // 2] and all(p["ignore_eos"] for p, _ in work)
    assert set(sum((p["prompt"] for p, _ in work), [])) <= set(ids.tolist())
    assert random_workload(rows, ids, limit, 1.0, "trace", seed=3) == work          # seeded
    chat = random_workload(rows * 20, ids, limit, 1e10, "chat", seed=3)              # (numpy ints were not JSON)
    assert json.loads(json.dumps([p for p, _ in chat])) and max(want for _, want in chat) <= limit // 2
    assert [want for _, want in random_workload(rows, ids, limit, 1e10, "trace", seed=3)] == [limit // 2] * 3
    m = bench_cmd.run_rate(live.url, work[:2], [0.0, 0.0], None, ())
    assert m["completed"] == 2 and m["failed"] == 0 and m["wrong"] == 0
    short = bench_client.Result(status=200, done=True, completion_tokens=2, finish_reason="stop")
    assert length_problem(short, 3) == "2 tokens ending for 'stop' (want 3, 'length')"
    assert bench_answers.answer_problems([short], [({}, 3)]) == ["request 0 (3 tokens): 2 tokens ending for 'stop' "
                                                             "(want 3, 'length')"]
    # the command, against this server: auto picks counting for "demo"; random is asked for
    trace = str(tmp_path / "t.csv")
    save_trace(trace, [TraceRequest(0.1 * i, 20 + 9 * i, 4 + i) for i in range(6)])
    assert main(["bench", "--url", live.url, "--trace", trace, "--num-requests", "4", "--rate", "50",
                 "--dataset", "random", "--json", str(tmp_path / "r.json")]) == 0
    out = json.loads((tmp_path / "r.json").read_text())
    assert out["dataset"] == "random" and out["output_scale"] == 1.0
    assert out["trace"] == trace and out["flags"]["rate"] == [50.0] and out["flags"]["url"] == live.url   # reruns it
    assert main(["bench", "--url", live.url, "--trace", trace, "--num-requests", "2", "--rate", "50"]) == 0
    assert "--dataset auto: counting (the server serves ['demo'])" in capsys.readouterr().err


def test_a_stream_has_a_chunk_per_token_even_where_its_text_is_empty(live):
    """vLLM streams a chunk for each delta with new tokens, text or not: past its answer the demo
    model says EOS again and again under ignore_eos, which decodes to nothing. Those chunks came
    as one at the end until 2026-12-06, so a client timing tokens by chunks (bench_client,
    vLLM's benchmark) saw a first token late and no gaps."""
    status, events = _post(live, "/v1/completions", {"prompt": demo_task.make_prompt(3, 5), "max_tokens": 8,
                                                     "ignore_eos": True, "temperature": 0, "stream": True})
    chunks = [e for e in events if e.get("choices")]
    assert status == 200 and len(chunks) == 8 and "".join(c["choices"][0]["text"] for c in chunks).startswith(" 3 4 5")
    assert [c["choices"][0]["text"] for c in chunks[4:]] == [""] * 4 and chunks[-1]["choices"][0]["finish_reason"] == "length"
    result = bench_client.Result()
    for e in events:
        bench_client._event(result, "data: " + json.dumps(e))
    assert len(result.chunk_times) == 8


def test_return_token_ids_and_tokens_as_token_ids(live):
    """vLLM's return_token_ids (the prompt's and each choice's ids; streamed, the prompt's in a
    choice's first chunk and each chunk's new ids) and return_tokens_as_token_ids (logprobs name
    tokens "token_id:<id>"), both a 400 as unknown fields until 2026-12-07."""
    prompt = demo_task.make_prompt(3, 9)
    want = _post(live, "/tokenize", {"prompt": prompt})[1]["tokens"]
    chat_want = _post(live, "/tokenize", {"messages": USER})[1]["tokens"]
    for path, body in (("/v1/completions", {"prompt": prompt, "n": 2}), ("/v1/chat/completions", {"messages": USER})):
        chat = path.endswith("chat/completions")
        body = dict(body, max_tokens=8, temperature=0, logprobs=True if chat else 1, return_token_ids=True,
                    return_tokens_as_token_ids=True)
        status, out = _post(live, path, body)
        assert status == 200, out
        _, chunks = _post(live, path, dict(body, stream=True))
        for c in out["choices"]:
            ids, i = c["token_ids"], c["index"]
            assert len(ids) == out["usage"]["completion_tokens"] // len(out["choices"]) and ids
            names = [e["token"] for e in c["logprobs"]["content"]] if chat else c["logprobs"]["tokens"]
            assert names == [f"token_id:{t}" for t in ids]
            assert (out["prompt_token_ids"] if chat else c["prompt_token_ids"]) == (chat_want if chat else want)
            mine = [ch for ch in chunks if ch["choices"] and ch["choices"][0]["index"] == i]
            assert sum((ch["choices"][0]["token_ids"] for ch in mine), []) == ids
            firsts = [ch if chat else ch["choices"][0] for ch in mine if "prompt_token_ids" in (ch if chat else ch["choices"][0])]
            assert len(firsts) == 1 and firsts[0] is (mine[0] if chat else mine[0]["choices"][0])
            assert firsts[0]["prompt_token_ids"] == (chat_want if chat else want)
