"""Ctrl-C while `LLM.generate` steps the engine, taken between steps.

A KeyboardInterrupt raised at an arbitrary bytecode could land after a compiled step had
taken (donated) the KV cache and before the new one was stored, leaving every later generate
failing on a deleted buffer; or inside add_request or a request's finish, leaving a request
that never ran or a detokenizer gone (until 2026-12-07). So, on the main thread and where
SIGINT has Python's default handler, the first Ctrl-C is noted and raised at the next check
between steps; a second one is raised at once (the caller insists; the LLM may then be left
unusable, and a new one is the way out). A KV cache lost that way, or to an exception from
the caller's own signal handler (not deferred), is made anew when the interrupted generate
aborts its requests (LLM._run, ModelRunner.restore_lost_caches; until 2026-12-07 every later
generate failed on the deleted buffer)."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Callable, Iterator

log = logging.getLogger("fastserve_jax")


@contextlib.contextmanager
def interrupts_between_steps() -> Iterator[Callable[[], None]]:
    """Yields `check()`, which raises KeyboardInterrupt if a Ctrl-C came since the block began.
    Elsewhere than the main thread, or under a SIGINT handler of the caller's own, nothing is
    deferred and `check` does nothing."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield lambda: None
        return
    came: list[int] = []

    def noted(signum, frame) -> None:
        if came:
            raise KeyboardInterrupt
        came.append(signum)
        log.warning("interrupted: generate stops after this step (Ctrl-C again to stop at once, which may "
                    "leave this LLM unusable)")

    def check() -> None:
        if came:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, noted)
    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, previous)
