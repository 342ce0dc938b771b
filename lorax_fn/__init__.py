"""lorax_fn: LoRA as a functional transformation for JAX and Flax.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import lorax_fn
    >>> params = {"w": jnp.ones((8, 4))}
    >>> base, lt = lorax_fn.split(params, lorax_fn.LoraSpec("w", rank=2), key=jax.random.key(0))
    >>> y = lorax_fn.lora(lambda p, x: x @ p["w"])(base, lt, jnp.ones((1, 8)))
"""

from lorax_fn import analysis
from lorax_fn.accounting import ParamCount, count_params, summary
from lorax_fn.checkpoint import (
    CheckpointDamaged,
    CheckpointInfo,
    LoraCheckpointManager,
    TrainState,
    checkpoint_info,
    restore,
    save,
)
from lorax_fn.conventions import default_layout
from lorax_fn.errors import LoraError
from lorax_fn.factors import Layout, LoraFactors, delta
from lorax_fn.merge import check_fits, dora_norms, init_magnitudes, merge, unmerge
from lorax_fn.multi import (
    AdapterSelection,
    AdapterStack,
    combine,
    multi_lora,
    replace_adapter,
    select_adapters,
    stack_adapters,
    stack_checkpoints,
)
from lorax_fn.optim import lora_labels, optimizer, weight_decay_mask
from lorax_fn.parallel import replicate, shard_batch, unreplicate
from lorax_fn.paths import PathFilter, describe, leaves_with_paths, path_str
from lorax_fn.peft import export_peft, import_peft, presets
from lorax_fn.quant import (
    QuantizedArray,
    bits_per_param,
    dequantize,
    dequantize_base,
    quantize,
    quantize_base,
    quantized_shardings,
)
from lorax_fn.sharding import fsdp_shardings, lora_shardings, put_batch
from lorax_fn.spec import LoraSpec
from lorax_fn.split import LoraTree, split
from lorax_fn.transform import infer_layouts, lora
from lorax_fn.variants import dora
from lorax_fn.version import __version__

__all__ = [
    "AdapterSelection",
    "AdapterStack",
    "CheckpointDamaged",
    "CheckpointInfo",
    "Layout",
    "LoraCheckpointManager",
    "LoraError",
    "LoraFactors",
    "LoraSpec",
    "LoraTree",
    "ParamCount",
    "PathFilter",
    "QuantizedArray",
    "TrainState",
    "__version__",
    "analysis",
    "bits_per_param",
    "check_fits",
    "checkpoint_info",
    "combine",
    "count_params",
    "default_layout",
    "delta",
    "dequantize",
    "dequantize_base",
    "describe",
    "dora",
    "dora_norms",
    "export_peft",
    "fsdp_shardings",
    "import_peft",
    "infer_layouts",
    "init_magnitudes",
    "leaves_with_paths",
    "lora",
    "lora_labels",
    "lora_shardings",
    "merge",
    "multi_lora",
    "optimizer",
    "path_str",
    "presets",
    "put_batch",
    "quantize",
    "quantize_base",
    "quantized_shardings",
    "replace_adapter",
    "replicate",
    "restore",
    "save",
    "select_adapters",
    "shard_batch",
    "split",
    "stack_adapters",
    "stack_checkpoints",
    "summary",
    "unmerge",
    "unreplicate",
    "weight_decay_mask",
]
