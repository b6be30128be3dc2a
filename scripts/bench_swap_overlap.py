"""Do swap copies overlap the steps? Each copy path, timed with and without a step running.

The engine issues a request's swap-out (gather, then to host memory) and swap-in (to device
memory, then a donated scatter) between its steps and does not wait for them. Whether the
copies then cost the steps anything depends on the path (kv_transfer.FUSED_MAX_BYTES):
`jax.device_put`s may run on the runtime's transfer streams beside the next step, while copies
fused into the compiled gather and scatter (small swaps' path) are part of calls that run in order
with the steps. This script measures it on this backend for both paths, on a 7B-shaped cache
(32 layers, 8 KV heads of 128, float32, blocks of 16 tokens): per iteration it issues a
stand-in step (a chain of matmuls, its size set so it takes a few milliseconds on the
machine), the swap-out of `--blocks` blocks and the swap-in of the blocks swapped out one
iteration before (issued one iteration, landed the next, as proactive swapping does). Three
timings per path, each the best of `--repeats` loops of `--iterations`:

    steps    the steps alone          copies   the copies alone          both   the two together

overlap = (steps + copies - both) / min(steps, copies): 1 when the copies hide entirely behind
the steps, 0 when the two run one after the other.

    python scripts/bench_swap_overlap.py                        # both paths, 64 blocks
    python scripts/bench_swap_overlap.py --blocks 16 --matmul 1024 --iterations 5   # a quick look on a CPU
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from fastserve_jax.models.attention import KVCache  # noqa: E402
from fastserve_jax.runner import kv_transfer  # noqa: E402
from fastserve_jax.runner.compiler import run_jobs  # noqa: E402

L, BS, H, D = 32, 16, 8, 128


def transfer_for(path: str, sharding, blocks: int, shape: tuple[int, ...]) -> kv_transfer.KVTransfer:
    """A KVTransfer whose swaps all take the given copy path: 'fused' or 'device_put'."""
    with kv_transfer.forced_copy_path(path):
        return kv_transfer.KVTransfer([sharding], blocks, 2 * L * BS * H * D * 4, shape)


def measure(path: str, a) -> dict:
    sharding = NamedSharding(Mesh(np.array(jax.devices()[:1]), ("x",)), PartitionSpec())
    n = a.blocks
    shape = (L, 2 * n + 1, BS, H, D)
    cache = KVCache(jnp.ones(shape, jnp.float32, device=sharding), jnp.ones(shape, jnp.float32, device=sharding))
    t = transfer_for(path, sharding, n, shape)
    run_jobs(t.compile_jobs([cache]))
    out_ids, in_ids = tuple(range(1, n + 1)), tuple(range(n + 1, 2 * n + 1))
    m = jnp.ones((a.matmul, a.matmul), jnp.bfloat16, device=sharding) / a.matmul

    @jax.jit
    def step(x):
        for _ in range(a.chain):
            x = jnp.tanh(x @ x)
        return x

    step(m).block_until_ready()
    state = {"cache": cache, "m": m, "i": 0}

    def one(with_step: bool, with_copies: bool) -> None:
        i = state["i"]
        state["i"] += 1
        if with_step:
            state["m"] = step(state["m"])
        if with_copies:
            if f"r{i - 1}" in t._uploads:                  # landed one iteration after it was issued
                [state["cache"]] = t.land_swap_in([state["cache"]], f"r{i - 1}")
            t.swap_out([state["cache"]], f"r{i}", out_ids)
            t.start_swap_in(f"r{i}", in_ids)

    def loop(with_step: bool, with_copies: bool) -> float:
        best = float("inf")
        for _ in range(a.repeats + 1):                     # the first is warm-up
            t0 = time.perf_counter()
            for _ in range(a.iterations):
                one(with_step, with_copies)
            for rid in list(t._uploads):
                [state["cache"]] = t.land_swap_in([state["cache"]], rid)
            jax.block_until_ready((state["m"], state["cache"]))
            best = min(best, time.perf_counter() - t0)
        return best / a.iterations

    res = dict(steps=loop(True, False), copies=loop(False, True), both=loop(True, True), fused=t.fused(n))
    res["overlap"] = (res["steps"] + res["copies"] - res["both"]) / min(res["steps"], res["copies"])
    res["gbs"] = 2 * n * t.block_bytes / res["copies"] / 1e9
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=64, help="blocks swapped out and in per iteration (4.2 MB each)")
    ap.add_argument("--matmul", type=int, default=8192, help="the stand-in step's square bfloat16 matrix")
    ap.add_argument("--chain", type=int, default=4, help="matmuls per step")
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--path", action="append", choices=["device_put", "fused"])
    a = ap.parse_args(argv)
    mb = a.blocks * 2 * L * BS * H * D * 4 / 1e6
    print(f"{jax.devices()[0].device_kind}: per iteration a step of {a.chain} {a.matmul}^2 bf16 matmuls, "
          f"{a.blocks} blocks ({mb:.0f} MB) out and as many in; ms per iteration, best of {a.repeats} "
          f"loops of {a.iterations}")
    for path in a.path or ["device_put", "fused"]:
        try:
            r = measure(path, a)
        except Exception as e:                              # a path may not compile on this backend
            print(f"  {path:10} failed: {type(e).__name__}: {e}"[:400])
            continue
        print(f"  {path:10} steps {r['steps'] * 1e3:7.2f}  copies {r['copies'] * 1e3:7.2f} ({r['gbs']:.1f} GB/s "
              f"both ways)  both {r['both'] * 1e3:7.2f}  overlap {r['overlap']:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
