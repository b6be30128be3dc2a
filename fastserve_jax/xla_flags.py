"""XLA CPU settings that the engine wants, applied before the backend starts.

On jaxlib 0.10, XLA:CPU's experimental YNNPACK fusion ran the compiled decode forward of a
125M Llama at batch 32 slower than the default dot emitter (two A/B pairs on a busy 2-core
machine: 123-143 ms without it against 159-190 ms with it; at the level of a whole
engine step the difference was inside the machine's noise). Turning it off changes no
results. Only set for
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
