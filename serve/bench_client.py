"""A small asyncio HTTP client for load against the server: one connection per request,
streamed completions timed chunk by chunk, optional disconnect mid-stream, and latency
statistics. Standard library only (no HTTP package), so `fastserve-jax bench` and the
tests run the same code.

Definitions (seconds; per request, then mean / p50 / p99 over requests):

    A token chunk is an event with text or a finish reason (the last one carries EOS).
    ttft   first token chunk - request sent
    tpot   (last token chunk - first token chunk) / (completion tokens - 1), requests
           with > 1 token: the mean time per output token after the first
    itl    gap between consecutive token chunks (pooled over all requests)
    e2e    response complete - request sent
    throughput   completed requests (output tokens) / (last response's end - first send),
                 failed requests' ends included, as vLLM's benchmark's duration
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np


@dataclass
class Result:
    """One streamed request as the client saw it."""

    status: int = 0
    text: str = ""
    ids: set[str] = field(default_factory=set)      # response ids seen (one expected)
    finish_reason: str | None = None
    stop_reasons: list = field(default_factory=list)  # each choice's, from its last chunk (vLLM's stop_reason)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    done: bool = False                              # saw `data: [DONE]`
    disconnected: bool = False                      # the client hung up on purpose
    error: str | None = None
    sent: float = 0.0
    due: float | None = None                        # when an open loop meant to send it
    chunk_times: list[float] = field(default_factory=list)
    end: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.done and self.error is None and not self.disconnected


def split_url(url: str) -> tuple[str, int]:
    """(host, port) of an http://HOST[:PORT] URL (port 80 if none); a ValueError otherwise: the
    client speaks plain HTTP, and "HOST:PORT" alone would not name the port it seems to."""
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError:                 # a port that is not a number, an unclosed [IPv6 address
        u = port = None
    if u is None or u.scheme != "http" or not u.hostname:
        raise ValueError(f"{url or repr(url)}: not an http://HOST[:PORT] URL (e.g. http://127.0.0.1:8000; plain HTTP only)")
    return u.hostname, port or 80


async def _open(url: str, method: str, path: str, body: bytes, headers: dict[str, str]):
    host, port = split_url(url)
    reader, writer = await asyncio.open_connection(host, port)
    head = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close",
            f"Content-Length: {len(body)}"] + [f"{k}: {v}" for k, v in headers.items()]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
    await writer.drain()
    status_line = await reader.readline()
    if not status_line:
        writer.close()
        raise ConnectionError(f"{url}{path}: the server closed the connection without a response")
    status = int(status_line.split()[1])
    resp_headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        k, _, v = line.decode("latin-1").partition(":")
        resp_headers[k.strip().lower()] = v.strip()
    return reader, writer, status, resp_headers


async def _body_pieces(reader: asyncio.StreamReader, headers: dict[str, str]):
    """The response body as it arrives: chunked transfer decoded, else up to Content-Length or EOF."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                return
            data = await reader.readexactly(size)
            await reader.readline()
            yield data
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        yield await reader.read()


