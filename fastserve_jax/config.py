"""Frozen configuration objects, validated once at construction.

Derived values (bucket lists, blocks per sequence) are filled in with
`dataclasses.replace` by `EngineConfig.resolve`, never by mutation.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from fastserve_jax import sampling_params as _sp
from fastserve_jax.sharding.parallel_config import ParallelConfig

# a request's parameters live in sampling_params.py; these names are kept here for the imports that use them
MAX_LOGPROBS, SamplingParams, sampler_seed = _sp.MAX_LOGPROBS, _sp.SamplingParams, _sp.sampler_seed

# EngineConfig.attention_backend and dtype values; `resolve` turns "auto" into one of the others
ATTENTION_CHOICES, DTYPE_CHOICES = ("auto", "reference", "pallas"), ("auto", "float32", "bfloat16")
# EngineConfig.scheduler values: the names of scheduler.POLICIES (that package imports this one)
SCHEDULER_CHOICES = ("fcfs", "mlfq", "skip-join-mlfq", "gittins", "predictive", "srpt")
MAX_NUM_SEQS = 1 << 16       # a decode launch's rows (vLLM's default is 256 or 1024)
MAX_SWAP_SPACE = 1 << 20      # GiB (a pebibyte): more overflowed the host pool's sizing


def check_positive_ints(obj, names) -> None:
    """ValueError naming the first of `names` (attributes of obj) that is not an int >= 1."""
    for name in names:
        v = getattr(obj, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def check_budget(obj) -> None:
    """vLLM's refusal of a token budget below the batch (the engine's or the simulator's): the batch was the budget, unsaid."""
    if obj.max_num_batched_tokens < obj.max_num_seqs:
        raise ValueError(f"max_num_batched_tokens ({obj.max_num_batched_tokens}) must be >= max_num_seqs "
                         f"({obj.max_num_seqs}): a decode step takes a token of the budget per sequence")


