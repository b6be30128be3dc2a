"""The OpenAI-compatible Starlette app.

    POST /v1/completions, /v1/chat/completions   (stream: Server-Sent Events, then [DONE])
    GET  /v1/models (serve/model_cards.py), /health (200 only once warm-up is done), /metrics (Prometheus text)
    POST /tokenize, /detokenize; GET /version    (vLLM's; serve/tokenize.py)

The engine runs on its own thread, or with `engine_process` in its own process
(serve/async_engine.py, docs/serving.md); handlers validate at the boundary, so bad input
is a 400 and nothing is queued, then submit token ids and read deltas. Status codes: 400
invalid parameters or a prompt longer than the context (the message states the limits),
401 missing or wrong API key (/v1, /tokenize, /detokenize and /invocations), 404 unknown model, 413 body over
--max-body-bytes, 503 with Retry-After while warming up, draining, when the admission
queue (--max-pending engine requests; n choices count n) is full, or once the engine
process was lost, 500 only for engine faults, which fail the requests of that iteration
and never the server (a lost engine process fails its live requests). After FAULTY_AFTER
failed iterations in a row /health is 503 and requests are let in one at a time (503 for
the others) until an iteration succeeds.

A client that disconnects, streaming or not, aborts its requests; their KV is freed
before the engine's next iteration. CORS and --root-path wrap the routes (serve/http_layer.py);
with `log_stats` a task logs the engine's throughput and load (serve/stats_log.py).

`priority` (an integer extension) is accepted and currently ignored: the policies order
requests by attained service or arrival, and the engine has no per-request priority.
`seed` with n > 1 gives choice j `choice_seed(seed, j)` (the sampler's seed + j), so choices differ yet
are reproducible, and -1 is no seed (vLLM's).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fastserve_jax.sampling_params import MAX_LOGPROBS
from fastserve_jax.serve.async_engine import AsyncEngine
from fastserve_jax.serve.errors import APIError, overloaded
from fastserve_jax.serve.http_layer import SCOPE_KEY as REQUEST_ID_KEY, header_value, middleware
from fastserve_jax.serve.prometheus import ServerMetrics
from fastserve_jax.serve.openai_format import Formatter
from fastserve_jax.serve.prepare import prepare
from fastserve_jax.serve.json_body import parse_body
from fastserve_jax.serve.model_cards import model, models, version
from fastserve_jax.serve.protocol import parse_chat, parse_completion
from fastserve_jax.serve.protocol_extras import header_request_id
from fastserve_jax.serve.stats_log import STATS_INTERVAL_S, log_stats
from fastserve_jax.serve.streaming import ClientGone, EventStream, collect, unless_cut
from fastserve_jax.serve.tokenize import detokenize as detokenize_ids, parse_detokenize, parse_tokenize
from fastserve_jax.serve.tokenize import tokenize as tokenize_job

if TYPE_CHECKING:     # the engine (and jax) load in the engine loop; this process may do without
    from fastserve_jax.engine import LLMEngine
    from fastserve_jax.serve.engine_process import ProcessTransport

log = logging.getLogger("fastserve_jax.serve")
FAULTY_AFTER = 3       # consecutive failed iterations before /health reports the engine failing (Server.admit)


@dataclass(frozen=True)
class ServerConfig:
    model_name: str = "demo"
    api_key: str | tuple[str, ...] | None = None     # a request may send any one of several (vLLM's list)
    max_pending: int = 4096             # engine requests admitted and unfinished; more get 503
    max_body_bytes: int = 1 << 20
    retry_after: int = 1                # seconds, in Retry-After of a 503
    engine_process: bool = False        # the engine loop in a process of its own (a picklable build)
    chat_template: str | None = None    # --chat-template's Jinja text (load_chat_template); None: the tokenizer's
    chat_content_format: str = "auto"   # --chat-template-content-format (fastserve_jax/chat_template.py)
    # serve/server_args.py's options: the other names --served-model-name accepts, --root-path, CORS, logging
    model_aliases: tuple[str, ...] = ()
    model_root: str | None = None       # the cards' root: --model as given (None: model_name)
    root_path: str = ""
    cors_origins: tuple[str, ...] = ("*",)
    cors_methods: tuple[str, ...] = ("*",)
    cors_headers: tuple[str, ...] = ("*",)
    cors_credentials: bool = False
    log_requests: bool = False          # a log line per request received
    max_log_len: int = 500              # characters of its prompt that line shows (--max-log-len)
    log_stats: bool = True              # the periodic stats line (serve/stats_log.py)
    stats_interval: float = STATS_INTERVAL_S
    max_logprobs: int = MAX_LOGPROBS    # the most logprobs a request may ask (--max-logprobs)
    request_id_headers: bool = False    # X-Request-Id on every response (--enable-request-id-headers)
    response_role: str = "assistant"    # chat answers' role after a generation prompt (--response-role)
    tokens_as_ids: bool = False         # every request's return_tokens_as_token_ids (the flag's)


class Server:
    """What the handlers share: the engine, the metrics, the config, the draining flag."""

    def __init__(self, build: Callable[[Callable[[], bool]], "LLMEngine"], cfg: ServerConfig,
                 transport: "ProcessTransport | None" = None) -> None:
        self.cfg = cfg
        self.metrics: ServerMetrics
        self.engine = AsyncEngine(build, cfg.max_pending, on_timing=lambda rid, d, prompt: self.metrics.observe(rid, d, prompt),
                                  engine_process=cfg.engine_process, transport=transport)
        self.metrics = ServerMetrics(self.engine, serving=lambda: self.status()[0] == 200, model_name=cfg.model_name)
        self.draining = False
        self.started = int(time.time())
        # One thread: requests are tokenized one at a time, in arrival order, as on the event
        # loop before, and the tokenizer never sees two encodes at once.
        self.preparer = ThreadPoolExecutor(1, thread_name_prefix="fastserve-prepare")
        self.cut_off, self.cut_off_message = asyncio.Event(), ""     # set by end_live

    def end_live(self, message: str, status: int) -> None:
        """The shutdown's grace is about to end: every live request, and every body still
        arriving, is answered `status` with `message` (serve/draining.py)."""
        self.cut_off_message = message
        self.cut_off.set()
        self.engine.end_live(message, status)

    async def prepared(self, request: Request, fn: Callable, *args):
        """fn(*args) on the preparing thread, dropped if the client goes away first (ClientGone)
        or the shutdown's grace ends (503, as end_live answers)."""
        return await unless_cut(asyncio.get_running_loop().run_in_executor(self.preparer, fn, *args),
                                self.cut_off, self.cut_answer, request.receive)

    def cut_answer(self) -> APIError:
        return APIError(503, self.cut_off_message)

    def status(self) -> tuple[int, str]:
        """/health's answer: 503 while unavailable() or while the engine is failing (the last
        FAULTY_AFTER iterations raised)."""
        down = self.unavailable()
        if down is not None:
            return 503, down
        h = self.engine.health
        if h.consecutive_faults >= FAULTY_AFTER:
            return 503, (f"engine failing: the last {h.consecutive_faults} iterations raised (see the server log); "
                         "requests are let in one at a time until an iteration succeeds")
        return 200, "ok"

    def unavailable(self) -> str | None:
        """Why no request can be served now, or None."""
        h = self.engine.health
        if h.startup_error:
            return f"failed to start: {h.startup_error}"
        if h.lost:
            return f"engine lost: {h.lost} (see the server log); restart the server"
        if self.draining or self.engine.stopped:
            return "shutting down"
        if not h.ready:
            return "warming up (compiling); retry shortly"
        return None

    def check_auth(self, request: Request) -> None:
        keys = self.cfg.api_key
        if not keys:
            return
        scheme, _, got = request.headers.get("authorization", "").partition(" ")
        # the scheme's case is free (HTTP's rule; vLLM's too); every key is compared, in constant time
        matches = [hmac.compare_digest(got.encode(), k.encode()) for k in ((keys,) if isinstance(keys, str) else keys)]
        if scheme.lower() != "bearer" or not any(matches):
            raise APIError(401, "missing or incorrect API key; send the header 'Authorization: Bearer <key>' "
                                "with the key the server was started with (--api-key or FASTSERVE_API_KEY)",
                           code="invalid_api_key")

    def check_model(self, model: str | None) -> None:
        if model and model != self.cfg.model_name and model not in self.cfg.model_aliases:
            names = "', '".join((self.cfg.model_name, *self.cfg.model_aliases))
            raise APIError(404, f"the model '{model}' does not exist; this server serves '{names}' "
                                "(see GET /v1/models)", param="model", code="model_not_found")

    def check_serving(self) -> None:
        message = self.unavailable()
        if message is not None:
            self._refuse(message)

    def _refuse(self, message: str) -> None:
        self.metrics.rejected.labels("unavailable").inc()
        raise APIError(503, f"the server is not serving: {message}", headers={"Retry-After": str(self.cfg.retry_after)})

    def check_count(self, count: int, param: str = "n") -> None:
        """A request of more engine requests (prompts x n) than the server admits at once is a
        400; one the full queue has no room for now a 503 (both before any tokenizing)."""
        cap = self.cfg.max_pending
        if count > cap:
            raise APIError(400, f"this request needs {count} engine requests (prompts x n) but the server admits "
                                f"at most {cap} at once; send fewer prompts or a smaller n", param=param)
        self._room(count)       # full already: a 503 now, not after the tokenizing (behind others' prompts)

    def admit(self, count: int) -> None:
        """Room for `count` engine requests, checked right before they are submitted: the state
        is read again, as the server may have begun to drain (or its engine to stop, which made
        submit() raise: a 500) while the request was being tokenized. (`check_count` came
        before the tokenizing.)"""
        self.check_serving()
        if self.engine.num_pending and self.engine.health.consecutive_faults >= FAULTY_AFTER:
            # A failing engine takes one request (group) at a time: the step it needs is the only
            # way the fault count can reset (a transient fault), and a lasting one fails no more
            # than that request. Refusing every request kept a server failing for good.
            self._refuse(self.status()[1])
        self._room(count)

    def _room(self, count: int) -> None:
        pending, cap = self.engine.num_pending, self.cfg.max_pending
        if pending + count > cap:
            self.metrics.rejected.labels("queue_full").inc()
            raise overloaded(f"the admission queue is full ({pending} of {cap} requests pending); retry after "
                             f"{self.cfg.retry_after} s", self.cfg.retry_after)


