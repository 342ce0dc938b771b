"""Serve a batch of requests, each with its own LoRA adapter, through one compiled decode loop.

A small Llama-style causal decoder (RoPE as in Hugging Face's Llama, grouped-query
attention, RMSNorm, a SwiGLU MLP; modules named ``q_proj``/``k_proj``/``v_proj``/``o_proj``
and ``gate_proj``/``up_proj``/``down_proj``) with a preallocated KV cache: one prefill of
the (right-padded) prompts, then one token per step in a ``lax.scan``. Every request picks
an adapter of an :class:`lorax_fn.multi.AdapterStack` (or ``-1``: the base model) and
``lorax_fn.multi_lora`` runs the whole batch at once. The script checks that

1. the mixed batch gives, per request, the same greedy tokens (and logits to 1e-4) as
   that request run alone on its merged model (``lorax_fn.merge`` then the plain model);
2. replacing an adapter with ``lorax_fn.multi.replace_adapter`` does not recompile (a counter
   in the traced function counts traces), and the swapped adapter takes effect.

About 20 s of CPU time, mostly compiling:
``python examples/serve.py [--temperature 0.8 --top-k 20]``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

import lorax_fn

# Every projection of the decoder, as LoraSpec globs.
TARGETS = [
    f"params/layers_*/{block}/{proj}/kernel"
    for block, projs in (
        ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
        ("mlp", ("gate_proj", "up_proj", "down_proj")),
    )
    for proj in projs
]

# How often each jitted entry point was traced, i.e. compiled: a retrace is a recompile.
TRACES: collections.Counter[str] = collections.Counter()

Cache: TypeAlias = tuple[tuple[jax.Array, jax.Array], ...]
# (tokens (B, T), cache, positions (B,)) -> (logits (B, T, vocab), cache)
Forward: TypeAlias = Callable[[jax.Array, Cache, jax.Array], tuple[jax.Array, Cache]]
# Per request (arrays of shape (B,)): "keys" (PRNG keys), "temperature", "top_k".
Sampling: TypeAlias = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes of the decoder; the defaults make a model that runs in seconds on a CPU."""

    vocab: int = 256
    d: int = 64
    heads: int = 4
    kv_heads: int = 2
    layers: int = 2
    hidden: int = 128
    max_len: int = 64
    rope_theta: float = 10000.0
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.d // self.heads


class RMSNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale * x32.astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding of ``x`` ``(T, heads, head_dim)`` as Hugging Face's Llama does it.

    HF rotates the two *halves* of each head (``rotate_half``), not interleaved pairs;
    matching it is what lets HF weights and PEFT adapters load into this model.
    """
    dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, None, :]
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * jnp.cos(angles).astype(x.dtype) + rotated * jnp.sin(angles).astype(x.dtype)


def _dense(features: int, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=False, name=name)


class Attention(nn.Module):
    config: Config

    @nn.compact
    def __call__(
        self, x: jax.Array, positions: jax.Array, cache: tuple[jax.Array, jax.Array] | None
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        c, t = self.config, x.shape[0]
        hd, group = c.head_dim, c.heads // c.kv_heads
        q = _dense(c.heads * hd, "q_proj")(x).reshape(t, c.heads, hd)
        k = _dense(c.kv_heads * hd, "k_proj")(x).reshape(t, c.kv_heads, hd)
        v = _dense(c.kv_heads * hd, "v_proj")(x).reshape(t, c.kv_heads, hd)
        q, k = rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta)
        if cache is None:
            keys, values, key_positions = k, v, positions
        else:
            start = (positions[0], 0, 0)
            keys = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), start)
            values = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), start)
            key_positions = jnp.arange(keys.shape[0])
            cache = (keys, values)
        # Query head h reads KV head h // group, as HF's repeat_kv, without the copies.
        q = q.reshape(t, c.kv_heads, group, hd)
        scores = jnp.einsum("tkgd,skd->kgts", q, keys).astype(jnp.float32) / math.sqrt(hd)
        # Cache slots past a query's position are unwritten or padding: never attended.
        visible = key_positions[None, :] <= positions[:, None]
        scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
        out = jnp.einsum("kgts,skd->tkgd", probs, values).reshape(t, c.heads * hd)
        return _dense(c.d, "o_proj")(out), cache


class MLP(nn.Module):
    config: Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        gate = nn.silu(_dense(c.hidden, "gate_proj")(x))
        return _dense(c.d, "down_proj")(gate * _dense(c.hidden, "up_proj")(x))


class DecoderLayer(nn.Module):
    config: Config

    @nn.compact
    def __call__(self, x, positions, cache):
        c = self.config
        h = RMSNorm(c.eps, name="input_layernorm")(x)
        h, cache = Attention(c, name="self_attn")(h, positions, cache)
        x = x + h
        return x + MLP(c, name="mlp")(RMSNorm(c.eps, name="post_attention_layernorm")(x)), cache


class Llama(nn.Module):
    """One sequence at a time: ``tokens (T,)`` at positions ``pos, …, pos+T-1``.

    With ``cache`` (per layer ``(keys, values)``, each ``(max_len, kv_heads, head_dim)``)
    the new keys and values are written at ``pos`` and attention reads the whole cache;
    without, it is plain causal attention over ``tokens``. Returns ``(logits, cache)``.
    Batches are a ``vmap`` (or ``lorax_fn.multi_lora(..., batch_of_one=False)``) away.
    """

    config: Config

    @nn.compact
    def __call__(
        self, tokens: jax.Array, cache: Cache | None = None, pos: jax.Array | int = 0
    ) -> tuple[jax.Array, Cache | None]:
        c = self.config
        positions = pos + jnp.arange(tokens.shape[0])
        x = nn.Embed(c.vocab, c.d, name="embed_tokens")(tokens)
        new_cache = []
        for i in range(c.layers):
            x, layer_cache = DecoderLayer(c, name=f"layers_{i}")(
                x, positions, None if cache is None else cache[i]
            )
            new_cache.append(layer_cache)
        logits = _dense(c.vocab, "lm_head")(RMSNorm(c.eps, name="norm")(x))
        return logits, None if cache is None else tuple(new_cache)


def init_cache(config: Config, batch: int, dtype: Any = jnp.float32) -> Cache:
    """An empty KV cache for ``batch`` sequences of up to ``config.max_len`` tokens."""
    shape = (batch, config.max_len, config.kv_heads, config.head_dim)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.layers))


def init_params(config: Config, seed: int) -> dict:
    """Random weights standing in for a pretrained checkpoint (Flax's default scales).

    Drawn with NumPy into the shapes of ``Llama.init``: a jitted init would compile the
    whole model once more, an eager one every initializer.
    """
    shapes = jax.eval_shape(Llama(config).init, jax.random.key(0), jnp.zeros((1,), jnp.int32))
    rng = np.random.default_rng(seed)

    def draw(path: tuple, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        name = path[-1].key
        if name == "scale":
            return jnp.ones(leaf.shape, leaf.dtype)
        std = 1.0 / math.sqrt(leaf.shape[0]) if name == "kernel" else 1.0
        return jnp.asarray(rng.normal(0.0, std, leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def adapter_forward(
    config: Config,
    base: Any,
    stack: lorax_fn.multi.AdapterStack,
    adapter_ids: jax.Array,
    chunk_size: int | None = None,
) -> Forward:
    """Row ``i`` of the batch through adapter ``adapter_ids[i]`` of ``stack`` (-1: none)."""
    run = lorax_fn.multi_lora(Llama(config).apply, batch_of_one=False, chunk_size=chunk_size)
    return functools.partial(run, base, stack, adapter_ids)


def plain_forward(config: Config, params: Any) -> Forward:
    """Every row of the batch through the same (e.g. merged) parameters."""
    return functools.partial(jax.vmap(Llama(config).apply, in_axes=(None, 0, 0, 0)), params)


def pick(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """The next token of each row of ``logits (B, vocab)``, by that request's settings.

    Temperature 0 is greedy (argmax); otherwise a sample from the ``top_k`` most likely
    tokens (0: all) at that temperature, drawn with the request's own key, so a
    request's tokens do not depend on the rest of the batch. All three are arrays, so
    one compiled program serves any mix of greedy and sampled requests.
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    temperature, top_k = sampling["temperature"], sampling["top_k"]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(jnp.sort(logits, axis=-1), (vocab - k)[:, None], axis=-1)
    kept = jnp.where(logits < kth, -jnp.inf, logits)
    scaled = kept / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    sampled = jax.vmap(jax.random.categorical)(sampling["keys"], scaled)
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


def generate(
    config: Config,
    forward: Forward,
    prompts: jax.Array,
    lengths: jax.Array,
    sampling: Sampling,
    *,
    steps: int,
) -> tuple[jax.Array, jax.Array]:
    """``steps`` new tokens per request after one prefill; returns (tokens, their logits).

    ``prompts (B, P)`` are right-padded, request ``i`` having ``lengths[i]`` real tokens.
    Prefill writes all P positions to the cache; request ``i`` then decodes from position
    ``lengths[i]``, overwriting its padding before any query can see it. ``sampling``:
    per request a PRNG key, a temperature and a top-k (see :func:`pick`). Tokens
    ``(B, steps)``, logits ``(B, steps, vocab)``: the distribution each token came from.
    """
    batch, width = prompts.shape
    if width + steps - 1 > config.max_len:
        raise ValueError(f"{width} prompt + {steps} new tokens exceed max_len {config.max_len}")
    logits, cache = forward(prompts, init_cache(config, batch), jnp.zeros(batch, jnp.int32))
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]

    def choose(logits: jax.Array, t: jax.Array) -> jax.Array:
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(sampling["keys"], t)
        return pick(logits, {**sampling, "keys": keys})

    def step(carry, t):
        cache, logits, pos = carry
        token = choose(logits, t)
        new_logits, cache = forward(token[:, None], cache, pos)
        return (cache, new_logits[:, 0], pos + 1), (token, logits)

    # steps - 1 forwards after prefill: the last token needs no forward of its own.
    (_, last, _), (tokens, seen) = jax.lax.scan(
        step, (cache, last, lengths.astype(jnp.int32)), jnp.arange(steps - 1)
    )
    tokens = jnp.concatenate([tokens, choose(last, jnp.int32(steps - 1))[None]])
    seen = jnp.concatenate([seen, last[None]])
    return tokens.T, jnp.swapaxes(seen, 0, 1)


