"""`fastserve-jax bench --dataset random`: requests any model can serve, as vLLM's random dataset
makes them. The counting prompts (bench_cmd.build_workload) are the bundled demo model's task;
another model's answers to them cannot be checked. Here each request is a prompt of random
token ids with the trace row's prompt length and `max_tokens` its output length, with
`ignore_eos` (vLLM's), so the load has the trace's shape whatever the model says, and every
answer is checkable by its length: exactly `max_tokens` tokens, ending for "length".

The ids come from the server's own tokenizer (POST /tokenize of an ordinary English text, so
they are real, non-special tokens of its vocabulary), and lengths are cut to the context limit
the server reports there (/tokenize's `max_model_len`): an output at most half of it, a prompt
at most the rest. numpy and the HTTP client only.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np

from fastserve_jax.serve import bench_client
from fastserve_jax.workload import TraceRequest, chat_output_lengths

# Token ids are drawn from this text's encoding: everyday words, punctuation and digits.
SAMPLE_TEXT = (
    "The committee met on Tuesday to review the quarterly budget, and after a long discussion about "
    "travel costs, new hardware and the schedule for the spring release, it agreed to postpone two of "
    "the seven projects. Questions? Write to the office before 5 pm; answers will be posted online "
    "within 48 hours. Meanwhile the river rose by 3.2 metres, closing the bridge, the old market and "
    "several roads north of the station, while volunteers carried sandbags, blankets and hot soup.")


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}


def _refused(url: str, status: int) -> None:
    if status == 401:
        raise ValueError(f"{url} refused the request (401): give the server's key with --api-key")


def served_models(url: str, api_key: str | None = None) -> list[str]:
    """The model names the server's GET /v1/models lists ([] where it lists none)."""
    status, _, body = asyncio.run(bench_client.request(url, "GET", "/v1/models", headers=_headers(api_key)))
    _refused(url, status)
    try:
        return [str(c["id"]) for c in json.loads(body)["data"]] if status == 200 else []
    except (ValueError, KeyError, TypeError):
        return []


def server_vocabulary(url: str, api_key: str | None = None) -> tuple[np.ndarray, int]:
    """(distinct token ids of SAMPLE_TEXT, the context limit) from the server's POST /tokenize;
    a ValueError naming what is wrong if it does not answer with them."""
    body = json.dumps({"prompt": SAMPLE_TEXT, "add_special_tokens": False}).encode()
    status, _, data = asyncio.run(bench_client.request(url, "POST", "/tokenize", body, _headers(api_key)))
    _refused(url, status)
    try:
        reply = json.loads(data)
        ids, limit = np.unique(np.asarray(reply["tokens"], np.int64)), int(reply["max_model_len"])
    except (ValueError, KeyError, TypeError):
        reply = None
    if status != 200 or reply is None or ids.size == 0 or limit < 2:
        raise ValueError(f"{url}/tokenize answered status {status} without token ids and a max_model_len "
                         f"({data[:200]!r}); --dataset random needs a server with vLLM's /tokenize")
    return ids, limit


def random_workload(picked: list[TraceRequest], ids: np.ndarray, limit: int, scale: float,
                    output_dist: str, seed: int) -> list[tuple[dict, int]]:
    """[(payload, the exact number of tokens its answer must have)] for the picked trace rows:
    output lengths from the rows (times `scale`) or, with output_dist="chat", drawn skewed short
    (workload.chat_output_lengths) up to half the context limit; prompts of the rows' lengths
    cut to fit beside them."""
    if output_dist not in ("trace", "chat"):
        raise ValueError(f"output_dist must be 'trace' or 'chat', got {output_dist!r}")
    cap = max(1, limit // 2)
    outs = ([max(1, round(min(r.output_tokens * scale, cap))) for r in picked] if output_dist == "trace"
            else [min(cap, int(n)) for n in chat_output_lengths(len(picked), 2, max(2, cap), seed=seed)])
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7A5D]))
    work = []
    for r, out in zip(picked, outs):
        prompt = rng.choice(ids, size=max(1, min(r.prompt_tokens, limit - out))).tolist()
        work.append((dict(prompt=prompt, max_tokens=out, ignore_eos=True, temperature=0, stream=True,
                          stream_options={"include_usage": True}), out))
    return work


def length_problem(result: bench_client.Result, want: int) -> str | None:
    """What is wrong with a random-dataset answer that completed (None: nothing)."""
    if result.completion_tokens != want or result.finish_reason != "length":
        return f"{result.completion_tokens} tokens ending for {result.finish_reason!r} (want {want}, 'length')"
    return None
