"""Multi-host start-up and the leader -> worker plan channel (docs/multihost_findings.md).

One process per host, each calling `initialize(cfg)` before any other JAX use. Process 0 (the leader,
which also hosts JAX's coordination service) runs the HTTP server and the scheduler and broadcasts each
iteration's plan with `PlanChannel.send`; workers `recv()` it; all run the same jitted steps.

Frames are sharding/wire.py's (no pickle). Shutdown convention: the leader calls
`send_shutdown()` (sends `SHUTDOWN = {"op": "shutdown"}`) then `close()`; workers stop on
`is_shutdown(msg)`, and `recv()` raises `ChannelClosed` once the leader has closed or died.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import socket
import time
from typing import Any, Mapping

from fastserve_jax.sharding.wire import _MAGIC, _MAX_HEADER, _PREFIX, decode, encode

SHUTDOWN: dict[str, Any] = {"op": "shutdown"}


class ChannelClosed(ConnectionError):
    """The other end of a PlanChannel closed the connection (or died)."""


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Where process 0 is and who this process is. `num_processes`/`process_id` both None: JAX detects them
    (SLURM, Open MPI, Kubernetes, Cloud TPU; not on a plain machine) and `initialize` returns them filled.
    `local_device_count`: checked after start-up; on the CPU backend it also sets the virtual device count."""
    coordinator_address: str  # host:port of process 0; JAX's coordination service listens there
    num_processes: int | None = None
    process_id: int | None = None
    plan_port: int | None = None  # None: coordinator port + 1 (on process 0's host)
    local_device_count: int | None = None

    def __post_init__(self) -> None:
        port = split_address(self.coordinator_address)[1]
        if self.plan_port is None:
            object.__setattr__(self, "plan_port", port + 1)
        n, pid, plan, local = self.num_processes, self.process_id, self.plan_port, self.local_device_count
        if (n is None) != (pid is None):
            raise ValueError("set both num_processes and process_id, or neither (JAX auto-detection)")
        if n is not None and not 0 <= pid < n:
            raise ValueError(f"need num_processes >= 1 and 0 <= process_id < num_processes, got {n} and {pid}")
        if not 0 < plan < 65536 or plan == port:
            raise ValueError(f"plan_port {plan} must be in 1..65535 and differ from the coordinator port")
        if local is not None and local < 1:
            raise ValueError(f"local_device_count must be >= 1, got {local}")

    @property
    def host(self) -> str:
        return split_address(self.coordinator_address)[0]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DistributedConfig:
        """Read FASTSERVE_COORDINATOR (else JAX's own JAX_COORDINATOR_ADDRESS), FASTSERVE_NUM_PROCESSES,
        FASTSERVE_PROCESS_ID, FASTSERVE_PLAN_PORT and FASTSERVE_LOCAL_DEVICE_COUNT (default: os.environ)."""
        env = os.environ if env is None else env
        addr = env.get("FASTSERVE_COORDINATOR") or env.get("JAX_COORDINATOR_ADDRESS")
        if not addr:
            raise ValueError("set FASTSERVE_COORDINATOR (or JAX_COORDINATOR_ADDRESS) to host:port of process 0")
        nums: list[int | None] = []
        for name in ("NUM_PROCESSES", "PROCESS_ID", "PLAN_PORT", "LOCAL_DEVICE_COUNT"):
            raw = env.get(f"FASTSERVE_{name}", "").strip()
            if raw and not raw.lstrip("-").isdigit():
                raise ValueError(f"FASTSERVE_{name} must be an integer, got {raw!r}")
            nums.append(int(raw) if raw else None)
        return cls(addr, *nums)


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"coordinator address must be host:port (port 1..65535), got {address!r}")
    return host.strip("[]"), int(port)


