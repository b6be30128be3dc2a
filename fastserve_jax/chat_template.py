"""Chat conversations to prompt token ids, by the tokenizer's own chat template or one the
deployment gives (vLLM's `--chat-template`, `LLM.chat(chat_template=...)`): one code path for
the server (serve/prepare.py, which turns a ChatTemplateError into a 400 naming its field) and
`LLM.chat` (which raises it, a ValueError).

ChatOptions are vLLM's chat fields: `add_generation_prompt` (open the assistant's turn),
`continue_final_message` (leave the final message open, with no end of turn, for the model
to continue it; the two cannot both be true) and `template_kwargs` (vLLM's
chat_template_kwargs: extra variables for the template, e.g. Qwen3's enable_thinking).
Template kwargs may not set what the renderer sets itself (RESERVED_KWARGS); vLLM lets them
override it, we refuse with a message instead."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

# apply_chat_template's own arguments, and the template variables it sets from them: a template
# kwarg of one of these names would change how the prompt is rendered or what comes back
RESERVED_KWARGS = frozenset({
    "messages", "conversation", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "sanitize_control_tokens", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})


# How a message's content reaches the template (vLLM's --chat-template-content-format): "string"
# (text parts joined with newlines), "openai" (a list of {"type": "text", "text": ...} parts, a
# string content as one part), "auto" (openai for a template that loops over a message's content,
# as multimodal ones do, else string).
CONTENT_FORMATS = ("auto", "string", "openai")


class ChatTemplateError(ValueError):
    """A conversation or chat option the renderer refuses; `param` names the request field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ChatOptions:
    """How a conversation is rendered (module docstring); validated at construction."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    content_format: str = "auto"
    # tool schemas the template renders (vLLM's `tools`; LLM.chat's, and the server's [] only):
    # an empty list sent reaches the template as [] (Llama 3.1's writes its tool preamble for
    # it); None: the template sees none
    tools: list[dict] | None = None

    def __post_init__(self) -> None:
        if self.content_format not in CONTENT_FORMATS:
            raise ChatTemplateError(f"the chat template content format must be one of {list(CONTENT_FORMATS)}, got "
                                    f"{self.content_format!r}", "chat_template_content_format")
        for name in ("add_generation_prompt", "continue_final_message"):
            if not isinstance(getattr(self, name), bool):
                raise ChatTemplateError(f"'{name}' must be True or False, got {getattr(self, name)!r}", name)
        if self.add_generation_prompt and self.continue_final_message:
            raise ChatTemplateError(
                "'add_generation_prompt' and 'continue_final_message' cannot both be true: the first opens a new "
                "assistant turn, the second continues the final message; send add_generation_prompt false with "
                "continue_final_message", "continue_final_message")
        if self.tools is not None:
            if not (isinstance(self.tools, (list, tuple)) and all(isinstance(t, dict) for t in self.tools)):
                raise ChatTemplateError("'tools' must be a list of tool (function) schemas, each a dict, got "
                                        f"{self.tools!r:.80}", "tools")
            object.__setattr__(self, "tools", list(self.tools))
        kw = {} if self.template_kwargs is None else self.template_kwargs
        if not isinstance(kw, dict) or not all(isinstance(k, str) for k in kw):
            raise ChatTemplateError("'chat_template_kwargs' must be an object of template variables (e.g. "
                                    f"{{\"enable_thinking\": false}}), got {type(kw).__name__}", "chat_template_kwargs")
        taken = sorted(RESERVED_KWARGS & set(kw))
        if taken:
            raise ChatTemplateError(
                f"'chat_template_kwargs' may not set {taken if len(taken) > 1 else repr(taken[0])}: the renderer "
                "sets those itself (add_generation_prompt and continue_final_message are fields of their own)",
                "chat_template_kwargs")
        object.__setattr__(self, "template_kwargs", dict(kw))


def render_chat(tokenizer, messages: list[dict], options: ChatOptions = ChatOptions(),
                chat_template: str | None = None, add_special_tokens: bool | None = None) -> tuple[str, list[int]]:
    """(prompt text, token ids) of one conversation by `chat_template` (a Jinja template), else
    the tokenizer's. Special tokens are added by the tokenizer (BOS) unless the template
    already wrote them, or as `add_special_tokens` says where given (the server's field)."""
    from jinja2 import TemplateError      # here: protocol.py imports this module for ChatOptions alone

    if not chat_template and not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError("this model's tokenizer has no chat template; give one (the server's --chat-template "
                                "FILE_OR_TEMPLATE, LLM.chat(..., chat_template=...)) or send a prompt instead "
                                "(/v1/completions, LLM.generate)", "messages")
    template = chat_template or tokenizer.chat_template
    fmt = options.content_format
    if fmt == "auto":
        fmt = content_format(template) if isinstance(template, str) else "string"
    messages = [dict(m, content=_as_format(m["content"], fmt)) if "content" in m else m for m in messages]
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=options.add_generation_prompt,
            continue_final_message=options.continue_final_message, chat_template=chat_template or None,
            **({"tools": options.tools} if options.tools is not None else {}), **options.template_kwargs)
    except Exception as e:     # any failure of the template on these messages (vLLM's reading too)
        whose = "the chat template given" if chat_template else "the model's chat template"
        kind = "" if isinstance(e, (TemplateError, ValueError)) else f"{type(e).__name__}: "
        raise ChatTemplateError(f"{whose} rejected the messages: {kind}{e}", "messages") from None
    bos = tokenizer.bos_token
    add = not (bos and writes_bos(template, bos, text)) if add_special_tokens is None else add_special_tokens
    ids = tokenizer.encode(text, add_special_tokens=add)
    if not ids:                 # an empty rendering is a prompt where the tokenizer adds BOS (vLLM's)
        raise ChatTemplateError("the messages render to an empty prompt; give some content", "messages")
    return text, ids


