"""lorax_fn quickstart: pretrain a tiny transformer, then adapt it with LoRA.

1. Pretrain a small character-level transformer (linen) on one text.
2. Freeze it and fine-tune LoRA factors on ``query``/``value`` (plus the output
   head) on another text — 10% of the parameters, most of them the head —
   computed factorized.
3. Print the per-module parameter summary, merge the adapter into the weights,
   and check the merged model gives the same outputs as the unmerged one.

Runs on a laptop CPU in well under a minute: ``python examples/quickstart.py``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

import lorax_fn


class Block(nn.Module):
    heads: int

    @nn.compact
    def __call__(self, x):
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, h, mask=mask)
        h = nn.LayerNorm()(x)
        return x + nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(4 * x.shape[-1])(h)))


class CharTransformer(nn.Module):
    vocab: int = 128
    d: int = 64
    heads: int = 4
    layers: int = 2
    seq: int = 32

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(self.vocab, self.d)(ids)
        x = x + self.param("pos", nn.initializers.normal(0.02), (self.seq, self.d))
        for _ in range(self.layers):
            x = Block(self.heads)(x)
        return nn.Dense(self.vocab, name="head")(nn.LayerNorm()(x))


def texts() -> tuple[str, str]:
    """Two texts that ship with Python: the Zen of Python and the `json` module docs."""
    import codecs
    import contextlib
    import io
    import json

    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
        import this
    zen = codecs.decode(this.s, "rot13")
    return zen * 4, (json.__doc__ or "") * 2


def batches(text: str, seq: int, batch: int, seed: int):
    data = np.frombuffer(text.encode("ascii", "replace"), np.uint8).astype(np.int32) % 128
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(data) - seq - 1, batch)
        window = np.stack([data[s : s + seq + 1] for s in starts])
        yield jnp.asarray(window[:, :-1]), jnp.asarray(window[:, 1:])


def cross_entropy(logits, targets):
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def train(loss_fn, params, tx, data, steps, label):
    state = tx.init(params)

    @jax.jit
    def step(params, state, ids, targets):
        loss, grads = jax.value_and_grad(loss_fn)(params, ids, targets)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for i in range(steps):
        params, state, loss = step(params, state, *next(data))
        losses.append(float(loss))
        if i % max(1, steps // 5) == 0 or i == steps - 1:
            print(f"  {label} step {i:4d}  loss {losses[-1]:.3f}")
    return params, losses


def main(pretrain_steps: int = 300, lora_steps: int = 300) -> dict[str, float]:
    started = time.perf_counter()
    model = CharTransformer()
    pretrain_text, new_text = texts()
    ids = jnp.zeros((1, model.seq), jnp.int32)
    variables = model.init(jax.random.key(0), ids)

    print("1) pretraining the base model on the Zen of Python")
    variables, _ = train(
        lambda v, x, y: cross_entropy(model.apply(v, x), y),
        variables,
        optax.adam(3e-3),
        batches(pretrain_text, model.seq, 32, seed=0),
        pretrain_steps,
        "pretrain",
    )

    print("2) LoRA fine-tuning on the `json` module docs: query/value at r=8, head trained")
    spec = lorax_fn.LoraSpec(
        targets=["**/query/kernel", "**/value/kernel"], rank=8, trainable=["params/head/**"]
    )
    base, lora_tree = lorax_fn.split(variables, spec, key=jax.random.key(1))
    print(lorax_fn.summary(base, lora_tree))

    apply = lorax_fn.lora(model.apply)
    lora_tree, losses = train(
        lambda lt, x, y: cross_entropy(apply(base, lt, x), y),
        lora_tree,
        lorax_fn.optimizer(optax.adam(3e-3), lora_tree),
        batches(new_text, model.seq, 32, seed=1),
        lora_steps,
        "lora",
    )

    print("3) merging the adapter for zero-latency inference")
    ids, _ = next(batches(new_text, model.seq, 8, seed=2))
    unmerged = jax.jit(apply)(base, lora_tree, ids)
    merged_params = lorax_fn.merge(base, lora_tree)
    merged = jax.jit(model.apply)(merged_params, ids)
    max_diff = float(jnp.max(jnp.abs(merged - unmerged)))
    restored = lorax_fn.unmerge(merged_params, lora_tree)
    base_diff = max(
        float(jnp.max(jnp.abs(restored_leaf - base_leaf)))
        for (path, restored_leaf), (_, base_leaf) in zip(
            lorax_fn.paths.leaves_with_paths(restored),
            lorax_fn.paths.leaves_with_paths(base),
            strict=True,
        )
        if not path.startswith("params/head")
    )
    print(
        f"  max |merged - unmerged| = {max_diff:.2e};  max |unmerge(merge) - base| = "
        f"{base_diff:.2e}"
    )
    assert max_diff < 1e-4 and base_diff < 1e-5, (max_diff, base_diff)
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < first, (first, last)
    seconds = time.perf_counter() - started
    print(f"LoRA loss {first:.3f} -> {last:.3f}; done in {seconds:.1f} s")
    return {"first_loss": first, "last_loss": last, "merge_max_diff": max_diff}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--lora-steps", type=int, default=300)
    args = parser.parse_args()
    main(args.pretrain_steps, args.lora_steps)
