"""`fastserve-jax serve`: the OpenAI-compatible server under uvicorn.

The port opens at once; /health answers 503 "warming up" while the engine compiles on its
thread (log lines show the progress) and 200 once it serves. SIGINT/SIGTERM drain: the
listening socket closes, new requests get 503, in-flight ones finish (streams included)
for up to --shutdown-timeout seconds, then what is left is cancelled and the engine stops.
"""

from __future__ import annotations

import argparse
import errno
import importlib.metadata
import logging
import math
import os
import signal
import sys
import threading
from typing import Callable

import uvicorn

from fastserve_jax.chat_template import CONTENT_FORMATS
from fastserve_jax.vllm_options import notes
from fastserve_jax.serve.engine_args import add_engine_args, check_engine_args, cpu_devices_for, engine_kwargs
from fastserve_jax.serve.draining import DrainingServer, raise_open_file_limit
from fastserve_jax.serve.engine_loop import StartupCancelled
from fastserve_jax.serve.server_args import (add_server_args, add_vllm_server_args, check_server_args, server_settings,
                                             uvicorn_settings)
from fastserve_jax.serve.simulate_cmd import number_arg

log = logging.getLogger("fastserve_jax.serve")
ONE_PROCESS = "one process in the deployment: it serves as a single host"

API_KEY_ENV = "FASTSERVE_API_KEY"
VLLM_API_KEY_ENV = "VLLM_API_KEY"       # read too: a deployment moved from vLLM keeps its key check
# The engine thread and the event loop share this process's GIL. The engine lets it go while
# the device computes and then waits for it back; at CPython's default interval (5 ms) a busy
# event loop (hundreds of streams) keeps it that long each time, so iterations stretched.
# fcfs, 400 streaming requests at 250 req/s on the 2-core dev VM, served req/s at 5 ms against
# 0.5 ms, alternating: 53.8/60.3, 48.1/54.6, 53.0/54.5 (skip-join: within noise).
GIL_SWITCH_INTERVAL_S = 0.0005
JOIN_TIMEOUT_S = 300     # seconds a multi-host start waits for every process (sharding/distributed.initialize)
# a worker's wait for its leader's shutdown after a signal, beyond the leader's --shutdown-timeout
# (multihost.stop_after_the_leader): the leader stops its engine and tells the workers after its drain
WORKER_GRACE_S = 15.0


