"""Layer subsets in PEFT's files: one module per chosen layer (``model.layers.{i}....``).

PEFT adapts the layers ``layers_to_transform`` names by giving each its own modules,
so an adapter on layers 24…31 of a 32-layer model holds ``model.layers.24.…`` to
``model.layers.31.…`` only. :func:`export_layers` writes a LoRA tree whose stacked
entries may be :class:`~lorax_fn.subsets.LayerSubset` s: each chosen layer becomes its
module, named through ``name_map``'s ``{layer}`` placeholder with the layer's index in
the stack, and the config's ``target_modules`` lists exactly those modules.
:func:`import_layers` reads such a file: a stacked weight with some but not all of
its layers' modules in the file becomes a ``LayerSubset`` of those layers. Both are
:func:`lorax_fn.peft.export_peft` / :func:`lorax_fn.peft.import_peft` otherwise (their
keyword arguments pass through).

Example:
    >>> import jax, jax.numpy as jnp, lorax_fn
    >>> from lorax_fn.subsets import select_layers
    >>> params = {"params": {"layers": {"kernel": jnp.ones((4, 8, 8))}}}
    >>> stacked = lorax_fn.Layout(in_axes=(1,), out_axes=(2,), batch_axes=(0,))
    >>> spec = lorax_fn.LoraSpec("**/kernel", rank=2, layouts={"**": stacked})
    >>> base, lt = lorax_fn.split(params, spec, key=jax.random.key(0))
    >>> lt = select_layers(lt, [2, 3])
    >>> name_map = [(r"params/layers/kernel", "model.layers.{layer}.mlp")]
    >>> _ = export_layers("last_two/", lt, spec, name_map=name_map)
    >>> back = import_layers("last_two/", base, name_map=name_map,
    ...                      layouts={"params/layers/kernel": stacked})
    >>> back["params/layers/kernel"].layers
    (2, 3)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from lorax_fn.conventions import default_layout
from lorax_fn.errors import LoraError
from lorax_fn.factors import Layout, LoraFactors, LoraTree
from lorax_fn.peft.io import (
    _PREFIX,
    NameMap,
    _module_name,
    _read_tensors,
    export_peft,
    import_peft,
)
from lorax_fn.quant.quantized import weight_leaves
from lorax_fn.spec import LoraSpec
from lorax_fn.subsets import LayerGroups, LayerSubset, is_subset


def _layer_path(path: str, layer: int | str) -> str:
    """The stand-in path of one layer of a stack (a leaf of no real tree)."""
    return f"{path}/layer_{layer}"


def _unstacked(layout: Layout) -> Layout:
    """``layout`` of one layer: its one batch axis dropped, the others renumbered."""
    (b,) = layout.batch_axes
    shift = lambda axes: tuple(a - (a > b) for a in axes)  # noqa: E731
    return Layout(shift(layout.in_axes), shift(layout.out_axes))


def _stacked(layout: Layout, batch: int) -> Layout:
    """Inverse of :func:`_unstacked` for a layer axis at ``batch``."""
    shift = lambda axes: tuple(a + (a >= batch) for a in axes)  # noqa: E731
    return Layout(shift(layout.in_axes), shift(layout.out_axes), (batch,))


def _template(name_map: NameMap | None, path: str) -> str:
    name = _module_name(name_map, path)
    if name is None or "{layer}" not in name:
        raise LoraError(
            f"{path}: a layer subset needs a module name per layer; name_map gives {name!r} "
            "without a {layer} placeholder"
        )
    return name


def _names(name_map: NameMap | None, fixed: Mapping[str, str]) -> Any:
    return lambda path: fixed[path] if path in fixed else _module_name(name_map, path)


def export_layers(
    directory: str | os.PathLike,
    lora_tree: Mapping[str, Any],
    spec: LoraSpec | None = None,
    *,
    name_map: NameMap | None = None,
    **export_kwargs: Any,
) -> Path:
    """:func:`lorax_fn.peft.export_peft`, each layer subset as its chosen layers' modules.

    Example:
        >>> import jax.numpy as jnp
        >>> from lorax_fn import Layout
        >>> f = LoraFactors(jnp.ones((1, 4, 2)), jnp.ones((1, 2, 4)), 1.0,
        ...                 Layout((1,), (2,), (0,)))
        >>> path = export_layers("one_layer/", {"stack/kernel": LayerSubset(f, (5,), 8)},
        ...                      name_map={"stack/kernel": "layers.{layer}"})
        >>> import json; json.loads((path / "adapter_config.json").read_text())["target_modules"]
        ['layers.5']
    """
    tree: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    for path, entry in lora_tree.items():
        if not is_subset(entry):
            tree[path] = entry
            continue
        template = _template(name_map, path)
        for part in entry.parts if isinstance(entry, LayerGroups) else (entry,):
            layout = _unstacked(part.factors.layout)
            for j, layer in enumerate(part.layers):
                one = dataclasses.replace(
                    part.factors, a=part.factors.a[j], b=part.factors.b[j], layout=layout
                )
                tree[_layer_path(path, layer)] = one
                fixed[_layer_path(path, layer)] = template.replace("{layer}", str(layer))
    return export_peft(directory, tree, spec, name_map=_names(name_map, fixed), **export_kwargs)


def _present_layers(template: str, num_layers: int, tensors: Mapping[str, Any]) -> list[int]:
    modules = {k[len(_PREFIX) :].rsplit(".lora_", 1)[0] for k in tensors if k.startswith(_PREFIX)}
    return [i for i in range(num_layers) if template.replace("{layer}", str(i)) in modules]


def import_layers(
    directory: str | os.PathLike,
    base: Any,
    *,
    name_map: NameMap | None = None,
    layouts: Mapping[str, Layout] | None = None,
    **import_kwargs: Any,
) -> LoraTree:
    """:func:`lorax_fn.peft.import_peft`, a stack with some of its layers as a layer subset.

    A stacked weight (its layout from ``layouts``, from lorax_fn's header — layer axis
    first — or :func:`lorax_fn.conventions.default_layout`) whose ``{layer}`` modules
    are in the file for some but not all layers is read layer by layer into a
    :class:`~lorax_fn.subsets.LayerSubset` of those layers — a
    :class:`~lorax_fn.subsets.LayerGroups` where their ranks or scales differ (PEFT's
    ``rank_pattern``/``alpha_pattern`` per layer). Stacks with all layers, and
    everything else, read as ``import_peft`` reads them.

    Example:
        >>> import jax.numpy as jnp
        >>> from lorax_fn import Layout
        >>> f = LoraFactors(jnp.ones((1, 4, 2)), jnp.ones((1, 2, 4)), 1.0,
        ...                 Layout((1,), (2,), (0,)))
        >>> name_map = {"stack/kernel": "layers.{layer}"}
        >>> _ = export_layers("layer_5/", {"stack/kernel": LayerSubset(f, (5,), 8)},
        ...                   name_map=name_map)
        >>> import_layers("layer_5/", {"stack": {"kernel": jnp.ones((8, 4, 4))}},
        ...               name_map=name_map)["stack/kernel"].layers
        (5,)
    """
    directory = Path(directory).expanduser().absolute()
    tensors, exact = _read_tensors(directory)
    leaves = dict(weight_leaves(base))
    shapes = {p: tuple(np.shape(x)) for p, x in leaves.items()}
    layouts = dict(layouts or {})
    view: dict[str, Any] = {}  # the base as import_peft sees it: chosen layers split out
    fixed: dict[str, str] = {}
    view_layouts = dict(layouts)
    subsets: dict[str, tuple[Layout, list[int]]] = {}
    for path, leaf in leaves.items():
        name = _module_name(name_map, path)
        layout = layouts.get(path) or default_layout(path, shapes[path], shapes)
        # A subset lorax_fn exported records each layer's layout under its stand-in path.
        one = next((v for p, v in exact.items() if p.startswith(_layer_path(path, ""))), None)
        if layout is None and one is not None:
            layout = _stacked(Layout(**one["layout"]), 0)
        if name is None or "{layer}" not in name or layout is None or len(layout.batch_axes) != 1:
            view[path] = leaf
            continue
        n = shapes[path][layout.batch_axes[0]]
        present = _present_layers(name, n, tensors)
        if not 0 < len(present) < n:
            view[path] = leaf
            continue
        subsets[path] = (layout, present)
        for i in present:
            view[_layer_path(path, i)] = jnp.take(leaf, i, axis=layout.batch_axes[0])
            fixed[_layer_path(path, i)] = name.replace("{layer}", str(i))
            view_layouts[_layer_path(path, i)] = _unstacked(layout)
        view_layouts.pop(path, None)
    tree = import_peft(
        directory, view, name_map=_names(name_map, fixed), layouts=view_layouts, **import_kwargs
    )
    for path, (layout, present) in subsets.items():
        layers = {i: tree.pop(_layer_path(path, i)) for i in present}
        n = shapes[path][layout.batch_axes[0]]
        groups: dict[tuple[int, float], list[int]] = {}
        for i, f in layers.items():  # PEFT's rank_pattern per layer: one part per rank
            groups.setdefault((f.rank, f.scale), []).append(i)
        parts = []
        for (_, scale), ids in sorted(groups.items(), key=lambda g: (-g[0][0], g[1])):
            stacked = LoraFactors(
                jnp.stack([layers[i].a for i in ids]),
                jnp.stack([layers[i].b for i in ids]),
                scale,
                layout,
                layers[ids[0]].dropout,
            )
            parts.append(LayerSubset(stacked, tuple(ids), n))
        tree[path] = parts[0] if len(parts) == 1 else LayerGroups(tuple(parts))
    return tree
