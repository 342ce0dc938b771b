"""What ``lora(fn)`` traces: Python floats traced, bools/ints static, static_argnums/names."""

from __future__ import annotations

import functools
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from helpers import assert_matches_merged, randomize_b

import lorax_fn
from lorax_fn import LoraSpec


def adapted(shape=(5, 4), seed=0):
    params = {"w": jax.random.normal(jax.random.key(0), shape)}
    base, lt = lorax_fn.split(params, LoraSpec("w", rank=2), key=jax.random.key(seed + 1))
    return base, randomize_b(lt, seed=seed + 1)


def counted(fn):
    """``fn`` with a Python side effect: ``.traces`` is how often lora(fn) traced it."""

    @functools.wraps(fn)  # keeps fn's signature for static_argnames
    def wrapper(*args, **kwargs):
        wrapper.traces += 1
        return fn(*args, **kwargs)

    wrapper.traces = 0
    return wrapper


def scaled(p, x, temperature, weight=1.0):
    return weight * jnp.tanh(x @ p["w"]) / temperature


def test_changing_a_float_argument_neither_retraces_nor_changes_the_result():
    base, lt = adapted()
    merged = lorax_fn.merge(base, lt)
    x = jax.random.normal(jax.random.key(2), (3, 5))
    fn = counted(scaled)
    g = lorax_fn.lora(fn)
    for temperature, weight in [(0.5, 1.0), (1.0, 0.25), (2.7, 3.0), (1e-3, -1.0)]:
        got = g(base, lt, x, temperature, weight=weight)
        np.testing.assert_allclose(got, scaled(merged, x, temperature, weight), rtol=1e-5)
    assert fn.traces == 1, f"{fn.traces} traces for 4 float values"
    # A float inside a pytree argument is traced too, as under jax.jit.
    fn = counted(lambda p, x, cfg: scaled(p, x, **cfg))
    h = lorax_fn.lora(fn)
    for t in (0.5, 2.0):
        got = h(base, lt, x, {"temperature": t, "weight": 2.0})
        np.testing.assert_allclose(got, scaled(merged, x, t, 2.0), rtol=1e-5)
    assert fn.traces == 1
    # Values and gradients w.r.t. the LoRA tree equal merge-then-call's at each value.
    for temperature in (0.5, 3.0):
        assert_matches_merged(scaled, base, lt, x, temperature, weight=0.7)


def test_a_float_is_weakly_typed_as_under_jit():
    base, lt = adapted()
    x = jax.random.normal(jax.random.key(2), (3, 5)).astype(jnp.bfloat16)

    def fn(p, x, t):
        return (x @ p["w"].astype(x.dtype)) * t

    counter = counted(fn)
    g = lorax_fn.lora(counter)
    merged = lorax_fn.merge(base, lt)
    for t in (0.5, 3.0):
        got = g(base, lt, x, t)
        assert got.dtype == jnp.bfloat16 == jax.jit(fn)(merged, x, t).dtype
        np.testing.assert_allclose(got.astype(np.float32), fn(merged, x, t), rtol=2e-2, atol=3e-2)
    assert counter.traces == 1


def test_bools_and_ints_stay_static_and_drive_python_control_flow():
    base, lt = adapted((5, 5))
    merged = lorax_fn.merge(base, lt)
    x = jax.random.normal(jax.random.key(2), (3, 5))

    def steps(p, x, n, square=False):
        for _ in range(n):  # needs a concrete int
            x = jnp.tanh(x @ p["w"])
        return x**2 if square else x  # needs a concrete bool

    fn = counted(steps)
    g = lorax_fn.lora(fn, on_fallback="error")
    for n, square in [(1, False), (3, True), (3, False), (1, False)]:
        np.testing.assert_allclose(
            g(base, lt, x, n, square=square), steps(merged, x, n, square), rtol=1e-5
        )
    assert fn.traces == 3  # one per distinct (n, square)
    # An int to be traced is passed as an array: one trace for every value.
    counter = counted(lambda p, x, k: x @ p["w"] * k)
    h = lorax_fn.lora(counter)
    for k in (1, 2, 5):
        np.testing.assert_allclose(h(base, lt, x, jnp.asarray(k)), x @ merged["w"] * k, rtol=1e-5)
    assert counter.traces == 1


