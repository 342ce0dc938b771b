"""The NF4 codebook and the array kernels behind :mod:`lorax_fn.quant.quantized`.

Everything here is a pure ``jnp`` function on arrays whose shapes are already
validated; :mod:`lorax_fn.quant.quantized` owns the checks, the pytree type and the
layouts. The recipe is QLoRA's (Dettmers et al., 2023, arXiv 2305.14314):

- **NF4**: each block of ``block_size`` consecutive values is divided by its
  absmax and each quotient stored as the index (4 bits) of the nearest of the
  16 NormalFloat values :data:`NF4_CODEBOOK`, two indices per byte.
- **Double quantization**: the per-block absmax constants (float32) have their
  mean subtracted and are stored as 8-bit floats (``float8_e4m3fn``) with one
  float32 scale per block of 256 of them. bitsandbytes stores them with its
  "dynamic" 8-bit map instead, so values are not bit-identical to bitsandbytes'.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

NF4_CODEBOOK = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
"""The 16 NF4 values (QLoRA Appendix E; bitsandbytes ``get_4bit_type("nf4")``), ascending.

Example:
    >>> float(NF4_CODEBOOK[7]), len(NF4_CODEBOOK)
    (0.0, 16)
"""

_MIDPOINTS = (NF4_CODEBOOK[1:] + NF4_CODEBOOK[:-1]) / 2

FP8 = jnp.float8_e4m3fn
"""The 8-bit float of the double-quantized absmax constants."""

FP8_RANGE = 256.0
"""What each group's largest offset maps to. A power of two, so scaling by it is exact
whatever the compiler makes of a division (XLA on CPU divides via a reciprocal); float8
has the same 3 mantissa bits at every binade, so 256 is as precise as its maximum, 448."""
DQ_BLOCK = 256
"""Absmax constants per float32 second-level scale (QLoRA's block size 256)."""


def _nonzero(x: jax.Array) -> jax.Array:
    # A zero scale only occurs for all-zero data, whose codes are then 0 whatever it is.
    return jnp.where(x == 0, jnp.ones_like(x), x)


def nf4_encode(x: jax.Array, scale: jax.Array, block_size: int) -> jax.Array:
    """Pack the NF4 indices of ``x`` (``(*lead, n)``, float32) into ``(*lead, n // 2)`` uint8.

    ``scale`` is ``(*lead, n // block_size)``: the value each block is divided by. Each
    index is that of the nearest codebook value; the first element of a pair goes in the
    high nibble (bitsandbytes' order).
    """
    lead, n = x.shape[:-1], x.shape[-1]
    blocks = x.reshape(*lead, n // block_size, block_size) / _nonzero(scale)[..., None]
    idx = jnp.searchsorted(jnp.asarray(_MIDPOINTS), blocks).astype(jnp.uint8)
    pairs = idx.reshape(*lead, n // 2, 2)
    return (pairs[..., 0] << 4) | pairs[..., 1]


def nf4_decode(codes: jax.Array, scale: jax.Array, block_size: int) -> jax.Array:
    """Inverse of :func:`nf4_encode`: ``(*lead, m)`` uint8 → ``(*lead, 2m)`` float32.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.asarray(NF4_CODEBOOK)[None] * 2.0  # (1, 16), absmax 2
        >>> codes = nf4_encode(x, jnp.array([[2.0]]), 16)
        >>> bool((nf4_decode(codes, jnp.array([[2.0]]), 16) == x).all())
        True
    """
    lead, m = codes.shape[:-1], codes.shape[-1]
    idx = jnp.stack([codes >> 4, codes & 0xF], axis=-1).reshape(*lead, 2 * m)
    values = jnp.asarray(NF4_CODEBOOK)[idx]
    blocks = values.reshape(*lead, 2 * m // block_size, block_size) * scale[..., None]
    return blocks.reshape(*lead, 2 * m)


def _expand(per_group: jax.Array, shape: tuple[int, ...], first: Any = 0) -> jax.Array:
    # Each second-level scale looked up for its 256 constants, by row-major index, in the
    # constants' own shape: elementwise with them, so sharded constants need no
    # communication (jnp.repeat would compile to a cumsum that gathers across shards).
    index = jnp.arange(math.prod(shape), dtype=jnp.int32).reshape(shape) + first
    return per_group[index // DQ_BLOCK]


def fp8_encode(c: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Double-quantize the float32 constants ``c``: ``(codes, group_scale, mean)``.

    ``codes`` has ``c``'s shape (float8_e4m3fn), ``group_scale`` one float32 per
    :data:`DQ_BLOCK` consecutive constants (row-major, the last group possibly short),
    ``mean`` is a float32 scalar.
    """
    mean = jnp.mean(c)
    centred = c.reshape(-1) - mean
    groups = -(-centred.size // DQ_BLOCK)
    padded = jnp.pad(centred, (0, groups * DQ_BLOCK - centred.size)).reshape(groups, DQ_BLOCK)
    group_scale = jnp.max(jnp.abs(padded), axis=1)
    scaled = centred / _expand(_nonzero(group_scale), centred.shape) * FP8_RANGE
    # An inexact division can overshoot the range by an ulp.
    scaled = jnp.clip(scaled, -FP8_RANGE, FP8_RANGE)
    return scaled.astype(FP8).reshape(c.shape), group_scale, mean


def fp8_decode(
    codes: jax.Array, group_scale: jax.Array, mean: jax.Array, first: Any = 0
) -> jax.Array:
    """Inverse of :func:`fp8_encode` (float32, ``codes``' shape).

    ``first`` (an int or a traced int32) is the row-major index of ``codes``' first
    element among the constants ``group_scale`` was computed for, to decode a slice
    (e.g. one layer of a stacked weight) against the whole array's groups.

    Example:
        >>> import jax.numpy as jnp
        >>> c = jnp.array([[1.0, 3.0], [3.0, 1.0]])
        >>> bool((fp8_decode(*fp8_encode(c)) == c).all())  # mean 2, offsets ±1: exact
        True
    """
    scale = _expand(group_scale, codes.shape, first)
    return codes.astype(jnp.float32) * scale * (1 / FP8_RANGE) + mean
