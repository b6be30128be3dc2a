"""Where fastserve-jax's device time goes, for scripts/bench_engine.py: the decode step taken
apart with the engine idle (its compiled forward, the same forward as a scan, the sampler,
its matmuls alone), and the floor a run's launches cannot go below with XLA's matmuls."""

from __future__ import annotations

import statistics
import time

import numpy as np

from bench_engine_machine import best_of


def profile_decode_parts(llm, batch: int, nb: int, rounds: int) -> dict:
    """Where a decode step's device time goes, with the engine idle (no live requests).

    Timed in interleaved rounds (best of `rounds`), so machine load hits all alike:
    - forward: the engine's compiled decode launch alone (layers unrolled over per-layer
      weight arrays);
    - forward_scan: the same model and launch as one `nn.scan` over stacked weights (the
      engine's layout before; XLA copies each layer's weight slices out of the stack);
    - forward_sample_get: plus the greedy sampler and device_get (what engine.step waits on);
    - gemms: one XLA program of only the step's matmuls, on the same per-layer arrays;
    - gemms_isolated: the same matmuls as separate jitted dots (sum of their times).
    """
    import functools

    import jax
    import jax.numpy as jnp

    from fastserve_jax.models import build_model
    from fastserve_jax.models.attention import AttnBatch, KVCache
    from fastserve_jax.models.linear import linear
    from fastserve_jax.runner.keys import DecodeKey, SamplerKey
    from fastserve_jax.sampling import SamplingArrays

    made: dict = {}

    def compiled(fn, *args, **jit_kw):
        """fn jitted and compiled for these arguments' shapes."""
        key = (fn, tuple((a.shape, a.dtype) for a in jax.tree.leaves(args)))
        if key not in made:
            made[key] = jax.jit(fn, **jit_kw).lower(*args).compile()
        return made[key](*args)

    eng = llm.engine
    assert not eng.has_unfinished(), "profile with an idle engine: writes go to the null block"
    runner = eng.runner
    bs = eng.cfg.block_size
    stage = runner.stages[0]
    assert len(runner.stages) == 1, "profile a single-stage (pp=1) engine"
    fwd = runner.executable(DecodeKey(batch, nb), stage=0)
    smp = runner.sampler(SamplerKey(batch, greedy=True, logprobs=False, penalties=False))
    tokens = np.full((batch, 1), 7, np.int32)
    pos = np.full((batch, 1), nb * bs - 1, np.int32)
    seg = np.zeros((batch, 1), np.int32)
    slots = np.zeros((batch, 1), np.int32)      # every row writes the null block: no live KV is touched
    block_ids = (1 + np.arange(batch * nb, dtype=np.int32).reshape(batch, nb)) % runner.num_blocks
    attn = AttnBatch(pos, seg, slots, block_ids, np.zeros((batch, nb), np.int32),
                     np.broadcast_to(np.arange(nb, dtype=np.int32) * bs, (batch, nb)).copy())
    idx = np.arange(batch, dtype=np.int32)
    sa = SamplingArrays(np.zeros(batch, np.float32), np.zeros(batch, np.int32), np.ones(batch, np.float32),
                        np.zeros(batch, np.float32), np.zeros(batch, np.uint32), np.zeros(batch, np.int32))

    def forward():
        (logits, _), stage.cache = fwd(stage.params, stage.cache, tokens, attn, idx)
        return logits

    layers = stage.params["layers"]
    ends = {k: v for k, v in stage.params.items() if k != "layers"}
    stacked = {**ends, "layers": jax.tree.map(lambda *ws: jnp.stack(ws), *layers)}
    model = build_model(eng.model_cfg, eng.cfg.dtype)
    scan_apply = functools.partial(model.apply, method=model.__call__)
    scan_cache = KVCache(jnp.copy(stage.cache.k), jnp.copy(stage.cache.v))   # same KV as the engine reads

    def forward_scan():
        nonlocal scan_cache
        logits, scan_cache = compiled(scan_apply, {"params": stacked}, tokens, attn, scan_cache, idx,
                                      donate_argnums=(3,))
        return logits

    per_layer, head = gemm_weights(stage.params)
    gemms_prog = functools.partial(compiled, gemms_fn)
    dot = functools.partial(compiled, linear)
    x = jax.random.normal(jax.random.key(2), (batch, eng.model_cfg.hidden_size), jnp.float32) * 0.02
    xi = jax.random.normal(jax.random.key(3), (batch, per_layer[0]["d"].shape[1]), jnp.float32) * 0.02

    def isolated():
        out = []
        for w in per_layer:
            out += [dot(x, w[k]).block_until_ready() for k in "qkvogu"]
            out.append(dot(xi, w["d"]).block_until_ready())
        return dot(x, head)

    parts = {"forward": lambda: forward().block_until_ready(),
             "forward_scan": lambda: forward_scan().block_until_ready(),
             "forward_sample_get": lambda: jax.device_get(smp(forward(), sa)),
             "gemms": lambda: gemms_prog(per_layer, head, x).block_until_ready(),
             "gemms_isolated": lambda: isolated().block_until_ready(),
             "lm_head": lambda: dot(x, head).block_until_ready()}
    for fn in parts.values():
        fn()
    scan_diff = float(np.max(np.abs(np.asarray(forward()) - np.asarray(forward_scan()))))
    times: dict[str, list[float]] = {k: [] for k in parts}
    for _ in range(rounds):
        for k, fn in parts.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    logits = forward()
    sampler = best_of(lambda: jax.device_get(smp(logits, sa)), rounds)
    out = {f"{k}_ms": 1e3 * min(v) for k, v in times.items()}
    out.update({f"{k}_median_ms": 1e3 * statistics.median(v) for k, v in times.items()})
    return dict(batch=batch, blocks=nb, rounds=rounds, sampler_ms=1e3 * sampler, scan_logits_max_abs_diff=scan_diff,
                **out)


