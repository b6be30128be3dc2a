"""Writes fastserve_jax/cost_models/opt-13b-a100.json: OPT-13B in fp16 on one A100-SXM4-80GB.

First principles (roofline) with stated efficiencies; every number is derived below, none
is measured. Run it again after changing a constant:

    python scripts/make_opt13b_cost_model.py

Model (OPT-13B, facebook/opt-13b config): 40 layers, hidden 5120, 12.85e9 parameters,
fp16 -> 25.7 GB of weights. KV per token = 2 (K and V) * 40 layers * 5120 * 2 bytes = 819,200 B.

Device (A100-SXM4-80GB datasheet): 2.039 TB/s HBM, 312 TFLOP/s dense fp16 tensor cores.

- decode launch of B sequences: reads every weight once (memory-bound) at 80% of peak
  bandwidth: 25.7e9 / 1.63e12 = 15.8 ms; plus its matmul FLOPs 2 * 12.85e9 * B at 40% of
  peak (skinny matmuls); plus 1.5 ms of launch, sampling and host overhead per launch.
  B=1: 17.5 ms, B=16: 20.6 ms. (Orca and vLLM report 13B-class decode iterations of about
  20 ms on A100s; FastServe's code uses a 10 ms base quantum.)
- decode context: each context token's K/V (819,200 B) is read once per step at the same
  80% bandwidth: 0.50 us per context token summed over the batch.
- prefill launch of N tokens: compute-bound at 60% of peak, 2 * 12.85e9 * N FLOPs
  (0.137 ms per token), never faster than reading the weights once (15.8 ms), plus the
  1.5 ms overhead. N=512: 71.8 ms, N=2048: 282.6 ms.
- prefill attention: a (query, key) token pair costs 4 * 5120 * 40 = 819,200 FLOPs
  (QK^T and AV) at 60% of peak: 4.4 ns per pair.
- KV capacity: vLLM's default 90% of the 80 GiB (85.9e9 B), minus the weights and 3 GB of
  activations and workspace: 48.6e9 B / 819,200 B = 59,300 tokens.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fastserve_jax.cost_model import SHIPPED_DIR, CostModel  # noqa: E402

PARAMS = 12.85e9
LAYERS, HIDDEN = 40, 5120
BYTES = 2                                   # fp16
HBM_BW, PEAK_FLOPS = 2.039e12, 312e12
BW_EFF, DECODE_MFU, PREFILL_MFU = 0.80, 0.40, 0.60
OVERHEAD = 1.5e-3                           # per launch: kernel launches, sampler, host
HBM_BYTES, MEM_UTIL, ACTIVATIONS = 80 * 2**30, 0.90, 3e9
PCIE_BW, PCIE_EFF, COPY_LATENCY = 32e9, 0.80, 10e-6    # PCIe 4.0 x16 per direction, pinned host memory

WEIGHT_BYTES = PARAMS * BYTES
KV_BYTES_PER_TOKEN = 2 * LAYERS * HIDDEN * BYTES
WEIGHT_READ = WEIGHT_BYTES / (HBM_BW * BW_EFF)


def decode_seconds(batch: int) -> float:
    return WEIGHT_READ + 2 * PARAMS * batch / (PEAK_FLOPS * DECODE_MFU) + OVERHEAD


def prefill_seconds(tokens: int) -> float:
    return max(WEIGHT_READ, 2 * PARAMS * tokens / (PEAK_FLOPS * PREFILL_MFU)) + OVERHEAD


def build() -> CostModel:
    pre = [1, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
    dec = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    kv_tokens = int((HBM_BYTES * MEM_UTIL - WEIGHT_BYTES - ACTIVATIONS) // KV_BYTES_PER_TOKEN)
    return CostModel(
        name="opt-13b-a100",
        prefill_tokens=tuple(pre), prefill_seconds=tuple(round(prefill_seconds(n), 6) for n in pre),
        decode_batch=tuple(dec), decode_seconds=tuple(round(decode_seconds(b), 6) for b in dec),
        decode_context=KV_BYTES_PER_TOKEN / (HBM_BW * BW_EFF),
        prefill_context=4 * HIDDEN * LAYERS / (PEAK_FLOPS * PREFILL_MFU),
        kv_capacity_tokens=kv_tokens,
        kv_bytes_per_token=KV_BYTES_PER_TOKEN,
        swap_bandwidth=PCIE_BW * PCIE_EFF,
        swap_latency=COPY_LATENCY,
        source="OPT-13B fp16 on one A100-SXM4-80GB, roofline from datasheet numbers (2.039 TB/s HBM at 80%, "
               "312 TFLOP/s fp16 at 40% for decode and 60% for prefill, 1.5 ms overhead per launch, 90% of "
               "memory minus weights and 3 GB for KV; swaps over PCIe 4.0 x16 at 80% of 32 GB/s per direction "
               "with 10 us per copy); derivation in scripts/make_opt13b_cost_model.py",
    )


if __name__ == "__main__":
    import argparse

    # no options: this only gives --help a usage text instead of writing the file
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    cm = build()
    path = os.path.join(SHIPPED_DIR, f"{cm.name}.json")
    cm.save(path)
    print(f"wrote {path}: decode B=1 {cm.decode_time(1) * 1e3:.1f} ms, B=16 {cm.decode_time(16) * 1e3:.1f} ms, "
          f"prefill 512 {cm.prefill_time(512) * 1e3:.1f} ms, 2048 {cm.prefill_time(2048) * 1e3:.1f} ms, "
          f"KV {cm.kv_capacity_tokens} tokens")
