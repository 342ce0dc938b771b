"""LoRA on a plain Flax NNX transformer, passed to lorax_fn as the module itself.

``split`` and ``lora`` take an ``nnx.Module`` directly: the function wrapped takes the
module (``lambda model, tokens: model(tokens)``), the base that ``split`` returns is a
module of the same structure, and ``merge(base, lora)`` is a plain module to serve.
The ``nnx.split`` form (a ``graphdef`` and an ``nnx.State``, rebuilt with ``nnx.merge``
inside the function) works the same, with the same paths; this example runs both and
checks that they agree. Attention is ``nnx.MultiHeadAttention`` (its q/k/v kernels are
``(d, heads, head_dim)``, its output ``(heads, head_dim, d)``), the MLP ``nnx.Linear``
and ``nnx.Einsum``: ``split(..., fn=, example_args=)`` reads each kernel's layout off
the traced call. Needs only flax::

    python examples/zoo/nnx_model.py --smoke
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lorax_fn

TARGETS = ["**/attn/*/kernel", "**/mlp/up/kernel", "**/mlp/down/kernel"]
# float32 on CPU: the factorized and the merged forms sum in different orders.
VALUE_TOL = {"rtol": 1e-4, "atol": 1e-5}
GRAD_TOL = {"rtol": 1e-3, "atol": 1e-5}


class Block(nnx.Module):
    """Pre-norm causal self-attention and an MLP whose second matmul is an einsum."""

    def __init__(self, d: int, heads: int, *, rngs: nnx.Rngs) -> None:
        self.norm1 = nnx.RMSNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=heads, in_features=d, decode=False, use_bias=False, rngs=rngs
        )
        self.norm2 = nnx.RMSNorm(d, rngs=rngs)
        self.mlp = MLP(d, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        mask = nnx.make_causal_mask(x[..., 0])
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.mlp(self.norm2(x))


class MLP(nnx.Module):
    """``up`` is an ``nnx.Linear``, ``down`` an ``nnx.Einsum`` with its kernel as (out, in)."""

    def __init__(self, d: int, *, rngs: nnx.Rngs) -> None:
        self.up = nnx.Linear(d, 4 * d, rngs=rngs)
        self.down = nnx.Einsum("btf,df->btd", (d, 4 * d), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.gelu(self.up(x)))


class TinyLM(nnx.Module):
    """Token embedding, ``layers`` blocks, a final norm and an untied head."""

    def __init__(self, vocab: int, d: int, heads: int, layers: int, *, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.blocks = nnx.List([Block(d, heads, rngs=rngs) for _ in range(layers)])
        self.norm = nnx.RMSNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, vocab, use_bias=False, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def call(model: TinyLM, tokens: jax.Array) -> jax.Array:
    """The module form: lorax_fn hands ``fn`` a module built from the base and the adapter."""
    return model(tokens)


def state_fn(graphdef: nnx.GraphDef) -> Callable[[nnx.State, jax.Array], jax.Array]:
    """The ``nnx.split`` form: ``fn`` takes the state and rebuilds the module inside."""
    return lambda state, tokens: nnx.merge(graphdef, state)(tokens)


def next_token_loss(fn: Callable[..., jax.Array], params: Any, tokens: jax.Array) -> jax.Array:
    """Mean cross-entropy of predicting each token from the ones before it."""
    logits = fn(params, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def perturb(lt: dict[str, Any], key: jax.Array) -> dict[str, Any]:
    """Add noise to every factor: with B = 0 any adapter, even a misplaced one, looks right."""
    leaves, treedef = jax.tree.flatten(lt)
    keys = jax.random.split(key, len(leaves))
    noisy = [
        x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, noisy)


def check_against_merge(fn: Callable, base: Any, lt: dict, tokens: jax.Array) -> dict[str, float]:
    """Assert ``lora(fn)`` equals ``fn(merge(base, lt))`` in logits and in LoRA gradients."""
    adapted = lorax_fn.lora(fn, on_fallback="error")
    got = jax.jit(adapted)(base, lt, tokens)
    want = jax.jit(lambda b, t: fn(lorax_fn.merge(b, t), tokens))(base, lt)
    np.testing.assert_allclose(got, want, **VALUE_TOL)

    def via_lora(t: dict) -> jax.Array:
        return next_token_loss(lambda p, x: adapted(p, t, x), base, tokens)

    def via_merge(t: dict) -> jax.Array:
        return next_token_loss(fn, lorax_fn.merge(base, t), tokens)

    grads_got = jax.tree.leaves(jax.jit(jax.grad(via_lora))(lt))
    grads_want = jax.tree.leaves(jax.jit(jax.grad(via_merge))(lt))
    pairs = list(zip(grads_got, grads_want, strict=True))
    for g, w in pairs:
        np.testing.assert_allclose(g, w, **GRAD_TOL)
    return {
        "value_max_diff": float(jnp.max(jnp.abs(got - want))),
        "grad_max_diff": max(float(jnp.max(jnp.abs(g - w))) for g, w in pairs),
    }


def train(fn: Callable, base: Any, lt: dict, tokens: jax.Array, steps: int) -> tuple[dict, list]:
    """AdamW on the LoRA tree alone, jitted (the base module is a pytree argument)."""
    loss = lorax_fn.lora(lambda p, x: next_token_loss(fn, p, x), on_fallback="error")
    tx = lorax_fn.optimizer(optax.adamw(1e-2), lt)

    @jax.jit
    def step(lt: dict, opt_state: Any) -> tuple[dict, Any, jax.Array]:
        value, grads = jax.value_and_grad(loss, argnums=1)(base, lt, tokens)
        updates, opt_state = tx.update(grads, opt_state, lt)
        return optax.apply_updates(lt, updates), opt_state, value

    opt_state, losses = tx.init(lt), []
    for _ in range(steps):
        lt, opt_state, value = step(lt, opt_state)
        losses.append(float(value))
    return lt, losses


def main(smoke: bool = False, verbose: bool = True) -> dict[str, Any]:
    """Both forms: split, check against merge; then train, save, restore, serve the merge."""
    vocab, d, heads, layers, steps = (64, 32, 4, 2, 5) if smoke else (256, 64, 4, 4, 60)
    model = TinyLM(vocab, d, heads, layers, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (4, 12), 0, vocab)
    spec = lorax_fn.LoraSpec(targets=TARGETS, rank=4)

    # The module form: the model goes in as it is.
    base, lt = lorax_fn.split(model, spec, key=jax.random.key(2), fn=call, example_args=(tokens,))
    # The nnx.split form: the same paths, the same factor shapes, from the state.
    graphdef, state = nnx.split(model)
    base_state, lt_state = lorax_fn.split(
        state, spec, key=jax.random.key(2), fn=state_fn(graphdef), example_args=(tokens,)
    )
    assert jax.tree.map(jnp.shape, lt) == jax.tree.map(jnp.shape, lt_state)
    if verbose:
        print(lorax_fn.summary(base, lt))

    noisy = perturb(lt, jax.random.key(3))
    diffs = check_against_merge(call, base, noisy, tokens)
    diffs_state = check_against_merge(state_fn(graphdef), base_state, noisy, tokens)
    np.testing.assert_allclose(
        lorax_fn.lora(call)(base, noisy, tokens),
        lorax_fn.lora(state_fn(graphdef))(base_state, noisy, tokens),
        **VALUE_TOL,
    )

    lt, losses = train(call, base, lt, tokens, steps)
    assert losses[-1] < losses[0], f"loss did not fall: {losses}"
    with tempfile.TemporaryDirectory() as tmp:
        lorax_fn.save(os.path.join(tmp, "adapter"), lt, spec, base=base)
        restored = lorax_fn.restore(os.path.join(tmp, "adapter"), base=base)
    served = lorax_fn.merge(base, restored)  # a plain TinyLM: no adapter left at inference
    np.testing.assert_allclose(served(tokens), lorax_fn.lora(call)(base, lt, tokens), **VALUE_TOL)
    if verbose:
        print(
            f"lora(fn) vs merge-then-call: logits max |diff| module {diffs['value_max_diff']:.1e}"
            f", state {diffs_state['value_max_diff']:.1e}; gradients {diffs['grad_max_diff']:.1e}"
        )
        print(
            f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {steps} AdamW steps; restored and "
            f"merged into a {type(served).__name__} that serves the same logits"
        )
    return {
        **diffs,
        "state_value_max_diff": diffs_state["value_max_diff"],
        "state_grad_max_diff": diffs_state["grad_max_diff"],
        "losses": losses,
        "paths": sorted(lt),
        "base": base,
        "trained": lt,
        "restored": restored,
        "served": served,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny config, a few steps (CI)")
    main(smoke=parser.parse_args().smoke)
