"""The engine's command-line options, shared by `serve`, `generate` and `bench` (and scripts):
the flags, the LLM(...) keyword arguments they give, and the flags again for a server started
in a subprocess."""

from __future__ import annotations

import argparse
import os

from fastserve_jax.config import EngineConfig, SchedulerConfig
from fastserve_jax.scheduler import POLICIES
from fastserve_jax.serve.compat_flags import add_compat_flags

# the options passed through to LLM(...) by name; --model and --scheduler are handled apart
# (the model is LLM's first argument; bench gives each started server its own scheduler)
# the shape lists every launch pads to (EngineConfig's; unset: derived from the limits)
BUCKET_OPTIONS = ("decode_batch_buckets", "prefill_token_buckets", "block_buckets")
PATH_OPTIONS = ("model", "tokenizer", "cost_model")
ENGINE_OPTIONS = ("dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size",
                  "gpu_memory_utilization", "num_device_blocks", "num_host_blocks", "swap_space", "swap_policy", "cost_model", "seed",
                  "tensor_parallel_size", "pipeline_parallel_size", "batches_in_flight", "warmup",
                  "attention_backend", "tail_slowdown", "starvation_threshold", "prompt_neighbors",
                  "generation_config", "tokenizer", *BUCKET_OPTIONS)


