"""The engine on its own thread, behind a thread-safe inbox, feeding asyncio.

`LLMEngine` is single-threaded: only the engine thread calls its methods. The event loop
puts commands in the inbox (add a group of requests, abort one, run a function between
iterations) and never waits on device work. After each iteration the engine thread turns
the requests that got a token into `Delta`s and hands all of them to the loop in one
`call_soon_threadsafe`; each HTTP request reads its own `RequestGroup` queue.

    engine thread:  build (load, warm up) -> loop: drain inbox -> step -> deliver deltas
    event loop:     submit() -> async for index, delta in group -> group.abort() on disconnect

Every engine request ends with exactly one final delta (finish_reason set, or `error`),
also when it was aborted, so the loop's count of live requests (the admission bound) can
never drift. A step that raises fails the requests then live with an error (500) and the
loop goes on; the engine's KV state is not trusted across a failed launch, so they are
aborted, which frees their blocks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from fastserve_jax.config import SamplingParams
from fastserve_jax.cost_profile import refine_profile
from fastserve_jax.engine import LLMEngine
from fastserve_jax.request import Request, TokenLogprobs

log = logging.getLogger("fastserve_jax.serve")

Prompt = list[int]
_STOP = object()
REFINE_POLL_S = 0.5      # how often an idle engine looks whether it can replace a provisional profile


@dataclass
class Delta:
    """New output of one engine request since its previous delta."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None = None     # "stop" | "length" | "abort" on the last delta
    prompt_tokens: int = 0
    completion_tokens: int = 0           # generated so far
    error: str | None = None             # engine fault: the request failed
    ttft: float | None = None            # seconds, on the last delta
    latency: float | None = None

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass
class _Tracked:
    """Engine-thread bookkeeping of one request: how much of its output was delivered.

    Text that could still be the start of a stop string (`hold` characters) is held back
    until more tokens decide it, so a client never sees text that is later cut."""

    req: Request
    group: "RequestGroup"
    index: int
    hold: int
    sent_text: int = 0
    sent_tokens: int = 0

    def delta(self) -> Delta:
        req = self.req
        text = req.output_text
        end = len(text) if req.finished else max(self.sent_text, len(text) - self.hold)
        new_ids = req.output_token_ids[self.sent_tokens:]
        lps = req.logprobs[self.sent_tokens:] if req.logprobs is not None else None
        d = Delta(text[self.sent_text:end], new_ids, lps, req.finish_reason, req.num_prompt_tokens,
                  len(req.output_token_ids))
        self.sent_text, self.sent_tokens = end, len(req.output_token_ids)
        if req.finished:
            d.ttft, d.latency = req.metrics.ttft, req.metrics.latency
        return d


class RequestGroup:
    """The choices of one HTTP request (prompts x n), read on the event loop."""

    def __init__(self, owner: "AsyncEngine", request_ids: list[str]) -> None:
        self.owner = owner
        self.request_ids = request_ids
        self.queue: asyncio.Queue[tuple[int, Delta]] = asyncio.Queue()
        self.open = len(request_ids)         # choices without their final delta yet

    def __aiter__(self):
        return self._iter()

    async def _iter(self):
        while self.open:
            index, delta = await self.queue.get()
            if delta.final:
                self.open -= 1
            yield index, delta

    def abort(self) -> None:
        """Cancel every unfinished choice (a no-op for finished ones); KV is freed before
        the engine's next iteration."""
        if self.open:
            for rid in self.request_ids:
                self.owner.abort(rid)


@dataclass
class EngineHealth:
    ready: bool = False
    startup_error: str | None = None
    consecutive_faults: int = 0
    faults_total: int = 0


