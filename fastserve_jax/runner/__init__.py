"""The device side: launches in, sampled tokens out, KV copies between the pools.

The runner's contract with the engine (the way scheduler/base.py states the scheduler's):

- `build_launches(scheduled, kv) -> [Launch]`: the plan's requests as padded host arrays
  (launch.py, numpy only). Every launch's key is one warm-up compiled.
- `dispatch(launches, batch_id) -> pending`: queues every launch through every pipeline
  stage and into the sampler, asynchronously; each stage's KV cache is donated and
  replaced, never copied. `collect(launches, pending)` waits and returns one
  (request, token, logprobs) per sampled row; rows of aborted requests are dropped.
- `swaps` (None without a host pool): `swap_out`, `swap_in_now`, `start_swap_in`, `land`,
  `discard` on (request id, device blocks) moves (swap_ops.py over kv_transfer.py). The
  engine issues them in kv_plan.py's order, and device work runs in issue order, so a copy
  never races the step that reads or reuses its blocks.
- `warmup()` compiles every launch, sampler and swap shape (compiler.py); afterwards serving
  compiles nothing but the prompt-logprobs prefill variant, at its first use. A full one then runs each program once on padding (`run_once`; a
  program's first run costs more than the next); after a background one, an idle engine
  runs the programs that have not run (`first_runs_pending`, `run_pending`).
  `executable(key)` and `sampler(key)` look compiled functions up by their typed keys
  (keys.py).
- `mirror`: on a multi-host leader, called with every device operation before it is issued;
  a worker applies them in the same order with `replay` (fastserve_jax/multihost.py).

Files: keys.py (typed keys), launch.py (assembly), compiler.py (warm-up, with
persistent_cache.py and export_cache.py, the traced programs kept on disk; compile_guard.py
counts compiles for tests), model_runner.py (execution and sampling), token_box.py (async
scheduling's sampled tokens kept on the device), kv_transfer.py and swap_ops.py (KV copies).
"""

from fastserve_jax.runner.model_runner import ModelRunner, fetch

__all__ = ["ModelRunner", "fetch"]
