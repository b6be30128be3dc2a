"""The engine's side of `serve`: one loop that owns the `LLMEngine`, run on a thread of the
server's process or in a process of its own (`--engine-process`, serve/async_engine.py).

    front end (event loop)  --commands-->  EngineLoop: build -> loop: drain commands -> step -> deltas
                            <--events----

Commands and events are plain tuples, so they cross a pipe as they are:

    ("add", request ids, [(prompt ids, SamplingParams)], arrival)   ("abort", request id)
    ("call", call id, fn)   fn(engine) between iterations            ("stop",)

    ("ready", view)         the engine itself on a thread; an EngineInfo across processes
    ("failed", message)     the build raised
    ("deltas", [(request id, choice index, Delta)])
    ("result", call id, value, error)
    ("health", consecutive faults, faults in all, cost model provisional)

The build is `build(stopping)`: `stopping()` turns true once ("stop",) has been sent, and a
build still loading (compiling its warm-up, which can take minutes on a cold cache) raises
StartupCancelled at its next compiled shape, so a server stopped while it starts exits
within a compile instead of after the whole warm-up.

Every request added ends with exactly one final delta (finish_reason set, or `error`), also
when it was aborted or the loop stopped first, so the front end's count of live requests
(the admission bound) cannot drift. A step that raises fails the requests then live with
an error (500) and the loop goes on; the engine's KV state is not trusted across a failed
launch, so they are aborted, which frees their blocks.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from fastserve_jax.admission import context_limit, validate_request
from fastserve_jax.config import EngineConfig, SamplingParams
from fastserve_jax.lifecycle import recover_after_fault
from fastserve_jax.request import Request, TokenLogprobs
from fastserve_jax.sharding.distributed import ChannelClosed

log = logging.getLogger("fastserve_jax.serve")

REFINE_POLL_S = 0.5      # how often an idle engine looks whether it can replace a provisional profile
FIRST_RUN_SLICE_S = 0.05   # an idle engine's slice of first runs between looks at its inbox (_first_runs)
STOP = ("stop",)

Event = tuple
# receive(block, timeout) -> the next command, or None when none came (block=False, or timeout)
Receive = Callable[[bool, "float | None"], "tuple | None"]


class StartupCancelled(Exception):
    """Raised by a build that saw `stopping()` before the engine was ready."""


@dataclass
class Delta:
    """New output of one engine request since its previous delta."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None = None     # "stop" | "length" | "abort" on the last delta
    stop_reason: int | str | None = None   # on the last delta: the stop string or token that ended it (vLLM's)
    prompt_tokens: int = 0
    completion_tokens: int = 0           # generated so far
    cached_tokens: int = 0               # prompt tokens found in the prefix cache (Request.num_cached_tokens)
    error: str | None = None             # engine fault: the request failed
    error_status: int = 500              # the HTTP status that answers `error` (503: the server shut down)
    ttft: float | None = None            # seconds, on the delta with the request's first token and on the last
    latency: float | None = None
    handoff: float | None = None         # arrival (the handler's start) to the engine's add_request
    queued: float | None = None          # on the last delta: arrival to the request's first iteration
    # SamplingParams.prompt_logprobs: one entry per prompt token (the first None), on the request's
    # first delta with tokens only
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass
class EngineInfo:
    """What the front end of an engine in another process needs to validate, tokenize and
    format requests: the same checks as `LLMEngine.validate`, from numbers fixed at build."""

    tokenizer: Any
    cfg: EngineConfig
    vocab_size: int
    block_size: int
    num_usable_blocks: int
    profile_provisional: bool
    eos_ids: frozenset[int] = frozenset()
    sampling_defaults: dict = field(default_factory=dict)      # LLMEngine.sampling_defaults

    @classmethod
    def of(cls, engine) -> "EngineInfo":
        return cls(engine.tokenizer, engine.cfg, engine.model_cfg.vocab_size, engine.kv.block_size,
                   engine.kv.num_usable_blocks, engine.profile_provisional, engine.eos_ids, engine.sampling_defaults)

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def validate(self, prompt: str | list[int], params: SamplingParams) -> tuple[str | None, list[int]]:
        return validate_request(prompt, params, self.tokenizer, self.vocab_size, self.cfg.max_model_len, self,
                                self.eos_ids)

    @property
    def context_limit(self) -> int:
        return context_limit(self.cfg.max_model_len, self)


