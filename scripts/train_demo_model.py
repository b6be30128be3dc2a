"""Build the bundled demo model (models/demo/): tokenizer, a small Llama trained to count.

    python scripts/train_demo_model.py            # tokenizer + training + eval + save (CPU, minutes)
    python scripts/train_demo_model.py --tokenizer-only

The task (models/demo_task.py): `count from A to B:` -> ` A A+1 ... B` + EOS, 0 <= A <= B <= 999.

Tokenizer: byte-level BPE built by hand (no training): 4 special tokens, the 256 byte
tokens, then merges that make ` 0` ... ` 999` (no leading zeros), `count`, ` from`, ` to`
single tokens. Any text encodes (every byte has a token); decoding is exact.

Model: our Linen Llama (models.llama) trained from scratch with AdamW on packed rows of
synthetic examples, loss on answer tokens and EOS only. Evaluation: greedy exact match on
held-out pairs via one teacher-forced forward (models.demo_task.teacher_forced_exact).
Everything is seeded; the same command gives the same weights on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fastserve_jax.models import demo_task  # noqa: E402
from fastserve_jax.models.demo_task import ExampleEncoder, MAX_NUMBER  # noqa: E402

# ----------------------------------------------------------------------------- tokenizer

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]          # ids 0..3
UNK, BOS, EOS, PAD = SPECIAL
WORDS = ["count", " from", " to"]                     # ":" is already a byte token
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


def byte_to_unicode() -> dict[int, str]:
    """The byte-level alphabet: printable Latin-1 bytes stand for themselves, the other
    bytes are shifted to code points 256, 257, ... in byte order (the convention of the
    `tokenizers` ByteLevel pre-tokenizer, checked against it in `build_tokenizer`)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    b2u = byte_to_unicode()
    to_bl = lambda s: "".join(b2u[c] for c in s.encode("utf-8"))  # text -> byte-level string
    vocab = {t: i for i, t in enumerate(SPECIAL)}
    for b in range(256):
        vocab[b2u[b]] = len(vocab)
    merges: list[tuple[str, str]] = []

    def add_merge(left: str, right: str) -> None:
        merges.append((left, right))
        vocab.setdefault(left + right, len(vocab))

    sp = to_bl(" ")
    # ` N` is built left to right: ` 1` + `2` -> ` 12`, ` 12` + `3` -> ` 123`. Ranks go by
    # length, so a longer digit run ends as its first three digits, then single digits.
    for n in range(10):
        add_merge(sp, str(n))
    for n in range(10, MAX_NUMBER + 1):
        add_merge(sp + str(n // 10), str(n % 10))
    for w in WORDS:
        bl = to_bl(w)
        for k in range(2, len(bl) + 1):
            add_merge(bl[:k - 1], bl[k - 1])
    return vocab, merges


def build_tokenizer(out_dir: str):
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json; return the
    tokenizer loaded back through transformers.AutoTokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import AutoTokenizer

    if set(byte_to_unicode().values()) != set(pre_tokenizers.ByteLevel.alphabet()):
        raise RuntimeError("byte-level alphabet differs from the tokenizers library's ByteLevel")
    vocab, merges = vocab_and_merges()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])])
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    special_map = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(special_map, f, indent=2)
        f.write("\n")
    return AutoTokenizer.from_pretrained(out_dir)


