"""sharding.distributed: config parsing, the plan channel's wire format over real loopback
sockets, and a two-process jax.distributed run that follows a plan sent by process 0."""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fastserve_jax.serve.bench_client import unused_port
from fastserve_jax.sharding.distributed import (SHUTDOWN, ChannelClosed, DistributedConfig, PlanChannel, decode, encode,
                                  is_shutdown)

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    return unused_port()


def cfgs(n: int) -> list[DistributedConfig]:
    port = free_port()
    return [DistributedConfig(f"127.0.0.1:{free_port()}", n, i, plan_port=port) for i in range(n)]


def roundtrip(msg):
    frame = encode(msg)
    hlen = int.from_bytes(frame[4:8], "big")
    return decode(frame[16:16 + hlen], bytearray(frame[16 + hlen:]))


def assert_same(a, b):
    assert type(a) is type(b), (a, b)
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


PLAN = {
    "op": "step", "iteration": 7, "temperature": 0.5, "greedy": True, "note": None, "name": "décode",
    "tokens": np.arange(12, dtype=np.int32).reshape(3, 4),
    "block_tables": np.array([[1, 2, 0], [3, 4, 5]], np.int32)[:, ::2],  # non-contiguous
    "top_p": np.array([0.9, 1.0], np.float32), "seeds": np.array([2**32 - 1, 0], np.uint32),
    "mask": np.array([True, False, True]), "scalar": np.array(3.5, np.float32),
    "empty": np.zeros((0, 5), np.int32), "empty1d": np.array([], np.float32),
    "ops": [{"op": "swap_out", "ids": np.array([5, 9], np.int32)}, {"op": "noop"}, [[np.int64(-3)]]],
    "by_seq": {3: np.array([1], np.int32), 11: "x"},
}


def test_roundtrip_in_memory():
    out = roundtrip(PLAN)
    expect = dict(PLAN, block_tables=np.ascontiguousarray(PLAN["block_tables"]))
    assert_same(out, expect)
    assert isinstance(out["ops"][2][0][0], np.int64) and out["ops"][2][0][0] == -3
    assert out["scalar"].shape == () and out["tokens"].flags.writeable
    assert roundtrip((1, [2, (3,)])) == [1, [2, [3]]]  # tuples come back as lists
    assert roundtrip(np.array([1.5], ">f8"))[0] == 1.5  # non-native byte order


@pytest.mark.parametrize("bad, where", [
    (object(), "msg"), ({"a": [1, {2.5: 1}]}, "msg['a'][1]"), ({"x": np.array(["s"])}, "msg['x']"),
    ({"x": np.array([object()])}, "msg['x']"), ({"f": lambda: 0}, "msg['f']"), ({1, 2}, "msg"),
    ({"b": b"raw"}, "msg['b']"),
])
def test_rejects_non_encodable(bad, where):
    with pytest.raises(TypeError, match=re.escape(where) + ":"):
        encode(bad)


def test_rejects_corrupt_header():
    with pytest.raises(ValueError, match="corrupt array"):
        decode(json.dumps({"a": ["<i4", [4], 0, 16]}).encode(), bytearray(8))
    with pytest.raises(ValueError, match="corrupt array"):
        decode(json.dumps({"a": ["|O", [1], 0, 8]}).encode(), bytearray(8))


def test_broadcast_to_two_workers_over_loopback():
    cfg = cfgs(3)
    got: dict[int, list] = {1: [], 2: []}
    errors: list[BaseException] = []

    def worker(c: DistributedConfig) -> None:
        try:
            ch = PlanChannel.connect(c, timeout_s=20)
            while not is_shutdown(got[c.process_id][-1] if got[c.process_id] else None):
                got[c.process_id].append(ch.recv())
            with pytest.raises(ChannelClosed, match="leader closed the connection"):  # closed after shutdown
                ch.recv()
            ch.close()
            with pytest.raises(RuntimeError, match="closed"):
                ch.recv()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(c,)) for c in cfg[1:]]
    for t in threads:  # workers first: connect() retries until the leader listens
        t.start()
    leader = PlanChannel.serve(cfg[0], timeout_s=20)
    with pytest.raises(TypeError):  # nothing of a non-encodable message reaches the workers
        leader.send({"ok": np.zeros(3), "bad": object()})
    leader.send(PLAN)
    leader.send({"big": np.arange(1 << 20, dtype=np.float32)})
    leader.send_shutdown()
    leader.close()
    for t in threads:
        t.join(30)
    assert not errors, errors
    expect = dict(PLAN, block_tables=np.ascontiguousarray(PLAN["block_tables"]))
    for pid in (1, 2):
        assert len(got[pid]) == 3
        assert_same(got[pid][0], expect)
        assert np.array_equal(got[pid][1]["big"], np.arange(1 << 20, dtype=np.float32))
        assert got[pid][2] == SHUTDOWN


