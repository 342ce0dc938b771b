"""Hugging Face PEFT adapters: export a LoRA tree to PEFT's files, import one back.

PEFT stores, per adapted ``torch.nn.Linear`` module ``m`` (weight ``[out, in]``),
``base_model.model.<m>.lora_A.weight`` ``[r, in]`` and ``...lora_B.weight``
``[out, r]`` in ``adapter_model.safetensors``, and ``r``/``lora_alpha`` (with
per-module ``rank_pattern``/``alpha_pattern``) in ``adapter_config.json``; the
update is ``(alpha / r) · B·A`` (``alpha / √r`` with ``use_rslora``).

A Flax kernel is ``(in, out)``, so ``lora_A = Aᵀ`` and ``lora_B = Bᵀ``. A multi-axis
kernel (``DenseGeneral``, e.g. attention ``(d, heads, head_dim)``) becomes a Linear with
``in = prod(in axes)`` and ``out = prod(out axes)``, each group flattened in the
weight's own axis order — as ``W.reshape(d, heads * head_dim)`` in PyTorch. A stacked
(``nn.scan``) weight with one batch axis of size L becomes L modules, named through a
``{layer}`` placeholder. ``Embed`` tables (a path ending in ``embedding``, or any
table the name map sends to a transformers embedding module such as ``embed_tokens``
or ``wte``) become ``nn.Embedding`` adapters (``lora_embedding_A``/``lora_embedding_B``).
Convolution kernels, Flax ``(*window, in, out)`` with A ``(*window, in, r)`` and B ``(r, out)``,
become PEFT's ``ConvNd`` adapters: ``lora_A`` is a conv with the base's window,
weight ``(r, in, *window)``, and ``lora_B`` a 1×1 conv, weight ``(out, r, 1, …)``.
An adapter variant (:mod:`lorax_fn.variants`) sets its ``peft_config`` options in the
config and adds each extra array under its ``peft_tensors`` suffix, ``<m><suffix>`` (no
``.weight``). An extra is a column vector, one entry per fan-out index: PEFT's per-row
vector of the ``(out, in)`` weight, so it is ``(out,)`` for a Linear, ``(features,)`` for
an Embedding (whose rows PEFT takes over the vocabulary, as our ``(vocab, features)``
layout does) and ``(1, out, 1, …)`` for a conv.
Mixture-of-experts weights ``(E, in, out)`` (``experts=``) become PEFT's
``target_parameters``: ``lora_A`` ``[r·E, in]``, ``lora_B`` ``[out, r·E]`` per parameter.
Leaves trained in full become ``modules_to_save``. Nothing is pickled: safetensors and
JSON only.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import jax
import numpy as np
import safetensors
import safetensors.numpy

from lorax_fn.conventions import default_layout
from lorax_fn.errors import LoraError
from lorax_fn.factors import Layout, LoraFactors
from lorax_fn.inits import rewrites_base
from lorax_fn.merge import check_fits
from lorax_fn.paths import PathFilter, compile_filter
from lorax_fn.peft import biases
from lorax_fn.quant.quantized import QuantizedArray, weight_leaves
from lorax_fn.spec import LoraSpec
from lorax_fn.subsets import is_subset
from lorax_fn.variants.base import Variant, get, names
from lorax_fn.version import __version__

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_PREFIX = "base_model.model."
# PEFT's copy of an adapted embedding's or lm_head's base weight (save_embedding_layers).
_BASE_WEIGHT = ".base_layer.weight"
# transformers' nn.Embedding modules: PEFT adapts them through lora_embedding_A/B and
# ignores Linear keys there (a warning, not an error), so a table that is not named
# `embedding` in Flax (Tunix: embedder/input_embedding) must be recognised by its target.
_EMBEDDING_MODULES = frozenset(
    {
        "embed_tokens",
        "embed_positions",
        "embed_in",
        "tok_embeddings",
        "wte",
        "wpe",
        "word_embeddings",
        "position_embeddings",
        "token_type_embeddings",
        "shared",
    }
)
_LORA_SUFFIXES = {  # key suffix -> (factor, is_embedding)
    ".lora_A.weight": ("a", False),
    ".lora_B.weight": ("b", False),
    ".lora_embedding_A": ("a", True),
    ".lora_embedding_B": ("b", True),
}
# The PyTorch parameter a Flax leaf of a fully trained module corresponds to.
_TORCH_PARAM = {
    "kernel": "weight",
    "embedding": "weight",
    "scale": "weight",
    "weight": "weight",  # Hugging Face Flax ports name norm scales as PyTorch does
    "bias": "bias",
}
_INITS = {"gaussian": "gaussian", "kaiming_uniform": True}
PARAMETER_ORDER = ("gate_up_proj", "gate_proj", "up_proj", "down_proj")
"""The order Hugging Face's MoE experts modules register their weights in."""

NameMap: TypeAlias = (
    Mapping[str, str] | Sequence[tuple[str | re.Pattern[str], str]] | Callable[[str], str | None]
)
"""How a Flax leaf path names a PyTorch module: a dict ``{path: module}``; regex rules
``[(pattern, template), ...]`` (first full match wins, ``\\1``/``\\g<name>`` expand
groups); or a function ``path -> module | None``. ``None`` (the default) drops a leading
``params/`` and the leaf's own name and joins with dots: ``params/h_0/attn/c_attn/kernel``
→ ``h_0.attn.c_attn``. A stacked weight's name needs a ``{layer}`` placeholder:
``(r"params/layers/(\\w+)/kernel", r"model.layers.{layer}.\\1")``."""


def _module_name(name_map: NameMap | None, path: str) -> str | None:
    if name_map is None:
        parts = path.split("/")
        parts = parts[1:] if parts[0] == "params" else parts
        return ".".join(parts[:-1]) or None
    if isinstance(name_map, Mapping):
        return name_map.get(path)
    if callable(name_map):
        return name_map(path)
    for pattern, template in name_map:
        try:
            if m := re.fullmatch(pattern, path):
                return m.expand(template)
        except re.error as err:
            raise LoraError(
                f"name_map rule ({pattern!r}, {template!r}) is not a valid regex rule: {err}"
            ) from None
    return None


def _layer_names(name: str, path: str, layers: int | None) -> list[str]:
    """The module name per layer of a stacked weight, or ``[name]`` for a plain one."""
    has_placeholder = "{layer}" in name
    if layers is None and has_placeholder:
        raise LoraError(
            f"{path}: name_map gives {name!r} with a {{layer}} placeholder, but the "
            "weight is not stacked"
        )
    if layers is not None and not has_placeholder:
        raise LoraError(
            f"{path}: a stack of {layers} weights needs one module name per layer; "
            f"name_map gives {name!r} without a {{layer}} placeholder"
        )
    return [name] if layers is None else [name.replace("{layer}", str(i)) for i in range(layers)]


def _stack_size(path: str, layout: Layout, shape: Sequence[int]) -> int | None:
    if len(layout.batch_axes) > 1:
        raise LoraError(
            f"{path}: PEFT has one module per matrix; {layout} has "
            f"{len(layout.batch_axes)} batch axes (at most 1 is supported)"
        )
    return shape[layout.batch_axes[0]] if layout.batch_axes else None