def verify_tokenizer(tok) -> None:
    """Raise unless the tokenizer has the properties the task and the engine rely on."""
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (
        ids[BOS], ids[EOS], ids[PAD], ids[UNK]), "special token ids"
    demo_task.number_token_ids(tok)  # raises unless every ` N` is one token
    for w in WORDS + [":"]:
        assert len(tok.encode(w, add_special_tokens=False)) == 1, w
    prompt = demo_task.make_prompt(7, 10)
    assert len(tok.encode(prompt)) == 7 and tok.encode(prompt)[0] == tok.bos_token_id, tok.encode(prompt)
    ans = demo_task.expected_answer(7, 10)
    aids = tok.encode(ans, add_special_tokens=False)
    assert len(aids) == 4 and tok.decode(aids) == ans
    for text in ["count from 0 to 999:", " 0 00 007 1000 12345", "héllo wörld 🙂\n\ttabs  ", "日本語", "<s> not special? </s>",
                 "\x00\x01\xff", ""]:
        e = tok.encode(text, add_special_tokens=False)
        assert tok.decode(e) == text, (text, e, tok.decode(e))
        assert tok.unk_token_id not in e, text
    # incremental detokenization: the decoded prefix only grows
    full = tok.encode(demo_task.expected_answer(95, 130) + " and more: ünïcode", add_special_tokens=False)
    prev = ""
    for k in range(1, len(full) + 1):
        cur = tok.decode(full[:k])
        assert cur.startswith(prev.rstrip("\ufffd")), (prev, cur)
        prev = cur
    assert prev == demo_task.expected_answer(95, 130) + " and more: ünïcode"
    msgs = [{"role": "user", "content": prompt}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == prompt


# ----------------------------------------------------------------------------- model and data

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


_JITTED: dict = {}


def evaluate(module, params, enc: ExampleEncoder, pairs, bos: bool = True) -> np.ndarray:
    import jax

    if module not in _JITTED:
        _JITTED[module] = jax.jit(lambda p, t, b: module.apply({"params": p}, t, b)[0])
    apply = _JITTED[module]
    examples = [enc.encode(a, b, bos=bos) for a, b in pairs]
    return demo_task.teacher_forced_exact(lambda t, b: apply(params, t, b), examples)


def span_report(pairs, ok: np.ndarray) -> str:
    spans = np.asarray([b - a for a, b in pairs])
    parts = []
    for lo, hi in [(0, 15), (16, 255), (256, 511), (512, 999)]:
        sel = (spans >= lo) & (spans <= hi)
        if sel.any():
            parts.append(f"span {lo}-{hi}: {ok[sel].sum()}/{sel.sum()}")
    return ", ".join(parts)


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


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "models", "demo"))
    p.add_argument("--tokenizer-only", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--mlp", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--rope-theta", type=float, default=500000.0)
    p.add_argument("--max-positions", type=int, default=2048)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--buckets", default="256:32,1024:8", help="row_len:rows per training batch shape")
    p.add_argument("--max-span", type=int, default=demo_task.MAX_SPAN)
    p.add_argument("--first-weight", type=float, default=10.0, help="loss weight of the first answer token")
    p.add_argument("--eos-weight", type=float, default=10.0, help="loss weight of the EOS position")
    p.add_argument("--weight-anneal", type=float, default=0.7,
                   help="fraction of training over which the two weights above fall linearly to 1")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--wd", type=float, default=0.01)
    p.add_argument("--digit-init", type=float, default=1.0, help="strength of the digit code in the "
                   "initial number embeddings (0: plain random init)")
    p.add_argument("--mix", default="31:0.55,255:0.3,999:0.15",
                   help="training mixture: max_span:weight, each drawn from demo_task.sample_pair(max_span)")
    p.add_argument("--no-bos", type=float, default=0.2, help="fraction of training prompts without BOS")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--monitor", type=int, default=200, help="held-out pairs checked during training")
    p.add_argument("--eval-n", type=int, default=1000, help="held-out pairs in the final evaluation")
    p.add_argument("--save-npz", default=None, help="also save the Linen params here (debugging)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    tok = build_tokenizer(args.out)
    verify_tokenizer(tok)
    print(f"tokenizer: {len(tok)} tokens, bos={tok.bos_token_id} eos={tok.eos_token_id} pad={tok.pad_token_id}")
    if args.tokenizer_only:
        return
    cfg_dict = model_config_dict(len(tok), args)
    module, params, n_params, train_s, tokens_seen = train(args, tok, cfg_dict)
    print(f"trained {args.steps} steps, {tokens_seen:,} tokens in {train_s:.0f}s")
    if args.save_npz:
        import jax
        flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
                for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
        np.savez(args.save_npz, **flat)
        with open(args.save_npz + ".json", "w") as f:
            json.dump(cfg_dict, f, indent=2)
    save_artifacts(args.out, cfg_dict, params, tok)
    results = final_eval(args, tok)
    write_training_md(args, argv, cfg_dict, n_params, train_s, tokens_seen, results)


def save_artifacts(out_dir: str, cfg_dict: dict, params: dict, tok) -> None:
    """config.json + model.safetensors (models.loader), generation_config.json; the
    tokenizer files are already there (build_tokenizer)."""
    from fastserve_jax.models.loader import save_hf_checkpoint

    save_hf_checkpoint(cfg_dict, params, out_dir)
    gen = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id, "do_sample": False}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
        f.write("\n")


