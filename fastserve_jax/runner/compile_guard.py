"""Count XLA compilations and persistent-cache hits, through `jax.monitoring`.

Every compilation, including one served from the persistent cache, lowers a jaxpr to an
MLIR module first; tests count those events to assert nothing compiles after warm-up. The
persistent cache reports a hit or a miss per executable it is asked for; startup reports
the hit rate from those.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from jax import monitoring

_LOWERED = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_BACKEND = "/jax/core/compile/backend_compile_duration"
_HIT = "/jax/compilation_cache/cache_hits"
_MISS = "/jax/compilation_cache/cache_misses"


@dataclass
class CompileStats:
    """Process-wide totals since the listeners were registered (the first `compile_stats()`)."""

    compilations: int = 0          # lowerings (one per executable built, cached or not)
    cache_hits: int = 0
    cache_misses: int = 0
    backend_seconds: float = 0.0   # XLA's compile time (threads overlap, so this can exceed wall time)

    def since(self, start: "CompileStats") -> "CompileStats":
        return CompileStats(self.compilations - start.compilations, self.cache_hits - start.cache_hits,
                            self.cache_misses - start.cache_misses, self.backend_seconds - start.backend_seconds)

    def describe(self) -> str:
        asked = self.cache_hits + self.cache_misses
        cache = f", {self.cache_hits}/{asked} from the persistent cache" if asked else ""
        return f"{self.compilations} executable{'s' * (self.compilations != 1)}{cache}"


_lock = threading.Lock()
_totals = CompileStats()
_registered = False


_by_thread: dict[int, int] = {}     # thread ident -> lowerings on it (the listener runs on the compiling thread)


def _duration(name: str, duration: float, **kwargs) -> None:
    with _lock:
        if name == _LOWERED:
            _totals.compilations += 1
            ident = threading.get_ident()
            _by_thread[ident] = _by_thread.get(ident, 0) + 1
        elif name == _BACKEND:
            _totals.backend_seconds += duration


def _event(name: str, **kwargs) -> None:
    with _lock:
        if name == _HIT:
            _totals.cache_hits += 1
        elif name == _MISS:
            _totals.cache_misses += 1


def discount_export() -> None:
    """An export (export_cache.py) lowers once to serialize the program and again to build the
    executable; only the second makes an executable, so the first is not counted."""
    with _lock:
        if _registered:
            _totals.compilations -= 1


def compile_stats() -> CompileStats:
    """A copy of the totals; registers the listeners on first use."""
    global _registered
    with _lock:
        if not _registered:
            monitoring.register_event_duration_secs_listener(_duration)
            monitoring.register_event_listener(_event)
            _registered = True
        return CompileStats(**vars(_totals))


def compilation_count() -> int:
    """Compilations in this process since the first call of this function."""
    return compile_stats().compilations


class CompileCounter:
    """`with CompileCounter() as c: ...; assert c.count == 0`. `this_thread`: count only the
    compilations on the calling thread, not the process's: an engine fully warmed up compiles
    nowhere else, while another engine's background warm-up (one a test before left running,
    say) may compile on its own thread at any time."""

    def __init__(self, this_thread: bool = False) -> None:
        self.this_thread = this_thread

    def _now(self) -> int:
        total = compilation_count()          # registers the listeners on first use
        return _by_thread.get(threading.get_ident(), 0) if self.this_thread else total

    def __enter__(self) -> "CompileCounter":
        self._start = self._now()
        self.count = 0
        return self

    def __exit__(self, *exc) -> None:
        self.count = self._now() - self._start
