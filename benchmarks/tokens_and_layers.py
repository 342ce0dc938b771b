"""Layer subsets and trainable tokens: trainable parameters, optimizer state, compiled FLOPs.

A 32-layer ``nn.scan`` stack of MLP blocks (d → 4d → d) under a tied embedding: LoRA on
both kernels of every layer vs the last 8 layers (:func:`lorax_fn.subsets.select_layers`),
and trainable tokens (:mod:`lorax_fn.tokens`, 4 rows) vs the base. FLOPs are XLA's
compiled cost analysis of one training step's gradient (forward + backward) and of the
forward pass (wall times on the 2 shared cores of the machine this was written on were
too noisy to report).

    python benchmarks/tokens_and_layers.py

Prints one JSON object per configuration, then a table.
"""

from __future__ import annotations

import argparse
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from common import machine, table

import lorax_fn
from lorax_fn.subsets import select_layers
from lorax_fn.tokens import add_trainable_tokens

LAYERS, D, VOCAB, TOKENS, RANK, LAST = 32, 256, 8192, 256, 8, 8


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(D)(nn.gelu(nn.Dense(4 * D)(x))), None


class Model(nn.Module):
    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(VOCAB, D)
        scan = nn.scan(
            Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS
        )
        x, _ = scan()(embed(ids), None)
        return embed.attend(x)


def flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost["flops"])


def state_elements(lt: dict) -> int:
    state = lorax_fn.optimizer(optax.adam(1e-3), lt).init(lt)
    return sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    model = Model()
    ids = jax.random.randint(jax.random.key(0), (1, TOKENS), 0, VOCAB)
    params = model.init(jax.random.key(1), ids)
    spec = lorax_fn.LoraSpec("**/ScanBlock_0/**/kernel", rank=RANK)
    base, every = lorax_fn.split(
        params, spec, key=jax.random.key(2), fn=model.apply, example_args=(ids,)
    )
    trees = {
        "base (no adapter)": {},
        f"LoRA r={RANK}, all {LAYERS} layers": every,
        f"LoRA r={RANK}, last {LAST} layers": select_layers(every, range(-LAST, 0)),
        "trainable tokens (4 rows)": add_trainable_tokens(
            base, {}, {"params/Embed_0/embedding": [VOCAB - 4, VOCAB - 3, VOCAB - 2, VOCAB - 1]}
        ),
    }
    apply = lorax_fn.lora(model.apply)

    def loss(lt, base):
        return jnp.mean(apply(base, lt, ids) ** 2)

    grad = jax.grad(loss)
    rows = []
    for name, lt in trees.items():
        row = {
            "config": name,
            "trainable": lorax_fn.count_params(base, lt).trainable,
            "adam_state": state_elements(lt) if lt else 0,
            "forward_gflops": flops(apply, base, lt, ids) / 1e9,
            "grad_gflops": flops(grad, lt, base) / 1e9 if lt else None,
            "machine": machine(),
        }
        rows.append(row)
        print(json.dumps(row))
    print(
        table(
            rows,
            [
                ("config", "configuration", "s"),
                ("trainable", "trainable params", ","),
                ("adam_state", "Adam state (elements)", ","),
                ("forward_gflops", "forward GFLOPs", ".3f"),
                ("grad_gflops", "gradient GFLOPs", ".3f"),
            ],
        )
    )


if __name__ == "__main__":
    main()
