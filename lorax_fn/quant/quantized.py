"""A quantized frozen base: int8 and NF4 (QLoRA) weights as pytrees.

:func:`quantize` turns one float array into a :class:`QuantizedArray`;
:func:`quantize_base` does it for the selected weights of a base, leaf by leaf
(one jitted call per weight, so no more than one weight is ever held in float
beyond the base itself); :func:`dequantize_base` turns them back into floats
(for export or serving). A :class:`QuantizedArray` is a registered pytree: its
leaves are plain arrays and its format, original shape, dtype and block size
are static, so it jits, donates, shards and checkpoints (orbax) like any pytree.
Dequantizing is always explicit: a QuantizedArray is not an array and never
converts to one implicitly.

Formats:

- ``"int8"``: symmetric, one float32 scale ``absmax / 127`` per output channel
  (per index of the channel axes; by default the last axis, a Flax kernel's
  fan-out), codes in ``[-127, 127]``. About 1 byte per parameter.
- ``"nf4"``: QLoRA's 4-bit NormalFloat (:mod:`lorax_fn.quant.nf4`): blocks of
  ``block_size`` (64) consecutive elements, each scaled by its absmax, two
  4-bit codes per byte; with ``double_quant`` (the default) the absmax
  constants are themselves stored in 8 bits (about 4.127 bits per parameter,
  4.5 without).

NF4 layout. Blocks run along the last axis: ``codes`` is ``(*shape[:-1],
shape[-1] // 2)`` and the absmax constants ``(*shape[:-1], shape[-1] //
block_size)``, so both keep every axis of the weight and the weight's
``PartitionSpec`` applies to them unchanged whenever each shard of the last
axis holds whole blocks (else the absmax constants are replicated along it).
When the last axis is not a multiple of the block size, the fewest trailing
axes whose total size is a multiple of it are flattened into one (``(768, 12,
32)`` → ``(768, 192)`` codes); ``pad=True`` instead zero-pads the last axis
when no group fits. :meth:`QuantizedArray.shardings` maps a weight's
sharding onto these arrays.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from lorax_fn.conventions import default_layout
from lorax_fn.errors import LoraError
from lorax_fn.factors import Layout, LoraFactors
from lorax_fn.paths import (
    PathFilter,
    as_filters,
    compile_filter,
    path_str,
    unmatched_filter,
)
from lorax_fn.quant import nf4
from lorax_fn.spec import LoraSpec

FORMATS = ("nf4", "int8")
Format = Literal["nf4", "int8"]
DEFAULT_BLOCK_SIZE = 64
_INT8_MAX = 127


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedArray:
    """A float array stored quantized; build one with :func:`quantize`.

    Leaves (arrays):
      codes: ``"nf4"``: uint8, two 4-bit indices into :data:`lorax_fn.quant.nf4.NF4_CODEBOOK`
        per byte, ``(*shape[:lead_axes], n // 2)`` for the ``n`` elements of the trailing
        axes (padded to whole blocks with ``pad=True``); ``"int8"``: int8, ``shape``.
      scale: ``"nf4"``: each block's absmax, ``(*shape[:lead_axes], n // block_size)``,
        float32, or with double quantization its float8_e4m3fn code; ``"int8"``: float32
        ``absmax / 127`` per channel, ``shape`` with the non-channel axes of size 1.
      scale_scale, scale_offset: double quantization only (else ``None``): one float32
        per 256 consecutive scale codes (row-major) and their mean, a float32 scalar.

    Static: ``format``, the original ``shape`` and ``dtype``, ``block_size`` (0 for
    int8) and ``lead_axes``, the number of leading weight axes the codes keep.

    Example:
        >>> import jax.numpy as jnp
        >>> q = quantize(jnp.ones((4, 128)), "nf4")
        >>> q.shape, q.dtype, q.codes.shape, q.scale.shape, q.dequantize().shape
        ((4, 128), dtype('float32'), (4, 64), (4, 2), (4, 128))
    """

    codes: jax.Array
    scale: jax.Array
    scale_scale: jax.Array | None
    scale_offset: jax.Array | None
    format: str = dataclasses.field(metadata={"static": True})
    shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    dtype: np.dtype = dataclasses.field(metadata={"static": True})
    block_size: int = dataclasses.field(metadata={"static": True})
    lead_axes: int = dataclasses.field(metadata={"static": True})

    def __repr__(self) -> str:
        extra = f", block_size={self.block_size}" if self.format == "nf4" else ""
        extra += ", double_quant" if self.double_quant else ""
        return (
            f"QuantizedArray({self.format}, {self.dtype}{list(self.shape)}{extra}, "
            f"{self.nbytes:,} bytes)"
        )

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        """Elements of the original array."""
        return math.prod(self.shape)

    @property
    def double_quant(self) -> bool:
        return self.scale_scale is not None

    @property
    def nbytes(self) -> int:
        """Bytes of storage: codes plus every constant (works on abstract leaves too)."""
        return sum(_leaf_bytes(x) for x in jax.tree.leaves(self))

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """The float array (in ``dtype``, default the original dtype), computed in float32.

        Example:
            >>> import jax.numpy as jnp
            >>> x = jnp.array([[-254.0], [127.0], [1.0]])  # one channel: scale 254 / 127 = 2
            >>> quantize(x, "int8").dequantize().ravel().tolist()  # halves round to even
            [-254.0, 128.0, 0.0]
        """
        dtype = self.dtype if dtype is None else jnp.dtype(dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise LoraError(f"dequantize: dtype must be floating, got {dtype}")
        return _dequantize_jit(self, dtype)

    def shardings(self, sharding: Sharding) -> QuantizedArray:
        """The shardings of this array's leaves that follow ``sharding``, the weight's.

        A ``NamedSharding``'s spec carries over axis by axis: int8 codes take it as is
        and their scale drops the entries of its size-1 axes; NF4 codes and absmax keep
        the entries of the leading axes. Their trailing (flattened) axis keeps the entry
        of its first axis when the other trailing axes are unsharded: for the codes when
        each shard holds whole bytes, for the absmax when it holds whole blocks (else
        that axis is replicated: 1/64 of the elements, one byte each). The
        double-quantization constants (one float32 per 16,384 elements) are replicated.
        Dequantizing into the weight's sharding then needs no communication. A fully
        replicated sharding of another kind applies to every leaf.

        Example:
            >>> import jax, jax.numpy as jnp
            >>> from jax.sharding import NamedSharding, PartitionSpec as P
            >>> mesh = jax.make_mesh((1,), ("data",))
            >>> sh = quantize(jnp.ones((8, 128))).shardings(NamedSharding(mesh, P("data")))
            >>> sh.codes.spec, sh.scale.spec, sh.scale_scale.spec
            (P('data', None), P('data', None), P())
        """
        if not isinstance(sharding, NamedSharding):
            if sharding.is_fully_replicated:
                return jax.tree.map(lambda _: sharding, self)
            raise LoraError(
                f"QuantizedArray.shardings needs a NamedSharding or a fully replicated "
                f"sharding, got {sharding}"
            )
        mesh = sharding.mesh
        spec = tuple(sharding.spec) + (None,) * (self.ndim - len(sharding.spec))
        replicated = NamedSharding(mesh, PartitionSpec())
        if self.format == "int8":
            scale_spec = tuple(
                e if n == d else None
                for e, n, d in zip(spec, self.scale.shape, self.shape, strict=True)
            )
            return dataclasses.replace(
                self,
                codes=NamedSharding(mesh, PartitionSpec(*spec)),
                scale=NamedSharding(mesh, PartitionSpec(*scale_spec)),
            )
        lead, trailing = spec[: self.lead_axes], spec[self.lead_axes :]
        first = trailing[0] if trailing and all(e is None for e in trailing[1:]) else None
        codes_entry = scale_entry = None
        if first is not None:
            shards = math.prod(
                mesh.shape[a] for a in ((first,) if isinstance(first, str) else first)
            )
            dim = self.shape[self.lead_axes]
            per_shard = dim // shards * math.prod(self.shape[self.lead_axes + 1 :])
            padded = 2 * self.codes.shape[-1] != math.prod(self.shape[self.lead_axes :])
            if not (padded or dim % shards or per_shard % 2):
                codes_entry = first
                scale_entry = None if per_shard % self.block_size else first
        return dataclasses.replace(
            self,
            codes=NamedSharding(mesh, PartitionSpec(*lead, codes_entry)),
            scale=NamedSharding(mesh, PartitionSpec(*lead, scale_entry)),
            scale_scale=replicated if self.double_quant else None,
            scale_offset=replicated if self.double_quant else None,
        )


def _dequantize_array(q: QuantizedArray, dtype: np.dtype) -> jax.Array:
    if q.format == "int8":
        return (q.codes.astype(jnp.float32) * q.scale).astype(dtype)
    scale = q.scale
    if q.double_quant:
        scale = nf4.fp8_decode(scale, q.scale_scale, q.scale_offset)
    flat = nf4.nf4_decode(q.codes, scale, q.block_size)
    n = math.prod(q.shape[q.lead_axes :])
    return flat[..., :n].reshape(q.shape).astype(dtype)


# One compiled program per format, shape and dtype: eager and traced calls agree bit
# for bit, and eager calls are one dispatch.
_dequantize_jit = jax.jit(_dequantize_array, static_argnums=1)


def _leaf_bytes(x: Any) -> int:
    return math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize


def _is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedArray)


def weight_leaves(tree: Any) -> list[tuple[str, Any]]:
    """``(path, leaf)`` pairs of ``tree`` with each :class:`QuantizedArray` as one leaf.

    The paths LoRA trees use: a quantized weight keeps its float weight's path (and
    ``np.shape`` of it is the original shape), not one path per stored array.

    Example:
        >>> import jax.numpy as jnp
        >>> [(p, x.shape) for p, x in weight_leaves({"w": quantize(jnp.ones((2, 64)))})]
        [('w', (2, 64))]
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_quantized)
    return [(path_str(k), leaf) for k, leaf in flat]


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about quantizing one array, validated."""

    format: str
    block_size: int
    double_quant: bool
    lead_axes: int
    padded: int  # elements of the trailing group after padding
    channel_axes: tuple[int, ...]


def _nf4_lead_axes(shape: tuple[int, ...], block_size: int) -> int | None:
    for k in range(len(shape) - 1, -1, -1):
        if math.prod(shape[k:]) % block_size == 0:
            return k
    return None


def _plan(
    name: str,
    shape: tuple[int, ...],
    dtype: Any,
    format: str,
    block_size: int | None,
    double_quant: bool | None,
    pad: bool,
    channel_axes: Sequence[int] | None,
) -> _Plan:
    if format not in FORMATS:
        raise LoraError(f"{name}: unknown format {format!r}; expected one of {FORMATS}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise LoraError(f"{name}: dtype {dtype} is not floating; only float arrays are quantized")
    if not shape:
        raise LoraError(f"{name}: a scalar (shape ()) cannot be quantized")
    if format == "int8":
        given = {"block_size": block_size, "double_quant": double_quant, "pad": pad or None}
        if unused := [k for k, v in given.items() if v is not None]:
            raise LoraError(f"{name}: {unused} apply to nf4 only, not to int8")
        ndim = len(shape)
        axes = (ndim - 1,) if channel_axes is None and ndim >= 2 else tuple(channel_axes or ())
        if any(not -ndim <= a < ndim for a in axes):
            raise LoraError(f"{name}: channel_axes {axes} out of range for shape {shape}")
        axes = tuple(sorted({a % ndim for a in axes}))
        return _Plan("int8", 0, False, ndim, math.prod(shape), axes)
    if channel_axes is not None:
        raise LoraError(f"{name}: channel_axes applies to int8 only, not to nf4")
    block_size = DEFAULT_BLOCK_SIZE if block_size is None else block_size
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise LoraError(f"{name}: block_size must be an int >= 2, got {block_size!r}")
    if block_size % 2:
        raise LoraError(f"{name}: block_size must be even (two codes per byte), got {block_size}")
    if double_quant is not None and not isinstance(double_quant, bool):
        raise LoraError(f"{name}: double_quant must be a bool, got {double_quant!r}")
    lead = _nf4_lead_axes(shape, block_size)
    if lead is None and not pad:
        raise LoraError(
            f"{name}: no trailing axes of shape {shape} hold a multiple of block_size="
            f"{block_size} elements; pass pad=True to zero-pad the last axis to "
            f"{-(-shape[-1] // block_size) * block_size}, or use a block size dividing "
            f"{shape[-1]}"
        )
    lead = len(shape) - 1 if lead is None else lead
    n = math.prod(shape[lead:])
    padded = -(-n // block_size) * block_size
    return _Plan(
        "nf4", block_size, True if double_quant is None else double_quant, lead, padded, ()
    )


def _quantize_array(x: jax.Array, plan: _Plan) -> QuantizedArray:
    x32 = x.astype(jnp.float32)
    shape, dtype = tuple(x.shape), jnp.dtype(x.dtype)
    if plan.format == "int8":
        reduce = tuple(a for a in range(x.ndim) if a not in plan.channel_axes)
        scale = jnp.max(jnp.abs(x32), axis=reduce, keepdims=True) / _INT8_MAX
        codes = jnp.clip(jnp.round(x32 / nf4._nonzero(scale)), -_INT8_MAX, _INT8_MAX)
        return QuantizedArray(
            codes.astype(jnp.int8), scale, None, None, "int8", shape, dtype, 0, x.ndim
        )
    lead = shape[: plan.lead_axes]
    flat = x32.reshape(*lead, -1)
    flat = jnp.pad(flat, [(0, 0)] * len(lead) + [(0, plan.padded - flat.shape[-1])])
    blocks = flat.reshape(*lead, -1, plan.block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    scale, scale_scale, scale_offset = absmax, None, None
    if plan.double_quant:
        scale, scale_scale, scale_offset = nf4.fp8_encode(absmax)
        # Codes are chosen against the scale dequantization will use, so each element
        # gets the nearest value it can be decoded to (bitsandbytes uses the exact absmax).
        absmax = nf4.fp8_decode(scale, scale_scale, scale_offset)
    codes = nf4.nf4_encode(flat, absmax, plan.block_size)
    return QuantizedArray(
        codes,
        scale,
        scale_scale,
        scale_offset,
        "nf4",
        shape,
        dtype,
        plan.block_size,
        plan.lead_axes,
    )


_quantize_jit = jax.jit(_quantize_array, static_argnums=1)


@jax.jit
def _all_finite(x: jax.Array) -> jax.Array:
    return jnp.isfinite(x).all()


def quantize(
    x: jax.Array,
    format: Format = "nf4",
    *,
    block_size: int | None = None,
    double_quant: bool | None = None,
    pad: bool = False,
    channel_axes: Sequence[int] | None = None,
) -> QuantizedArray:
    """Quantize one float array (jit-compiled; traceable inside ``jax.jit`` too).

    Args:
      x: a floating array (``jax.eval_shape(quantize, jax.ShapeDtypeStruct(...))`` gives
        the quantized structure without computing it).
      format: ``"nf4"`` or ``"int8"``.
      block_size: NF4 elements per absmax block (default 64, even).
      double_quant: NF4: store the absmax constants in 8 bits (default ``True``).
      pad: NF4: zero-pad the last axis to whole blocks when no trailing group of axes
        holds a multiple of ``block_size`` elements (else that is an error).
      channel_axes: int8: the axes indexing output channels, one scale per index
        (default: the last axis; a 1-D array gets a single scale).

    Non-finite values are not checked here (they propagate into the scales);
    :func:`quantize_base` refuses them.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.linspace(-1.0, 1.0, 4096).reshape(64, 64)
        >>> q = quantize(x, "nf4")
        >>> round(bits_per_param(q), 3), float(jnp.abs(q.dequantize() - x).max()) < 0.07
        (4.141, True)
    """
    if not hasattr(x, "dtype"):
        x = jnp.asarray(x)
    plan = _plan(
        "quantize",
        tuple(np.shape(x)),
        x.dtype,
        format,
        block_size,
        double_quant,
        pad,
        channel_axes,
    )
    return _quantize_jit(x, plan)


def dequantize(q: QuantizedArray, dtype: Any = None) -> jax.Array:
    """``q.dequantize(dtype)``: the float array, in its original dtype by default.

    Example:
        >>> import jax.numpy as jnp
        >>> dequantize(quantize(jnp.full((2, 64), 0.5))).tolist() == [[0.5] * 64] * 2
        True
    """
    if not _is_quantized(q):
        raise LoraError(f"dequantize expects a QuantizedArray, got {type(q).__name__}")
    return q.dequantize(dtype)


def _select(pairs: list[tuple[str, Any]], targets: Any, exclude: Any) -> set[str]:
    """The targeted paths minus the excluded ones."""
    all_paths = [p for p, _ in pairs]
    exclude = as_filters(exclude)
    if isinstance(targets, LoraSpec):
        exclude = exclude + tuple(targets.exclude)
        targets = targets.targets
    if isinstance(targets, Mapping):
        wanted = [p for p, v in targets.items() if isinstance(v, LoraFactors)]
        if not wanted:
            raise LoraError("the LoRA tree given as targets adapts no weight (no LoraFactors)")
        if missing := sorted(set(wanted) - set(all_paths)):
            raise LoraError(
                f"the LoRA tree adapts paths that are not leaves of the base: {missing}"
            )
        selected = set(wanted)
    else:
        selected = set()
        for f in as_filters(targets):
            match = compile_filter(f)
            hit = {p for p, leaf in pairs if match(p, leaf)}
            if not hit:
                raise unmatched_filter(f, all_paths, "quantize target", listing="base")
            selected |= hit
        if not selected:
            raise LoraError("quantize_base: no targets given")
    for f in exclude:
        match = compile_filter(f)
        selected -= {p for p, leaf in pairs if p in selected and match(p, leaf)}
    if not selected:
        raise LoraError("quantize_base: the excludes remove every target; nothing to quantize")
    return selected


def quantize_base(
    base: Any,
    targets: LoraSpec | Mapping[str, Any] | PathFilter | Sequence[PathFilter],
    *,
    format: Format = "nf4",
    block_size: int | None = None,
    double_quant: bool | None = None,
    pad: bool = False,
    exclude: PathFilter | Sequence[PathFilter] = (),
    layouts: Mapping[str, Layout] | None = None,
) -> Any:
    """``base`` with the targeted weights replaced by :class:`QuantizedArray` leaves.

    ``targets`` is a :class:`lorax_fn.LoraSpec` (its targets minus its excludes), a LoRA
    tree from :func:`lorax_fn.split` (exactly the weights it adapts), or path filters
    (globs, regular expressions, callables, as in ``LoraSpec``). Every target is checked
    before any is quantized: a filter matching nothing, a non-float, 1-D, already
    quantized or non-finite leaf, or a shape the block size does not fit raises a
    :class:`lorax_fn.LoraError` naming the path. Other leaves are kept as they are.

    Weights are quantized one at a time, each by one jitted call; a weight with a
    ``NamedSharding`` is quantized in place, its leaves sharded as
    :meth:`QuantizedArray.shardings` says. int8 scales are per
    output channel as laid out by ``layouts[path]`` (e.g. from
    :func:`lorax_fn.infer_layouts`), else :func:`lorax_fn.conventions.default_layout`, else the last
    axis: one scale per index of the layout's out and batch axes. Works under
    ``jax.eval_shape`` to get the quantized structure without quantizing anything,
    e.g. as the target of an orbax restore.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> base = {"dense": {"kernel": jnp.ones((64, 128)), "bias": jnp.zeros(128)}}
        >>> q = quantize_base(base, "**/kernel", format="int8")
        >>> q["dense"]["kernel"], q["dense"]["bias"].shape
        (QuantizedArray(int8, float32[64, 128], 8,704 bytes), (128,))
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(base, is_leaf=_is_quantized)
    pairs = [(path_str(k), leaf) for k, leaf in flat]
    shapes = {p: tuple(np.shape(leaf)) for p, leaf in pairs}
    selected = _select(pairs, targets, exclude)
    layouts = dict(layouts or {})
    plans: dict[str, _Plan] = {}
    for path, leaf in pairs:
        if path not in selected:
            continue
        if _is_quantized(leaf):
            raise LoraError(f"{path}: already quantized ({leaf})")
        shape = tuple(np.shape(leaf))
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise LoraError(
                f"{path}: dtype {dtype} is not floating; only float weights are quantized"
            )
        if len(shape) < 2:
            raise LoraError(
                f"{path}: a {len(shape)}-D leaf (shape {shape}) is not quantized: biases and norm "
                "scales are small and precision-sensitive (QLoRA keeps them in 16 bits); "
                "exclude it"
            )
        channel_axes = None
        if format == "int8":
            layout = layouts.get(path) or default_layout(path, shape, shapes)
            if layout is not None:
                layout.check(path, shape)
                channel_axes = layout.batch_axes + layout.out_axes
        plans[path] = _plan(path, shape, dtype, format, block_size, double_quant, pad, channel_axes)
    for path, leaf in pairs:
        if path in plans and not isinstance(ok := _all_finite(leaf), jax.core.Tracer) and not ok:
            raise LoraError(f"{path}: has NaN or Inf values; refusing to quantize it")
    leaves = [_quantize_leaf(leaf, plans[p]) if p in plans else leaf for p, leaf in pairs]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _quantize_leaf(x: Any, plan: _Plan) -> QuantizedArray:
    sharding = getattr(x, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return _quantize_jit(x, plan)
    # A sharded weight is quantized where it lies: each device only ever holds its own
    # shard (and its codes), never the whole weight.
    out = jax.eval_shape(_quantize_jit, x, plan).shardings(sharding)
    return jax.jit(_quantize_array, static_argnums=1, out_shardings=out)(x, plan)


def dequantize_base(tree: Any, dtype: Any = None) -> Any:
    """``tree`` with every :class:`QuantizedArray` turned back into a float array.

    Each comes back in ``dtype`` (default: its original dtype), one compiled call per
    weight. This is the float model for export or serving: it differs from the
    original by the quantization error.

    Example:
        >>> import jax.numpy as jnp
        >>> base = {"w": jnp.full((4, 64), 2.0), "b": jnp.zeros(64)}
        >>> float_base = dequantize_base(quantize_base(base, "w"))
        >>> bool((float_base["w"] == base["w"]).all()), float_base["b"].shape
        (True, (64,))
    """
    if dtype is not None and not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise LoraError(f"dequantize_base: dtype must be floating, got {dtype}")
    return jax.tree.map(
        lambda x: x.dequantize(dtype) if _is_quantized(x) else x, tree, is_leaf=_is_quantized
    )


def quantized_shardings(tree: Any, shardings: Any) -> Any:
    """Shardings for a quantized base from those of the float base it came from.

    ``shardings`` has the float base's structure (e.g. ``lorax_fn.sharding.fsdp_shardings(base,
    mesh)`` or your model's own); each :class:`QuantizedArray` in ``tree`` gets
    :meth:`QuantizedArray.shardings` of its weight's sharding, other leaves keep theirs.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> mesh = jax.make_mesh((1,), ("data",))
        >>> base = {"w": jnp.ones((8, 64)), "b": jnp.zeros(64)}
        >>> sh = {"w": NamedSharding(mesh, P("data")), "b": NamedSharding(mesh, P())}
        >>> placed = jax.device_put(quantize_base(base, "w"),
        ...                         quantized_shardings(quantize_base(base, "w"), sh))
        >>> placed["w"].codes.sharding.spec
        P('data', None)
    """
    return jax.tree.map(
        lambda x, s: x.shardings(s) if _is_quantized(x) else s,
        tree,
        shardings,
        is_leaf=_is_quantized,
    )


def storage_bytes(tree: Any) -> int:
    """Bytes of every array in ``tree``, quantized ones by what they store.

    Works on abstract trees (``jax.ShapeDtypeStruct`` leaves from ``jax.eval_shape``).

    Example:
        >>> import jax.numpy as jnp
        >>> storage_bytes({"w": quantize(jnp.ones((128, 128)), "int8"), "b": jnp.zeros(128)})
        17408
    """
    return sum(_leaf_bytes(x) for x in jax.tree.leaves(tree))


def bits_per_param(tree: Any) -> float:
    """Stored bits per original element over ``tree`` (one array, or a whole base).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> w = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)
        >>> for fmt, dq in (("nf4", True), ("nf4", False)):
        ...     print(fmt, dq, round(bits_per_param(jax.eval_shape(
        ...         lambda w: quantize(w, fmt, double_quant=dq), w)), 4))
        nf4 True 4.127
        nf4 False 4.5
    """
    leaves = jax.tree.leaves(tree, is_leaf=_is_quantized)
    params = sum(x.size if _is_quantized(x) else math.prod(np.shape(x)) for x in leaves)
    if not params:
        raise LoraError("bits_per_param: the tree holds no elements")
    return 8 * storage_bytes(tree) / params
