"""Chat rendering options (vLLM's add_generation_prompt, continue_final_message and
chat_template_kwargs), on a tokenizer alone: the demo's tokenizer given a Qwen3-style
template (a generation prompt that opens the assistant's turn, and an empty thinking block
when the template is told enable_thinking=false)."""

from __future__ import annotations

import pytest

from fastserve_jax.chat_template import ChatOptions, ChatTemplateError, conversations, render_chat
from fastserve_jax.models import demo_model_path
from fastserve_jax.models.tokenizer import load_tokenizer

# written for these tests in the layout Qwen3's template has (ChatML turns, thinking switch)
QWEN3_STYLE = (
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{%- if not loop.last or m['role'] != 'assistant' %}<|im_end|>\n{% endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{%- endif %}")
USER = [{"role": "user", "content": "Hi"}]
PARTIAL = USER + [{"role": "assistant", "content": "Hello, I am"}]


@pytest.fixture(scope="module")
def tok():
    t = load_tokenizer(demo_model_path())
    t.chat_template = QWEN3_STYLE
    return t


def test_the_generation_prompt_and_template_kwargs_reach_the_template(tok):
    text, ids = render_chat(tok, USER)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert ids == tok.encode(text)               # BOS added by the tokenizer, once
    text, _ = render_chat(tok, USER, ChatOptions(add_generation_prompt=False))
    assert text == "<|im_start|>user\nHi<|im_end|>\n"
    text, _ = render_chat(tok, USER, ChatOptions(template_kwargs={"enable_thinking": False}))
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert render_chat(tok, USER, ChatOptions(template_kwargs={"enable_thinking": True}))[0] == render_chat(tok, USER)[0]


def test_continue_final_message_leaves_the_last_message_open(tok):
    """The text ends with the final message's content: no end of turn, no new turn (HF's
    continue_final_message, as vLLM passes it)."""
    text, _ = render_chat(tok, PARTIAL, ChatOptions(add_generation_prompt=False, continue_final_message=True))
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello, I am"
    closed, _ = render_chat(tok, PARTIAL + USER, ChatOptions(add_generation_prompt=False))
    assert "Hello, I am<|im_end|>" in closed


BAD_OPTIONS = [
    (dict(add_generation_prompt=True, continue_final_message=True), "continue_final_message", "cannot both be true"),
    (dict(template_kwargs=["enable_thinking"]), "chat_template_kwargs", "must be an object"),
    (dict(template_kwargs={1: True}), "chat_template_kwargs", "must be an object"),
    (dict(template_kwargs={"add_generation_prompt": False}), "chat_template_kwargs", "'add_generation_prompt'"),
    (dict(template_kwargs={"messages": [], "tokenize": True}), "chat_template_kwargs", "['messages', 'tokenize']"),
    (dict(template_kwargs={"chat_template": "{{ 1 }}"}), "chat_template_kwargs", "'chat_template'"),
    (dict(add_generation_prompt="yes"), "add_generation_prompt", "True or False"),
    (dict(continue_final_message=1), "continue_final_message", "True or False"),
]


@pytest.mark.parametrize("kw,param,message", BAD_OPTIONS, ids=lambda v: str(v)[:40])
def test_bad_options_are_value_errors_naming_the_field(kw, param, message):
    with pytest.raises(ChatTemplateError) as e:
        ChatOptions(**kw)
    assert isinstance(e.value, ValueError) and e.value.param == param and message in str(e.value), str(e.value)


def test_template_errors_name_messages(tok):
    with pytest.raises(ChatTemplateError, match="rejected the messages: .*final message") as e:
        render_chat(tok, [{"role": "assistant"}], ChatOptions(add_generation_prompt=False,
                                                               continue_final_message=True))
    assert e.value.param == "messages"
    bare = load_tokenizer(demo_model_path())
    bare.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        render_chat(bare, USER)


def test_conversations_one_or_many():
    assert conversations(USER) == [USER]
    assert conversations([USER, PARTIAL]) == [USER, PARTIAL]
    assert conversations(tuple(USER)) == [USER]
    for bad, message in (([], "non-empty"), ("Hi", "list of"), ([USER, "x"], "conversation 1"),
                         ([{"content": "x"}], "'role'"), ([[]], "conversation 0")):
        with pytest.raises(ValueError, match=message):
            conversations(bad)
