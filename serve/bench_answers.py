"""Checking bench's answers: each counting request's exact count (the demo model), each random
one's exact length, the demo model's own misses told apart from the engine's (bench_cmd.py, and
the scripts that run servers of their own)."""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter

import numpy as np

from fastserve_jax.serve import bench_client
from fastserve_jax.serve.bench_random import length_problem


def report_problems(m: dict, shown: int = 5) -> None:
    """A row's failed and wrong requests on stderr: the reasons, counted, and the first few."""
    if not m["problems"]:
        return
    reasons = Counter(p.split(": ", 1)[1] if " failed: " in p else "wrong answer" for p in m["problems"])
    print("    " + ", ".join(f"{n} x {why}" for why, n in reasons.most_common()), file=sys.stderr)
    for p in m["problems"][:shown]:
        print(f"    {p}", file=sys.stderr)


def failure(r: bench_client.Result) -> str:
    """Why a request failed, in words: its status and the error body's message (OpenAI's
    {"error": {"message": ...}}), else what the client saw."""
    try:
        message = json.loads(r.error)["error"]["message"]
    except (TypeError, ValueError, KeyError):
        return r.error or f"status {r.status}"
    return f"status {r.status}: {message}" if r.status else message


def own_misses(url: str, work, results: list[bench_client.Result], wrong: list[int], api_key: str | None) -> set[int]:
    """Of the requests `wrong` (indices into work and results), those whose counting answer the
    demo model gives on its own: sent again alone (greedy, so the batch does not change it),
    the same text comes back. The model misses about 0.6% of counts (models/demo/TRAINING.md),
    which bench counted as engine errors (a default run reported one and exited 1)."""
    out = set()
    for i in wrong:
        payload, want = work[i]
        if not isinstance(want, tuple):
            continue
        [alone] = asyncio.run(bench_client.run_load(url, [payload], [0.0], api_key=api_key))
        if alone.ok and alone.text == results[i].text:
            out.add(i)
    return out


def answer_problem(r: bench_client.Result, want) -> str | None:
    """What is wrong with a completed answer (None: nothing): `want` is a counting request's
    (A, B), or a random-dataset request's exact length (bench_random.py)."""
    if not isinstance(want, tuple):
        return length_problem(r, want)
    from fastserve_jax.models import demo_task
    if not demo_task.check_answer(*want, r.text) or r.completion_tokens != demo_task.answer_num_tokens(*want):
        return (f"{r.completion_tokens} tokens (want {demo_task.answer_num_tokens(*want)}), "
                f"text {r.text[:80]!r}...{r.text[-40:]!r}")
    return None


def answer_problems(results: list[bench_client.Result], work, what: str = "request", numbered: bool = False) -> list:
    """Every request that failed or whose answer is wrong (answer_problem), in words (with
    `numbered`, as (its index, the words))."""
    out = []
    for i, (r, (_, want)) in enumerate(zip(results, work)):
        name = f"{what} {i} " + (f"(count from {want[0]} to {want[1]})" if isinstance(want, tuple) else
                                 f"({want} tokens)")
        problem = None if not r.ok else answer_problem(r, want)
        if not r.ok:
            out.append((i, f"{name} failed: {failure(r)}"))
        elif problem:
            out.append((i, f"{name}: {problem}"))
    return out if numbered else [words for _, words in out]


def raise_on_problems(policy: str, log_name: str, problems: list[str]) -> None:
    """A run with a wrong or failed answer is no measurement: stop, saying which and where."""
    if problems:
        raise RuntimeError(f"{policy}: {len(problems)} wrong or failed answer(s) (server log {log_name}):\n  "
                           + "\n  ".join(problems[:10]))


def screen_pairs(llm, works: list[list], seed: int, rounds: int = 10) -> tuple[list[list], int]:
    """`works`: lists of build_workload's (payload, (A, B)), with every pair replaced until the demo
    model answers it exactly. The model misses about 0.6% of counts by itself (models/demo/
    TRAINING.md: 99.4% exact, early stops near carries), which a bench would count as engine
    errors. Every pair runs greedily on `llm` (an LLM over the demo model, all in one generate
    call: greedy output does not depend on the batch); each miss is replaced by a pair of the same
    span (a new A). Returns the screened lists and how many pairs were replaced."""
    from fastserve_jax.models import demo_task
    from fastserve_jax import SamplingParams

    rng = np.random.default_rng([seed, 0x5C4EE7])
    works = [list(w) for w in works]
    todo = [(i, j) for i, w in enumerate(works) for j in range(len(w))]
    replaced = 0
    for _ in range(rounds):
        pairs = [works[i][j][1] for i, j in todo]
        outs = llm.generate([demo_task.make_prompt(a, b) for a, b in pairs],
                            [SamplingParams(max_tokens=demo_task.answer_num_tokens(a, b), temperature=0)
                             for a, b in pairs])
        todo = [(i, j) for (i, j), (a, b), o in zip(todo, pairs, outs) if not demo_task.check_answer(a, b, o.text)]
        if not todo:
            return works, replaced
        for i, j in todo:
            payload, (a, b) = works[i][j]
            a, b = demo_task.pair_for_output_len(b - a + 2, rng)
            works[i][j] = (dict(payload, prompt=demo_task.make_prompt(a, b)), (a, b))
        replaced += len(todo)
    raise RuntimeError(f"{len(todo)} pairs still answered wrongly by the demo model after {rounds} redraws")