def _to_matrix(x: np.ndarray, axes: Sequence[int], r_first: bool) -> np.ndarray:
    """Factor block (group axes in ``axes`` order, plus r) → ``[r, group]`` or ``[group, r]``.

    The group is flattened in the weight's own (ascending) axis order, as PyTorch would.
    """
    order = np.argsort(axes)
    if r_first:  # x: (r, *group)
        x = np.transpose(x, [0, *(1 + order)])
        return x.reshape(x.shape[0], -1)
    x = np.transpose(x, [*order, len(axes)])  # x: (*group, r)
    return x.reshape(-1, x.shape[-1])


def _from_matrix(
    m: np.ndarray, axes: Sequence[int], dims: Sequence[int], r_first: bool
) -> np.ndarray:
    """Inverse of :func:`_to_matrix`; ``dims`` are the group's sizes in ``axes`` order."""
    order = np.argsort(axes)
    sorted_dims = [dims[i] for i in order]
    inverse = np.argsort(order)
    if r_first:
        x = m.reshape(m.shape[0], *sorted_dims)
        return np.transpose(x, [0, *(1 + inverse)])
    x = m.reshape(*sorted_dims, m.shape[-1])
    return np.transpose(x, [*inverse, len(axes)])


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _most_common(values: list[Any]) -> Any:
    counts = collections.Counter(values)
    return max(counts, key=lambda v: (counts[v], -v))


def _conv_layout(shape: Sequence[int], batch_axes: tuple[int, ...] = ()) -> Layout | None:
    """Flax's convolution layout ``(*window, in, out)`` (PEFT's Conv1d/2d/3d), if it fits."""
    rest = [a for a in range(len(shape)) if a not in batch_axes]
    if not 3 <= len(rest) <= 5:
        return None
    return Layout(tuple(rest[:-1]), (rest[-1],), batch_axes)


