"""Chat rendering options (vLLM's add_generation_prompt, continue_final_message and
chat_template_kwargs), on a tokenizer alone: the demo's tokenizer given a Qwen3-style
template (a generation prompt that opens the assistant's turn, and an empty thinking block
when the template is told enable_thinking=false)."""

from __future__ import annotations

import pytest

from fastserve_jax.chat_template import (ChatOptions, ChatTemplateError, content_format, conversations,
                                         load_chat_template, render_chat)
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
    with pytest.raises(ChatTemplateError, match="^the model's chat template rejected the messages: .*final message") as e:
        render_chat(tok, [{"role": "assistant"}], ChatOptions(add_generation_prompt=False,
                                                               continue_final_message=True))
    assert e.value.param == "messages"
    with pytest.raises(ChatTemplateError, match="^the chat template given rejected the messages: unexpected"):
        render_chat(tok, USER, chat_template="{{ foo( }}")        # was blamed on the model's template
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


def test_conversations_are_checked_and_joined_as_the_servers_messages():
    """LLM.chat's conversations go through the server's message checks (check_messages): text
    parts joined with newlines, not written as a Python list (until 2026-12-06 they were, and
    the model answered a repr); other parts, roles that are no string and non-text content refused."""
    parts = [{"role": "user", "content": [{"type": "text", "text": "count from 3"}, {"type": "text", "text": "to 9:"}]},
             {"role": "assistant", "content": None, "refusal": None, "tool_calls": []}]
    assert conversations(parts) == [[{"role": "user", "content": parts[0]["content"]},
                                     {"role": "assistant", "content": ""}]]
    # any role string, for the template to judge (vLLM's custom messages; refused before 2026-12-07)
    assert conversations([{"role": "narrator", "content": "x"}]) == [[{"role": "narrator", "content": "x"}]]
    # vLLM's other text parts: a refusal part and the Responses API's input_text
    vllm_parts = [{"role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "text", "text": "b"}]},
                  {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}]
    assert conversations(vllm_parts) == [[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                        {"type": "text", "text": "b"}]},
                                          {"role": "assistant", "content": [{"type": "text", "text": "no"}]}]]
    for bad, message in (([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
                          "only text parts"),
                         ([{"role": "user", "content": [{"type": "refusal", "text": "x"}]}], "only text parts"),
                         ([{"role": "user", "content": [{"type": "input_text", "text": 5}]}], "only text parts"),
                         ([{"role": "user", "content": [{"type": ["text"], "text": "x"}]}], "only text parts"),
                         ([{"role": "user", "content": [{"type": "image_url", "": "x"}]}], "only text parts"),
                         ([{"role": 5, "content": "x"}], "'role' string"),
                         ([{"role": "user", "content": 5}], "must be a string or an array of text parts"),
                         ([{"role": "user", "content": "x", "name": 3}], r"\[0\].name must be a string")):
        with pytest.raises(ValueError, match=message):
            conversations(bad)
        with pytest.raises(ValueError, match="conversation 1: messages.*" + message):
            conversations([USER, bad])


# A LLaVA-style template: it loops over each message's parts and writes the text ones.
PARTS_TEMPLATE = ("{% for message in messages %}{{ message['role'] | upper }}: {% for part in message['content'] | "
                  "selectattr('type', 'equalto', 'text') %}{{ part['text'] }}|{% endfor %}{% endfor %}")


def test_templates_that_loop_over_content_get_parts_as_vllm_gives_them(tok):
    """vLLM's "auto" content format: a template that loops over a message's content gets a list
    of {"type": "text"} parts (a string content as one part); until 2026-12-07 it got the parts
    joined into a string, looped over its characters and dropped the text without a word."""
    assert content_format(PARTS_TEMPLATE) == "openai"
    assert content_format("{% for m in messages %}{% set c = m.content %}{% for p in c %}{{ p.text }}"
                          "{% endfor %}{% endfor %}") == "openai"
    assert content_format("{% for m in messages %}{{ m['content'] | trim }}{% endfor %}") == "string"
    assert content_format(tok.chat_template) == "string" and content_format("{% bad") == "string"
    conv = conversations([{"role": "user", "content": [{"type": "text", "text": "What is"},
                                                       {"type": "input_text", "text": "2+2?"}]},
                          {"role": "assistant", "content": "4"}])[0]
    assert render_chat(tok, conv, ChatOptions(add_generation_prompt=False),
                       chat_template=PARTS_TEMPLATE)[0] == "USER: What is|2+2?|ASSISTANT: 4|"
    forced = ChatOptions(add_generation_prompt=False, content_format="string")      # the parts joined
    assert render_chat(tok, conv, forced, chat_template="{{ messages[0].content }}")[0] == "What is\n2+2?"
    openai = ChatOptions(add_generation_prompt=False, content_format="openai")
    assert render_chat(tok, conv, openai, chat_template="{{ messages[1].content[0].text }}")[0] == "4"
    with pytest.raises(ChatTemplateError, match="content format must be one of"):
        ChatOptions(content_format="parts")


def test_any_exception_in_a_template_is_a_chat_template_error(tok):
    """A template failing in a way other than Jinja's errors (a division by zero, an unknown
    codec) is the messages' 400, as vLLM reads it, not a 500."""
    for template in ("{{ 1 / (messages | length - 1) }}", "{{ messages[0].content.encode('nosuch') }}"):
        with pytest.raises(ChatTemplateError, match="the chat template given rejected the messages: [A-Za-z]+Error"):
            render_chat(tok, USER, chat_template=template)


def test_a_template_that_writes_its_bos_after_other_text_gets_no_second_one(tok):
    """Whether the template writes the BOS is read from the template, not from the rendered
    text's start: a newline before {{ bos_token }} gave two BOS (transformers' and vLLM's ids
    have one, 2026-12-07), and a user message starting with the BOS's text took ours away."""
    bos = tok.bos_token
    late = "\n{{ bos_token }}{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    text, ids = render_chat(tok, USER, chat_template=late)
    assert text == f"\n{bos}[Hi]" and ids == tok.encode(text, add_special_tokens=False)
    assert ids.count(tok.bos_token_id) == 1
    plain = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    sneaky = [{"role": "user", "content": f"{bos}Hi"}]
    text, ids = render_chat(tok, sneaky, chat_template=plain)
    assert text == f"{bos}Hi" and ids == tok.encode(text) and ids[:2] == [tok.bos_token_id] * 2


def test_a_given_template_wins_over_the_tokenizers_and_serves_a_tokenizer_without_one(tok):
    """vLLM's --chat-template and LLM.chat(chat_template=...): a template of the deployment's
    own; without one, a tokenizer with no template is an error naming both ways to give one
    (in the server a 400 on `messages`)."""
    from fastserve_jax.serve.errors import APIError
    from fastserve_jax.serve.prepare import render_chat as serve_render

    own = "[{{ messages[0]['content'] }}]{% if add_generation_prompt %}>{% endif %}"
    assert render_chat(tok, USER, chat_template=own)[0] == "[Hi]>"
    bare = load_tokenizer(demo_model_path())
    bare.chat_template = None
    text, ids = render_chat(bare, USER, ChatOptions(add_generation_prompt=False), chat_template=own)
    assert text == "[Hi]" and ids == bare.encode("[Hi]")
    with pytest.raises(ChatTemplateError, match=r"--chat-template.*chat_template=") as e:
        render_chat(bare, USER)
    assert e.value.param == "messages"
    with pytest.raises(APIError) as e:
        serve_render(bare, USER)
    err = e.value.body()["error"]
    assert e.value.status == 400 and err["param"] == "messages" and "--chat-template" in err["message"]
    assert serve_render(bare, USER, chat_template=own) == bare.encode("[Hi]>")


def test_chat_template_is_a_file_or_an_inline_template_checked_at_start(tmp_path):
    """As vLLM reads --chat-template: a readable file's text, else a string with Jinja's marks
    (braces, a newline) is the template itself, its backslash escapes read (a shell's '\\n');
    anything else is a path that failed. A template Jinja cannot parse fails here, at start-up."""
    f = tmp_path / "t.jinja"
    f.write_text("{{ messages[0]['content'] }}\n", encoding="utf-8")
    assert load_chat_template(str(f)) == "{{ messages[0]['content'] }}\n"
    assert load_chat_template(None) is None
    assert load_chat_template("{{ 'zähl' }}\\n") == "{{ 'zähl' }}\n"          # escapes read, non-ASCII kept
    with pytest.raises(ValueError, match="looks like a file path, but it cannot be read"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="not a valid Jinja template"):
        load_chat_template("{% for m in messages %}{{ m }}")


def test_an_empty_tool_list_reaches_the_template_as_vllm_passes_it(tok):
    """`tools: []` (what some clients always send) reached the template as None: Llama 3.1's
    template writes its tool preamble for [] under vLLM and wrote none here."""
    from fastserve_jax.serve.protocol import parse_chat

    template = "{% if tools is not none %}TOOLS{{ tools | length }} {% endif %}{{ messages[0]['content'] }}"
    text = lambda options: render_chat(tok, USER, options, template)[0]
    assert text(ChatOptions()) == USER[0]["content"]
    assert text(ChatOptions(tools=[])) == "TOOLS0 " + USER[0]["content"]
    for body, want in (({"tools": []}, []), ({"tools": None}, None), ({}, None)):
        assert parse_chat(dict(body, messages=USER)).chat_options.tools == want
