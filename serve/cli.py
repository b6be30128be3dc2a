"""The `fastserve-jax` command line.

    fastserve-jax serve                                     # OpenAI-compatible server, demo model, :8000
    fastserve-jax generate "count from 3 to 12:"            # the bundled demo model
    fastserve-jax generate --model DIR -p "Hello" -p "Hi" --max-tokens 32 --temperature 0.7
    fastserve-jax simulate --help                           # policies on a trace, no model needed
    fastserve-jax bench --help                              # HTTP load against a server
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

from fastserve_jax.serve.bench_cmd import add_bench_parser
from fastserve_jax.serve.engine_args import add_engine_args, cpu_devices_for, engine_kwargs
from fastserve_jax.serve.serve_cmd import add_serve_parser
from fastserve_jax.serve.server_args import vllm_refusal
from fastserve_jax.serve.simulate_cmd import add_simulate_parser
from fastserve_jax.vllm_options import refusal


class StatusLine:
    """One line of progress on a terminal (rewritten in place); plain lines in a log."""

    def __init__(self, stream=None) -> None:
        self.stream = stream if stream is not None else sys.stderr     # the current one, not import time's
        self.tty = self.stream.isatty()
        self._last = -1

    def show(self, text: str) -> None:
        if self.tty:
            print(f"\r\033[K{text}", end="", file=self.stream, flush=True)
        else:
            print(text, file=self.stream, flush=True)

    def compiling(self, done: int, total: int) -> None:
        """A warm-up progress callback: every job on a terminal, each quarter in a log."""
        quarter = 4 * done // total
        if self.tty or quarter != self._last:
            self._last = quarter
            self.show(f"compiling {done}/{total}")

    def done(self, text: str) -> None:
        if self.tty:
            print("\r\033[K", end="", file=self.stream)
        print(text, file=self.stream, flush=True)


def cmd_generate(a: argparse.Namespace) -> int:
    t0 = time.monotonic()
    from fastserve_jax import LLM, SamplingParams
    from fastserve_jax.runner.compile_guard import compile_stats

    # flags given here win; the rest come from the model's generation_config.json (unless
    # --generation-config vllm), and a temperature neither sets is 0: greedy, this command's default
    given = {k: v for k, v in (("temperature", a.temperature), ("top_p", a.top_p), ("top_k", a.top_k),
                               ("repetition_penalty", a.repetition_penalty), ("min_p", a.min_p)) if v is not None}
    fixed = dict(max_tokens=a.max_tokens, seed=a.seed_sampling, stop=a.stop or None, ignore_eos=a.ignore_eos)
    try:
        SamplingParams(**fixed, **given)                   # a bad flag fails before the model loads
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prompts = a.prompt_pos + (a.prompt or [])
    if not prompts:
        prompts = ["count from 3 to 12:", "count from 250 to 300:", "count from 0 to 7:"]
    status = StatusLine()
    status.show(f"loading {a.model or 'the demo model'}")
    start = compile_stats()
    try:
        llm = LLM(a.model, progress=status.compiling, **engine_kwargs(a))
    except ValueError as e:     # a bad engine setting or model directory, said before anything loads
        status.done(f"error: {e}")
        return 2
    status.show(f"generating ({llm.engine.warmup_mode} compile: new shapes compile as batches need them)"
                if llm.engine.warmup_mode == "lazy" else "generating")
    try:
        outs = llm.generate(prompts, SamplingParams(**fixed, **{"temperature": 0.0, **llm.engine.sampling_defaults,
                                                                **given}))
    except ValueError as e:
        status.done(f"error: {e}")
        return 2
    compiled = compile_stats().since(start)
    first = min(o.metrics.first_token_time for o in outs) - t0
    ran = llm.engine.runner.first_run_seconds
    ran = f" ({ran:.1f} s of it running each program once)" if ran else ""
    status.done(f"load {llm.startup_seconds - llm.engine.warmup_seconds:.1f} s, warm-up ({llm.engine.warmup_mode}) "
                f"{llm.engine.warmup_seconds:.1f} s{ran}, compiled {compiled.describe()} "
                f"({compiled.backend_seconds:.1f} s of XLA time), first token {first:.1f} s after start, "
                f"all done in {time.monotonic() - t0:.1f} s")
    with contextlib.suppress(AttributeError, ValueError):     # a stdout that cannot say a character (PYTHONIOENCODING
        sys.stdout.reconfigure(errors="backslashreplace")      # =ascii) escapes it: a traceback lost it (2026-12-07)
    for o in outs:
        m = o.metrics
        print(f"prompt: {o.prompt!r}\noutput: {o.text!r}\n  tokens={len(o.token_ids)} finish={o.finish_reason} "
              f"ttft={m.ttft * 1e3:.0f} ms latency={m.latency * 1e3:.0f} ms")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="fastserve-jax",
        description="FastServe-style LLM serving on JAX. Every command uses the bundled demo model unless "
                    "--model names a Hugging Face model directory (or a repo id in the local Hugging Face "
                    "cache); the first start compiles for a while "
                    "(compiled code is cached in ~/.cache/fastserve_jax for later starts).")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve_parser(sub)
    g = sub.add_parser("generate", help="generate completions for prompts given on the command line",
                       description="Generate completions for one or more prompts and print them with timings.")
    g.add_argument("prompt_pos", nargs="*", metavar="PROMPT", help="prompt text (several allowed)")
    g.add_argument("-p", "--prompt", action="append", help="another prompt (repeatable)")
    g.add_argument("--max-tokens", type=int, default=300)
    g.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (the default, unless the model's generation_config.json sets one)")
    g.add_argument("--top-p", type=float, default=None, help="(default: the model's, else 1 = off)")
    g.add_argument("--top-k", type=int, default=None, help="(default: the model's, else -1 = off)")
    g.add_argument("--repetition-penalty", type=float, default=None, help="(default: the model's, else 1 = off)")
    g.add_argument("--min-p", type=float, default=None, help="(default: the model's, else 0 = off)")
    g.add_argument("--seed-sampling", type=int, default=None, help="per-request sampling seed")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    add_engine_args(g)
    g.set_defaults(func=cmd_generate)
    add_simulate_parser(sub)
    add_bench_parser(sub)
    return ap


def _cpu_devices_for(a: argparse.Namespace) -> None:
    cpu_devices_for(getattr(a, "tensor_parallel_size", 1) * getattr(a, "pipeline_parallel_size", 1))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    refused = refusal(args) or vllm_refusal(args)
    if refused is not None:
        print(f"error: {refused}", file=sys.stderr)
        return 2
    _cpu_devices_for(args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
