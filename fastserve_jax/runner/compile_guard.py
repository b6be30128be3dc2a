"""Count XLA compilations, so that tests can assert nothing compiles after warm-up.

Every compilation, including one served from the persistent cache, lowers a jaxpr to an
MLIR module first; we count those events through `jax.monitoring`.
"""

from __future__ import annotations

import threading

from jax import monitoring

_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_lock = threading.Lock()
_count = 0
_registered = False


def _listener(name: str, duration: float, **kwargs) -> None:
    global _count
    if name == _EVENT:
        with _lock:
            _count += 1


def compilation_count() -> int:
    """Compilations in this process since the first call of this function."""
    global _registered
    with _lock:
        if not _registered:
            monitoring.register_event_duration_secs_listener(_listener)
            _registered = True
        return _count


class CompileCounter:
    """`with CompileCounter() as c: ...; assert c.count == 0`."""

    def __enter__(self) -> "CompileCounter":
        self._start = compilation_count()
        self.count = 0
        return self

    def __exit__(self, *exc) -> None:
        self.count = compilation_count() - self._start