async def _read_body(request: Request, srv: Server) -> bytes:
    """The body, or 413 past --max-body-bytes. One still arriving when the shutdown's grace ends
    is a 503 (uvicorn's cancel made it a plain-text 500 and a logged traceback)."""
    return await unless_cut(asyncio.ensure_future(_body(request, srv.cfg.max_body_bytes)), srv.cut_off,
                            srv.cut_answer)


async def _body(request: Request, limit: int) -> bytes:
    """An oversized body is read to its end (up to 64x the limit) before answering, so the
    client sees the 413 rather than a reset; one whose Content-Length says it is longer than
    that is answered at once (a client that sent less waited for its own timeout)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > 64 * limit:
        raise APIError(413, f"the request body ({declared} bytes) is larger than the server's limit of {limit} bytes "
                            "(--max-body-bytes)")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            elif size > 64 * limit:
                break
    except ClientDisconnect:      # gone mid-upload: nothing to answer, nothing queued, nothing to log
        raise APIError(400, "the client disconnected before sending the whole request body") from None
    if size > limit:
        raise APIError(413, f"the request body is larger than the server's limit of {limit} bytes "
                            "(--max-body-bytes)")
    return b"".join(chunks)


async def _generate(request: Request, chat: bool, body: dict | None = None) -> Response | EventStream:
    """`body`: already read and parsed (/invocations)."""
    srv: Server = request.app.state.server
    arrival = time.monotonic()
    srv.check_auth(request)
    if body is None:
        body = parse_body(await _read_body(request, srv))
    job = (parse_chat(body, srv.cfg.max_logprobs, srv.cfg.chat_content_format) if chat
           else parse_completion(body, srv.cfg.max_logprobs))
    if (rid := header_request_id(header_value(request.headers.raw, b"x-request-id"))) is not None:
        job = dataclasses.replace(job, request_id=rid)              # vLLM's: the header names the response
    if srv.cfg.tokens_as_ids:       # vLLM's: the flag or the request's field
        job = dataclasses.replace(job, tokens_as_ids=True)
    srv.check_model(job.model)
    srv.check_serving()
    if job.ignored:      # as vLLM does with the fields it does not read
        log.warning("request fields accepted and ignored: %s", ", ".join(job.ignored))
    # before tokenizing: 45,000 prompts took the preparing thread, which every request waits on, 2.5 s
    srv.check_count(len(job.prompts) * job.n, "prompt" if len(job.prompts) > 1 else "n")
    eng = srv.engine.engine
    # tokenizing (a 1 MB prompt: ~1 s) and chat templates run off the event loop, which serves every stream
    prompts, prompt_tokens = await srv.prepared(request, prepare, job, eng, srv.cfg.chat_template)
    srv.admit(len(prompts))
    group = srv.engine.submit(prompts, arrival, job.n)
    fmt = Formatter.for_job(job, srv.cfg.model_name, eng.tokenizer, prompts, eng.cfg.enable_prefix_caching,
                            srv.cfg.response_role)
    if srv.cfg.log_requests:
        first = job.prompts[0]
        log.info("received request %s: prompt %.*r (%d prompt tokens in all, %d engine requests), params %s",
                 fmt.id, srv.cfg.max_log_len, first if job.chat or isinstance(first, str) else
                 eng.tokenizer.decode(first), prompt_tokens, len(prompts), prompts[0][1])
    if job.stream:
        return EventStream(group, fmt, job.include_usage, prompt_tokens)
    choices = await collect(request, group, fmt)
    return JSONResponse(fmt.response(choices, prompt_tokens))


async def completions(request: Request) -> Response:
    return await _generate(request, chat=False)


async def chat_completions(request: Request) -> Response:
    return await _generate(request, chat=True)


async def tokenize(request: Request) -> Response:
    """vLLM's POST /tokenize (serve/tokenize.py), answered by the front end's tokenizer."""
    srv: Server = request.app.state.server
    srv.check_auth(request)
    body = parse_body(await _read_body(request, srv))
    job = parse_tokenize(body, srv.cfg.chat_content_format)
    srv.check_model(job.model)
    srv.check_serving()
    return JSONResponse(await srv.prepared(request, tokenize_job, job, srv.engine.engine, srv.cfg.chat_template))


async def detokenize(request: Request) -> Response:
    """vLLM's POST /detokenize: token ids to text, special tokens kept."""
    srv: Server = request.app.state.server
    srv.check_auth(request)
    body = parse_body(await _read_body(request, srv))
    srv.check_serving()
    model, ids = parse_detokenize(body, srv.engine.engine)
    srv.check_model(model)
    return JSONResponse(await srv.prepared(request, detokenize_ids, ids, srv.engine.engine))


