#!/usr/bin/env bash
# The swap checks for a lent GPU machine (the device tool), at most 510 s on one H200: the
# copy path on a 7B-shaped cache forced through device_put copies and through fused ones,
# whether each overlaps a step (bench_swap_overlap.py, large and small swaps), and
# bench_swap_host.py's burst (3 rounds: skip-join/proactive with the backend's choice of copy
# path and with either forced, skip-join/recompute and fcfs/recompute, with the swap path's
# host time and the medians).
# `--all` adds the parts of 2026-12-04's first runs: bench_swap_burst's burst and bench_swap's
# tight-pool engine part (270 s more). Each part has its own time limit, so a slow one leaves
# the others' logs. Carry the trace
# (an ignored copy in the checkout, e.g. .bench/azure_conv_2023.csv: the machine has no
# ../shared) and run from the root:
#
#     scripts/device_swap_check.sh .bench/azure_conv_2023.csv [--all]     # logs under $OUT
#
# The figures of 2026-12-04 are in docs/swapping.md ("On an accelerator").
set -uo pipefail
TRACE=${1:?the trace csv}
OUT=${OUT:-out/device_swap}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.
part() {            # part NAME SECONDS COMMAND...: its output, less XLA's timer and host-offload warnings, to NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name: $* (limit ${limit} s, $(date -u +%H:%M:%S) UTC)"
    timeout "$limit" "$@" 2>&1 | grep -v "cuda_timer\|host_offloader" | tee "$OUT/$name.log"
}
nvidia-smi -L 2>/dev/null
python -c "import jax; print('jax', jax.__version__, jax.devices())"
part copy 60 python scripts/bench_swap.py --part copy --copy-blocks 128 --copy-path device_put \
    --json "$OUT/copy.json"
part copy_fused 60 python scripts/bench_swap.py --part copy --copy-blocks 128 --copy-path fused \
    --json "$OUT/copy_fused.json"
part overlap 60 python scripts/bench_swap_overlap.py --blocks 64
part overlap_small 30 python scripts/bench_swap_overlap.py --blocks 8 --matmul 4096 --chain 2
# the swap path's host time, and whether fused copies help or hurt on this backend
part host 300 python scripts/bench_swap_host.py --rounds 3 --fcfs --trace "$TRACE"
if [ "${2:-}" = "--all" ]; then
    part burst 150 python scripts/bench_swap_burst.py --rate 300 --rounds 3 --trace "$TRACE"
    part engine 120 python scripts/bench_swap.py --part engine --trace "$TRACE" --num-requests 80 \
        --json "$OUT/engine.json"
fi
