"""One request's host-side state: tokens, status, progress, scheduling bookkeeping, metrics."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from fastserve_jax.bad_words import BadWords
from fastserve_jax.config import SamplingParams

if TYPE_CHECKING:
    from fastserve_jax.length_prediction import LengthPrediction


class RequestStatus(enum.Enum):
    WAITING = "waiting"        # admitted, no KV yet (or dropped for recomputation)
    RUNNING = "running"        # has KV on device; may be paused between iterations
    FINISHED = "finished"


@dataclass
class RequestMetrics:
    """Wall-clock times (time.monotonic seconds) of a request's milestones."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def latency(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time


@dataclass(frozen=True)
class Logprob:
    """vLLM's: a token's logprob, its rank in the distribution (1 = the likeliest; the count of
    tokens at least as likely, over the whole vocabulary) and its text (LLM's outputs; else None)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass(frozen=True)
class TokenLogprobs(Mapping):
    """Logprob of the sampled (or prompt) token and the top-n alternatives (raw model
    distribution), likeliest first. It is also vLLM's entry, a mapping {token id: Logprob}
    of the token and its alternatives: `entry[token_id].logprob`, `entry.items()`."""

    token_id: int
    logprob: float
    top: dict[int, float]
    # the token's rank in the whole distribution (1 = the likeliest; sampling.token_rank)
    rank: int | None = None
    texts: dict[int, str] | None = field(default=None, repr=False, compare=False)   # Logprob.decoded_token

    def __getitem__(self, token_id: int) -> Logprob:
        text = self.texts.get(token_id) if self.texts is not None else None
        if token_id == self.token_id:
            return Logprob(self.logprob, self.rank, text)
        if token_id in self.top:
            return Logprob(self.top[token_id], list(self.top).index(token_id) + 1, text)
        raise KeyError(token_id)

    def __contains__(self, token_id) -> bool:
        return token_id == self.token_id or token_id in self.top

    def __iter__(self):
        yield self.token_id
        yield from (t for t in self.top if t != self.token_id)

    def __len__(self) -> int:
        return len(self.top) + (self.token_id not in self.top)


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_time: float
    prompt: str | None = None
    seed: int = 0                          # resolved sampling seed (SamplingParams.seed or engine-derived)
    eos_token_ids: frozenset[int] = frozenset()
    bad_words: BadWords | None = None      # SamplingParams.bad_words tokenized (admission.py)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0           # tokens whose K/V are in the cache
    num_cached_tokens: int = 0             # prompt tokens its first prefill took from the prefix cache
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None       # "stop" | "length" | "abort"
    stop_reason: int | str | None = None   # stop_reason()
    output_text: str = ""
    logprobs: list[TokenLogprobs] | None = None
    # SamplingParams.prompt_logprobs: entry i is prompt token i's (entry 0 None), filled as the
    # prefill chunks come back (fastserve_jax/prompt_logprobs.py)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    # scheduling state, owned by the policy
    queue_level: int = 0
    attained_service: float = 0.0          # seconds of step time received in the current queue
    num_preemptions: int = 0
    # predicted distribution of the total output length; set by the engine or the simulator
    # on requests of an iteration's plan before scheduler.on_iteration (scheduler/base.py)
    length_prediction: LengthPrediction | None = None
    # in a batch dispatched but not yet collected (pipeline mode keeps several in flight): it
    # cannot be scheduled again, nor lose its KV, until its token is back
    in_flight: bool = False
    # Async scheduling (engine.py) only: tokens sampled by dispatched batches, not back yet
    # (counted in num_tokens, so the next batch's plan sees them); the newest one's index in
    # the runner's device token box (runner/token_box.py), -1 when a batch may not read it;
    # the latest batch that holds the request.
    pending_tokens: int = 0
    token_slot: int = -1
    flight_batch: int = -1
    metrics: RequestMetrics = field(init=False)
    # the prompt's distinct token ids, made on first use (the repetition penalty's, every step)
    _prompt_set: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    # penalty_history's buffer, the output list it mirrors, its prompt entries and its length
    _history: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    _history_of: list[int] | None = field(default=None, init=False, repr=False, compare=False)
    _history_at: int = field(default=0, init=False, repr=False, compare=False)
    _history_len: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.metrics = RequestMetrics(self.arrival_time)
        if self.sampling.logprobs is not None:
            self.logprobs = []
        if self.sampling.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def distinct_prompt_tokens(self) -> np.ndarray:
        """(P,) int32 the prompt's token ids, each once (sorted); made once per request: for a
        32k-token prompt np.unique takes milliseconds, a copy of its result microseconds."""
        if self._prompt_set is None:
            self._prompt_set = np.unique(np.asarray(self.prompt_token_ids, np.int32))
        return self._prompt_set

    def penalty_history(self, with_prompt: bool) -> tuple[np.ndarray, int]:
        """(L,) int32 the sampler's history of this request (sampling.Penalties): the prompt's
        distinct tokens where with_prompt, then the output so far; and how many entries are the
        prompt's. Kept between calls and grown by the tokens appended since the last, so a step
        converts one token, not the whole output (penalty_arrays at 32 rows of 1,000 output
        tokens, max_model_len 8,192: 0.62 ms a step before, 0.10 after; bench_penalty_history.py).
        Made anew where output_token_ids is another list, shorter, or differs at the last token
        mirrored (the engine only appends). The entries returned never change afterwards."""
        out = self.output_token_ids
        at = len(self.distinct_prompt_tokens()) if with_prompt else 0
        buf, n = self._history, self._history_len
        if buf is None or out is not self._history_of or at != self._history_at or n - at > len(out) or \
                (n > at and buf[n - 1] != out[n - at - 1]):
            buf, n = np.empty(2 * (at + len(out)) + 16, np.int32), at
            if with_prompt:
                buf[:at] = self._prompt_set
            self._history, self._history_of, self._history_at = buf, out, at
        end = self._history_len = at + len(out)
        if end > n:
            if end > len(buf):               # doubled: a copy of what is there, amortized
                grown = np.empty(2 * end, np.int32)
                grown[:n] = buf[:n]
                buf = self._history = grown
            buf[n:end] = out[n - at:]
        return buf[:end], at

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.pending_tokens

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose ids the host has (all but async scheduling's pending ones)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_pending_tokens(self) -> int:
        """Tokens whose K/V still has to be computed before the next token can be sampled."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def outputs(self) -> list[CompletionOutput]:
        """vLLM's RequestOutput.outputs: an engine loop reads step()'s requests as vLLM's outputs."""
        return output_of(self).outputs


