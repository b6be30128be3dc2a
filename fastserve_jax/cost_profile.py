"""Profiling the real engine into a CostModel, cached on disk.

`profile_engine(engine)` times the runner on synthetic requests, exactly as an iteration
runs them (build the padded launches, dispatch, wait for the sampled tokens), at every
prefill token bucket and decode batch bucket, and fits the two context coefficients from
runs at a short and a long context:

    prefill_seconds[T]  one prefill chunk of T tokens, no earlier context
    decode_seconds[B]   B decode rows with 1 token of context each
    decode_context      (t(B, long) - t(B, short)) / (B * (long - short)), B = max_num_seqs;
                        with the reference attention per padded token read instead
                        (CostModel.padded_read), as its launches gather every row's
                        blocks up to the launch's block bucket
    prefill_context     (t(T after C cached) - t(T)) / (T * C), T = half the token budget

The launch padding (bucket lists, and the block buckets when the attention pads reads) goes
into the model too, so the simulator charges a batch what its padded launch costs.

Each point is the median of `repeats` runs after one untimed run (which compiles the shape
if warm-up was skipped). The synthetic requests borrow free KV blocks and give them back,
so the engine must be idle. The result is cached as JSON under
<cache root>/cost_models/<key>.json (cache root as for converted params, see
models.loader.cache_root), keyed by the model config, the engine config, the KV pool size
and the machine (`_machine`: the device kind, on the CPU also the processor and the usable
cores, the jax and jaxlib versions and XLA_FLAGS); a second start loads it instead of
profiling.

While a background warm-up is still compiling (runner/compiler.py), launches pad to the
covering set, so timing the other buckets would compile them first. The engine then takes a
provisional model instead (`provisional=True`: the same points timed on whatever is
compiled, nothing compiled, nothing cached) and replaces it with a full profile once every
shape is compiled and it is idle (`refine_profile`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import platform
import statistics
import time

import jax

from fastserve_jax.config import SamplingParams
from fastserve_jax.cost_model import CostModel
from fastserve_jax.request import Request
from fastserve_jax.scheduler.base import ScheduledRequest

log = logging.getLogger(__name__)

_VERSION = 5                     # 2: launch padding in the model; 3: packed prefill probes, reachable buckets only;
                                 # 4: prefill_self_attention False (the table holds it), max_prefill_seqs;
                                 # 5: decode_context timed where the long run reads enough more (not 0 blocks)
PROVISIONAL = "-provisional"     # name suffix of a model timed on a covering set's padded launches


def cost_cache_key(engine) -> str:
    """The cached profile's name: what the launches' times depend on (the model, the dtype,
    the launch shapes and backend, the pool, the device), not the policy, the host pool or
    the swap settings. Engines that differed only in those once profiled apart, at whatever
    speed the machine had then: on the 2-core VM two such profiles of the demo model were
    3.6x apart, and with them the starvation limits (docs/scheduling_log.md, 2026-12-03)."""
    cfg = dataclasses.replace(engine.cfg, seed=0, scheduler="fcfs", compilation_cache_dir=None, num_host_blocks=None,
                              swap_policy="proactive", swap_reserve_blocks=0, scheduler_config=None, cost_model=None)
    text = f"v{_VERSION}|{engine.model_cfg!r}|{cfg!r}|{engine.kv.num_blocks}|{_machine()}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _machine() -> str:
    """What else the launches' times depend on: the device kind (on the CPU always 'cpu', so
    also the processor and the cores this process may use), the jax and jaxlib versions, and
    XLA_FLAGS. A cache shared by machines (a shared home, an image) or kept across a jax
    upgrade profiles each anew."""
    dev = jax.devices()[0]
    text = f"{dev.device_kind}|{dev.client.platform_version}|jax {jax.__version__}|jaxlib {jax.lib.__version__}"
    if dev.platform == "cpu":
        try:
            with open("/proc/cpuinfo") as f:
                model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
        except OSError:
            model = platform.processor()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        text += f"|{model}|{cores} cores"
    return f"{text}|{os.environ.get('XLA_FLAGS', '')}"


def _cache_path(engine, cache_dir: str | None) -> str | None:
    from fastserve_jax.models.loader import cache_root

    root = cache_root(cache_dir)
    return None if root is None else os.path.join(root, "cost_models", f"{cost_cache_key(engine)}.json")


class _Probe:
    """Synthetic requests on the engine's KV pool; everything taken is given back."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.taken: list[Request] = []

    def request(self, tokens: int, computed: int) -> Request:
        """A request of `tokens` tokens whose first `computed` have KV, with KV room for all."""
        r = Request(f"__profile{len(self.taken)}", [1] * tokens, SamplingParams(max_tokens=1, temperature=0), 0.0)
        self.engine.kv.allocate(r, tokens)
        r.num_computed_tokens = computed
        self.taken.append(r)
        return r

    def release(self) -> None:
        for r in self.taken:
            self.engine.kv.free(r)
        self.taken.clear()

    def keys(self, items: list[ScheduledRequest]) -> list:
        """The launch and sampler keys timing `items` runs (nothing runs); gives the blocks back."""
        try:
            return self.engine.runner.keys_of(items, self.engine.kv)
        finally:
            self.release()

    def time(self, items: list[ScheduledRequest], repeats: int) -> float:
        runner, kv = self.engine.runner, self.engine.kv
        samples = []
        try:
            for i in range(repeats + 1):
                t0 = time.perf_counter()
                runner.execute(items, kv)
                if i:
                    samples.append(time.perf_counter() - t0)
        finally:                 # a failed launch (e.g. out of memory) still gives the blocks back
            self.release()
        return statistics.median(samples)


