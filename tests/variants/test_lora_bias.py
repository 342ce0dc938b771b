"""LoRA bias (PEFT's ``lora_bias=True``): ``x·W0 + scale·(x·A·B + β)`` on every consumer.

The reference is merge-then-call, with merge folding ``scale·β`` into the layer's own
bias leaf; each check runs ``lora(fn)`` with ``on_fallback="error"`` and a random,
non-zero ``β`` and B (``β = 0`` at init would hide a dropped bias). PEFT parity: an
adapter saved by PEFT with ``lora_bias=True`` gives PEFT's outputs here, and ours gives
ours in PEFT.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from helpers import assert_matches_merged, randomize_b

import lorax_fn
from lorax_fn import LoraSpec, merge, unmerge
from lorax_fn.errors import LoraError
from lorax_fn.peft import export_peft, import_peft
from lorax_fn.variants.lora_bias import trainable_biases

KEY = jax.random.key(0)


def _with_bias(lt: dict, std: float = 0.5) -> dict:
    """Random B and a random ``β`` in every LoRA-bias entry."""
    lt = randomize_b(lt, std=std)
    out = {}
    for i, (path, entry) in enumerate(sorted(lt.items())):
        if isinstance(entry, lorax_fn.LoraFactors):
            beta = std * jax.random.normal(jax.random.key(100 + i), entry.column_shape)
            entry = entry.with_extras(bias=beta.astype(entry.a.dtype))
        out[path] = entry
    return out


def _split(params, targets="**/kernel", layouts=None, rank=2, **kw):
    spec = LoraSpec(targets, rank=rank, alpha=3.0, variant="lora_bias", **kw)
    base, lt = lorax_fn.split(params, spec, key=jax.random.key(1), layouts=layouts)
    assert all(e.variant == "lora_bias" for e in lt.values() if isinstance(e, lorax_fn.LoraFactors))
    return base, _with_bias(lt)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(jnp.tanh(nn.Dense(16)(x)))


def test_dense_values_gradients_and_merge_round_trip():
    x = jax.random.normal(KEY, (5, 8))
    model = MLP()
    params = model.init(KEY, x)
    base, lt = _split(params)
    assert_matches_merged(model.apply, base, lt, x)
    # β of the output layer (Dense_0, made first) reaches the output as scale·β: the
    # gradient of the output's sum is scale times the batch size.
    g = lorax_fn.lora(model.apply, on_fallback="error")
    grad = jax.grad(lambda t: jnp.sum(g(base, t, x)))(lt)
    np.testing.assert_allclose(grad["params/Dense_0/kernel"].bias, 3.0 / 2 * 5, rtol=1e-6)
    # merge moves scale·β into the layer's bias; unmerge takes it out again.
    merged = merge(base, lt)
    want = base["params"]["Dense_1"]["bias"] + 1.5 * lt["params/Dense_1/kernel"].bias
    np.testing.assert_allclose(merged["params"]["Dense_1"]["bias"], want, rtol=1e-6)
    back = unmerge(merged, lt)
    jax.tree_util.tree_map(
        lambda got, orig: np.testing.assert_allclose(got, orig, rtol=1e-5, atol=1e-6), back, base
    )
    # At init (B = 0, β = 0) the model is the base model.
    _, fresh = lorax_fn.split(params, LoraSpec("**/kernel", rank=2, variant="lora_bias"), key=KEY)
    np.testing.assert_array_equal(g(base, fresh, x), model.apply(base, x))


def test_a_trained_bias_leaf_gets_the_term_on_top_of_its_trained_value():
    x = jax.random.normal(KEY, (5, 8))
    model = MLP()
    base, lt = _split(model.init(KEY, x), trainable=trainable_biases("all"))
    lt = {p: e + 0.25 if p.endswith("bias") else e for p, e in lt.items()}
    assert_matches_merged(model.apply, base, lt, x)
    merged = merge(base, lt)["params"]["Dense_0"]["bias"]
    want = lt["params/Dense_0/bias"] + 1.5 * lt["params/Dense_0/kernel"].bias
    np.testing.assert_allclose(merged, want, rtol=1e-6)
    np.testing.assert_allclose(
        unmerge(merge(base, lt), lt)["params"]["Dense_0"]["bias"],
        lt["params/Dense_0/bias"],
        rtol=1e-5,
        atol=1e-6,
    )


def test_multi_axis_kernels_of_attention():
    # DenseGeneral kernels (d, heads, head_dim) and (heads, head_dim, d); q and v read the
    # same input, so a shared-input fusion of their x·A must keep each one's bias. (A key
    # bias shifts every logit of a query alike: softmax cancels it, its gradient is
    # rounding noise on both sides, so the key is left out.)
    model = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, out_features=6)
    x = jax.random.normal(KEY, (2, 5, 6))
    params = model.init(KEY, x)
    layouts = lorax_fn.infer_layouts(model.apply, params, x)
    base, lt = _split(params, layouts=layouts, exclude="**/key/kernel")
    assert lt["params/query/kernel"].bias.shape == (2, 4)
    assert lt["params/out/kernel"].bias.shape == (6,)
    assert_matches_merged(model.apply, base, lt, x)


def test_einsum_and_conv():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Conv(5, (3, 3))(x)
            return nn.Einsum((5, 2, 3), "bhwc,cgo->bhwgo")(h)

    x = jax.random.normal(KEY, (2, 6, 6, 3))
    model = Net()
    params = model.init(KEY, x)
    base, lt = _split(params, layouts=lorax_fn.infer_layouts(model.apply, params, x))
    assert lt["params/Einsum_0/kernel"].bias.shape == (2, 3)
    assert_matches_merged(model.apply, base, lt, x, rtol=1e-4, atol=1e-4)


def test_nnx_linear():
    class Net(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.up = nnx.Linear(8, 16, rngs=rngs)
            self.down = nnx.Linear(16, 4, rngs=rngs)

        def __call__(self, x):
            return self.down(nnx.relu(self.up(x)))

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    base, lt = _split(state)
    assert sorted(lt) == ["down/kernel", "up/kernel"]

    def forward(s, x):
        return nnx.merge(graphdef, s)(x)

    x = jax.random.normal(KEY, (3, 8))
    assert_matches_merged(forward, base, lt, x)
    merged = merge(base, lt)
    np.testing.assert_allclose(
        merged["down"]["bias"][...],
        base["down"]["bias"][...] + 1.5 * lt["down/kernel"].bias,
        rtol=1e-6,
    )


class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return h + jnp.tanh(nn.Dense(h.shape[-1])(h)), None


class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        scanned = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return scanned()(x, None)[0]


def test_scan_stack_gives_each_layer_its_own_bias():
    x = jax.random.normal(KEY, (4, 8))
    model = Stack()
    params = model.init(KEY, x)
    base, lt = _split(params, layouts=lorax_fn.infer_layouts(model.apply, params, x))
    (path,) = lt
    assert lt[path].bias.shape == (3, 8)  # one β per layer
    assert_matches_merged(model.apply, base, lt, x)


def test_a_layer_without_bias_cannot_be_merged():
    model = nn.Dense(3, use_bias=False)
    x = jnp.ones((2, 4))
    base, lt = _split(model.init(KEY, x))
    # lora(fn) serves it (the term is added to the product) ...
    got = lorax_fn.lora(model.apply, on_fallback="error")(base, lt, x)
    f = lt["params/kernel"]
    want = x @ (base["params"]["kernel"] + lorax_fn.factors.delta(f)) + 1.5 * f.bias
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # ... but merge has no bias to fold it into, and refuses rather than drop it.
    with pytest.raises(LoraError, match=r"params/kernel: .*params/bias.*base has none"):
        merge(base, lt)
    with pytest.raises(LoraError, match=r"params/kernel: .*params/bias"):
        unmerge(base, lt)


def test_dora_with_lora_bias_is_refused():
    with pytest.raises(LoraError, match="use_dora=True contradicts variant='lora_bias'"):
        LoraSpec("**/kernel", use_dora=True, variant="lora_bias")


def test_uses_that_would_drop_the_bias_are_refused():
    table = {"embed": {"embedding": jax.random.normal(KEY, (10, 4))}}
    base, lt = _split(table, targets="**/embedding")
    lookup = lorax_fn.lora(lambda p, i: p["embed"]["embedding"][i], on_fallback="ignore")
    with pytest.raises(LoraError, match=r"embed/embedding: .*looked up by rows"):
        lookup(base, lt, jnp.array([1, 2]))
    # A tied output head contracts the fan-out: no output of this layer to add β to.
    head = lorax_fn.lora(lambda p, h: h @ p["embed"]["embedding"].T, on_fallback="ignore")
    with pytest.raises(LoraError, match=r"embed/embedding: .*tied output head"):
        head(base, lt, jnp.ones((2, 4)))
    # A weight formed in full (no factorized rule, here an elementwise use) would lose it.
    formed = lorax_fn.lora(lambda p, h: h * p["w"], on_fallback="ignore")
    wb, wl = _split({"w": jnp.ones((3, 3))}, targets="w")
    with pytest.raises(LoraError, match=r"w: .*formed in full"):
        formed(wb, wl, jnp.ones((3, 3)))


def test_trainable_biases_modes():
    params = MLP().init(KEY, jnp.ones((1, 8)))
    spec = LoraSpec("**/Dense_1/kernel", rank=2)
    _, lt = lorax_fn.split(params, spec, key=KEY)
    assert trainable_biases("none") == []
    assert trainable_biases("lora_only", params, lt) == ["params/Dense_1/bias"]
    spec = dataclasses.replace(spec, trainable=trainable_biases("all"))
    assert sorted(p for p in lorax_fn.split(params, spec, key=KEY)[1] if p.endswith("bias")) == [
        "params/Dense_0/bias",
        "params/Dense_1/bias",
    ]
    with pytest.raises(LoraError, match="'none', 'all' or 'lora_only'"):
        trainable_biases("some")


# --------------------------------------------------------------------------- PEFT parity


def parity_modules():
    """torch and peft; where CI installed them (LORAX_FN_REQUIRE_PARITY=1) a failed
    import fails the test instead of skipping it."""
    if os.environ.get("LORAX_FN_REQUIRE_PARITY") == "1":
        return importlib.import_module("torch"), importlib.import_module("peft")
    return pytest.importorskip("torch"), pytest.importorskip("peft")


def _flax_params(torch_model) -> dict:
    return {
        "params": {
            name: {
                "kernel": jnp.asarray(layer.weight.detach().numpy().T),
                "bias": jnp.asarray(layer.bias.detach().numpy()),
            }
            for name, layer in (("fc1", torch_model.fc1), ("fc2", torch_model.fc2))
        }
    }


def _forward(params, x):
    p = params["params"]
    h = jnp.tanh(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    return h @ p["fc2"]["kernel"] + p["fc2"]["bias"]


def _torch_model(torch):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(6, 8)
            self.fc2 = torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.fc2(torch.tanh(self.fc1(x)))

    torch.manual_seed(0)
    return Net().eval()


# PEFT's ZeRO-3 check takes its own 1-D lora_B.bias for an unsharded shard.
@pytest.mark.filterwarnings("ignore:Adapter 'default'.*invalid shape")
def test_peft_adapter_with_lora_bias_imports_and_exports_with_the_same_outputs(tmp_path):
    torch, peft = parity_modules()
    base_model = _torch_model(torch)
    base = _flax_params(base_model)
    config = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["fc1", "fc2"], lora_bias=True)
    model = peft.get_peft_model(base_model, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # lora_B.weight and lora_B.bias, both zero at init
                param.add_(0.5 * torch.randn_like(param))
    model.save_pretrained(str(tmp_path / "peft"))
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(x)).numpy()

    lt = import_peft(tmp_path / "peft", base)
    assert lt["params/fc1/kernel"].variant == "lora_bias"
    np.testing.assert_array_equal(
        lt["params/fc2/kernel"].bias,
        model.base_model.model.fc2.lora_B["default"].bias.detach().numpy(),
    )
    got = lorax_fn.lora(_forward, on_fallback="error")(base, lt, jnp.asarray(x))
    assert np.abs(want - np.asarray(_forward(base, x))).max() > 0.1  # the adapter matters
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_forward(merge(base, lt), x), want, rtol=1e-5, atol=1e-5)

    # Ours, written back, loads into PEFT and computes the same.
    export_peft(tmp_path / "ours", lt, name_map=lambda p: p.split("/")[1])
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["lora_bias"] is True and saved["use_dora"] is False
    again = peft.PeftModel.from_pretrained(_torch_model(torch), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        np.testing.assert_allclose(again(torch.from_numpy(x)).numpy(), want, rtol=1e-5, atol=1e-5)