def test_leader_mirror_holds_device_ops_until_every_worker_is_ready():
    """multihost.LeaderMirror: the pool sizes go out at once; the next operation waits for the
    workers' ready messages (a worker still compiling must not leave the leader in a collective)."""
    from fastserve_jax.multihost import LeaderMirror

    cfg = cfgs(3)
    events: list[tuple[str, float]] = []
    errors: list[BaseException] = []

    def worker(c: DistributedConfig, delay: float) -> None:
        try:
            ch = PlanChannel.connect(c, timeout_s=20)
            assert ch.recv()["op"] == "pools"
            time.sleep(delay)                             # loading and compiling
            events.append((f"ready{c.process_id}", time.monotonic()))
            ch.send_ready()
            assert ch.recv()["op"] == "step"
            assert is_shutdown(ch.recv())
            ch.close()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(c, d)) for c, d in zip(cfg[1:], (0.2, 0.6))]
    for t in threads:
        t.start()
    channel = PlanChannel.serve(cfg[0], timeout_s=20)
    mirror = LeaderMirror(channel, ready_timeout_s=20)
    t0 = time.monotonic()
    mirror({"op": "pools", "num_device_blocks": 9})
    assert time.monotonic() - t0 < 0.2 and not channel.workers_ready        # the first message does not wait
    mirror({"op": "step", "x": np.zeros(2, np.float32)})
    events.append(("step", time.monotonic()))
    assert channel.workers_ready
    mirror.wait_ready()                                                      # at once now
    channel.send_shutdown()
    channel.close()
    for t in threads:
        t.join(30)
    assert not errors, errors
    t = dict(events)
    assert t["step"] >= max(t["ready1"], t["ready2"]), events


def test_wait_ready_names_the_workers_not_ready_and_reports_one_that_left():
    cfg = cfgs(3)
    chans: dict[int, PlanChannel] = {}
    threads = [threading.Thread(target=lambda c=c: chans.__setitem__(c.process_id, PlanChannel.connect(c, 20)))
               for c in cfg[1:]]
    for t in threads:
        t.start()
    leader = PlanChannel.serve(cfg[0], timeout_s=20)
    for t in threads:
        t.join(30)
    chans[1].send_ready()
    with pytest.raises(TimeoutError, match=r"workers \[2\] not ready within 0.3 s"):
        leader.wait_ready(0.3)
    chans[2].send_ready()
    leader.wait_ready(5)                         # a retry does not wait again for worker 1's ready
    assert leader.workers_ready
    with pytest.raises(RuntimeError, match="only workers"):
        leader.send_ready()
    with pytest.raises(RuntimeError, match="only the leader"):
        chans[2].wait_ready(1)
    leader.close()

    cfg = cfgs(2)
    t = threading.Thread(target=lambda: chans.__setitem__(9, PlanChannel.connect(cfg[1], 20)))
    t.start()
    leader = PlanChannel.serve(cfg[0], timeout_s=20)
    t.join(30)
    chans[9].close()                                                         # gone before it was ready
    with pytest.raises(ChannelClosed, match="worker 1 went away before it was ready"):
        leader.wait_ready(5)
    leader.close()


def test_connect_timeout():
    cfg = cfgs(2)[1]
    with pytest.raises(TimeoutError, match=f"no leader listening at 127.0.0.1:{cfg.plan_port}"):
        PlanChannel.connect(cfg, timeout_s=0.3)


def test_serve_timeout_names_missing_workers():
    with pytest.raises(TimeoutError, match=r"0 of 2 workers .* missing process ids \[1, 2\]"):
        PlanChannel.serve(cfgs(3)[0], timeout_s=0.3)