def measure(engine, repeats: int = 3, sparse: bool = False) -> CostModel:
    """Profile now (no cache). `sparse`: only the smallest and largest bucket of each kind (the
    cost model interpolates between them), so an engine that compiles lazily compiles 6
    launch shapes for its profile instead of every bucket."""
    builder = engine.runner.builder
    ready, builder.ready = builder.ready, None     # time each shape itself, not a padded fallback
    try:
        return _measure(engine, repeats, sparse)
    finally:
        builder.ready = ready


def _ends(xs: list[int], sparse: bool) -> list[int]:
    return sorted({xs[0], xs[-1]}) if sparse and xs else xs


def _chunks(tokens: int, cfg, kv) -> list[int]:
    """Prompt lengths that pack `tokens` prefill tokens (or as many as fit) into one launch:
    at most max_prefill_seqs prompts of at most max_model_len tokens, within the free blocks."""
    out, left, blocks = [], tokens, kv.num_free_blocks
    while left > 0 and len(out) < cfg.max_prefill_seqs:
        n = min(left, cfg.max_model_len, blocks * cfg.block_size)
        if n < 1:
            break
        out.append(n)
        left -= n
        blocks -= kv.blocks_for_tokens(n)
    return out


def _measure(engine, repeats: int, sparse: bool) -> CostModel:
    cfg, kv = engine.cfg, engine.kv
    probe = _Probe(engine)
    bs = cfg.block_size
    # A prefill bucket's probe is prompts of at most max_model_len tokens packed into one launch
    # (up to max_prefill_seqs of them, within the free blocks), as a batch of short prompts
    # fills it; a bucket the packing cannot pass its smaller neighbour for is never launched
    tb = list(cfg.prefill_token_buckets)
    pre_t = _ends([t for i, t in enumerate(tb) if sum(_chunks(t, cfg, kv)) > (tb[i - 1] if i else 0)], sparse)
    # Every running row holds a block, so a pool of fewer blocks than a bucket's rows never
    # fills it: time the buckets a batch can reach, each with at most one row per free block
    # (the launch pads the rest, as the engine's would)
    free, rb = kv.num_free_blocks, list(cfg.decode_batch_buckets)
    dec_b = _ends([x for i, x in enumerate(rb) if i == 0 or rb[i - 1] < free], sparse)
    padding = dict(decode_row_buckets=cfg.decode_batch_buckets, prefill_token_buckets=cfg.prefill_token_buckets,
                   max_prefill_seqs=cfg.max_prefill_seqs)
    if cfg.attention_backend == "reference":       # gathers every row's blocks up to the bucket
        padding.update(block_size=bs, block_buckets=cfg.block_buckets, min_launch_blocks=cfg.min_launch_blocks)
    shape = CostModel("probe", (1,), (1.0,), (1,), (1.0,), **padding)

    def long_run(rows: int) -> tuple[int, int, int]:
        """A decode of `rows` rows at the longest context the free blocks hold: (that context, the
        tokens it reads, and how many more than the same rows at a 1-token context read)."""
        ctx = min(cfg.max_model_len - 1, (free // min(rows, free)) * bs - 1)
        if "block_size" in padding:            # the rows read the context that plan_time counts: ctx + 1
            read = shape.padded_read(rows, ctx + 1)
            return ctx, read, read - shape.padded_read(rows, 2)
        return ctx, min(rows, free) * (ctx - 1), min(rows, free) * (ctx - 1)

    # The context coefficient is timed at the largest batch bucket whose long run reads at least
    # half as much more than its 1-token run as the best bucket's: the largest bucket, unless so
    # few blocks are free that its rows' contexts stay within the smallest block bucket (67 free
    # blocks, 16 rows: 63 tokens each, read as the 1-token run's 64, so the difference was noise,
    # decode_context came out 0, and the simulator ran such an engine 2.5-3x faster than it served)
    best = max(long_run(r)[2] for r in dec_b)
    b = max(r for r in dec_b if 2 * long_run(r)[2] >= best)
    long_ctx, read, _ = long_run(b)
    n = pre_t[-1] if sparse and pre_t else max(1, cfg.max_num_batched_tokens // 2)
    ctx = min(cfg.max_model_len - n, (kv.num_free_blocks * bs) - n)

    def prefill(tokens: int, cached: int = 0) -> list[ScheduledRequest]:
        if cached:
            return [ScheduledRequest(probe.request(cached + tokens, cached), tokens)]
        return [ScheduledRequest(probe.request(k, 0), k) for k in _chunks(tokens, cfg, kv)]

    def decode(rows: int, context: int) -> list[ScheduledRequest]:
        return [ScheduledRequest(probe.request(context + 1, context), 1) for _ in range(min(rows, free))]

    # What the points run, compiled first on the compiler's thread pool (a lazy engine would
    # otherwise compile them one by one as each point's untimed run meets them)
    points = ([lambda t=t: prefill(t) for t in pre_t] + [lambda r=r: decode(r, 1) for r in dec_b]
              + [lambda: decode(b, long_ctx)] + ([lambda: prefill(n, ctx), lambda: prefill(n)] if ctx > 0 else []))
    keys = []
    for point in points:
        keys += [k for k in probe.keys(point()) if k not in keys]
    engine.runner.compiler.compile_now(keys)
    times = [probe.time(point(), repeats) for point in points]
    pre_s, dec_s = times[:len(pre_t)], times[len(pre_t):len(pre_t) + len(dec_b)]
    t_long = times[len(pre_t) + len(dec_b)]
    decode_context = max(0.0, (t_long - dec_s[dec_b.index(b)]) / read) if long_ctx > 1 and read > 0 else 0.0
    if ctx > 0:
        t_ctx, t0 = times[-2:]
        prefill_context = max(0.0, (t_ctx - t0) / (n * ctx))
    else:
        prefill_context = 0.0
    dev = jax.devices()[0]
    return CostModel(
        name=f"profiled-{engine.model_cfg.arch}-{dev.platform}", prefill_tokens=tuple(pre_t),
        prefill_seconds=tuple(pre_s), decode_batch=tuple(dec_b), decode_seconds=tuple(dec_s),
        decode_context=decode_context, prefill_context=prefill_context, prefill_self_attention=False,
        kv_capacity_tokens=kv.num_usable_blocks * bs, **padding,
        source=f"profiled by fastserve_jax.cost_profile on {dev.device_kind} ({dev.platform}), median of "
               f"{repeats} runs per point, {engine.model_cfg.arch} {engine.model_cfg.num_layers} layers "
               f"hidden {engine.model_cfg.hidden_size}, dtype {cfg.dtype}")


def profile_engine(engine, cache_dir: str | None = None, repeats: int = 3, refresh: bool = False,
                   provisional: bool = False) -> CostModel:
    """The engine's cost model: from the on-disk cache, else measured now and cached.

    `cache_dir=""` disables the cache; `refresh=True` measures even when cached. An engine
    with shapes left to compile measures sparsely (see `measure`); a cached profile is used
    whichever way it was measured. `provisional=True` (when not cached): time the launches
    as they run now, padded to the compiled shapes, once per point; nothing compiles and
    nothing is cached, and the name ends in PROVISIONAL."""
    path = _cache_path(engine, cache_dir)
    if path and not refresh and os.path.isfile(path):
        try:
            cm, worst = monotone(CostModel.load(path))
            if worst <= NOISY:
                return cm
            # saved by a version before the check (2026-12-07), which read it back as it was
            log.warning("the cached cost profile %s was timed while something else ran (a smaller launch took %.1fx a "
                        "larger one's time); profiling again", path, worst)
        except (OSError, ValueError) as e:   # cut short, emptied, unreadable: measure again and replace it
            log.warning("the cached cost profile is unreadable (%s); profiling again", e)
    if engine.has_unfinished():
        raise RuntimeError("profile the engine while it is idle (before adding requests, or after they finish): "
                           "profiling borrows free KV blocks and runs launches of its own")
    if provisional:
        cm = _measure(engine, 1, sparse=True)
        return dataclasses.replace(cm, name=cm.name + PROVISIONAL, source=cm.source + "; provisional: launches "
                                   "padded to the shapes compiled so far, one run per point")
    cm, worst = monotone(measure(engine, repeats, sparse=engine.warmup_mode != "full"
                                 and not engine.runner.fully_compiled()))
    if worst > NOISY:
        log.warning("the cost profile was timed while something else ran (a smaller launch took %.1fx a larger "
                    "one's time: replicas starting together?); used with those points lowered, not cached, so the "
                    "next start profiles again", worst)
        path = None
    if path:
        try:
            cm.save(path)
        except OSError as e:                 # a full disk or a read-only cache: the next start profiles again
            log.warning("could not cache the cost profile at %s (%s); the next start profiles again", path, e)
    return cm


NOISY = 1.5    # a smaller launch timed at more than this times a larger one's: the profile is not cached


def monotone(cm: CostModel) -> tuple[CostModel, float]:
    """The profile with each point lowered to the least time of a launch at least as large
    (fewer rows or tokens cannot cost more), and the largest ratio so removed. Replicas
    profiling at once timed a 1-row decode at 5.4x its time alone, above 2 rows', and that
    profile was cached for every later start (found by a probe, 2026-12-07)."""
    worst, tables = 1.0, {}
    for name in ("prefill_seconds", "decode_seconds"):
        ys = list(getattr(cm, name))
        for i in range(len(ys) - 2, -1, -1):
            if ys[i] > ys[i + 1]:
                worst, ys[i] = max(worst, ys[i] / ys[i + 1]), ys[i + 1]
        tables[name] = tuple(ys)
    return dataclasses.replace(cm, **tables), worst


def is_provisional(cm: CostModel | None) -> bool:
    return cm is not None and cm.name.endswith(PROVISIONAL)


def refine_profile(engine) -> bool:
    """Replace the engine's provisional cost model by a full profile (cached on disk for the
    next start) once every shape is compiled and no request is live; its scheduler keeps
    what it learned. Returns whether it profiled. The serve loop calls it when idle,
    LLM.generate before it queues: it runs launches for about a second on the demo model."""
    if (not is_provisional(engine.cost_model) or engine.has_unfinished()
            or not engine.runner.compiler.background_done() or engine.runner.shapes_pending()):
        return False
    engine.cost_model = profile_engine(engine, refresh=True)
    engine.scheduler.use_cost_model(engine.cost_model, engine.policy_config())
    return True