async def request(url: str, method: str, path: str, body: bytes = b"",
                  headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """A plain request: (status, headers, body)."""
    reader, writer, status, h = await _open(url, method, path, body, headers or {})
    try:
        data = b"".join([p async for p in _body_pieces(reader, h)])
    finally:
        writer.close()
    return status, h, data


async def stream(url: str, path: str, payload: dict, api_key: str | None = None,
                 disconnect_after: int | None = None) -> Result:
    """POST a streaming request and read its events; hang up after `disconnect_after`
    token chunks if given."""
    res = Result()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    res.sent = time.perf_counter()
    try:
        reader, writer, res.status, h = await _open(url, "POST", path, json.dumps(payload).encode(), headers)
    except OSError as e:
        res.error, res.end = f"{type(e).__name__}: {e}", time.perf_counter()
        return res
    try:
        buf = b""
        async for piece in _body_pieces(reader, h):
            buf += piece
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                if _event(res, event.decode()) and disconnect_after is not None \
                        and len(res.chunk_times) >= disconnect_after:
                    res.disconnected = True
                    return res
        if res.status != 200 and not res.error:
            res.error = buf.decode(errors="replace")
    except (OSError, asyncio.IncompleteReadError, ValueError) as e:
        res.error = f"{type(e).__name__}: {e}"
    finally:
        writer.close()
        res.end = time.perf_counter()
    return res


def _event(res: Result, event: str) -> bool:
    """Apply one SSE event; True if it was a token chunk (text or a finish reason)."""
    if not event.startswith("data: "):
        res.error = f"not an SSE data event: {event[:200]!r}"
        return False
    data = event[6:]
    if data == "[DONE]":
        res.done = True
        return False
    obj = json.loads(data)
    if "error" in obj:
        res.error = obj["error"]["message"]
        return False
    res.ids.add(obj["id"])
    if obj.get("usage"):
        res.prompt_tokens = obj["usage"]["prompt_tokens"]
        res.completion_tokens = obj["usage"]["completion_tokens"]
    token = False
    for ch in obj["choices"]:
        delta = ch.get("delta", {})
        text = ch.get("text", delta.get("content")) or ""
        res.text += text
        res.finish_reason = ch.get("finish_reason") or res.finish_reason
        if "stop_reason" in ch:
            res.stop_reasons.append(ch["stop_reason"])
        # a completion chunk is a token chunk even with empty text (tokens whose text is empty or
        # held back); a chat chunk is, but the first, which only names the role
        token = token or bool(text or ch.get("finish_reason") or "text" in ch or
                              ("content" in delta and "role" not in delta))
    if token:
        res.chunk_times.append(time.perf_counter())
    return token


async def run_load(url: str, payloads: list[dict], arrivals: list[float] | None = None,
                   concurrency: int | None = None, api_key: str | None = None,
                   disconnect_after: list[int | None] | None = None, path: str = "/v1/completions") -> list[Result]:
    """Send every payload (streamed): at `arrivals` seconds from now (open loop), or as fast
    as `concurrency` clients allow (closed loop), or both. Results in payload order."""
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    start = time.perf_counter()

    async def one(i: int) -> Result:
        if arrivals is not None:
            await asyncio.sleep(max(0.0, start + arrivals[i] - time.perf_counter()))
        cut = disconnect_after[i] if disconnect_after else None
        if sem is None:
            res = await stream(url, path, payloads[i], api_key, cut)
        else:
            async with sem:
                res = await stream(url, path, payloads[i], api_key, cut)
        if arrivals is not None:
            res.due = start + arrivals[i]
        return res

    return list(await asyncio.gather(*(one(i) for i in range(len(payloads)))))


def _stats(xs) -> tuple[float, float, float]:
    a = np.asarray(xs, float)
    if not a.size:
        return float("nan"), float("nan"), float("nan")
    return float(a.mean()), float(np.percentile(a, 50)), float(np.percentile(a, 99))


def summarize(results: list[Result]) -> dict[str, float]:
    """Latency and throughput of the completed requests (see the module docstring); NaN
    latencies and no throughput where none completed."""
    done = [r for r in results if r.ok and r.chunk_times]
    ttft = [r.chunk_times[0] - r.sent for r in done]
    tpot = [(r.chunk_times[-1] - r.chunk_times[0]) / (r.completion_tokens - 1)
            for r in done if (r.completion_tokens or 0) > 1]
    itl = [b - a for r in done for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    e2e = [r.end - r.sent for r in done]
    span = max(r.end for r in results) - min(r.sent for r in results)    # until 2026-12-07: the last completed
    out: dict[str, float] = {"completed": len(done), "failed": sum(1 for r in results if not r.ok and not r.disconnected)}
    for name, xs in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2e", e2e)):
        out[f"{name}_mean"], out[f"{name}_p50"], out[f"{name}_p99"] = _stats(xs)
    out["throughput_rps"] = len(done) / span if done else 0.0
    out["throughput_tps"] = sum(r.completion_tokens or 0 for r in done) / span if done else 0.0
    # as vLLM's benchmark JSON: the run's span, and the tokens of the completed requests
    out["duration"] = span
    out["total_input_tokens"] = sum(r.prompt_tokens or 0 for r in done)
    out["total_output_tokens"] = sum(r.completion_tokens or 0 for r in done)
    return out


def ephemeral_port_start() -> int:
    """The first port of the kernel's ephemeral range (Linux's default 32768 where it is unknown)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def unused_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on, for a server started next, chosen below the kernel's
    ephemeral range. A port bound to 0 and closed comes from that range, and any outbound
    connection on the machine (a client of another server, a jax.distributed channel) may take
    it in the seconds before the server binds it: "address already in use"."""
    low = ephemeral_port_start()
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(max(1024, low - 20000), low)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        return port
    with socket.socket() as s:                     # every pick taken: the kernel's, with its race
        s.bind((host, 0))
        return s.getsockname()[1]
