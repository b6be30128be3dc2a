"""uvicorn's server, draining: on the first exit signal the app refuses new requests while
in-flight ones finish within --shutdown-timeout; whatever is still running just before that
timeout ends, or when a second Ctrl-C forces the exit, is answered rather than cut off."""

from __future__ import annotations

import asyncio
import logging
import resource
import time

import uvicorn

# How long before --shutdown-timeout ends the requests still running are answered (at most
# half the timeout): time for their handlers to write the answer before uvicorn cancels them.
# A forced exit (a second Ctrl-C) waits as long for those answers.
SHUTDOWN_ANSWER_MARGIN_S = 0.5
FORCED_STOP_S = 3.0     # how long a forced exit waits for the engine to stop (it saves what it learned)
logger = logging.getLogger("fastserve_jax.serve")


# open files the server may hold: a connection is one; vLLM raises its soft limit to 65,535 too
OPEN_FILES = 65536


def raise_open_file_limit(target: int = OPEN_FILES) -> int:
    """The soft limit on open files, raised toward `target` (at most the hard limit), as vLLM
    does at start: at a shell's or systemd's usual 1,024 a burst of 1,500 connections had 492
    dropped with no response and nothing logged, and the compile caches failed with EMFILE (a
    probe, 2026-12-07). Returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = target if hard == resource.RLIM_INFINITY else min(target, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            logger.info("open-file limit raised from %d to %d", soft, want)
            return want
        except (ValueError, OSError) as e:
            logger.warning("the open-file limit is %d and could not be raised (%s): concurrent connections past it "
                        "are dropped; raise it (ulimit -n, LimitNOFILE=)", soft, e)
    return soft


class DrainingServer(uvicorn.Server):
    """uvicorn's server that marks the app draining on the first exit signal, so a request
    whose body was still arriving gets 503 while in-flight ones finish (uvicorn itself
    refuses new connections, closes idle ones and drops requests pipelined behind one
    in flight)."""

    def __init__(self, config, app) -> None:
        super().__init__(config)
        self.app_state = app.state.server

    def handle_exit(self, sig, frame) -> None:
        self.app_state.draining = True
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None) -> None:
        """uvicorn's, except that requests still running, or still sending their body, just
        before --shutdown-timeout ends are answered (503 "shut down", or an error event and
        [DONE] on a stream) rather than cut off mid-response when uvicorn cancels their
        handlers. A forced exit answers them at once: uvicorn leaves them to the event
        loop's end, which cancelled each into a plain-text 500 and a traceback."""
        grace = self.config.timeout_graceful_shutdown
        end = None if grace is None else asyncio.get_running_loop().call_later(
            max(0.0, grace - min(SHUTDOWN_ANSWER_MARGIN_S, grace / 2)), self.app_state.end_live,
            "the server shut down before this request finished (its --shutdown-timeout ran out); retry", 503)
        try:
            await super().shutdown(sockets)
        finally:
            if end is not None:
                end.cancel()
        if self.force_exit and self.server_state.tasks:
            self.app_state.end_live("the server was stopped (a forced exit) before this request finished; "
                                           "retry", 503)
            deadline = time.monotonic() + SHUTDOWN_ANSWER_MARGIN_S
            while self.server_state.tasks and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            # uvicorn skips the app's shutdown when forced: the engine was left running (the
            # learned lengths unsaved) and the lifespan cancelled with a traceback
            try:
                await asyncio.wait_for(self.lifespan.shutdown(), FORCED_STOP_S)
            except asyncio.TimeoutError:
                logger.warning("the engine did not stop within %.0f s of the forced exit; exiting without it",
                               FORCED_STOP_S)
