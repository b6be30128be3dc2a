"""OpenAI response objects for completions and chat: whole responses, stream chunks, usage,
logprobs. Choice index i of a request with P prompts and n choices each is prompt i // n.
`Formatter.for_job` also carries the request's `echo` (completions) and continuous usage
(a usage object on every chunk), as serve/protocol.py describes them. With `echo` and
`logprobs` a completion choice's logprobs cover its prompt tokens, then the generated ones
(OpenAI's legacy format, as vLLM: the first prompt token's logprob and top_logprobs are null);
when streaming, the prompt's part comes in the choice's first chunk, with the echoed text."""

from __future__ import annotations

import codecs
import json
import time
import uuid
from dataclasses import dataclass, field, replace

from fastserve_jax.chat_template import content_text
from fastserve_jax.config import SamplingParams
from fastserve_jax.detokenizer import token_bytes
from fastserve_jax.request import TokenLogprobs

from fastserve_jax.serve.engine_loop import Delta
from fastserve_jax.serve.protocol import Job


def sse(obj: dict | str) -> str:
    """One Server-Sent Event: `data: {...}` and a blank line."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict:
    """OpenAI's usage; with `cached_tokens` (prefix caching on) its prompt_tokens_details too."""
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


@dataclass
class Choice:
    """What one choice has produced so far (non-streaming responses accumulate here)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def add(self, d: Delta) -> None:
        self.text += d.text
        self.token_ids += d.token_ids
        self.logprobs += d.logprobs or []
        self.prompt_logprobs = d.prompt_logprobs or self.prompt_logprobs
        self.finish_reason = d.finish_reason or self.finish_reason
        self.stop_reason = d.stop_reason if d.final else self.stop_reason
        self.prompt_tokens = d.prompt_tokens or self.prompt_tokens
        self.completion_tokens = d.completion_tokens
        self.cached_tokens = d.cached_tokens or self.cached_tokens


def _whole(tokenizer, ids: list[int], text: str) -> bool:
    """Whether a text prompt's ids (after truncate_prompt_tokens) still hold all of it: they
    decode back to it, its special-token text written or not, after the BOS the tokenizer adds."""
    if tokenizer.decode(ids, skip_special_tokens=True) == text:
        return True
    return tokenizer.decode(ids, skip_special_tokens=False) in (text, (tokenizer.bos_token or "") + text)


class Formatter:
    """Builds the JSON of one request's responses (ids and timestamps fixed per request)."""

    def __init__(self, chat: bool, model: str, tokenizer, logprobs: int | None, echo: list[str] | None = None,
                 usage_prompt_tokens: list[int] | None = None, echo_ids: list[list[int]] | None = None,
                 skip_special_tokens: bool = True, prompt_only: bool = False, request_id: str | None = None,
                 role: str = "assistant", chat_echo: str = "", prompt_logprobs: bool = False,
                 echo_decoded: frozenset[int] = frozenset(), details_n: int = 0, tokens_as_ids: bool = False,
                 prompt_ids: list[list[int]] | None = None) -> None:
        """echo: per choice, the text written before its first text (completions);
        usage_prompt_tokens: per choice, its prompt's tokens, to put usage on every chunk;
        echo_ids: per choice, its prompt's token ids, whose logprobs come before the generated
        tokens' (completions with echo and logprobs); skip_special_tokens: the request's, whether
        generated special tokens are left out of the text (text_offset then gives them no room);
        prompt_only: Job.prompt_only, `view` drops the generated token; request_id: the id's suffix
        (vLLM's request_id field); role: chat's answer role (the last message's without
        add_generation_prompt, as vLLM); chat_echo: text before each chat choice's (chat's echo);
        prompt_logprobs: responses carry the prompt's logprobs in vLLM's shape; echo_decoded: the
        choices whose echo is their prompt ids decoded, special tokens written (text_offset counts them);
        details_n: with prefix caching on, each prompt's number of choices (usage then carries
        prompt_tokens_details.cached_tokens); 0: off. tokens_as_ids: logprobs name tokens
        "token_id:<id>"; prompt_ids: per choice, its prompt's ids, where the response carries
        them and each choice's generated ids (return_token_ids)."""
        self.chat = chat
        self.model = model
        self.tokenizer = tokenizer
        self.logprobs = logprobs
        self.skip_special_tokens = skip_special_tokens
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{request_id or uuid.uuid4().hex}"
        self.role, self.chat_echo, self.prompt_logprobs = role, chat_echo, prompt_logprobs
        self.created = int(time.time())
        self._offset: dict[int, int] = {}     # completions logprobs: text offset per choice
        self._utf8: dict[int, codecs.IncrementalDecoder] = {}     # and its tokens' bytes decoded so far
        self._special_ids: frozenset[int] | None = None
        self._chunk_head: str | None = None   # chunk_event's serialized head
        self._echo: dict[int, str] = dict(enumerate(echo or []))      # popped once written
        self._echo_text = list(echo or [])
        self._usage_prompt_tokens = usage_prompt_tokens
        self._echo_ids = echo_ids
        self._echo_decoded = echo_decoded
        self.prompt_only = prompt_only
        self.details_n = details_n
        self.tokens_as_ids, self._prompt_ids, self._ids_sent = tokens_as_ids, prompt_ids, set()

    @classmethod
    def for_job(cls, job: Job, model: str, tokenizer, prepared: list[tuple[list[int], SamplingParams]],
                prefix_caching: bool = False, response_role: str = "assistant") -> "Formatter":
        """The formatter of one request; `prepared` is serve/prepare.py's (prompt ids, params)
        per choice. echo writes a text prompt as sent and a token-id prompt decoded (as vLLM).
        response_role: a chat answer's role after a generation prompt (--response-role)."""
        echo, role, chat_echo, decoded = None, response_role, "", frozenset()
        if job.chat:        # vLLM's: the last message is echoed where the answer continues its role
            last = job.prompts[0][-1]
            role = response_role if job.chat_options.add_generation_prompt else last["role"]
            chat_echo = content_text(last["content"]) if job.echo and last["role"] == role else ""
        elif job.echo:      # a text prompt that truncate_prompt_tokens cut is echoed as the model saw it
            # (kept whole where its ids decode back to it: a decode of at most the context's tokens
            # here on the event loop, not an encode of the text, which may be far longer)
            sent = [isinstance(p, str) and (job.truncate_prompt_tokens is None or _whole(tokenizer, ids, p))
                    for p, (ids, _) in zip(job.prompts, prepared[::job.n])]
            echo = [p if as_sent else tokenizer.decode(ids)
                    for p, as_sent, (ids, _) in zip(job.prompts, sent, prepared[::job.n]) for _ in range(job.n)]
            decoded = frozenset(i for i in range(len(echo)) if not sent[i // job.n])
        counts = [len(ids) for ids, _ in prepared] if job.continuous_usage else None
        echo_ids = [ids for ids, _ in prepared] if job.echo and job.logprobs is not None else None
        return cls(job.chat, model, tokenizer, job.logprobs, echo, counts, echo_ids, job.skip_special_tokens,
                   job.prompt_only, job.request_id, role, chat_echo, job.computed_prompt_logprobs is not None, decoded,
                   job.n if prefix_caching else 0, job.tokens_as_ids,
                   [ids for ids, _ in prepared] if job.return_token_ids else None)

    def view(self, d: Delta) -> Delta:
        """The delta as the client sees it: with Job.prompt_only (max_tokens 0 with echo) the
        one token the engine generated is not part of the answer, which ends with "length"."""
        if not self.prompt_only or d.error is not None or d.finish_reason == "abort":
            return d
        return replace(d, text="", token_ids=[], logprobs=None, completion_tokens=0,
                       finish_reason=d.finish_reason and "length", stop_reason=None)

    def _token(self, tid: int) -> str:
        return self.tokenizer.decode([tid])

    def _name(self, tid: int) -> str:
        """A token as logprobs name it."""
        return f"token_id:{tid}" if self.tokens_as_ids else self._token(tid)

    def _text(self, index: int, text: str) -> str:
        """Choice `index`'s text, its echo before the first piece written."""
        return self._echo.pop(index, "") + text if self._echo else text

    def _logprobs(self, index: int, lps: list[TokenLogprobs] | None,
                  prompt: list[TokenLogprobs | None] | None = None) -> dict | None:
        """`prompt`: the choice's prompt logprobs (echo), before the generated tokens'."""
        if self.logprobs is None:
            return None
        lps = lps or []
        if self.chat:
            def entry(tid: int, lp: float) -> dict:
                # bytes: the token's own, also where it holds part of a character (its token is then U+FFFD)
                return {"token": self._name(tid), "logprob": lp, "bytes": list(token_bytes(self.tokenizer)(tid))}
            return {"content": [dict(entry(x.token_id, x.logprob),
                                     top_logprobs=[entry(t, v) for t, v in x.top.items()]) for x in lps]}
        lead: list[TokenLogprobs | None] = []
        ids = [x.token_id for x in lps]
        if prompt is not None and self._echo_ids is not None:
            lead = list(prompt)                   # its first entry None: null, as in OpenAI's
            ids = list(self._echo_ids[index]) + ids
        # text_offset: where the token's text starts in the choice's text. Counted on the tokens'
        # bytes, as the detokenizer writes them: the tokens of one character share its offset
        # (each alone decodes to U+FFFD), and special tokens, skipped in the text, add nothing: the
        # prompt's where echo writes the prompt as sent and the text does not hold the token there
        # (BOS, which the tokenizer added; a decoded echo writes them all), the generated ones
        # unless the request keeps them (skip_special_tokens false).
        offsets, at, raw = [], self._offset.get(index, 0), token_bytes(self.tokenizer)
        utf8 = self._utf8.setdefault(index, codecs.getincrementaldecoder("utf-8")("replace"))
        special = self._special()
        for k, tid in enumerate(ids):
            # bytes held from earlier tokens that this one does not continue become U+FFFD before
            # its text: that character is theirs (until 2026-12-07 the offset missed it)
            held = utf8.getstate()[0]
            offsets.append(at + (_abandoned(held, raw(tid)) if held else 0))
            if tid not in special:
                skipped = False
            elif k >= len(lead):
                skipped = self.skip_special_tokens
            else:           # until 2026-12-07 every special token of a prompt echoed as sent, even one it wrote
                written = self._echo_text[index].startswith(self._token(tid), at)
                skipped = index not in self._echo_decoded and not written
            at += 0 if skipped else len(utf8.decode(raw(tid)))
        self._offset[index] = at
        entries = lead + lps
        return {"tokens": [self._name(t) for t in ids],
                "token_logprobs": [None if x is None else x.logprob for x in entries],
                "top_logprobs": [None if x is None else self._top(x, k < len(lead)) for k, x in enumerate(entries)],
                "text_offset": offsets}

    def _special(self) -> frozenset[int]:
        """The ids a decode with skip_special_tokens leaves out, once per response: the named
        special tokens and every added token marked special (Llama 3's header and reserved
        tokens are not named; until 2026-12-07 they were counted in text_offset though skipped)."""
        if self._special_ids is None:
            added = getattr(self.tokenizer, "added_tokens_decoder", {})
            self._special_ids = frozenset(getattr(self.tokenizer, "all_special_ids", ())).union(
                i for i, t in added.items() if getattr(t, "special", False))
        return self._special_ids

    def _top(self, x: TokenLogprobs, prompt: bool = False) -> dict[str, float]:
        """Completions' top_logprobs entry: the sampled (or prompt) token's logprob also where it
        is not among the top (OpenAI: "up to logprobs+1 elements"; vLLM writes it first too). A
        prompt token's top holds prompt_logprobs entries, which may be more: the likeliest
        `logprobs` of them are kept, as vLLM cuts them."""
        best = x.top
        if prompt and len(best) > self.logprobs:
            best = dict(sorted(best.items(), key=lambda kv: -kv[1])[:self.logprobs])
        top = {} if x.token_id in best else {self._name(x.token_id): x.logprob}
        top.update((self._name(t), v) for t, v in best.items())
        return top

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    # -- whole responses -------------------------------------------------------------------
    def response(self, choices: list[Choice], prompt_tokens: int) -> dict:
        out = []
        for i, c in enumerate(choices):
            ch = {"index": i, "logprobs": self._logprobs(i, c.logprobs, c.prompt_logprobs),
                  "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
            if self.chat:
                ch["message"] = {"role": self.role, "content": self.chat_echo + c.text}
            else:
                ch["text"] = self._text(i, c.text)
                if self.prompt_logprobs:
                    ch["prompt_logprobs"] = self._prompt_logprobs(c.prompt_logprobs)
                if self._prompt_ids is not None:
                    ch["prompt_token_ids"] = self._prompt_ids[i]
            if self._prompt_ids is not None:
                ch["token_ids"] = c.token_ids
            out.append(ch)
        body = self._head("chat.completion" if self.chat else "text_completion")
        body.update(choices=out, usage=usage(prompt_tokens, sum(c.completion_tokens for c in choices),
                                             self.cached_tokens([c.cached_tokens for c in choices])))
        if self.chat and self.prompt_logprobs:       # vLLM's: once for chat's one prompt
            body["prompt_logprobs"] = self._prompt_logprobs(choices[0].prompt_logprobs)
        if self.chat and self._prompt_ids is not None:
            body["prompt_token_ids"] = self._prompt_ids[0]
        return body

    def _prompt_logprobs(self, entries: list[TokenLogprobs | None] | None) -> list[dict | None] | None:
        """vLLM's prompt_logprobs: per prompt token (the first null) {token id: {logprob, rank,
        decoded_token}}, the prompt's token first, then the top ones (a -inf logprob is -9999.0)."""
        if entries is None:
            return None
        out: list[dict | None] = []
        for x in entries:
            if x is None:
                out.append(None)
                continue
            out.append({str(t): {"logprob": max(lp.logprob, -9999.0), "rank": lp.rank, "decoded_token": self._token(t)}
                        for t, lp in x.items()})        # TokenLogprobs as vLLM's {token id: Logprob}
        return out

    # -- stream chunks ---------------------------------------------------------------------
    def chunk(self, index: int, d: Delta | None) -> dict:
        """A chunk for choice `index`; d=None is chat's opening chunk (the assistant role)."""
        body = self._head("chat.completion.chunk" if self.chat else "text_completion")
        if self.chat:
            delta = {"role": self.role, "content": ""} if d is None else ({"content": d.text} if d.text else {})
            ch = {"index": index, "delta": delta}
        else:
            ch = {"index": index, "text": self._text(index, d.text)}
        ch["logprobs"] = None if d is None else self._logprobs(index, d.logprobs, d.prompt_logprobs)
        ch["finish_reason"] = None if d is None else d.finish_reason
        if d is not None and d.finish_reason is not None:
            ch["stop_reason"] = d.stop_reason
        if self._prompt_ids is not None:      # return_token_ids: the prompt's in the choice's first chunk
            ch["token_ids"] = [] if d is None else d.token_ids
            if index not in self._ids_sent:
                self._ids_sent.add(index)
                (body if self.chat else ch)["prompt_token_ids"] = self._prompt_ids[index]
        body["choices"] = [ch]
        if self._usage_prompt_tokens is not None:     # vLLM's continuous_usage_stats
            body["usage"] = usage(self._usage_prompt_tokens[index], 0 if d is None else d.completion_tokens)
        return body

    def echo_chunk(self, index: int) -> dict:
        """Chat's echo, after the role chunk: the last message's content (vLLM's)."""
        body = self.chunk(index, None)
        body["choices"][0]["delta"] = {"content": self.chat_echo}
        return body

    def chunk_event(self, index: int, d: Delta) -> str:
        """sse(self.chunk(index, d)) for a delta, the same bytes, without building and
        encoding a dict per token: the head is serialized once per request and only the
        text and finish reason are encoded here (logprobs and per-chunk usage take the dict path)."""
        if self.logprobs is not None or self._usage_prompt_tokens is not None or self._prompt_ids is not None:
            return sse(self.chunk(index, d))
        if self._chunk_head is None:
            head = json.dumps(self._head("chat.completion.chunk" if self.chat else "text_completion"),
                              separators=(",", ":"))
            self._chunk_head = f'data: {head[:-1]},"choices":[{{"index":'
        if self.chat:
            body = f'"delta":{{"content":{json.dumps(d.text)}}}' if d.text else '"delta":{}'
        else:
            body = f'"text":{json.dumps(self._text(index, d.text))}'
        reason = ("null" if d.finish_reason is None      # the last chunk: with vLLM's stop_reason
                  else f'{json.dumps(d.finish_reason)},"stop_reason":{json.dumps(d.stop_reason)}')
        return f'{self._chunk_head}{index},{body},"logprobs":null,"finish_reason":{reason}}}]}}\n\n'

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int, cached: list[int]) -> dict:
        """`cached`: per choice, its prompt tokens found in the prefix cache."""
        body = self._head("chat.completion.chunk" if self.chat else "text_completion")
        body.update(choices=[], usage=usage(prompt_tokens, completion_tokens, self.cached_tokens(cached)))
        return body

    def cached_tokens(self, per_choice: list[int]) -> int | None:
        """usage's prompt_tokens_details.cached_tokens (None: prefix caching off): per prompt, the
        most that any of its choices found cached, as usage counts each prompt once."""
        n = self.details_n
        return None if not n else sum(max(per_choice[i:i + n]) for i in range(0, len(per_choice), n))


def _abandoned(held: bytes, after: bytes) -> int:
    """The characters (U+FFFD) bytes held for an unfinished character make where the next
    token's bytes do not continue it; 0 where they do (that character then starts before)."""
    try:
        codecs.getincrementaldecoder("utf-8")("strict").decode(held + after[:1])
        return 0
    except UnicodeDecodeError:
        return len(held.decode("utf-8", "replace"))
