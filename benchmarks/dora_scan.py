"""DoRA vs LoRA over a scanned decoder at Llama-3-8B shape: compiled memory and FLOPs.

Compile-only (nothing runs, no timing): a Llama-style decoder (RMSNorm, GQA attention
without RoPE, SwiGLU MLP; bfloat16 weights) whose layers are one ``nn.scan`` stack,
rank-16 adapters on all seven projections (q, k, v, o, gate, up, down), FSDP over 8
virtual CPU devices (``--xla_force_host_platform_device_count``: every weight sharded
along its largest axis, the batch along its first, the adapters following the base via
:func:`lorax_fn.lora_shardings`). Parameters are ``jax.eval_shape`` shapes with
``NamedSharding``; the train step (``value_and_grad`` of the next-token loss over the
LoRA tree) is lowered and compiled, and XLA's ``memory_analysis()`` (temporary bytes
per device) and ``cost_analysis()`` (FLOPs per device; a second compile, the scan
unrolled two layers a step, gives one layer's FLOPs, which XLA counts once per loop)
are read. Configurations: ``lora``/``dora``,
each with the layer under ``nn.remat`` (``-remat``) or not. Defaults are Llama-3-8B:
32 layers, d=4096, ffn 14336, 32/8 heads, vocab 128256, batch 8 × 2048 tokens.

Each configuration compiles in its own process (minutes at the default shape). To
compare with an older lorax_fn, run the script with ``PYTHONPATH`` pointing at that
checkout: the ``lorax_fn`` field says which one ran.

    python benchmarks/dora_scan.py                       # all four configurations
    python benchmarks/dora_scan.py --config dora-remat   # one
    python benchmarks/dora_scan.py --layers 2 --d 256 --ffn 512 --heads 4 --kv_heads 2 \\
        --vocab 512 --seq 64                             # a quick look
"""

from __future__ import annotations

import os

# Before jax is imported: 8 virtual CPU devices for the FSDP mesh.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, run_configs, table

import lorax_fn
from lorax_fn.sharding import fsdp_shardings

CONFIGS = ("lora", "dora", "lora-remat", "dora-remat")
DTYPE = jnp.bfloat16


class Layer(nn.Module):
    """One pre-norm decoder layer: GQA attention (causal, no RoPE), SwiGLU MLP."""

    heads: int
    kv_heads: int
    ffn: int

    @nn.compact
    def __call__(self, h: jax.Array, _: None) -> tuple[jax.Array, None]:
        d = h.shape[-1]
        hd = d // self.heads

        def dense(features: int, name: str) -> nn.Dense:
            return nn.Dense(features, use_bias=False, dtype=DTYPE, param_dtype=DTYPE, name=name)

        x = nn.RMSNorm(dtype=DTYPE, param_dtype=DTYPE, name="attn_norm")(h)
        b, t = x.shape[:2]
        q = dense(self.heads * hd, "q_proj")(x).reshape(b, t, self.heads, hd)
        k = dense(self.kv_heads * hd, "k_proj")(x).reshape(b, t, self.kv_heads, hd)
        v = dense(self.kv_heads * hd, "v_proj")(x).reshape(b, t, self.kv_heads, hd)
        att = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
        h = h + dense(d, "o_proj")(att.reshape(b, t, d))
        x = nn.RMSNorm(dtype=DTYPE, param_dtype=DTYPE, name="mlp_norm")(h)
        gated = nn.silu(dense(self.ffn, "gate_proj")(x)) * dense(self.ffn, "up_proj")(x)
        return h + dense(d, "down_proj")(gated), None


class Decoder(nn.Module):
    layers: int
    d: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    remat: bool
    unroll: int = 1

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        h = nn.Embed(self.vocab, self.d, dtype=DTYPE, param_dtype=DTYPE)(ids)
        layer = nn.remat(Layer) if self.remat else Layer
        stack = nn.scan(
            layer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.layers,
            unroll=self.unroll,
        )
        h = stack(self.heads, self.kv_heads, self.ffn, name="layers")(h, None)[0]
        h = nn.RMSNorm(dtype=DTYPE, param_dtype=DTYPE)(h)
        return nn.Dense(self.vocab, use_bias=False, dtype=DTYPE, param_dtype=DTYPE)(h)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=CONFIGS)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv_heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args()


