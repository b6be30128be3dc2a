"""Soak `fastserve-jax serve` with a random mix of requests for a while, with a device KV pool
too small for what is live (so requests are preempted and their KV swapped or recomputed),
and check everything it answers.

A real server process (the bundled demo model, which counts: "count from A to B:" answers
" A A+1 ... B"), several concurrent clients, each drawing one kind of request at a time:

    exact       completions, greedy, streamed or not, n 1-2, sometimes logprobs: every
                choice is the exact answer, finish_reason "stop", usage counts its tokens,
                one logprob per token
    echo        the same with echo, not streamed: the prompt, then the answer (with logprobs,
                the prompt tokens' first: null, then one per token)
    stop        a stop string inside the answer: the text up to it, finish_reason "stop",
                stop_reason that string (vLLM's; null for exact, echo and length)
    length      max_tokens under the answer's length: its first max_tokens numbers, "length"
    seeded      temperature 1 with a seed, sent twice at different times (so in different
                batches): both answers the same (samples depend only on the seed and step)
    chat        chat completions, streamed or not: a well-formed answer with a finish reason
    disconnect  streamed, the client hangs up after a few chunks
    bad         a body with an invalid field: 400 with an OpenAI error, never a 5xx
    prefix      a long count's prompt with the first part of its answer (one of a few such
                counts, cut at a random point, so requests share their first blocks), sometimes
                with a cache_salt: the rest of the answer exactly. Not streamed, so the usage is
                checked: with --enable-prefix-caching in --serve-args, prompt_tokens_details
                .cached_tokens is under the prompt's length, and some requests must find tokens
                cached; without it, the field is absent

At the end the server must come back to idle (no live request, no KV block used on the
device or the host, per /metrics), stop on SIGINT with status 0, and its log must hold no
traceback. It prints the requests of each kind and the server's memory (RSS, its process and
its children) every 30 s and at the end; exit status 1 on any failure.

    python scripts/soak_server.py --minutes 5
    python scripts/soak_server.py --minutes 5 --scheduler gittins --swap-policy recompute --engine-process
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python scripts/soak_server.py --serve-args "-tp 2 -pp 2"

Uses only the standard library beside the project (serve/bench_client.py's HTTP client).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastserve_jax.models import demo_task  # noqa: E402
from fastserve_jax.serve import bench_client  # noqa: E402

KINDS = ("exact", "echo", "stop", "length", "seeded", "chat", "disconnect", "bad", "prefix")
BAD_BODIES = ({"temperature": -1}, {"max_tokens": "many"}, {"top_p": 0}, {"n": 0}, {"logprobs": 99},
              {"stop": 5}, {"prompt": []}, {"presence_penalty": 9})


def rss_kib(pid: int) -> int:
    """Resident memory of a process and its descendants, KiB (Linux /proc; 0 where unreadable)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next((int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")), 0)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            pass
    return total


def screened_pairs(seed: int, n: int = 2000, n_long: int = 6) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Counting pairs the demo model answers exactly (it misses ~0.6%): n drawn with answers of
    1-60 numbers, and up to n_long of 100-200 numbers (the `prefix` kind's shared counts: a
    prompt with part of its answer is continued exactly where the whole answer is)."""
    from fastserve_jax.models import demo_model_path
    from fastserve_jax.models.tokenizer import load_tokenizer

    rng = random.Random(seed)
    pairs = [(a, min(a + rng.randrange(0, 60), demo_task.MAX_NUMBER)) for a in (rng.randrange(0, 950) for _ in range(n))]
    long = [(a, a + rng.randrange(99, 200)) for a in (rng.randrange(0, 790) for _ in range(2 * n_long))]
    ok = set(demo_task.answerable(pairs + long, load_tokenizer(demo_model_path())))
    return [p for p in pairs if p in ok], [p for p in long if p in ok][:n_long]


class Soak:
    def __init__(self, url: str, seed: int, pairs: list[tuple[int, int]], counts: list[tuple[int, int]],
                 caching: bool):
        self.url, self.rng, self.pairs, self.counts_long, self.caching = url, random.Random(seed), pairs, counts, caching
        self.cached_tokens = 0
        self.counts = collections.Counter()
        self.failures: list[str] = []
        self.seeded: dict[int, str] = {}

    def fail(self, kind: str, what: str) -> None:
        self.failures.append(f"{kind}: {what}")

    async def post(self, path: str, body: dict) -> tuple[int, dict]:
        status, _, data = await bench_client.request(self.url, "POST", path, json.dumps(body).encode(),
                                                     {"Content-Type": "application/json"})
        try:
            return status, json.loads(data)
        except ValueError:
            return status, {"unparsed": data[:300].decode(errors="replace")}

    async def one(self) -> None:
        rng = self.rng
        kind = rng.choice(KINDS)
        a, b = rng.choice(self.pairs)
        prompt = demo_task.make_prompt(a, b)
        want = demo_task.expected_answer(a, b)
        body = {"model": "demo", "prompt": prompt, "max_tokens": 80, "temperature": 0}
        stream = rng.random() < 0.5
        if kind in ("exact", "echo"):
            n = rng.choice((1, 1, 2))
            body.update(n=n, echo=kind == "echo")
            if rng.random() < 0.3:             # with echo: the prompt's logprobs first
                body["logprobs"] = rng.randrange(0, 4)
            want = prompt + want if kind == "echo" else want
            await self.check_choices(kind, body, stream and kind == "exact", [want] * n, "stop",
                                     n * demo_task.answer_num_tokens(a, b))
        elif kind == "stop":
            k = rng.randrange(a, b + 1)
            stop = f" {k}"
            body["stop"] = [stop]
            await self.check_choices(kind, body, stream, [want[:want.find(stop)]], "stop", None, stop)
        elif kind == "length":
            m = rng.randrange(1, b - a + 2)
            body["max_tokens"] = m
            await self.check_choices(kind, body, stream, ["".join(f" {i}" for i in range(a, a + m))], "length", m)
        elif kind == "seeded":
            seed = rng.randrange(0, 20)
            body.update(temperature=1.0, seed=seed, max_tokens=24, prompt=demo_task.make_prompt(seed, seed + 30))
            status, out = await self.post("/v1/completions", body)
            if status != 200:
                return self.fail(kind, f"{status} {str(out)[:200]}")
            text = out["choices"][0]["text"]
            if self.seeded.setdefault(seed, text) != text:
                self.fail(kind, f"seed {seed}: {self.seeded[seed]!r} then {text!r}")
        elif kind == "chat":
            chat = {"model": "demo", "messages": [{"role": "user", "content": prompt}], "max_tokens": 40,
                    "temperature": 0}
            if stream:
                res = await bench_client.stream(self.url, "/v1/chat/completions", dict(chat, stream=True))
                ok = res.status == 200 and res.done and not res.error and res.finish_reason in ("stop", "length")
                detail = f"{res.status} {res.error} {res.finish_reason}"
            else:
                status, out = await self.post("/v1/chat/completions", chat)
                ok = status == 200 and out["choices"][0]["finish_reason"] in ("stop", "length") \
                    and isinstance(out["choices"][0]["message"]["content"], str)
                detail = f"{status} {str(out)[:200]}"
            if not ok:
                self.fail(kind, detail)
        elif kind == "disconnect":
            res = await bench_client.stream(self.url, "/v1/completions", dict(body, stream=True),
                                            disconnect_after=rng.randrange(1, 4))
            if res.status != 200 or res.error or not want.startswith(res.text):
                self.fail(kind, f"{res.status} {res.error} {res.text[:80]!r} not a prefix of {want[:80]!r}")
        elif kind == "prefix":
            await self.prefix(*rng.choice(self.counts_long))
        else:
            status, out = await self.post("/v1/completions", dict(body, **rng.choice(BAD_BODIES)))
            if status != 400 or "error" not in out:
                self.fail(kind, f"{status} {str(out)[:200]}")
        self.counts[kind] += 1

    async def prefix(self, a: int, b: int) -> None:
        k = self.rng.randrange(b - a - 58, b - a + 1)            # numbers given; 1-59 left to answer
        body = {"model": "demo", "prompt": demo_task.make_prompt(a, b) + demo_task.expected_answer(a, a + k - 1),
                "max_tokens": 80, "temperature": 0}
        if self.rng.random() < 0.2:
            body["cache_salt"] = self.rng.choice(("tenant-1", "tenant-2"))
        status, out = await self.post("/v1/completions", body)
        want = demo_task.expected_answer(a + k, b)
        if status != 200 or out["choices"][0]["text"] != want or out["choices"][0]["finish_reason"] != "stop":
            return self.fail("prefix", f"{body['prompt'][:40]!r}... ({k} numbers given): {status} {str(out)[:200]}, "
                                       f"want {want[:60]!r}")
        u = out["usage"]
        cached = u.get("prompt_tokens_details", {}).get("cached_tokens")
        if (cached is None) == self.caching or (cached is not None and not 0 <= cached < u["prompt_tokens"]):
            return self.fail("prefix", f"usage {u} with prefix caching {'on' if self.caching else 'off'}")
        self.cached_tokens += cached or 0

    async def check_choices(self, kind: str, body: dict, stream: bool, texts: list[str], finish: str,
                            tokens: int | None, stop_reason: str | None = None) -> None:
        """`stop_reason`: each choice's (the stop string that ended it; None at EOS or length)."""
        n = len(texts)
        if stream:
            res = await bench_client.stream(self.url, "/v1/completions",
                                            dict(body, stream=True, stream_options={"include_usage": True}))
            got = [res.text] if res.status == 200 and res.done and not res.error else None
            reasons, used, detail = [res.finish_reason], res.completion_tokens, f"{res.status} {res.error}"
            stops = res.stop_reasons
            if len(texts) > 1:                 # n > 1 streams interleave choices: compare as a multiset
                got, texts = (sorted(got[0].split(" ")) if got else None), sorted("".join(texts).split(" "))
        else:
            status, out = await self.post("/v1/completions", body)
            ok = status == 200 and "choices" in out
            got = [c["text"] for c in out["choices"]] if ok else None
            reasons = [c["finish_reason"] for c in out["choices"]] if ok else []
            stops = [c.get("stop_reason", "absent") for c in out["choices"]] if ok else []
            used, detail = (out.get("usage") or {}).get("completion_tokens"), f"{status} {str(out)[:200]}"
            for c in out.get("choices", []) if ok and body.get("logprobs") is not None else []:
                lps = c["logprobs"]["token_logprobs"]
                prompt = out["usage"]["prompt_tokens"] if body.get("echo") else 0     # one prompt, n choices
                if len(lps) != prompt + (tokens or 0) // len(texts) or (prompt and lps[0] is not None) \
                        or any(x is None or x > 0 for x in lps[1 if prompt else 0:]):
                    got = [f"bad logprobs {lps}"]
        if got != texts or any(r != finish for r in reasons) or (tokens is not None and used != tokens) \
                or (got is not None and stops != [stop_reason] * n):
            self.fail(kind, f"{body['prompt']!r} stream={stream}: got {got and [t[:60] for t in got]} "
                            f"{reasons} {used} tokens stop_reason {stops}, want {[t[:60] for t in texts]} {finish} "
                            f"{tokens} stop_reason {stop_reason} ({detail})")

    async def run(self, seconds: float, clients: int, pid: int) -> list[int]:
        """The clients until `seconds` have passed; the server's RSS (KiB) every 30 s."""
        end = time.monotonic() + seconds
        rss = []

        async def sample():
            while time.monotonic() < end:
                rss.append(rss_kib(pid))
                await asyncio.sleep(min(30.0, max(0.0, end - time.monotonic())))

        async def client():
            while time.monotonic() < end:
                try:
                    await self.one()
                except Exception as e:  # noqa: BLE001 - a client-side failure is a finding
                    self.fail("client", f"{type(e).__name__}: {e}")

        await asyncio.gather(sample(), *(client() for _ in range(clients)))
        return rss


def metrics(url: str) -> dict[str, float]:
    status, _, data = asyncio.run(bench_client.request(url, "GET", "/metrics"))
    assert status == 200, status
    out = {}
    for ln in data.decode().splitlines():
        if ln and not ln.startswith("#"):
            name, _, value = ln.rpartition(" ")
            out[name] = float(value)
    return out


def idle(m: dict[str, float]) -> bool:
    return all(v == 0 for k, v in m.items() if k.startswith(("fastserve_requests{", "fastserve_kv_blocks_used{")))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--clients", type=int, default=24, help="concurrent clients (default 24)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scheduler", default="skip-join-mlfq")
    ap.add_argument("--swap-policy", default="proactive")
    ap.add_argument("--num-device-blocks", type=int, default=24, help="16-token blocks (default 24: a few requests)")
    ap.add_argument("--engine-process", action="store_true")
    ap.add_argument("--no-async-scheduling", action="store_true")
    ap.add_argument("--serve-args", default="", help="more `serve` options, one string (e.g. \"-tp 2 -pp 2\"; "
                    "on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=4 gives the devices)")
    args = ap.parse_args(argv)
    if args.minutes <= 0 or args.clients < 1:
        ap.error("--minutes must be > 0 and --clients >= 1")
    port = bench_client.unused_port()
    url = f"http://127.0.0.1:{port}"
    log_path = os.path.join(tempfile.mkdtemp(prefix="soak-"), "server.log")
    cmd = [sys.executable, "-m", "fastserve_jax", "serve", "--port", str(port), "--scheduler", args.scheduler,
           "--swap-policy", args.swap_policy, "--num-device-blocks", str(args.num_device_blocks),
           "--max-num-seqs", "8", "--max-pending", "4096", "--warmup", "full", "--seed", str(args.seed),
           "--engine-process" if args.engine_process else "--no-engine-process"]
    if args.no_async_scheduling:
        cmd.append("--no-async-scheduling")
    cmd += args.serve_args.split()
    print(" ".join(cmd[1:]), f"(log {log_path})", flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        return soak(proc, url, log_path, args)
    finally:
        if proc.poll() is None:
            proc.kill()


def soak(proc: subprocess.Popen, url: str, log_path: str, args) -> int:
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            print(open(log_path).read()[-3000:])
            print("the server did not come up")
            return 1
        try:
            if asyncio.run(bench_client.request(url, "GET", "/health"))[0] == 200:
                break
        except OSError:
            pass
        time.sleep(0.5)
    s = Soak(url, args.seed, *screened_pairs(args.seed), caching="--enable-prefix-caching" in args.serve_args.split())
    t0 = time.monotonic()
    rss = asyncio.run(s.run(args.minutes * 60, args.clients, proc.pid))
    took = time.monotonic() - t0
    end = time.monotonic() + 60
    while not idle(m := metrics(url)) and time.monotonic() < end:
        time.sleep(0.5)
    if not idle(m):
        s.fail("idle", str({k: v for k, v in m.items() if k.startswith(("fastserve_requests{", "fastserve_kv_blocks"))}))
    swapped = m.get('fastserve_swap_blocks_total{direction="out"}', 0)
    recomputed = m.get("fastserve_recomputations_total", 0)
    if m.get("fastserve_engine_faults_total", 0):
        s.fail("engine", f"{m['fastserve_engine_faults_total']:.0f} engine faults")
    hits = m.get("fastserve_prefix_cache_hits_total", 0)
    if s.caching and s.counts["prefix"] >= 10 and not (s.cached_tokens and hits):
        s.fail("prefix", f"{s.counts['prefix']} prefix requests, {s.cached_tokens} tokens reported cached, "
                         f"{hits:.0f} cache hits on /metrics: caching found nothing")
    rss.append(rss_kib(proc.pid))
    proc.send_signal(signal.SIGINT)
    try:
        rc = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        rc = None
    if rc not in (0, -signal.SIGINT):
        s.fail("shutdown", f"exit status {rc}")
    text = open(log_path).read()
    if "Traceback" in text:
        s.fail("log", text[text.index("Traceback"):][:2000])
    total = sum(s.counts.values())
    print(f"{total} requests in {took:.0f} s ({total / took:.1f}/s): "
          + ", ".join(f"{k} {s.counts[k]}" for k in KINDS))
    if s.caching:
        print(f"prefix cache: {hits:.0f} tokens found of {m.get('fastserve_prefix_cache_queries_total', 0):.0f} "
              f"looked up; the prefix requests' usage reported {s.cached_tokens} cached; "
              f"{m.get('fastserve_swap_in_shared_blocks_total', 0):.0f} blocks found on the device by swap-ins")
    print(f"KV blocks swapped out {swapped:.0f}, requests recomputed {recomputed:.0f}; "
          f"server RSS every 30 s from the start, then idle at the end (MiB): {' '.join(f'{r / 1024:.0f}' for r in rss)}")
    for f in s.failures[:20]:
        print("FAIL", f)
    print(f"{len(s.failures)} failures" if s.failures else "ok")
    return 1 if s.failures else 0


if __name__ == "__main__":
    sys.exit(main())
