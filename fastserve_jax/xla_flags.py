"""XLA CPU settings that the engine wants, applied before the backend starts.

On jaxlib 0.10, XLA:CPU's experimental YNNPACK fusion runs the skinny matmuls of a decode
step (batch 32 x hidden 768) 20-30% slower than the default dot emitter; measured with
scripts/bench_engine.py on a 125M Llama. Turning it off changes no results. Only set for
the jaxlib line where it was measured (an unknown flag aborts XLA), only when the user
has not set it, and only takes effect if no computation has run yet in this process.
"""

from __future__ import annotations

import os

_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def apply_cpu_defaults() -> None:
    import jaxlib

    if not jaxlib.__version__.startswith("0.10."):
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if _FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {_FLAG}=".strip()
