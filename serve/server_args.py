"""`serve`'s vLLM options for the HTTP layer and the server's logs: the model's names, uvicorn's
log level, root path and TLS files, CORS, request and stats logging, and the most logprobs a
request may ask. What they give: `server_settings(a)` (ServerConfig's fields) and
`uvicorn_settings(a)` (uvicorn.Config's)."""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import stat

from fastserve_jax.sampling_params import MAX_LOGPROBS


def _json_strings(text: str) -> list[str]:
    """An argparse type: a JSON array of strings, as vLLM reads --allowed-origins and the rest."""
    try:
        v = json.loads(text)
    except ValueError:
        v = None
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise argparse.ArgumentTypeError(f'must be a JSON array of strings, as \'["*"]\', got {text!r}')
    return v


def add_server_args(g) -> None:
    """The options, added to serve's "server" argument group."""
    g.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="the model name(s) clients send: any is accepted, the first is what responses and "
                        "/v1/models report first (default: 'demo' for the bundled model, else --model as given, "
                        "as vLLM's)")
    g.add_argument("--uvicorn-log-level", default=None,
                   choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="uvicorn's own log level (its access log is at info; default: --log-level)")
    g.add_argument("--root-path", default=None,
                   help="the path prefix a reverse proxy serves this server under (ASGI root_path): requests "
                        "are routed with or without it")
    g.add_argument("--allowed-origins", type=_json_strings, default=["*"],
                   help="CORS: origins browsers may call from, a JSON array (default %(default)s, vLLM's)")
    g.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials (cookies)")
    g.add_argument("--allowed-methods", type=_json_strings, default=["*"],
                   help="CORS: allowed methods, a JSON array (default %(default)s)")
    g.add_argument("--allowed-headers", type=_json_strings, default=["*"],
                   help="CORS: allowed request headers, a JSON array (default %(default)s)")
    g.add_argument("--ssl-keyfile", default=None, help="serve HTTPS with this private key file (PEM)")
    g.add_argument("--ssl-certfile", default=None, help="and this certificate chain file (PEM)")
    g.add_argument("--ssl-ca-certs", default=None, help="CA certificates that client certificates are checked against")
    g.add_argument("--ssl-cert-reqs", type=int, default=int(ssl.CERT_NONE), choices=[int(m) for m in ssl.VerifyMode],
                   help="whether a client certificate is required: 0 none, 1 optional, 2 required "
                        "(Python's ssl.CERT_*; default %(default)s)")
    g.add_argument("--enable-log-requests", action=argparse.BooleanOptionalAction, default=False,
                   help="log a line per request received: its id, prompt (cut to 500 characters), prompt tokens "
                        "and sampling parameters (default off, as vLLM's)")
    g.add_argument("--disable-log-requests", dest="enable_log_requests", action="store_false",
                   help="(vLLM's older name) no line per request: the default")
    g.add_argument("--max-log-len", type=int, default=500,
                   help="characters of a prompt that --enable-log-requests' line shows (vLLM's; default %(default)s)")
    g.add_argument("--disable-log-stats", action="store_true",
                   help="no periodic stats line (every 10 s while requests are served: prompt and generation "
                        "throughput, requests running, waiting, paused and swapped, KV pools' usage)")
    g.add_argument("--enable-request-id-headers", action="store_true",
                   help="every response carries an X-Request-Id header: the request's own, else a new one (vLLM's). "
                        "A completion's id is cmpl-<X-Request-Id> (chatcmpl- for chat) whenever the request has "
                        "one, with or without this flag")
    g.add_argument("--max-logprobs", type=int, default=MAX_LOGPROBS,
                   help=f"the most logprobs (and top_logprobs, prompt_logprobs) a request may ask, at most "
                        f"{MAX_LOGPROBS}: the sampler computes that many (default %(default)s)")


# vLLM server flags naming what this server lacks; the value None or 1 asks for nothing
REFUSED_SERVER_FLAGS = {
    "--middleware": "extra ASGI middleware is not loaded",
    "--enable-server-load-tracking": "GET /load is not served; /metrics' vllm:num_requests_running and "
                                     "vllm:num_requests_waiting say the load",
    "--api-server-count": "one API server process serves (--engine-process moves the engine to a process of its own)",
    "--data-parallel-size": "data parallelism is not implemented; run a server per replica behind a load balancer",
    "--headless": "every process but the leader already serves no HTTP (--process-id, docs/parallelism.md)",
    "--enable-auto-tool-choice": "tool calls are not parsed out of answers; the chat template still sees `tools`",
    "--tool-call-parser": "tool calls are not parsed out of answers; the chat template still sees `tools`",
    "--config": "flags are not read from a YAML file; give them on the command line",
}


def add_vllm_server_args(p: argparse.ArgumentParser, g) -> None:
    """vLLM's server flags beyond the ones above: `serve MODEL` (its positional model) and the
    flags a vLLM command line carries, each taken or refused with a reason (`vllm_refusal`)."""
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="the model directory, as in `vllm serve MODEL` (the same as --model)")
    g.add_argument("--disable-uvicorn-access-log", action="store_true", help="no access log line per HTTP request")
    g.add_argument("--uds", default=None, metavar="PATH",
                   help="listen on this Unix domain socket instead of --host and --port")
    g.add_argument("--response-role", default="assistant",
                   help="the role chat answers carry where the request adds the generation prompt (vLLM's; "
                        "default %(default)s)")
    g.add_argument("--return-tokens-as-token-ids", action="store_true",
                   help="logprobs name every token 'token_id:<id>', as the request field of that name asks")
    for flag in REFUSED_SERVER_FLAGS:
        g.add_argument(flag, nargs="?", const=True, default=None, help=argparse.SUPPRESS)