async def invocations(request: Request) -> Response:
    """SageMaker's entry point, as vLLM serves it: a body with `messages` is a chat completion,
    one with `prompt` a completion."""
    srv: Server = request.app.state.server
    srv.check_auth(request)
    body = parse_body(await _read_body(request, srv))
    if (body.get("messages") is None) == (body.get("prompt") is None):     # null is left out, as everywhere
        raise APIError(400, "an /invocations body holds 'messages' (a chat completion) or 'prompt' (a completion), "
                            "one of the two")
    return await _generate(request, chat=body.get("messages") is not None, body=body)


async def health(request: Request) -> Response:
    srv: Server = request.app.state.server
    status, message = srv.status()
    body = {"status": message}
    if srv.engine.engine is not None:
        body["scheduler"] = srv.engine.engine.cfg.scheduler
    return JSONResponse(body, status_code=status, headers={} if status == 200 else
                        {"Retry-After": str(srv.cfg.retry_after)})


async def metrics(request: Request) -> Response:
    srv: Server = request.app.state.server
    return Response(await srv.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def _api_error(request: Request, exc: APIError) -> Response:
    return exc.response()


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return APIError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}",
                    headers=exc.headers).response()          # a 405's Allow


async def _gone(request: Request, exc: ClientGone) -> Response:
    return Response(status_code=499)     # nobody to answer (nginx's "client closed request" in the log)