@dataclass
class _Tracked:
    """One request's delivery state: how much of its output was sent.

    Text that could still be the start of a stop string (`hold` characters) is held back
    until more tokens decide it, so a client never sees text that is later cut."""

    req: Request
    index: int
    hold: int
    handoff: float = 0.0
    sent_text: int = 0
    sent_tokens: int = 0

    def delta(self) -> Delta:
        req = self.req
        text = req.output_text
        end = len(text) if req.finished else max(self.sent_text, len(text) - self.hold)
        new_ids = req.output_token_ids[self.sent_tokens:]
        lps = req.logprobs[self.sent_tokens:] if req.logprobs is not None else None
        d = Delta(text[self.sent_text:end], new_ids, lps, req.finish_reason, req.stop_reason, req.num_prompt_tokens,
                  len(req.output_token_ids), req.num_cached_tokens)
        if self.sent_tokens == 0 and new_ids:
            d.ttft = req.metrics.ttft
            if req.prompt_logprobs is not None:
                d.prompt_logprobs = list(req.prompt_logprobs)
        self.sent_text, self.sent_tokens = end, len(req.output_token_ids)
        if req.finished:
            d.ttft, d.latency, d.handoff = req.metrics.ttft, req.metrics.latency, self.handoff
            if req.metrics.first_scheduled_time is not None:
                d.queued = req.metrics.first_scheduled_time - req.metrics.arrival_time
        return d