def _conv_to_peft(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A ``(*window, in, r)``, B ``(r, out)`` → lora_A ``(r, in, *window)``, B ``(out, r, 1…)``."""
    n = a.ndim
    lora_a = np.transpose(a, [n - 1, n - 2, *range(n - 2)])
    return lora_a, b.T.reshape(b.shape[1], b.shape[0], *([1] * (n - 2)))


def _conv_from_peft(lora_a: np.ndarray, lora_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`_conv_to_peft`."""
    n = lora_a.ndim
    a = np.transpose(lora_a, [*range(2, n), 1, 0])
    return a, lora_b.reshape(lora_b.shape[0], lora_b.shape[1]).T


def _as_predicates(filters: PathFilter | Sequence[PathFilter]) -> list[Callable[[str, Any], bool]]:
    if isinstance(filters, str | re.Pattern) or callable(filters):
        filters = [filters]
    return [compile_filter(f) for f in filters]


def _write_directory(directory: Path, overwrite: bool, write: Callable[[Path], None]) -> None:
    """Write the adapter next to ``directory`` and rename it into place when complete.

    As with :func:`lorax_fn.save`, existing content is replaced only with
    ``overwrite=True``, and a crash keeps either the old adapter or the new one, never
    half of each; an existing empty directory (nothing to lose) is written into.
    """
    exists = directory.exists()
    if exists and not directory.is_dir():
        raise LoraError(f"{directory} exists and is not a directory")
    occupied = exists and any(directory.iterdir())
    if occupied and not overwrite:
        raise LoraError(f"{directory} already exists; pass overwrite=True to replace it")
    if occupied and not (directory / CONFIG_NAME).is_file():
        raise LoraError(
            f"refusing to overwrite {directory}: it has no {CONFIG_NAME}, so it is not a "
            "PEFT adapter"
        )
    new = directory.with_name(f".{directory.name}.lorax-new")
    old = directory.with_name(f".{directory.name}.lorax-old")
    directory.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(new, ignore_errors=True)  # left by an export killed before its rename
    new.mkdir()
    try:
        write(new)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    if occupied:
        # Two renames: POSIX cannot swap directories atomically; a kill between them
        # leaves the previous adapter complete at `old`.
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
        new.rename(directory)
        shutil.rmtree(old)
    else:
        new.replace(directory)  # onto a missing or empty directory: one atomic rename


def export_peft(
    directory: str | os.PathLike,
    lora_tree: Mapping[str, Any],
    spec: LoraSpec | None = None,
    *,
    name_map: NameMap | None = None,
    conv: PathFilter | Sequence[PathFilter] = (),
    experts: PathFilter | Sequence[PathFilter] = (),
    parameter_order: Sequence[str] = PARAMETER_ORDER,
    fan_in_fan_out: bool = False,
    overwrite: bool = False,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    base: Any = None,
) -> Path:
    """Write ``lora_tree`` as a Hugging Face PEFT LoRA adapter into ``directory``.

    Per module, ``r`` is the factors' rank and ``alpha = scale·r`` (``scale·√r`` for an
    rsLoRA ``spec``); the most common values become ``r``/``lora_alpha`` and the others
    go to ``rank_pattern``/``alpha_pattern`` (keys are escaped full module names, so each
    matches exactly one module). ``spec`` supplies ``use_rslora``, ``lora_dropout`` and
    ``init_lora_weights``. The safetensors header also records each entry's exact scale
    and layout, so :func:`import_peft` restores the tree exactly. Factors keep their
    dtype; cast the tree first for a bfloat16 file.

    A tree of an adapter variant (``LoraSpec(variant=...)``, :mod:`lorax_fn.variants`) is
    written with the variant's ``peft_config`` options and each module's extra arrays
    under the variant's ``peft_tensors`` suffixes. PEFT's options hold for the whole
    adapter, so a tree mixing variants is refused, naming them, as is a variant PEFT has
    no adapter for (``peft_config = None``).

    ``conv`` are path filters of the convolution kernels (Flax ``(*window, in, out)``,
    1 to 3 window axes): they are written in PEFT's ``Conv1d``/``Conv2d``/``Conv3d``
    format. A kernel's shape cannot tell a convolution from a multi-axis ``Dense``, so
    an unlisted kernel is written as a ``Linear`` over its flattened fan-in, which PEFT
    refuses to load into a conv (a size mismatch). ``fan_in_fan_out=True`` is PEFT's flag
    for modules whose PyTorch weight is ``(in, out)``, like GPT-2's ``Conv1D``: it is
    written to the config and kernels trained in full (``modules_to_save``) are then
    stored as they are, not transposed; LoRA factors are stored the same either way.

    ``experts`` are path filters of mixture-of-experts weights, one adapter per expert
    (layout: one in, one out and one expert batch axis, e.g. ``(E, in, out)`` from
    :func:`lorax_fn.infer_layouts` on ``lax.ragged_dot``; a leading layer axis more for a
    stack, named through ``{layer}``). They are written as PEFT's ``target_parameters``
    (Hugging Face MoE models keep experts as ``nn.Parameter`` s, not ``Linear`` s): for
    them ``name_map`` gives the PyTorch *parameter* name ``<module>.<parameter>`` (the
    default keeps the leaf: ``params/moe/gate_up_proj`` → ``moe.gate_up_proj``).
    PEFT's files are ``lora_A`` ``[r·E, in]`` (expert-major rows) and ``lora_B``
    ``[out, r·E]`` (rank-major columns) whether the PyTorch parameter is ``(E, out, in)``
    or, with ``is_transposed``, ``(E, in, out)``. PEFT wraps each targeted parameter of a
    module around the previous one in the order the module registered them, so the
    factors of the ``k``-th of ``n`` lie under ``n-1-k`` ``.base_layer`` s;
    ``parameter_order`` is that order (by default Hugging Face's: ``gate_up_proj``, …,
    ``down_proj``) and must name every parameter of a module with more than one. As
    PEFT refuses them there, experts refuse dropout, ``fan_in_fan_out`` and adapter variants.

    Trained biases of adapted layers are PEFT's ``bias`` modes (:mod:`lorax_fn.peft.biases`):
    with ``base`` given, ``"lora_only"`` if they are exactly the adapted layers' biases,
    ``"all"`` if every bias of ``base`` is trained, else refused, naming them.

    An existing non-empty ``directory`` is refused unless ``overwrite=True`` (and it
    holds an ``adapter_config.json``); the new adapter is written completely next to it
    and then renamed into place, so a crash never leaves a half-written one.

    Example:
        >>> import json
        >>> import jax, jax.numpy as jnp, lorax_fn
        >>> params = {"params": {"h_0": {"attn": {"c_attn": {"kernel": jnp.ones((8, 24))}}}}}
        >>> spec = lorax_fn.LoraSpec(targets="**/c_attn/kernel", rank=2, alpha=4.0)
        >>> base, lt = lorax_fn.split(params, spec, key=jax.random.key(0))
        >>> rules = [(r"params/h_(\\d+)/attn/c_attn/kernel", r"transformer.h.\\1.attn.c_attn")]
        >>> out = lorax_fn.export_peft("adapter/", lt, spec, name_map=rules)
        >>> sorted(file.name for file in out.iterdir())
        ['adapter_config.json', 'adapter_model.safetensors']
        >>> config = json.loads((out / "adapter_config.json").read_text())
        >>> config["target_modules"], config["r"], config["lora_alpha"]
        (['transformer.h.0.attn.c_attn'], 2, 4)
    """
    if subsets := [p for p, e in lora_tree.items() if is_subset(e)]:
        raise LoraError(
            f"{_few(subsets)}: layer subsets are written one module per chosen layer by "
            "lorax_fn.peft.subsets.export_layers (same arguments)"
        )
    variant = _tree_variant(lora_tree)
    is_conv = _as_predicates(conv)
    is_expert = _as_predicates(experts)
    if spec is not None and rewrites_base(spec.init):
        title = "a PiSSA" if spec.init == "pissa" else f"an init={spec.init!r}"
        raise LoraError(
            f"{title} adapter is relative to the residual base that split returned, but PEFT "
            "applies adapters to the original weights; export lorax_fn.merge(base, lt) "
            "instead, or pass a spec with another init if the PyTorch side uses the residual"
        )
    rslora = spec is not None and spec.scaling == "rslora"
    tensors: dict[str, np.ndarray] = {}
    modules: dict[str, tuple[int, float]] = {}  # module -> (r, alpha)
    parameters: dict[str, tuple[int, float]] = {}  # target parameter -> (r, alpha)
    expert_tensors: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # parameter -> lora_A/B
    to_save: list[str] = []
    exact: dict[str, Any] = {}
    for path in sorted(lora_tree):
        entry = lora_tree[path]
        expert = isinstance(entry, LoraFactors) and any(m(path, entry) for m in is_expert)
        name = _parameter_name(name_map, path) if expert else _module_name(name_map, path)
        if name is None:
            raise LoraError(f"{path}: name_map gives no PyTorch module name for this path")
        if not isinstance(entry, LoraFactors):
            to_save.append(_export_full(tensors, path, name, np.asarray(entry), fan_in_fan_out))
            continue
        layout, shape = entry.layout, entry.weight_shape
        r = entry.rank
        alpha = entry.scale * (math.sqrt(r) if rslora else r)
        exact[path] = {"scale": entry.scale, "dropout": entry.dropout, "layout": layout.to_json()}
        if expert:
            _refuse_for_experts(path, variant, entry.dropout, spec, fan_in_fan_out)
            layers = _expert_axes(path, layout, shape)[0]
            exact[path]["modules"] = names = _layer_names(name, path, layers)
            a, b = np.asarray(entry.a), np.asarray(entry.b)
            for i, param in enumerate(names):
                if param in parameters:
                    raise LoraError(f"{path}: parameter name {param!r} is used twice")
                parameters[param] = (r, alpha)
                expert_tensors[param] = _experts_to_peft(
                    *((a, b) if layers is None else (a[i], b[i]))
                )
            continue
        layers = _stack_size(path, layout, shape)
        names = _layer_names(name, path, layers)
        embedding = (
            path.split("/")[-1] == "embedding" or name.rsplit(".", 1)[-1] in _EMBEDDING_MODULES
        )
        if embedding and (layout.in_axes, layout.out_axes, layers) != ((0,), (1,), None):
            raise LoraError(
                f"{path}: an embedding table exports only as (vocab, features), "
                f"got {layout} for shape {shape}"
            )
        convolution = any(match(path, entry) for match in is_conv)
        if convolution and layout != _conv_layout(shape, layout.batch_axes):
            raise LoraError(
                f"{path}: conv= names it, but {layout} for shape {shape} is not a Flax "
                "convolution kernel (*window, in, out) with 1 to 3 window axes"
            )
        suffix_a, suffix_b = (
            (".lora_embedding_A", ".lora_embedding_B")
            if embedding
            else (".lora_A.weight", ".lora_B.weight")
        )
        a, b = np.asarray(entry.a), np.asarray(entry.b)
        for i, module in enumerate(names):
            a_i, b_i = (a, b) if layers is None else (a[i], b[i])
            if convolution:
                lora_a, lora_b = _conv_to_peft(a_i, b_i)
            else:  # lora_A = Aᵀ [r, in]; lora_B = Bᵀ [out, r].
                lora_a = _to_matrix(a_i, layout.in_axes, r_first=False).T
                lora_b = _to_matrix(b_i, layout.out_axes, r_first=True).T
            tensors[_PREFIX + module + suffix_a] = np.ascontiguousarray(lora_a)
            tensors[_PREFIX + module + suffix_b] = np.ascontiguousarray(lora_b)
            for extra in variant.extras:
                x = np.asarray(entry.extras[extra])
                x_i = x if layers is None else x[i]
                tensors[_PREFIX + module + variant.peft_tensors[extra]] = _column_to_peft(
                    x_i, layout, a_i.ndim if convolution else None
                )
            if module in modules:
                raise LoraError(f"{path}: module name {module!r} is used twice")
            modules[module] = (r, alpha)
        exact[path]["modules"] = names
    if not modules and not parameters:
        raise LoraError("the LoRA tree has no factors to export")
    mode = biases.bias_mode(lora_tree, base)
    module_of = functools.partial(_module_name, name_map)
    to_save = biases.export_biases(mode, lora_tree, module_of, set(modules), to_save, tensors)
    if both := sorted(set(modules) & set(to_save)):
        raise LoraError(f"modules both adapted and trained in full: {both}; PEFT allows one")
    prefixes = _wrapper_prefixes(parameters, parameter_order)
    holders = {param.rpartition(".")[0] for param in parameters}
    if both := sorted(holders & (set(modules) | set(to_save))):
        raise LoraError(
            f"modules both holding target parameters and adapted or trained in full: {both}"
        )
    for param, (lora_a, lora_b) in expert_tensors.items():
        tensors[_PREFIX + prefixes[param] + ".lora_A.weight"] = np.ascontiguousarray(lora_a)
        tensors[_PREFIX + prefixes[param] + ".lora_B.weight"] = np.ascontiguousarray(lora_b)
    ranked = modules | parameters  # PEFT matches patterns on module and parameter names alike
    r0 = _most_common([r for r, _ in ranked.values()])
    alpha0 = _most_common([alpha for _, alpha in ranked.values()])
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r0,
        "lora_alpha": _number(alpha0),
        "target_modules": sorted(modules),
        "target_parameters": sorted(parameters) or None,
        "exclude_modules": None,
        "rank_pattern": {re.escape(m): r for m, (r, _) in ranked.items() if r != r0},
        "alpha_pattern": {re.escape(m): _number(a) for m, (_, a) in ranked.items() if a != alpha0},
        "use_rslora": rslora,
        "lora_dropout": 0.0 if spec is None else spec.dropout,
        "bias": mode,
        "fan_in_fan_out": bool(fan_in_fan_out),
        # PEFT only inits the layers it then loads this adapter into: any init that
        # leaves the base as it is reads the same.
        "init_lora_weights": True if spec is None else _INITS.get(spec.init, True),
        "modules_to_save": sorted(set(to_save)) or None,
        "lora_bias": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        **_peft_options(variant),
    }
    if (read_as := _config_variant(config, "the exported config")).name != variant.name:
        raise LoraError(
            f"adapter variant {variant.name!r}: its PEFT options {variant.peft_config} do not "
            f"tell it apart in the config; import_peft would read it as {read_as.name!r}"
        )
    directory = Path(directory).expanduser().absolute()
    header = {
        "format": "pt",
        "lorax_fn": json.dumps({"version": __version__, "entries": exact}),
    }

    def write(into: Path) -> None:
        safetensors.numpy.save_file(tensors, str(into / WEIGHTS_NAME), metadata=header)
        (into / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))

    _write_directory(directory, overwrite, write)
    return directory


