"""Step times of one model on one machine: prefill by length, decode by batch size and context.

Pure Python (the schedulers and the simulator use it; neither imports jax). A cost model
is a small table, interpolated piecewise-linearly (extrapolated along the last segment):

    prefill_seconds[i]  one prefill launch of prefill_tokens[i] tokens with no earlier context
    decode_seconds[j]   one decode launch of decode_batch[j] sequences with (almost) no context
    decode_context      extra seconds per context token a decode launch reads (summed over rows)
    prefill_context     extra seconds per (chunk token x earlier-context token) pair: attention
                        of a prefill chunk over what is already in the cache
    prefill_self_attention
                        True where the prefill table leaves out a launch's attention over its
                        own tokens (a table of matmuls, as opt-13b-a100's roofline):
                        iteration_time then adds prefill_context x k^2/2 per chunk of k
                        tokens. False for a profile (cost_profile.py), whose times measured
                        it: adding it again charged a 256-token demo-cpu prefill 24.6 ms
                        against the 20.0 ms measured
    kv_bytes_per_token  K and V of one token over all layers (what a swap moves per token)
    swap_bandwidth      bytes per second of one device<->host copy direction; swap_latency
                        the fixed seconds of one copy (the simulator's transfer-time model)
    swap_issue_seconds  host seconds to issue one request's swap copy (dispatching its gathers
                        and transfers), which the iteration that issues it waits for; the copy
                        itself runs on the link (0: free, as for a table of real kernels)
    iteration_overhead  host seconds every iteration adds to its launches: scheduling,
                        assembling the batch, appending tokens, and whatever else the
                        serving process takes from the engine's thread (0: none, or folded
                        into the tables, as opt-13b-a100 folds 1.5 ms into each launch)

Launch padding, for a profile of this engine (empty or 0 in a table of real kernels):

    decode_row_buckets, prefill_token_buckets
                        a decode launch pads its rows, a prefill launch its tokens, to the
                        next bucket, so an iteration costs the table's time at that size
    max_prefill_seqs    the most prompts one prefill launch packs (EngineConfig's); an
                        iteration's prefill chunks go into launches in order, as
                        runner/launch.py's split_prefill packs them: a new launch when one
                        holds max_prefill_seqs chunks (0: no such limit), or when the next
                        chunk would take it past the largest token bucket or, with
                        block_buckets set, its blocks (each chunk's context and tokens) past
                        the largest block bucket. Many short chunks behind a long cached
                        prefix split by blocks: 14 chunks of 15 tokens after 384 cached
                        ones (25 blocks each) are 4 launches under a 104-block bucket, which
                        the simulator priced as 2 (by count) before 2026-12-06
    block_size, block_buckets, min_launch_blocks
                        set when the profiled attention reads every row's context padded to
                        the launch's block bucket (the reference path gathers blocks; a paged
                        kernel reads each row's own): a decode launch then reads rows x
                        bucket(longest row's blocks) blocks, at least the floor that
                        min_launch_blocks sets (runner/launch.py), and decode_context is
                        seconds per padded token read. Without it a batch that mixes one long
                        context with short ones costs as little as its mean context says;
                        fcfs, whose batches mix the most, ran 30-40% slower than simulated.

One iteration runs its decode launch and its prefill launch back to back (as the runner's
dispatch does, runner/model_runner.py), so its time is the sum of the two plus
iteration_overhead. Only iteration_time adds it: prefill_time and decode_time stay the
launches alone, which is what the schedulers read.
A profile (cost_profile.py) times the launches alone, so its overhead is 0;
scripts/bench_preemption.py calibrates a serving engine's against it. Tables come from
`fastserve_jax/cost_models/*.json` (shipped, say where their numbers come from) or from
`cost_profile.profile_engine`.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import math
import numbers
import os
import uuid
from dataclasses import MISSING, asdict, dataclass
from typing import Iterable, Sequence

SHIPPED_DIR = os.path.join(os.path.dirname(__file__), "cost_models")


def _interp(x: float, xs: tuple[float, ...], ys: tuple[float, ...]) -> float:
    """Piecewise-linear through (xs, ys); clamped below xs[0], extrapolated along the last segment."""
    if x <= xs[0] or len(xs) == 1:
        return ys[0]
    i = bisect.bisect_left(xs, x)
    if i == len(xs):
        i -= 1
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _pad(x: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= x; x itself past the last bucket or without buckets."""
    i = bisect.bisect_left(buckets, x)
    return buckets[i] if i < len(buckets) else x


