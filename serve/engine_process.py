"""The engine in a process of its own (`serve --engine-process`), as vLLM runs its engine
core: the HTTP front end (event loop, parsing, tokenizing, streaming) and the engine loop
no longer share one GIL, so the engine's host work between device steps does not wait for
the event loop, nor the event loop for it.

    server process                                      engine process (spawned)
    event loop --send()--> writer thread --pipe-->      EngineLoop (serve/engine_loop.py)
    event loop <--call_soon_threadsafe-- reader thread <--pipe--

Commands are pickled on the caller's thread (so a command that cannot cross, e.g. a
lambda handed to `call`, fails there, at once) and written by the writer thread, so the
event loop never blocks on a full pipe. The engine process ignores SIGINT (a terminal's
Ctrl-C reaches the whole process group; the server drains and then stops it) and exits
when told to or when the server's end of the pipe closes. Told while it still warms up,
it sees a shared flag (the pipe is read only once the engine is ready) and stops at its
next compiled shape. If it dies, the reader thread
reports ("exited", message): the front end fails what was live and /health turns 503.
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import queue
import signal
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable

from fastserve_jax.serve.engine_loop import STOP, EngineInfo, EngineLoop, Event

log = logging.getLogger("fastserve_jax.serve")
_CLOSE = object()      # ends the writer thread


class _PickledCall:
    """A call's function, pickled here and unpickled only when the engine loop runs it: one
    that cannot be loaded in the engine process (its module is not importable there) fails
    that call, not the process's command pipe."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.payload = bytes(ForkingPickler.dumps(fn))
        self.name = getattr(fn, "__qualname__", type(fn).__name__)

    def __call__(self, engine) -> Any:
        try:
            fn = pickle.loads(self.payload)
        except Exception as e:  # handed back to the caller as the call's error
            raise RuntimeError(f"the engine process cannot load {self.name}: {type(e).__name__}: {e}") from None
        return fn(engine)


def _receiver(conn: Connection):
    """receive(block, timeout) over the command pipe; a closed pipe reads as ("stop",)."""
    def receive(block: bool, timeout: float | None):
        try:
            if not conn.poll(timeout if block else 0):
                return None
            return conn.recv()
        except (EOFError, OSError):
            return STOP
    return receive


def _sender(conn: Connection) -> Callable[[Event], None]:
    def emit(event: Event) -> None:
        try:
            payload = ForkingPickler.dumps(event)
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            if event[0] != "result":
                raise
            # a call's value or error that cannot cross the pipe: the caller gets why
            payload = ForkingPickler.dumps(("result", event[1], None, RuntimeError(
                f"the result of the engine call cannot be sent to the server process: {type(e).__name__}: {e}")))
        conn.send_bytes(payload)
    return emit


def engine_process_main(build: Callable[[Callable[[], bool]], Any], commands: Connection, events: Connection,
                        log_level: int, stopping) -> None:
    """The spawned process's entry point; `stopping`: a multiprocessing Event the server sets
    with ("stop",)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s [engine]: %(message)s")
    try:
        EngineLoop(build, _sender(events), view=EngineInfo.of, stopping=stopping.is_set).run(_receiver(commands))
    except (BrokenPipeError, EOFError):   # the server went away mid-send: nothing is left to answer
        log.warning("the server process closed its pipe; the engine process exits")
    finally:
        events.close()


class ProcessTransport:
    """The server's side of an engine process."""

    def __init__(self, build: Callable[[Callable[[], bool]], Any]) -> None:
        self.build = build
        self.proc: multiprocessing.process.BaseProcess | None = None
        self._stopping = None           # a multiprocessing Event, made with the process
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        # the reader and stop() both wait for the process: in two threads at once, the one whose
        # waitpid lost the race (ECHILD) saw it alive, and stop() warned "still busy" 1 s in
        self._reaping = threading.Lock()

    def spawn(self) -> None:
        """Start the engine process (once). serve calls this before it imports and sets up the
        app, so the two processes start up side by side; events wait in the pipe until `start`."""
        if self.proc is not None:
            return
        ctx = multiprocessing.get_context("spawn")      # JAX and fork do not mix
        cmd_recv, self._cmd_send = ctx.Pipe(duplex=False)
        self._ev_recv, ev_send = ctx.Pipe(duplex=False)
        self._stopping = ctx.Event()
        self.proc = ctx.Process(target=engine_process_main, name="fastserve-engine", daemon=True,
                                args=(self.build, cmd_recv, ev_send, logging.getLogger().getEffectiveLevel(),
                                      self._stopping))
        self.proc.start()
        cmd_recv.close()
        ev_send.close()

    def start(self, on_event: Callable[[Event], None]) -> None:
        self.spawn()
        threading.Thread(target=self._write, args=(self._cmd_send,), name="fastserve-engine-writer",
                         daemon=True).start()
        threading.Thread(target=self._read, args=(self._ev_recv, on_event), name="fastserve-engine-reader",
                         daemon=True).start()

    def send(self, cmd: tuple) -> None:
        if cmd == STOP and self._stopping is not None:
            self._stopping.set()        # a build still warming up stops at its next shape
        if cmd[0] == "call":
            cmd = (*cmd[:2], _PickledCall(cmd[2]))
        self._out.put(ForkingPickler.dumps(cmd))

    def _write(self, conn: Connection) -> None:
        while (payload := self._out.get()) is not _CLOSE:
            try:
                conn.send_bytes(payload)
            except OSError:      # the engine process is gone; the reader reports it
                break
        conn.close()

    def _read(self, conn: Connection, on_event: Callable[[Event], None]) -> None:
        while True:
            try:
                event = conn.recv()
            except (EOFError, OSError):
                break
            on_event(event)
        with self._reaping:
            self.proc.join(5)
            code = self.proc.exitcode
        on_event(("exited", "the engine process exited" + (f" with code {code}" if code else "")))

    def join(self, timeout: float) -> bool:
        """Wait for the process to end after ("stop",); True if it did."""
        self._out.put(_CLOSE)
        deadline = time.monotonic() + timeout
        if not self._reaping.acquire(timeout=timeout):
            return False
        try:
            self.proc.join(max(0.0, deadline - time.monotonic()))
            return not self.proc.is_alive()
        finally:
            self._reaping.release()
