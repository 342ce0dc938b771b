"""Quantized frozen base: NF4 (QLoRA) and int8 storage, checked against numpy references."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lorax_fn
from lorax_fn import LoraError
from lorax_fn.quant.nf4 import FP8_RANGE, NF4_CODEBOOK, fp8_decode
from lorax_fn.quant.quantized import (
    QuantizedArray,
    bits_per_param,
    dequantize,
    dequantize_base,
    quantize,
    quantize_base,
    quantized_shardings,
    storage_bytes,
)

MAX_GAP = float(np.max(np.diff(NF4_CODEBOOK)))


def normal(shape, seed=0, scale=0.02):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def ref_blocks(x, block, lead):
    """The weight as (blocks, block) in the documented order: trailing axes flattened."""
    x = np.asarray(x, np.float32)
    flat = x.reshape(x.shape[:lead] + (-1,))
    pad = -flat.shape[-1] % block
    flat = np.pad(flat, [(0, 0)] * lead + [(0, pad)])
    return flat.reshape(-1, block)


def unpack_codes(q):
    """The documented packing, read with numpy: high nibble first."""
    codes = np.asarray(q.codes).reshape(-1)
    return np.stack([codes >> 4, codes & 0xF], axis=-1).reshape(-1)


def reconstructed_scale(q):
    scale = q.scale
    if q.double_quant:
        scale = fp8_decode(q.scale, q.scale_scale, q.scale_offset)
    return np.asarray(scale, np.float32).reshape(-1)


# --- the codebook -----------------------------------------------------------------------


def test_nf4_codebook_is_qlora_normal_float():
    # QLoRA's construction (bitsandbytes create_normal_map, offset 0.9677083): the 8
    # positive and 7 negative normal quantiles of evenly spaced probabilities, plus 0,
    # normalised to [-1, 1].
    from scipy.stats import norm

    offset = 0.9677083
    positive = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    negative = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    values = np.sort(np.concatenate([positive, [0.0], negative]))
    np.testing.assert_allclose(NF4_CODEBOOK, values / values.max(), atol=2e-7)
    assert NF4_CODEBOOK[0] == -1.0 and NF4_CODEBOOK[7] == 0.0 and NF4_CODEBOOK[15] == 1.0
    assert NF4_CODEBOOK.dtype == np.float32 and np.all(np.diff(NF4_CODEBOOK) > 0)


# --- error bounds against numpy references ------------------------------------------------


@pytest.mark.parametrize("shape", [(32, 256), (4, 6, 48), (3, 100)])
def test_nf4_without_double_quant_is_nearest_code_times_block_absmax(shape):
    pad = shape == (3, 100)
    x = normal(shape, seed=1)
    q = quantize(x, "nf4", double_quant=False, pad=pad)
    assert q.codes.dtype == jnp.uint8 and q.scale.dtype == jnp.float32
    blocks = ref_blocks(x, 64, q.lead_axes)
    absmax = np.abs(blocks).max(axis=1)
    np.testing.assert_array_equal(reconstructed_scale(q), absmax)
    # Decoding the packed codes by hand gives the same array as dequantize().
    by_hand = NF4_CODEBOOK[unpack_codes(q)].reshape(blocks.shape) * absmax[:, None]
    np.testing.assert_array_equal(ref_blocks(q.dequantize(), 64, q.lead_axes), by_hand)
    err = np.abs(by_hand - blocks)
    best = np.abs(NF4_CODEBOOK * absmax[:, None, None] - blocks[..., None]).min(axis=-1)
    assert np.all(err <= best + 1e-7 * absmax[:, None])
    assert np.all(err <= MAX_GAP / 2 * absmax[:, None] * (1 + 1e-6))


def test_nf4_double_quant_error_bound():
    x = normal((64, 512), seed=2) * jnp.linspace(0.1, 3.0, 512)  # scales vary a lot
    q = quantize(x, "nf4")
    assert q.double_quant and q.scale.dtype == jnp.float8_e4m3fn
    blocks = ref_blocks(x, 64, q.lead_axes)
    absmax = np.abs(blocks).max(axis=1)
    # FP8 E4M3 of (absmax - mean) / group_absmax * 256: half an ulp is at most 1/16 of the
    # value (3 mantissa bits) or 2^-10 (subnormals), relative to the 256 range.
    centred = absmax - absmax.mean()
    groups = np.abs(np.pad(centred, (0, -centred.size % 256))).reshape(-1, 256).max(axis=1)
    group_of = np.repeat(groups, 256)[: centred.size]
    dq_bound = np.maximum(np.abs(centred) / 16, group_of / FP8_RANGE * 2**-10) + 1e-6 * absmax
    scale = reconstructed_scale(q)
    assert np.all(np.abs(scale - absmax) <= dq_bound)
    assert np.any(scale != absmax)  # the bound is exercised, not trivially met
    got = ref_blocks(q.dequantize(), 64, q.lead_axes)
    err = np.abs(got - blocks)
    assert np.all(err <= MAX_GAP / 2 * absmax[:, None] + dq_bound[:, None] + 1e-6)
    # Codes are the nearest values for the scale dequantization uses.
    best = np.abs(NF4_CODEBOOK * scale[:, None, None] - blocks[..., None]).min(axis=-1)
    assert np.all(err <= best + 1e-6 * np.abs(scale[:, None]))


def test_double_quant_constants_of_a_slice_decode_against_the_whole_array():
    # One layer of a stacked weight: its absmax codes start mid-group (100·2 = 200 per
    # layer, groups of 256), so decoding needs the slice's row-major offset.
    q = quantize(normal((3, 100, 128), seed=16) * jnp.arange(1.0, 4.0)[:, None, None])
    whole = fp8_decode(q.scale, q.scale_scale, q.scale_offset)
    per_layer = math.prod(q.scale.shape[1:])
    for layer in range(3):
        part = fp8_decode(q.scale[layer], q.scale_scale, q.scale_offset, layer * per_layer)
        np.testing.assert_array_equal(part, whole[layer])
        traced = jax.jit(fp8_decode)(
            q.scale[layer], q.scale_scale, q.scale_offset, jnp.int32(layer * per_layer)
        )
        np.testing.assert_array_equal(traced, whole[layer])
    assert np.any(fp8_decode(q.scale[2], q.scale_scale, q.scale_offset) != whole[2])


def test_int8_error_at_most_half_a_step_per_channel():
    x = normal((96, 40), seed=3) * jnp.arange(1.0, 41.0)  # channels of different ranges
    q = quantize(x, "int8")
    assert q.codes.dtype == jnp.int8 and q.scale.shape == (1, 40)
    step = np.abs(np.asarray(x)).max(axis=0) / 127
    np.testing.assert_allclose(np.asarray(q.scale)[0], step, rtol=3e-7)  # ~1 ulp
    err = np.abs(np.asarray(q.dequantize()) - np.asarray(x))
    assert np.all(err <= step / 2 * (1 + 1e-6))
    assert np.abs(np.asarray(q.codes)).max() == 127


def test_representable_arrays_round_trip_exactly():
    rng = np.random.default_rng(4)
    # int8: integer multiples of a power of two, every channel reaching ±127.
    k = rng.integers(-127, 128, (16, 8)).astype(np.float32)
    k[0] = 127
    x = jnp.asarray(k * 2.0**-7)
    np.testing.assert_array_equal(quantize(x, "int8").dequantize(), x)
    # NF4: block absmax times codebook values, each block reaching ±1. Without double
    # quantization any absmax is exact; with it, absmax 1 and 3 (mean 2, offsets ±1).
    idx = rng.integers(0, 16, (8, 2, 64))
    idx[..., 0] = rng.choice([0, 15], (8, 2))
    for dq, absmax in ((False, rng.uniform(0.01, 5.0, (8, 2, 1))), (True, [[[1.0], [3.0]]])):
        x = jnp.asarray((NF4_CODEBOOK[idx] * np.float32(absmax)).reshape(8, 128), jnp.float32)
        q = quantize(x, "nf4", double_quant=dq)
        np.testing.assert_array_equal(q.dequantize(), x)
        np.testing.assert_array_equal(unpack_codes(q), idx.reshape(-1))


def test_bfloat16_keeps_its_dtype():
    x = normal((8, 128), seed=5).astype(jnp.bfloat16)
    for fmt in ("nf4", "int8"):
        q = quantize(x, fmt)
        assert q.dtype == jnp.bfloat16 and q.dequantize().dtype == jnp.bfloat16
        assert q.dequantize(jnp.float32).dtype == jnp.float32
        assert dequantize(q).dtype == jnp.bfloat16


def test_all_zero_blocks_and_channels_stay_zero():
    x = jnp.zeros((4, 128)).at[0, :64].set(1.0)
    for fmt in ("nf4", "int8"):
        out = quantize(x, fmt).dequantize()
        assert bool(jnp.isfinite(out).all())
        np.testing.assert_array_equal(out[1:], 0.0)


# --- layout -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "kwargs", "codes", "scale"),
    [
        ((8, 128), {}, (8, 64), (8, 2)),
        ((2, 8, 128), {}, (2, 8, 64), (2, 8, 2)),
        ((16, 12, 32), {}, (16, 192), (16, 6)),  # head_dim 32 < 64: (heads, head_dim) flattened
        ((96, 2), {}, (96,), (3,)),  # classifier-like: everything flattened
        ((3, 100), {"pad": True}, (3, 64), (3, 2)),
        ((8, 128), {"block_size": 32}, (8, 64), (8, 4)),
    ],
)
def test_nf4_layout_keeps_leading_axes(shape, kwargs, codes, scale):
    q = quantize(normal(shape), "nf4", **kwargs)
    assert q.codes.shape == codes and q.scale.shape == scale and q.shape == shape
    assert q.dequantize().shape == shape


# --- bits per parameter -------------------------------------------------------------------


def test_bits_per_param_of_a_4096_square_weight():
    w = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)
    n = 4096 * 4096
    nf4_dq = jax.eval_shape(lambda w: quantize(w, "nf4"), w)
    nf4_plain = jax.eval_shape(lambda w: quantize(w, "nf4", double_quant=False), w)
    int8 = jax.eval_shape(lambda w: quantize(w, "int8"), w)
    # codes + one fp8 per 64 + one fp32 per 64·256 + the mean
    assert nf4_dq.nbytes == n // 2 + n // 64 + 4 * math.ceil(n / 64 / 256) + 4
    assert bits_per_param(nf4_dq) <= 4.127 and nf4_dq.nbytes / n <= 0.52
    assert bits_per_param(nf4_plain) == 4.5
    assert int8.nbytes / n <= 1.01
    # The abstract accounting is what a real array stores.
    real = quantize(normal((256, 512)), "nf4")
    assert real.nbytes == jax.eval_shape(lambda w: quantize(w, "nf4"), real_shape(real)).nbytes
    assert real.nbytes == sum(a.nbytes for a in jax.tree.leaves(real))


def real_shape(q):
    return jax.ShapeDtypeStruct(q.shape, q.dtype)


def test_bits_per_param_of_a_tree_counts_float_leaves_at_their_size():
    base = {"w": normal((64, 256)), "b": jnp.zeros(256)}
    q = quantize_base(base, "w", format="int8")
    assert storage_bytes(q) == 64 * 256 + 256 * 4 + 256 * 4
    assert bits_per_param(q) == 8 * storage_bytes(q) / (64 * 256 + 256)


# --- transformations: jit, donation, sharding, checkpoints ---------------------------------


def test_jit_round_trip_and_donation():
    x = normal((32, 128), seed=6)
    # Without double quantization every block (channel) keeps its absmax element at ±1
    # (±127), so re-quantizing twice the values gives the same codes.
    for fmt, kwargs in (("nf4", {"double_quant": False}), ("int8", {})):
        q = quantize(x, fmt, **kwargs)
        inside = jax.jit(lambda x, fmt=fmt, kwargs=kwargs: quantize(x, fmt, **kwargs))(x)
        for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(inside), strict=True):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(jax.jit(dequantize)(q), q.dequantize())
        before, codes = q.dequantize(), q.codes + 0  # a copy: a numpy view blocks donation
        rescale = jax.jit(
            lambda q, fmt=fmt, kwargs=kwargs: quantize(2 * q.dequantize(), fmt, **kwargs),
            donate_argnums=0,
        )
        doubled = rescale(q)
        assert q.codes.is_deleted() and q.scale.is_deleted()
        np.testing.assert_array_equal(doubled.codes, codes)
        np.testing.assert_allclose(doubled.dequantize(), 2 * before, rtol=3e-7, atol=0)


def _collectives(hlo: str) -> list[str]:
    ops = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
    return [op for op in ops if op in hlo]


@pytest.mark.parametrize(
    ("fmt", "shape", "spec", "codes_spec", "scale_spec"),
    [
        ("nf4", (64, 1024), P("x", None), P("x", None), P("x", None)),
        ("nf4", (64, 1024), P(None, "x"), P(None, "x"), P(None, "x")),  # 128 per shard: 2 blocks
        ("nf4", (64, 256), P(None, "x"), P(None, "x"), P(None, None)),  # 32 per shard < a block
        ("nf4", (8, 16, 32), P(None, "x", None), P(None, "x"), P(None, "x")),  # flattened (16, 32)
        ("nf4", (8, 16, 32), P(None, None, "x"), P(None, None), P(None, None)),  # not contiguous
        ("int8", (64, 1024), P("x", None), P("x", None), P(None, None)),
        ("int8", (64, 1024), P(None, "x"), P(None, "x"), P(None, "x")),
    ],
)
def test_sharded_like_the_weight(fmt, shape, spec, codes_spec, scale_spec):
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    x = normal(shape, seed=7)
    weight_sharding = NamedSharding(mesh, spec)
    q = quantize(x, fmt)
    placed = jax.device_put(q, q.shardings(weight_sharding))
    assert placed.codes.sharding.spec == codes_spec and placed.scale.sharding.spec == scale_spec
    assert isinstance(placed, QuantizedArray) and placed.shape == shape
    dequant = jax.jit(dequantize, out_shardings=weight_sharding)
    # Another program: equal up to one rounding of the scale arithmetic.
    np.testing.assert_allclose(dequant(placed), q.dequantize(), rtol=3e-7, atol=0)
    assert _collectives(dequant.lower(placed).compile().as_text()) == []


def test_quantized_shardings_follow_the_float_base():
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    base = {"w": normal((64, 512)), "v": normal((512, 64)), "b": jnp.zeros(512)}
    float_shardings = lorax_fn.sharding.fsdp_shardings(base, mesh, "x")
    q = quantize_base(base, ["w", "v"])
    placed = jax.device_put(q, quantized_shardings(q, float_shardings))
    assert placed["w"].codes.sharding.spec == float_shardings["w"].spec == P(None, "x")
    assert placed["v"].codes.sharding.spec == float_shardings["v"].spec == P("x", None)
    assert placed["b"].sharding == float_shardings["b"]
    for k in ("w", "v"):
        np.testing.assert_array_equal(placed[k].dequantize(), q[k].dequantize())


def test_orbax_round_trip(tmp_path):
    base = {
        "a": {"kernel": normal((32, 1024), seed=8), "bias": jnp.zeros(1024)},
        "b": {"kernel": normal((128, 64), seed=9)},
    }
    q = quantize_base(base, "a/kernel")
    q = quantize_base(q, "b/kernel", format="int8")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "q", q)
    # The abstract target comes from the float base's shapes alone.
    abstract_base = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base)
    target = jax.eval_shape(
        lambda b: quantize_base(quantize_base(b, "a/kernel"), "b/kernel", format="int8"),
        abstract_base,
    )
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    shardings = quantized_shardings(
        target, lorax_fn.sharding.fsdp_shardings(abstract_base, mesh, "x")
    )
    target = jax.tree.map(
        lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s), target, shardings
    )
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(tmp_path / "q", target)
    assert jax.tree.structure(restored) == jax.tree.structure(q)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(q), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    assert restored["a"]["kernel"].codes.sharding.spec == P(None, "x")
    np.testing.assert_array_equal(
        dequantize_base(restored)["b"]["kernel"], dequantize_base(q)["b"]["kernel"]
    )


# --- quantize_base ------------------------------------------------------------------------


def attention_params():
    return {
        "params": {
            "attn": {
                "query": {"kernel": normal((64, 4, 32), 10), "bias": jnp.zeros((4, 32))},
                "out": {"kernel": normal((4, 32, 64), 11), "bias": jnp.zeros(64)},
            },
            "mlp": {"kernel": normal((64, 256), 12), "bias": jnp.zeros(256)},
            "head": {"kernel": normal((64, 2), 13), "bias": jnp.zeros(2)},
            "step": jnp.zeros((), jnp.int32),
        }
    }


def test_quantize_base_with_a_lora_tree_quantizes_exactly_the_adapted_weights():
    params = attention_params()
    spec = lorax_fn.LoraSpec(targets=["**/query/kernel", "**/mlp/kernel"], rank=2)
    base, lt = lorax_fn.split(params, spec, key=jax.random.key(0))
    q = quantize_base(base, lt)
    quantized = {
        p for p, _ in jax.tree_util.tree_flatten_with_path(q, is_leaf=_is_q)[0] if _is_q(_)
    }
    assert len(quantized) == 2
    assert isinstance(q["params"]["attn"]["query"]["kernel"], QuantizedArray)
    assert isinstance(q["params"]["mlp"]["kernel"], QuantizedArray)
    assert q["params"]["attn"]["out"]["kernel"] is base["params"]["attn"]["out"]["kernel"]
    assert q["params"]["head"]["kernel"] is base["params"]["head"]["kernel"]
    # Same selection from the spec itself.
    from_spec = quantize_base(base, spec)
    assert jax.tree.structure(from_spec, is_leaf=_is_q) == jax.tree.structure(q, is_leaf=_is_q)
    back = dequantize_base(q)
    for path in ("attn/query/kernel", "mlp/kernel"):
        w = _get(base, path)
        assert _get(back, path).shape == w.shape
        assert float(jnp.abs(_get(back, path) - w).max()) <= 0.15 * float(jnp.abs(w).max())


def _is_q(x):
    return isinstance(x, QuantizedArray)


def _get(tree, path):
    for k in ("params/" + path).split("/"):
        tree = tree[k]
    return tree


def test_quantize_base_int8_scales_follow_the_layout():
    params = attention_params()
    q = quantize_base(params, ["**/attn/*/kernel", "**/mlp/kernel"], format="int8")
    assert _get(q, "attn/query/kernel").scale.shape == (1, 4, 32)  # out axes (heads, head_dim)
    assert _get(q, "attn/out/kernel").scale.shape == (1, 1, 64)
    assert _get(q, "mlp/kernel").scale.shape == (1, 256)
    stacked = {"w": normal((3, 16, 8))}
    layout = lorax_fn.Layout(in_axes=(1,), out_axes=(2,), batch_axes=(0,))
    assert quantize_base(stacked, "w", format="int8", layouts={"w": layout})["w"].scale.shape == (
        3,
        1,
        8,
    )


def test_quantize_base_with_exclude_and_under_eval_shape():
    params = attention_params()
    q = jax.eval_shape(lambda p: quantize_base(p, "**/kernel", exclude="**/head/**"), params)
    assert not _is_q(q["params"]["head"]["kernel"])
    assert _is_q(q["params"]["mlp"]["kernel"])
    assert isinstance(q["params"]["mlp"]["kernel"].codes, jax.ShapeDtypeStruct)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: quantize(jnp.ones((4, 64)), "nf3"), "unknown format 'nf3'"),
        (lambda: quantize(jnp.ones((4, 64), jnp.int32)), "int32 is not floating"),
        (lambda: quantize(jnp.ones((3, 5))), "pass pad=True"),
        (lambda: quantize(jnp.ones((4, 64)), block_size=7), "block_size must be even"),
        (lambda: quantize(jnp.ones((4, 64)), block_size=0), "block_size must be an int >= 2"),
        (lambda: quantize(jnp.ones(())), "scalar"),
        (lambda: quantize(jnp.ones((4, 64)), double_quant="yes"), "double_quant must be a bool"),
        (lambda: quantize(jnp.ones((4, 64)), "int8", block_size=64), "apply to nf4 only"),
        (lambda: quantize(jnp.ones((4, 64)), "int8", channel_axes=(2,)), "out of range"),
        (lambda: quantize(jnp.ones((4, 64)), channel_axes=(1,)), "int8 only"),
        (lambda: quantize(jnp.ones((4, 64))).dequantize(jnp.int8), "must be floating"),
        (lambda: dequantize(jnp.ones(3)), "expects a QuantizedArray"),
    ],
)
def test_bad_arguments(call, message):
    with pytest.raises(LoraError, match=message):
        call()


@pytest.mark.parametrize(
    ("targets", "kwargs", "message"),
    [
        ("**/qurey/kernel", {}, r"(?s)matches no leaf.*params/attn/query/kernel"),
        ("**/mlp/bias", {}, "params/mlp/bias: a 1-D leaf"),
        ("params/step", {}, "params/step: dtype int32 is not floating"),
        ("**/head/kernel", {"block_size": 256}, "params/head/kernel: no trailing axes"),
        ("**/mlp/kernel", {"format": "fp4"}, "params/mlp/kernel: unknown format"),
        ({"params/mlp/kernel": jnp.ones(3)}, {}, "adapts no weight"),
        ("**/mlp/kernel", {"exclude": "**/mlp/**"}, "remove every target"),
    ],
)
def test_quantize_base_refuses_bad_targets(targets, kwargs, message):
    with pytest.raises(LoraError, match=message):
        quantize_base(attention_params(), targets, **kwargs)


def test_quantize_base_refuses_nan_and_requantizing():
    params = attention_params()
    params["params"]["mlp"]["kernel"] = params["params"]["mlp"]["kernel"].at[3, 4].set(jnp.nan)
    with pytest.raises(LoraError, match="params/mlp/kernel: has NaN or Inf"):
        quantize_base(params, "**/kernel")
    q = quantize_base(attention_params(), "**/mlp/kernel")
    with pytest.raises(LoraError, match="params/mlp/kernel: already quantized"):
        quantize_base(q, "**/mlp/kernel")


def test_quantize_base_on_an_nnx_state():
    from flax import nnx

    from lorax_fn.paths import path_str

    model = nnx.Linear(64, 128, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    q = quantize_base(state, "**/kernel")
    leaves = {path_str(k): x for k, x in jax.tree_util.tree_flatten_with_path(q, is_leaf=_is_q)[0]}
    assert _is_q(leaves["kernel"]) and leaves["kernel"].shape == (64, 128)
    assert not _is_q(leaves["bias"])
    x = normal((2, 64), seed=14, scale=1.0)
    got = nnx.merge(graphdef, dequantize_base(q))(x)
    want = x @ leaves["kernel"].dequantize() + leaves["bias"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_quantize_base_keeps_a_sharded_weight_sharded():
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    x = normal((64, 512), seed=15)
    for spec, fmt, kwargs in ((P("x", None), "int8", {}), (P(None, "x"), "nf4", {})):
        sharded = {"w": jax.device_put(x, NamedSharding(mesh, spec))}
        q = quantize_base(sharded, "w", format=fmt, **kwargs)["w"]
        want = quantize(x, fmt, **kwargs)
        expected = want.shardings(NamedSharding(mesh, spec))
        assert q.codes.sharding.spec == spec
        for got, leaf in zip(jax.tree.leaves(q), jax.tree.leaves(expected), strict=True):
            assert got.sharding.is_equivalent_to(leaf, got.ndim)
        if kwargs.get("double_quant", True) and fmt == "nf4":
            # The mean of the absmax constants is summed in another order: the scales
            # agree to float rounding, the codes wherever an element is not at a tie.
            scale = reconstructed_scale(q)
            np.testing.assert_allclose(scale, reconstructed_scale(want), rtol=1e-6)
            v = ref_blocks(x, 64, q.lead_axes) / scale[:, None]
            mid = (NF4_CODEBOOK[1:] + NF4_CODEBOOK[:-1]) / 2
            tie = np.abs(v.reshape(-1)[:, None] - mid).min(axis=1) < 1e-5
            differ = unpack_codes(q) != unpack_codes(want)
            assert not np.any(differ & ~tie)
        else:
            np.testing.assert_array_equal(q.codes, want.codes)
            np.testing.assert_array_equal(q.dequantize(), want.dequantize())


def test_count_params_counts_a_quantized_weight_by_its_original_parameters():
    params = {"w": jnp.ones((64, 128)), "v": jnp.ones((128, 64))}
    base, lt = lorax_fn.split(params, lorax_fn.LoraSpec("w", rank=4), key=jax.random.key(0))
    qbase = lorax_fn.quantize_base(base, lt)
    plain, quantized = lorax_fn.count_params(base, lt), lorax_fn.count_params(qbase, lt)
    assert (quantized.trainable, quantized.total) == (plain.trainable, plain.total)
    w_bytes = 64 * 128 * 4
    assert quantized.total_bytes == plain.total_bytes - w_bytes + qbase["w"].nbytes
    assert "(64, 128)" in lorax_fn.summary(qbase, lt)


def test_describe_shows_a_quantized_weight_as_one_row():
    base = {"w": jnp.ones((64, 64)), "b": jnp.zeros(64)}
    table = lorax_fn.describe(lorax_fn.quantize_base(base, "w"))
    lines = table.splitlines()
    assert len(lines) == 3 and "codes" not in table
    assert lines[2].split() == ["w", "(64,", "64)", "float32", "as", "nf4"]
    assert lines[1].split() == ["b", "(64,)", "float32"]