def initialize(cfg: DistributedConfig, timeout_s: int = 300) -> DistributedConfig:
    """Start JAX's distributed runtime; must run before any other JAX use (devices, arrays, jit).
    Returns `cfg` with num_processes and process_id as JAX sees them."""
    import jax

    if jax.distributed.is_initialized():
        raise RuntimeError("jax.distributed is already initialized in this process")
    from jax._src import xla_bridge  # private, only for a clearer error than JAX's own

    if getattr(xla_bridge, "backends_are_initialized", lambda: False)():
        raise RuntimeError("distributed.initialize() must run before any other JAX use (jax.devices(), jnp "
                           "arrays, jit, device_put): JAX's backend is already initialized")
    if cfg.local_device_count is not None:
        jax.config.update("jax_num_cpu_devices", cfg.local_device_count)
    if cfg.process_id:
        wait_for_coordinator(cfg, timeout_s)
    try:
        jax.distributed.initialize(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                                   process_id=cfg.process_id, initialization_timeout=timeout_s)
    except ValueError as e:
        raise ValueError(f"{e} (set FASTSERVE_NUM_PROCESSES and FASTSERVE_PROCESS_ID: JAX detects them "
                         "only on SLURM, Open MPI, Kubernetes and Cloud TPU)") from e
    if cfg.local_device_count is not None and jax.local_device_count() != cfg.local_device_count:
        raise RuntimeError(f"expected {cfg.local_device_count} local devices, JAX sees {jax.local_device_count()}")
    return dataclasses.replace(cfg, num_processes=jax.process_count(), process_id=jax.process_index())


def wait_for_coordinator(cfg: DistributedConfig, timeout_s: float) -> None:
    """A worker's wait for process 0 to listen: JAX's own aborts the process with a gRPC stack
    dump after its timeout (a wrong or unreachable address, process 0 not started)."""
    deadline, addr = time.monotonic() + timeout_s, split_address(cfg.coordinator_address)
    while True:
        try:
            socket.create_connection(addr, max(min(deadline - time.monotonic(), 5.0), 0.1)).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no process 0 listening at {cfg.coordinator_address} within {timeout_s} s ({e}): "
                                   "start process 0, or check --coordinator-address / FASTSERVE_COORDINATOR") from None
            time.sleep(0.2)


def _recv_frame(sock: socket.socket, who: str) -> Any:
    def exact(n: int, mid: bool) -> bytearray:
        buf, got = bytearray(n), 0
        while got < n:
            k = sock.recv_into(memoryview(buf)[got:])
            if k == 0:
                raise ChannelClosed(f"{who} closed the connection" + (" mid-frame" if got or mid else ""))
            got += k
        return buf

    magic, hlen, plen = _PREFIX.unpack(exact(_PREFIX.size, mid=False))
    if magic != _MAGIC or hlen > _MAX_HEADER:
        raise ValueError(f"not a PlanChannel frame from {who} (magic {magic!r})")
    return decode(exact(hlen, True), exact(plen, True))


def _check_role(cfg: DistributedConfig, leader: bool) -> int:
    if cfg.num_processes is None or cfg.process_id is None:
        raise ValueError("PlanChannel needs num_processes and process_id (use the config initialize() returns)")
    if (cfg.process_id == 0) != leader:
        raise ValueError(f"process {cfg.process_id} must {'serve' if cfg.process_id == 0 else 'connect'}")
    return cfg.num_processes