def final_eval(args, tok) -> dict:
    """Exact match of the saved checkpoint, loaded back through models.loader.load_model:
    held-out pairs (with and without BOS) and a sweep stopping once at every B in 0..999."""
    from fastserve_jax.models.loader import load_model

    _, module, params = load_model(args.out, cache_dir="")
    enc = ExampleEncoder(tok)
    t0 = time.time()
    pairs = demo_task.held_out_pairs(args.eval_n, max_span=args.max_span)
    ok = evaluate(module, params, enc, pairs)
    ok_nobos = evaluate(module, params, enc, pairs[:args.eval_n // 4], bos=False)
    rng = np.random.default_rng(np.random.SeedSequence([args.seed, 0x5BEE]))
    sweep = [(max(0, b - int(rng.integers(0, 41))), b) for b in range(MAX_NUMBER + 1)]
    ok_sweep = evaluate(module, params, enc, sweep)
    res = {
        "held_out": (int(ok.sum()), len(ok)), "held_out_spans": span_report(pairs, ok),
        "held_out_no_bos": (int(ok_nobos.sum()), len(ok_nobos)),
        "sweep": (int(ok_sweep.sum()), len(ok_sweep)),
        "failures": [pairs[i] for i in np.flatnonzero(~ok)][:20],
        "eval_s": time.time() - t0,
    }
    print(f"held-out exact match: {res['held_out'][0]}/{res['held_out'][1]} = {ok.mean():.4f}  "
          f"[{res['held_out_spans']}]; without BOS: {res['held_out_no_bos'][0]}/{res['held_out_no_bos'][1]}; "
          f"stop sweep B=0..999: {res['sweep'][0]}/{res['sweep'][1]}  ({res['eval_s']:.0f}s)")
    if res["failures"]:
        print(f"failures (A, B): {res['failures']}")
    return res


def write_training_md(args, argv, cfg_dict: dict, n_params: int, train_s: float, tokens_seen: int, res: dict) -> None:
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out) if f.endswith(".safetensors"))
    flags = " ".join(sys.argv[1:] if argv is None else argv)
    c = cfg_dict
    text = f"""# Demo model: training notes

Written by `scripts/train_demo_model.py` (retrain: `python scripts/train_demo_model.py{" " + flags if flags else ""}`,
CPU only, seeded; a rerun on the same machine and library versions gives the same weights).

**Task** (`models/demo_task.py`): `count from A to B:` -> ` A A+1 ... B` then EOS,
0 <= A <= B <= {MAX_NUMBER}. Max span supported and evaluated: B - A <= {args.max_span}
(answers of up to {args.max_span + 2} generated tokens, EOS included).

**Tokenizer**: byte-level BPE built by hand, {c["vocab_size"]} tokens: `<unk>`=0, `<s>`=1 (BOS, added by
default), `</s>`=2 (EOS), `<pad>`=3, the 256 bytes, then merges making ` 0` ... ` 999`,
`count`, ` from`, ` to` single tokens. Any text encodes; decoding is exact. Chat template:
the message contents concatenated.

**Model**: Llama ({c["num_hidden_layers"]} layers, hidden {c["hidden_size"]}, {c["num_attention_heads"]} heads x {c["head_dim"]},
{c["num_key_value_heads"]} KV heads, SwiGLU {c["intermediate_size"]}, RMSNorm, RoPE theta {c["rope_theta"]:g}, untied embeddings,
max_position_embeddings {c["max_position_embeddings"]}); {n_params:,} parameters, float32, {size / 1e6:.1f} MB safetensors.

**Training**: AdamW (lr {args.lr:g}, warmup {args.warmup}, cosine to 2%, wd {args.wd:g}, clip 1.0), {args.steps} steps,
{tokens_seen:,} tokens, batches of {args.buckets} (row_len:rows; examples packed with
segment ids, positions restart per example), {train_s / 60:.1f} min on this machine's CPU
({os.cpu_count()} cores, shared). Data: synthetic pairs, mixture {args.mix} (max_span:weight,
each from `demo_task.sample_pair`: spans uniform in [0, 255], spans up to the max, and
hard cases: carries like 99->100 and 199->200, stopping right at or after a carry, A == B,
the ends of the range); {args.no_bos:.0%} of prompts without BOS; loss on answer tokens and
EOS only, the first answer token and EOS weighted x{args.first_weight:g} and x{args.eos_weight:g}. The number embeddings
start with a digit code (`--digit-init {args.digit_init:g}`), which makes comparing and copying numbers
learnable in CPU minutes. The {demo_task.NUM_HELD_OUT} pairs of `held_out_pairs({demo_task.NUM_HELD_OUT})` never appear in training.

**Evaluation** (the saved checkpoint via `models.loader.load_model`; greedy exact match
measured exactly by a teacher-forced forward: every answer position's argmax, EOS included):

| set | exact match |
|---|---|
| held-out pairs (`held_out_pairs({args.eval_n})`) | {res["held_out"][0]}/{res["held_out"][1]} ({res["held_out"][0] / res["held_out"][1]:.1%}) |
| by span | {res["held_out_spans"]} |
| same prompts without BOS (first {res["held_out_no_bos"][1]}) | {res["held_out_no_bos"][0]}/{res["held_out_no_bos"][1]} |
| stop sweep: every B in 0..999, A = B - (0..40) | {res["sweep"][0]}/{res["sweep"][1]} |
"""
    if res["failures"]:
        text += f"\nHeld-out failures (A, B): {res['failures']}\n"
    with open(os.path.join(args.out, "TRAINING.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