def add_serve_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="run the OpenAI-compatible HTTP server (default: the demo model on port 8000)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve a model over HTTP with OpenAI's API: POST /v1/completions and /v1/chat/completions "
                    "(streaming too), GET /v1/models, /health and /metrics (Prometheus); vLLM's POST /tokenize, "
                    "/detokenize and GET /version.",
        epilog="examples:\n"
               "  fastserve-jax serve                                  # demo model, skip-join MLFQ, port 8000\n"
               "  curl -s localhost:8000/health                        # 200 once warm-up is done\n"
               "  curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\\n"
               "       -d '{\"prompt\": \"count from 3 to 12:\", \"max_tokens\": 20, \"temperature\": 0}'\n"
               "  fastserve-jax serve --scheduler fcfs --port 8001 --api-key secret\n\n"
               "From Python: openai.OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='unused')"
               ".completions.create(model='demo', prompt='count from 3 to 12:', max_tokens=20, temperature=0)")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="0.0.0.0",
                   help="address to listen on (default: every IPv4 interface, as vLLM's; 127.0.0.1: this machine only)")
    g.add_argument("--port", type=_port, default=8000, help="TCP port, 0-65535 (0: any free one)")
    g.add_argument("--api-key", nargs="+", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1, /tokenize, /detokenize and /invocations; "
                        f"several keys: any one is accepted (default: ${API_KEY_ENV}, else ${VLLM_API_KEY_ENV}, "
                        "else none)")
    g.add_argument("--chat-template", default=None,
                   help="the Jinja chat template for /v1/chat/completions, a file or the template itself (vLLM's), "
                        "for a model whose tokenizer has none or to override it (default: the tokenizer's)")
    g.add_argument("--chat-template-content-format", choices=CONTENT_FORMATS, default="auto",
                   help="how message content reaches the template: string (text parts joined with newlines), "
                        "openai (a list of {type: text, text} parts), auto (openai where the template loops over "
                        "a message's content, else string; vLLM's; default)")
    g.add_argument("--max-pending", type=int, default=4096,
                   help="admission bound: engine requests admitted and unfinished (n choices count n); "
                        "beyond it requests get 503 with Retry-After (default %(default)s)")
    g.add_argument("--max-body-bytes", type=int, default=None,
                   help="larger request bodies get 413 (default: 32 bytes per token of max_model_len, at least 1 MiB)")
    g.add_argument("--shutdown-timeout", type=_seconds, default=25.0,
                   help="seconds in-flight requests get to finish after SIGINT/SIGTERM (default %(default)s: the "
                        "exit comes about a second later, within Kubernetes' default 30 s grace period)")
    g.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=False,
                   help="run the engine in a process of its own, as vLLM does, so that HTTP parsing, tokenizing "
                        "and streaming do not share a GIL with the engine loop (docs/serving.md); one host only")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_server_args(g)
    add_vllm_server_args(p, g)
    g = p.add_argument_group("multi-host (one process per host; docs/parallelism.md)")
    g.add_argument("--coordinator-address", default=None,
                   help="host:port of process 0 (default: $FASTSERVE_COORDINATOR); process 0 serves HTTP, the "
                        "others replay its steps. The plan channel uses the next port.")
    g.add_argument("--num-processes", type=int, default=None, help="processes in all (default: $FASTSERVE_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, default=None, help="this process, 0 = leader (default: $FASTSERVE_PROCESS_ID)")
    add_engine_args(p)
    p.set_defaults(func=cmd_serve)


def _port(text: str) -> int:
    """An argparse type: uvicorn would bind 70000 as 4464 (mod 2**16) and fail on -1 only
    after the engine started loading."""
    try:
        v = int(text)
    except ValueError:
        v = -1
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in 0-65535, got {text!r}")
    return v


# a finite number of seconds >= 0 (NaN failed in the shutdown's timer)
_seconds = number_arg(lambda v: math.isfinite(v) and v >= 0, "a finite number of seconds >= 0")


def model_name(model: str | None) -> str:
    """The served name by default: `--model` as given, as vLLM's (clients send that string back)."""
    return "demo" if model is None else model


def api_keys(given: list[str] | None) -> tuple[str, ...] | None:
    """The keys a request may send: --api-key's, else $FASTSERVE_API_KEY's, else $VLLM_API_KEY's
    (vLLM's variable: a deployment moved from vLLM ran with no key check before 2026-12-07)."""
    keys = tuple(k for k in given or () if k)       # "" asks for no key, as an unset variable does
    return keys or tuple(k for k in (os.environ.get(API_KEY_ENV) or os.environ.get(VLLM_API_KEY_ENV),) if k) or None


def progress_logger(every: float = 0.1, stopping: Callable[[], bool] | None = None):
    """A warm-up progress callback that logs a line per `every` of the jobs compiled, and
    raises StartupCancelled once `stopping()` (the compiles not started are dropped)."""
    state = {"next": every}

    def progress(done: int, total: int) -> None:
        if stopping is not None and stopping():
            raise StartupCancelled(f"stopped during the warm-up, {done}/{total} shapes compiled")
        if done == total or done / total >= state["next"]:
            log.info("warm-up: compiled %d/%d shapes (%.0f%%)", done, total, 100 * done / total)
            state["next"] = done / total + every
    return progress


class EngineBuilder:
    """Loads and warms up the engine, called in the engine loop. Picklable (a model path and
    keyword arguments), so it can run in an engine process of its own."""

    def __init__(self, model: str | None, engine_kwargs: dict) -> None:
        self.model, self.engine_kwargs = model, engine_kwargs

    def __call__(self, stopping: Callable[[], bool] | None = None):
        import jax

        from fastserve_jax import LLM

        kwargs = dict(self.engine_kwargs)
        cpu_devices_for(kwargs.get("tensor_parallel_size", 1) * kwargs.get("pipeline_parallel_size", 1))
        kwargs.setdefault("warmup", "background")     # healthy once any request can be answered
        log.info("loading %s and compiling (warm-up %s)", self.model or "the bundled demo model", kwargs["warmup"])
        llm = LLM(self.model, progress=progress_logger(stopping=stopping), **kwargs)
        rest = ""
        if kwargs["warmup"] == "background":
            rest = "; the other shapes compile in the background"
            if llm.engine.profile_provisional:
                rest += ", then the cost model is profiled (provisional until then)"
            rest += ", and each program runs once while the server is idle"     # engine_loop._first_runs
        elif llm.engine.runner.first_run_seconds:
            rest = f"; {llm.engine.runner.first_run_seconds:.1f} s of it running each program once"
        cache = jax.config.jax_compilation_cache_dir        # None: off, or unusable (a warning said why)
        log.info("engine loaded and compiled in %.1f s (%s)%s; %s", llm.startup_seconds, llm.startup_compiles.describe(),
                 rest, f"compiled code is cached in {cache}" if cache else "no compiled-code cache")
        return llm.engine


def _distributed(a: argparse.Namespace):
    """The multi-host config from flags over environment, or None on one host."""
    from fastserve_jax.sharding.distributed import DistributedConfig

    env = dict(os.environ)
    for flag, name in (("coordinator_address", "FASTSERVE_COORDINATOR"), ("num_processes", "FASTSERVE_NUM_PROCESSES"),
                       ("process_id", "FASTSERVE_PROCESS_ID")):
        if getattr(a, flag, None) is not None:
            env[name] = str(getattr(a, flag))
    if not (env.get("FASTSERVE_COORDINATOR") or env.get("JAX_COORDINATOR_ADDRESS")):
        given = [f"--{f.replace('_', '-')}" for f in ("num_processes", "process_id") if getattr(a, f, None) is not None]
        given += [f"${name}" for name in ("FASTSERVE_NUM_PROCESSES", "FASTSERVE_PROCESS_ID")
                  if os.environ.get(name, "").strip() and getattr(a, name[10:].lower(), None) is None]
        if given:           # served on one host, the settings unread, before (a worker became a second server)
            raise ValueError(f"{' and '.join(given)} need{'s' * (len(given) == 1)} --coordinator-address (or $FASTSERVE_COORDINATOR); "
                             "without one the server runs on one host")
        return None
    dist = DistributedConfig.from_env(env)
    if dist.num_processes == 1:     # its plan channel had no worker to send to: every start failed
        log.info(ONE_PROCESS)
        return None
    return dist


def cmd_serve(a: argparse.Namespace) -> int:
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for line in notes(a):
        log.info("%s", line)
    try:
        dist = _distributed(a)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if dist is not None and a.engine_process:
        print("error: --engine-process serves from one host; a multi-host server runs its engine on the leader's "
              "own thread (drop --engine-process)", file=sys.stderr)
        return 2
    if dist is not None and (hung := multihost_hangs_on(importlib.metadata.version("jax"))):
        print(f"error: {hung}", file=sys.stderr)
        return 2
    channel = None
    if dist is not None:
        from fastserve_jax.sharding.distributed import PlanChannel, initialize
        from fastserve_jax.multihost import LeaderMirror, deployment_settings, finish, run_worker, stop_after_the_leader

        if dist.process_id == 0:    # a leader without its workers said nothing until JAX aborted it
            taken = _taken_ports(dist)
            if taken:
                print(f"error: {taken}", file=sys.stderr)
                return 1
            log.info("process 0 of %s: coordinating at %s; waiting up to %d s for the other processes to join",
                     dist.num_processes, dist.coordinator_address, JOIN_TIMEOUT_S)
        else:
            log.info("process %s of %s: waiting up to %d s for process 0 at %s", dist.process_id,   # None:
                     dist.num_processes, JOIN_TIMEOUT_S, dist.coordinator_address)    # JAX's detection's
        main = threading.current_thread() is threading.main_thread()
        # JAX's join blocks in C++, where Python never runs its Ctrl-C handler: it was ignored
        previous = signal.signal(signal.SIGINT, signal.SIG_DFL) if main else None
        try:
            dist = initialize(dist, JOIN_TIMEOUT_S)
        except TimeoutError as e:             # no process 0 listening
            print(f"error: {e}", file=sys.stderr)
            return 1
        except ValueError as e:               # no process count or id given or detected (a traceback until 2026-12-07)
            print(f"error: {e}", file=sys.stderr)
            return 2
        finally:
            if main:
                signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
        if dist.num_processes == 1:           # JAX's detection found no other process
            log.info(ONE_PROCESS)
            return _serve(a, engine_kwargs(a))
        if dist.process_id != 0:
            # a signal to the whole host (Ctrl-C, a supervisor's stop) leaves the leader time to drain
            stop_after_the_leader(a.shutdown_timeout + WORKER_GRACE_S)
        settings = deployment_settings(a.model, engine_kwargs(a))
        try:
            if dist.process_id != 0:
                log.info("process %d of %d: worker, following %s", dist.process_id, dist.num_processes,
                         dist.coordinator_address)
                channel = PlanChannel.connect(dist, settings=settings)
                return finish(lambda: run_worker(a.model, engine_kwargs(a), channel, progress_logger()), channel,
                              leader=False)
            channel = PlanChannel.serve(dist, settings=settings)
        except (ValueError, OSError) as e:    # settings that differ, a missing process, a busy port
            if isinstance(e, OSError) and e.errno == errno.EADDRINUSE:      # a traceback, then a 120 s hang
                e = f"cannot listen on the plan port {dist.plan_port} (by default the coordinator's + 1): {e.strerror}"
            print(f"error: {e}", file=sys.stderr, flush=True)
            os._exit(1)     # joined: a normal exit waited at JAX's shutdown barrier for the others (2 min and more)
        log.info("process 0 of %d: leader, %d worker(s) connected", dist.num_processes, dist.num_processes - 1)
    if channel is None:
        return _serve(a, engine_kwargs(a))
    return finish(lambda: _serve(a, dict(engine_kwargs(a), mirror=LeaderMirror(channel))), channel, leader=True)


def multihost_hangs_on(jax_version: str) -> str | None:
    """jax 0.12.1 (what pip gives Python 3.12 and 3.13) hangs a multi-host server's first step: both
    processes wait in gloo's all-reduce for good while /health says 200 (2026-12-08; 0.10.2-0.12.0 serve)."""
    if jax_version == "0.12.1":
        return (f"multi-host serving hangs on jax {jax_version} (its first step's collectives never complete); "
                "install jax and jaxlib 0.12.0 or older (pip install 'jax<0.12.1' 'jaxlib<0.12.1'), or serve on one host")
    return None


def _taken_ports(dist) -> str | None:
    """What a leader cannot listen on, before JAX tries: its coordinator crashed in gRPC (SIGSEGV,
    no message) on a port another program held, and a busy plan port showed only after the join."""
    import socket

    from fastserve_jax.sharding.distributed import split_address

    for port, what in ((split_address(dist.coordinator_address)[1], "the coordinator port"),
                       (dist.plan_port, "the plan port (by default the coordinator's + 1)")):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)     # a closed socket's TIME_WAIT is no owner
            try:
                s.bind(("", port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    return f"cannot listen on {what} {port}: another program holds it"
    return None


def _serve(a: argparse.Namespace, engine_kwargs: dict) -> int:
    if a.max_pending < 1 or (a.max_body_bytes is not None and a.max_body_bytes < 1):
        print("error: --max-pending and --max-body-bytes must be >= 1", file=sys.stderr)
        return 2
    wrong = check_server_args(a)
    if wrong is not None:
        print(f"error: {wrong}", file=sys.stderr)
        return 2
    from fastserve_jax.chat_template import load_chat_template

    try:
        chat_template = load_chat_template(a.chat_template)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:        # as `generate` checks them, before the port opens (after it, with exit 1, until 2026-12-07)
        max_model_len = check_engine_args(a).max_model_len
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.max_body_bytes is None:      # a 128k-token prompt of ids is ~1 MiB: the fixed 1 MiB refused it (2026-12-07)
        a.max_body_bytes = max(1 << 20, 32 * max_model_len)
    build = EngineBuilder(a.model, engine_kwargs)
    transport = None
    if a.engine_process:
        transport = _spawn_engine(build)
    from fastserve_jax.serve.app import ServerConfig, create_app

    names = a.served_model_name or [model_name(a.model)]
    cfg = ServerConfig(model_name=names[0], model_aliases=tuple(n for n in dict.fromkeys(names[1:]) if n != names[0]),
                       api_key=api_keys(a.api_key), model_root=model_name(a.model),
                       max_pending=a.max_pending, max_body_bytes=a.max_body_bytes, engine_process=a.engine_process,
                       chat_template=chat_template, chat_content_format=a.chat_template_content_format,
                       **server_settings(a))
    mirror = engine_kwargs.get("mirror")
    if mirror is not None:
        def build(stopping, inner=build):     # multi-host: ready only with every worker
            engine = inner(stopping)
            mirror.wait_ready()
            return engine

    app = create_app(build, cfg, transport)
    raise_open_file_limit()         # each connection holds a file
    server = DrainingServer(uvicorn.Config(app, host=a.host, port=a.port, timeout_graceful_shutdown=a.shutdown_timeout,
                                           **uvicorn_settings(a)), app)
    # the engine did not start, or its process died: nothing left to serve (a supervisor restarts us)
    engine = app.state.server.engine
    engine.on_fatal = lambda: setattr(server, "should_exit", True)
    watching = None
    if mirror is not None:          # multi-host: a worker gone is the engine lost, even while idle
        from fastserve_jax.multihost import watch_workers

        watching = watch_workers(mirror.channel, engine.lose)
    log.info("serving '%s' on %s%s (scheduler %s%s%s)", cfg.model_name, f"unix:{a.uds}" if a.uds else
             f"{'https' if a.ssl_keyfile else 'http'}://{a.host}:{a.port}", cfg.root_path, a.scheduler,
             ", engine in its own process" if cfg.engine_process else "",
             ", API key required" if cfg.api_key else "")
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    main = threading.current_thread() is threading.main_thread()
    if main:    # uvicorn re-raises the SIGTERM it drained on into this handler, not the default's exit
        previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        server.run()
    except KeyboardInterrupt:   # uvicorn re-raises the Ctrl-C it drained for; the drain is done
        log.info("stopped by SIGINT")
    except Terminated:          # so a multi-host leader still tells its workers to exit (cmd_serve)
        log.info("stopped by SIGTERM")
    finally:
        if main:            # (None: a handler not set from Python)
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        if watching is not None:        # the workers are told to stop next: no longer news
            watching.set()
    health = engine.health
    if health.startup_error:
        print(f"error: the engine did not start: {health.startup_error}", file=sys.stderr)
        return 1
    if health.lost:
        print(f"error: {health.lost}; the server stopped", file=sys.stderr)
        return 1
    return 0


def _spawn_engine(build: EngineBuilder):
    """The engine process, started before this process imports the app, so the two start up
    side by side; and, on a thread, the tokenizer code its EngineInfo will need when it comes
    (transformers: about a second to import)."""
    from fastserve_jax.serve.engine_process import ProcessTransport

    transport = ProcessTransport(build)
    transport.spawn()
    threading.Thread(target=importlib.import_module, args=("transformers.tokenization_utils_tokenizers",),
                     name="fastserve-preimport", daemon=True).start()
    return transport


class Terminated(Exception):
    """SIGTERM, once uvicorn has drained for it."""


def _terminated(signum, frame) -> None:
    raise Terminated