def _parameter_name(name_map: NameMap | None, path: str) -> str | None:
    """The PyTorch parameter an expert weight is: ``name_map``'s, or the path as dots."""
    if name_map is None:
        parts = path.split("/")
        return ".".join(parts[1:] if parts[0] == "params" else parts)
    return _module_name(name_map, path)


def _expert_axes(path: str, layout: Layout, shape: Sequence[int]) -> tuple[int | None, int]:
    """``(layers or None, experts)`` of a weight exported as PEFT target parameters."""
    if (
        len(layout.in_axes) != 1
        or len(layout.out_axes) != 1
        or len(layout.batch_axes) not in (1, 2)
    ):
        raise LoraError(
            f"{path}: PEFT's target_parameters take a 3-D (experts, in, out) weight: one "
            "expert batch axis (after an optional layer axis), one in and one out axis; "
            f"got {layout} for shape {tuple(shape)}"
        )
    layers = shape[layout.batch_axes[0]] if len(layout.batch_axes) == 2 else None
    return layers, shape[layout.batch_axes[-1]]


def _expert_layout(shape: Sequence[int], stacked: bool) -> Layout | None:
    """The default layout of an expert weight: ``([L,] E, in, out)``, as ``ragged_dot``."""
    nb = 2 if stacked else 1
    if len(shape) != nb + 2:
        return None
    return Layout((nb,), (nb + 1,), tuple(range(nb)))


def _experts_to_peft(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A ``(E, in, r)``, B ``(E, r, out)`` → PEFT's ``[r·E, in]`` (row ``e·r + k`` is
    ``A[e][:, k]``) and ``[out, r·E]`` (column ``k·E + e`` is ``B[e][k]``)."""
    e, _, r = a.shape
    return a.transpose(0, 2, 1).reshape(e * r, -1), b.transpose(2, 1, 0).reshape(-1, r * e)


def _experts_from_peft(
    lora_a: np.ndarray, lora_b: np.ndarray, experts: int
) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`_experts_to_peft`."""
    r = lora_a.shape[0] // experts
    a = lora_a.reshape(experts, r, -1).transpose(0, 2, 1)
    return a, lora_b.reshape(-1, r, experts).transpose(2, 1, 0)


def _wrapper_prefixes(names: Iterable[str], order: Sequence[str]) -> dict[str, str]:
    """Per target parameter ``<module>.<param>``, the module name its factors are stored under.

    PEFT wraps the targeted parameters of one module in the order the module registered
    them, each ``ParamWrapper`` around the previous: the ``k``-th of ``n`` lies under
    ``n-1-k`` ``.base_layer`` s.
    """
    by_holder: dict[str, list[str]] = collections.defaultdict(list)
    for name in names:
        holder, _, param = name.rpartition(".")
        if not holder:
            raise LoraError(
                f"{name!r}: PEFT targets parameters of submodules only; name_map must give "
                "<module>.<parameter> for an expert weight"
            )
        by_holder[holder].append(param)
    prefixes = {}
    for holder, params in by_holder.items():
        if len(params) > 1:
            if unknown := sorted(set(params) - set(order)):
                raise LoraError(
                    f"{holder}: PEFT nests the wrappers of the targeted parameters "
                    f"{sorted(params)} in the order the module registered them; "
                    f"parameter_order {tuple(order)} does not place {unknown}"
                )
            params = sorted(params, key=list(order).index)
        for k, param in enumerate(params):
            prefixes[f"{holder}.{param}"] = holder + ".base_layer" * (len(params) - 1 - k)
    return prefixes


def _refuse_for_experts(
    path: str, variant: Variant, dropout: float, spec: LoraSpec | None, fan_in_fan_out: bool
) -> None:
    """What PEFT's ``ParamWrapper`` refuses: dropout, ``fan_in_fan_out``, adapter variants."""
    dropout = max(dropout, 0.0 if spec is None else spec.dropout)
    for bad, what in (
        (dropout != 0, f"lora_dropout={dropout:g} (it cannot factor x out of dropout(x))"),
        (fan_in_fan_out, "fan_in_fan_out=True"),
        (bool(variant.extras or variant.peft_config), variant.title),
    ):
        if bad:
            raise LoraError(f"{path}: PEFT's target_parameters (experts=) refuse {what}")


def _registered() -> list[Variant]:
    return [get(name) for name in names()]