@functools.partial(jax.jit, static_argnames=("config", "steps", "chunk_size"))
def generate_with_adapters(
    config: Config,
    base: Any,
    stack: lorax_fn.multi.AdapterStack,
    adapter_ids: jax.Array,
    prompts: jax.Array,
    lengths: jax.Array,
    sampling: Sampling,
    *,
    steps: int,
    chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """:func:`generate` with per-request adapters, compiled once per shape."""
    TRACES["generate_with_adapters"] += 1
    forward = adapter_forward(config, base, stack, adapter_ids, chunk_size)
    return generate(config, forward, prompts, lengths, sampling, steps=steps)


@functools.partial(jax.jit, static_argnames=("config", "steps"))
def generate_plain(
    config: Config,
    params: Any,
    prompts: jax.Array,
    lengths: jax.Array,
    sampling: Sampling,
    *,
    steps: int,
) -> tuple[jax.Array, jax.Array]:
    """:func:`generate` on one set of parameters (the base, or a merged adapter)."""
    TRACES["generate_plain"] += 1
    return generate(config, plain_forward(config, params), prompts, lengths, sampling, steps=steps)


def random_adapters(
    variables: Any, ranks: Sequence[int], *, seed: int, std: float = 0.1
) -> tuple[Any, list[dict]]:
    """The base and one adapter per rank on every projection, A and B random.

    Trained adapters have B ≠ 0; random B stands in for training so that every adapter
    changes the model (with B = 0 they would all equal the base).
    """
    spec = lorax_fn.LoraSpec(TARGETS, rank=1)
    base, template = lorax_fn.split(variables, spec, key=jax.random.key(0))
    rng = np.random.default_rng(seed)

    def factors(f: lorax_fn.LoraFactors, rank: int) -> lorax_fn.LoraFactors:
        shape_a, shape_b = f.layout.shapes(f.weight_shape, rank)
        a, b = rng.normal(0.0, std, shape_a), rng.normal(0.0, std, shape_b)
        # alpha = 2r: the scale is 2 at every rank.
        return lorax_fn.LoraFactors(
            jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), 2.0, f.layout
        )

    trees = [{path: factors(f, rank) for path, f in template.items()} for rank in ranks]
    return base, trees


def make_requests(
    config: Config,
    n: int,
    adapters: int,
    *,
    seed: int,
    lengths: Sequence[int] = (3, 5, 8),
    temperature: float = 0.0,
    top_k: int = 0,
) -> dict[str, np.ndarray]:
    """``n`` requests with random prompts; adapter ids cycle through -1, 0, …, adapters-1."""
    rng = np.random.default_rng(seed)
    lens = np.array([lengths[i % len(lengths)] for i in range(n)], np.int32)
    prompts = np.zeros((n, lens.max()), np.int32)
    for i, length in enumerate(lens):
        prompts[i, :length] = rng.integers(0, config.vocab, length)
    return {
        "prompts": prompts,
        "lengths": lens,
        "adapter_ids": np.array([(i % (adapters + 1)) - 1 for i in range(n)], np.int32),
        "seeds": np.arange(n, dtype=np.uint32) + seed,
        "temperature": np.full(n, temperature, np.float32),
        "top_k": np.full(n, top_k, np.int32),
    }


def sampling_of(requests: dict[str, np.ndarray]) -> Sampling:
    """The per-request sampling settings of :func:`pick`, one PRNG key per seed."""
    return {
        "keys": jax.vmap(jax.random.key)(jnp.asarray(requests["seeds"])),
        "temperature": jnp.asarray(requests["temperature"]),
        "top_k": jnp.asarray(requests["top_k"]),
    }