@pytest.mark.parametrize("worker_host", ["127.0.0.1", "::1"])
def test_the_leader_listens_on_every_interface(worker_host):
    """The plan port was bound to the coordinator's host name, which on the leader's own host may
    resolve to loopback (a Debian-style "127.0.1.1 hostname" line), and IPv4 only: a worker
    that reached JAX's coordinator (which listens everywhere) then waited 120 s for a leader it
    could not reach. Here the leader's name is another address than the worker's."""
    if worker_host == "::1" and not socket.has_dualstack_ipv6():
        pytest.skip("no dual-stack sockets here")
    port, leader_host = free_port(), "::1" if worker_host == "127.0.0.1" else "127.0.0.1"
    leader_cfg = DistributedConfig(f"[{leader_host}]:{free_port()}", 2, 0, plan_port=port)
    worker_cfg = DistributedConfig(f"[{worker_host}]:{free_port()}", 2, 1, plan_port=port)
    if worker_host == "127.0.0.1" and not socket.has_dualstack_ipv6():
        leader_cfg = DistributedConfig(f"localhost:{free_port()}", 2, 0, plan_port=port)
    done = []
    t = threading.Thread(target=lambda: done.append(PlanChannel.connect(worker_cfg, timeout_s=10)))
    t.start()
    leader = PlanChannel.serve(leader_cfg, timeout_s=10)
    t.join(10)
    leader.send_shutdown()
    assert is_shutdown(done[0].recv())
    done[0].close()
    leader.close()


def test_wrong_roles_and_unresolved_config():
    c0, c1 = cfgs(2)
    with pytest.raises(ValueError, match="must connect"):
        PlanChannel.serve(c1, timeout_s=0.1)
    with pytest.raises(ValueError, match="must serve"):
        PlanChannel.connect(c0, timeout_s=0.1)
    with pytest.raises(ValueError, match="num_processes and process_id"):
        PlanChannel.serve(DistributedConfig("127.0.0.1:1234"), timeout_s=0.1)


def test_from_env():
    c = DistributedConfig.from_env({"FASTSERVE_COORDINATOR": "10.0.0.1:1234", "FASTSERVE_NUM_PROCESSES": "4",
                                    "FASTSERVE_PROCESS_ID": "3", "FASTSERVE_LOCAL_DEVICE_COUNT": "8"})
    assert (c.host, c.num_processes, c.process_id, c.plan_port, c.local_device_count) == ("10.0.0.1", 4, 3, 1235, 8)
    c = DistributedConfig.from_env({"JAX_COORDINATOR_ADDRESS": "[::1]:5000", "FASTSERVE_PLAN_PORT": "6000"})
    assert (c.host, c.num_processes, c.process_id, c.plan_port) == ("::1", None, None, 6000)


@pytest.mark.parametrize("env, match", [
    ({}, "FASTSERVE_COORDINATOR"),
    ({"FASTSERVE_COORDINATOR": "10.0.0.1"}, "host:port"),
    ({"FASTSERVE_COORDINATOR": "h:99999"}, "host:port"),
    ({"FASTSERVE_COORDINATOR": "h:1", "FASTSERVE_NUM_PROCESSES": "two", "FASTSERVE_PROCESS_ID": "0"},
     "FASTSERVE_NUM_PROCESSES must be an integer"),
    ({"FASTSERVE_COORDINATOR": "h:1", "FASTSERVE_NUM_PROCESSES": "2"}, "both num_processes and process_id"),
    ({"FASTSERVE_COORDINATOR": "h:1", "FASTSERVE_NUM_PROCESSES": "2", "FASTSERVE_PROCESS_ID": "2"},
     "0 <= process_id < num_processes, got 2 and 2"),
    ({"FASTSERVE_COORDINATOR": "h:1", "FASTSERVE_NUM_PROCESSES": "0", "FASTSERVE_PROCESS_ID": "0"},
     "need num_processes >= 1"),
    ({"FASTSERVE_COORDINATOR": "h:5", "FASTSERVE_PLAN_PORT": "5"}, "differ from the coordinator port"),
    ({"FASTSERVE_COORDINATOR": "h:65535"}, "plan_port 65536"),
    ({"FASTSERVE_COORDINATOR": "h:5", "FASTSERVE_LOCAL_DEVICE_COUNT": "0"}, "local_device_count"),
])
def test_from_env_validation(env, match):
    with pytest.raises(ValueError, match=match):
        DistributedConfig.from_env(env)


