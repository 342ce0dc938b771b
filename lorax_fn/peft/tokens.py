"""PEFT's trainable tokens, both ways: ``trainable_token_indices`` beside LoRA, or alone.

PEFT keeps the trained rows' *values* (``E[indices] + D``), not the delta ``D`` that
:mod:`lorax_fn.tokens` trains, under ``<module>.token_adapter.trainable_tokens_delta``
(``(k, features)``), with ``{"trainable_token_indices": {module: indices}}`` in a LoRA
adapter's config; an adapter of trainable tokens alone is PEFT's ``TRAINABLE_TOKENS``
type (``target_modules``, ``token_indices``; tensors ``<module>.trainable_tokens_delta``).
Both need the base to convert between values and deltas. A tied output head needs nothing
more: PEFT ties its token adapter to the embedding's, as the Flax model reads one table.

Example:
    >>> import jax, jax.numpy as jnp, lorax_fn
    >>> from lorax_fn.tokens import add_trainable_tokens
    >>> params = {"params": {"embed": {"embedding": jnp.ones((10, 4))}}}
    >>> lt = add_trainable_tokens(params, {}, {"params/embed/embedding": [8, 9]})
    >>> _ = export_tokens("tokens_adapter/", lt, params)
    >>> back = import_tokens("tokens_adapter/", params)
    >>> lorax_fn.tokens.token_indices(back["params/embed/embedding"])
    (8, 9)
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from lorax_fn.errors import LoraError
from lorax_fn.factors import LoraTree
from lorax_fn.peft.io import (
    _PREFIX,
    CONFIG_NAME,
    WEIGHTS_NAME,
    NameMap,
    _module_name,
    _write_directory,
)
from lorax_fn.peft.subsets import export_layers, import_layers
from lorax_fn.quant.quantized import QuantizedArray, weight_leaves
from lorax_fn.spec import LoraSpec
from lorax_fn.tokens import is_tokens, token_factors, token_indices, with_rows

WITH_LORA = ".token_adapter.trainable_tokens_delta"
ALONE = ".trainable_tokens_delta"


def _float_table(path: str, leaf: Any) -> np.ndarray:
    if isinstance(leaf, QuantizedArray):
        raise LoraError(
            f"{path}: the embedding is quantized; PEFT's token rows are values, so export "
            "and import need the float table (quantize after importing)"
        )
    return np.asarray(leaf, np.float32)


def _names(lora_tree: Mapping[str, Any], name_map: NameMap | None) -> dict[str, str]:
    names = {}
    for path, entry in lora_tree.items():
        if is_tokens(entry):
            name = _module_name(name_map, path)
            if name is None or "{layer}" in name:
                raise LoraError(f"{path}: name_map gives no single module name ({name!r})")
            names[path] = name
    return names


def _read(directory: Path) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, Any]]:
    try:
        config = json.loads((directory / CONFIG_NAME).read_text())
        with safetensors.safe_open(str(directory / WEIGHTS_NAME), framework="numpy") as f:
            header = f.metadata() or {}
        tensors = safetensors.numpy.load_file(str(directory / WEIGHTS_NAME))
    except (OSError, ValueError, safetensors.SafetensorError) as err:
        raise LoraError(f"cannot read the adapter in {directory}: {err}") from None
    return tensors, header, config


def export_tokens(
    directory: str | os.PathLike,
    lora_tree: Mapping[str, Any],
    base: Any,
    spec: LoraSpec | None = None,
    *,
    name_map: NameMap | None = None,
    overwrite: bool = False,
    **export_kwargs: Any,
) -> Path:
    """Write ``lora_tree`` — trainable tokens and any LoRA beside them — as a PEFT adapter.

    The entries other than trainable tokens are written by
    :func:`lorax_fn.peft.export_peft` (``spec``, ``name_map`` and ``export_kwargs`` go
    to it; layer subsets as :func:`lorax_fn.peft.subsets.export_layers` writes them)
    and the tokens join them as ``trainable_token_indices``; a tree of tokens only
    becomes PEFT's ``TRAINABLE_TOKENS`` adapter, which has one ``token_indices`` for all
    its modules (different ids per embedding are refused). ``base`` gives each table's
    original rows: PEFT stores ``E[indices] + D``, in the table's dtype. Written next
    to ``directory`` and renamed into place, as ``export_peft`` does.

    Example:
        >>> import jax, jax.numpy as jnp, lorax_fn
        >>> from lorax_fn.tokens import add_trainable_tokens
        >>> params = {"params": {"embed": {"embedding": jnp.ones((10, 4))},
        ...                      "fc": {"kernel": jnp.ones((4, 4))}}}
        >>> spec = lorax_fn.LoraSpec("**/fc/kernel", rank=2)
        >>> base, lt = lorax_fn.split(params, spec, key=jax.random.key(0))
        >>> lt = add_trainable_tokens(base, lt, {"params/embed/embedding": [8, 9]})
        >>> path = export_tokens("with_lora/", lt, base, spec)
        >>> import json; json.loads((path / "adapter_config.json").read_text())[
        ...     "trainable_token_indices"]
        {'embed': [8, 9]}
    """
    names = _names(lora_tree, name_map)
    if not names:
        raise LoraError("export_tokens: the tree holds no trainable tokens; use export_peft")
    leaves = dict(weight_leaves(base))
    rows: dict[str, np.ndarray] = {}
    indices: dict[str, list[int]] = {}
    for path, name in names.items():
        entry = lora_tree[path]
        ids = list(token_indices(entry))
        table = _float_table(path, leaves[path])
        if table.shape != entry.weight_shape:
            raise LoraError(
                f"{path}: the adapter is for {entry.weight_shape}, the base {table.shape}"
            )
        value = table[ids] + np.asarray(entry.b, np.float32)
        rows[name] = value.astype(np.dtype(leaves[path].dtype))
        indices[name] = ids
    rest = {p: e for p, e in lora_tree.items() if p not in names}
    if rest:
        with tempfile.TemporaryDirectory() as tmp:
            export_layers(Path(tmp) / "a", rest, spec, name_map=name_map, **export_kwargs)
            tensors, header, config = _read(Path(tmp) / "a")
        tensors |= {f"{_PREFIX}{m}{WITH_LORA}": x for m, x in rows.items()}
        config["trainable_token_indices"] = indices
    else:
        if len({tuple(v) for v in indices.values()}) > 1:
            raise LoraError(
                f"PEFT's TRAINABLE_TOKENS adapter has one token_indices for all its modules; "
                f"these differ: {indices}. Export each embedding's tokens on its own"
            )
        tensors = {f"{_PREFIX}{m}{ALONE}": x for m, x in rows.items()}
        header = {"format": "pt"}
        config = {
            "peft_type": "TRAINABLE_TOKENS",
            "target_modules": sorted(indices),
            "token_indices": next(iter(indices.values())),
            "init_weights": True,
            "inference_mode": True,
            "task_type": None,
            "base_model_name_or_path": None,
            "revision": None,
        }

    def write(into: Path) -> None:
        safetensors.numpy.save_file(tensors, str(into / WEIGHTS_NAME), metadata=header)
        (into / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))

    directory = Path(directory).expanduser().absolute()
    _write_directory(directory, overwrite, write)
    return directory


def _token_modules(config: Mapping[str, Any], where: Path) -> tuple[dict[str, list[int]], str]:
    """``{module pattern: ids}`` and the tensor suffix, from a LoRA or TRAINABLE_TOKENS config."""
    if config.get("peft_type") == "TRAINABLE_TOKENS":
        targets = config.get("target_modules") or []
        targets = [targets] if isinstance(targets, str) else list(targets)
        return {m: list(config["token_indices"]) for m in targets}, ALONE
    chosen = config.get("trainable_token_indices") or {}
    if isinstance(chosen, list):
        # PEFT's list form targets the input embedding, `embed_tokens` by name.
        chosen = {"embed_tokens": chosen}
    if config.get("peft_type") != "LORA":
        raise LoraError(f"{where}: not a PEFT LoRA or TRAINABLE_TOKENS adapter")
    return dict(chosen), WITH_LORA


def import_tokens(
    directory: str | os.PathLike,
    base: Any,
    *,
    name_map: NameMap | None = None,
    **import_kwargs: Any,
) -> LoraTree:
    """Read a PEFT adapter with trainable tokens into a LoRA tree for ``base``.

    Its tokens become :mod:`lorax_fn.tokens` adapters, ``D = rows - E[indices]``
    (float32), and any LoRA beside them is read by :func:`lorax_fn.peft.import_peft`
    (``name_map`` and ``import_kwargs`` go to it; a stack with some of its layers as
    :func:`lorax_fn.peft.subsets.import_layers` reads it). A config key of
    ``trainable_token_indices`` names a module or the end of one (``embed_tokens``
    matches ``model.embed_tokens``), as PEFT matches; one that no base leaf maps to, or
    a module without its rows, is refused.

    Example:
        >>> import jax.numpy as jnp
        >>> from lorax_fn.tokens import add_trainable_tokens
        >>> params = {"params": {"embed": {"embedding": jnp.ones((10, 4))}}}
        >>> lt = add_trainable_tokens(params, {}, {"params/embed/embedding": [3]})
        >>> _ = export_tokens("alone/", lt, params)
        >>> sorted(import_tokens("alone/", params))
        ['params/embed/embedding']
    """
    directory = Path(directory).expanduser().absolute()
    tensors, header, config = _read(directory)
    chosen, suffix = _token_modules(config, directory)
    leaves = dict(weight_leaves(base))
    modules = {}
    for path in leaves:
        name = _module_name(name_map, path)
        if name is not None and "{layer}" not in name:
            modules[name] = path
    tree: LoraTree = {}
    for pattern, ids in chosen.items():
        hits = [m for m in modules if m == pattern or m.endswith(f".{pattern}")]
        if len(hits) != 1:
            raise LoraError(
                f"{directory}: trainable_token_indices module {pattern!r} matches "
                f"{hits or 'no module'} of the base (check name_map)"
            )
        module, path = hits[0], modules[hits[0]]
        key = f"{_PREFIX}{module}{suffix}"
        if key not in tensors:
            raise LoraError(f"{directory / WEIGHTS_NAME}: no {key} for the tokens of {module}")
        table = _float_table(path, leaves[path])
        if table.ndim != 2:
            raise LoraError(f"{path}: trainable tokens need a (vocab, features) table")
        factors = token_factors(*table.shape, ids, path=path)
        rows = np.asarray(tensors.pop(key), np.float32)
        if rows.shape != factors.b.shape:
            raise LoraError(f"{key}: shape {rows.shape}, {len(ids)} tokens need {factors.b.shape}")
        tree[path] = with_rows(factors, jnp.asarray(rows - table[list(ids)]))
    if suffix == WITH_LORA and any(k.startswith(_PREFIX) for k in tensors):
        config = {k: v for k, v in config.items() if k != "trainable_token_indices"}
        with tempfile.TemporaryDirectory() as tmp:
            rest = Path(tmp)
            safetensors.numpy.save_file(tensors, str(rest / WEIGHTS_NAME), metadata=header)
            (rest / CONFIG_NAME).write_text(json.dumps(config))
            lora = import_layers(rest, base, name_map=name_map, **import_kwargs)
        if both := sorted(set(lora) & set(tree)):
            raise LoraError(f"{directory}: {both} carry both LoRA and trainable tokens")
        tree |= lora
    elif tensors:
        raise LoraError(
            f"{directory / WEIGHTS_NAME}: tensors of no token module: {sorted(tensors)}"
        )
    return tree
