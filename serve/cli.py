"""The `fastserve-jax` command line.

    fastserve-jax serve                                     # OpenAI-compatible server, demo model, :8000
    fastserve-jax generate "count from 3 to 12:"            # the bundled demo model
    fastserve-jax generate --model DIR -p "Hello" -p "Hi" --max-tokens 32 --temperature 0.7
    fastserve-jax simulate --help                           # policies on a trace, no model needed
    fastserve-jax bench --help                              # HTTP load against a server
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from fastserve_jax.scheduler import POLICIES

from fastserve_jax.serve.bench_cmd import add_bench_parser
from fastserve_jax.serve.serve_cmd import add_serve_parser
from fastserve_jax.serve.simulate_cmd import add_simulate_parser


def _progress(done: int, total: int) -> None:
    width = 30
    filled = width * done // total
    end = "\n" if done == total else ""
    print(f"\rwarm-up: compiling [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end=end,
          file=sys.stderr, flush=True)


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None,
                   help="Hugging Face model directory (config.json, *.safetensors, tokenizer); "
                        "default: the bundled demo model, which counts ('count from 3 to 12:')")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    g.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's, at most 2048)")
    g.add_argument("--max-num-seqs", type=int, default=32, help="most sequences in one iteration")
    g.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="token budget of one iteration; longer prompts are prefilled in chunks")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    g.add_argument("--num-device-blocks", type=int, default=None, help="KV blocks on the device (default: sized from memory)")
    g.add_argument("--num-host-blocks", type=int, default=None,
                   help="host KV pool for swapped-out requests, in blocks (default: as many as the device pool, "
                        "within 4 GiB; 0: none)")
    g.add_argument("--swap-policy", default="proactive", choices=["proactive", "reactive", "recompute"],
                   help="where paused requests' KV goes under memory pressure (default: FastServe's proactive "
                        "swapping to host memory)")
    g.add_argument("--scheduler", default="skip-join-mlfq", choices=sorted(POLICIES),
                   help="scheduling policy (default: FastServe's skip-join MLFQ)")
    g.add_argument("--cost-model", default=None,
                   help="cost model for the policy: a shipped name or JSON path (default: profile this engine)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("parallelism (devices used: tensor x pipeline parallel size)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split attention heads, MLP units and the vocabulary over this many devices (default 1)")
    g.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1,
                   help="split the layers into this many pipeline stages, each on its own tensor-parallel "
                        "group of devices (default 1)")
    g.add_argument("--batches-in-flight", type=int, default=0,
                   help="batches dispatched at once in pipeline mode (default: one per stage)")


def _engine_kwargs(a: argparse.Namespace) -> dict:
    return dict(dtype=a.dtype, max_model_len=a.max_model_len, max_num_seqs=a.max_num_seqs,
                max_num_batched_tokens=a.max_num_batched_tokens, block_size=a.block_size,
                num_device_blocks=a.num_device_blocks, num_host_blocks=a.num_host_blocks, swap_policy=a.swap_policy,
                scheduler=a.scheduler, cost_model=a.cost_model, seed=a.seed,
                tensor_parallel_size=a.tensor_parallel_size, pipeline_parallel_size=a.pipeline_parallel_size,
                batches_in_flight=a.batches_in_flight)


def cmd_generate(a: argparse.Namespace) -> int:
    from fastserve_jax import LLM, SamplingParams

    try:
        sp = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                            seed=a.seed_sampling, stop=a.stop or None, ignore_eos=a.ignore_eos)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prompts = a.prompt_pos + (a.prompt or [])
    if not prompts:
        prompts = ["count from 3 to 12:", "count from 250 to 300:", "count from 0 to 7:"]
    t0 = time.perf_counter()
    llm = LLM(a.model, progress=_progress, **_engine_kwargs(a))
    print(f"engine ready in {time.perf_counter() - t0:.1f} s (warm-up compile {llm.engine.warmup_seconds:.1f} s)",
          file=sys.stderr)
    try:
        outs = llm.generate(prompts, sp)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for o in outs:
        m = o.metrics
        print(f"prompt: {o.prompt!r}\noutput: {o.text!r}\n  tokens={len(o.token_ids)} finish={o.finish_reason} "
              f"ttft={m.ttft * 1e3:.0f} ms latency={m.latency * 1e3:.0f} ms")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="fastserve-jax",
        description="FastServe-style LLM serving on JAX. Every command uses the bundled demo model unless "
                    "--model names a Hugging Face model directory; the first start compiles for a while "
                    "(compiled code is cached in ~/.cache/fastserve_jax for later starts).")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve_parser(sub, _add_engine_args)
    g = sub.add_parser("generate", help="generate completions for prompts given on the command line",
                       description="Generate completions for one or more prompts and print them with timings.")
    g.add_argument("prompt_pos", nargs="*", metavar="PROMPT", help="prompt text (several allowed)")
    g.add_argument("-p", "--prompt", action="append", help="another prompt (repeatable)")
    g.add_argument("--max-tokens", type=int, default=300)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--seed-sampling", type=int, default=None, help="per-request sampling seed")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    _add_engine_args(g)
    g.set_defaults(func=cmd_generate)
    add_simulate_parser(sub)
    add_bench_parser(sub, _add_engine_args)
    return ap


def _cpu_devices_for(a: argparse.Namespace) -> None:
    """A tp x pp layout on a machine without an accelerator runs on that many virtual CPU
    devices; the CPU backend must be told before it starts (it ignores this otherwise)."""
    n = getattr(a, "tensor_parallel_size", 1) * getattr(a, "pipeline_parallel_size", 1)
    if n > 1 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        import jax

        try:
            jax.config.update("jax_num_cpu_devices", n)
        except RuntimeError:        # a backend already started (an embedding caller's): keep its devices
            pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _cpu_devices_for(args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