async def _unexpected(request: Request, exc: Exception) -> Response:
    """A bug, not bad input: Starlette re-raises it after this response, so uvicorn logs it.
    Sent outside the middleware: the X-Request-Id header (--enable-request-id-headers) is added here."""
    rid = request.scope.get(REQUEST_ID_KEY)
    return APIError(500, f"internal server error: {type(exc).__name__}: {exc}",
                    headers={"X-Request-Id": rid.decode("latin-1")} if rid else None).response()


def create_app(build: Callable[[Callable[[], bool]], "LLMEngine"], cfg: ServerConfig | None = None,
               transport: "ProcessTransport | None" = None) -> Starlette:
    """The app; `build(stopping)` (run in the engine loop at start-up) loads and warms up the
    engine (serve/engine_loop.py: a stop during the warm-up cancels it).
    `transport`: an engine process already spawned with `build` (serve starts it first)."""
    srv = Server(build, cfg or ServerConfig(), transport)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        srv.engine.start()
        stats = asyncio.create_task(log_stats(srv.engine, srv.cfg.stats_interval)) if srv.cfg.log_stats else None
        yield
        if stats is not None:
            stats.cancel()
        srv.draining = True
        await srv.engine.stop()
        srv.preparer.shutdown(wait=False)

    app = Starlette(routes=[
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET"]),
        Route("/invocations", invocations, methods=["POST"]),
        Route("/ping", health, methods=["GET", "POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/version", version, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ], exception_handlers={APIError: _api_error, ClientGone: _gone, HTTPException: _http_error,
                         Exception: _unexpected},
        lifespan=lifespan, middleware=middleware(srv.cfg))
    app.state.server = srv
    return app
