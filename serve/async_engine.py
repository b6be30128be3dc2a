"""The front end's handle on the engine: submit requests, read their deltas on asyncio.

`LLMEngine` is single-threaded: only the engine loop (serve/engine_loop.py) calls it, on a
thread of this process or, with `engine_process=True` (`serve --engine-process`), in a
process of its own (serve/engine_process.py). The event loop sends commands (add a group
of requests, abort one, run a function between iterations) and never waits on device
work. After each iteration the engine loop sends the deltas of the requests that got a
token in one event; each HTTP request reads its own `RequestGroup` queue.

    engine loop:  build (load, warm up) -> loop: drain commands -> step -> deltas
    event loop:   submit() -> async for index, delta in group -> group.abort() on disconnect

Every engine request ends with exactly one final delta (see engine_loop.py), also when the
engine process dies or the loop on its thread raises: then every live request fails with an
error, so the loop's count of live requests (the admission bound) can never drift.
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
from fastserve_jax.serve.engine_loop import STOP, Delta, EngineInfo, EngineLoop, Event

log = logging.getLogger("fastserve_jax.serve")

Prompt = list[int]


class RequestGroup:
    """The choices of one HTTP request (prompts x n), read on the event loop."""

    def __init__(self, owner: "AsyncEngine", request_ids: list[str], n: int = 1) -> None:
        self.owner = owner
        self.request_ids = request_ids
        self.n = n          # choices per prompt: choice i is prompt i // n's
        self.queue: asyncio.Queue[tuple[int, Delta]] = asyncio.Queue()
        self.open = len(request_ids)         # choices without their final delta yet

    def __aiter__(self):
        return self._iter()

    async def _iter(self):
        async for batch in self.batches():
            for item in batch:
                yield item

    async def batches(self):
        """Every (index, delta) already queued at each wake-up, as one list: a stream that
        fell behind the engine by several iterations writes them in one send."""
        while self.open:
            batch = [await self.queue.get()]
            while not self.queue.empty():
                batch.append(self.queue.get_nowait())
            self.open -= sum(d.final for _, d in batch)
            yield batch

    def abort(self) -> None:
        """Cancel every unfinished choice (a no-op for finished ones); KV is freed before
        the engine's next iteration."""
        if self.open:
            for rid in self.request_ids:
                self.owner.abort(rid)


@dataclass
class EngineHealth:
    ready: bool = False
    ready_at: float | None = None        # time.monotonic() when it became ready
    startup_error: str | None = None
    lost: str | None = None              # the engine process died (or its thread raised) after start-up
    consecutive_faults: int = 0
    faults_total: int = 0


class ThreadTransport:
    """The engine loop on a thread of this process."""

    def __init__(self, build: Callable[[Callable[[], bool]], Any]) -> None:
        self.build = build
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, on_event: Callable[[Event], None]) -> None:
        self._thread = threading.Thread(target=self._run, args=(on_event,), name="fastserve-engine", daemon=True)
        self._thread.start()

    def _run(self, on_event: Callable[[Event], None]) -> None:
        """The engine loop, then ("exited", why) as an engine process's reader reports its end:
        a loop that raised fails what is live instead of leaving it waiting for ever."""
        message = "the engine thread exited"
        try:
            EngineLoop(self.build, on_event, stopping=self._stopping.is_set).run(self._receive)
        except BaseException as e:  # reported to the front end below, which fails the live requests
            log.exception("the engine loop failed")
            message = f"the engine thread failed: {type(e).__name__}: {e}"
        on_event(("exited", message))

    def _receive(self, block: bool, timeout: float | None):
        try:
            return self._inbox.get(block=block, timeout=timeout if block else None)
        except queue.Empty:
            return None

    def send(self, cmd: tuple) -> None:
        if cmd == STOP:
            self._stopping.set()        # a build still warming up stops at its next shape
        self._inbox.put(cmd)

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()