def _int_list(text: str) -> tuple[int, ...]:
    """A comma-separated, strictly increasing list of positive integers (a flag's value; a list
    of words would take a prompt after it), checked here, before a model loads; whether it
    reaches its limit the engine checks (EngineConfig.resolve)."""
    try:
        out = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers (e.g. 1,4,16)") from None
    if out[0] < 1 or list(out) != sorted(set(out)):
        raise argparse.ArgumentTypeError(f"{text!r} must be strictly increasing positive integers (e.g. 1,4,16)")
    return out


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None,
                   help="Hugging Face model directory (config.json, *.safetensors, tokenizer), or a repo id "
                        "already in the local Hugging Face cache (nothing is downloaded); "
                        "default: the bundled demo model, which counts ('count from 3 to 12:')")
    g.add_argument("--tokenizer", default=None, type=named,
                   help="a directory to load the tokenizer (and its chat template and EOS token) from instead of "
                        "the model's (vLLM's)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "float", "bfloat16"],
                   help="weights, KV cache and activations (default: bfloat16 on GPU and TPU, float32 on CPU)")
    g.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's, at most 2048)")
    g.add_argument("--max-num-seqs", type=int, default=32, help="most sequences in one iteration")
    g.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="token budget of one iteration; longer prompts are prefilled in chunks")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    g.add_argument("--gpu-memory-utilization", type=float, default=EngineConfig.gpu_memory_utilization,
                   help="fraction (0, 1] of each accelerator's memory the engine may use; the KV pool gets it less "
                        "the weights and what is in use (default %(default)s, vLLM's). On CPU the pool takes a fixed "
                        "4 GiB instead and this changes nothing; --num-device-blocks wins where given")
    g.add_argument("--num-device-blocks", "--num-gpu-blocks-override", type=int, default=None,
                   help="KV blocks on the device, one of them the null block padding reads (so N-1 hold KV; "
                        "default: sized from --gpu-memory-utilization; the second name is vLLM's)")
    g.add_argument("--num-host-blocks", type=int, default=None,
                   help="host KV pool for swapped-out requests, in blocks (default: as many as the device pool, "
                        "within --swap-space; 0: none)")
    g.add_argument("--swap-space", type=float, default=EngineConfig.swap_space,
                   help="GiB of host memory per device for the KV of swapped-out requests, counted as the host "
                        "copies take it (default %(default)s, vLLM's; 0: no host pool, evictions are recomputed); "
                        "the pool holds at most as many blocks as the device pool; --num-host-blocks wins where given")
    g.add_argument("--swap-policy", default="proactive", choices=["proactive", "reactive", "recompute"],
                   help="where paused requests' KV goes under memory pressure (default: FastServe's proactive "
                        "swapping to host memory)")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=False,
                   help="requests whose first tokens match KV already computed (a shared system prompt, a "
                        "conversation's earlier turns, a request preempted for recomputation) start past those "
                        "blocks instead of prefilling them (vLLM's automatic prefix caching; default off; "
                        "docs/prefix_caching.md)")
    g.add_argument("--scheduler", default="skip-join-mlfq", choices=sorted(POLICIES),
                   help="scheduling policy (default: FastServe's skip-join MLFQ)")
    g.add_argument("--no-protect-decodes", dest="protect_decodes", action="store_false",
                   help="skip-join-mlfq as the paper has it: demote decoding requests even where the output "
                        "lengths it learns say they are worth more per token than a fresh one")
    g.add_argument("--tail-slowdown", type=float, default=SchedulerConfig.tail_slowdown,
                   help="skip-join-mlfq's tail guard: a request older than the starvation limit, slower than this "
                        "many times a full batch's decode time per token and expected by the learned lengths to "
                        "be nearly done runs first until it catches up (default %(default)s; 0: off; off too with "
                        "--no-protect-decodes, which turns off what skip-join learns; fcfs and srpt read none of "
                        "these policy options)")
    g.add_argument("--starvation-threshold", type=float, default=None,
                   help="seconds a request may wait before skip-join-mlfq promotes it to the top queue, stretched "
                        "by the live requests per batch slot (with 4x the requests max-num-seqs holds, 4x as "
                        "long), and the age at which the tail guard looks at it (default: 10 s scaled to this engine's "
                        "full-batch decode time against OPT-13B's on an A100; 0: no promotion and no tail guard; gittins and "
                        "predictive use their own limit, 20 s scaled alike)")
    g.add_argument("--prompt-neighbors", type=int, default=SchedulerConfig.prompt_neighbors,
                   help="output lengths predicted from the finished requests with this many nearest prompt lengths, "
                        "used once they are seen to rank answer lengths (templated traffic): skip-join-mlfq joins "
                        "a request to the queue that covers its prefill plus its predicted answer, gittins and "
                        "predictive rank by them (default %(default)s; 0: off)")
    g.add_argument("--cost-model", default=None, type=named,
                   help="cost model for the policy: a shipped name or JSON path (default: profile this engine)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--generation-config", default="auto", choices=["auto", "vllm"],
                   help="auto (default, as vLLM): temperature, top_p, top_k, repetition_penalty and min_p that a request "
                        "leaves out come from the model's generation_config.json; vllm: neutral defaults "
                        "(temperature 1, no top-p/top-k/repetition penalty/min-p)")
    g.add_argument("--warmup", default=None, choices=["lazy", "background", "full"],
                   help="what compiles before serving: lazy = each shape when a batch first needs it (generate's "
                        "default); background = enough to answer any request, then the rest on a thread while "
                        "serving (serve's default); full = everything first, nothing compiles afterwards "
                        "(benchmarks, latency-critical deployments)")
    g.add_argument("--attention-backend", default="auto", choices=["auto", "reference", "pallas"],
                   help="how attention reads the paged KV cache: pallas = a Pallas kernel reading blocks in place "
                        "(Triton on GPU, Mosaic on TPU; interpret mode on CPU, slow, for tests); reference = the "
                        "portable jnp gather; auto (default) = pallas on GPU and TPU (per head shard under tensor "
                        "parallelism), reference elsewhere")
    g = p.add_argument_group("compiled shapes (each a strictly increasing, comma-separated list that reaches its "
                             "limit; default: derived from the limits, docs/startup.md)")
    g.add_argument("--decode-batch-buckets", type=_int_list, default=None, metavar="N,N,...",
                   help="sequence counts a decode launch pads to; the largest must reach --max-num-seqs, and the "
                        "list ends at the first that does (default: powers of two)")
    g.add_argument("--prefill-token-buckets", type=_int_list, default=None, metavar="N,N,...",
                   help="token counts a packed prefill launch pads to; the largest must reach "
                        "--max-num-batched-tokens, and the list ends at the first that does (default: powers of two "
                        "from 32)")
    g.add_argument("--block-buckets", type=_int_list, default=None, metavar="N,N,...",
                   help="KV blocks one launch row gathers; the largest must reach what one packed prefill can "
                        "gather (a sequence's blocks, the token budget's, and one per packed sequence: the "
                        "engine's refusal names the number; default: powers of two from 4). Fewer shapes "
                        "compile faster (a full warm-up compiles each); coarser ones pad more work into each launch")
    g = p.add_argument_group("parallelism (devices used: tensor x pipeline parallel size)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int_at_least(1), default=1,
                   help="split attention heads, MLP units and the vocabulary over this many devices (default 1)")
    g.add_argument("--pipeline-parallel-size", "-pp", type=int_at_least(1), default=1,
                   help="split the layers into this many pipeline stages, each on its own tensor-parallel "
                        "group of devices (default 1)")
    g.add_argument("--batches-in-flight", type=int_at_least(0), default=0,
                   help="batches dispatched at once in pipeline mode (default, or 0: one per stage)")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="plan and dispatch each iteration's batch while the device still runs the last one, "
                        "whose tokens feed it on the device (default: on with one pipeline stage, off with "
                        "pipeline parallelism or --batches-in-flight; docs/performance.md)")
    add_compat_flags(p)


