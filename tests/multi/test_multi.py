"""Many adapters for one base: stacks, mixed-adapter batches, hot swap, task switching."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.extend import core

import lorax_fn
from lorax_fn import LoraError, LoraSpec

ATTN_MLP = ["**/query/kernel", "**/value/kernel", "**/out/kernel", "**/Dense_*/kernel"]


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(h, h)
        x = x + nn.Dense(8)(nn.gelu(nn.Dense(16)(nn.LayerNorm()(x))))
        return nn.Dense(3, name="head")(x)


def adapters(variables, ranks, targets, *, layouts=None, trainable=()):
    """Adapters of different ranks and scales (alpha 2r+1), random A and B, trained leaves.

    Drawn with NumPy: a jax.random draw per factor shape compiles once per shape.
    """
    spec = LoraSpec(targets, rank=1, trainable=trainable)
    base, template = lorax_fn.split(variables, spec, key=jax.random.key(0), layouts=layouts)
    rng = np.random.default_rng(len(ranks))
    trees = []
    for rank in ranks:
        tree = {}
        for path, e in template.items():
            if isinstance(e, lorax_fn.LoraFactors):
                a_shape, b_shape = e.layout.shapes(e.weight_shape, rank)
                a = rng.normal(size=a_shape) / np.sqrt(e.layout.fan_in(e.weight_shape))
                b = 0.3 * rng.normal(size=b_shape)
                tree[path] = lorax_fn.LoraFactors(
                    jnp.asarray(a, jnp.float32),
                    jnp.asarray(b, jnp.float32),
                    (2.0 * rank + 1) / rank,
                    e.layout,
                )
            else:
                tree[path] = e + jnp.asarray(0.1 * rng.normal(size=e.shape), e.dtype)
        trees.append(tree)
    return base, trees


def init(model, x):
    return jax.jit(model.init)(jax.random.key(1), x)


def check_rows(apply, base, trees, ids, x, out, tol=1e-5):
    """Row i equals running example i alone with its adapter merged (id -1: the base)."""
    apply = jax.jit(apply)
    for i, k in enumerate(np.asarray(ids)):
        params = base if k == -1 else lorax_fn.merge(base, trees[k])
        want = apply(params, x[i : i + 1])[0]
        np.testing.assert_allclose(out[i], want, rtol=tol, atol=tol, err_msg=f"row {i}")


@pytest.fixture(scope="module")
def block_setup():
    model = Block()
    x = jax.random.normal(jax.random.key(0), (6, 5, 8))
    variables = init(model, x)
    base, trees = adapters(variables, [1, 4, 2], ATTN_MLP, trainable="params/head/bias")
    return model, x, base, trees


def test_mixed_batch_matches_each_example_merged_alone(block_setup):
    model, x, base, trees = block_setup
    stack = lorax_fn.stack_adapters(trees, base=base)
    query = stack.entries["params/MultiHeadDotProductAttention_0/query/kernel"]
    assert query.a.shape == (3, 8, 4) and query.b.shape == (3, 4, 2, 4) and query.scale == 1.0
    assert stack.entries["params/head/bias"].shape == (3, 3)
    ids = jnp.array([0, -1, 2, 1, 2, -1])
    out = jax.jit(lorax_fn.multi_lora(model.apply, on_fallback="error"))(base, stack, ids, x)
    check_rows(model.apply, base, trees, ids, x, out)
    chunked = jax.jit(lorax_fn.multi_lora(model.apply, chunk_size=4))(base, stack, ids, x)
    np.testing.assert_allclose(chunked, out, rtol=1e-5, atol=1e-6)


def test_stack_adapter_roundtrip_is_the_same_update(block_setup):
    trees = block_setup[3]
    stack = lorax_fn.stack_adapters(trees)
    for k, tree in enumerate(trees):
        got = stack.adapter(k)
        for path, entry in tree.items():
            if isinstance(entry, lorax_fn.LoraFactors):
                np.testing.assert_allclose(
                    lorax_fn.factors.delta(got[path]),
                    lorax_fn.factors.delta(entry),
                    rtol=1e-6,
                    atol=1e-7,
                )
            else:
                np.testing.assert_array_equal(got[path], entry)


class ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2)(h, h)
        return x + nn.Dense(8)(nn.gelu(nn.Dense(16)(nn.LayerNorm()(x)))), None


class ScannedLM(nn.Module):
    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(13, 8)
        stack = nn.scan(
            ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=2
        )
        x, _ = stack()(embed(ids), None)
        return embed.attend(nn.LayerNorm()(x))


def test_mixed_batch_scan_stacked_transformer():
    model = ScannedLM()
    tokens = jax.random.randint(jax.random.key(0), (5, 4), 0, 13)
    variables = init(model, tokens)
    layouts = lorax_fn.infer_layouts(model.apply, variables, tokens)
    base, trees = adapters(variables, [3, 1], ["**/kernel", "**/embedding"], layouts=layouts)
    stack = lorax_fn.stack_adapters(trees, base=base)
    query = next(e for p, e in stack.entries.items() if p.endswith("query/kernel"))
    assert query.a.shape == (2, 2, 8, 3) and query.b.shape == (2, 2, 3, 2, 4)
    ids = jnp.array([1, -1, 0, 1, 0])
    out = jax.jit(lorax_fn.multi_lora(model.apply, on_fallback="error"))(base, stack, ids, tokens)
    check_rows(model.apply, base, trees, ids, tokens, out, tol=1e-4)


def test_per_example_function_and_shared_keyword_arguments():
    def fn(params, x, *, sign):  # written for one example: no batch axis
        return sign * jnp.tanh(x @ params["w"])

    params = {"w": jax.random.normal(jax.random.key(0), (6, 5))}
    base, trees = adapters(params, [1, 3], "w")
    x = jax.random.normal(jax.random.key(2), (4, 6))
    ids = jnp.array([1, 0, -1, 1])
    g = lorax_fn.multi_lora(fn, batch_of_one=False)
    out = g(base, lorax_fn.stack_adapters(trees), ids, x, sign=-1.0)
    check_rows(lambda p, xi: fn(p, xi, sign=-1.0), base, trees, ids, x, out)


def _count(jaxpr: core.Jaxpr, names: set[str]) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name in names
        n += sum(_count(sub, names) for sub in core.jaxprs_in_params(eqn.params))
    return n


def test_one_program_whose_cost_grows_with_batch_not_adapters():
    def mlp(p, x):
        return jnp.tanh(x @ p["w1"]) @ p["w2"]

    params = {
        "w1": jax.random.normal(jax.random.key(0), (32, 64)),
        "w2": jax.random.normal(jax.random.key(1), (64, 32)),
    }
    base, tree = adapters(params, [4], ["w1", "w2"])
    trees = [jax.tree.map(lambda x, k=k: x * (k + 1), tree[0]) for k in range(16)]
    x = jax.random.normal(jax.random.key(2), (16, 8, 32))
    g = lorax_fn.multi_lora(mlp)

    def program(n, batch):
        stack = lorax_fn.stack_adapters(trees[:n])
        args = (base, stack, jnp.arange(batch) % n, x[:batch])
        closed = jax.make_jaxpr(g)(*args)
        cost = jax.jit(g).lower(*args).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        loops = _count(closed.jaxpr, {"while", "scan"})
        return float(cost["flops"]), _count(closed.jaxpr, {"dot_general"}), loops

    flops_2, dots_2, loops_2 = program(2, 8)
    flops_16, dots_16, loops_16 = program(16, 8)
    flops_b16, _, _ = program(2, 16)
    assert loops_2 == loops_16 == 0
    assert dots_2 == dots_16 == 6  # per weight: x·W0 and two batched low-rank products
    assert abs(flops_16 - flops_2) <= 0.01 * flops_2, (flops_2, flops_16)
    assert 1.8 * flops_2 <= flops_b16 <= 2.2 * flops_2, (flops_2, flops_b16)


def test_hot_swap_needs_no_retrace_or_recompile(block_setup):
    model, x, base, trees = block_setup
    traces = []

    def apply(params, x):
        return model.apply(params, x)

    @jax.jit
    def serve(base, stack, ids, x):
        traces.append(1)
        return lorax_fn.multi_lora(apply)(base, stack, ids, x)

    stack = lorax_fn.stack_adapters(trees[:2], base=base)
    ids = jnp.array([0, 1, 1, -1, 0, 1])
    serve(base, stack, ids, x)
    swapped = lorax_fn.multi.replace_adapter(stack, 1, trees[2])  # rank 2 ≤ padded rank 4
    out = serve(base, swapped, ids, x)
    serve(base, lorax_fn.multi.replace_adapter(swapped, 0, trees[1]), ids, x)
    assert len(traces) == 1
    check_rows(model.apply, base, [trees[0], trees[2]], ids, x, out)
    # The old stack is untouched: replace_adapter is functional.
    np.testing.assert_allclose(
        lorax_fn.factors.delta(stack.adapter(1)["params/Dense_0/kernel"]),
        lorax_fn.factors.delta(trees[1]["params/Dense_0/kernel"]),
        rtol=1e-6,
        atol=1e-7,
    )


@pytest.mark.parametrize("method", ["gather", "grouped"])
def test_ids_out_of_range(method):
    params = {"w": jax.random.normal(jax.random.key(0), (6, 5))}
    base, trees = adapters(params, [1, 2], "w")
    stack = lorax_fn.stack_adapters(trees)
    g = lorax_fn.multi_lora(lambda p, x: x @ p["w"], method=method)
    x = jnp.ones((4, 2, 6))
    with pytest.raises(LoraError, match=r"adapter_ids \[2, -3\] at positions \[1, 3\]"):
        g(base, stack, jnp.array([0, 2, -1, -3]), x)
    out = jax.jit(g)(base, stack, jnp.array([0, 2, -1, -3]), x)
    assert np.isnan(out[1]).all() and np.isnan(out[3]).all()
    assert np.isfinite(out[0]).all() and np.isfinite(out[2]).all()
    np.testing.assert_allclose(out[2], x[2] @ params["w"], rtol=1e-6)


@pytest.mark.parametrize("method", ["gather", "grouped"])
def test_a_bad_adapter_touches_only_its_own_rows(method):
    def fn(params, x):
        return jnp.tanh(x @ params["w"]) @ params["v"] + params["bias"]

    rng = np.random.default_rng(0)
    params = {
        "w": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32),
        "v": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
        "bias": jnp.zeros(3),
    }
    base, trees = adapters(params, [2, 3], ["w", "v"], trainable="bias")
    bad = dict(trees[0])
    bad["w"] = dataclasses.replace(bad["w"], a=bad["w"].a.at[0, 0].set(jnp.nan))
    bad["v"] = dataclasses.replace(bad["v"], b=bad["v"].b.at[0, 0].set(jnp.inf))
    bad["bias"] = jnp.full(3, jnp.nan)
    stack = lorax_fn.stack_adapters([bad, trees[1]])
    ids = jnp.array([-1, 1, 0, -1, 1])
    good = np.array([0, 1, 3, 4])
    x = jnp.asarray(rng.normal(size=(5, 6)), jnp.float32)
    g = lorax_fn.multi_lora(fn, batch_of_one=False, method=method)

    out = jax.jit(g)(base, stack, ids, x)
    assert not np.isfinite(out[2]).all()
    check_rows(fn, base, [bad, trees[1]], ids[good], x[good], out[good])

    def loss(stack, x):
        return jnp.sum(g(base, stack, ids, x)[good] ** 2)

    d_stack, d_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(stack, x)
    one = stack.adapter(1)
    for i in good:
        params_i = base if ids[i] == -1 else lorax_fn.merge(base, one)
        want = jax.grad(lambda xi, p=params_i: jnp.sum(fn(p, xi) ** 2))(x[i])
        np.testing.assert_allclose(d_x[i], want, rtol=1e-5, atol=1e-5, err_msg=f"row {i}")
    rows_1 = good[np.asarray(ids)[good] == 1]
    want_1 = jax.grad(lambda t: jnp.sum(lorax_fn.lora(fn)(base, t, x[rows_1]) ** 2))(one)
    for path, entry in want_1.items():
        got = jax.tree.map(lambda s: s[1], d_stack.entries[path])
        for gl, wl in zip(jax.tree.leaves(got), jax.tree.leaves(entry), strict=True):
            np.testing.assert_allclose(gl, wl, rtol=1e-5, atol=1e-5, err_msg=path)


def test_refusals_name_the_problem_and_change_nothing():
    params = {"w": jax.random.normal(jax.random.key(0), (6, 5)), "v": jnp.ones((5, 5))}
    base, (a, b) = adapters(params, [1, 2], "w")
    _, (wv,) = adapters(params, [1], ["w", "v"])
    _, (full,) = adapters(params, [1], "v", trainable="w")
    with pytest.raises(LoraError, match=r"only in adapter 0: \[\]; only in adapter 1: \['v'\]"):
        lorax_fn.stack_adapters([a, wv])
    with pytest.raises(LoraError, match=r"w: adapter 0 holds low-rank factors.*adapter 1 holds a"):
        lorax_fn.stack_adapters([wv, full])
    with pytest.raises(LoraError, match="adapter 0: w: the adapter was made for"):
        lorax_fn.stack_adapters([a, b], base={"w": jnp.ones((7, 5)), "v": params["v"]})
    with pytest.raises(LoraError, match="at least one"):
        lorax_fn.stack_adapters([])

    stack = lorax_fn.stack_adapters([a, b])
    before = jax.tree.map(np.asarray, stack.entries)
    _, (big,) = adapters(params, [3], "w")
    with pytest.raises(LoraError, match="w: the new adapter's rank 3 exceeds the stack's padded"):
        lorax_fn.multi.replace_adapter(stack, 0, big)
    with pytest.raises(LoraError, match=r"missing \[\], extra \['v'\]"):
        lorax_fn.multi.replace_adapter(stack, 0, wv)
    with pytest.raises(LoraError, match="adapter index 2 is not in range"):
        lorax_fn.multi.replace_adapter(stack, 2, a)
    jax.tree.map(np.testing.assert_array_equal, stack.entries, before)

    g = lorax_fn.multi_lora(lambda p, x: x @ p["w"])
    with pytest.raises(LoraError, match=r"positional argument 0 has shape \(3, 6\)"):
        g(base, stack, jnp.array([0, 1]), jnp.ones((3, 6)))
    with pytest.raises(LoraError, match="chunk_size must be a positive integer"):
        lorax_fn.multi_lora(lambda p, x: x, chunk_size=0)
    with pytest.raises(LoraError, match="1-D integer"):
        g(base, stack, jnp.array([0.0, 1.0]), jnp.ones((2, 6)))
    with pytest.raises(LoraError, match="w: the adapter was made for a weight of shape"):
        g({"w": jnp.ones((7, 5)), "v": params["v"]}, stack, jnp.array([0, 1]), jnp.ones((2, 7)))


def test_stack_from_checkpoints(tmp_path):
    params = {"w": jax.random.normal(jax.random.key(0), (6, 5))}
    base, trees = adapters(params, [1, 2], "w")
    dirs = [lorax_fn.save(tmp_path / f"a{i}", t, None, base=base) for i, t in enumerate(trees)]
    got = lorax_fn.multi.stack_checkpoints(dirs, base=base)
    want = lorax_fn.stack_adapters(trees)
    jax.tree.map(np.testing.assert_array_equal, got.entries, want.entries)
    with pytest.raises(LoraError, match=re.escape(f"{tmp_path / 'missing'}: ")):
        lorax_fn.multi.stack_checkpoints([dirs[0], tmp_path / "missing"], base=base)


def _relative_error(got, want, scale):
    return float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)) / scale))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_task_switching_by_merging_has_bounded_error(dtype):
    """merge k, unmerge k, merge j, … : each fold rounds once to the weight's dtype.

    Relative to |W0| + Σ|ΔW|, n switches stay within (2n + 1) machine epsilons (2⁻²³ in
    float32, 2⁻⁷ in bfloat16); measured: about 0.3 epsilon per switch.
    """
    w0 = jax.random.normal(jax.random.key(0), (32, 16)).astype(dtype)
    base, trees = adapters({"w": w0}, [2, 4, 3], "w")
    stack = lorax_fn.stack_adapters(trees)
    magnitude = jnp.abs(w0.astype(jnp.float32)) + sum(
        jnp.abs(lorax_fn.factors.delta(t["w"])) for t in trees
    )
    eps = float(jnp.finfo(dtype).eps)
    merged, current = lorax_fn.merge(base, stack.adapter(0)), 0
    for n in range(1, 13):
        nxt = (2 * n + 1) % 3
        merged = lorax_fn.merge(
            lorax_fn.unmerge(merged, stack.adapter(current)), stack.adapter(nxt)
        )
        current = nxt
        if n in (1, 12):
            want = lorax_fn.merge(base, trees[current])["w"]
            assert _relative_error(merged["w"], want, magnitude) <= (2 * n + 1) * eps, n
    assert merged["w"].dtype == dtype


def test_select_once_gives_the_plain_call_values_and_gradients(block_setup):
    """A decode loop's selection: the same outputs and stack gradients as the plain call."""
    model, x, base, trees = block_setup
    stack = lorax_fn.stack_adapters(trees, base=base)
    ids = jnp.array([2, -1, 0, 2, -1, 1])  # base rows, an adapter used twice
    g = lorax_fn.multi_lora(model.apply, on_fallback="error")
    plain = jax.jit(g)(base, stack, ids, x)
    sel = jax.jit(lorax_fn.multi.select_adapters)(stack, ids)
    assert sel.batch_size == 6 and isinstance(sel, lorax_fn.multi.AdapterSelection)
    step = jax.jit(g)
    np.testing.assert_array_equal(step(base, sel, x), plain)
    np.testing.assert_array_equal(step(base, sel, x), plain)  # reused, not consumed
    # Base rows train nothing in full: the head bias of row 1 is the base's, whatever
    # base the selection is applied to (it holds no base values).
    head = "params/head/bias"
    shifted = jax.tree.map(lambda v: v, base)
    leaf = dict(lorax_fn.paths.leaves_with_paths(shifted))[head]
    shifted["params"]["head"]["bias"] = leaf + 1.0
    np.testing.assert_allclose(step(shifted, sel, x)[1], plain[1] + 1.0, rtol=1e-5, atol=1e-5)

    def loss_plain(stack):
        return jnp.sum(g(base, stack, ids, x) ** 2)

    def loss_sel(stack):
        return jnp.sum(g(base, lorax_fn.multi.select_adapters(stack, ids), x) ** 2)

    want, got = jax.jit(jax.grad(loss_plain))(stack), jax.jit(jax.grad(loss_sel))(stack)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, want)
    # Adapter 1 is used by row 5 only: its factor gradient is that row's alone.
    path = "params/Dense_0/kernel"
    one = stack.adapter(1)
    want_1 = jax.grad(lambda t: jnp.sum(lorax_fn.lora(model.apply)(base, t, x[5:6]) ** 2))(one)
    np.testing.assert_allclose(got.entries[path].b[1], want_1[path].b, rtol=1e-4, atol=1e-5)