class AsyncEngine:
    """The event loop's side. `build(stopping)` runs in the engine loop and returns a warmed-up
    engine (engine_loop.py); with `engine_process` it must be picklable (serve_cmd.EngineBuilder
    is). `transport`: one made already (an engine process spawned early, see
    ProcessTransport.spawn)."""

    def __init__(self, build: Callable[[Callable[[], bool]], Any], max_pending: int,
                 on_timing: Callable[[str, Delta, tuple], None] | None = None, engine_process: bool = False,
                 transport: Any = None) -> None:
        if transport is None and engine_process:
            from fastserve_jax.serve.engine_process import ProcessTransport

            transport = ProcessTransport(build)
        self.transport = transport if transport is not None else ThreadTransport(build)
        self.max_pending = max_pending
        # called with each delta as it is delivered: (request id, delta, its prompt: (group's first
        # request id, the prompt's index, its choices))
        self.on_timing = on_timing
        self.on_fatal: Callable[[], None] | None = None    # the engine failed to start, or its process died
        # once built: the LLMEngine itself (thread; read-only here), or its EngineInfo (process)
        self.engine: Any = None
        self.health = EngineHealth()
        self._live: dict[str, tuple[RequestGroup, int]] = {}   # the admission count
        self._calls: dict[int, asyncio.Future] = {}
        self._ids = itertools.count()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopped = False

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport.start(self._post)

    def _post(self, event: Event) -> None:
        """From the engine's thread (or the reader of its process) onto the event loop."""
        try:
            self.loop.call_soon_threadsafe(self._dispatch, event)
        except RuntimeError:    # the loop has closed: the server is gone and nobody waits for this
            if not self.loop.is_closed():
                raise

    @property
    def num_pending(self) -> int:
        return len(self._live)

    def _check_running(self) -> None:
        if self.stopped or not self.health.ready or self.health.lost:
            raise RuntimeError("the engine is not running; check health.ready before submitting")

    def submit(self, prompts: list[tuple[Prompt, SamplingParams]], arrival_time: float, n: int = 1) -> RequestGroup:
        """Queue validated prompts (token ids), each prompt's n choices in a row; the caller has
        checked `num_pending` room."""
        self._check_running()
        base = f"srv-{next(self._ids)}"
        rids = [f"{base}-{i}" for i in range(len(prompts))]
        group = RequestGroup(self, rids, n)
        self.transport.send(("add", rids, prompts, arrival_time))
        for i, rid in enumerate(rids):
            self._live[rid] = (group, i)
        return group

    def abort(self, request_id: str) -> None:
        if request_id in self._live and not self.health.lost:
            self.transport.send(("abort", request_id))

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        """fn(engine) in the engine loop between iterations; returns its result. Across
        processes fn must be picklable (a module-level function or method, not a lambda)."""
        self._check_running()
        call_id = next(self._ids)
        self.transport.send(("call", call_id, fn))
        fut = self._calls[call_id] = self.loop.create_future()
        return await fut

    async def stop(self, timeout: float = 30.0) -> None:
        """Abort what is left, end the engine loop and wait for it (at most `timeout` seconds)."""
        if self.stopped:
            return
        self.stopped = True
        if self.loop is None:
            return
        self.transport.send(STOP)
        t0 = time.monotonic()
        if not await asyncio.to_thread(self.transport.join, timeout):
            log.warning("engine still busy after %.1f s; leaving it (daemon) to exit with the process",
                        time.monotonic() - t0)

    # -- events from the engine loop, on the event loop --------------------------------------
    def _dispatch(self, event: Event) -> None:
        kind = event[0]
        if kind == "deltas":
            self._deliver(event[1])
        elif kind == "result":
            fut = self._calls.pop(event[1], None)
            if fut is not None and not fut.done():
                if event[3] is not None:
                    fut.set_exception(event[3])
                else:
                    fut.set_result(event[2])
        elif kind == "health":
            _, self.health.consecutive_faults, self.health.faults_total, provisional = event
            if isinstance(self.engine, EngineInfo):     # a copy; a thread's engine is read live
                self.engine.profile_provisional = provisional
        elif kind == "ready":
            self.engine = event[1]
            self.health.ready, self.health.ready_at = True, time.monotonic()
        elif kind == "failed":
            self.health.startup_error = event[1]
            self._fatal()
        elif kind == "exited":
            self._lost(event[1])

    def _deliver(self, batch: list[tuple[str, int, Delta]]) -> None:
        for rid, index, delta in batch:
            entry = self._live.get(rid)
            if entry is None:
                continue
            if delta.final:
                del self._live[rid]
            entry[0].queue.put_nowait((index, delta))
            if self.on_timing is not None:      # after the delta is handed on: an observer that raised
                try:                            # lost it and the rest of the batch (a final one hung its
                    group = entry[0]            # request; a probe, 2026-12-07)
                    self.on_timing(rid, delta, (group.request_ids[0], index // group.n, group.n))
                except Exception:
                    log.exception("the timing observer failed on a delta of %s", rid)

    def end_live(self, message: str, status: int) -> None:
        """Answer every live request now with the error `message` (HTTP `status`) and abort it:
        a shutdown whose grace period is about to end, so that handlers still write a complete
        response instead of being cancelled in the middle of one."""
        live = list(self._live.items())
        for rid, _ in live:
            self.abort(rid)
        self._deliver([(rid, index, Delta("", [], None, error=message, error_status=status))
                       for rid, (_, index) in live])

    def lose(self, message: str) -> None:
        """From any thread: the engine cannot serve on (a multi-host worker is gone), as if its
        loop had ended with `message`."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._lost, message)
        else:                       # the app has not started: it stops as it starts
            self.health.startup_error = message
            self._fatal()

    def _fatal(self) -> None:
        if self.on_fatal is not None:
            self.on_fatal()

    def _lost(self, message: str) -> None:
        """The engine process (or thread) ended: fail what was live and every waiting call."""
        if not self.stopped and self.health.startup_error is None:
            log.error("%s; failing %d live requests", message, len(self._live))
            if self.health.ready:
                self.health.lost = message
            else:
                self.health.startup_error = message
            self._fatal()
        self._deliver([(rid, index, Delta("", [], None, error=message))
                       for rid, (_, index) in list(self._live.items())])
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(RuntimeError(message))
        self._calls.clear()