def run_alone(
    config: Config,
    base: Any,
    trees: Sequence[dict],
    requests: dict[str, np.ndarray],
    steps: int,
    *,
    padded: bool = False,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each request by itself on ``merge(base, its adapter)`` (the base for -1).

    Unpadded by default (one compile per prompt length); ``padded=True`` keeps the
    batch's padding, so that one compiled program serves every request.
    """
    merged = {k: lorax_fn.merge(base, tree) for k, tree in enumerate(trees)}
    out = []
    for i, (length, k) in enumerate(zip(requests["lengths"], requests["adapter_ids"], strict=True)):
        one = {name: value[i : i + 1] for name, value in requests.items()}
        tokens, logits = generate_plain(
            config,
            base if k == -1 else merged[int(k)],
            jnp.asarray(one["prompts"] if padded else one["prompts"][:, :length]),
            jnp.asarray(one["lengths"]),
            sampling_of(one),
            steps=steps,
        )
        out.append((np.asarray(tokens[0]), np.asarray(logits[0])))
    return out


def run_batch(
    config: Config,
    base: Any,
    stack: lorax_fn.multi.AdapterStack,
    requests: dict[str, np.ndarray],
    steps: int,
) -> tuple[np.ndarray, np.ndarray]:
    """All requests in one batch through :func:`generate_with_adapters`."""
    tokens, logits = generate_with_adapters(
        config,
        base,
        stack,
        jnp.asarray(requests["adapter_ids"]),
        jnp.asarray(requests["prompts"]),
        jnp.asarray(requests["lengths"]),
        sampling_of(requests),
        steps=steps,
    )
    return np.asarray(tokens), np.asarray(logits)


def compare(
    batch: tuple[np.ndarray, np.ndarray], alone: Sequence[tuple[np.ndarray, np.ndarray]]
) -> dict[str, float]:
    """How far the batched run is from the per-request runs."""
    pairs = list(zip(*batch, alone, strict=True))
    return {
        "requests_identical": sum(np.array_equal(t, a[0]) for t, _, a in pairs),
        "max_logit_diff": max(float(np.max(np.abs(lg - a[1]))) for _, lg, a in pairs),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=3, help="distinct adapters in the stack")
    parser.add_argument("--steps", type=int, default=16, help="new tokens per request")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0: no top-k cut")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    config = Config()

    variables = init_params(config, args.seed)
    ranks = [2, 4, 8][: args.adapters] + [4] * max(0, args.adapters - 3)
    base, trees = random_adapters(variables, ranks + [8], seed=args.seed)
    trees, replacement = trees[:-1], trees[-1]
    stack = lorax_fn.stack_adapters(trees, base=base)
    requests = make_requests(
        config,
        args.requests,
        args.adapters,
        seed=args.seed,
        temperature=args.temperature,
        top_k=args.top_k,
    )
    print(
        f"decoder: {config.layers} layers, d={config.d}, {config.heads} query / "
        f"{config.kv_heads} KV heads, vocab {config.vocab}; adapters of rank {ranks} on "
        f"{len(TARGETS)} projections per layer"
    )
    print(
        f"requests: adapter ids {requests['adapter_ids'].tolist()}, "
        f"prompt lengths {requests['lengths'].tolist()}, {args.steps} new tokens each"
    )

    before = TRACES["generate_with_adapters"]
    batch = run_batch(config, base, stack, requests, args.steps)
    result = compare(batch, run_alone(config, base, trees, requests, args.steps))

    swapped_slot = 1 % args.adapters
    stack = lorax_fn.multi.replace_adapter(stack, swapped_slot, replacement)
    trees = [replacement if k == swapped_slot else t for k, t in enumerate(trees)]
    swapped = run_batch(config, base, stack, requests, args.steps)
    after_swap = compare(swapped, run_alone(config, base, trees, requests, args.steps))
    result.update(
        requests=args.requests,
        compiles=TRACES["generate_with_adapters"] - before,
        swap_requests_identical=after_swap["requests_identical"],
        swap_max_logit_diff=after_swap["max_logit_diff"],
        swap_changed=int(
            sum(not np.array_equal(a, b) for a, b in zip(batch[0], swapped[0], strict=True))
        ),
        seconds=time.perf_counter() - started,
    )
    for ids, tokens in zip(requests["adapter_ids"], batch[0], strict=True):
        print(f"  adapter {ids:2d}: {tokens.tolist()}")
    print(
        f"batch vs each request alone on its merged model: {result['requests_identical']}/"
        f"{args.requests} token sequences identical, max |Δlogit| {result['max_logit_diff']:.1e}"
    )
    print(
        f"hot swap of adapter {swapped_slot}: {result['swap_changed']} requests changed, "
        f"{result['swap_requests_identical']}/{args.requests} identical to their merged "
        f"runs (max |Δlogit| {result['swap_max_logit_diff']:.1e}); the batched generate "
        f"compiled {result['compiles']} time(s) for both calls"
    )
    print(f"done in {result['seconds']:.1f} s")
    return result


if __name__ == "__main__":
    main()
