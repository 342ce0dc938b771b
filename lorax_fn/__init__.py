"""lorax_fn: LoRA as a functional transformation for JAX and Flax.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import lorax_fn
    >>> params = {"w": jnp.ones((8, 4))}
    >>> base, lt = lorax_fn.split(params, lorax_fn.LoraSpec("w", rank=2), key=jax.random.key(0))
    >>> y = lorax_fn.lora(lambda p, x: x @ p["w"])(base, lt, jnp.ones((1, 8)))
"""

# The workflow's names; helpers live in their modules, the wings in their subpackages
# (lorax_fn.checkpoint, .peft, .quant, .multi, .variants, .transform). The paper's
# subspace analysis is `from lorax_fn import analysis` (it needs no import here).
from lorax_fn import (
    checkpoint,
    multi,
    parallel,
    peft,
    quant,
    sharding,
    transform,
    variants,
)
from lorax_fn.accounting import count_params, summary
from lorax_fn.checkpoint import LoraCheckpointManager, restore, save
from lorax_fn.errors import LoraError
from lorax_fn.factors import Layout, LoraFactors
from lorax_fn.merge import merge, unmerge
from lorax_fn.multi import multi_lora, stack_adapters
from lorax_fn.optim import optimizer, weight_decay_mask
from lorax_fn.paths import describe
from lorax_fn.peft import export_peft, import_peft
from lorax_fn.quant import QuantizedArray, quantize_base
from lorax_fn.sharding import lora_shardings
from lorax_fn.spec import LoraSpec
from lorax_fn.split import split
from lorax_fn.transform import infer_layouts, lora
from lorax_fn.variants.dora import dora_norms, init_magnitudes
from lorax_fn.version import __version__

__all__ = [
    "Layout",
    "LoraCheckpointManager",
    "LoraError",
    "LoraFactors",
    "LoraSpec",
    "QuantizedArray",
    "__version__",
    "checkpoint",
    "count_params",
    "describe",
    "dora_norms",
    "export_peft",
    "import_peft",
    "infer_layouts",
    "init_magnitudes",
    "lora",
    "lora_shardings",
    "merge",
    "multi",
    "multi_lora",
    "optimizer",
    "parallel",
    "peft",
    "quant",
    "quantize_base",
    "restore",
    "save",
    "sharding",
    "split",
    "stack_adapters",
    "summary",
    "transform",
    "unmerge",
    "variants",
    "weight_decay_mask",
]