class DropoutNet(nn.Module):
    @nn.compact
    def __call__(self, x, deterministic: bool, temperature: float = 1.0):
        return nn.Dropout(0.5)(nn.Dense(4)(x), deterministic=deterministic) / temperature


def test_flax_deterministic_flag_with_a_float_argument():
    model = DropoutNet()
    x = jax.random.normal(jax.random.key(2), (3, 5))
    variables = model.init(jax.random.key(0), x, deterministic=True)
    base, lt = lorax_fn.split(variables, LoraSpec("**/kernel", rank=2), key=jax.random.key(1))
    lt = randomize_b(lt)
    merged = lorax_fn.merge(base, lt)
    g = lorax_fn.lora(model.apply)
    rngs = {"dropout": jax.random.key(3)}
    for deterministic, t in [(True, 0.5), (False, 2.0), (True, 2.0)]:
        got = g(base, lt, x, deterministic=deterministic, temperature=t, rngs=rngs)
        want = model.apply(merged, x, deterministic=deterministic, temperature=t, rngs=rngs)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def sample(p, x, temperature, steps=1):
    y = x @ p["w"]
    return jnp.argmax(y, -1) if temperature == 0 else y / temperature


def test_a_float_that_drives_control_flow_is_marked_static():
    base, lt = adapted()
    merged = lorax_fn.merge(base, lt)
    x = jax.random.normal(jax.random.key(2), (3, 5))
    with pytest.raises(lorax_fn.LoraError, match=r"args\[1\]\): if one .*static_argnames="):
        lorax_fn.lora(sample)(base, lt, x, 0.0)
    for marks in ({"static_argnames": "temperature"}, {"static_argnums": 2}):
        fn = counted(sample)
        g = lorax_fn.lora(fn, **marks)
        for t in (0.0, 2.0):
            want = sample(merged, x, t)
            np.testing.assert_allclose(g(base, lt, x, t), want, rtol=1e-5)
            # Marked by either, it is static however it is passed.
            np.testing.assert_allclose(g(base, lt, x, temperature=t), want, rtol=1e-5)
        assert fn.traces == 4, marks  # (0.0, 2.0) × (positional, keyword)
    # A whole marked argument is one static value: a hashable config object.
    g = lorax_fn.lora(lambda p, x, cfg: sample(p, x, *cfg), static_argnums=2)
    np.testing.assert_array_equal(g(base, lt, x, (0.0, 3)), sample(merged, x, 0.0))


def test_static_argnums_and_argnames_are_checked():
    def fn(p, x, /, y, *, z=1.0):
        return x

    cases = {
        "no such keyword parameter (it has: y, z)": {"static_argnames": "t"},
        "'x', a positional-only parameter of fn: pass its position": {"static_argnames": "x"},
        "'p', fn's params argument: it is never static": {"static_argnames": "p"},
        "static_argnums=3, but fn takes 3 positional parameters (0: p, 1: x, 2: y)": {
            "static_argnums": (1, 3)
        },
        "static_argnums=0: positions count fn's parameters from 0": {"static_argnums": 0},
        "static_argnums=-1": {"static_argnums": -1},
        "static_argnums must be ints, got True": {"static_argnums": True},
        "static_argnums must be ints, got 1.5": {"static_argnums": 1.5},
        "static_argnames must be strs, got": {"static_argnames": ["y", 2]},
        "lora_key is the wrapped function's dropout key": {"static_argnames": "lora_key"},
    }
    for message, marks in cases.items():
        with pytest.raises(lorax_fn.LoraError, match=re.escape(message)):
            lorax_fn.lora(fn, **marks)
    # *args / **kwargs take any position or name; nothing to check against.
    lorax_fn.lora(lambda p, *args, **kw: p, static_argnums=7, static_argnames="anything")
    base, lt = adapted()
    g = lorax_fn.lora(lambda p, x, cfg: x @ p["w"], static_argnames="cfg")
    with pytest.raises(lorax_fn.LoraError, match=r"kwargs\['cfg'\] \(a dict\).*marked static"):
        g(base, lt, jnp.ones((1, 5)), cfg={"a": 1})