class PlanChannel:
    """Leader -> workers broadcast over TCP. Build with `serve` (process 0) or `connect` (the others).

    One message goes the other way: each worker's `send_ready` once it can follow the leader's
    device operations, which the leader collects with `wait_ready` (multihost.py: before its
    first collective, so a worker still loading or compiling does not leave it waiting in one)."""

    def __init__(self, socks: list[socket.socket], is_leader: bool) -> None:
        self._socks, self.is_leader = socks, is_leader  # leader: one socket per worker, by process id
        self._ready: set[int] = set()                    # leader: workers (socket index) that said ready

    @classmethod
    def serve(cls, cfg: DistributedConfig, timeout_s: float = 120.0, host: str | None = None,
              settings: Mapping[str, Any] | None = None) -> PlanChannel:
        """Accept one connection from each worker on `host` (default: every interface, dual-stack where the
        system has it, as JAX's coordinator listens; the coordinator's IPv4 name before 2026-12-07) and plan_port.
        `settings` (JSON values by name: the model and engine settings every process must share): a worker
        whose hello carries others is refused, and so is this start (ValueError naming the differences)."""
        n, deadline = _check_role(cfg, leader=True), time.monotonic() + timeout_s
        peers: dict[int, socket.socket] = {}
        dual = host is None and socket.has_dualstack_ipv6()
        lsock = socket.create_server((host or "", cfg.plan_port), family=socket.AF_INET6 if dual else socket.AF_INET,
                                     dualstack_ipv6=dual)
        try:
            while len(peers) < n - 1:
                lsock.settimeout(max(deadline - time.monotonic(), 0.0))
                try:
                    sock, _ = lsock.accept()
                except TimeoutError:
                    missing = sorted(set(range(1, n)) - set(peers))
                    raise TimeoutError(f"PlanChannel leader: {len(peers)} of {n - 1} workers connected to port "
                                       f"{cfg.plan_port} within {timeout_s} s; missing process ids {missing}") from None
                sock.settimeout(max(deadline - time.monotonic(), 0.1))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                try:
                    hello = _recv_frame(sock, "worker")
                    pid = hello["process_id"]
                    if hello.get("num_processes") != n or pid in peers or not 0 < pid < n:
                        raise ValueError(f"bad hello {hello} (num_processes={n}, connected={sorted(peers)})")
                    differ = settings_differ(settings or {}, hello.get("settings") or {})
                except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # stray or bad client
                    with contextlib.suppress(OSError):
                        sock.sendall(encode({"op": "error", "message": str(e)}))
                    sock.close()
                    continue
                if differ:     # a real worker of another deployment's settings: neither can serve
                    msg = (f"process {pid} was started with other settings than process 0: {differ}; start every "
                           "process with the same model and engine flags")
                    with contextlib.suppress(OSError):
                        sock.sendall(encode({"op": "error", "message": msg}))
                    sock.close()
                    raise ValueError(msg)
                sock.sendall(encode({"op": "welcome"}))
                sock.settimeout(None)
                peers[pid] = sock
        except BaseException:
            cls(list(peers.values()), is_leader=True).close()
            raise
        finally:
            lsock.close()
        return cls([peers[i] for i in sorted(peers)], is_leader=True)

    @classmethod
    def connect(cls, cfg: DistributedConfig, timeout_s: float = 120.0,
                settings: Mapping[str, Any] | None = None) -> PlanChannel:
        """Connect to the leader, retrying until it listens; TimeoutError after `timeout_s`. `settings`: see
        `serve`; ConnectionError with the leader's reason where it refuses this worker."""
        n, deadline = _check_role(cfg, leader=False), time.monotonic() + timeout_s
        while True:
            try:
                sock = socket.create_connection((cfg.host, cfg.plan_port), max(deadline - time.monotonic(), 0.1))
                break
            except OSError as e:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"PlanChannel worker {cfg.process_id}: no leader listening at {cfg.host}:"
                                       f"{cfg.plan_port} within {timeout_s} s ({e})") from None
                time.sleep(0.05)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(encode({"op": "hello", "process_id": cfg.process_id, "num_processes": n,
                             "settings": dict(settings or {})}))
        try:
            reply = _recv_frame(sock, "PlanChannel leader")
        except OSError as e:        # the leader refused another process and left (a bare "connection reset")
            sock.close()
            raise ConnectionError(f"PlanChannel leader at {cfg.host}:{cfg.plan_port} left during worker "
                                  f"{cfg.process_id}'s handshake ({e}); the leader's log says why") from None
        if reply.get("op") != "welcome":
            sock.close()
            raise ConnectionError(f"PlanChannel leader refused worker {cfg.process_id}: {reply.get('message')}")
        sock.settimeout(None)
        return cls([sock], is_leader=False)

    def send(self, msg: Any) -> None:
        """Leader: broadcast one message to every worker (encoded once, before anything is sent)."""
        if not self.is_leader or not self._socks:
            raise RuntimeError("only the leader sends on a PlanChannel" if self._socks else "PlanChannel is closed")
        frame = encode(msg)
        if (why := self.gone()) is not None:
            raise ChannelClosed(why)
        for i, sock in enumerate(self._socks):
            try:
                sock.sendall(frame)
            except OSError as e:
                raise ChannelClosed(f"PlanChannel: worker {i + 1} is gone ({e})") from e

    def gone(self) -> str | None:
        """Leader: which worker's connection has closed, if any, unread (a send to a dead worker is
        buffered, then the step's collective waited for gloo's timeout; watch_workers asks too)."""
        socks = list(self._socks)
        readable, _, _ = select.select(socks, [], [], 0) if socks else ([], [], [])
        for sock in readable:
            try:
                closed = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
            except BlockingIOError:
                closed = False
            except OSError:
                closed = True
            if closed:
                return f"PlanChannel: worker {socks.index(sock) + 1} is gone (its connection closed)"
        return None

    def send_ready(self) -> None:
        """Worker: tell the leader this process can follow its device operations now."""
        if self.is_leader or not self._socks:
            raise RuntimeError("only workers say they are ready" if self._socks else "PlanChannel is closed")
        try:
            self._socks[0].sendall(encode({"op": "ready"}))
        except OSError as e:
            raise ChannelClosed(f"PlanChannel leader: {e}") from e

    def wait_ready(self, timeout_s: float) -> None:
        """Leader: block until every worker has sent `send_ready` (at once if they all have);
        TimeoutError naming the workers still missing after `timeout_s`, ChannelClosed if one
        went away first."""
        if not self.is_leader or not self._socks:
            raise RuntimeError("only the leader waits for workers" if self._socks else "PlanChannel is closed")
        deadline = time.monotonic() + timeout_s
        for i, sock in enumerate(self._socks):
            if i in self._ready:                         # a retry does not wait for a ready already read
                continue
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                msg = _recv_frame(sock, f"worker {i + 1}")
            except TimeoutError:
                missing = [j + 1 for j in range(len(self._socks)) if j not in self._ready]
                raise TimeoutError(f"PlanChannel leader: workers {missing} not ready within {timeout_s} s "
                                   "(still loading or compiling?)") from None
            except ChannelClosed as e:
                raise ChannelClosed(f"PlanChannel: worker {i + 1} went away before it was ready ({e})") from e
            finally:
                with contextlib.suppress(OSError):
                    sock.settimeout(None)
            if not (isinstance(msg, dict) and msg.get("op") == "ready"):
                raise ValueError(f"PlanChannel: expected worker {i + 1}'s ready message, got {msg!r}")
            self._ready.add(i)

    @property
    def workers_ready(self) -> bool:
        """Leader: every worker has said it is ready."""
        return bool(self._socks) and len(self._ready) == len(self._socks)

    def send_shutdown(self) -> None:
        """Leader: tell the workers to leave their loops (they receive `SHUTDOWN`)."""
        self.send(SHUTDOWN)

    def recv(self) -> Any:
        """Worker: the next message (blocks); ChannelClosed once the leader has gone."""
        if self.is_leader or not self._socks:
            raise RuntimeError("only workers receive on a PlanChannel" if self._socks else "PlanChannel is closed")
        try:
            return _recv_frame(self._socks[0], "PlanChannel leader")
        except OSError as e:  # ChannelClosed is one too
            raise e if isinstance(e, ChannelClosed) else ChannelClosed(f"PlanChannel leader: {e}") from e

    def close(self) -> None:
        """Close the connections; a worker blocked in recv() then gets ChannelClosed."""
        for sock in self._socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._socks = []


def settings_differ(leader: Mapping[str, Any], worker: Mapping[str, Any]) -> str:
    """The settings that differ, as "name: process 0 has A, this one B; ..." ("" where they agree)."""
    leader, worker = (json.loads(json.dumps(dict(d), sort_keys=True)) for d in (leader, worker))  # tuples: lists
    names = sorted(set(leader) | set(worker))
    return "; ".join(f"{k}: process 0 has {leader.get(k)!r}, this one {worker.get(k)!r}"
                     for k in names if leader.get(k) != worker.get(k))


def is_shutdown(msg: Any) -> bool:
    """True for the leader's `SHUTDOWN` message."""
    return isinstance(msg, dict) and msg.get("op") == "shutdown"