@dataclass(frozen=True)
class SchedulerConfig:
    """Constants of the preemptive policies (mlfq, skip-join-mlfq, gittins, predictive); fcfs and srpt ignore them.

    Service is measured in seconds of iteration time: every request in an iteration's batch
    is charged that iteration's duration (FastServe's accounting).

    - base_quantum, quantum_ratio, num_queues: queue i has quantum base_quantum * ratio**i
      seconds. The default base is about one decode iteration of a 13B model on an A100 and
      the ratio is 2, as in the FastServe authors' code; 12 queues reach 20 s, past any
      prefill of a 2,048-token budget.
    - starvation_threshold: a request that has not run for this many seconds, stretched by the
      live requests per batch slot (scheduler/base.py, starvation_limit), is promoted to the
      top queue (0 disables promotion).
    - gittins_*: the Gittins policy learns output lengths from the last `gittins_window`
      finished requests of each prompt-length bucket (edges in tokens; () = one bucket),
      and from the running ones as censored lengths; it recomputes its index tables every
      `gittins_refresh` finishes, and behaves like skip-join MLFQ until
      `gittins_min_samples` requests have finished. Refreshing every 10 finishes rather
      than 50 lets the estimate follow the running requests as they age: in a 1.5x burst
      on the Azure trace, mean JCT 40.6 s against 49.2 s (fcfs: 37.7 s).
    - protect_decodes: skip-join MLFQ stops demoting a decoding request while the learned
      lengths say it is worth more per token than a fresh one, and every decoding request
      until `protect_min_samples` requests have finished (scheduler/skip_join.py's
      SkipJoinMLFQScheduler; False: the paper's policy as published).
    - tail_slowdown: skip-join MLFQ's tail guard. Once lengths are learned, a request older
      than the starvation limit whose age exceeds this many times the decode time at a
      full batch of the tokens it has produced (plus one), and whose expected remaining
      length at that age is at most the learned mean, runs from the top queue, uncharged,
      until it has caught up (0 disables it; docs/scheduling_log.md, "The tail guard"). Skip-join
      learns lengths only with protect_decodes, so protect_decodes=False (the paper's
      policy) has no tail guard either.
    - prompt_neighbors: output lengths predicted from prompt lengths (beyond the paper;
      scheduler/prompt_lengths.py): the finished requests with this many nearest prompt
      lengths, running ones counted as at least their age, predict a request's length, and
      the predictions are used once they are seen to rank the finished and running
      requests at a concordance of 0.3 as a tau, over the pairs the predictions separate
      (the gate; shut again under 0.15). Templated traffic passes it
      (the Azure trace: 0.69 over its 400 rows); traffic whose answers do not follow its prompts never
      does, and there the policies are as without it. Once the gate is open, skip-join MLFQ
      joins a new request to the queue that covers its prefill plus its predicted answer
      (not its prefill alone), gittins ranks every request by the Gittins index of its own
      prediction, and predictive ranks requests with no prediction of their own by it. 0
      turns it off; skip-join also needs protect_decodes (the paper's policy has neither).
    - predictive_*: the predictive policy (scheduler/predictive.py; the measurements behind
      each default are in docs/scheduling.md, "Predicted output lengths").
      predictive_objective: what its Gittins index minimises, "latency_per_token" (mean of
      JCT / output tokens, FastServe's figure: each request weighs 1 / its length) or "jct"
      (mean response time; a sharp predictor then gives exactly SRPT). The per-token index
      had 1.02-1.6x lower latency per token in the simulator's bursts, at up to 11% more
      mean JCT.
      predictive_max_paused: new requests start only while at most this many
      started-but-unfinished requests sit outside the batch (paused, KV on the device or
      the host; TRAIL's preemption limit). Wherever it bound it cost latency (64 cost
      1.25-1.3x latency per token in 3x bursts), and batch.py already bounds started
      requests' KV by the pools, so the default, 256, is a backstop that the paper's setup
      (batch 16, OPT-13B's pools) never reached.
      predictive_min_samples: the policy leaves skip-join MLFQ once it has seen a
      prediction and this many requests have finished (gittins waits for
      gittins_min_samples). The prior learned from them ranks only the requests not
      prefilled yet; every other request ranks by its own prediction. At 50, as gittins,
      the warm-up on skip-join took much of an overload burst: at Kendall's tau 0.55, 10
      gave 1.02-1.36x lower latency per token in the chat and heavy-tailed 3x and 8x bursts
      (three seeds) and 0.95-1.10x at 1.5x.
    - gittins_starvation_threshold (gittins and predictive): a request idle this many seconds
      (stretched by the live requests per batch slot, the slots being the typical requests
      the device pool holds, as skip-join's; 0 disables it) runs before all others until it
      finishes. For predictive, 20 s kept p99 JCT within 1.5x fcfs's in every burst
      measured; 10 s cost 1.6-3x latency per token in 1.5x bursts, 40 s let p99 JCT reach 2x
      fcfs's. For gittins (since 2026-12-05; before, no bound) its worst p99 JCT in the
      simulator grid went from 4.8x fcfs's to 2.7x (two other arrival draws: 4.1-4.7x either
      way, its worst mean-JCT misses 1.16-1.27x -> 1.08-1.10x). Gittins doubles it while its
      backlog drops are on (GittinsScheduler.starvation_threshold).
    """

    base_quantum: float = 0.010
    quantum_ratio: float = 2.0
    num_queues: int = 12
    starvation_threshold: float = 10.0
    gittins_window: int = 2000
    gittins_min_samples: int = 50
    gittins_refresh: int = 10
    gittins_bucket_edges: tuple[int, ...] = ()
    predictive_max_paused: int = 256
    predictive_min_samples: int = 10
    predictive_objective: str = "latency_per_token"
    gittins_starvation_threshold: float = 20.0
    protect_decodes: bool = True
    protect_min_samples: int = 16
    prompt_neighbors: int = 16
    tail_slowdown: float = 5.0

    def __post_init__(self) -> None:
        if not (isinstance(self.base_quantum, (int, float)) and self.base_quantum > 0):
            raise ValueError(f"base_quantum must be > 0 seconds, got {self.base_quantum!r}")
        if not (isinstance(self.quantum_ratio, (int, float)) and self.quantum_ratio >= 1):
            raise ValueError(f"quantum_ratio must be >= 1, got {self.quantum_ratio!r}")
        for name in ("starvation_threshold", "gittins_starvation_threshold", "tail_slowdown"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                unit = "" if name == "tail_slowdown" else " seconds"
                raise ValueError(f"{name} must be a finite number >= 0{unit} (0 disables it), got {v!r}")
        for name in ("num_queues", "gittins_window", "gittins_min_samples", "gittins_refresh",
                     "protect_min_samples", "predictive_min_samples"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.protect_decodes, bool):
            raise ValueError(f"protect_decodes must be true or false, got {self.protect_decodes!r}")
        v = self.prompt_neighbors
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"prompt_neighbors must be an integer >= 0 (0: no prompt-length predictions), got {v!r}")
        v = self.predictive_max_paused
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"predictive_max_paused must be an integer >= 0 (started requests that may wait "
                             f"outside the batch; 0 = never pause a started request for a new one), got {v!r}")
        if self.predictive_objective not in ("latency_per_token", "jct"):
            raise ValueError(f"predictive_objective must be 'latency_per_token' or 'jct', got {self.predictive_objective!r}")
        edges = tuple(self.gittins_bucket_edges)
        if list(edges) != sorted(set(edges)) or any(not isinstance(e, int) or e < 1 for e in edges):
            raise ValueError(f"gittins_bucket_edges must be strictly increasing positive token counts, got {edges}")
        object.__setattr__(self, "gittins_bucket_edges", edges)

    def quantum(self, level: int) -> float:
        try:
            return self.base_quantum * self.quantum_ratio ** level
        except OverflowError:       # past a float (a ratio of 1e30): as a base of 1e308 gives (a traceback until 2026-12-07)
            return math.inf


