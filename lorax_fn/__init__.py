"""lorax_fn: LoRA as a functional transformation for JAX and Flax.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import lorax_fn
    >>> params = {"w": jnp.ones((8, 4))}
    >>> base, lt = lorax_fn.split(params, lorax_fn.LoraSpec("w", rank=2), key=jax.random.key(0))
    >>> y = lorax_fn.lora(lambda p, x: x @ p["w"])(base, lt, jnp.ones((1, 8)))
"""

# The workflow's names; helpers live in their modules, the wings in their subpackages
# (lorax_fn.checkpoint, .peft, .quant, .multi, .variants, .inits, .transform); trainable
# tokens and layer subsets in lorax_fn.tokens and lorax_fn.subsets. The paper's
# subspace analysis is `from lorax_fn import analysis` (it needs no import here).
import importlib
from typing import Any

from lorax_fn import inits, multi, parallel, quant, sharding, subsets, tokens, transform, variants
from lorax_fn.accounting import count_params, summary
from lorax_fn.errors import LoraError
from lorax_fn.factors import Layout, LoraFactors
from lorax_fn.merge import merge, unmerge
from lorax_fn.multi import multi_lora, stack_adapters
from lorax_fn.optim import optimizer, weight_decay_mask
from lorax_fn.paths import AnyOf, describe
from lorax_fn.quant import QuantizedArray, quantize_base
from lorax_fn.sharding import lora_shardings
from lorax_fn.spec import LoraSpec
from lorax_fn.split import split
from lorax_fn.transform import infer_layouts, lora
from lorax_fn.variants.dora import dora_norms, init_magnitudes
from lorax_fn.version import __version__

__all__ = [
    "AnyOf",
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
    "inits",
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
    "subsets",
    "summary",
    "tokens",
    "transform",
    "unmerge",
    "variants",
    "weight_decay_mask",
]

# The checkpoint and PEFT wings load orbax/tensorstore and safetensors: they are imported
# when first used, so that splitting, applying and training pay nothing for them.
_LAZY = {
    "checkpoint": ("lorax_fn.checkpoint", None),
    "peft": ("lorax_fn.peft", None),
    "LoraCheckpointManager": ("lorax_fn.checkpoint", "LoraCheckpointManager"),
    "restore": ("lorax_fn.checkpoint", "restore"),
    "save": ("lorax_fn.checkpoint", "save"),
    "export_peft": ("lorax_fn.peft", "export_peft"),
    "import_peft": ("lorax_fn.peft", "import_peft"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'lorax_fn' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