def gemm_weights(params: dict) -> tuple[list[dict], object]:
    """The Llama's matmul weights, (out, in) as the model stores them (models/linear.py), per
    layer (q k v o gate up down), and the head's."""
    per_layer = [{"q": w["attn"]["q_proj"]["weight"], "k": w["attn"]["k_proj"]["weight"],
                  "v": w["attn"]["v_proj"]["weight"], "o": w["attn"]["o_proj"]["weight"],
                  "g": w["mlp"]["gate_proj"]["weight"], "u": w["mlp"]["up_proj"]["weight"],
                  "d": w["mlp"]["down_proj"]["weight"]} for w in params["layers"]]
    head = params["lm_head"]["weight"] if "lm_head" in params else params["embed_tokens"]["embedding"]
    return per_layer, head


def gemms_fn(ws, hd, h, rows: int | None = None):
    """Every matmul of a launch and nothing else: the layers' on h (tokens, hidden), the head's
    on its first `rows` tokens (None: all); attention is replaced by adding K and V to Q."""
    import jax
    import jax.numpy as jnp

    from fastserve_jax.models.linear import linear

    for w in ws:
        q = linear(h, w["q"])
        kv = linear(h, w["k"]) + linear(h, w["v"])
        h = h + linear(q + jnp.tile(kv, q.shape[-1] // kv.shape[-1]), w["o"])
        h = h + linear(jax.nn.silu(linear(h, w["g"])) * linear(h, w["u"]), w["d"])
    return linear(h[:rows], hd)


def matmul_floor(llm, launch_counts: list[list], rounds: int = 5) -> dict:
    """Seconds the matmuls of a run's launches take alone: for each launch shape the run used,
    one XLA program of only its matmuls (tokens x every layer weight, logit rows x head),
    compiled as the engine compiles it, best of `rounds` interleaved rounds, times
    its count. Whatever else a launch does (attention, norms, sampling, the host) comes on top.
    launch_counts: [kind, size, blocks, count] rows (run_ours's "launch_counts")."""
    import functools

    import jax
    import jax.numpy as jnp

    from fastserve_jax.runner.keys import launch_key_from_wire

    eng = llm.engine
    assert len(eng.runner.stages) == 1, "single-stage (pp=1) engine"
    per_layer, head = gemm_weights(eng.runner.stages[0].params)
    hidden = eng.model_cfg.hidden_size
    shapes: dict[tuple[int, int], int] = {}
    for *wire, n in launch_counts:
        r, q, rows = eng.runner.builder.launch_shape(launch_key_from_wire(wire))
        shapes[(r * q, rows)] = shapes.get((r * q, rows), 0) + n
    progs = {}
    for tokens, rows in sorted(shapes):
        h = jax.random.normal(jax.random.key(4), (tokens, hidden), jnp.float32) * 0.02
        prog = jax.jit(functools.partial(gemms_fn, rows=rows)).lower(per_layer, head, h).compile()
        prog(per_layer, head, h).block_until_ready()
        progs[(tokens, rows)] = functools.partial(prog, per_layer, head, h)
    best = dict.fromkeys(progs, float("inf"))
    for _ in range(rounds):
        for shape, run in progs.items():
            best[shape] = min(best[shape], best_of(lambda: run().block_until_ready(), 1))
    per_shape = {f"{t} tokens, {r} logit rows": dict(launches=shapes[(t, r)], best_ms=1e3 * best[(t, r)])
                 for t, r in progs}
    return dict(seconds=sum(shapes[k] * best[k] for k in progs), rounds=rounds, per_shape=per_shape)