def compile_step(args: argparse.Namespace, config: str, unroll: int = 1) -> Any:
    """The compiled train step of ``config``, its scan unrolled ``unroll`` layers a step."""
    use_dora, remat = config.startswith("dora"), config.endswith("-remat")
    model = Decoder(
        args.layers, args.d, args.ffn, args.heads, args.kv_heads, args.vocab, remat, unroll
    )
    ids = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), ids)
    # Every projection kernel is stacked (layers, in, out).
    spec = lorax_fn.LoraSpec(
        "params/layers/*_proj/kernel",
        rank=args.rank,
        use_dora=use_dora,
        layouts={"**": lorax_fn.Layout((1,), (2,), (0,))},
    )
    base, lt = jax.eval_shape(lambda p: lorax_fn.split(p, spec, key=jax.random.key(1)), params)
    mesh = jax.make_mesh((len(jax.devices()),), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    base_sh = fsdp_shardings(base, mesh, "fsdp")
    lt_sh = lorax_fn.lora_shardings(lt, base_sh)

    def placed(tree: Any, shardings: Any) -> Any:
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
        )

    batch = jax.ShapeDtypeStruct(
        ids.shape, ids.dtype, sharding=NamedSharding(mesh, PartitionSpec("fsdp"))
    )
    apply = lorax_fn.lora(model.apply, on_fallback="error")

    def loss(lt: Any, base: Any, ids: jax.Array) -> jax.Array:
        logits = apply(base, lt, ids[:, :-1]).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

    step = jax.jit(jax.value_and_grad(loss))
    return step.lower(placed(lt, lt_sh), placed(base, base_sh), batch).compile()


def _flops(compiled: Any) -> float:
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list | tuple) else cost)["flops"]


def step_cost(args: argparse.Namespace, config: str) -> dict[str, Any]:
    """Compile the train step of ``config`` and read its per-device memory and FLOPs.

    XLA's cost analysis counts a loop's body once: the step's FLOPs are those of the
    step compiled with the scan unrolled two layers a step, minus those of one layer a
    step (one layer's), times the layers, plus the rest (embedding, head, loss).
    """
    start = time.perf_counter()
    compiled = compile_step(args, config)
    memory = compiled.memory_analysis()
    once = _flops(compiled)
    layer = _flops(compile_step(args, config, unroll=2)) - once
    return {
        "config": config,
        "variant": "dora" if config.startswith("dora") else "lora",
        "remat": config.endswith("-remat"),
        "temp_gib_per_device": memory.temp_size_in_bytes / 2**30,
        "argument_gib_per_device": memory.argument_size_in_bytes / 2**30,
        "gflops": (once + (args.layers - 1) * layer) / 1e9,
        "layer_gflops": layer / 1e9,
        "compile_s": round(time.perf_counter() - start, 1),
        "lorax_fn": str(Path(lorax_fn.__file__).resolve().parent.parent),
        "shape": {k: v for k, v in vars(args).items() if k not in ("config", "json")},
    }


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each DoRA row's temp memory and FLOPs as ratios to the LoRA row of its remat."""
    lora = {r["remat"]: r for r in rows if r["variant"] == "lora"}
    for r in rows:
        ref = lora.get(r["remat"])
        if ref is not None:
            r["temp_vs_lora"] = r["temp_gib_per_device"] / ref["temp_gib_per_device"]
            r["flops_vs_lora"] = r["gflops"] / ref["gflops"]
            r["layer_flops_vs_lora"] = r["layer_gflops"] / ref["layer_gflops"]
    return rows


def main() -> None:
    args = parse_args()
    if args.config:
        print(json.dumps(step_cost(args, args.config)), flush=True)
        return
    rows = with_ratios(run_configs(__file__, CONFIGS, args))
    info = {"machine": machine(), "date": time.strftime("%Y-%m-%d", time.gmtime())}
    print(json.dumps(info))
    for r in rows:
        print(json.dumps(r))
    print(
        table(
            rows,
            [
                ("config", "config", "s"),
                ("temp_gib_per_device", "temp GiB/device", ".2f"),
                ("temp_vs_lora", "temp / LoRA", ".3f"),
                ("gflops", "GFLOPs", ".4g"),
                ("flops_vs_lora", "FLOPs / LoRA", ".3f"),
                ("layer_flops_vs_lora", "layer FLOPs / LoRA", ".3f"),
            ],
        )
    )
    if args.json:
        args.json.write_text("\n".join(json.dumps(r) for r in [info, *rows]) + "\n")


if __name__ == "__main__":
    main()
