"""Trainable tokens: train chosen rows of an embedding only (PEFT's ``trainable_token_indices``).

New special tokens need their own embedding rows trained, the rest of the vocabulary
kept. For an embedding ``E`` ``(vocab, features)`` and ``k`` chosen rows, the adapted
table is

    E' = E + P·D,    P = one_hot(indices)  (vocab, k), frozen;  D  (k, features), trained

which is a LoRA adapter with ``A = P`` and ``B = D`` at scale 1: every wing handles it as
one. :func:`lorax_fn.lora` factorizes the lookup as ``gather(P, ids)·D`` (the rows of
``D`` for the chosen ids, zero elsewhere) and a tied output head ``x·E'ᵀ`` as
``x·Eᵀ + (x·Dᵀ)·Pᵀ``; ``merge`` adds ``D`` to the chosen rows only; checkpoints save it.
Its variant (``"tokens"``) names ``A`` among its ``frozen_factors``:
:func:`lorax_fn.optimizer` gives it zero updates and no state, and
:func:`lorax_fn.count_params` does not count it as trainable. Train with
:func:`lorax_fn.optimizer`: a bare optax optimizer would move ``P`` too.

PEFT stores the rows' new values, ``E[indices] + D``
(``<module>.token_adapter.trainable_tokens_delta``): :mod:`lorax_fn.peft.tokens`
writes and reads that format.

Example:
    >>> import jax, jax.numpy as jnp, lorax_fn
    >>> params = {"embed": jnp.ones((10, 4))}
    >>> lt = add_trainable_tokens(params, {}, {"embed": [8, 9]})
    >>> lt["embed"].b.shape, token_indices(lt["embed"])
    ((2, 4), (8, 9))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from lorax_fn.errors import LoraError
from lorax_fn.factors import Layout, LoraFactors, LoraTree
from lorax_fn.paths import leaves_with_paths
from lorax_fn.variants.base import Variant, register

VARIANT = "tokens"
ROWS = Layout(in_axes=(0,), out_axes=(1,))
"""An embedding table ``(vocab, features)``: its rows are selected, its features are out."""


class TrainableTokens(Variant):
    """The variant of trainable-token adapters: ``A`` is the fixed row selection ``P``."""

    name = VARIANT
    title = "trainable tokens"
    # PEFT keeps them beside LoRA (trainable_token_indices), not as a LoRA module:
    # lorax_fn.peft.tokens writes them.
    peft_config = None
    peft_writer = "write it with lorax_fn.peft.tokens.export_tokens(directory, lora_tree, base)"
    frozen_factors: ClassVar[tuple[str, ...]] = ("a",)

    def init(self, w0: Any, factors: LoraFactors) -> dict[str, jax.Array]:
        raise LoraError(
            "LoraSpec(variant='tokens') cannot choose the rows to train: add them to the "
            "LoRA tree with lorax_fn.tokens.add_trainable_tokens(base, lora_tree, "
            "{embedding_path: [token ids]})"
        )


register(TrainableTokens())


def _check_indices(path: str, indices: Sequence[int], vocab: int) -> tuple[int, ...]:
    ids = np.asarray(indices)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise LoraError(f"{path}: token indices must be a non-empty list of ints, got {indices!r}")
    if (bad := ids[(ids < 0) | (ids >= vocab)]).size:
        raise LoraError(
            f"{path}: token indices {bad.tolist()} are outside the vocabulary [0, {vocab})"
        )
    values, counts = np.unique(ids, return_counts=True)
    if (twice := values[counts > 1]).size:
        # P·D would add a repeated row's delta twice: a silently different model.
        raise LoraError(f"{path}: token indices {twice.tolist()} are repeated; list each once")
    return tuple(int(i) for i in ids)


def token_factors(
    vocab: int,
    features: int,
    indices: Sequence[int],
    dtype: Any = jnp.float32,
    path: str = "embedding",
) -> LoraFactors:
    """Trainable-token factors for a ``(vocab, features)`` table: ``A = P``, ``B = D = 0``.

    Example:
        >>> f = token_factors(6, 3, [4, 1])
        >>> f.a.shape, f.b.shape, f.weight_shape, f.variant
        ((6, 2), (2, 3), (6, 3), 'tokens')
    """
    ids = _check_indices(path, indices, vocab)
    select = np.zeros((vocab, len(ids)), np.float32)
    select[ids, np.arange(len(ids))] = 1.0
    return LoraFactors(
        jnp.asarray(select, dtype),
        jnp.zeros((len(ids), features), dtype),
        1.0,
        ROWS,
        variant=VARIANT,
    )


def add_trainable_tokens(
    base: Any,
    lora_tree: LoraTree,
    tokens: Mapping[str, Sequence[int]],
    *,
    dtype: Any = jnp.float32,
) -> LoraTree:
    """``lora_tree`` plus a trainable-token adapter per ``{embedding path: token ids}``.

    ``base`` is the frozen base (from :func:`lorax_fn.split`, or the params); each path
    must name a 2-D floating ``(vocab, features)`` table that ``lora_tree`` does not adapt
    already (one adapter per weight). Ids must be distinct and inside the vocabulary.
    Rows start unchanged (``D = 0``).

    Example:
        >>> import jax, jax.numpy as jnp, lorax_fn
        >>> params = {"embed": jnp.ones((10, 4)), "w": jnp.ones((4, 4))}
        >>> base, lt = lorax_fn.split(params, lorax_fn.LoraSpec("w", rank=2),
        ...                           key=jax.random.key(0))
        >>> lt = add_trainable_tokens(base, lt, {"embed": [8, 9]})
        >>> sorted(lt), lorax_fn.count_params(base, lt).trainable  # 2·4 + 2·(4 + 4)
        (['embed', 'w'], 24)
    """
    leaves = dict(leaves_with_paths(base))
    out = dict(lora_tree)
    for path, indices in tokens.items():
        if path not in leaves:
            near = sorted(p for p in leaves if p.split("/")[-1] == path.split("/")[-1])[:5]
            raise LoraError(f"{path}: no such leaf in the base (leaves named alike: {near})")
        if path in out:
            raise LoraError(
                f"{path} is already in the LoRA tree: one adapter per weight; train its "
                "chosen rows with trainable tokens or the whole table with LoRA, not both"
            )
        leaf = leaves[path]
        shape, leaf_dtype = np.shape(leaf), getattr(leaf, "dtype", None)
        if len(shape) != 2 or leaf_dtype is None or not jnp.issubdtype(leaf_dtype, jnp.floating):
            raise LoraError(
                f"{path}: trainable tokens need a floating (vocab, features) table, got "
                f"shape {tuple(shape)} of {leaf_dtype}"
            )
        out[path] = token_factors(shape[0], shape[1], indices, dtype, path)
    return out


def is_tokens(entry: Any) -> bool:
    """Whether a LoRA-tree entry is a trainable-token adapter.

    Example:
        >>> is_tokens(token_factors(4, 2, [0])), is_tokens(jnp.ones(3))
        (True, False)
    """
    return isinstance(entry, LoraFactors) and entry.variant == VARIANT


def token_indices(factors: LoraFactors) -> tuple[int, ...]:
    """The token ids a trainable-token adapter trains, in the order of ``D``'s rows.

    Read off ``P`` (concrete arrays only); a ``P`` that is not a one-hot selection of
    distinct rows — changed by an optimizer that did not freeze it — is refused.

    Example:
        >>> token_indices(token_factors(6, 3, [4, 1]))
        (4, 1)
    """
    select = np.asarray(factors.a, np.float32)
    ids = select.argmax(axis=0)
    want = np.zeros_like(select)
    want[ids, np.arange(select.shape[1])] = 1.0
    if not np.array_equal(select, want) or len(set(ids.tolist())) != len(ids):
        raise LoraError(
            "a trainable-token adapter's selection P is no longer one-hot over distinct rows: "
            "it was trained; train with lorax_fn.optimizer, which freezes it"
        )
    return tuple(int(i) for i in ids)


def with_rows(factors: LoraFactors, delta: jax.Array) -> LoraFactors:
    """``factors`` with ``D`` replaced by ``delta`` ``(k, features)`` in ``D``'s dtype.

    Example:
        >>> with_rows(token_factors(6, 3, [4]), jnp.ones((1, 3))).b.sum()
        Array(3., dtype=float32)
    """
    if np.shape(delta) != np.shape(factors.b):
        raise LoraError(
            f"token rows have shape {np.shape(delta)}, the adapter {np.shape(factors.b)}"
        )
    return dataclasses.replace(factors, b=jnp.asarray(delta, factors.b.dtype))