class AsyncEngine:
    """Owns the engine thread. `build` runs on that thread and returns a warmed-up engine."""

    def __init__(self, build: Callable[[], LLMEngine], max_pending: int,
                 on_finished: Callable[[Delta], None] | None = None) -> None:
        self._build = build
        self.max_pending = max_pending
        self.on_finished = on_finished
        self.engine: LLMEngine | None = None     # set once the build is done; read-only off-thread
        self.health = EngineHealth()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._tracked: dict[str, _Tracked] = {}   # engine thread only
        self._live: dict[str, RequestGroup] = {}  # event loop only: the admission count
        self._ids = itertools.count()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopped = False
        self._thread = threading.Thread(target=self._run, name="fastserve-engine", daemon=True)

    # -- event-loop side -------------------------------------------------------------------
    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._thread.start()

    @property
    def num_pending(self) -> int:
        return len(self._live)

    def submit(self, prompts: list[tuple[Prompt, SamplingParams]], arrival_time: float) -> RequestGroup:
        """Queue validated prompts (token ids); the caller has checked `num_pending` room."""
        if self.stopped or not self.health.ready:
            raise RuntimeError("the engine is not running; check health.ready before submitting")
        base = f"srv-{next(self._ids)}"
        rids = [f"{base}-{i}" for i in range(len(prompts))]
        group = RequestGroup(self, rids)
        for rid in rids:
            self._live[rid] = group
        self._inbox.put(("add", group, prompts, arrival_time))
        return group

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run fn(engine) on the engine thread between iterations; returns its result."""
        if self.stopped or not self.health.ready:
            raise RuntimeError("the engine is not running")
        fut = self.loop.create_future()
        self._inbox.put(("call", fn, fut))
        return await fut

    async def stop(self, timeout: float = 30.0) -> None:
        """Abort what is left, end the thread and wait for it (at most `timeout` seconds)."""
        self.stopped = True
        if not self._thread.is_alive():
            return
        self._inbox.put(_STOP)
        await asyncio.to_thread(self._thread.join, timeout)
        if self._thread.is_alive():
            log.warning("engine thread still busy after %.0f s; leaving it (daemon) to exit with the process",
                        timeout)
        elif self.engine is not None:
            self.engine.close()

    def _deliver(self, batch: list[tuple[RequestGroup, str, int, Delta]]) -> None:
        for group, rid, index, delta in batch:
            if delta.final:
                self._live.pop(rid, None)
                if self.on_finished is not None:
                    self.on_finished(delta)
            group.queue.put_nowait((index, delta))

    def _resolve(self, fut: asyncio.Future, value: Any, error: BaseException | None) -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(value)

    # -- engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.engine = self._build()
        except Exception as e:  # a broken model or config: report it on /health and in the log
            log.exception("engine start failed")
            self.health.startup_error = f"{type(e).__name__}: {e}"
            return
        self.health.ready = True
        log.info("engine ready: %d KV blocks, scheduler %s", self.engine.kv.num_usable_blocks,
                 self.engine.cfg.scheduler)
        refine = self.engine.profile_provisional      # until the background warm-up is done
        while True:
            idle = not self.engine.has_unfinished()
            try:   # sleep in the inbox only while there is nothing to run
                cmd = self._inbox.get(block=idle, timeout=REFINE_POLL_S if idle and refine else None)
            except queue.Empty:
                cmd = None
            while cmd is not None:
                if cmd is _STOP:
                    self._shut_down()
                    return
                self._handle(cmd)
                cmd = None if self._inbox.empty() else self._inbox.get_nowait()
            if refine and not self.engine.has_unfinished():
                refine = self._refine_profile()
            if self.engine.has_unfinished():
                self._step()

    def _refine_profile(self) -> bool:
        """While idle: the full cost profile once the background warm-up is done (see
        cost_profile.refine_profile). Returns whether to try again later."""
        t0 = time.perf_counter()
        try:
            if not refine_profile(self.engine):
                return True
        except Exception:  # keep serving on the provisional model
            log.exception("profiling the engine after its warm-up failed; keeping the provisional cost model")
            return False
        log.info("cost model profiled now that every shape is compiled (%.1f s): %s", time.perf_counter() - t0,
                 self.engine.cost_model.name)
        return False

    def _shut_down(self) -> None:
        """Abort every live request and whatever is still in the inbox, then return."""
        live = [t.req for t in self._tracked.values()]
        for req in live:
            self.engine.abort(req.request_id)
        self._flush(live)
        while not self._inbox.empty():
            cmd = self._inbox.get_nowait()
            if cmd is _STOP:
                continue
            if cmd[0] == "add":
                group = cmd[1]
                self.loop.call_soon_threadsafe(self._deliver, [
                    (group, rid, i, Delta("", [], None, finish_reason="abort"))
                    for i, rid in enumerate(group.request_ids)])
            elif cmd[0] == "call":
                self.loop.call_soon_threadsafe(self._resolve, cmd[2], None, RuntimeError("the engine has stopped"))

    def _handle(self, cmd) -> None:
        kind = cmd[0]
        if kind == "add":
            self._add(*cmd[1:])
        elif kind == "abort":
            t = self._tracked.get(cmd[1])
            if t is not None:
                self.engine.abort(cmd[1])
                self._flush([t.req])
        elif kind == "call":
            _, fn, fut = cmd
            try:
                value, error = fn(self.engine), None
            except Exception as e:  # handed to the awaiting coroutine, which reports it
                value, error = None, e
            self.loop.call_soon_threadsafe(self._resolve, fut, value, error)

    def _add(self, group: RequestGroup, prompts: list[tuple[Prompt, SamplingParams]], arrival: float) -> None:
        failed: list[tuple[RequestGroup, str, int, Delta]] = []
        for index, (rid, (ids, params)) in enumerate(zip(group.request_ids, prompts)):
            try:
                req = self.engine.add_request(ids, params, request_id=rid, arrival_time=arrival)
            except ValueError as e:   # validated at the boundary, so only a race (e.g. duplicate id)
                failed.append((group, rid, index, Delta("", [], None, error=str(e))))
                continue
            hold = max((len(s) for s in params.stop), default=1) - 1
            self._tracked[rid] = _Tracked(req, group, index, hold)
        if failed:
            self.loop.call_soon_threadsafe(self._deliver, failed)

    def _step(self) -> None:
        try:
            got = self.engine.step()
        except Exception as e:
            self.health.consecutive_faults += 1
            self.health.faults_total += 1
            log.exception("engine step failed; failing the %d live requests", len(self._tracked))
            self._fail_all(f"engine fault in an iteration: {type(e).__name__}: {e}")
            return
        self.health.consecutive_faults = 0
        self._flush(got)

    def _flush(self, reqs: list[Request]) -> None:
        batch = []
        for req in reqs:
            t = self._tracked.get(req.request_id)
            if t is None:
                continue
            batch.append((t.group, req.request_id, t.index, t.delta()))
            if req.finished:
                del self._tracked[req.request_id]
        if batch:
            self.loop.call_soon_threadsafe(self._deliver, batch)

    def _fail_all(self, message: str) -> None:
        batch = []
        for rid, t in list(self._tracked.items()):
            if not t.req.finished:
                try:
                    self.engine.abort(rid)
                except Exception:  # the engine is inconsistent; the request still fails below
                    log.exception("abort of %s after a failed step also failed", rid)
            batch.append((t.group, rid, t.index, Delta("", [], None, error=message)))
        self._tracked.clear()
        if batch:
            self.loop.call_soon_threadsafe(self._deliver, batch)
