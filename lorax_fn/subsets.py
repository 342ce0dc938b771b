"""Layer subsets of stacked weights: some layers of an ``nn.scan`` stack (``layers_to_transform``).

A stacked weight ``(L, *in, *out)`` (one batch axis, the layer) gets factors for every
layer from :func:`lorax_fn.split`. :func:`select_layers` keeps those of chosen layers
only, as a :class:`LayerSubset` — compact factors ``A (|S|, *in, r)``, ``B (|S|, r, *out)``
and the static layer indices — so the trainable parameters and the optimizer state
(:func:`lorax_fn.optimizer` reaches the factors inside) are those of the chosen layers.

:func:`lorax_fn.lora` and :func:`lorax_fn.merge` expand a subset to full-stack factors
(:func:`expand_subsets`) with zeros for the other layers, so they compute exactly
``W0`` there and the gradients reach the compact factors only. The factorized path
still runs for every layer of the scan (on zero factors: ``r·(in + out)`` multiply-adds
per token and layer, what a rank-``r`` adapter costs); the layers' weights are one array
sliced per scan step, so skipping them would take a ``cond`` per layer.

Example:
    >>> import jax, jax.numpy as jnp, lorax_fn
    >>> params = {"layers": {"kernel": jnp.ones((32, 16, 16))}}
    >>> stacked = lorax_fn.Layout(in_axes=(1,), out_axes=(2,), batch_axes=(0,))
    >>> spec = lorax_fn.LoraSpec("**/kernel", rank=4, layouts={"**": stacked})
    >>> base, lt = lorax_fn.split(params, spec, key=jax.random.key(0))
    >>> lt = select_layers(lt, range(-8, 0))  # the last 8 of 32
    >>> lt["layers/kernel"].layers, lt["layers/kernel"].factors.a.shape
    ((24, 25, 26, 27, 28, 29, 30, 31), (8, 16, 4))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_fn.errors import LoraError
from lorax_fn.factors import LoraFactors, LoraTree
from lorax_fn.paths import PathFilter, compile_filter, filter_name


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerSubset:
    """The factors of chosen layers of a stacked weight; ``layers`` and ``num_layers`` static.

    ``factors`` are those of the stack restricted to ``layers`` along its one batch axis
    (the first axis of A and B): ``factors.a[j]`` belongs to layer ``layers[j]``.

    Example:
        >>> from lorax_fn import Layout
        >>> f = LoraFactors(jnp.ones((2, 3, 1)), jnp.ones((2, 1, 4)), 1.0, Layout((1,), (2,), (0,)))
        >>> s = LayerSubset(f, (1, 3), 5)
        >>> s.expand().a.shape, s.weight_shape
        ((5, 3, 1), (5, 3, 4))
    """

    factors: LoraFactors
    layers: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    num_layers: int = dataclasses.field(metadata={"static": True})

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))

    @property
    def weight_shape(self) -> tuple[int, ...]:
        shape = list(self.factors.weight_shape)
        shape[self.factors.layout.batch_axes[0]] = self.num_layers
        return tuple(shape)

    def expand(self) -> LoraFactors:
        """Full-stack factors: these layers' A and B, zeros for every other layer."""

        def scatter(x: jax.Array) -> jax.Array:
            full = jnp.zeros((self.num_layers, *x.shape[1:]), x.dtype)
            return full.at[np.asarray(self.layers)].set(x)

        return dataclasses.replace(
            self.factors, a=scatter(self.factors.a), b=scatter(self.factors.b)
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerGroups:
    """Layer subsets of one stacked weight at different ranks (a rank per layer index).

    ``parts`` are :class:`LayerSubset` s of disjoint layers, one per rank. Expanded, they
    are one adapter of rank ``Σ r`` whose every layer uses its own part's columns (the
    others are zero there), each part at its own scale.

    Example:
        >>> from lorax_fn import Layout
        >>> f = lambda r: LoraFactors(jnp.ones((1, 3, r)), jnp.ones((1, r, 4)), 1.0,
        ...                           Layout((1,), (2,), (0,)))
        >>> g = LayerGroups((LayerSubset(f(2), (0,), 4), LayerSubset(f(1), (3,), 4)))
        >>> g.layers, g.ranks, g.expand().a.shape
        ((0, 3), (2, 1), (4, 3, 3))
    """

    parts: tuple[LayerSubset, ...]

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(i for part in self.parts for i in part.layers))

    @property
    def ranks(self) -> tuple[int, ...]:
        """The rank of each layer of :attr:`layers`."""
        rank = {i: part.factors.rank for part in self.parts for i in part.layers}
        return tuple(rank[i] for i in self.layers)

    @property
    def num_layers(self) -> int:
        return self.parts[0].num_layers

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self.parts[0].weight_shape

    def expand(self) -> LoraFactors:
        """Full-stack factors of rank ``Σ r``: each layer its part's columns, zeros elsewhere."""
        full = [part.expand() for part in self.parts]
        # One scale for the whole adapter: each part's own folds into its B.
        b = [f.b * (f.scale / full[0].scale) for f in full]
        return dataclasses.replace(
            full[0], a=jnp.concatenate([f.a for f in full], -1), b=jnp.concatenate(b, 1)
        )


