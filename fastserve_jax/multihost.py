"""Multi-host serving: process 0 leads, the other processes replay its device operations.

The plan channel and `jax.distributed` start live in sharding/distributed.py; this is the
engine-facing part (it builds an engine and drives its runner), so it sits above sharding.

    process 0 (leader)                             process k > 0 (worker)
    initialize(cfg)                                initialize(cfg)
    channel = PlanChannel.serve(cfg)               channel = PlanChannel.connect(cfg)
    LLM(..., mirror=LeaderMirror(channel))         run_worker(model, engine_kwargs, channel)
      -> {"op": "pools", ...}          ------>       builds the same engine with those pools
         (compiles its own covering set)              (loads its shards, compiles its covering set)
      first device op waits for        <------       {"op": "ready"}
      -> every dispatch / swap op      ------>       runner replays it: same jitted steps, same order
    HTTP server, scheduler, sampling results        (its shards of every computation)
    close_workers(channel)             ------>       returns on shutdown

The ready handshake keeps the leader out of a collective its workers cannot join yet: a
worker still loading or compiling its covering set would leave the leader's first step waiting
in the collective's setup, which times out on the CPU backend (30 s; seen once in a loaded test
run). The serve command also waits for it before /health says ready.

Only the leader schedules, owns requests and reads sampled tokens; a worker holds its shards of
the params and the KV cache and runs the same SPMD programs, so the collectives match. The plan
arrays are sent bit-identical (JAX does not check that numpy inputs agree across processes).
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
import threading
from typing import Callable

from fastserve_jax.runner import ModelRunner
from fastserve_jax.sharding.distributed import ChannelClosed, PlanChannel, is_shutdown

log = logging.getLogger(__name__)
# How long the leader waits for its workers to load and compile before it gives up: a cold
# start of a large model compiles for many minutes.
READY_TIMEOUT_S = 3600.0
# Engine options only the leader acts on (it schedules, seeds requests, sizes the pools and
# picks async scheduling, and tells the workers the last two); every other one shapes the
# programs all processes run together, so the plan channel's handshake compares them.
LEADER_ONLY = frozenset({"scheduler", "cost_model", "tail_slowdown", "starvation_threshold", "prompt_neighbors",
                         "protect_decodes", "seed", "warmup", "num_device_blocks", "num_host_blocks",
                         "gpu_memory_utilization", "swap_space", "async_scheduling", "mirror"})
MODEL_FILES = (".json", ".safetensors", ".model", ".txt", ".tiktoken", ".jinja")    # config, weights, tokenizer
_SAMPLE = 1 << 20
# 4 KiB blocks spread over a file's middle, hashed too: a copy damaged or fine-tuned only there
# passed with its ends' digest and served wrong text (until 2026-12-07)
_MIDDLE_SAMPLES = 64


def deployment_settings(model: str | None, engine_kwargs: dict) -> dict:
    """What every process of a deployment must share (PlanChannel.serve/connect compare it
    before anything loads): the engine options that shape the programs, and per model file
    (and per file of a --tokenizer directory) its size and a digest of its first and last MiB
    and of _MIDDLE_SAMPLES blocks between (the paths may differ between hosts; reading whole
    weight files would take minutes)."""
    from fastserve_jax.models import demo_model_path

    tok = engine_kwargs.get("tokenizer")
    local = tok is not None and os.path.isdir(tok)        # else compared as given (None, or a name)
    out = {k: v for k, v in sorted(engine_kwargs.items()) if k not in LEADER_ONLY and not (k == "tokenizer" and local)}
    out.update(_file_digests("model", demo_model_path() if model is None else _local(model)))
    if local:
        out.update(_file_digests("tokenizer", tok))
    return out


def _local(model: str) -> str:
    """A repo id's snapshot in the local Hugging Face cache (its files are compared), else as given."""
    from fastserve_jax.models.hf_files import local_model_dir

    try:
        return local_model_dir(model)
    except ValueError:                  # the engine's load says so
        return model


