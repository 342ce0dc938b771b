"""Bytes on disk of a LoRA adapter vs the full parameters, for a GPT-2-small-shaped model.

The parameter tree has GPT-2 small's shapes (124M parameters, random values, nothing
downloaded). For several target sets and ranks it saves the adapter with
:func:`lorax_fn.save` (orbax) and :func:`lorax_fn.export_peft` (safetensors), and the
full parameters with orbax, and compares the bytes on disk with the expected
``|Θ| × 4`` bytes (float32), ``|Θ| = Σ r · (fan_in + fan_out)``. B is filled with random
values, as after training (B = 0 at init would compress to nothing). orbax compresses
array chunks (zstd), so its files can be a few percent below ``|Θ| × 4``; safetensors
stores raw bytes plus a JSON header. Each is checked to be within 10% + 64 KiB of it.

    python benchmarks/adapter_size.py [--out DIR]

Prints one JSON object per configuration, then a table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import lorax_fn

D, LAYERS, VOCAB, CONTEXT = 768, 12, 50257, 1024


def gpt2_small_params(seed: int = 0) -> dict:
    """A ``{"params": ...}`` tree with GPT-2 small's names and shapes (Flax layout)."""
    rng = np.random.default_rng(seed)

    def normal(*shape: int) -> jax.Array:
        return jnp.asarray(0.02 * rng.standard_normal(shape, np.float32))

    def dense(fan_in: int, fan_out: int) -> dict:
        return {"kernel": normal(fan_in, fan_out), "bias": jnp.zeros(fan_out)}

    def norm() -> dict:
        return {"scale": jnp.ones(D), "bias": jnp.zeros(D)}

    blocks = {
        f"h_{i}": {
            "ln_1": norm(),
            "attn": {"c_attn": dense(D, 3 * D), "c_proj": dense(D, D)},
            "ln_2": norm(),
            "mlp": {"c_fc": dense(D, 4 * D), "c_proj": dense(4 * D, D)},
        }
        for i in range(LAYERS)
    }
    return {
        "params": {
            "wte": {"embedding": normal(VOCAB, D)},
            "wpe": {"embedding": normal(CONTEXT, D)},
            **blocks,
            "ln_f": norm(),
        }
    }


CONFIGS = {  # name -> (targets, rank)
    "attn.c_attn r=1": ("**/attn/c_attn/kernel", 1),
    "attn.c_attn r=8": ("**/attn/c_attn/kernel", 8),
    "attn.c_attn r=64": ("**/attn/c_attn/kernel", 64),
    "attn.* r=8": ("**/attn/*/kernel", 8),
    "all linear r=8": (["**/attn/*/kernel", "**/mlp/*/kernel"], 8),
    "all linear r=16": (["**/attn/*/kernel", "**/mlp/*/kernel"], 16),
}


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def trained(lt: dict, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    return {
        p: lorax_fn.LoraFactors(
            f.a, jnp.asarray(0.02 * rng.standard_normal(f.b.shape, np.float32)), f.scale, f.layout
        )
        for p, f in lt.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="where to write (default: a temporary dir)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="adapter_size_"))
    params = gpt2_small_params()
    n_full = sum(x.size for x in jax.tree.leaves(params))
    with ocp.StandardCheckpointer() as checkpointer:  # async: leaving the block waits
        checkpointer.save((out / "full").absolute(), params)
    full_disk = disk_bytes(out / "full")

    rows = []
    for name, (targets, rank) in CONFIGS.items():
        spec = lorax_fn.LoraSpec(targets=targets, rank=rank)
        base, lt = lorax_fn.split(params, spec, key=jax.random.key(0))
        lt = trained(lt)
        n_lora = sum(x.size for x in jax.tree.leaves(lt))
        slug = name.replace(" ", "_").replace("=", "").replace("*", "all")
        lorax_fn.save(out / slug / "orbax", lt, spec, base=base)
        lorax_fn.export_peft(out / slug / "peft", lt, spec)
        row = {
            "config": name,
            "lora_params": n_lora,
            "expected_bytes": 4 * n_lora,
            "orbax_bytes": disk_bytes(out / slug / "orbax"),
            "peft_safetensors_bytes": (out / slug / "peft" / "adapter_model.safetensors")
            .stat()
            .st_size,
            "peft_config_bytes": (out / slug / "peft" / "adapter_config.json").stat().st_size,
            "full_params": n_full,
            "full_orbax_bytes": full_disk,
        }
        row["full_over_orbax"] = round(full_disk / row["orbax_bytes"], 1)
        row["near_expected"] = all(
            abs(row[k] - row["expected_bytes"]) <= 0.1 * row["expected_bytes"] + 65536
            for k in ("orbax_bytes", "peft_safetensors_bytes")
        )
        rows.append(row)
        print(json.dumps(row), flush=True)

    header = (
        "config",
        "|Θ|",
        "|Θ|×4 B",
        "orbax B",
        "Δ",
        "safetensors B",
        "Δ",
        "full/orbax",
        "≈|Θ|×4",
    )
    table = [header] + [
        (
            r["config"],
            f"{r['lora_params']:,}",
            f"{r['expected_bytes']:,}",
            f"{r['orbax_bytes']:,}",
            f"{r['orbax_bytes'] - r['expected_bytes']:+,}",
            f"{r['peft_safetensors_bytes']:,}",
            f"{r['peft_safetensors_bytes'] - r['expected_bytes']:+,}",
            f"{r['full_over_orbax']}×",
            "yes" if r["near_expected"] else "NO",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print(
        f"\nfull parameters: {n_full:,} float32 = {4 * n_full:,} B raw, "
        f"{full_disk:,} B on disk (orbax)"
    )
    for row in table:
        print(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    print(f"\nfiles under {out}")


if __name__ == "__main__":
    main()
