"""PEFT's ``bias="all" | "lora_only"`` modes: trained base biases in an adapter's files.

PEFT saves a trained bias under the model's own key: ``<m>.base_layer.bias`` for an
adapted module ``m`` (the LoRA layer wraps the base layer) and ``<m>.bias`` for any other
(``"all"`` only). A LoRA tree holds a trained bias as a full array at its path (e.g.
``LoraSpec(trainable=trainable_biases(...))``), so :func:`lorax_fn.peft.export_peft` and
:func:`lorax_fn.peft.import_peft` convert between the two here.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from lorax_fn.errors import LoraError
from lorax_fn.factors import LoraFactors
from lorax_fn.merge import bias_path
from lorax_fn.quant.quantized import weight_leaves

MODES = ("none", "all", "lora_only")
_PREFIX = "base_model.model."
_WRAPPED = ".base_layer.bias"


def _is_bias(path: str) -> bool:
    return path.split("/")[-1] == "bias"


def bias_mode(lora_tree: Mapping[str, Any], base: Any) -> str:
    """PEFT's ``bias`` mode that the tree's trained bias leaves are, or :class:`LoraError`.

    ``"lora_only"``: exactly the biases ``base`` has for the adapted weights; ``"all"``:
    exactly every bias of ``base``; ``"none"``: no trained bias on an adapted weight (other
    biases are then PEFT's ``modules_to_save``, as before).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lorax_fn import LoraSpec, split
        >>> params = {"q": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)},
        ...           "o": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}
        >>> spec = LoraSpec("q/kernel", rank=2, trainable=["q/bias"])
        >>> bias_mode(split(params, spec, key=jax.random.key(0))[1], params)
        'lora_only'
    """
    trained = {p for p, e in lora_tree.items() if _is_bias(p) and not isinstance(e, LoraFactors)}
    factors = [p for p, e in lora_tree.items() if isinstance(e, LoraFactors)]
    on_adapted = trained & {bias_path(p) for p in factors}
    if not on_adapted:
        return "none"
    if base is None:
        raise LoraError(
            f"{sorted(on_adapted)}: biases of adapted layers are trained; pass base= to "
            "export_peft so that it can tell which of PEFT's bias modes ('all': every bias, "
            "'lora_only': the adapted layers' biases) they are"
        )
    every = {p for p, _ in weight_leaves(base) if _is_bias(p)}
    adapted = every & {bias_path(p) for p in factors}
    if trained == adapted:
        return "lora_only"
    if trained == every:
        return "all"
    raise LoraError(
        f"the trained biases are neither PEFT's bias='lora_only' (the adapted layers' biases: "
        f"add {sorted(adapted - trained)[:5]}, drop {sorted(trained - adapted)[:5]}) nor "
        f"bias='all' (add {sorted(every - trained)[:5]}); PEFT has no way to say another set. "
        "Train one of these sets (lorax_fn.variants.lora_bias.trainable_biases)"
    )


def export_biases(
    mode: str,
    lora_tree: Mapping[str, Any],
    module_of: Callable[[str], str | None],
    adapted: set[str],
    to_save: list[str],
    tensors: dict[str, np.ndarray],
) -> list[str]:
    """Move the trained biases of a ``mode`` adapter from ``modules_to_save`` to PEFT's keys.

    ``tensors`` already holds each as ``<m>.bias``; an adapted module's becomes
    ``<m>.base_layer.bias``. Returns ``to_save`` without the modules that only a bias put
    there. With ``mode="none"``, ``to_save`` as it is.

    Example:
        >>> import numpy as np
        >>> t = {"base_model.model.q.bias": np.zeros(2)}
        >>> export_biases("lora_only", {"q/bias": np.zeros(2)}, lambda p: "q", {"q"}, ["q"], t)
        []
        >>> sorted(t)
        ['base_model.model.q.base_layer.bias']
    """
    if mode == "none":
        return to_save
    left = collections.Counter(to_save)
    for path in sorted(lora_tree):
        if not _is_bias(path) or isinstance(lora_tree[path], LoraFactors):
            continue
        module = module_of(path)
        left[module] -= 1
        if module in adapted:
            tensors[_PREFIX + module + _WRAPPED] = tensors.pop(f"{_PREFIX}{module}.bias")
    return sorted(m for m, n in left.items() if n > 0)


def check_mode(config: Mapping[str, Any], where: Any) -> str:
    """The config's ``bias`` mode; :class:`LoraError` unless one of PEFT's LoRA modes.

    Example:
        >>> check_mode({"bias": "all"}, "adapter_config.json")
        'all'
    """
    mode = config.get("bias", "none")
    if mode not in MODES:
        raise LoraError(f"{where}: bias={mode!r} is not one of PEFT's modes {MODES}")
    return mode


def import_biases(config: Mapping[str, Any], tensors: dict[str, np.ndarray], where: Any) -> None:
    """Rename an adapted module's trained bias ``<m>.base_layer.bias`` to ``<m>.bias``.

    :func:`lorax_fn.peft.import_peft` then reads it, and the other modules' ``<m>.bias``
    (``"all"``), as trained leaves at the base's bias paths.

    Example:
        >>> import numpy as np
        >>> t = {"base_model.model.q.base_layer.bias": np.zeros(2)}
        >>> import_biases({"bias": "lora_only"}, t, "adapter_config.json")
        >>> sorted(t)
        ['base_model.model.q.bias']
    """
    if check_mode(config, where) == "none":
        return  # a saved base_layer.bias is then no trained bias: refused as unmapped
    for key in [k for k in tensors if k.startswith(_PREFIX) and k.endswith(_WRAPPED)]:
        plain = key[: -len(_WRAPPED)] + ".bias"
        if plain in tensors:
            raise LoraError(f"{where}: both {key} and {plain} are saved; which is the bias?")
        tensors[plain] = tensors.pop(key)