def writes_bos(template, bos: str, text: str) -> bool:
    """Whether a chat template writes the BOS itself: it names `bos_token` or the BOS's own
    text (read from the template, so neither text before it nor a message's content changes
    the answer: a newline ahead of {{ bos_token }} gave two BOS). A template that is not one
    string (named templates): its rendering starts with the BOS."""
    if isinstance(template, str):
        return "bos_token" in template or bos in template
    return text.lstrip().startswith(bos)


@functools.lru_cache(maxsize=16)
def content_format(template: str) -> str:
    """"openai" where the template loops over a message's content (`for part in
    message['content']`, through filters or a `set` name too), else "string": what "auto"
    picks. A template that reads its content as parts would render a string's characters."""
    from jinja2 import Environment, nodes

    try:
        ast = Environment().parse(template)
    except Exception:            # rendering will say what is wrong with it
        return "string"

    def content(expr) -> bool:
        while isinstance(expr, nodes.Filter):
            expr = expr.node
        return (isinstance(expr, nodes.Getattr) and expr.attr == "content") or (
            isinstance(expr, nodes.Getitem) and isinstance(expr.arg, nodes.Const) and expr.arg.value == "content")

    named = {a.target.name for a in ast.find_all(nodes.Assign)
             if isinstance(a.target, nodes.Name) and content(a.node)}
    for loop in ast.find_all(nodes.For):
        it = loop.iter
        while isinstance(it, nodes.Filter):
            it = it.node
        if content(it) or (isinstance(it, nodes.Name) and it.name in named):
            return "openai"
    return "string"


def content_text(content: str | list[dict]) -> str:
    """A checked message's content as one text: its text parts joined with newlines."""
    return content if isinstance(content, str) else "\n".join(p["text"] for p in content)


