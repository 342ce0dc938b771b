"""Data parallelism on 8 virtual CPU devices: pmap, sharded jit, factor shardings."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import lorax_fn
from examples import data_parallel
from lorax_fn import Layout, LoraError, LoraFactors, LoraSpec

AUTO = (AxisType.Auto,)


def test_conftest_gives_eight_devices():
    assert jax.device_count() == 8


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="out")(nn.gelu(nn.Dense(32, name="hidden")(x)))


def make_step(tx, axis_name=None):
    return data_parallel.make_step(MLP().apply, tx, axis_name)


def test_pmap_and_sharded_jit_match_single_device_training():
    variables = MLP().init(jax.random.key(0), jnp.ones((1, 16)))
    spec = LoraSpec(targets="**/kernel", rank=4, trainable="params/out/bias")
    base, lt0 = lorax_fn.split(variables, spec, key=jax.random.key(1))
    tx = lorax_fn.optimizer(optax.adam(1e-2), lt0)
    rng = np.random.default_rng(0)
    data = [
        (rng.normal(size=(32, 16)).astype(np.float32), rng.normal(size=(32, 4)).astype(np.float32))
        for _ in range(4)
    ]

    step = jax.jit(make_step(tx))
    lt, state = lt0, tx.init(lt0)
    for x, y in data:
        lt, state, _ = step(base, lt, state, x, y)
    single = lt

    pstep = jax.pmap(make_step(tx, "batch"), axis_name="batch")
    rbase, lt, state = lorax_fn.parallel.replicate((base, lt0, tx.init(lt0)))
    assert jax.tree.leaves(lt)[0].shape[0] == 8
    for x, y in data:
        lt, state, _ = pstep(rbase, lt, state, *lorax_fn.parallel.shard_batch((x, y)))
    pmapped = lorax_fn.parallel.unreplicate(lt)

    mesh = jax.make_mesh((8,), ("data",), axis_types=AUTO)
    base_sh = lorax_fn.sharding.fsdp_shardings(base, mesh, "data")
    sbase = jax.device_put(base, base_sh)
    assert sbase["params"]["hidden"]["kernel"].sharding.spec == P(None, "data")  # (16, 32)
    assert sbase["params"]["out"]["kernel"].sharding.spec == P("data", None)  # (32, 4)
    lt = jax.device_put(lt0, lorax_fn.lora_shardings(lt0, base_sh))
    assert lt["params/hidden/kernel"].b.sharding.spec == P(None, "data")
    assert lt["params/out/kernel"].a.sharding.spec == P("data", None)
    state = tx.init(lt)
    sstep = jax.jit(make_step(tx))
    for x, y in data:
        batch = lorax_fn.sharding.put_batch((x, y), mesh)
        assert batch[0].sharding.spec == P("data")
        lt, state, _ = sstep(sbase, lt, state, *batch)
    sharded = lt

    for other in (pmapped, sharded):
        assert jax.tree.structure(other) == jax.tree.structure(single)
        for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(other), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert not np.allclose(single["params/hidden/kernel"].b, 0)


def test_replicate_round_trip_keeps_the_lora_tree():
    _, lt = lorax_fn.split({"w": jnp.ones((8, 4))}, LoraSpec("w", rank=2), key=jax.random.key(0))
    back = lorax_fn.parallel.unreplicate(lorax_fn.parallel.replicate(lt))
    assert isinstance(back["w"], LoraFactors) and back["w"].layout == lt["w"].layout
    np.testing.assert_array_equal(back["w"].a, lt["w"].a)
    r = lorax_fn.parallel.replicate(lt, devices=jax.local_devices()[:2])
    assert r["w"].a.shape == (2, 8, 2)


def test_batch_splitting_errors_name_the_leaf():
    with pytest.raises(LoraError, match=r"batch leaf y: .*\(12, 2\).* not divisible by 8"):
        lorax_fn.parallel.shard_batch({"x": np.ones((16, 2)), "y": np.ones((12, 2))})
    mesh = jax.make_mesh((8,), ("data",), axis_types=AUTO)
    with pytest.raises(LoraError, match=r"batch leaf 1: .*\(4,\)"):
        lorax_fn.sharding.put_batch((np.ones((16, 2)), np.ones(4)), mesh)
    with pytest.raises(LoraError, match=r"mesh axes \['batch'\] not in the mesh"):
        lorax_fn.sharding.put_batch(np.ones(16), mesh, "batch")


def test_fsdp_picks_the_largest_divisible_axis():
    mesh = jax.make_mesh((8,), ("data",), axis_types=AUTO)
    tree = {
        "tall": jnp.ones((64, 16)),
        "tie": jnp.ones((16, 16)),
        "odd": jnp.ones((3, 5)),
        "bias": jnp.ones(16),
        "scalar": jnp.ones(()),
        "stack": jnp.ones((2, 8, 24)),
    }
    specs = {k: s.spec for k, s in lorax_fn.sharding.fsdp_shardings(tree, mesh).items()}
    assert specs == {
        "tall": P("data", None),
        "tie": P("data", None),
        "odd": P(),
        "bias": P("data"),
        "scalar": P(),
        "stack": P(None, None, "data"),
    }
    small = lorax_fn.sharding.fsdp_shardings(tree, mesh, min_size=17)
    assert small["bias"].spec == P() and small["tall"].spec == P("data", None)


@pytest.fixture(scope="module")
def mesh2d():
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=AUTO * 2)


def specs_of(shardings):
    return {
        p: (s.a.spec, s.b.spec) if isinstance(s, LoraFactors) else s.spec
        for p, s in shardings.items()
    }


def test_factor_specs_for_a_2d_kernel(mesh2d):
    _, lt = lorax_fn.split(
        {"d": {"kernel": jnp.ones((8, 16))}}, LoraSpec("d/kernel", rank=2), key=jax.random.key(0)
    )
    sh = lorax_fn.lora_shardings(lt, {"d": {"kernel": P("data", "model")}}, mesh2d)
    assert specs_of(sh) == {"d/kernel": (P("data", None), P(None, "model"))}
    placed = jax.device_put(lt, sh)
    assert placed["d/kernel"].a.addressable_shards[0].data.shape == (4, 2)
    assert placed["d/kernel"].b.addressable_shards[0].data.shape == (2, 4)


def test_factor_specs_for_attention_kernels(mesh2d):
    params = {
        "attn": {"query": {"kernel": jnp.ones((16, 4, 8))}, "out": {"kernel": jnp.ones((4, 8, 16))}}
    }
    _, lt = lorax_fn.split(params, LoraSpec("attn/*/kernel", rank=2), key=jax.random.key(0))
    base_specs = {
        "attn": {
            "query": {"kernel": P("data", "model", None)},
            "out": {"kernel": P("model", None, "data")},
        }
    }
    sh = lorax_fn.lora_shardings(lt, base_specs, mesh2d)
    # query (d, heads, head_dim): fan-in d -> A (d, r); fan-out heads·head_dim -> B (r, h, hd).
    assert specs_of(sh)["attn/query/kernel"] == (P("data", None), P(None, "model", None))
    # out (heads, head_dim, d): fan-in heads·head_dim -> A (h, hd, r); B (r, d).
    assert specs_of(sh)["attn/out/kernel"] == (P("model", None, None), P(None, "data"))
    jax.device_put(lt, sh)


def test_factor_specs_for_a_scan_stacked_kernel(mesh2d):
    path = "layers/mlp/kernel"
    _, lt = lorax_fn.split(
        {"layers": {"mlp": {"kernel": jnp.ones((2, 8, 16))}}},
        LoraSpec(path, rank=2),
        key=jax.random.key(0),
        layouts={path: Layout(in_axes=(1,), out_axes=(2,), batch_axes=(0,))},
    )
    assert lt[path].a.shape == (2, 8, 2) and lt[path].b.shape == (2, 2, 16)
    for base_spec, want in [
        (P("data", None, "model"), (P("data", None, None), P("data", None, "model"))),
        (P(None, "model"), (P(None, "model", None), P(None, None, None))),
    ]:
        sh = lorax_fn.lora_shardings(lt, {"layers": {"mlp": {"kernel": base_spec}}}, mesh2d)
        assert specs_of(sh)[path] == want
        jax.device_put(lt, sh)


def logical(*names):
    return nn.with_logical_partitioning(nn.initializers.lecun_normal(), names)


class Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.Dense(32, kernel_init=logical("embed", "mlp"), name="up")(x)
        return x + nn.Dense(16, kernel_init=logical("mlp", "embed"), name="down")(h), None


class Logical(nn.Module):
    """Logically partitioned: an embedding projection and an nn.scan stack (layer axis)."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(16, kernel_init=logical("vocab", "embed"), name="embed")(x)
        stack = nn.scan(
            Layer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=2,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = stack(name="layers")(x, None)
        return x


def test_logically_partitioned_linen_model(mesh2d):
    rules = (("vocab", None), ("embed", "data"), ("mlp", "model"), ("layers", None))
    x = jax.random.normal(jax.random.key(1), (4, 3, 8))
    boxed = Logical().init(jax.random.key(0), x)
    specs = nn.logical_to_mesh(nn.get_partition_spec(boxed), rules)
    variables = nn.unbox(boxed)
    stacked = Layout(in_axes=(1,), out_axes=(2,), batch_axes=(0,))
    spec = LoraSpec(targets="**/kernel", rank=2, layouts={"**/layers/*/kernel": stacked})
    base, lt = lorax_fn.split(variables, spec, key=jax.random.key(2))
    sh = lorax_fn.lora_shardings(lt, specs, mesh2d)
    assert specs["params"]["layers"]["up"]["kernel"] == P(None, "data", "model")
    assert specs_of(sh) == {
        "params/embed/kernel": (P(None, None), P(None, "data")),
        "params/layers/up/kernel": (P(None, "data", None), P(None, None, "model")),
        "params/layers/down/kernel": (P(None, "model", None), P(None, None, "data")),
    }

    # Train-step gradients under the model's own sharding equal the unsharded ones.
    lt = jax.tree.map(lambda a: a + 0.01, lt)  # B ≠ 0, so A gets a gradient too

    def loss(variables, x):
        return jnp.mean(Logical().apply(variables, x) ** 2)

    grad = jax.jit(jax.grad(lorax_fn.lora(loss), argnums=1))
    want = grad(base, lt, x)
    sbase = jax.device_put(
        base, nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh2d, rules)
    )
    got = grad(sbase, jax.device_put(lt, sh), lorax_fn.sharding.put_batch(x, mesh2d))
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_lora_shardings_errors(mesh2d):
    _, lt = lorax_fn.split(
        {"w": jnp.ones((8, 4)), "v": jnp.ones(4)},
        LoraSpec("w", rank=2, trainable="v"),
        key=jax.random.key(0),
    )
    with pytest.raises(LoraError, match=r"^v: no sharding for this path"):
        lorax_fn.lora_shardings(lt, {"w": P()}, mesh2d)
    with pytest.raises(LoraError, match=r"w: base sharding is P\(\); pass mesh="):
        lorax_fn.lora_shardings(lt, {"w": P(), "v": NamedSharding(mesh2d, P())})
    with pytest.raises(LoraError, match=r"w: PartitionSpec .* more entries than .* \(8, 4\)"):
        lorax_fn.lora_shardings(lt, {"w": P("data", None, None), "v": None}, mesh2d)
    sh = lorax_fn.lora_shardings(lt, {"w": None, "v": NamedSharding(mesh2d, P("model"))}, mesh2d)
    assert sh["w"].a.spec == P(None, None) and sh["v"].spec == P("model")