def test_initialize_after_jax_use_is_refused():
    code = textwrap.dedent("""
        import jax
        from fastserve_jax.sharding.distributed import DistributedConfig, initialize
        jax.devices()
        try:
            initialize(DistributedConfig("127.0.0.1:1", 1, 0))
        except RuntimeError as e:
            print("REFUSED", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "REFUSED" in out.stdout and "before any other JAX use" in out.stdout, out.stderr[-2000:]


def test_serve_with_only_a_coordinator_address_says_what_is_missing(monkeypatch, capsys):
    """JAX_COORDINATOR_ADDRESS alone (no process count or id, no cluster JAX detects): the log
    line's %d failed on the id's None and initialize's ValueError was a traceback, exit 1
    (until 2026-12-07); now one line, exit 2. JAX's own initialize is stood in for: it must run
    before any other JAX use, which this test process has made."""
    from fastserve_jax.serve import serve_cmd
    from fastserve_jax.serve.cli import main
    from fastserve_jax.sharding import distributed

    def no_count(cfg, timeout_s):
        assert cfg.process_id is None and cfg.num_processes is None
        raise ValueError("Number of processes must be defined. (set FASTSERVE_NUM_PROCESSES ...)")
    monkeypatch.setattr(distributed, "initialize", no_count)
    monkeypatch.setattr(serve_cmd, "multihost_hangs_on", lambda version: None)     # on any jax
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    for k in ("FASTSERVE_COORDINATOR", "FASTSERVE_NUM_PROCESSES", "FASTSERVE_PROCESS_ID"):
        monkeypatch.delenv(k, raising=False)
    assert main(["serve", "--port", str(unused_port())]) == 2
    err = capsys.readouterr().err
    assert "error: Number of processes must be defined" in err and "Logging error" not in err, err


def test_one_process_serves_as_a_single_host_and_a_count_without_a_coordinator_is_refused(monkeypatch, caplog):
    """`--num-processes 1` (a script that sets it from the host count, on one host) started JAX's
    coordinator and a plan channel with no worker, whose first send failed ("PlanChannel is
    closed"): every such start ended in exit 1. It now serves as a single host. And
    $FASTSERVE_NUM_PROCESSES without a coordinator was ignored (a worker whose coordinator
    variable was mistyped became a second, independent server), where the flags are refused."""
    import argparse

    from fastserve_jax.serve.serve_cmd import _distributed

    for k in ("FASTSERVE_COORDINATOR", "JAX_COORDINATOR_ADDRESS", "FASTSERVE_NUM_PROCESSES", "FASTSERVE_PROCESS_ID"):
        monkeypatch.delenv(k, raising=False)
    flags = dict(coordinator_address="127.0.0.1:18292", num_processes=1, process_id=0)
    with caplog.at_level(logging.INFO, logger="fastserve_jax.serve"):
        assert _distributed(argparse.Namespace(**flags)) is None
    assert "serves as a single host" in caplog.text
    two = _distributed(argparse.Namespace(**dict(flags, num_processes=2)))
    assert (two.num_processes, two.process_id) == (2, 0)
    none = argparse.Namespace(coordinator_address=None, num_processes=None, process_id=None)
    assert _distributed(none) is None
    monkeypatch.setenv("FASTSERVE_NUM_PROCESSES", "2")
    monkeypatch.setenv("FASTSERVE_PROCESS_ID", "1")
    with pytest.raises(ValueError, match=r"\$FASTSERVE_NUM_PROCESSES and \$FASTSERVE_PROCESS_ID need --coordinator"):
        _distributed(none)


def test_multihost_serving_is_refused_on_the_jax_that_hangs_it(monkeypatch, capsys):
    """On jax 0.12.1 (pip's for Python 3.12 and 3.13) a two-process server's first step waited in
    gloo's all-reduce for good while /health said 200 (a version-matrix probe, 2026-12-08):
    refused at start, before JAX's coordinator, with the versions that serve."""
    import importlib.metadata

    from fastserve_jax.serve import serve_cmd
    from fastserve_jax.serve.cli import main

    assert serve_cmd.multihost_hangs_on("0.10.2") is None is serve_cmd.multihost_hangs_on("0.12.0")
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.12.1" if name == "jax" else real(name))
    monkeypatch.setattr(serve_cmd, "_taken_ports", lambda dist: pytest.fail("got past the version check"))
    for k in ("FASTSERVE_COORDINATOR", "JAX_COORDINATOR_ADDRESS", "FASTSERVE_NUM_PROCESSES", "FASTSERVE_PROCESS_ID"):
        monkeypatch.delenv(k, raising=False)
    assert main(["serve", "--coordinator-address", "127.0.0.1:18292", "--num-processes", "2", "--process-id", "0"]) == 2
    assert "error: multi-host serving hangs on jax 0.12.1" in capsys.readouterr().err


TWO_PROCESS = textwrap.dedent("""
    import json, sys
    import numpy as np
    from fastserve_jax.sharding.distributed import DistributedConfig, PlanChannel, initialize, is_shutdown
    cfg = initialize(DistributedConfig(sys.argv[1], 2, int(sys.argv[2]), plan_port=int(sys.argv[3]),
                                       local_device_count=2), timeout_s=120)
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    mesh = Mesh(np.array(jax.devices()), ("tp",))
    w = jax.make_array_from_callback((8,), NamedSharding(mesh, P("tp")), lambda idx: np.arange(8.0, dtype=np.float32)[idx])
    step = jax.jit(lambda x, w: jax.shard_map(lambda x, w: jax.lax.psum((x * w).sum(), "tp"), mesh=mesh,
                                              in_specs=(P("tp"), P("tp")), out_specs=P())(x, w))
    if cfg.process_id == 0:
        ch = PlanChannel.serve(cfg, timeout_s=120)
        plan = {"op": "step", "x": np.full((8,), 3.0, np.float32)}
        ch.send(plan)
    else:
        ch = PlanChannel.connect(cfg, timeout_s=120)
        plan = ch.recv()
    out = step(plan["x"], w)
    if cfg.process_id == 0:
        ch.send_shutdown()
    else:
        assert is_shutdown(ch.recv())
    ch.close()
    print("RESULT", json.dumps({"pid": cfg.process_id, "n": cfg.num_processes, "devices": jax.device_count(),
                                "local": jax.local_device_count(), "sum": float(out.addressable_data(0))}), flush=True)
""")


def test_two_processes_psum_following_a_plan():
    # Generous waits: on a 2-core machine running other tests beside it, one process can take
    # a minute to import JAX while the other waits for it (a 60 s wait failed once, 2026-12-02).
    coord, plan_port = f"127.0.0.1:{free_port()}", free_port()
    procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESS, coord, str(i), str(plan_port)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # SIGKILL: JAX's preemption notifier catches SIGTERM
    results = []
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.split("RESULT ", 1)[1]))
    for pid, r in enumerate(results):  # 3 * (0 + 1 + ... + 7), psum over both processes' devices
        assert r == {"pid": pid, "n": 2, "devices": 4, "local": 2, "sum": 84.0}


def test_leader_refuses_duplicate_worker():
    cfg = cfgs(3)
    result: list[BaseException] = []

    def lead() -> None:
        try:
            PlanChannel.serve(cfg[0], timeout_s=3)
        except BaseException as e:  # noqa: BLE001 - checked below
            result.append(e)

    t = threading.Thread(target=lead)
    t.start()
    first = PlanChannel.connect(cfg[1], timeout_s=5)
    with pytest.raises(ConnectionError, match="refused worker 1"):
        PlanChannel.connect(cfg[1], timeout_s=5)
    t.join(10)
    first.close()
    assert len(result) == 1 and isinstance(result[0], TimeoutError) and "missing process ids [2]" in str(result[0])


def test_handshake_refuses_a_worker_started_with_other_settings():
    """Processes started with other engine flags or another model would join the same
    collectives with other programs or weights (a hang, or silently wrong text): the plan
    channel's hello compares them, and both ends fail naming what differs."""
    cfg = cfgs(2)
    lead = {"dtype": "float32", "max_num_seqs": 4, "buckets": (1, 2), "model file config.json": "10 bytes, ab"}
    result: list[BaseException] = []

    def serve() -> None:
        try:
            PlanChannel.serve(cfg[0], timeout_s=10, settings=lead)
        except BaseException as e:  # noqa: BLE001 - checked below
            result.append(e)

    t = threading.Thread(target=serve)
    t.start()
    worker = dict(lead, max_num_seqs=8, **{"model file config.json": "10 bytes, cd"})
    with pytest.raises(ConnectionError, match=r"max_num_seqs: process 0 has 4, this one 8") as e:
        PlanChannel.connect(cfg[1], timeout_s=5, settings=worker)
    assert "model file config.json" in str(e.value) and "buckets" not in str(e.value)   # tuple == list
    t.join(10)
    assert len(result) == 1 and isinstance(result[0], ValueError), result
    assert "process 1 was started with other settings" in str(result[0]) and "same model and engine flags" in str(result[0])


def test_handshake_accepts_equal_settings():
    cfg = cfgs(2)
    chans: list[PlanChannel] = []
    t = threading.Thread(target=lambda: chans.append(PlanChannel.serve(cfg[0], timeout_s=10, settings={"tp": (2,)})))
    t.start()
    w = PlanChannel.connect(cfg[1], timeout_s=5, settings={"tp": [2]})
    t.join(10)
    assert len(chans) == 1
    chans[0].send({"op": "x"})
    assert w.recv() == {"op": "x"}
    w.close()
    chans[0].close()


def test_deployment_settings_tell_models_and_program_flags_apart(tiny_checkpoints, tmp_path):
    import shutil

    from fastserve_jax.models.random_checkpoint import make_random_checkpoint
    from fastserve_jax.multihost import deployment_settings
    from fastserve_jax.sharding.distributed import settings_differ

    kw = dict(dtype="auto", tensor_parallel_size=2, max_num_seqs=4, scheduler="fcfs", seed=0)
    a = tiny_checkpoints("llama")
    copy = shutil.copytree(a, tmp_path / "copy")               # the same model at another path
    leader_only = dict(kw, scheduler="mlfq", seed=3, gpu_memory_utilization=0.5, swap_space=0)   # the leader sizes pools
    assert settings_differ(deployment_settings(a, kw), deployment_settings(str(copy), leader_only)) == ""
    other = make_random_checkpoint(str(tmp_path / "other"), "llama", seed=1)   # same shapes, other weights
    assert "model file model.safetensors" in settings_differ(deployment_settings(a, kw), deployment_settings(other, kw))
    assert "tensor_parallel_size" in settings_differ(deployment_settings(a, kw),
                                                     deployment_settings(a, dict(kw, tensor_parallel_size=4)))
    assert deployment_settings(None, kw)["model file config.json"]              # the demo model
    # a --tokenizer directory: by its files, not its path, as the model's
    assert settings_differ(deployment_settings(a, dict(kw, tokenizer=str(copy))),
                           deployment_settings(a, dict(kw, tokenizer=a))) == ""
    (copy / "tokenizer.json").write_text("{}")
    assert "tokenizer file tokenizer.json" in settings_differ(deployment_settings(a, dict(kw, tokenizer=str(copy))),
                                                              deployment_settings(a, dict(kw, tokenizer=a)))
    # a weight file that differs only in its middle (a copy damaged there, a fine-tune of middle
    # tensors) passed the ends' digest and served wrong text
    big, changed = tmp_path / "big", tmp_path / "changed"
    for d, mid in ((big, b"\0"), (changed, b"\1")):
        d.mkdir()
        (d / "config.json").write_text("{}")
        (d / "model.safetensors").write_bytes(b"h" * (1 << 20) + mid * (3 << 20) + b"t" * (1 << 20))
    assert "model file model.safetensors" in settings_differ(deployment_settings(str(big), kw),
                                                             deployment_settings(str(changed), kw))
    (copy / "chat_template.jinja").write_text("{{ messages }}")
    assert "chat_template.jinja" in settings_differ(deployment_settings(str(copy), kw), deployment_settings(a, kw))
    # a tokenizer that is no local directory is compared as given
    assert "tokenizer" in settings_differ(deployment_settings(a, dict(kw, tokenizer="org/a")),
                                          deployment_settings(a, dict(kw, tokenizer="org/b")))


@pytest.mark.parametrize("grace, second, replaying, stopped_within", [
    (1.5, False, True, (1.4, 6)), (60, True, True, (0.4, 6)), (60, False, False, (0, 0.4))])
def test_a_signalled_worker_leaves_its_leader_time_to_drain_then_stops(grace, second, replaying, stopped_within):
    """jax.distributed catches SIGTERM (it only logs it): a worker went on replaying after a
    supervisor's stop. Then serve's workers died at the signal, which a Ctrl-C or a supervisor
    sends every process of a host at once, failing the requests their leader was still
    draining (a probe, 2026-12-07). The first signal now leaves the leader `grace` seconds to
    shut the worker down; then, or at a second signal, the worker stops. One not replaying yet
    (loading, compiling) has nothing to drain and stops at once (it compiled its warm-up first)."""
    code = textwrap.dedent("""
        import os, signal, sys, time
        from fastserve_jax.sharding.distributed import DistributedConfig, initialize
        initialize(DistributedConfig(sys.argv[1], 1, 0, local_device_count=1), timeout_s=30)
        from fastserve_jax import multihost
        multihost.stop_after_the_leader(float(sys.argv[2]))
        multihost._GRACE["replaying"] = sys.argv[4] == "True"
        t0 = time.monotonic()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)
            if sys.argv[3] == "True":
                os.kill(os.getpid(), signal.SIGINT)
            time.sleep(20)
        except KeyboardInterrupt:
            print(f"STOPPED AFTER {time.monotonic() - t0:.2f}", flush=True)
            os._exit(3)
        print("STILL ALIVE", flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", code, f"127.0.0.1:{free_port()}", str(grace), str(second),
                          str(replaying)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 3 and "STOPPED AFTER" in out.stdout, (out.returncode, out.stdout, out.stderr[-2000:])
    assert stopped_within[0] <= float(out.stdout.split()[-1]) < stopped_within[1], out.stdout
    assert ("SIGTERM: waiting up to" in out.stderr) == replaying


def test_the_first_send_after_a_worker_died_fails():
    """The kernel buffered the first frame to a dead worker, so the leader went on into the
    step's collective and waited there for it (30 s, then a gloo error): send now checks for
    a closed worker connection first."""
    cfg = cfgs(2)
    chans: list[PlanChannel] = []
    t = threading.Thread(target=lambda: chans.append(PlanChannel.serve(cfg[0], timeout_s=10)))
    t.start()
    w = PlanChannel.connect(cfg[1], timeout_s=5)
    t.join(10)
    leader = chans[0]
    leader.send({"op": "x"})
    assert w.recv() == {"op": "x"}
    w.close()
    time.sleep(0.1)
    with pytest.raises(ChannelClosed, match="worker 1 is gone"):
        leader.send({"op": "dispatch"})
    from fastserve_jax.multihost import close_workers
    close_workers(leader)             # a worker gone already: no error at the server's exit


def test_a_worker_waits_for_its_coordinator_with_a_clear_timeout():
    """jax.distributed aborts a worker whose coordinator never answers (SIGABRT and a gRPC
    stack dump, after 300 s); serve's workers first wait for process 0 to listen."""
    from fastserve_jax.sharding.distributed import wait_for_coordinator

    cfg = cfgs(2)[1]
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"no process 0 listening at 127\.0\.0\.1:\d+ within 0.5 s.*coordinator-address"):
        wait_for_coordinator(cfg, 0.5)
    assert time.monotonic() - t0 < 3
    import socket
    with socket.create_server(("127.0.0.1", int(cfg.coordinator_address.rsplit(":", 1)[1]))):
        wait_for_coordinator(cfg, 5)              # listening: returns at once


def test_a_process_part_ending_in_system_exit_closes_the_channel_and_leaves_at_once(monkeypatch):
    """uvicorn exits with sys.exit where it cannot listen (a port in use): finish() let the
    SystemExit through without closing the channel or leaving by os._exit, so the leader and its
    worker waited five minutes at JAX's shutdown barrier, then aborted."""
    from fastserve_jax import multihost

    closed, left = [], []

    class Channel:
        def close(self):
            closed.append(1)

    def leave(code):
        left.append(code)
        raise RuntimeError("left")          # os._exit's stand-in: nothing after it runs
    monkeypatch.setattr(multihost.os, "_exit", leave)
    with pytest.raises(RuntimeError, match="left"):
        multihost.finish(lambda: sys.exit(3), Channel(), leader=True)
    assert closed == [1] and left == [3]