class EngineLoop:
    """Builds the engine and serves commands until ("stop",); `emit` hands events to the
    front end (it must not block for long), `view` turns the engine into what "ready" carries,
    `stopping` is what the build polls (the transport sets it with ("stop",))."""

    def __init__(self, build: Callable[[Callable[[], bool]], Any], emit: Callable[[Event], None],
                 view: Callable[[Any], Any] = lambda engine: engine,
                 stopping: Callable[[], bool] = lambda: False) -> None:
        self.build, self.emit, self.view, self.stopping = build, emit, view, stopping
        self.engine = None
        self._tracked: dict[str, _Tracked] = {}
        self._health = (0, 0, False)
        self._idle_runs = [0, 0.0]          # programs run by _first_runs, and their seconds

    def run(self, receive: Receive) -> None:
        try:
            self.engine = self.build(self.stopping)
        except StartupCancelled:
            log.info("stopped before the engine was ready")
            self._refuse_pending(receive)
            return
        except Exception as e:  # a broken model or config: reported on /health and in the log
            if isinstance(e, ValueError):    # a setting refused by name: the message says what to change
                log.error("engine start failed: %s", e)
            else:
                log.exception("engine start failed")
            platforms = os.environ.get("JAX_PLATFORMS")     # JAX's bare AssertionError for a missing backend
            hint = f"no message; is JAX_PLATFORMS={platforms!r} installed here, with a device?" if platforms else "no message"
            self.emit(("failed", f"{type(e).__name__}: {str(e) or hint}"))
            self._refuse_pending(receive)
            return
        log.info("engine ready: %d KV blocks, scheduler %s", self.engine.kv.num_usable_blocks,
                 self.engine.cfg.scheduler)
        limit, cfg = self.engine.context_limit, self.engine.cfg
        if limit < cfg.max_model_len:
            log.warning("the device KV pool holds %d tokens, fewer than max_model_len %d: a request's prompt and "
                        "output are limited to %d tokens (advertised on /v1/models; chat's default max_tokens fills "
                        "that); raise num_device_blocks or lower max_model_len", limit, cfg.max_model_len, limit)
        self.emit(("ready", self.view(self.engine)))
        self._report_health(0, 0)
        faults = total = 0
        refine = self.engine.profile_provisional      # until the background warm-up is done
        first_runs, running = True, False             # programs compiled but never run (_first_runs)
        while True:
            idle = not self.engine.has_unfinished()
            wait = (0.0 if running else REFINE_POLL_S) if refine or first_runs else None
            cmd = receive(idle, wait if idle else None)
            while cmd is not None:
                if cmd == STOP:
                    self._shut_down(receive)
                    return
                self._handle(cmd)
                cmd = receive(False, None)
            if refine and not self.engine.has_unfinished():
                refine = self._refine_profile()
            elif first_runs and not self.engine.has_unfinished():
                first_runs, running = self._first_runs()
            if self.engine.has_unfinished():
                ok = self._step()
                if ok is False:
                    faults, total = faults + 1, total + 1
                elif ok:
                    faults = 0
            self._report_health(faults, total)

    def _report_health(self, faults: int, total: int) -> None:
        now = (faults, total, self.engine.profile_provisional)
        if now != self._health:
            self._health = now
            self.emit(("health", *now))

    def _refine_profile(self) -> bool:
        """While idle: the full cost profile once the background warm-up is done (see
        cost_profile.refine_profile). Returns whether to try again later."""
        from fastserve_jax.cost_profile import refine_profile   # imports jax; the server process does without

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

    def _first_runs(self) -> tuple[bool, bool]:
        """While idle, once every shape is compiled: run the programs that have not run yet, a
        slice of FIRST_RUN_SLICE_S at a time (ModelRunner.run_pending), so that their costlier
        first runs (XLA:CPU sets its dots up then; docs/startup.md, "First runs") come before
        a request needs them. After a full warm-up none is left. Returns (try again later,
        some are left now)."""
        runner = self.engine.runner
        if not runner.compiler.background_done() or runner.shapes_pending():
            return True, False
        before, t0 = len(runner.ran), time.perf_counter()
        try:
            left = runner.run_pending(FIRST_RUN_SLICE_S)
        except Exception:  # keep serving; the programs run when a request needs them
            log.exception("running the compiled programs once while idle failed; leaving them to the requests")
            return False, False
        self._idle_runs[0] += len(runner.ran) - before
        self._idle_runs[1] += time.perf_counter() - t0
        if not left and self._idle_runs[0]:
            log.info("ran each of the %d programs not run yet once while idle (%.1f s in all)", *self._idle_runs)
        return left, left

    def _shut_down(self, receive: Receive) -> None:
        """Abort every live request and answer what is still queued, then save the engine's state."""
        live = [t.req for t in self._tracked.values()]
        for req in live:
            self.engine.abort(req.request_id)
        self._flush(live)
        self._refuse_pending(receive)
        self.engine.close()

    def _refuse_pending(self, receive: Receive) -> None:
        """Answer the commands still queued: their requests end as aborted, calls fail."""
        while (cmd := receive(False, None)) is not None and cmd != STOP:   # a closed pipe reads as STOP
            if cmd[0] == "add":
                self.emit(("deltas", [(rid, i, Delta("", [], None, finish_reason="abort"))
                                      for i, rid in enumerate(cmd[1])]))
            elif cmd[0] == "call":
                self.emit(("result", cmd[1], None, RuntimeError("the engine has stopped")))

    def _handle(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "add":
            self._add(*cmd[1:])
        elif kind == "abort":
            t = self._tracked.get(cmd[1])
            if t is not None:
                self.engine.abort(cmd[1])
                self._flush([t.req])
        elif kind == "call":
            _, call_id, fn = cmd
            try:
                value, error = fn(self.engine), None
            except Exception as e:  # handed to the awaiting coroutine, which reports it
                value, error = None, e
            self.emit(("result", call_id, value, error))

    def _add(self, rids: list[str], prompts: list[tuple[list[int], SamplingParams]], arrival: float) -> None:
        failed = []
        for index, (rid, (ids, params)) in enumerate(zip(rids, prompts)):
            try:
                req = self.engine.add_request(ids, params, request_id=rid, arrival_time=arrival)
            except ValueError as e:   # validated at the boundary, so only a race (e.g. duplicate id)
                failed.append((rid, index, Delta("", [], None, error=str(e))))
                continue
            # text that may begin a stop string waits, unless a matched stop string stays in the text
            hold = 0 if params.include_stop_str_in_output else max((len(s) for s in params.stop), default=1) - 1
            self._tracked[rid] = _Tracked(req, index, hold, time.monotonic() - arrival)
        if failed:
            self.emit(("deltas", failed))

    def _step(self) -> bool | None:
        """False if the step raised; True if it gave tokens (an engine that works); None if it
        ran but gave none: under async scheduling a step that only launches says nothing, and
        taking it for health kept /health at 200 while every request failed at its collection
        (until 2026-12-07)."""
        try:
            got = self.engine.step()
        except ChannelClosed:    # a multi-host worker is gone: no step can run again, the engine is lost
            raise
        except Exception as e:
            log.exception("engine step failed; failing the %d live requests", len(self._tracked))
            self._fail_all(f"engine fault in an iteration: {type(e).__name__}: {e}")
            return False
        self._flush(got)
        return True if got else None

    def _flush(self, reqs: list[Request]) -> None:
        batch = []
        for req in reqs:
            t = self._tracked.get(req.request_id)
            if t is None:
                continue
            batch.append((req.request_id, t.index, t.delta()))
            if req.finished:
                del self._tracked[req.request_id]
        if batch:
            self.emit(("deltas", batch))

    def _fail_all(self, message: str) -> None:
        batch = []
        for rid, t in list(self._tracked.items()):
            try:        # finished ones too: one whose release raised is still live (lifecycle.py)
                self.engine.abort(rid)
            except Exception:  # the engine is inconsistent; the request still fails below
                log.exception("abort of %s after a failed step also failed", rid)
            batch.append((rid, t.index, Delta("", [], None, error=message)))
        self._tracked.clear()
        if recover_after_fault(self.engine):
            log.warning("the failed step took the KV cache with it (donated); it was made anew")
        if batch:
            self.emit(("deltas", batch))
