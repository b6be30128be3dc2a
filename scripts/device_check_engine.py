"""Part of scripts/device_check.py: the whole engine's decode tokens/s, measured the way the
transformers baseline is (hf_decode), so the two compare like for like.

The backend cells of device_check.py time one forward of a launch: no scheduling, sampling,
detokenizing or host work between steps, which transformers `generate` pays for in its own
figure. Here the engine's loop serves `batch` prompts of `context - new` token ids
(decode_prompt_len), once for 1 output token and once for 1 + new (greedy, EOS ignored), and a
decode step is the difference over `new`, the best of `repeats` runs each, exactly as
hf_decode takes transformers'. Both
runs are served once first, so every shape they need is compiled before the timing (the
engine compiles lazily). The model is the random-weight one of the backend cells; its
tokenizer is the byte-level one random checkpoints get (models/random_checkpoint.py), so
detokenizing costs what a real tokenizer's incremental decode costs. A backend named
"<backend>+async" runs the engine with async scheduling (the next iteration planned and
dispatched while the device runs the last), to show how much host time that hides.
"""

from __future__ import annotations

import os
import tempfile
import time

from bench_engine_machine import best_of


def decode_prompt_len(context: int, new: int) -> int:
    """Prompt tokens for a decode cell at `context`: its decode steps' contexts end there, in the
    launch cell's block bucket. (Centred on it, as until 2026-12-04, half of them crossed into
    the next power-of-two bucket; padding entries read the null block. On CPU that made no
    measurable difference: 78.4 against 79.0 ms a step, a random 125M Llama at batch 8 around
    512 tokens, so it does not explain the H200's async engine running 1.9 ms a step over its
    forward at 32 x 512.)"""
    return context - new


def decode_cell(run, batch: int, context: int, new: int, repeats: int) -> dict | str:
    """Decode tokens/s from run(n) (generate n tokens for `batch` prompts of about `context`
    tokens): (t(1 + new) - t(1)) / new per step, each time the best of `repeats`; how both
    transformers (device_check.hf_decode) and the engine are timed. A difference that noise
    makes non-positive (a busy CPU in the smoke test gave one) is reported as such."""
    t = [best_of(lambda: run(n), repeats) for n in (1, 1 + new)]
    step = (t[1] - t[0]) / new
    return (dict(batch=batch, context=context, step_ms=1e3 * step, tokens_per_s=batch / step) if step > 0
            else f"noisy: {1e3 * t[1]:.1f} ms for {1 + new} tokens, {1e3 * t[0]:.1f} for 1")


def engine_decode(backend: str, model_cfg, params_fn, dtype: str, batches, contexts, new: int, block_size: int,
                  max_batched_tokens: int, deadline: float, repeats: int, out: dict, saved) -> dict:
    """Fills `out` with "<batch>x<context>": {batch, context, step_ms, tokens_per_s} (or why
    not) for one attention backend ("<backend>+async": with async scheduling), calling saved()
    after each cell; params_fn() draws the model's params on the device."""
    import numpy as np

    from fastserve_jax.config import EngineConfig, SamplingParams
    from fastserve_jax.engine import LLMEngine
    from fastserve_jax.models.random_checkpoint import save_byte_tokenizer
    from fastserve_jax.models.tokenizer import load_tokenizer
    from fastserve_jax.stats import PHASES

    os.environ.setdefault("FASTSERVE_JAX_LENGTHS_DIR", "off")     # nothing learned is read or written
    with tempfile.TemporaryDirectory() as tmp:
        save_byte_tokenizer(tmp, model_cfg.vocab_size, None)
        tokenizer = load_tokenizer(tmp)
    max_len = max(contexts) + new
    blocks = max(batches) * -(-max_len // block_size) + 1
    cfg = EngineConfig(dtype=dtype, max_model_len=max_len, max_num_seqs=max(batches), block_size=block_size,
                       max_num_batched_tokens=max_batched_tokens, num_device_blocks=blocks, num_host_blocks=0,
                       swap_policy="recompute", scheduler="fcfs", attention_backend=backend.split("+")[0],
                       async_scheduling=backend.endswith("+async"))
    engine = LLMEngine(model_cfg, params_fn(), tokenizer, cfg, warmup="lazy", own_params=True)
    rng = np.random.default_rng(0)

    # the device phase split: the runner's dispatch (host work: the launches queued) and its
    # collect (mostly the wait for a batch's tokens), timed around the engine's own calls
    split = dict(dispatch=0.0, collect=0.0)

    def timed(name: str, fn):
        def run(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                split[name] += time.perf_counter() - t
        return run

    engine.runner.dispatch = timed("dispatch", engine.runner.dispatch)
    engine.runner.collect = timed("collect", engine.runner.collect)
    phases: dict[int, dict] = {}                   # n -> ms per iteration of each phase, its last run
    tokens: dict[int, list] = {}                   # n -> each row's greedy tokens, its last run

    def serve(prompts, n: int) -> None:
        st = engine.stats
        totals = lambda: {"iterations": st.iterations, **{k: getattr(st, k) for k in PHASES}, **split}  # noqa: E731
        before = totals()
        sp = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        reqs = [engine.add_request(p, sp) for p in prompts]
        while engine.has_unfinished():
            engine.step()
        assert all(len(r.output_token_ids) == n for r in reqs)
        tokens[n] = [list(map(int, r.output_token_ids)) for r in reqs]
        delta = {k: v - before[k] for k, v in totals().items()}
        its = delta.pop("iterations")
        phases[n] = {k: 1e3 * v / its for k, v in delta.items()}

    for ctx in contexts:
        for b in batches:
            if time.perf_counter() > deadline:
                out[f"{b}x{ctx}"] = "skipped (time)"
                continue
            prompts = [[int(t) for t in rng.integers(3, model_cfg.vocab_size, decode_prompt_len(ctx, new))]
                       for _ in range(b)]
            for n in (1, 1 + new):                     # compiles what the timed runs need
                serve(prompts, n)
            cell = out[f"{b}x{ctx}"] = decode_cell(lambda n: serve(prompts, n), b, ctx, new, repeats)
            if isinstance(cell, dict):     # where an iteration of the 1 + new run went (mostly decode steps)
                ph = dict(phases[1 + new])
                cell["device_phase_split_ms"] = {k: ph.pop(k) for k in split}
                cell["phase_ms_per_iteration"], cell["tokens"] = ph, tokens[1 + new]
            saved()
    return out


def agreement(a: list, b: list) -> str:
    """How far two engines' greedy tokens for the same prompts agree: rows identical, and the
    mean length of the rows' common prefix (bf16 near-ties may part them late; early is a defect)."""
    prefix = [next((i for i, (x, y) in enumerate(zip(r, s)) if x != y), min(len(r), len(s))) for r, s in zip(a, b)]
    same = sum(r == s for r, s in zip(a, b))
    return f"{same}/{len(a)} rows identical, common prefix {sum(prefix) / len(prefix):.1f} of {len(a[0])} tokens"