def vllm_refusal(a: argparse.Namespace) -> str | None:
    """One line for a vLLM server flag naming a missing feature, or for a positional model
    unlike --model, else None; the positional becomes --model."""
    if not hasattr(a, "model_tag"):     # another command
        return None
    for flag, why in REFUSED_SERVER_FLAGS.items():
        value = getattr(a, flag[2:].replace("-", "_"))
        if value is not None and str(value) != "1":
            return f"{flag}: not implemented: {why}"
    if a.model_tag is not None:
        if a.model is not None and a.model != a.model_tag:
            return f"the model is given twice, as {a.model_tag!r} and --model {a.model!r}: give one"
        a.model = a.model_tag
    return None


def check_server_args(a: argparse.Namespace) -> str | None:
    """What is wrong with the options, in one line, or None."""
    if not 0 <= a.max_logprobs <= MAX_LOGPROBS:
        return (f"--max-logprobs {a.max_logprobs}: the sampler computes the top {MAX_LOGPROBS} logprobs of each "
                f"token (MAX_LOGPROBS, fixed in its compiled programs), so requests can get at most that many; "
                f"give 0 to {MAX_LOGPROBS}")
    if (a.ssl_keyfile is None) != (a.ssl_certfile is None):
        return "--ssl-keyfile and --ssl-certfile go together: give both to serve HTTPS, or neither"
    if a.ssl_keyfile is not None:       # uvicorn opens them only once serving has begun: a traceback
        for flag, path in (("--ssl-keyfile", a.ssl_keyfile), ("--ssl-certfile", a.ssl_certfile),
                           ("--ssl-ca-certs", a.ssl_ca_certs)):
            unreadable = path is not None and _unreadable(path)
            if unreadable:
                return f"{flag} {path}: cannot read it ({unreadable})"
        try:                            # as uvicorn loads them, once serving had begun: a traceback
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(a.ssl_certfile, a.ssl_keyfile, password=_encrypted)
            if a.ssl_ca_certs is not None:
                ctx.load_verify_locations(a.ssl_ca_certs)
        except _Encrypted:              # uvicorn asks for its passphrase on the terminal, as before
            pass
        except ssl.SSLError as e:
            return (f"--ssl-keyfile {a.ssl_keyfile} / --ssl-certfile {a.ssl_certfile}"
                    f"{f' / --ssl-ca-certs {a.ssl_ca_certs}' if a.ssl_ca_certs else ''}: not a PEM key and "
                    f"certificate that match ({e.reason or e})")
    if a.uds is not None:               # uvicorn's bind failed with a traceback
        folder = os.path.dirname(os.path.abspath(a.uds))
        if not os.path.isdir(folder):
            return f"--uds {a.uds}: its folder {folder} does not exist"
        if os.path.exists(a.uds) and not stat.S_ISSOCK(os.stat(a.uds).st_mode):
            return f"--uds {a.uds}: exists and is not a socket (a stale socket is replaced; nothing else is)"
    elif getattr(a, "host", None):
        try:
            socket.getaddrinfo(a.host, a.port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as e:     # uvicorn's exit 3 came after the model loaded, without the flag
            return f"--host {a.host}: cannot be resolved to an address to listen on ({getattr(e, 'strerror', None) or e})"
    if a.max_log_len < 0:
        return f"--max-log-len must be >= 0, got {a.max_log_len}"
    if a.root_path is not None and (not a.root_path.startswith("/") or a.root_path.endswith("/")):
        return f"--root-path must start with '/' and not end with one, as '/api/llm'; got {a.root_path!r}"
    return None


class _Encrypted(Exception):
    """An encrypted key: the check does not ask for its passphrase (uvicorn does)."""


def _encrypted():
    raise _Encrypted


def _unreadable(path: str) -> str | None:
    """Why the file cannot be opened for reading (a missing file, a directory, no permission), or None."""
    try:
        with open(path, "rb"):
            return None
    except OSError as e:
        return e.strerror or str(e)


def server_settings(a: argparse.Namespace) -> dict:
    """ServerConfig's fields the options set (the model's names apart: serve_cmd.model_name)."""
    return dict(root_path=a.root_path or "", cors_origins=tuple(a.allowed_origins),
                cors_methods=tuple(a.allowed_methods), cors_headers=tuple(a.allowed_headers),
                cors_credentials=a.allow_credentials, log_requests=a.enable_log_requests,
                log_stats=not a.disable_log_stats, max_logprobs=a.max_logprobs,
                request_id_headers=a.enable_request_id_headers, max_log_len=a.max_log_len,
                response_role=a.response_role, tokens_as_ids=a.return_tokens_as_token_ids)


def uvicorn_settings(a: argparse.Namespace) -> dict:
    """uvicorn.Config's keyword arguments from the options (host and port apart)."""
    kw = dict(log_level=a.uvicorn_log_level or a.log_level, access_log=not a.disable_uvicorn_access_log, uds=a.uds)
    if a.ssl_keyfile is not None:
        kw.update(ssl_keyfile=a.ssl_keyfile, ssl_certfile=a.ssl_certfile, ssl_ca_certs=a.ssl_ca_certs,
                  ssl_cert_reqs=a.ssl_cert_reqs)
    return kw