def _few(paths: list[str]) -> str:
    return f"{paths[:5]}{' …' if len(paths) > 5 else ''}"


def _tree_variant(lora_tree: Mapping[str, Any]) -> Variant:
    """The variant of the tree's factor entries, if PEFT can hold it; else :class:`LoraError`.

    PEFT's options select one variant for the whole adapter: a file holding two would
    give the entries of one the other's arrays on load (or be refused for lacking them).
    """
    by_variant: dict[str, list[str]] = collections.defaultdict(list)
    for path in sorted(lora_tree):
        if isinstance(entry := lora_tree[path], LoraFactors):
            by_variant[entry.variant].append(path)
    variants = {name: get(name) for name in by_variant}
    for name, variant in variants.items():
        if variant.peft_config is None:
            # A variant PEFT keeps outside LoRA's modules says which writer it needs.
            hint = getattr(variant, "peft_writer", None)
            raise LoraError(
                f"{_few(by_variant[name])}: PEFT has no adapter of variant {name!r}; "
                + (hint or "save the tree with lorax_fn.checkpoint, or merge it into the base")
            )
        if missing := [e for e in variant.extras if e not in variant.peft_tensors]:
            raise LoraError(
                f"adapter variant {name!r} gives no PEFT tensor name (peft_tensors) for its "
                f"extra arrays {missing}"
            )
    if len(variants) > 1:
        plain = Variant.name
        order = sorted(variants, key=lambda name: (name == plain, name))  # plain LoRA last
        keys = sorted({k for v in variants.values() for k in v.peft_config})
        mixed = " with ".join(
            f"{'plain ' if name == plain else ''}{variants[name].title} entries "
            f"{_few(by_variant[name])}"
            for name in order
        )
        raise LoraError(
            f"PEFT's {', '.join(keys) or 'adapter config'} "
            f"{'holds' if len(keys) < 2 else 'hold'} for every module of an adapter, but "
            f"this LoRA tree mixes {mixed}; export them as separate adapters"
        )
    return variants.popitem()[1] if variants else get(Variant.name)


def _off(on: Any) -> Any:
    # PEFT's default of a variant option: a switch is off, any other setting unset.
    return False if on is True else None


def _peft_options(variant: Variant) -> dict[str, Any]:
    """The config's variant options: ``variant``'s, and other variants' switches off.

    PEFT writes every option it has, a variant's switch off included; writing the
    registered variants' switches the same way keeps our files like PEFT's.
    """
    off = {
        key: False
        for other in _registered()
        for key, on in (other.peft_config or {}).items()
        if on is True
    }
    return off | (variant.peft_config or {})


def _config_variant(config: Mapping[str, Any], where: Any) -> Variant:
    """The registered variant whose PEFT options ``config`` sets; plain LoRA if none does.

    Of several that match, one whose options include the others' (e.g. a switch plus a
    setting) is the one meant; matches that do not nest are :class:`LoraError`.
    """
    matches = [
        v
        for v in _registered()
        if v.peft_config and all(config.get(k) == on for k, on in v.peft_config.items())
    ]
    best = [v for v in matches if not any(set(v.peft_config) < set(w.peft_config) for w in matches)]
    if len(best) > 1:
        raise LoraError(
            f"{where}: its options match the PEFT options of several adapter variants "
            f"{sorted(v.name for v in best)}: register only the one the adapter is"
        )
    return best[0] if best else get(Variant.name)


def _options(config: Mapping[str, Any], variants: Iterable[Variant]) -> str:
    """The ``variants``' PEFT options as ``config`` has them, e.g. ``key=False``."""
    keys = {k: on for v in variants for k, on in (v.peft_config or {}).items()}
    return ", ".join(f"{k}={config.get(k, _off(on))!r}" for k, on in keys.items())


def _column_to_peft(x: np.ndarray, layout: Layout, conv_ndim: int | None) -> np.ndarray:
    """A column vector ``(*out)`` as PEFT stores it: ``(out,)``, a conv's ``(1, out, 1…)``."""
    if conv_ndim is not None:
        return np.ascontiguousarray(x.reshape(1, -1, *([1] * (conv_ndim - 2))))
    return np.ascontiguousarray(_to_matrix(x[None], layout.out_axes, r_first=True)[0])


def _export_full(
    tensors: dict[str, np.ndarray], path: str, module: str, x: np.ndarray, fan_in_fan_out: bool
) -> str:
    """Add a fully trained leaf as a ``modules_to_save`` tensor; return its module."""
    leaf = path.split("/")[-1]
    if leaf not in _TORCH_PARAM or x.ndim != (2 if leaf in ("kernel", "embedding") else 1):
        raise LoraError(
            f"{path}: cannot export a fully trained {leaf!r} leaf of shape "
            f"{x.shape} to PEFT (supported: 2-D kernel/embedding, 1-D bias/scale/weight)"
        )
    key = f"{_PREFIX}{module}.{_TORCH_PARAM[leaf]}"
    if key in tensors:
        raise LoraError(f"{path}: {key} is written twice; check name_map")
    tensors[key] = np.ascontiguousarray(x.T if leaf == "kernel" and not fan_in_fan_out else x)
    return module