def test_multi_lora_with_a_float_keyword_argument():
    base, lt0 = adapted()
    _, lt1 = adapted(seed=3)
    stack = lorax_fn.stack_adapters([lt0, lt1])
    x = jax.random.normal(jax.random.key(2), (3, 2, 5))
    ids = jnp.array([1, -1, 0])
    fn = counted(scaled)
    g = lorax_fn.multi_lora(fn)
    for t in (0.5, 2.0):
        got = g(base, stack, ids, x, temperature=t)
        for i, tree in enumerate([lt1, None, lt0]):
            params = base if tree is None else lorax_fn.merge(base, tree)
            np.testing.assert_allclose(got[i], scaled(params, x[i], t), rtol=1e-5, atol=1e-6)
    assert fn.traces == 1


def test_multi_lora_passes_static_argnames_to_lora():
    # A shared keyword float that drives Python control flow is marked static by name.
    def repeated(p, x, times):
        for _ in range(int(times)):
            x = jnp.tanh(x @ p["w"])
        return x

    base, lt0 = adapted(shape=(5, 5))
    _, lt1 = adapted(shape=(5, 5), seed=3)
    stack = lorax_fn.stack_adapters([lt0, lt1])
    x = jax.random.normal(jax.random.key(2), (2, 1, 5))
    ids = jnp.array([1, 0])
    with pytest.raises(lorax_fn.LoraError, match="static_argnames"):
        lorax_fn.multi_lora(repeated)(base, stack, ids, x, times=2.0)
    g = lorax_fn.multi_lora(repeated, static_argnames="times")
    got = g(base, stack, ids, x, times=2.0)
    for i, tree in enumerate([lt1, lt0]):
        want = repeated(lorax_fn.merge(base, tree), x[i], 2.0)
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)


def normalized(p, x):
    return (x @ p["w"]) / jnp.linalg.norm(p["w"])  # the norm has no factorized rule


def caught_from(call):
    """The warnings ``call()`` raises, and the line that made it (``call``'s own)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return caught


def assert_names_this_file(caught, line, match):
    hits = [w for w in caught if re.search(match, str(w.message))]
    assert hits, [str(w.message) for w in caught]
    for w in hits:
        assert (w.filename, w.lineno) == (__file__, line), (w.filename, w.lineno)


def test_a_fallback_warning_names_the_callers_line():
    base, lt = adapted((5, 5))
    x = jnp.ones((2, 5))
    scanned = lorax_fn.lora(
        lambda p, x: jax.lax.scan(lambda c, _: (normalized(p, c), None), x, None, length=2)[0]
    )
    calls = {
        "direct": lambda: lorax_fn.lora(normalized)(base, lt, x),
        "jit": lambda: jax.jit(lorax_fn.lora(normalized))(base, lt, x),
        "grad of jit": lambda: jax.grad(
            lambda lt: jax.jit(lorax_fn.lora(normalized))(base, lt, x).sum()
        )(lt),
        "in a scan body": lambda: scanned(base, lt, x),
    }
    for name, call in calls.items():
        line = call.__code__.co_firstlineno + (name == "grad of jit")
        caught = caught_from(call)
        assert_names_this_file(caught, line, "w is consumed by")


def test_an_unread_weight_warning_names_the_callers_line():
    params = {"w": jnp.ones((5, 4)), "v": jnp.ones((5, 4))}
    base, lt = lorax_fn.split(params, LoraSpec(["w", "v"], rank=2), key=jax.random.key(1))
    x = jnp.ones((2, 5))
    for call in (
        lambda: lorax_fn.lora(lambda p, x: x @ p["w"])(base, lt, x),
        lambda: jax.jit(lorax_fn.lora(lambda p, x: x @ p["w"]))(base, lt, x),
    ):
        caught = caught_from(call)
        assert_names_this_file(caught, call.__code__.co_firstlineno, "never reads v")