def _pow2_upto(lo: int, hi: int) -> tuple[int, ...]:
    """Powers of two from `lo` with `hi` itself as the last entry (hi need not be a power)."""
    return tuple(b for b in (lo << i for i in range(max(hi, 1).bit_length() + 1)) if b < hi) + (hi,)


@dataclass(frozen=True)
class EngineConfig:
    """Everything that fixes shapes on the device, plus scheduler limits.

    Bucket lists fix every shape the jitted steps ever see, so that after warm-up nothing
    compiles. Empty tuples mean "derive from the limits" (see `resolve`):

    - decode_batch_buckets: a decode launch has one query token per sequence; it is padded
      to the next bucket. Powers of two bound the padding waste below 2x with log2(max)
      compilations.
    - prefill_token_buckets: a prefill launch packs the chunks of several sequences into one
      token row; it is padded to the next bucket. Powers of two from 32 up to
      max_num_batched_tokens (the per-iteration token budget, which bounds one iteration's cost).
    - block_buckets: how many KV blocks one launch row gathers (per sequence for decode, per
      row of prefill_tile tokens for a packed prefill). Attention cost follows context
      length, not max_model_len.
    - launch_kv_fraction: block buckets scale with the model. A launch of r rows padded to
      nb blocks per row reads r * nb blocks of KV besides the weights; while that is under
      this fraction of the weight bytes, a tighter block count saves little of the step (a
      step reads every weight once), so such shapes are not compiled and the launch pads up
      to the smallest r * nb past the fraction (`min_launch_blocks`, set by `resolve` from
      the model's weight and KV-block bytes). With 1/8, a 16 GB 8B model at 128 sequences
      compiles 50 launch shapes instead of 104; the demo model, whose KV outweighs its
      weights, keeps 68 of 71. None (the default) means 1/8 on GPU and TPU and 0 (every
      block bucket) on CPU: there the reference path's block gather costs far more per byte
      than streaming weights, and scripts/bench_buckets.py measured a random llama-125m's
      batch-1 decode at 27 ms with 4 blocks against 73 ms padded to 128 (2026-12-01, 2-core
      VM). The accelerator value is not measured yet.
    - prefill_tile: a packed prefill's tokens are cut into rows of this many query tokens,
      and each row gathers only the blocks of the sequences it holds. One row over all of a
      launch's blocks would make every token attend to every packed sequence's keys (masked
      out, but computed): 4 prompts of 128 tokens cost 4x the attention they need.
    """

    max_model_len: int = 2048
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_prefill_seqs: int = 8          # sequences packed in one prefill launch (logit rows)
    prefill_tile: int = 64             # query tokens per row of a packed prefill (see above)
    block_size: int = 16
    # 0: size from memory (kv_sizing.device_pool_blocks: gpu_memory_utilization of an accelerator's
    # memory less the weights and what is in use, 4 GiB on CPU; at most max_num_seqs full-length sequences)
    num_device_blocks: int = 0
    # vLLM's: the fraction of each accelerator's memory the engine may use (the auto-sized pool gets
    # it less the weights and what is in use); unused on CPU and with num_device_blocks. Out of the
    # repr (the profile's key, cost_profile.cost_cache_key, holds the pool's size itself).
    gpu_memory_utilization: float = field(default=0.9, repr=False)
    # Host KV pool for swapped-out requests, in blocks of the same size. None: as many blocks
    # as the device pool, within swap_space (kv_sizing.host_pool_blocks); 0: no host pool.
    num_host_blocks: int | None = None
    # vLLM's: GiB of host memory per device for that pool where num_host_blocks is None (0: none);
    # out of the repr, as gpu_memory_utilization
    swap_space: float = field(default=4.0, repr=False)
    # where paused requests' KV goes: "proactive" (FastServe), "reactive", "recompute" (swap_policy.py)
    swap_policy: str = "proactive"
    swap_reserve_blocks: int = 0        # free device blocks the proactive policy keeps (0: sized from arrivals)
    # vLLM's automatic prefix caching: requests start past KV blocks of the same prefix already
    # computed (fastserve_jax/prefix_cache.py). Out of the repr: it does not change a step's cost.
    enable_prefix_caching: bool = field(default=False, repr=False)
    dtype: str = "auto"                 # weights, KV cache, activations (norms, softmax: fp32); for_platform
    seed: int = 0
    scheduler: str = "skip-join-mlfq"
    # None: SchedulerConfig defaults with base_quantum = one decode iteration (batch 1) of the
    # engine's cost model, FastServe's "about one decode step".
    scheduler_config: SchedulerConfig | None = None
    # SchedulerConfig.protect_decodes for the default config above (False: skip-join MLFQ as
    # the paper has it); a scheduler_config given says its own. Out of the repr, which keys
    # the profiled cost model (cost_profile.cost_cache_key): the policy does not change it.
    protect_decodes: bool = field(default=True, repr=False)
    # SchedulerConfig.tail_slowdown for the default config above (0: no guard); out of the repr
    tail_slowdown: float = field(default=SchedulerConfig.tail_slowdown, repr=False)
    # SchedulerConfig.prompt_neighbors for the default config above (0: no predictions from
    # prompt lengths: skip-join joins on prefill time, gittins ranks on the pooled lengths)
    prompt_neighbors: int = field(default=SchedulerConfig.prompt_neighbors, repr=False)
    # SchedulerConfig.starvation_threshold in seconds for the default config above; None: the
    # default's 10 s scaled to this engine's full-batch decode time (scheduler/engine_defaults.py).
    # These four with a scheduler_config are refused (until 2026-12-07 ignored without a word).
    starvation_threshold: float | None = field(default=None, repr=False)
    # the policy's cost model: None profiles this engine (cached); else a shipped name or JSON path
    cost_model: str | None = None
    decode_batch_buckets: tuple[int, ...] = ()
    prefill_token_buckets: tuple[int, ...] = ()
    block_buckets: tuple[int, ...] = ()
    launch_kv_fraction: float | None = None
    min_launch_blocks: int = 0           # derived by resolve(weight_bytes, kv_block_bytes)
    compilation_cache_dir: str | None = field(default=None)
    # devices = tp x pp: tp splits heads, MLP units and vocabulary, pp the layers (sharding/)
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # Batches dispatched and not yet collected at once; 0: pipeline_parallel_size, so that every
    # stage has a batch of its own (FastServe's answer to pipeline bubbles). 1 runs one batch
    # through all stages before scheduling the next.
    batches_in_flight: int = 0
    # Schedule and dispatch the next batch before the last one's tokens are read, so the host's
    # work overlaps the device's (engine.py; one pipeline stage only).
    # None: on at pp 1 with batches_in_flight unset, resolved by `resolve`; True also allows
    # batches_in_flight 2
    async_scheduling: bool | None = None
    # record when each pipeline stage was busy (sharding/pipeline.StageActivity); None: if pp > 1
    record_stage_activity: bool | None = None
    # How attention reads the paged KV cache (docs/attention.md): "reference" gathers each
    # row's blocks into a new array and runs einsums (portable jnp); "pallas" reads the blocks
    # in place with a Pallas kernel (models/paged_attention.py, Triton, on GPU;
    # models/paged_attention_tpu.py, Mosaic, on TPU; interpret mode on CPU: correct but slow,
    # for tests); "auto" is resolved by `resolve`: pallas on GPU and TPU (per head shard under
    # tensor parallelism), reference elsewhere (CPU).
    attention_backend: str = "auto"

    def __post_init__(self) -> None:
        check_positive_ints(self, ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "max_prefill_seqs",
                                   "block_size", "prefill_tile"))
        check_budget(self)
        if self.max_model_len < 2:          # a prompt token and an answer token
            raise ValueError(f"max_model_len must be at least 2 (a prompt token and one generated), got {self.max_model_len}")
        if self.max_num_seqs > MAX_NUM_SEQS:      # 10**12 ran the host out of memory in a traceback
            raise ValueError(f"max_num_seqs must be at most {MAX_NUM_SEQS} (sequences in one batch), got {self.max_num_seqs}")
        if self.block_size > max(self.max_model_len, 16):    # launches gather whole blocks: 100000 took minutes a step
            raise ValueError(f"block_size={self.block_size} exceeds max_model_len={self.max_model_len}: a block holds "
                             "one request's KV, so no request would fill one; lower block_size (16 is usual)")
        n = self.num_device_blocks
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"num_device_blocks must be an integer >= 0 (0 = size automatically), got {n!r}")
        if self.num_device_blocks == 1:     # kv_cache.KVManager's check, before a model loads
            raise ValueError("the device KV pool needs at least 2 blocks (one is the null block), got 1")
        f = self.gpu_memory_utilization
        if not isinstance(f, (int, float)) or isinstance(f, bool) or not 0 < f <= 1:
            raise ValueError(f"gpu_memory_utilization must be a fraction in (0, 1] of each accelerator's memory "
                             f"(vLLM's; default 0.9), got {f!r}")
        v = self.swap_space
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= MAX_SWAP_SPACE:
            raise ValueError(f"swap_space must be a number of GiB in [0, {MAX_SWAP_SPACE}] (host memory per device for "
                             f"swapped-out KV, vLLM's; 0 = no host pool), got {v!r}")
        n = self.num_host_blocks
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
            raise ValueError(f"num_host_blocks must be >= 0 (0 = no host pool) or None (sized automatically), got {n!r}")
        for name in ("enable_prefix_caching", "protect_decodes"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer (unseeded requests derive theirs from it), got {self.seed!r}")
        if self.scheduler not in SCHEDULER_CHOICES:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose one of {sorted(SCHEDULER_CHOICES)}")
        if self.swap_policy not in ("proactive", "reactive", "recompute"):
            raise ValueError(f"swap_policy must be 'proactive', 'reactive' or 'recompute', got {self.swap_policy!r}")
        if not isinstance(self.swap_reserve_blocks, int) or self.swap_reserve_blocks < 0:
            raise ValueError(f"swap_reserve_blocks must be >= 0 (0 = sized from arrivals), got {self.swap_reserve_blocks!r}")
        ParallelConfig(self.tensor_parallel_size, self.pipeline_parallel_size)  # raises on bad sizes
        if not isinstance(self.batches_in_flight, int) or self.batches_in_flight < 0:
            raise ValueError(f"batches_in_flight must be >= 0 (0 = pipeline_parallel_size), got {self.batches_in_flight!r}")
        if self.async_scheduling not in (None, False) and (self.async_scheduling is not True or not self._async_fits):
            raise ValueError(f"async_scheduling must be None (where it can run), True or False, and True needs "
                             f"pipeline_parallel_size=1 and batches_in_flight 0 or 2 (it keeps two batches in flight); "
                             f"got {self.async_scheduling!r}, pipeline_parallel_size={self.pipeline_parallel_size}, "
                             f"batches_in_flight={self.batches_in_flight}")
        f = self.launch_kv_fraction
        if f is not None and (not isinstance(f, (int, float)) or isinstance(f, bool) or not 0 <= f <= 1):
            raise ValueError(f"launch_kv_fraction must be in [0, 1] (0 compiles every block bucket), got {f!r}")
        object.__setattr__(self, "dtype", "float32" if self.dtype == "float" else self.dtype)    # vLLM's synonym
        if self.dtype not in DTYPE_CHOICES:
            half = "; float16 is not a serving dtype here (docs/attention.md): give bfloat16"
            raise ValueError(f"dtype must be one of {', '.join(map(repr, DTYPE_CHOICES))} (or 'float'), got "
                             f"{self.dtype!r}{half if self.dtype in ('half', 'float16') else ''}")
        SchedulerConfig(tail_slowdown=self.tail_slowdown, prompt_neighbors=self.prompt_neighbors,  # their checks
                        starvation_threshold=SchedulerConfig.starvation_threshold if self.starvation_threshold is None
                        else self.starvation_threshold)
        given = [k for k, v in (("protect_decodes", not self.protect_decodes), ("starvation_threshold",
                 self.starvation_threshold is not None), ("tail_slowdown", self.tail_slowdown != SchedulerConfig.tail_slowdown),
                 ("prompt_neighbors", self.prompt_neighbors != SchedulerConfig.prompt_neighbors)) if v]
        if self.scheduler_config is not None and given:     # they were ignored without a word
            raise ValueError(f"{', '.join(given)} set the default policy config; with scheduler_config, set them in it")
        if self.attention_backend not in ATTENTION_CHOICES:
            raise ValueError(f"attention_backend must be one of {', '.join(map(repr, ATTENTION_CHOICES))}, got {self.attention_backend!r}")

    @property
    def _async_fits(self) -> bool:
        return self.pipeline_parallel_size == 1 and self.batches_in_flight in (0, 2)

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.max_model_len // self.block_size)

    @property
    def max_prefill_blocks(self) -> int:
        """Blocks one packed prefill launch may gather: one long context plus the budget."""
        return self.max_blocks_per_seq + -(-self.max_num_batched_tokens // self.block_size) + self.max_prefill_seqs

    def for_platform(self, platform: str) -> "EngineConfig":
        """dtype "auto" made concrete: bfloat16 on GPU and TPU (half the bytes a step reads), float32 on CPU."""
        auto = "bfloat16" if platform in ("gpu", "tpu") else "float32"
        return dataclasses.replace(self, dtype=auto) if self.dtype == "auto" else self

    def resolve(self, weight_bytes: int = 0, kv_block_bytes: int = 0, platform: str = "cpu") -> "EngineConfig":
        """Fill in derived bucket lists; validate user-given ones. With the model's weight bytes
        and bytes per KV block (all layers), also `min_launch_blocks` (see launch_kv_fraction;
        `platform` picks its default); given block_buckets are compiled whole."""
        # unset: on unless pipeline mode is asked for (pp > 1, or a batches_in_flight given)
        asyn = (self._async_fits and self.batches_in_flight == 0) if self.async_scheduling is None else \
            self.async_scheduling
        dec = self.decode_batch_buckets or _pow2_upto(1, self.max_num_seqs)
        pre = self.prefill_token_buckets or _pow2_upto(min(32, self.max_num_batched_tokens),
                                                        self.max_num_batched_tokens)
        blk = self.block_buckets or _pow2_upto(min(4, self.max_prefill_blocks), self.max_prefill_blocks)
        lists = {}
        for name, b, need in (("decode_batch_buckets", dec, self.max_num_seqs),
                              ("prefill_token_buckets", pre, self.max_num_batched_tokens),
                              ("block_buckets", blk, self.max_prefill_blocks)):
            if list(b) != sorted(set(b)) or b[0] < 1:
                raise ValueError(f"{name} must be strictly increasing positive integers, got {b}")
            if b[-1] < need:
                raise ValueError(f"{name} must reach {need}, got largest {b[-1]}")
            # those past the first that reaches it never run (were profiled and compiled: 1e6 rows ran out of memory)
            lists[name] = tuple(b[:next(i for i, x in enumerate(b) if x >= need) + 1])
        f = self.launch_kv_fraction if self.launch_kv_fraction is not None else (0.0 if platform == "cpu" else 0.125)
        floor = int(f * weight_bytes // kv_block_bytes) if kv_block_bytes and not self.block_buckets else 0
        backend = self.attention_backend
        if backend == "auto":
            backend = "pallas" if platform in ("gpu", "tpu") else "reference"
        elif backend == "pallas" and platform not in ("gpu", "tpu", "cpu"):
            raise ValueError(f"attention_backend='pallas' runs on GPU (Triton), TPU (Mosaic) and CPU (interpret "
                             f"mode), not on {platform}; use 'reference' or 'auto'")
        return dataclasses.replace(self, **lists, attention_backend=backend,
                                   dtype=self.for_platform(platform).dtype, min_launch_blocks=floor,
                                   async_scheduling=asyn, batches_in_flight=2 if asyn else
                                   self.batches_in_flight or self.pipeline_parallel_size)