def test_select_adapters_refusals():
    params = {"w": jax.random.normal(jax.random.key(0), (6, 5))}
    base, trees = adapters(params, [1, 2], "w")
    stack = lorax_fn.stack_adapters(trees)
    g = lorax_fn.multi_lora(lambda p, x: x @ p["w"])
    with pytest.raises(LoraError, match=r"adapter_ids \[2\] at positions \[1\]"):
        lorax_fn.multi.select_adapters(stack, jnp.array([0, 2]))
    with pytest.raises(LoraError, match="1-D integer"):
        lorax_fn.multi.select_adapters(stack, jnp.array([[0, 1]]))
    with pytest.raises(LoraError, match="expected an AdapterStack"):
        lorax_fn.multi.select_adapters(trees[0], jnp.array([0]))
    sel = lorax_fn.multi.select_adapters(stack, jnp.array([0, 1, -1]))
    with pytest.raises(LoraError, match=r"positional argument 0 has shape \(2, 6\).* of 3"):
        g(base, sel, jnp.ones((2, 6)))
    with pytest.raises(LoraError, match="w: the adapter was made for a weight of shape"):
        g({"w": jnp.ones((7, 5))}, sel, jnp.ones((3, 7)))
    with pytest.raises(LoraError, match="needs adapter_ids"):
        g(base, stack)
    with pytest.raises(LoraError, match="or an AdapterSelection"):
        g(base, trees[0], jnp.array([0]), jnp.ones((1, 6)))


