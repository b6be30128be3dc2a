"""Fuzz the engine's scheduling, swapping and aborts against an ample-memory reference.

Each seed draws an engine (device pool of 4-40 blocks of 8 tokens, host pool of 0-120
blocks, every swap policy, every policy but `predictive`, 2-8 sequences, a 16-64 token
budget, async scheduling on or off, the swap copies fused as on the CPU or only for swaps
of up to 0-4 blocks as on accelerators) and 2-9 greedy requests that each fit the pool, serves
them while aborting a random live request now and then. About LEARNED_SHARE of the seeds
instead serve 60-90 templated requests (answer lengths that follow prompt lengths) under
skip-join, gittins or predictive with thresholds the tiny model reaches, so that the learned
paths run too: learned lengths, protected decodes, the tail guard, starvation promotion,
the prompt-length gate with predicted joins and rankings (the line says which were reached).
It checks:

- the KV ledger after every step and every abort (KVManager.check_integrity);
- that the engine finishes within 4,000 steps, 60 per request in the templated seeds (no
  livelock or deadlock);
- that both pools end empty and no batch is left in flight (an abort of the last live request
  collects what is in flight);
- every request not aborted gets the tokens of an fcfs engine whose pool holds everything,
  up to a tie: where the two first differ, the reference's top two tokens must be this
  run's token and the reference's, with logprobs within TIE (a near-tie's argmax can flip
  when a recomputation or another batch sums in another order); the rest of that request
  is then not compared.
- about PROMPT_SHARE of the requests ask for prompt logprobs: one per prompt token, each
  within PROMPT_TOL of the reference's, however their prefill was chunked, preempted,
  swapped or recomputed.

About CACHING_SHARE of the seeds serve with prefix caching (the reference without): prompts
behind two shared stems of 1-3 blocks, often one token past a block boundary, and copies of
earlier prompts, half of the requests with one of two `cache_salt`s. (Until 2026-12-06 no seed
drew it, and a bug of that day, the second of two copies one token past a block boundary
reading blocks its own step had not written yet, was found by a one-off fuzzer;
tests/test_prefix_cache.py.)

About SAMPLING_SHARE of the seeds (a stream of their own; the other seeds draw as before) serve
half of their requests as seeded samples at temperature 0.7-1.3, and some with n 2-3 (n copies
of the prompt added together, seeds seed, seed + 1, ..., as the server and LLM.generate add
them). A seeded sample draws the same tokens in any batch, so it is compared with the
reference's the same way; its near-tie is one of the noisy scores the sampler compares
(logprob / temperature + that step's Gumbel noise, recomputed here; mismatch()).

    python scripts/fuzz_engine.py 0 200           # seeds 0..199; prints one line per seed
    python scripts/fuzz_engine.py 0 200 --jobs 2

It uses a random-weight tiny Llama (models/random_checkpoint.py). Exit status 1 if any
seed failed. scripts/fuzz_parallel.py runs the same seeds under tensor and pipeline parallelism.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import os
import random
import sys
import tempfile
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

TIE = 1e-4
# The share of seeds that exercise the policies' learned paths (learned lengths, protected
# decodes, the prompt-length gate and predicted joins, predictive's own predictions): many
# templated requests, a policy that learns, thresholds the tiny model reaches (templated()).
LEARNED_SHARE = 0.3
LEARNED_POLICIES = ("skip-join-mlfq", "gittins", "predictive")
LEARNED_REQUESTS = (60, 90)
LEARNED_ABORTS = 0.01     # per step (0.04 otherwise): most of the requests finish, and teach
PROMPT_SHARE = 0.3        # of the requests ask for prompt logprobs (PROMPT_TOP), checked against the
PROMPT_TOP = 2            # reference's within PROMPT_TOL
PROMPT_TOL = 1e-3
CACHING_SHARE = 0.4
SAMPLING_SHARE = 0.35
BASE = dict(max_model_len=256, block_size=8, warmup=False,
            decode_batch_buckets=(2, 8), prefill_token_buckets=(16, 64), block_buckets=(8, 48))
_checkpoint: str | None = None


def checkpoint() -> str:
    global _checkpoint
    if _checkpoint is None:
        from fastserve_jax.models.random_checkpoint import make_random_checkpoint
        _checkpoint = make_random_checkpoint(os.path.join(tempfile.mkdtemp(prefix="fuzz-engine-"), "llama"), "llama")
    return _checkpoint


def draw(seed: int) -> tuple[dict, list[list[int]], list[int], list[tuple[float, int | None]]]:
    """(engine options, prompts, max_tokens, (temperature, seed) per request) for one seed."""
    rng = random.Random(seed)
    blocks = rng.randint(4, 40)
    cfg = dict(max_num_seqs=rng.choice([2, 4, 8]), max_num_batched_tokens=rng.choice([16, 32, 64]),
               num_device_blocks=blocks, num_host_blocks=rng.choice([0, 6, 30, 120]),
               swap_policy=rng.choice(["proactive", "reactive", "recompute"]),
               scheduler=rng.choice(["fcfs", "mlfq", "skip-join-mlfq", "gittins", "srpt"]),
               async_scheduling=rng.random() < 0.6)
    prompts, maxes = [], []
    for _ in range(rng.randint(2, 9)):
        p, m = rng.randint(1, 60), rng.randint(1, 40)
        while -(-(p + m) // 8) > blocks - 1 and p + m > 2:      # the request must fit the pool
            p, m = max(1, p // 2), max(1, m // 2)
        prompts.append([rng.randint(3, 250) for _ in range(p)])
        maxes.append(m)
    # the swap copy path: None keeps the backend's (the CPU fuses every swap); k fuses swaps of
    # at most k blocks and sends larger ones by device_put, as accelerators do (0: none fused)
    cfg["fused_blocks"] = rng.choice([None, 0, 2, 4])
    learned = random.Random(seed + 2 * 10**6)      # its own stream: the other seeds draw as before
    if learned.random() < LEARNED_SHARE:
        prompts, maxes = templated(learned, blocks)
        cfg["scheduler"] = learned.choice(LEARNED_POLICIES)
        cfg["scheduler_config"] = learned_config(learned)
    caching = random.Random(seed + 4 * 10**6)
    if caching.random() < CACHING_SHARE:
        cfg["enable_prefix_caching"] = True
        prompts, maxes = shared(caching, prompts, maxes, blocks)
    params = [(0.0, None)] * len(prompts)
    sampling = random.Random(seed + 6 * 10**6)
    if sampling.random() < SAMPLING_SHARE:
        prompts, maxes, params = sampled(sampling, prompts, maxes)
    return cfg, prompts, maxes, params


def sampled(rng: random.Random, prompts: list[list[int]], maxes: list[int]):
    """The sampling seeds' requests: half of them seeded samples at temperature 0.7-1.3, and
    some with n 2-3 (the server's and LLM.generate's rule: n requests of the prompt added
    together, seeds seed, seed + 1, ...)."""
    out, ms, params = [], [], []
    for p, m in zip(prompts, maxes):
        t, s = (rng.choice([0.7, 1.0, 1.3]), rng.randint(0, 2**32 - 1)) if rng.random() < 0.5 else (0.0, None)
        n = rng.choice([2, 3]) if rng.random() < 0.2 else 1
        for j in range(n):
            out.append(p)
            ms.append(m)
            params.append((t, None if s is None else (s + j) % 2**32))
    return out, ms, params


def shared(rng: random.Random, prompts: list[list[int]], maxes: list[int], blocks: int):
    """The caching seeds' prompts: most behind one of two stems (a few tokens of their own
    after it, or none), some a copy of an earlier one; each fits the pool."""
    stems = [[rng.randint(3, 250) for _ in range(8 * rng.randint(1, 3) + rng.choice([0, 1, 1]))] for _ in range(2)]
    out, ms = [], []
    for p, m in zip(prompts, maxes):
        r = rng.random()
        if out and r < 0.4:
            q = list(rng.choice(out))
        elif r < 0.85:
            q = rng.choice(stems) + p[:rng.choice([0, 0, 2, 5])]
        else:
            q = p
        while -(-(len(q) + m) // 8) > blocks - 1 and len(q) + m > 2:
            q, m = q[:max(1, len(q) // 2)], max(1, m // 2)
        out.append(q)
        ms.append(m)
    return out, ms


def templated(rng: random.Random, blocks: int) -> tuple[list[list[int]], list[int]]:
    """LEARNED_REQUESTS requests from two or three "applications", each a range of prompt
    lengths with its own answer length (plus a little noise), so that answer lengths follow
    prompt lengths and the prompt-length gate (scheduler/prompt_lengths.py) can open once
    MIN_ROWS have finished; each fits the pool."""
    apps = [(rng.randint(1, 40), rng.randint(1, 30)) for _ in range(rng.randint(2, 3))]
    prompts, maxes = [], []
    for _ in range(rng.randint(*LEARNED_REQUESTS)):
        base_p, base_m = rng.choice(apps)
        p, m = base_p + rng.randint(0, 6), max(1, base_m + rng.randint(-2, 2))
        while -(-(p + m) // 8) > blocks - 1 and p + m > 2:
            p, m = max(1, p // 2), max(1, m // 2)
        prompts.append([rng.randint(3, 250) for _ in range(p)])
        maxes.append(m)
    return prompts, maxes


def learned_config(rng: random.Random):
    """A SchedulerConfig whose learned paths start within a few dozen finishes (the defaults
    wait for 16-50) and whose starvation limits and tail guard fire on the tiny model's
    millisecond iterations."""
    from fastserve_jax.config import SchedulerConfig

    return SchedulerConfig(gittins_min_samples=rng.randint(4, 12), gittins_refresh=rng.randint(1, 5),
                           protect_min_samples=rng.randint(2, 8), predictive_min_samples=rng.randint(2, 6),
                           starvation_threshold=rng.choice([0.0, 0.002, 0.02, 10.0]),
                           gittins_starvation_threshold=rng.choice([0.0, 0.004, 0.04, 20.0]),
                           tail_slowdown=rng.choice([0.0, 1.0, 5.0]), protect_decodes=rng.random() < 0.8,
                           prompt_neighbors=rng.choice([0, 4, 16]))


def reference(prompts, maxes, params, path: str | None = None):
    from fastserve_jax import LLM, SamplingParams

    llm = LLM(path or checkpoint(), num_device_blocks=200, scheduler="fcfs", max_num_seqs=8, max_num_batched_tokens=64, **BASE)
    return llm.generate(prompts, [SamplingParams(max_tokens=m, temperature=t, seed=s, ignore_eos=True, logprobs=2,
                                                 prompt_logprobs=PROMPT_TOP) for m, (t, s) in zip(maxes, params)])


def gumbel(seed: int, step: int, vocab: int):
    """The sampler's Gumbel noise for a seeded request's `step`th token (sampling_draw.draw)."""
    import jax
    import numpy as np

    key = jax.random.fold_in(jax.random.key(np.uint32(seed)), np.int32(step))
    return np.asarray(jax.random.gumbel(key, (vocab,), jax.numpy.float32))


def prompt_mismatch(got, ref) -> str | None:
    """None if a request's prompt logprobs are the reference's (each prompt token's logprob
    within PROMPT_TOL: another batch or a recomputation sums in another order), else why not."""
    if len(got) != len(ref.prompt_logprobs) or got[0] is not None:
        return f"{len(got)} prompt logprobs against {len(ref.prompt_logprobs)}, first {got[0]}"
    for k, (a, b) in enumerate(zip(got[1:], ref.prompt_logprobs[1:]), 1):
        if a.token_id != b.token_id or abs(a.logprob - b.logprob) > PROMPT_TOL or len(a.top) != PROMPT_TOP:
            return f"prompt logprob {k}: {a} against {b}"
    return None


def mismatch(got: list[int], ref, sampled: tuple[float, int, list, int] | None = None) -> str | None:
    """None if `got` is the reference's tokens up to a tie (module docstring), else why not.
    A seeded sample (`sampled`: temperature, seed, this run's logprobs, vocabulary size) ties
    where the two tokens' noisy scores, logprob / temperature + the step's Gumbel noise, are
    within 2 TIE / temperature (the logprob of this run's token is this run's)."""
    for k, (a, b) in enumerate(zip(got, ref.token_ids)):
        if a != b:
            top = ref.logprobs[k].top
            if sampled is None and a in top and abs(top[a] - top[b]) <= TIE:
                return None
            if sampled is not None:
                t, s, lps, vocab = sampled
                g = gumbel(s, k, vocab)
                gap = abs((lps[k].logprob - ref.logprobs[k].logprob) / t + g[a] - g[b])
                if gap <= 2 * TIE / t:
                    return None
                top = f"{top}, noisy scores {gap:.3g} apart"
            return f"token {k}: {a} against {b} (reference top: {top})"
    return None if len(got) == len(ref.token_ids) else f"{len(got)} tokens against {len(ref.token_ids)}"


def run_seed(seed: int) -> str:
    """One seed; returns a summary line, raises on a failed check."""
    return check_seed(seed, *draw(seed), checkpoint())


def check_seed(seed: int, cfg: dict, prompts: list[list[int]], maxes: list[int], params: list[tuple[float, int | None]],
               path: str, **engine) -> str:
    """Serve one drawn seed on the model at `path` (`engine`: more engine options, e.g. a mesh)
    and check it against the ample single-device run; returns the summary line."""
    from fastserve_jax import LLM, SamplingParams
    from fastserve_jax.request import RequestStatus

    refs = reference(prompts, maxes, params, path)
    cfg = dict(cfg)
    fused_blocks = cfg.pop("fused_blocks")
    e = LLM(path, **BASE, **cfg, **engine).engine
    t = e.runner.transfer
    if t is not None and fused_blocks is not None:       # no warm-up (BASE): the copies compile as they come
        t.fused_max_bytes = fused_blocks * t._block_share(e.runner.caches)
    rng = random.Random(seed + 10**6)
    asks = random.Random(seed + 3 * 10**6)     # which requests ask for prompt logprobs (PROMPT_SHARE)
    salts = random.Random(seed + 5 * 10**6)    # and, caching, which share blocks only within a salt
    caching = e.cfg.enable_prefix_caching
    reqs = [e.add_request(p, SamplingParams(max_tokens=m, temperature=t, seed=s, ignore_eos=True, logprobs=0 if t else None,
                                            cache_salt=salts.choice([None, None, "a", "b"]) if caching else None,
                                            prompt_logprobs=PROMPT_TOP if asks.random() < PROMPT_SHARE else None))
            for p, m, (t, s) in zip(prompts, maxes, params)]
    aborted: set[str] = set()
    hit_in_flight = 0                          # aborts of a request whose batch was not collected yet
    steps, limit = 0, max(4000, 60 * len(reqs))
    while e.has_unfinished():
        e.step()
        steps += 1
        e.kv.check_integrity()
        if rng.random() < (LEARNED_ABORTS if "scheduler_config" in cfg else 0.04):
            live = [r for r in reqs if r.status is not RequestStatus.FINISHED]
            if live:
                r = rng.choice(live)
                hit_in_flight += any(x.request is r for f in e._inflight for x in f.plan.scheduled)
                e.abort(r.request_id)
                aborted.add(r.request_id)
                e.kv.check_integrity()
        if steps > limit:
            raise RuntimeError(f"seed {seed}: not finished after {limit} steps ({cfg})")
    checked = [r for r in reqs if r.request_id not in aborted and r.prompt_logprobs is not None]
    vocab = e.model_cfg.vocab_size
    for r, ref, (t, s) in zip(reqs, refs, params):
        why = None if r.request_id in aborted else mismatch(r.output_token_ids, ref, (t, s, r.logprobs, vocab) if t else None)
        if why is None and r.request_id not in aborted and r.prompt_logprobs is not None:
            why = prompt_mismatch(r.prompt_logprobs, ref)
        if why:
            raise RuntimeError(f"seed {seed}: {r.request_id} differs from the ample run at {why} ({cfg})")
    if e.kv.num_used_blocks or e.kv.num_host_used_blocks or e._inflight:
        raise RuntimeError(f"seed {seed}: {e.kv.num_used_blocks} device and {e.kv.num_host_used_blocks} host blocks "
                           f"left in use, {len(e._inflight)} batches in flight ({cfg})")
    st = e.stats
    return (f"{seed} ok: {steps} steps, {len(reqs)} requests, {len(aborted)} aborted ({hit_in_flight} in flight), "
            f"{st.swap_out_blocks}/{st.swap_in_blocks} blocks swapped out/in, {st.recomputations} recomputed, "
            f"{cfg['scheduler']}"
            f"{learned_state(e.scheduler) if 'scheduler_config' in cfg else ''}/"
            f"{cfg['swap_policy']}, {cfg['num_device_blocks']}+{cfg['num_host_blocks']} blocks, "
            f"async {e.cfg.async_scheduling}, fused {'all' if fused_blocks is None else f'<= {fused_blocks} blocks'}, "
            f"prompt logprobs {len(checked)} ({sum(r.num_preemptions > 0 for r in checked)} preempted)"
            + (f", {sum(t > 0 for t, _ in params)} sampled" if any(t for t, _ in params) else "")
            + (f", caching: {e.kv.hits} tokens found, {e.kv.swap_in_shared} blocks by swap-ins, "
               f"{e.kv.swap_out_pinned} pinned by swap-outs"
               if e.cfg.enable_prefix_caching else ""))


def learned_state(sched) -> str:
    """Which learned paths a learned-mode seed reached by its end, as " (learned, gate open)"."""
    parts = []
    if getattr(sched, "_learned", False) or (hasattr(sched, "warmup") and sched.warmup is None):
        parts.append("learned")
    joins = getattr(sched, "joins", None)
    if (joins is not None and joins.ranks()) or (hasattr(sched, "prompts_rank") and sched.prompts_rank()):
        parts.append("gate open")
    return f" ({', '.join(parts) or 'not learned'})"


def _safe(seed: int, run=run_seed) -> tuple[bool, str]:
    try:
        return True, run(seed)
    except Exception:
        return False, f"{seed} FAILED\n{traceback.format_exc()}"


def main(argv: list[str] | None = None, run=run_seed, doc: str = __doc__) -> int:
    """Run seeds [first, end) through `run` (run_seed, or scripts/fuzz_parallel.py's)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("first", type=int)
    ap.add_argument("end", type=int, help="one past the last seed")
    ap.add_argument("--jobs", type=int, default=1)
    a = ap.parse_args(argv)
    seeds = range(a.first, a.end)
    results = []
    with concurrent.futures.ProcessPoolExecutor(a.jobs) as pool:
        # each seed's line as soon as it and the seeds before it are done (a long run shows progress)
        safe = functools.partial(_safe, run=run)
        for ok, line in (pool.map(safe, seeds) if a.jobs > 1 else map(safe, seeds)):
            results.append(ok)
            print(line, flush=True)
    failed = results.count(False)
    print(f"{len(results) - failed} of {len(results)} seeds passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