def int_at_least(low: int):
    """An argparse type: an integer >= low (-tp 0 was refused only once the server listened;
    simulate's and bench's seeds are >= 0, as numpy's generators take no negative one)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = low - 1
        if v < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return v
    return parse


def named(text: str) -> str:
    """An argparse type: a name or path that is not empty (--tokenizer "" and --cost-model "", an
    unset shell variable's, fell back to their defaults without a word; --model "" is refused)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty (leave the flag out for its default)")
    return text


def parse_engine_args(argv: list[str]) -> argparse.Namespace:
    """The engine options alone, e.g. a server's engine argv read back in-process."""
    p = argparse.ArgumentParser(prog="engine options")
    add_engine_args(p)
    return p.parse_args(argv)


def engine_kwargs(a: argparse.Namespace) -> dict:
    """LLM(a.model, **engine_kwargs(a)): every engine option but the model (warmup only when
    given: each command has its own default)."""
    kw = dict({k: getattr(a, k) for k in ENGINE_OPTIONS}, scheduler=a.scheduler, protect_decodes=a.protect_decodes,
              async_scheduling=a.async_scheduling, enable_prefix_caching=a.enable_prefix_caching)
    for k in ("warmup", *BUCKET_OPTIONS):
        if kw[k] is None:
            del kw[k]
    return kw


def check_engine_args(a: argparse.Namespace, scheduler: str | None = None):
    """The EngineConfig LLM(a.model, **engine_kwargs(a)) serves with, else a ValueError, as
    `generate` gets one from LLM before anything loads (the model directory's config.json and
    files, EngineConfig's checks), and for a --cost-model that does not load; for a command that
    hands the options to a server it starts (bench), so that they fail here and not in the
    server's log. `scheduler`: the policy in place of a.scheduler."""
    from fastserve_jax.cost_model import CostModel
    from fastserve_jax.llm import engine_config
    from fastserve_jax.models.tokenizer import tokenizer_dir

    kw = dict(engine_kwargs(a), scheduler=scheduler or a.scheduler)
    for k in ("warmup", "generation_config", "tokenizer"):     # LLM's own (argparse's choices check the first two)
        kw.pop(k, None)
    path, _, cfg = engine_config(a.model, **kw)
    tokenizer_dir(a.tokenizer or path)
    if a.cost_model is not None:
        CostModel.load(a.cost_model)
    return cfg


def engine_argv(a: argparse.Namespace) -> list[str]:
    """The flags that give a started `fastserve-jax serve` the same engine (model included, the
    scheduler left out); options at None (their defaults) are not passed. A relative path that
    exists here is passed absolute: the server starts in another directory (bench_server.ROOT)."""
    argv = []
    for flag in ("model", *ENGINE_OPTIONS):
        v = getattr(a, flag)
        if flag in PATH_OPTIONS and v is not None and os.path.exists(v):     # a shipped cost model's name is not
            v = os.path.abspath(v)
        if v is not None:
            argv += [f"--{flag.replace('_', '-')}", ",".join(map(str, v)) if flag in BUCKET_OPTIONS else str(v)]
    if not a.protect_decodes:
        argv.append("--no-protect-decodes")
    if a.async_scheduling is not None:
        argv.append("--async-scheduling" if a.async_scheduling else "--no-async-scheduling")
    if a.enable_prefix_caching:
        argv.append("--enable-prefix-caching")
    return argv


def cpu_devices_for(num_devices: int) -> None:
    """A tp x pp layout on a machine without an accelerator runs on that many virtual CPU
    devices; the CPU backend must be told before it starts (it ignores this otherwise).
    Called by the CLI, and again by an engine process (serve --engine-process), which starts
    its own backend."""
    if num_devices > 1 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        import jax

        try:
            jax.config.update("jax_num_cpu_devices", num_devices)
        except RuntimeError:        # a backend already started (an embedding caller's): keep its devices
            pass