def test_dora_adapters_are_refused_naming_the_path():
    """The stack carries no magnitudes: stacking DoRA would silently compute plain LoRA."""
    params = {"w": jax.random.normal(jax.random.key(0), (6, 5)), "v": jnp.ones((5, 5))}
    base, plain = lorax_fn.split(params, LoraSpec("w", rank=2), key=jax.random.key(1))
    _, dora = lorax_fn.split(params, LoraSpec("w", rank=2, use_dora=True), key=jax.random.key(1))
    assert "magnitude" in dora["w"].extras
    with pytest.raises(LoraError, match="adapter 1: w: DoRA adapters"):
        lorax_fn.stack_adapters([plain, dora])
    stack = lorax_fn.stack_adapters([plain])
    with pytest.raises(LoraError, match="the new adapter: w: DoRA"):
        lorax_fn.multi.replace_adapter(stack, 0, dora)
    # A stack built by hand around DoRA entries is refused when used, not run as LoRA.
    forged = lorax_fn.multi.AdapterStack(
        {
            "w": dataclasses.replace(
                stack.entries["w"], extras={"magnitude": dora["w"].magnitude[None]}, variant="dora"
            )
        }
    )
    with pytest.raises(LoraError, match="the stack: w: DoRA"):
        lorax_fn.multi_lora(lambda p, x: x @ p["w"])(base, forged, jnp.array([0]), jnp.ones((1, 6)))