def _peft_alpha(config: Mapping[str, Any], module: str) -> float:
    # PEFT's own rule (peft.utils.other.get_pattern_key): first key matching a suffix.
    for pattern, alpha in config.get("alpha_pattern", {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(alpha)
    return float(config["lora_alpha"])


def _read_config(directory: Path) -> dict[str, Any]:
    try:
        config = json.loads((directory / CONFIG_NAME).read_text())
    except (OSError, ValueError) as err:
        raise LoraError(f"cannot read {directory / CONFIG_NAME}: {err}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise LoraError(
            f"{directory / CONFIG_NAME}: not a PEFT LoRA adapter (peft_type "
            f"{config.get('peft_type') if isinstance(config, dict) else config!r})"
        )
    biases.check_mode(config, directory / CONFIG_NAME)  # before the tensors are read
    if "lora_alpha" not in config:
        raise LoraError(f"{directory / CONFIG_NAME}: no lora_alpha")
    return config


def _read_tensors(directory: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    file = directory / WEIGHTS_NAME
    try:
        with safetensors.safe_open(str(file), framework="numpy") as f:
            header = f.metadata() or {}
        tensors = safetensors.numpy.load_file(str(file))
        exact = json.loads(header["lorax_fn"])["entries"] if "lorax_fn" in header else {}
    except (OSError, ValueError, KeyError, TypeError, safetensors.SafetensorError) as err:
        raise LoraError(f"cannot read {file}: {type(err).__name__}: {err}") from None
    return tensors, exact


def import_peft(
    directory: str | os.PathLike,
    base: Any,
    *,
    name_map: NameMap | None = None,
    layouts: Mapping[str, Layout] | None = None,
    fan_in_fan_out: bool | None = None,
    parameter_order: Sequence[str] = PARAMETER_ORDER,
) -> dict[str, Any]:
    """Read a PEFT LoRA adapter into a LoRA tree for ``base``, checked against it.

    Module names map back to Flax paths through the same ``name_map`` as
    :func:`export_peft` (evaluated on the base's leaves). Factor layouts come from the
    file when lorax_fn wrote it, else from ``layouts`` or
    :func:`lorax_fn.conventions.default_layout`; a stacked weight needs all of its layers,
    with equal rank and scale. ``scale`` is ``alpha / r`` (``alpha / √r`` with
    ``use_rslora``) per module. PEFT's conv format (``lora_A`` ``(r, in, *window)``) is
    read as a Flax ``(*window, in, out)`` kernel.
    ``modules_to_save`` tensors become fully trained leaves, in the base's dtype;
    kernels among them are transposed from PyTorch's ``(out, in)`` unless
    ``fan_in_fan_out`` (default: the config's) says they are stored ``(in, out)``. Refused with
    :class:`LoraError` naming the modules: anything that does not fit ``base``, an
    unmapped module, a missing layer. PEFT's ``bias="all" | "lora_only"`` biases become
    trained leaves at the base's bias paths (:mod:`lorax_fn.peft.biases`). The
    config decides the adapter variant (:mod:`lorax_fn.variants`; ``lora_bias: true``:
    :mod:`~lorax_fn.variants.lora_bias`): the registered one whose ``peft_config`` options it sets,
    else plain LoRA. Every module then needs each of the variant's ``peft_tensors``, of
    PEFT's shape (``(out,)``, a conv's ``(1, out, 1, …)``), and has no other variant's.

    An adapter on an embedding or ``lm_head`` is saved by PEFT (``save_embedding_layers=
    "auto"``) with a copy of that module's base weight, ``<module>.base_layer.weight``,
    which PEFT loads over the model's own weight. A LoRA tree holds no base weights, so
    the copy is checked against ``base`` instead: equal up to rounding into the coarser of
    the two dtypes, it is skipped; different (another base, a resized vocabulary), it is
    refused, naming it — import with the base the adapter was trained on. A quantized
    leaf cannot be compared: import on the float base, then :func:`lorax_fn.quantize_base`.

    The config's ``target_parameters`` (mixture-of-experts weights; see
    :func:`export_peft`'s ``experts``) are the base leaves whose ``name_map`` name, a
    PyTorch parameter name, is one of them or ends with ``.<one of them>``, as PEFT
    matches; without lorax_fn's header their layout is ``layouts``' or ``([L,] E, in,
    out)``, and ``parameter_order`` says how PEFT nested the wrappers of a module.

    Example:
        >>> import jax, jax.numpy as jnp, lorax_fn
        >>> params = {"params": {"fc": {"kernel": jnp.ones((8, 4))}}}
        >>> spec = lorax_fn.LoraSpec(targets="**/kernel", rank=2)
        >>> base, lt = lorax_fn.split(params, spec, key=jax.random.key(0))
        >>> lt = jax.tree.map(lambda x: x + 0.5, lt)  # as if trained: B is no longer zero
        >>> _ = lorax_fn.export_peft("adapter/", lt, spec)
        >>> back = lorax_fn.import_peft("adapter/", base)
        >>> got, want = back["params/fc/kernel"], lt["params/fc/kernel"]
        >>> bool(jnp.array_equal(got.a, want.a) and jnp.array_equal(got.b, want.b))
        True
        >>> got.scale == want.scale, got.layout == want.layout
        (True, True)
        >>> x = jnp.arange(24.0).reshape(3, 8)
        >>> y = lorax_fn.lora(lambda p, x: x @ p["params"]["fc"]["kernel"])(base, back, x)
        >>> bool(jnp.allclose(y, x @ lorax_fn.merge(base, lt)["params"]["fc"]["kernel"]))
        True
    """
    directory = Path(directory)
    config = _read_config(directory)
    if config.get("trainable_token_indices"):
        raise LoraError(
            f"{directory / CONFIG_NAME}: the adapter trains token rows "
            "(trainable_token_indices): read it with lorax_fn.peft.tokens.import_tokens(directory, "
            "base, ...), which reads its LoRA modules too"
        )
    variant = _config_variant(config, directory / CONFIG_NAME)
    tensors, exact = _read_tensors(directory)
    biases.import_biases(config, tensors, directory / CONFIG_NAME)  # bias="all"|"lora_only"
    rslora = bool(config.get("use_rslora", False))
    if fan_in_fan_out is None:
        fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    leaves = dict(weight_leaves(base))
    shapes = {p: tuple(np.shape(x)) for p, x in leaves.items()}
    layouts = dict(layouts or {})
    conv_modules = {
        key[len(_PREFIX) : -len(".lora_A.weight")]
        for key, x in tensors.items()
        if key.startswith(_PREFIX) and key.endswith(".lora_A.weight") and x.ndim > 2
    }

    # Every name a base leaf could have: for factors, the module (per layer) with the name
    # PEFT matches patterns on and the number of experts; for full leaves, module.param.
    factor_names: dict[str, tuple[str, int | None, Layout, str, int | None]] = {}
    full_names: dict[str, str] = {}
    targets = list(config.get("target_parameters") or [])
    expert_names: dict[str, tuple[str, int | None, Layout, int]] = {}
    for path, leaf in leaves.items():
        param = _parameter_name(name_map, path) if targets else None
        if param is not None and _targeted(param.replace("{layer}", "0"), targets):
            shape = tuple(np.shape(leaf))
            stacked = "{layer}" in param
            if path in exact:
                layout = Layout(**exact[path]["layout"])
            else:
                layout = layouts.get(path) or _expert_layout(shape, stacked)
            if layout is None:
                raise LoraError(
                    f"{path}: {param} is one of the config's target_parameters, but shape "
                    f"{shape} is not ({'L, ' if stacked else ''}E, in, out); pass layouts="
                )
            layers, experts = _expert_axes(path, layout, shape)
            for i, name in enumerate(_layer_names(param, path, layers)):
                expert_names[name] = (path, None if layers is None else i, layout, experts)
            continue
        name = _module_name(name_map, path)
        if name is None:
            continue
        shape = tuple(np.shape(leaf))
        if path.split("/")[-1] in _TORCH_PARAM and "{layer}" not in name:
            full_names[f"{name}.{_TORCH_PARAM[path.split('/')[-1]]}"] = path
        stacked = "{layer}" in name
        if path in exact:
            layout = Layout(**exact[path]["layout"])
        elif name.replace("{layer}", "0") in conv_modules:
            # PEFT's conv format says what the kernel is: Flax (*window, in, out).
            layout = layouts.get(path) or _conv_layout(shape, (0,) if stacked else ())
        else:
            layout = layouts.get(path) or default_layout(path, shape, shapes)
        if (
            layout is None
            or len(shape) < 2
            or sorted(layout.batch_axes + layout.in_axes + layout.out_axes)
            != list(range(len(shape)))
        ):
            continue
        layers = _stack_size(path, layout, shape)
        if (layers is None) == stacked:
            continue  # this path is not a stacked weight named per layer, or vice versa
        for i, module in enumerate(_layer_names(name, path, layers)):
            factor_names[module] = (path, None if layers is None else i, layout, module, None)
    prefixes = _wrapper_prefixes(expert_names, parameter_order)
    for name, (path, layer, layout, experts) in expert_names.items():
        factor_names[prefixes[name]] = (path, layer, layout, name, experts)

    # path -> {"layout": Layout, layer: {"module": name, "a": lora_A, "b": lora_B}}
    found: dict[str, dict[Any, Any]] = collections.defaultdict(dict)
    full: dict[str, np.ndarray] = {}
    saved_bases: dict[str, np.ndarray] = {}  # module -> PEFT's copy of its base weight
    unmapped = []
    # Every registered variant's tensors are recognised, so that one the config does not
    # select is refused by name rather than as an unmapped tensor.
    extra_suffixes = {s for v in _registered() for s in v.peft_tensors.values()}
    suffixes = [*_LORA_SUFFIXES, *sorted(extra_suffixes, key=lambda s: (-len(s), s))]
    for key, x in tensors.items():
        suffix = next((s for s in suffixes if key.endswith(s)), None)
        if not key.startswith(_PREFIX):
            unmapped.append(key)
        elif suffix is None:
            name = key[len(_PREFIX) :]
            module = name.removesuffix(_BASE_WEIGHT)
            if name in full_names:
                full[full_names[name]] = x
            elif module != name and module in factor_names and factor_names[module][4] is None:
                saved_bases[module] = x  # not an expert wrapper: PEFT's copy of a base weight
            else:
                unmapped.append(key)
        else:
            module = key[len(_PREFIX) : -len(suffix)]
            if module not in factor_names:
                unmapped.append(key)
                continue
            path, layer, layout, name, experts = factor_names[module]
            found[path] |= {"layout": layout, "experts": experts}
            got = found[path].setdefault(layer, {"module": module, "name": name})
            if suffix in _LORA_SUFFIXES:
                got[_LORA_SUFFIXES[suffix][0]] = x
            else:  # a variant's tensor, by its suffix
                got.setdefault("extras", {})[suffix] = x
    if unmapped:
        raise LoraError(
            f"{directory / WEIGHTS_NAME}: tensors that no leaf of the base maps to (check "
            f"name_map and layouts): {sorted(unmapped)[:10]}"
            + (f" and {len(unmapped) - 10} more" if len(unmapped) > 10 else "")
        )

    for module, x in sorted(saved_bases.items()):
        path, layer, layout = factor_names[module][:3]
        embedding = f"{_PREFIX}{module}.lora_embedding_A" in tensors
        _check_saved_base(module, x, path, leaves[path], layout, layer, embedding)

    tree: dict[str, Any] = {}
    for path, got in sorted(found.items()):
        tree[path] = _factors(path, got, leaves[path], config, variant, rslora, exact.get(path))
    for path, x in sorted(full.items()):
        leaf = leaves[path]
        value = x.T if path.split("/")[-1] == "kernel" and not fan_in_fan_out else x
        if value.shape != tuple(np.shape(leaf)):
            raise LoraError(
                f"{path}: modules_to_save tensor of shape {x.shape} does not fit "
                f"the base leaf of shape {tuple(np.shape(leaf))}"
            )
        tree[path] = jax.numpy.asarray(value, leaf.dtype)
    check_fits(base, tree)
    return tree


def _check_saved_base(
    module: str,
    x: np.ndarray,
    path: str,
    leaf: Any,
    layout: Layout,
    layer: int | None,
    embedding: bool,
) -> None:
    """Refuse PEFT's saved copy of ``module``'s base weight unless it is ``base``'s weight.

    PEFT loads the copy over the model's own weight; a LoRA tree holds no base weights,
    so one that differs would be dropped without a word.
    """
    key = f"{_PREFIX}{module}{_BASE_WEIGHT}"
    what = (
        f"{key}: PEFT saved this copy of the base weight of an adapted "
        f"{'embedding' if embedding else 'Linear'} (save_embedding_layers) and "
        "loads it over the model's own weight"
    )
    if isinstance(leaf, QuantizedArray):
        raise LoraError(
            f"{what}; it cannot be compared with the quantized base leaf {path}: import the "
            "adapter with the float base, then quantize_base"
        )
    if not jax.numpy.issubdtype(x.dtype, jax.numpy.floating):
        raise LoraError(f"{what}; it is {x.dtype}, not a float array")
    w = np.asarray(leaf)
    w = np.transpose(w, [*layout.batch_axes, *sorted(layout.in_axes), *sorted(layout.out_axes)])
    w = w if layer is None else w[layer]
    w = w.reshape(math.prod(w.shape[: len(layout.in_axes)]), -1)
    want = w if embedding else w.T  # PEFT: an Embedding's weight is (vocab, features)
    if x.shape != want.shape:
        raise LoraError(
            f"{what}; it has shape {list(x.shape)}, but the base's {path} is "
            f"{list(want.shape)} as PyTorch stores it: was the vocabulary resized? Import "
            "with the base the adapter was trained on"
        )
    # Equal up to rounding into the coarser of the two dtypes (e.g. a float16 save).
    eps, tiny = max(
        (jax.numpy.finfo(d).eps, jax.numpy.finfo(d).smallest_subnormal) for d in (x.dtype, w.dtype)
    )
    common = np.float64 if x.dtype == w.dtype == np.float64 else np.float32
    diff = np.abs(x.astype(common) - want.astype(common))
    bad = ~(diff <= eps * np.abs(want.astype(common)) + tiny)  # NaN counts as different
    if bad.any():
        raise LoraError(
            f"{what}; it differs from the base's {path} in {int(bad.sum())} of {bad.size} "
            f"values (largest difference {np.nanmax(diff):.3g}): the adapter was trained on "
            "another base. Import with that base (this tensor is its weight)"
        )


def _conv_factors(
    module: str, path: str, a: np.ndarray, b: np.ndarray, shape: tuple[int, ...], layout: Layout
) -> tuple[np.ndarray, np.ndarray]:
    """A and B of one conv module, checked: lora_A ``(r, in, *window)``, lora_B ``(out, r, 1…)``."""
    rest = [shape[i] for i in range(len(shape)) if i not in layout.batch_axes]
    r = a.shape[0]
    want_a = (r, rest[-2], *rest[:-2])
    want_b = (rest[-1], r, *([1] * (len(rest) - 2)))
    if layout != _conv_layout(shape, layout.batch_axes) or (a.shape, b.shape) != (
        want_a,
        want_b,
    ):
        raise LoraError(
            f"{module} → {path}: conv lora_A {list(a.shape)} / lora_B {list(b.shape)} do "
            f"not fit a Flax convolution kernel of shape {shape} with {layout} (expected "
            f"{list(want_a)} / {list(want_b)} for a (*window, in, out) kernel)"
        )
    return _conv_from_peft(a, b)


def _targeted(name: str, targets: Sequence[str]) -> bool:
    # PEFT's rule for target_parameters: the full name, or a suffix after a dot.
    return any(name == t or name.endswith(f".{t}") for t in targets)


def _expert_factors(
    module: str,
    path: str,
    a: np.ndarray,
    b: np.ndarray,
    shape: tuple[int, ...],
    layout: Layout,
    experts: int,
) -> tuple[np.ndarray, np.ndarray]:
    """A ``(E, in, r)``, B ``(E, r, out)`` from PEFT's ``[r·E, in]`` / ``[out, r·E]``, checked."""
    fan_in, fan_out = shape[layout.in_axes[0]], shape[layout.out_axes[0]]
    if (
        a.ndim != 2
        or b.ndim != 2
        or a.shape[0] % experts
        or a.shape[1] != fan_in
        or b.shape != (fan_out, a.shape[0])
    ):
        raise LoraError(
            f"{module} → {path}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit "
            f"{experts} experts of a weight of shape {shape} with {layout} (expected "
            f"[r·{experts}, {fan_in}] / [{fan_out}, r·{experts}])"
        )
    return _experts_from_peft(a, b, experts)


def _factors(
    path: str,
    by_layer: dict[Any, Any],
    leaf: Any,
    config: Mapping[str, Any],
    variant: Variant,
    rslora: bool,
    exact: Mapping[str, Any] | None,
) -> LoraFactors:
    """One entry of the LoRA tree from PEFT's per-module (per-layer) lora_A / lora_B and
    the variant's tensors (``by_layer[i]["extras"]``, by PEFT suffix)."""
    shape = tuple(np.shape(leaf))
    layout, experts = by_layer["layout"], by_layer["experts"]
    if experts is None:
        layers = _stack_size(path, layout, shape)
    else:
        layers = _expert_axes(path, layout, shape)[0]
    wanted = [None] if layers is None else list(range(layers))
    if missing := [i for i in wanted if i not in by_layer]:
        raise LoraError(
            f"{path}: the adapter has no module for layers {missing} of {layers} (for some "
            "layers only, as PEFT's layers_to_transform saves: lorax_fn.peft.subsets."
            "import_layers reads them as a layer subset)"
        )
    in_dims = [shape[a] for a in layout.in_axes]
    out_dims = [shape[a] for a in layout.out_axes]
    a_blocks, b_blocks, scales = [], [], set()
    extra_blocks: dict[str, list[np.ndarray]] = {extra: [] for extra in variant.extras}
    for i in wanted:
        got = by_layer[i]
        module = got["module"]
        if "a" not in got or "b" not in got:
            raise LoraError(f"{module}: the adapter lacks lora_A or lora_B for this module")
        a, b = got["a"], got["b"]
        if experts is not None:
            a, b = _expert_factors(module, path, a, b, shape, layout, experts)
        elif a.ndim > 2:
            a, b = _conv_factors(module, path, a, b, shape, layout)
        elif (
            b.ndim != 2
            or b.shape[1] != a.shape[0]
            or (a.shape[1], b.shape[0]) != (math.prod(in_dims), math.prod(out_dims))
        ):
            raise LoraError(
                f"{module} → {path}: lora_A {list(a.shape)} / lora_B "
                f"{list(b.shape)} do not fit a weight of shape {shape} with "
                f"{layout} (expected [r, {math.prod(in_dims)}] / "
                f"[{math.prod(out_dims)}, r])"
            )
        else:
            a = _from_matrix(a.T, layout.in_axes, in_dims, r_first=False)
            b = _from_matrix(b.T, layout.out_axes, out_dims, r_first=True)
        a_blocks.append(a)
        b_blocks.append(b)
        for extra, x in _extras(module, path, got, variant, config, shape, layout).items():
            extra_blocks[extra].append(x)
        r = a.shape[-1]  # the rank, after conversion: an expert lora_A has r·E rows
        scales.add(_peft_alpha(config, got["name"]) / (math.sqrt(r) if rslora else r))
    if len({blk.shape for blk in a_blocks}) > 1 or len(scales) > 1:
        raise LoraError(
            f"{path}: the layers of a stacked weight need one rank and one scale; "
            f"got ranks {sorted({blk.shape[-1] for blk in a_blocks})}, scales "
            f"{sorted(scales)}"
        )
    scale = scales.pop()
    dropout = float(config.get("lora_dropout", 0.0))
    if exact is not None:
        dropout = exact["dropout"]
        # alpha/r round-trips through JSON up to one rounding; keep the exact recorded value.
        if math.isclose(exact["scale"], scale, rel_tol=1e-9):
            scale = exact["scale"]
    a = a_blocks[0] if layers is None else np.stack(a_blocks)
    b = b_blocks[0] if layers is None else np.stack(b_blocks)
    extras = {
        extra: jax.numpy.asarray(blocks[0] if layers is None else np.stack(blocks))
        for extra, blocks in extra_blocks.items()
    }
    return LoraFactors(
        jax.numpy.asarray(a),
        jax.numpy.asarray(b),
        scale,
        layout,
        dropout,
        extras=extras,
        variant=variant.name,
    )


def _extras(
    module: str,
    path: str,
    got: Mapping[str, Any],
    variant: Variant,
    config: Mapping[str, Any],
    shape: tuple[int, ...],
    layout: Layout,
) -> dict[str, np.ndarray]:
    """The variant's extra arrays of one module (one layer), by name, checked."""
    own = {variant.peft_tensors[extra]: extra for extra in variant.extras}
    tensors = got.get("extras", {})
    for suffix in tensors:
        if suffix not in own:
            owners = [v for v in _registered() if suffix in v.peft_tensors.values()]
            raise LoraError(
                f"{module}: the adapter has a {suffix[1:]} but its config says "
                f"{_options(config, owners)}"
            )
    if missing := [f"{_PREFIX}{module}{suffix}" for suffix in own if suffix not in tensors]:
        raise LoraError(
            f"{module}: the config says {_options(config, [variant])}, but the adapter has "
            f"no {', '.join(missing)}"
        )
    return {
        extra: _column(
            f"{_PREFIX}{module}{suffix}",
            path,
            tensors[suffix],
            got["a"].ndim,
            f"{variant.title} {extra}",
            shape,
            layout,
        )
        for suffix, extra in own.items()
    }


def _column(
    key: str,
    path: str,
    x: np.ndarray,
    peft_ndim: int,
    what: str,
    shape: tuple[int, ...],
    layout: Layout,
) -> np.ndarray:
    """The column vector ``what``, PEFT's tensor ``key``, in our ``(*out)`` layout, checked.

    PEFT's is ``(out,)`` for a Linear or Embedding, ``(1, out, 1…)`` for a conv, whose
    lora_A has ``peft_ndim`` > 2 axes. Kept in the file's dtype, so a round trip is exact.
    """
    out_dims = [shape[a] for a in layout.out_axes]
    want = (1, *out_dims, *([1] * (peft_ndim - 2))) if peft_ndim > 2 else (math.prod(out_dims),)
    if x.shape != want:
        raise LoraError(
            f"{key} → {path}: {what} of shape {list(x.shape)}, a weight of shape {shape} "
            f"with {layout} needs {list(want)}"
        )
    if peft_ndim > 2:
        return x.reshape(out_dims)
    return _from_matrix(x[None], layout.out_axes, out_dims, r_first=True)[0]