def _check(path: str, factors: Any, layers: Sequence[int]) -> tuple[tuple[int, ...], int]:
    if not isinstance(factors, LoraFactors):
        raise LoraError(f"{path}: a layer subset needs LoRA factors, got {type(factors).__name__}")
    if len(factors.layout.batch_axes) != 1:
        raise LoraError(
            f"{path}: layer subsets need a stacked weight with one batch (layer) axis; its "
            f"layout is {factors.layout}"
        )
    if factors.variant != "lora" or factors.extras or factors.pissa is not None:
        # Zero factors are the identity only for plain LoRA: DoRA's magnitude, say,
        # would need its own value in every other layer.
        raise LoraError(
            f"{path}: layer subsets hold plain LoRA factors only ({factors.variant} with "
            f"extras {sorted(factors.extras)}{', PiSSA' if factors.pissa else ''})"
        )
    n = int(factors.a.shape[0])
    chosen = [int(i) for i in layers]
    if not chosen:
        raise LoraError(f"{path}: no layers chosen")
    if bad := [i for i in chosen if not -n <= i < n]:
        raise LoraError(f"{path}: layers {bad} are outside a stack of {n}")
    chosen = [i % n for i in chosen]
    if len(set(chosen)) != len(chosen):
        raise LoraError(f"{path}: layers {layers} name a layer twice")
    return tuple(sorted(chosen)), n


def _subset(
    path: str, entry: LoraFactors, layers: Sequence[int] | Mapping[int, int]
) -> LayerSubset | LayerGroups:
    """``entry`` at ``layers``: a list of layer ids, or ``{layer id: rank}``."""
    chosen, n = _check(path, entry, list(layers))
    if not isinstance(layers, Mapping):
        ranks = dict.fromkeys(chosen, entry.rank)
    else:
        ranks = {i % n: r for i, r in layers.items()}
        if bad := {
            i: r for i, r in ranks.items() if not (isinstance(r, int) and 0 < r <= entry.rank)
        }:
            raise LoraError(
                f"{path}: layer ranks {bad} must be ints in [1, {entry.rank}] (split at the "
                "largest rank: a layer of rank r keeps the first r columns of A, rows of B)"
            )
    parts = []
    for r in sorted(set(ranks.values()), reverse=True):
        ids = np.asarray(sorted(i for i in chosen if ranks[i] == r))
        factors = dataclasses.replace(entry, a=entry.a[ids][..., :r], b=entry.b[ids][:, :r])
        parts.append(LayerSubset(factors, tuple(ids.tolist()), n))
    return parts[0] if len(parts) == 1 else LayerGroups(tuple(parts))