def test_dora_magnitude_takes_b_spec_without_the_rank_axis(mesh2d):
    params = {
        "d": jnp.ones((8, 16)),
        "query": jnp.ones((16, 4, 8)),  # fan-out heads·head_dim: m is (4, 8)
        "out": jnp.ones((4, 8, 16)),
        "stack": jnp.ones((2, 8, 16)),
    }
    layouts = {
        "query": Layout(in_axes=(0,), out_axes=(1, 2)),
        "out": Layout(in_axes=(0, 1), out_axes=(2,)),
        "stack": Layout(in_axes=(1,), out_axes=(2,), batch_axes=(0,)),
    }
    spec = LoraSpec(list(params), rank=2, use_dora=True, layouts=layouts)
    _, lt = lorax_fn.split(params, spec, key=jax.random.key(0))
    base_specs = {
        "d": P("data", "model"),
        "query": P("data", "model", None),
        "out": P("model", None, "data"),
        "stack": P("data", None, "model"),
    }
    sh = lorax_fn.lora_shardings(lt, base_specs, mesh2d)
    want = {
        "d": P("model"),
        "query": P("model", None),
        "out": P("data"),
        "stack": P("data", "model"),
    }
    for path, m_spec in want.items():
        b_spec = tuple(sh[path].b.spec)
        nb = len(lt[path].layout.batch_axes)
        assert b_spec[nb] is None  # the rank axis
        assert sh[path].magnitude.spec == P(*b_spec[:nb], *b_spec[nb + 1 :]) == m_spec, path
        assert lt[path].magnitude.shape == lt[path].column_shape
    placed = jax.device_put(lt, sh)
    assert placed["d"].magnitude.addressable_shards[0].data.shape == (4,)
    assert placed["stack"].magnitude.addressable_shards[0].data.shape == (1, 4)
    # A plain LoRA tree keeps no magnitude sharding.
    _, plain = lorax_fn.split(
        params, dataclasses.replace(spec, use_dora=False), key=jax.random.key(0)
    )
    assert "magnitude" not in lorax_fn.lora_shardings(plain, base_specs, mesh2d)["d"].extras


