"""XLA:CPU compiler options per launch shape, given to each executable at warm-up.

On jaxlib 0.10, XLA:CPU hands dots to YNNPACK by default. That suits a prefill launch
and hurts a decode launch of a few rows. Measured on the 125M Llama of
`scripts/bench_engine.py` on a 2-core AMD EPYC, both settings compiled into one process
and timed in 8-10 interleaved rounds (median launch time with YNNPACK's fusions off,
divided by the default's; ranges are over repeated runs):

    decode  32 rows x 4 blocks: 0.76-0.87      prefill  64 tokens: 1.14
    decode  32 rows x 16 blocks: 0.83-0.90     prefill 128 tokens: 1.01
    decode  64 rows x 4 blocks: 1.02           prefill 256 tokens: 1.03
    decode 128 rows x 4 blocks: 1.12           prefill 512 tokens: 1.07-1.08

So launches of at most `SMALL_LAUNCH_TOKENS` tokens compile with YNNPACK's fusions off
(XLA then runs their dots through Eigen) and every other launch keeps the default. The
choice is made per executable (`compiler_options`), not through the process-wide
`XLA_FLAGS`: it holds whatever imported jax first, and the two kinds of launch want
different settings. The two settings' logits agree within float32 rounding (max abs
difference 6e-6 to 9e-6 over the decode and prefill launches timed above). A user's own `XLA_FLAGS` setting of the flag wins.
Other jaxlib lines get no options: an unknown option is an error there, and the trade
has not been measured.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os

YNN_FUSION = "xla_cpu_experimental_ynn_fusion_type"
SMALL_LAUNCH_TOKENS = 32


@functools.cache
def _jaxlib_version() -> str:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return ""


def launch_compiler_options(platform: str, tokens: int) -> dict[str, str]:
    """Compiler options for a launch of `tokens` query tokens on `platform`."""
    if platform != "cpu" or tokens > SMALL_LAUNCH_TOKENS:
        return {}
    if not _jaxlib_version().startswith("0.10.") or YNN_FUSION in os.environ.get("XLA_FLAGS", ""):
        return {}
    return {YNN_FUSION: ""}