def select_layers(
    lora_tree: LoraTree,
    layers: Sequence[int] | Mapping[PathFilter, Sequence[int] | Mapping[int, int]],
) -> LoraTree:
    """``lora_tree`` with stacked entries cut to the chosen layers (``layers_to_transform``).

    ``layers`` is a list of layer indices (negative ones count from the end) for every
    stacked entry (one batch axis), or ``{path filter: indices}`` for some entries —
    the first matching filter wins, and entries no filter matches stay as they are;
    each filter must match a stacked entry. A chosen entry keeps its factors at those
    layers as a :class:`LayerSubset`. Plain LoRA only.

    A filter's value may be ``{layer: rank}`` instead (PEFT's ``rank_pattern`` per
    layer index): each layer keeps the first ``rank`` columns of A (rows of B) of the
    split — split at the largest rank — and the entry's scale; layers of different
    ranks become a :class:`LayerGroups`.

    Example:
        >>> import jax, jax.numpy as jnp, lorax_fn
        >>> params = {"layers": {"kernel": jnp.ones((4, 8, 8))}, "head": jnp.ones((8, 2))}
        >>> spec = lorax_fn.LoraSpec(["**/kernel", "head"], rank=2,
        ...                          layouts={"**/kernel": lorax_fn.Layout((1,), (2,), (0,))})
        >>> base, lt = lorax_fn.split(params, spec, key=jax.random.key(0))
        >>> lt = select_layers(lt, {"**/kernel": [0, 3]})
        >>> lorax_fn.count_params(base, lt).trainable  # 2 layers · 2·(8 + 8) + 2·(8 + 2)
        84
        >>> base, lt = lorax_fn.split(params, spec, key=jax.random.key(0))
        >>> select_layers(lt, {"**/kernel": {0: 2, 3: 1}})["layers/kernel"].ranks
        (2, 1)
    """
    if isinstance(layers, Mapping):
        rules = [(compile_filter(f), filter_name(f), v) for f, v in layers.items()]
    else:
        rules = [(lambda p, x: True, "every stacked weight", layers)]
    hits = [0] * len(rules)
    out = {}
    for path, entry in lora_tree.items():
        stacked = isinstance(entry, LoraFactors) and len(entry.layout.batch_axes) == 1
        k = next(
            (k for k, (match, _, _) in enumerate(rules) if stacked and match(path, entry)), None
        )
        if k is None:
            out[path] = entry
            continue
        hits[k] += 1
        out[path] = _subset(path, entry, rules[k][2])
    if missed := [name for (_, name, _), n in zip(rules, hits, strict=True) if not n]:
        raise LoraError(f"select_layers: {missed} match no stacked (one batch axis) LoRA entry")
    return out


def expand_subsets(lora_tree: Mapping[str, Any]) -> Any:
    """``lora_tree`` with each layer subset as full-stack factors (zeros elsewhere).

    Returns the tree itself when it holds none. :func:`lorax_fn.lora` and
    :func:`lorax_fn.merge` call it; differentiating through it gives the compact
    factors' gradients.

    Example:
        >>> from lorax_fn import Layout
        >>> f = LoraFactors(jnp.ones((1, 3, 1)), jnp.ones((1, 1, 4)), 1.0, Layout((1,), (2,), (0,)))
        >>> expand_subsets({"w": LayerSubset(f, (2,), 3)})["w"].a[:, 0, 0]
        Array([0., 0., 1.], dtype=float32)
    """
    if not isinstance(lora_tree, Mapping) or not any(map(is_subset, lora_tree.values())):
        return lora_tree
    return {p: e.expand() if is_subset(e) else e for p, e in lora_tree.items()}


def is_subset(entry: Any) -> bool:
    """Whether a LoRA-tree entry is a :class:`LayerSubset` or :class:`LayerGroups`.

    Example:
        >>> is_subset(jnp.ones(2))
        False
    """
    return isinstance(entry, LayerSubset | LayerGroups)