def test_dora_train_step_under_a_2d_mesh_matches_one_device(mesh2d):
    variables = MLP().init(jax.random.key(0), jnp.ones((1, 16)))
    spec = LoraSpec(targets="**/kernel", rank=4, use_dora=True, trainable="params/out/bias")
    base, lt0 = lorax_fn.split(variables, spec, key=jax.random.key(1))
    tx = lorax_fn.optimizer(optax.adam(1e-2), lt0)
    rng = np.random.default_rng(0)
    data = [
        (rng.normal(size=(8, 16)).astype(np.float32), rng.normal(size=(8, 4)).astype(np.float32))
        for _ in range(3)
    ]
    step = jax.jit(make_step(tx))
    lt, state = lt0, tx.init(lt0)
    for x, y in data:
        lt, state, _ = step(base, lt, state, x, y)
    single = lt

    # hidden (16, 32): fan-out over "model", so its magnitude (32,) is split 4 ways.
    base_specs = {
        "params": {
            "hidden": {"kernel": P("data", "model"), "bias": P("model")},
            "out": {"kernel": P("model", None), "bias": P()},
        }
    }
    base_sh = jax.tree.map(lambda s: NamedSharding(mesh2d, s), base_specs)
    sh = lorax_fn.lora_shardings(lt0, base_sh)
    lt = jax.device_put(lt0, sh)
    assert lt["params/hidden/kernel"].magnitude.sharding.spec == P("model")
    state = tx.init(lt)
    sbase = jax.device_put(base, base_sh)
    sstep = jax.jit(make_step(tx), out_shardings=(sh, None, None))
    for x, y in data:
        lt, state, _ = sstep(sbase, lt, state, *lorax_fn.sharding.put_batch((x, y), mesh2d))
    assert lt["params/hidden/kernel"].magnitude.sharding.spec == P("model")
    assert jax.tree.structure(lt) == jax.tree.structure(single)
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(lt), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # The magnitude trained (it moved away from its init ‖W0‖_c).
    m0, m = lt0["params/hidden/kernel"].magnitude, single["params/hidden/kernel"].magnitude
    assert float(jnp.abs(m - m0).max()) > 1e-3
