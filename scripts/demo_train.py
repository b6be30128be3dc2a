"""Training of the demo model (scripts/train_demo_model.py): our Linen Llama
(models.llama) trained from scratch with AdamW on packed rows of synthetic examples, loss
on answer tokens and EOS only. Everything is seeded.
"""

from __future__ import annotations

import time

import numpy as np

from demo_eval import evaluate, span_report
from fastserve_jax.models import demo_task
from fastserve_jax.models.demo_task import ExampleEncoder


def model_config_dict(vocab_size: int, args) -> dict:
    """HF `config.json` of the demo model (read back through ModelConfig.from_dict)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": args.hidden,
        "intermediate_size": args.mlp,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "max_position_embeddings": args.max_positions,
        "rms_norm_eps": 1e-5,
        "rope_theta": args.rope_theta,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
        "dtype": "float32",
    }


class Batcher:
    """Fixed-shape training batches from demo_task.sample_pair (held-out pairs excluded).

    Attention cost grows with the row length, so examples go to the shortest bucket they
    fit (`buckets`: (row_len, rows) pairs, e.g. short examples in rows of 256 tokens, long
    ones in rows of 1024); a step packs whichever bucket first has a batch worth of
    examples waiting (first fit; the ones that do not fit wait for the next batch). A
    fraction of prompts come without BOS, so the model also answers prompts tokenized
    without special tokens (e.g. apply_chat_template(tokenize=True))."""

    def __init__(self, enc: ExampleEncoder, seed: int, buckets: list[tuple[int, int]], exclude: set,
                 no_bos: float, mix: list[tuple[int, float]]):
        self.enc, self.exclude, self.no_bos = enc, exclude, no_bos
        self.mix_spans = [m for m, _ in mix]
        w = np.asarray([p for _, p in mix], np.float64)
        self.mix_cdf = np.cumsum(w / w.sum())[:-1]
        self.buckets = sorted(buckets)
        self.pools: dict[int, list[demo_task.Example]] = {L: [] for L, _ in self.buckets}
        self.rng = np.random.default_rng(np.random.SeedSequence([seed, 0xDA7A]))

    def next(self) -> demo_task.PackedRows:
        while True:
            for row_len, rows in self.buckets:
                if sum(len(e.tokens) for e in self.pools[row_len]) >= rows * row_len:
                    return self._take(row_len, rows)
            max_span = self.mix_spans[int(np.searchsorted(self.mix_cdf, self.rng.random(), side="right"))]
            a, b = demo_task.sample_pairs(1, self.rng, max_span, exclude=self.exclude)[0]
            ex = self.enc.encode(a, b, bos=self.rng.random() >= self.no_bos)
            row_len = next(L for L, _ in self.buckets if len(ex.tokens) <= L)
            self.pools[row_len].append(ex)

    def _take(self, row_len: int, rows: int) -> demo_task.PackedRows:
        fill = [0] * rows
        assign: list[list[int]] = [[] for _ in range(rows)]
        taken, left = [], []
        for ex in self.pools[row_len]:
            n = len(ex.tokens)
            r = next((j for j, f in enumerate(fill) if f + n <= row_len), None)
            if r is None:
                left.append(ex)
                continue
            assign[r].append(len(taken))
            taken.append(ex)
            fill[r] += n
        self.pools[row_len] = left
        return demo_task.pack_assigned(taken, assign, row_len, pad_id=self.enc.tokenizer.pad_token_id)


def make_train_step(module, optimizer, eos_id: int, colon_id: int):
    """The jitted AdamW step. weights: (2,) loss weights of the first answer token and of
    EOS (other answer tokens: 1). Also returns token accuracy overall / on the first answer
    token / on the EOS position / on the other numbers."""
    import jax
    import jax.numpy as jnp
    import optax

    from fastserve_jax.models.attention import AttnBatch

    def loss_fn(params, tokens, positions, seg, targets, mask, weights):
        logits, _ = module.apply({"params": params}, tokens, AttnBatch(positions=positions, seg=seg))
        t = targets.reshape(-1)
        m = mask.reshape(-1).astype(jnp.float32)
        first = m * (tokens.reshape(-1) == colon_id)
        eos = m * (t == eos_id)
        w = m + (weights[0] - 1.0) * first + (weights[1] - 1.0) * eos
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, t)
        hit = (logits.argmax(-1) == t) * m
        acc = [(hit * k).sum() / jnp.maximum(k.sum(), 1.0) for k in (m, first, eos, m - first - eos)]
        return (nll * w).sum() / jnp.maximum(w.sum(), 1.0), jnp.stack(acc)

    @jax.jit
    def step(params, opt_state, tokens, positions, seg, targets, mask, weights):
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, tokens, positions, seg, targets, mask, weights)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, acc

    return step


def digit_code_init(params: dict, num_ids: np.ndarray, strength: float) -> dict:
    """Add a digit code to the initial embeddings of ` 0` ... ` 999`: one-hot hundreds,
    tens and units digits in the first 30 dimensions, with `strength` times the norm of the
    random part. Comparing two numbers ("is this B?") and copying one are then shared
    circuits over 30 dimensions instead of 1000 separate facts, which is what makes the
    stop decision learnable in a few CPU minutes."""
    import jax.numpy as jnp

    emb = np.asarray(params["embed_tokens"]["embedding"]).copy()
    scale = strength * float(np.linalg.norm(emb, axis=1).mean()) / np.sqrt(3.0)
    for n, tid in enumerate(num_ids):
        for k, d in enumerate((n // 100, n // 10 % 10, n % 10)):
            emb[tid, 10 * k + d] += scale
    return {**params, "embed_tokens": {"embedding": jnp.asarray(emb)}}


def train(args, tok, cfg_dict: dict):
    import jax
    import jax.numpy as jnp
    import optax

    from fastserve_jax.models import build_model
    from fastserve_jax.models.attention import AttnBatch
    from fastserve_jax.models.config import ModelConfig

    cfg = ModelConfig.from_dict(cfg_dict)
    module = build_model(cfg, "float32")
    enc = ExampleEncoder(tok)
    held = demo_task.held_out_pairs(demo_task.NUM_HELD_OUT, max_span=args.max_span)
    buckets = [tuple(int(v) for v in b.split(":")) for b in args.buckets.split(",")]
    mix = [(min(int(m), args.max_span), float(w)) for m, w in (x.split(":") for x in args.mix.split(","))]
    batcher = Batcher(enc, args.seed, buckets, set(held), args.no_bos, mix)
    dummy = jnp.zeros((1, 8), jnp.int32)
    params = module.init(jax.random.PRNGKey(args.seed), dummy, AttnBatch(jnp.zeros((1, 8), jnp.int32),
                                                                          jnp.zeros((1, 8), jnp.int32)))["params"]
    if args.digit_init:
        params = digit_code_init(params, enc.num_ids, args.digit_init)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    print(f"model: {n_params:,} params; {cfg}")
    sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.warmup, args.steps, args.lr * 0.02)
    decay_mask = jax.tree.map(lambda x: x.ndim >= 2, params)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(sched, b1=0.9, b2=0.98, weight_decay=args.wd, mask=decay_mask))
    opt_state = optimizer.init(params)
    step = make_train_step(module, optimizer, tok.eos_token_id, tok.convert_tokens_to_ids(":"))
    # Extra weight on the rare decisions (first token, EOS) speeds up learning them, but a
    # weighted loss also biases the argmax toward EOS; so the extra falls linearly to 1.
    anneal = max(1, int(args.weight_anneal * args.steps))
    extra = np.asarray([args.first_weight, args.eos_weight], np.float32) - 1.0
    weights_at = lambda i: 1.0 + extra * np.float32(max(0.0, 1.0 - i / anneal))
    monitor = held[:args.monitor]
    t0 = time.time()
    tokens_seen = 0
    for i in range(1, args.steps + 1):
        b = batcher.next()
        tokens_seen += int((b.seg >= 0).sum())
        params, opt_state, loss, acc = step(params, opt_state, b.tokens, b.positions, b.seg, b.targets, b.loss_mask,
                                            weights_at(i - 1))
        if i % args.log_every == 0 or i == args.steps:
            print(f"step {i:5d}  loss {float(loss):.4f}  acc all/first/eos/rest "
                  f"{'/'.join(f'{float(x):.3f}' for x in acc)}  lr {float(sched(i)):.2e}  "
                  f"{tokens_seen / (time.time() - t0):,.0f} tok/s  {time.time() - t0:.0f}s", flush=True)
        if args.eval_every and i % args.eval_every == 0 and i < args.steps:
            ok = evaluate(module, params, enc, monitor)
            print(f"  held-out exact match (monitor, {len(monitor)}): {ok.mean():.4f}  [{span_report(monitor, ok)}]",
                  flush=True)
    train_s = time.time() - t0
    return module, params, n_params, train_s, tokens_seen
