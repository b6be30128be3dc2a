"""A request's answer as it comes from the engine: an SSE stream (EventStream) or the choices
collected for one JSON response (collect); either aborts the request's engine requests when
the client disconnects or the response ends."""

from __future__ import annotations

import asyncio
from typing import Callable

from starlette.requests import Request

from fastserve_jax.serve.async_engine import RequestGroup
from fastserve_jax.serve.errors import APIError
from fastserve_jax.serve.openai_format import Choice, Formatter, sse


async def _disconnect(receive) -> None:
    """Return when the client goes away (the body is already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _until_disconnect(receive, group: RequestGroup) -> None:
    await _disconnect(receive)
    group.abort()


class ClientGone(Exception):
    """The client disconnected before its request was submitted."""


async def unless_cut(work: asyncio.Future, cut_off: asyncio.Event, cut: Callable[[], APIError], receive=None):
    """`work`'s result, or `cut()` raised if `cut_off` is set first (the shutdown's grace ends:
    a handler still waiting was cancelled into a plain-text 500), or, given `receive` (the
    request's body already read), ClientGone if the client goes away first. `work` is then
    cancelled: a preparation still queued behind others never runs (ten hung-up 1 MB prompts
    held the one preparing thread, and a small request behind them, for 17 s)."""
    ended = asyncio.ensure_future(cut_off.wait())
    gone = asyncio.ensure_future(_disconnect(receive)) if receive is not None else None
    try:
        await asyncio.wait({work, ended} | ({gone} if gone else set()), return_when=asyncio.FIRST_COMPLETED)
    finally:
        ended.cancel()
        if gone is not None:
            gone.cancel()
        if unfinished := not work.done():
            work.cancel()
    if cut_off.is_set():            # also where the work ended at the cut: the engine answers no more
        raise cut()
    if unfinished:
        raise ClientGone
    return work.result()


class EventStream:
    """SSE: one `data:` event per delta of any choice (those queued together in one write),
    usage if asked, then `data: [DONE]`; a failed choice's error event ends it (then [DONE]).
    Aborts the group when the client disconnects or the response ends for any reason.
    (An ASGI app of its own: no Content-Length, so the server sends it chunked.)"""

    raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                   (b"x-accel-buffering", b"no")]

    def __init__(self, group: RequestGroup, fmt: Formatter, include_usage: bool, prompt_tokens: int) -> None:
        self.group, self.fmt, self.include_usage, self.prompt_tokens = group, fmt, include_usage, prompt_tokens

    async def events(self):
        completion_tokens = [0] * len(self.group.request_ids)
        cached = [0] * len(completion_tokens)
        if self.fmt.chat:
            for i in range(len(completion_tokens)):
                yield sse(self.fmt.chunk(i, None))
            if self.fmt.chat_echo:
                for i in range(len(completion_tokens)):
                    yield sse(self.fmt.echo_chunk(i))
        async for batch in self.group.batches():
            events, failed = [], False
            for index, d in batch:
                d = self.fmt.view(d)
                if d.error is not None:     # vLLM's: one error event ends the stream (the rest are aborted)
                    events.append(sse(APIError(d.error_status, d.error).body()))
                    failed = True
                    break
                if d.finish_reason != "abort":
                    completion_tokens[index] = d.completion_tokens
                    cached[index] = d.cached_tokens or cached[index]
                    # a chunk per delta with new tokens, as vLLM streams, even where their text is
                    # empty (special tokens skipped, text held back for a stop string): clients time
                    # tokens by chunks (bench_client, vLLM's benchmark)
                    if d.text or d.finish_reason or d.logprobs or d.token_ids:
                        events.append(self.fmt.chunk_event(index, d))
            if events:
                yield "".join(events)
            if failed:
                yield sse("[DONE]")
                return
        if self.include_usage:
            yield sse(self.fmt.usage_chunk(self.prompt_tokens, sum(completion_tokens), cached))
        yield sse("[DONE]")

    async def __call__(self, scope, receive, send) -> None:
        watcher = asyncio.create_task(_until_disconnect(receive, self.group))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for event in self.events():
                await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            self.group.abort()


async def collect(request: Request, group: RequestGroup, fmt: Formatter) -> list[Choice]:
    choices = [Choice() for _ in group.request_ids]
    watcher = asyncio.create_task(_until_disconnect(request.receive, group))
    try:
        async for index, d in group:
            if d.error is not None:
                raise APIError(d.error_status, d.error)
            choices[index].add(fmt.view(d))
    finally:
        watcher.cancel()
        group.abort()
    return choices