def _file_digests(what: str, path: str) -> dict:
    out = {}
    for name in sorted(os.listdir(path)) if os.path.isdir(path) else []:
        full = os.path.join(path, name)
        if name.endswith(MODEL_FILES) and os.path.isfile(full):
            size, h = os.path.getsize(full), hashlib.sha256()
            with open(full, "rb") as f:
                h.update(f.read(_SAMPLE))
                for k in range(1, _MIDDLE_SAMPLES + 1) if size > 2 * _SAMPLE else ():
                    f.seek(size * k // (_MIDDLE_SAMPLES + 1))
                    h.update(f.read(4096))
                if size > _SAMPLE:
                    f.seek(max(_SAMPLE, size - _SAMPLE))
                    h.update(f.read())
            out[f"{what} file {name}"] = f"{size} bytes, {h.hexdigest()[:16]}"
    return out


class LeaderMirror:
    """The leader engine's `mirror`: broadcasts each device operation to the workers. The
    message after the first (the pool sizes the workers build their engines with) waits
    until every worker has said it is ready."""

    def __init__(self, channel: PlanChannel, ready_timeout_s: float = READY_TIMEOUT_S) -> None:
        self.channel, self.ready_timeout_s = channel, ready_timeout_s
        self._pools_sent = False

    def __call__(self, msg) -> None:
        if self._pools_sent:
            self.wait_ready()
        self.channel.send(msg)
        self._pools_sent = True

    def wait_ready(self) -> None:
        if not self.channel.workers_ready:
            log.info("waiting for the workers to load and compile")
            self.channel.wait_ready(self.ready_timeout_s)
            log.info("every worker is ready")


def replay(runner: ModelRunner, channel: PlanChannel) -> int:
    """Apply the leader's device operations in order until it shuts down; returns the number
    applied. Raises ChannelClosed if the leader went away without saying so."""
    n = 0
    while True:
        msg = channel.recv()
        if is_shutdown(msg):
            return n
        runner.replay(msg)
        n += 1


# a worker's state for stop_after_the_leader: replaying the leader's steps; signalled once; the grace timer
_GRACE: dict = {"replaying": False, "signalled": False, "timer": None}


def stop_after_the_leader(grace_s: float) -> None:
    """A worker's SIGINT and SIGTERM. A terminal's Ctrl-C and a supervisor's stop reach every
    process of a host at once (its process group, its systemd unit): a worker that ended at
    once failed every request its leader was still draining (a probe, 2026-12-07). The first
    signal gives the leader grace_s to drain and send its shutdown, after which the worker
    ends with 0; when grace_s runs out, or at a second signal, the worker stops as a Ctrl-C
    stops it (KeyboardInterrupt; `finish` closes the plan channel, and the leader stops serving:
    engine lost). A worker not replaying yet (loading, compiling) has nothing to drain: it
    stops at the first signal (it compiled its whole warm-up first). An orderly end disarms
    the wait (`_GRACE`: its timer fired into JAX's shutdown barrier). This also takes SIGTERM
    back from jax.distributed's preemption notifier, which only logs it (a worker went on
    replaying after `kill`). Call from the main thread."""
    main = threading.main_thread().ident

    def on_signal(signum, frame) -> None:
        if _GRACE["signalled"] or not _GRACE["replaying"]:
            raise KeyboardInterrupt
        _GRACE["signalled"] = True
        log.warning("%s: waiting up to %.0f s for the leader to drain its requests and shut down; a second signal "
                    "stops this worker now", signal.Signals(signum).name, grace_s)
        # a real signal at the main thread: its wait on the plan channel wakes, and the handler raises
        timer = _GRACE["timer"] = threading.Timer(grace_s, signal.pthread_kill, (main, signal.SIGINT))
        timer.daemon = True
        timer.start()

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, on_signal)


def run_worker(model: str | None, engine_kwargs: dict, channel: PlanChannel, progress=None) -> int:
    """Build this process's part of the engine as the leader sized it, then replay. Returns 0
    after an orderly shutdown, 1 if the leader vanished."""
    from fastserve_jax import LLM

    first = channel.recv()
    if is_shutdown(first):
        return 0
    if first.get("op") != "pools":
        raise ValueError(f"expected the leader's pool sizes first, got {first.get('op')!r}")
    kwargs = {"warmup": "background", **engine_kwargs}      # replays seldom wait on a compile
    kwargs.update(num_device_blocks=int(first["num_device_blocks"]),
                  num_host_blocks=int(first["num_host_blocks"]),
                  # the worker never schedules: a policy without a cost model avoids profiling,
                  # which would run device work the leader does not mirror
                  scheduler="fcfs", cost_model=None, record_stage_activity=False,
                  # a token box, and the same puts and takes in the replayed launches, as the leader's
                  async_scheduling=bool(first.get("async_scheduling", False)))
    llm = LLM(model, progress=progress, **kwargs)
    log.info("worker ready (%s%s); replaying the leader's steps", llm.engine.layout.describe(),
             ", async scheduling" if llm.engine.cfg.async_scheduling else "")
    try:
        channel.send_ready()
        _GRACE["replaying"] = True
        n = replay(llm.engine.runner, channel)
    except ChannelClosed:
        log.error("the leader closed the plan channel without a shutdown message")
        return 1
    finally:
        _GRACE["replaying"] = False
        if _GRACE["timer"] is not None:
            _GRACE["timer"].cancel()
    log.info("leader shut down after %d operations", n)
    return 0


def watch_workers(channel: PlanChannel, on_gone: Callable[[str], None], interval_s: float = 1.0) -> threading.Event:
    """Leader: a thread that calls `on_gone(message)` once a worker's connection closes, also
    while the engine is idle or still compiling (until 2026-12-07 only the next send found it:
    /health said ok and the next request failed). Set the returned event to stop it."""
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(interval_s):
            why = channel.gone()
            if why is not None and not stop.is_set():
                on_gone(why)
                return

    threading.Thread(target=watch, name="fastserve-watch-workers", daemon=True).start()
    return stop


def finish(run: Callable[[], int], channel: PlanChannel, leader: bool) -> int:
    """Run one multi-host process's part and end it. An orderly end (0) tells the workers to
    stop (leader) and leaves through jax.distributed's shutdown barrier, which every process
    then reaches. Any other end (an error, Ctrl-C, a process gone) closes the channel, so the
    others see it at once, and leaves with os._exit: at that barrier a process waited up to
    five minutes for one that was gone or still compiling, then aborted (SIGABRT)."""
    code = 1
    try:
        code = run()
    except KeyboardInterrupt:
        log.error("stopped by SIGINT")
        code = 130
    except SystemExit as e:     # uvicorn's exit where it cannot listen (a port in use): it skipped the
        code = e.code if isinstance(e.code, int) else 1     # channel's close, and both waited 5 min at the barrier
    except Exception:
        log.exception("this %s failed", "leader" if leader else "worker")
    if code == 0:
        (close_workers if leader else PlanChannel.close)(channel)
        return 0
    channel.close()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def close_workers(channel: PlanChannel) -> None:
    """Tell the workers to stop (those still there) and close the channel."""
    try:
        channel.send_shutdown()
    except ChannelClosed as e:        # a worker gone already: the others see the channel close
        log.warning("%s; closing the plan channel", e)
    finally:
        channel.close()
