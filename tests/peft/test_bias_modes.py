"""PEFT's ``bias="all" | "lora_only"`` modes: trained base biases in PEFT's files, both ways."""

from __future__ import annotations

import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import lorax_fn
from lorax_fn import LoraSpec, split
from lorax_fn.errors import LoraError
from lorax_fn.peft import export_peft, import_peft
from lorax_fn.variants.lora_bias import trainable_biases


def _params() -> dict:
    keys = jax.random.split(jax.random.key(0), 4)
    return {
        "params": {
            "q": {"kernel": jax.random.normal(keys[0], (6, 8)), "bias": jnp.zeros(8)},
            "o": {"kernel": jax.random.normal(keys[1], (8, 3)), "bias": jnp.zeros(3)},
            "norm": {"scale": jnp.ones(8), "bias": jnp.zeros(8)},
        }
    }


def _forward(params, x):
    p = params["params"]
    h = jnp.tanh(x @ p["q"]["kernel"] + p["q"]["bias"])
    h = h * p["norm"]["scale"] + p["norm"]["bias"]
    return h @ p["o"]["kernel"] + p["o"]["bias"]


def _trained(mode: str, params: dict) -> tuple[dict, dict]:
    """base, LoRA tree on q/kernel with ``mode``'s biases trained, all moved off init."""
    trainable = trainable_biases(mode, params, ["params/q/kernel"])
    spec = LoraSpec("params/q/kernel", rank=2, alpha=3.0, trainable=trainable)
    base, lt = split(params, spec, key=jax.random.key(1))
    noise = jax.random.key(2)
    return base, jax.tree.map(lambda x: x + 0.3 * jax.random.normal(noise, x.shape), lt)


@pytest.mark.parametrize(
    ("mode", "keys"),
    [
        ("lora_only", {"q.base_layer.bias"}),
        ("all", {"q.base_layer.bias", "o.bias", "norm.bias"}),
    ],
)
def test_round_trip_keeps_the_trained_biases_under_peft_keys(tmp_path, mode, keys):
    params = _params()
    base, lt = _trained(mode, params)
    export_peft(tmp_path / "a", lt, base=base)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["bias"] == mode and config["modules_to_save"] is None
    saved = safetensors.numpy.load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    prefix = "base_model.model."
    assert {k[len(prefix) :] for k in saved if k.endswith(".bias")} == keys

    back = import_peft(tmp_path / "a", base)
    assert sorted(back) == sorted(lt)
    for path in (p for p in lt if p.endswith("bias")):
        np.testing.assert_array_equal(back[path], lt[path])
    x = jax.random.normal(jax.random.key(3), (4, 6))
    want = _forward(lorax_fn.merge(base, lt), x)
    assert jnp.abs(want - _forward(params, x)).max() > 0.1  # the biases and factors matter
    np.testing.assert_allclose(lorax_fn.lora(_forward)(base, back, x), want, rtol=1e-5, atol=1e-5)


def test_a_set_that_is_no_peft_mode_is_refused_naming_the_paths(tmp_path):
    params = _params()
    # Both layers adapted, only q's bias trained: neither lora_only (o/bias) nor all.
    spec = LoraSpec(["params/q/kernel", "params/o/kernel"], rank=2, trainable=["params/q/bias"])
    base, lt = split(params, spec, key=jax.random.key(1))
    with pytest.raises(LoraError, match=r"neither PEFT's bias='lora_only'.*params/o/bias"):
        export_peft(tmp_path / "a", lt, base=base)
    with pytest.raises(LoraError, match="pass base="):
        export_peft(tmp_path / "a", lt)
    assert not (tmp_path / "a").exists()


def test_an_unknown_bias_mode_is_refused(tmp_path):
    base, lt = _trained("lora_only", _params())
    export_peft(tmp_path / "a", lt, base=base)
    config_file = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(config | {"bias": "boft_only"}))
    with pytest.raises(LoraError, match="bias='boft_only' is not one of PEFT's modes"):
        import_peft(tmp_path / "a", base)


# --------------------------------------------------------------------------- PEFT parity


def parity_modules():
    """torch and peft; where CI installed them (LORAX_FN_REQUIRE_PARITY=1) a failed
    import fails the test instead of skipping it."""
    if os.environ.get("LORAX_FN_REQUIRE_PARITY") == "1":
        return importlib.import_module("torch"), importlib.import_module("peft")
    return pytest.importorskip("torch"), pytest.importorskip("peft")


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


def _flax_params(torch_model) -> dict:
    return {
        "params": {
            name: {
                "kernel": jnp.asarray(layer.weight.detach().numpy().T.copy()),
                "bias": jnp.asarray(layer.bias.detach().numpy().copy()),
            }
            for name, layer in (("fc1", torch_model.fc1), ("fc2", torch_model.fc2))
        }
    }


def _torch_forward(params, x):
    p = params["params"]
    h = jnp.tanh(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    return h @ p["fc2"]["kernel"] + p["fc2"]["bias"]


@pytest.mark.parametrize("mode", ["lora_only", "all"])
def test_peft_bias_modes_import_and_export_with_peft_outputs(tmp_path, mode):
    torch, peft = parity_modules()
    base_model = _torch_model(torch)
    base = _flax_params(base_model)  # copied before PEFT trains the biases in place
    config = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["fc1"], bias=mode)
    model = peft.get_peft_model(base_model, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and ("lora_B" in name or name.endswith("bias")):
                param.add_(0.5 * torch.randn_like(param))
    model.save_pretrained(str(tmp_path / "peft"))
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(x)).numpy()

    lt = import_peft(tmp_path / "peft", base)
    biases = {"lora_only": ["params/fc1/bias"], "all": ["params/fc1/bias", "params/fc2/bias"]}
    assert sorted(p for p in lt if p.endswith("bias")) == biases[mode]
    np.testing.assert_array_equal(
        lt["params/fc1/bias"], model.base_model.model.fc1.base_layer.bias.detach().numpy()
    )
    got = lorax_fn.lora(_torch_forward, on_fallback="error")(base, lt, jnp.asarray(x))
    assert np.abs(want - np.asarray(_torch_forward(base, x))).max() > 0.1
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    # Ours, written back, loads into PEFT (which trains the same biases) and computes the same.
    export_peft(tmp_path / "ours", lt, base=base)
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["bias"] == mode
    again = peft.PeftModel.from_pretrained(_torch_model(torch), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        np.testing.assert_allclose(again(torch.from_numpy(x)).numpy(), want, rtol=1e-5, atol=1e-5)