def _uses_ragged_dot(fn, *args) -> bool:
    return "ragged_dot" in str(jax.make_jaxpr(fn)(*args))


def test_grouped_batch_equals_gather_and_each_example_alone(block_setup):
    model, x, base, trees = block_setup
    stack = lorax_fn.stack_adapters(trees, base=base)
    ids = jnp.array([2, -1, 0, 2, -1, 1])
    gather = lorax_fn.multi_lora(model.apply, on_fallback="error")
    grouped = lorax_fn.multi_lora(model.apply, method="grouped", on_fallback="error")
    out = jax.jit(grouped)(base, stack, ids, x)
    check_rows(model.apply, base, trees, ids, x, out)
    np.testing.assert_allclose(out, jax.jit(gather)(base, stack, ids, x), rtol=1e-5, atol=1e-6)
    chunked = lorax_fn.multi_lora(model.apply, method="grouped", chunk_size=4)
    np.testing.assert_allclose(jax.jit(chunked)(base, stack, ids, x), out, rtol=1e-5, atol=1e-6)
    # Grouped really groups (ragged_dot over adapters); gather does not.
    assert _uses_ragged_dot(grouped, base, stack, ids, x)
    assert not _uses_ragged_dot(gather, base, stack, ids, x)
    # auto: grouped for 3 adapters over 6 examples, gather for 3 over 2.
    auto = lorax_fn.multi_lora(model.apply, method="auto")
    assert _uses_ragged_dot(auto, base, stack, ids, x)
    assert not _uses_ragged_dot(auto, base, stack, ids[:2], x[:2])

    def loss(g):
        return lambda stack, x: jnp.sum(jnp.sin(g(base, stack, ids, x)))

    want = jax.jit(jax.grad(loss(gather), argnums=(0, 1)))(stack, x)
    got = jax.jit(jax.grad(loss(grouped), argnums=(0, 1)))(stack, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)


