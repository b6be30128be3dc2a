"""GET /v1/models, /v1/models/{model} (OpenAI's, with vLLM's card fields) and /version (vLLM's)."""

from __future__ import annotations

import importlib.metadata

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

_PERMISSION = {"id": "modelperm-fastserve-jax", "object": "model_permission", "created": 0,
               "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
               "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False, "organization": "*",
               "group": None, "is_blocking": False}


def _cards(srv) -> list[dict]:     # srv: serve/app.py's Server
    eng = srv.engine.engine
    cards = []
    for name in (srv.cfg.model_name, *srv.cfg.model_aliases):       # as vLLM: a card per served name
        # vLLM's card: `vllm bench serve` without --model reads the first card's root
        card = {"id": name, "object": "model", "created": srv.started, "owned_by": "fastserve-jax",
                "root": srv.cfg.model_root or srv.cfg.model_name, "parent": None, "permission": [_PERMISSION]}
        if eng is not None:
            card["max_model_len"] = eng.context_limit      # fewer than cfg.max_model_len where the KV pool is smaller
        cards.append(card)
    return cards


async def models(request: Request) -> Response:
    srv = request.app.state.server
    srv.check_auth(request)
    srv.check_serving()     # a 503 while warming up: vLLM listens only once ready, and a card lacked max_model_len
    return JSONResponse({"object": "list", "data": _cards(srv)})


async def model(request: Request) -> Response:
    """OpenAI's GET /v1/models/{model}: the served name's card, else a 404 naming the served ones."""
    srv = request.app.state.server
    srv.check_auth(request)
    name = request.path_params["model"]
    if not name:        # /v1/models/ lists them (vLLM's router redirects it; a probe counts a 404 as down)
        return RedirectResponse(request.url.replace(path=request.url.path.rstrip("/")), status_code=307)
    srv.check_model(name)
    srv.check_serving()
    return JSONResponse(next(c for c in _cards(srv) if c["id"] == name))


async def version(request: Request) -> Response:
    """vLLM's GET /version: this package's version; public, as /health."""
    try:
        v = importlib.metadata.version("fastserve-jax")
    except importlib.metadata.PackageNotFoundError:      # a source tree that was never installed
        v = "unknown"
    return JSONResponse({"version": v})