def _as_format(content: str | list[dict], fmt: str) -> str | list[dict]:
    if fmt == "string":
        return content_text(content)
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def check_text(text: str, where: str) -> str:
    """`text` if it can be encoded (the tokenizers take UTF-8); a lone surrogate (text decoded
    from bytes that were not UTF-8, e.g. with surrogateescape as sys.argv is) is a ValueError
    naming `where`, where the tokenizer would raise a TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where} is not valid text: it holds a lone surrogate {text[e.start]!a} at character "
                         f"{e.start} (text decoded from bytes that were not UTF-8?)") from None
    return text


ROLES = ("system", "developer", "user", "assistant", "tool")
# Beside role, content and name: an answer as OpenAI's SDK dumps it (`message.model_dump()`, sent
# back in the next turn) has these, null where nothing was called, refused or heard, and vLLM's
# reasoning text (passed to the template: Qwen3's reads it); a message may name a tool call (a
# tool result does; vLLM's custom messages take it on any role). Any message may carry a null
# or empty tool_calls, as clients write it, and any key at null, read as left out (until
# 2026-12-07 a 400: clients that write each optional field of one message model as null failed).
_ANY = ("role", "content", "name", "tool_calls", "function_call", "tool_call_id")
_MESSAGE_KEYS = {"assistant": _ANY + ("refusal", "audio", "annotations", "reasoning_content", "reasoning")}
_NOT_HERE = {"tool_calls": "tool calling", "function_call": "tool calling", "audio": "audio output",
             "annotations": "annotations"}


# The content-part types read as text, and the field holding it: OpenAI's text and refusal parts,
# and the Responses API's input_text, which vLLM's chat endpoint reads as text too.
TEXT_PARTS = {"text": "text", "input_text": "text", "refusal": "refusal"}


def check_messages(v: Any) -> list[dict]:
    """One conversation as the template renders it, checked as the server's `messages` (a
    ValueError naming the message): any role string (OpenAI's ROLES, or one the template knows:
    vLLM's custom messages; until 2026-12-07 only ROLES), content a string or an array of text parts
    (TEXT_PARTS, kept as {"type": "text", "text"} parts: render_chat joins them with newlines,
    as vLLM does, unless the template reads parts), an assistant's null content read as "",
    the fields the OpenAI SDK dumps into an answer null or empty and left out (`refusal` a
    string or null)."""
    if not isinstance(v, (list, tuple)) or not v:
        raise ValueError("'messages' must be a non-empty array of {\"role\", \"content\"} objects")
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise ValueError(f"messages[{i}] must be an object with a 'role' string ({', '.join(ROLES)}, or a "
                             "role of the chat template's own)")
        keys = _MESSAGE_KEYS.get(m["role"], _ANY)
        extra = sorted(k for k in set(m) - set(keys) if m[k] is not None)
        if extra:
            raise ValueError(f"messages[{i}] has unsupported field(s) {extra}; use {list(keys)}")
        for k, what in _NOT_HERE.items():
            if m.get(k) not in (None, []):
                raise ValueError(f"messages[{i}].{k} must be null or []: fastserve-jax has no {what}")
        if not isinstance(m.get("refusal", ""), (str, type(None))):        # a string, left out of the prompt
            raise ValueError(f"messages[{i}].refusal must be a string or null")
        content = m.get("content")
        if content is None and m["role"] == "assistant":   # an assistant turn that only called tools (none here)
            content = ""
        if isinstance(content, list):   # content parts: only text is supported
            if not all(isinstance(p, dict) and isinstance(p.get("type"), str) and p["type"] in TEXT_PARTS and
                       isinstance(p.get(TEXT_PARTS[p["type"]]), str) for p in content):
                raise ValueError(f"messages[{i}].content parts must be {{\"type\": \"text\", \"text\": ...}} "
                                 "(or vLLM's \"input_text\" and \"refusal\" parts); only text parts are accepted")
            content = [{"type": "text", "text": check_text(p[TEXT_PARTS[p["type"]]], f"messages[{i}].content[{j}]")}
                       for j, p in enumerate(content)]
        elif not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string or an array of text parts")
        else:
            content = check_text(content, f"messages[{i}].content")
        msg = {"role": m["role"], "content": content}
        for k in ("name", "tool_call_id", "reasoning_content", "reasoning"):   # templates may write these
            if m.get(k) is not None:
                if not isinstance(m[k], str):
                    raise ValueError(f"messages[{i}].{k} must be a string, got {type(m[k]).__name__}")
                msg[k] = check_text(m[k], f"messages[{i}].{k}")
        out.append(msg)
    return out


def conversations(messages) -> list[list[dict]]:
    """`LLM.chat`'s first argument as a list of conversations, each checked as the server checks
    its `messages` (check_messages): one conversation (a list of {"role", "content", ...} dicts)
    or a list of them."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts (one conversation) "
                         f"or a list of such lists, got {messages!r:.80}")
    many = not isinstance(messages[0], dict)
    out = []
    for i, conv in enumerate(list(messages) if many else [messages]):
        try:
            out.append(check_messages(conv))
        except ValueError as e:
            raise ValueError(f"conversation {i}: {e}" if many else str(e)) from None
    return out


def load_chat_template(value: str | None) -> str | None:
    """vLLM's reading of --chat-template: the text of a readable file; else, where the value has
    Jinja's marks (a brace or a newline), the template itself, its backslash escapes read (a
    shell's '\\n' is a newline); else a path that failed, a ValueError. A template Jinja cannot
    parse is a ValueError here, before the server starts, rather than a 400 on every chat."""
    if value is None:
        return None
    try:
        with open(value, encoding="utf-8") as f:
            template = f.read()
    except OSError as e:
        if not any(c in value for c in "{}\n"):
            raise ValueError(f"--chat-template {value!r} looks like a file path, but it cannot be read ({e.strerror}); "
                             "give a readable file or the Jinja template itself") from None
        # escapes read; characters beyond Latin-1 pass through as escapes of their own
        template = value.encode("latin-1", "backslashreplace").decode("unicode_escape")
    from jinja2 import Environment, TemplateSyntaxError

    try:
        Environment().parse(template)
    except TemplateSyntaxError as e:
        raise ValueError(f"--chat-template is not a valid Jinja template: {e.message} (line {e.lineno})") from None
    return template