@dataclass(frozen=True)
class CostModel:
    name: str
    prefill_tokens: tuple[int, ...]
    prefill_seconds: tuple[float, ...]
    decode_batch: tuple[int, ...]
    decode_seconds: tuple[float, ...]
    decode_context: float = 0.0          # s per context token read by a decode launch
    prefill_context: float = 0.0         # s per (chunk token x earlier context token)
    prefill_self_attention: bool = True  # False: the prefill table holds a chunk's attention over itself
    kv_capacity_tokens: int = 0          # KV slots the device holds next to the weights (0: unknown)
    kv_bytes_per_token: int = 0          # 0: unknown
    swap_bandwidth: float = 0.0          # bytes/s per direction (0: unknown)
    swap_latency: float = 0.0            # s per copy
    swap_issue_seconds: float = 0.0      # host s to issue one request's copy (charged to the iteration)
    iteration_overhead: float = 0.0      # s of host work per iteration, on top of the launches
    source: str = ""                     # where the numbers come from
    decode_row_buckets: tuple[int, ...] = ()     # launch padding (see the module doc); () none
    prefill_token_buckets: tuple[int, ...] = ()
    block_size: int = 0                  # 0: a decode reads its rows' own context
    block_buckets: tuple[int, ...] = ()
    min_launch_blocks: int = 0
    max_prefill_seqs: int = 0            # prompts per prefill launch (0: all of an iteration's in one)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not isinstance(self.source, str):
            raise ValueError(f"cost model: name and source are strings, got {self.name!r:.40} and {self.source!r:.40}")
        for name in ("kv_capacity_tokens", "kv_bytes_per_token", "block_size", "min_launch_blocks"):
            v = getattr(self, name)                         # a fractional one failed each iteration (2026-12-07)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v < math.inf or v != int(v):
                raise ValueError(f"cost model {self.name!r}: {name} is an integer >= 0, got {v!r:.40}")
            object.__setattr__(self, name, int(v))
        for xs_name, ys_name in (("prefill_tokens", "prefill_seconds"), ("decode_batch", "decode_seconds")):
            xs = tuple(int(x) for x in getattr(self, xs_name))
            ys = tuple(float(y) for y in getattr(self, ys_name))
            object.__setattr__(self, xs_name, xs)
            object.__setattr__(self, ys_name, ys)
            if not xs or len(xs) != len(ys):
                raise ValueError(f"cost model {self.name!r}: {xs_name} and {ys_name} must be equally long and "
                                 f"non-empty, got {len(xs)} and {len(ys)} entries")
            if list(xs) != sorted(set(xs)) or xs[0] < 1:
                raise ValueError(f"cost model {self.name!r}: {xs_name} must be strictly increasing and >= 1, got {xs}")
            if not all(0 < y < math.inf for y in ys):         # NaN too: a simulation on it never ended
                raise ValueError(f"cost model {self.name!r}: {ys_name} must be positive and finite, got {ys}")
        if not isinstance(self.max_prefill_seqs, int) or isinstance(self.max_prefill_seqs, bool) \
                or self.max_prefill_seqs < 0:
            raise ValueError(f"cost model {self.name!r}: max_prefill_seqs is an integer >= 0 (0: no limit), "
                             f"got {self.max_prefill_seqs!r}")
        if not isinstance(self.prefill_self_attention, bool):
            raise ValueError(f"cost model {self.name!r}: prefill_self_attention is true or false, "
                             f"got {self.prefill_self_attention!r}")
        for name in ("decode_row_buckets", "prefill_token_buckets", "block_buckets"):
            b = tuple(int(x) for x in getattr(self, name))
            object.__setattr__(self, name, b)
            if list(b) != sorted(set(b)) or (b and b[0] < 1):
                raise ValueError(f"cost model {self.name!r}: {name} must be strictly increasing and >= 1, got {b}")
        if self.block_size < 0 or (self.block_size > 0) != bool(self.block_buckets):
            raise ValueError(f"cost model {self.name!r}: block_size and block_buckets go together (both set for "
                             f"padded context reads, or neither), got {self.block_size} and {self.block_buckets}")
        if not all(0 <= v < math.inf for v in (self.decode_context, self.prefill_context,   # NaN too
                                               self.kv_capacity_tokens, self.kv_bytes_per_token, self.swap_bandwidth,
                                               self.swap_latency, self.swap_issue_seconds, self.iteration_overhead)):
            raise ValueError(f"cost model {self.name!r}: context coefficients, kv_capacity_tokens, kv_bytes_per_token, "
                             "the swap figures and iteration_overhead must be finite and >= 0")

    # -- queries ---------------------------------------------------------------------------
    def prefill_time(self, num_tokens: int, context: int = 0) -> float:
        """One prefill launch of `num_tokens` new tokens after `context` cached ones."""
        if num_tokens <= 0:
            return 0.0
        return _interp(num_tokens, self.prefill_tokens, self.prefill_seconds) + \
            self.prefill_context * num_tokens * context

    def decode_time(self, batch: int, context_tokens: int = 0) -> float:
        """One decode launch of `batch` sequences reading `context_tokens` cached tokens in all."""
        if batch <= 0:
            return 0.0
        return _interp(batch, self.decode_batch, self.decode_seconds) + self.decode_context * context_tokens

    def padded_read(self, rows: int, longest: int) -> int:
        """Context tokens a decode launch of `rows` padded rows reads beyond what it reads at a
        context of one token (the table's own point), when reads are padded (block_size set):
        rows x (its block bucket - the 1-token bucket) x block_size. 0 when they are not."""
        if not self.block_size:
            return 0
        return rows * (self._row_blocks(rows, longest) - self._row_blocks(rows, 1)) * self.block_size

    def _row_blocks(self, rows: int, tokens: int) -> int:
        """Blocks each row of a decode launch gathers: the bucket of the longest row, at least
        the largest bucket whose rows x blocks stay within min_launch_blocks (LaunchBuilder.floor)."""
        bb = self.block_buckets
        under = [b for b in bb if rows * b <= self.min_launch_blocks]
        return max(_pad(-(-tokens // self.block_size), bb), under[-1] if under else bb[0])

    def decode_launch_time(self, batch: int, context_tokens: int, longest: int) -> float:
        """One decode launch as the profiled engine runs it: `batch` sequences reading
        `context_tokens` in all, the longest `longest`, with the launch padding applied."""
        if batch <= 0:
            return 0.0
        rows = _pad(batch, self.decode_row_buckets)
        read = self.padded_read(rows, longest) if self.block_size else context_tokens
        return _interp(rows, self.decode_batch, self.decode_seconds) + self.decode_context * read

    def iteration_time(self, decode_contexts: Iterable[int], prefill_chunks: Sequence[tuple[int, int]]) -> float:
        """One iteration: a decode launch over sequences with these contexts, plus packed
        prefill launches of (num_tokens, earlier_context) chunks (one per max_prefill_seqs of
        them, in order; one if that is 0), plus the host's iteration_overhead."""
        batch = ctx = top = 0
        for c in decode_contexts:
            batch += 1
            ctx += c
            if c > top:
                top = c
        t = self.iteration_overhead + self.decode_launch_time(batch, ctx, top)
        if prefill_chunks:
            per = self.max_prefill_seqs or len(prefill_chunks)
            most = self.prefill_token_buckets[-1] if self.prefill_token_buckets else math.inf
            blocks = self.block_buckets[-1] if self.block_size and self.block_buckets else math.inf
            count = n = held = 0
            for k, c in prefill_chunks:           # runner/launch.py's split_prefill
                nb = -(-(c + k) // self.block_size) if blocks != math.inf else 0
                if count and (count == per or n + k > most or held + nb > blocks):
                    t += _interp(_pad(n, self.prefill_token_buckets), self.prefill_tokens, self.prefill_seconds)
                    count = n = held = 0
                count, n, held = count + 1, n + k, held + nb
            t += _interp(_pad(n, self.prefill_token_buckets), self.prefill_tokens, self.prefill_seconds)
            own = 0.5 if self.prefill_self_attention else 0.0
            t += self.prefill_context * sum(k * (c + own * k) for k, c in prefill_chunks)
        return t

    def swap_time(self, num_tokens: int) -> float:
        """One copy of `num_tokens` tokens of KV between device and host."""
        if not (self.kv_bytes_per_token and self.swap_bandwidth):
            raise ValueError(f"cost model {self.name!r} has no kv_bytes_per_token and swap_bandwidth, which the "
                             "transfer-time model needs: add them to its table, or simulate with "
                             "--swap-policy recompute")
        return self.swap_latency + num_tokens * self.kv_bytes_per_token / self.swap_bandwidth

    # -- files -----------------------------------------------------------------------------
    def to_json(self) -> dict:
        return asdict(self)

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        # several processes may save the same profile, each as pid 1 in its own pod
        tmp = f"{path}.{os.getpid()}-{uuid.uuid4().hex[:16]}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(self.to_json(), f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):     # a full disk: leave no partial file behind
                os.unlink(tmp)
            raise

    @classmethod
    def from_json(cls, d: dict) -> "CostModel":
        if not isinstance(d, dict):
            raise ValueError(f"a cost model table is a JSON object, got {type(d).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"cost model table has unknown keys {unknown}; valid keys are {sorted(known)}")
        required = [k for k, f in cls.__dataclass_fields__.items() if f.default is MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"cost model table lacks the key(s) {missing}; {', '.join(required)} are required")
        try:
            return cls(**d)
        except TypeError as e:      # a list where a number belongs, or a number where a list does
            raise ValueError(f"cost model {d['name']!r}: a value has the wrong type ({e}); the tables are lists "
                             "of numbers, the other figures numbers") from None

    @classmethod
    def load(cls, name_or_path: str) -> "CostModel":
        """A shipped table by name (see `shipped_cost_models()`) or a JSON file path."""
        path = name_or_path
        if not os.path.isfile(path):
            path = os.path.join(SHIPPED_DIR, f"{name_or_path}.json")
        if not os.path.isfile(path):
            raise ValueError(f"no cost model {name_or_path!r}: give a JSON file path or one of the shipped "
                             f"names {shipped_cost_models()}")
        with open(path) as f:
            try:
                return cls.from_json(json.load(f))
            except (ValueError, RecursionError) as e:     # JSON or UTF-8 that does not parse (or nests
                raise ValueError(f"cost model file {path}: {e}") from None      # past Python's stack), a bad table


def shipped_cost_models() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(SHIPPED_DIR) if f.endswith(".json"))


def plan_time(cost: CostModel, scheduled) -> float:
    """Seconds one iteration of `scheduled` (ScheduledRequests, before they run) takes.

    Like runner.build_launches: 1-token items form the decode launch, the rest one prefill launch."""
    dec, pre = [], []
    for s in scheduled:
        c = s.request.num_computed_tokens
        if s.num_tokens == 1:
            dec.append(c + 1)
        else:
            pre.append((s.num_tokens, c))
    return cost.iteration_time(dec, pre)