@dataclass
class CompletionOutput:
    """One of a prompt's completions (vLLM's name): `index` is its place among the n."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprobs] | None = None
    stop_reason: int | str | None = None       # stop_reason()

    @property
    def cumulative_logprob(self) -> float | None:
        """vLLM's: the sum of the output tokens' logprobs, where logprobs were asked for."""
        return None if self.logprobs is None else float(sum(lp.logprob for lp in self.logprobs))

    def finished(self) -> bool:
        """vLLM's: whether this completion ended (it has a finish reason)."""
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's output so far (final when `finished`). text, token_ids, finish_reason and
    logprobs are the first completion's; `outputs` holds all n (vLLM's layout; n > 1 only
    from `LLM.generate`, whose metrics are then the first completion's). prompt_logprobs:
    one entry per prompt token, the first None (SamplingParams.prompt_logprobs).
    num_cached_tokens: prompt tokens its first prefill found in the prefix cache (vLLM's field;
    0 with caching off)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    metrics: RequestMetrics
    logprobs: list[TokenLogprobs] | None = None
    outputs: list[CompletionOutput] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    num_cached_tokens: int = 0
    stop_reason: int | str | None = None

    def __post_init__(self) -> None:
        if not self.outputs:
            self.outputs = [CompletionOutput(0, self.text, self.token_ids, self.finish_reason, self.logprobs,
                                             self.stop_reason)]

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)


def stop_reason(req: Request, matched: str | None, tokenizer_eos: int | None) -> int | str | None:
    """vLLM's stop_reason of a finished request: the stop string that ended it (`matched`), or
    the token that did; None where it ended at the tokenizer's EOS (`tokenizer_eos`), at its
    length or by an abort. The configs' other EOS ids are stop tokens in vLLM
    (update_from_generation_config), so they are their own stop_reason."""
    if req.finish_reason != "stop":
        return None
    if matched is not None:
        return matched
    token = req.output_token_ids[-1]
    return None if token == tokenizer_eos and token in req.eos_token_ids else token


def output_of(req: Request) -> RequestOutput:
    """The request's output so far (LLMEngine.output_of)."""
    return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, req.output_text,
                         list(req.output_token_ids), req.finish_reason, req.metrics,
                         list(req.logprobs) if req.logprobs is not None else None, [],
                         None if req.prompt_logprobs is None else list(req.prompt_logprobs), req.num_cached_tokens,
                         req.stop_reason)
