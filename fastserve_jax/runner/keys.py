"""Typed keys of the compiled executables, one kind per table.

Every executable serving can call is compiled at warm-up under one of these keys, and looked
up by it afterwards (`ModelRunner.executable`, `ModelRunner.sampler`). Frozen dataclasses,
so a decode key never equals a prefill key with the same numbers.

    DecodeKey(rows, blocks)        R sequences x 1 token, each row gathering `blocks` blocks
    PrefillKey(tokens, blocks)     `tokens` packed prefill tokens (rows of prefill_tile), each
                                   row gathering up to `blocks` blocks; prompt_logprobs=True: the
                                   variant that also returns every token's prompt logprobs
                                   (fastserve_jax/prompt_logprobs.py), never warmed up
    SamplerKey(rows, greedy, logprobs, penalties)
                                   one sampler variant over `rows` logits rows
    SwapKey(op, run, stage)        a gather ("gather") or donated scatter ("scatter") of `run`
                                   blocks of one pipeline stage's cache (kv_transfer.py)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecodeKey:
    rows: int
    blocks: int

    kind = "decode"
    prompt_logprobs = False      # a decode launch computes none (PrefillKey's variant does)

    @property
    def tokens(self) -> int:
        """Query tokens in the launch (one per row)."""
        return self.rows


@dataclass(frozen=True)
class PrefillKey:
    tokens: int
    blocks: int
    prompt_logprobs: bool = False

    kind = "prefill"


LaunchKey = DecodeKey | PrefillKey


def launch_key_to_wire(key: LaunchKey) -> list:
    """A plain list for the multi-host plan channel (and JSON reports); a prompt-logprobs
    prefill has a fourth entry, true."""
    if key.kind == "prefill":
        return ["prefill", key.tokens, key.blocks] + ([True] if key.prompt_logprobs else [])
    return [key.kind, key.rows, key.blocks]


def launch_key_from_wire(wire: list) -> LaunchKey:
    kind, size, blocks, *variant = wire
    cls = {"decode": DecodeKey, "prefill": PrefillKey}.get(kind)
    if cls is None or (variant and cls is DecodeKey):
        raise ValueError(f"unknown launch {wire!r}")
    return cls(int(size), int(blocks), *map(bool, variant))


@dataclass(frozen=True)
class SamplerKey:
    rows: int
    greedy: bool
    logprobs: bool
    penalties: bool


def key_to_wire(key: LaunchKey | SamplerKey) -> list:
    """A launch or sampler key as a plain list (the plan channel's run_once message)."""
    if isinstance(key, SamplerKey):
        return ["sampler", key.rows, key.greedy, key.logprobs, key.penalties]
    return launch_key_to_wire(key)


def key_from_wire(wire: list) -> LaunchKey | SamplerKey:
    if wire[0] == "sampler":
        return SamplerKey(int(wire[1]), bool(wire[2]), bool(wire[3]), bool(wire[4]))
    return launch_key_from_wire(wire)


@dataclass(frozen=True)
class SwapKey:
    op: str          # "gather" (device blocks -> a run to copy out) or "scatter" (a run -> cache);
                     # "_host" on the fused path's (the run in host memory: kv_transfer.py)
    run: int         # blocks in the run (a power of two)
    stage: int       # pipeline stage whose cache it reads or updates