def test_grouped_scan_stacked_transformer_gathers_where_it_cannot_group():
    model = ScannedLM()
    ids_tok = jnp.array([[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 3, 5]])
    variables = init(model, ids_tok)
    layouts = lorax_fn.infer_layouts(model.apply, variables, ids_tok)
    base, trees = adapters(variables, [2, 1], ["**/kernel", "**/embedding"], layouts=layouts)
    stack = lorax_fn.stack_adapters(trees, base=base)
    ids = jnp.array([1, 0, -1, 1])
    grouped = lorax_fn.multi_lora(model.apply, method="grouped", on_fallback="error")
    out = jax.jit(grouped)(base, stack, ids, ids_tok)
    check_rows(model.apply, base, trees, ids, ids_tok, out, tol=1e-4)


def test_grouped_refusals():
    params = {"w": jnp.ones((6, 5))}
    base, trees = adapters(params, [1], "w")
    stack = lorax_fn.stack_adapters(trees)
    with pytest.raises(LoraError, match="method must be"):
        lorax_fn.multi_lora(lambda p, x: x @ p["w"], method="sgmv")
    g = lorax_fn.multi_lora(lambda p, x: x @ p["w"], method="grouped")
    ids = jnp.array([0, -1])
    with pytest.raises(LoraError, match="gathered already"):
        g(base, lorax_fn.multi.select_adapters(stack, ids), jnp.ones((2, 6)))
    with pytest.raises(LoraError, match="leading batch axis of 2"):
        g(base, stack, ids, jnp.ones((3, 6)))


@pytest.mark.parametrize("method", ["gather", "grouped"])
@pytest.mark.parametrize(
    "ids, shape", [([0, -1, 1], (3, 0, 6)), ([], (0, 2, 6))], ids=["no-rows", "no-examples"]
)
def test_an_empty_batch_gives_the_empty_result(method, ids, shape):
    # Both methods crashed (ZeroDivisionError) flattening rows; grouped on no examples too.
    params = {"w": jax.random.normal(jax.random.key(0), (6, 5))}
    base, trees = adapters(params, [1, 2], "w")
    stack = lorax_fn.stack_adapters(trees)
    ids, x = jnp.array(ids, jnp.int32), jnp.ones(shape)
    g = lorax_fn.multi_lora(lambda p, x: x @ p["w"], method=method, on_fallback="error")
    out = jax.jit(g)(base, stack, ids, x)
    assert out.shape == shape[:-1] + (5,)
    check_rows(lambda p, x: x @ p["w"], base, trees, ids, x, out)
    grads = jax.grad(lambda stack: jnp.sum(jnp.sin(g(base, stack, ids, x))))(stack)
    for leaf in jax.tree.leaves(grads):  # no example, no gradient: zeros, not NaN
        np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
