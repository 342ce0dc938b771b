"""export_peft / import_peft: exact round trips, PEFT's file layout, refusals, torch parity."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import lorax_fn
from lorax_fn import Layout, LoraError, LoraFactors
from lorax_fn.peft import export_peft, import_peft

V, D, H, K, L, C = 11, 16, 4, 8, 3, 5
LAYOUTS = {"params/layers/kernel": Layout(in_axes=(1,), out_axes=(2,), batch_axes=(0,))}
NAME_MAP = [
    (r"params/embed/embedding", "embed"),
    (r"params/attn/(query|out)/kernel", r"attn.\1_proj"),
    (r"params/layers/kernel", "layers.{layer}"),
    (r"params/head/(kernel|bias)", "head"),
]


def make_params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)  # numpy, so that building test trees compiles nothing

    def normal(*shape: int) -> jax.Array:
        return jnp.asarray(rng.standard_normal(shape) / math.sqrt(shape[0]), jnp.float32)

    return {
        "params": {
            "embed": {"embedding": normal(V, D)},
            "attn": {"query": {"kernel": normal(D, H, K)}, "out": {"kernel": normal(H, K, D)}},
            "layers": {"kernel": normal(L, D, D)},
            "head": {"kernel": normal(D, C), "bias": normal(C)},
        }
    }


def make_spec(scaling: str = "standard") -> lorax_fn.LoraSpec:
    return lorax_fn.LoraSpec(
        targets=["**/embedding", "**/attn/*/kernel", "**/layers/kernel"],
        rank=4,
        alpha=8.0,
        rank_pattern={"**/out/kernel": 2},
        alpha_pattern={"**/layers/kernel": 3.0},
        trainable=["**/head/*"],
        scaling=scaling,
        dropout=0.05,
    )


def make_lora(scaling: str = "standard", seed: int = 0) -> tuple[dict, dict]:
    base, lt = lorax_fn.split(
        make_params(seed), make_spec(scaling), key=jax.random.key(1), layouts=LAYOUTS
    )
    rng = np.random.default_rng(seed + 1)
    # B = 0 at init would make every adapter look right; give all arrays distinct values.
    noise = lambda x: jnp.asarray(np.asarray(x) + 0.3 * rng.standard_normal(x.shape), x.dtype)  # noqa: E731
    return base, jax.tree.map(noise, lt)


def forward(params: dict, tokens: jax.Array) -> jax.Array:
    p = params["params"]
    x = p["embed"]["embedding"][tokens]
    q = jnp.einsum("nd,dhk->nhk", x, p["attn"]["query"]["kernel"])
    x = x + jnp.einsum("nhk,hkd->nd", jnp.tanh(q), p["attn"]["out"]["kernel"])
    for i in range(L):
        x = jnp.tanh(x @ p["layers"]["kernel"][i])
    return x @ p["head"]["kernel"] + p["head"]["bias"]


def assert_same_tree(got: dict, want: dict) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)  # includes scale/layout/dropout
    for path in want:
        for g, w in zip(jax.tree.leaves(got[path]), jax.tree.leaves(want[path]), strict=True):
            assert g.dtype == w.dtype, path
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=path)


@pytest.mark.parametrize("scaling", ["standard", "rslora"])
def test_round_trip_is_exact(tmp_path, scaling):
    base, lt = make_lora(scaling)
    export_peft(tmp_path, lt, make_spec(scaling), name_map=NAME_MAP)
    assert_same_tree(import_peft(tmp_path, base, name_map=NAME_MAP), lt)


def test_files_follow_peft_layout(tmp_path):
    _, lt = make_lora()
    export_peft(
        tmp_path,
        lt,
        make_spec(),
        name_map=NAME_MAP,
        base_model_name_or_path="toy",
        task_type="SEQ_CLS",
    )
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    # Per module: the 3 layers have alpha 3; embed, query and out alpha 8 (out at r 2 keeps
    # the spec's scale 8/2). Most common r is 4; alpha ties 3:3 and takes the smaller.
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 3
    assert config["rank_pattern"] == {r"attn\.out_proj": 2}
    assert config["alpha_pattern"] == {"embed": 8, r"attn\.query_proj": 8, r"attn\.out_proj": 8}
    assert config["target_modules"] == sorted(
        ["embed", "attn.query_proj", "attn.out_proj", "layers.0", "layers.1", "layers.2"]
    )
    assert config["modules_to_save"] == ["head"]
    assert config["use_rslora"] is False and config["lora_dropout"] == 0.05
    assert config["bias"] == "none" and config["fan_in_fan_out"] is False
    assert config["init_lora_weights"] == "gaussian" and config["task_type"] == "SEQ_CLS"
    assert config["base_model_name_or_path"] == "toy"

    tensors = safetensors.numpy.load_file(str(tmp_path / "adapter_model.safetensors"))
    p = "base_model.model."
    assert tensors[p + "attn.query_proj.lora_A.weight"].shape == (4, D)  # [r, in]
    assert tensors[p + "attn.query_proj.lora_B.weight"].shape == (H * K, 4)  # [out, r]
    assert tensors[p + "attn.out_proj.lora_A.weight"].shape == (2, H * K)
    assert tensors[p + "layers.1.lora_B.weight"].shape == (D, 4)
    assert tensors[p + "embed.lora_embedding_A"].shape == (4, V)
    assert tensors[p + "embed.lora_embedding_B"].shape == (D, 4)
    assert tensors[p + "head.weight"].shape == (C, D) and tensors[p + "head.bias"].shape == (C,)
    np.testing.assert_array_equal(
        tensors[p + "layers.1.lora_A.weight"], np.asarray(lt["params/layers/kernel"].a[1]).T
    )
    # B·A of a multi-axis kernel is the weight flattened in its own axis order, transposed.
    f = lt["params/attn/out/kernel"]
    delta = (
        tensors[p + "attn.out_proj.lora_B.weight"]
        @ tensors[p + "attn.out_proj.lora_A.weight"]
        * f.scale
    )
    np.testing.assert_allclose(
        delta, np.asarray(lorax_fn.delta(f)).reshape(H * K, D).T, rtol=1e-5, atol=1e-6
    )


def test_default_name_map_and_foreign_adapter_without_lorax_metadata(tmp_path):
    params = {"params": {"block": {"fc": {"kernel": jnp.ones((6, 10)), "bias": jnp.ones(10)}}}}
    spec = lorax_fn.LoraSpec(targets="**/kernel", rank=3, alpha=5.0)
    base, lt = lorax_fn.split(params, spec, key=jax.random.key(0))
    export_peft(tmp_path, lt, spec)
    tensors = safetensors.numpy.load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sorted(tensors) == [
        "base_model.model.block.fc.lora_A.weight",
        "base_model.model.block.fc.lora_B.weight",
    ]
    # As PEFT itself would write it: no lorax_fn header; the scale comes from alpha / r.
    safetensors.numpy.save_file(
        tensors, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"}
    )
    got = import_peft(tmp_path, base)["params/block/fc/kernel"]
    assert math.isclose(got.scale, 5.0 / 3, rel_tol=1e-12) and got.dropout == 0.0
    np.testing.assert_array_equal(got.a, lt["params/block/fc/kernel"].a)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            lambda p: p["params"]["attn"]["query"].update(kernel=jnp.ones((D, H, 9))),
            r"attn.query_proj → params/attn/query/kernel: lora_A \[4, 16\] / lora_B \[32, 4\]",
        ),
        (
            lambda p: p["params"]["layers"].update(kernel=jnp.ones((2, D, D))),
            r"tensors that no leaf of the base maps to .*layers\.2\.lora_A",
        ),
        (lambda p: p["params"].pop("embed"), r"no leaf of the base maps to .*embed\.lora_emb"),
        (
            lambda p: p["params"]["head"].update(bias=jnp.ones(C + 1)),
            r"params/head/bias: modules_to_save tensor of shape \(5,\) does not fit",
        ),
    ],
    ids=["shape", "fewer-layers", "missing-module", "trainable-shape"],
)
def test_import_refuses_a_different_base(tmp_path, change, match):
    base, lt = make_lora()
    export_peft(tmp_path, lt, make_spec(), name_map=NAME_MAP)
    other = jax.tree.map(lambda x: x, base)
    change(other)
    with pytest.raises(LoraError, match=match):
        import_peft(tmp_path, other, name_map=NAME_MAP)


def test_import_refuses_missing_layers_and_bad_files(tmp_path):
    base, lt = make_lora()
    export_peft(tmp_path, lt, make_spec(), name_map=NAME_MAP)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = safetensors.numpy.load_file(str(weights))
    partial = {k: v for k, v in tensors.items() if ".layers.1." not in k}
    safetensors.numpy.save_file(partial, str(weights))  # also drops the lorax_fn header
    with pytest.raises(LoraError, match=r"params/layers/kernel: the adapter has no module for "):
        import_peft(tmp_path, base, name_map=NAME_MAP, layouts=LAYOUTS)
    with pytest.raises(LoraError, match=r"no leaf of the base maps to .*check name_map and "):
        import_peft(tmp_path, base, name_map=NAME_MAP)  # a stack's layout is not guessed
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(LoraError, match=r"cannot read .*adapter_model\.safetensors"):
        import_peft(tmp_path, base, name_map=NAME_MAP)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(LoraError, match="use_dora=True is not supported"):
        import_peft(tmp_path, base, name_map=NAME_MAP)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"peft_type": "IA3"}))
    with pytest.raises(LoraError, match="not a PEFT LoRA adapter"):
        import_peft(tmp_path, base, name_map=NAME_MAP)


def test_export_refusals(tmp_path):
    _, lt = make_lora()
    no_layer = [(r"params/layers/kernel", "layers")] + NAME_MAP
    with pytest.raises(
        LoraError,
        match=r"params/layers/kernel: a stack of 3 weights needs one "
        r"module name per layer",
    ):
        export_peft(tmp_path, lt, make_spec(), name_map=no_layer)
    with pytest.raises(LoraError, match="params/attn/out/kernel: name_map gives no PyTorch"):
        export_peft(tmp_path, lt, make_spec(), name_map={"params/attn/query/kernel": "q"})
    both = [(r"params/head/bias", "attn.query_proj")] + NAME_MAP
    with pytest.raises(LoraError, match=r"both adapted and trained in full: \['attn.query_proj'"):
        export_peft(tmp_path, lt, make_spec(), name_map=both)
    pissa = lorax_fn.LoraSpec(targets="**/attn/*/kernel", init="pissa")
    with pytest.raises(LoraError, match="PiSSA adapter is relative to the residual base"):
        export_peft(tmp_path, lt, pissa, name_map=NAME_MAP)
    assert not (tmp_path / "adapter_config.json").exists()


# --------------------------------------------------------------------------- PyTorch parity


def torch_model(params: dict):
    torch = pytest.importorskip("torch")
    p = {k: np.asarray(v) for k, v in lorax_fn.leaves_with_paths(params)}

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.query_proj = torch.nn.Linear(D, H * K, bias=False)
            self.out_proj = torch.nn.Linear(H * K, D, bias=False)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(V, D)
            self.attn = Attn()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(D, D, bias=False) for _ in range(L))
            self.head = torch.nn.Linear(D, C)

        def forward(self, tokens):
            x = self.embed(tokens)
            x = x + self.attn.out_proj(torch.tanh(self.attn.query_proj(x)))
            for layer in self.layers:
                x = torch.tanh(layer(x))
            return self.head(x)

    model = Model()
    weights = {
        "embed.weight": p["params/embed/embedding"],
        "attn.query_proj.weight": p["params/attn/query/kernel"].reshape(D, H * K).T,
        "attn.out_proj.weight": p["params/attn/out/kernel"].reshape(H * K, D).T,
        "head.weight": p["params/head/kernel"].T,
        "head.bias": p["params/head/bias"],
    } | {f"layers.{i}.weight": p["params/layers/kernel"][i].T for i in range(L)}
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
    return model.eval()


@pytest.mark.parametrize("scaling", ["standard", "rslora"])
def test_peft_model_with_exported_adapter_matches_flax(tmp_path, scaling):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    base, lt = make_lora(scaling)
    export_peft(tmp_path, lt, make_spec(scaling), name_map=NAME_MAP)
    model = peft.PeftModel.from_pretrained(torch_model(base), str(tmp_path)).eval()
    tokens = np.arange(2 * V) % V
    with torch.no_grad():
        got = model(torch.from_numpy(tokens)).numpy()
    want = np.asarray(forward(lorax_fn.merge(base, lt), jnp.asarray(tokens)))
    assert np.abs(want - np.asarray(forward(base, jnp.asarray(tokens)))).max() > 0.1
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_adapter_saved_by_peft_imports_and_matches(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    base = make_params()
    config = peft.LoraConfig(
        r=4,
        lora_alpha=6,
        target_modules=["query_proj", "out_proj", "layers.0", "layers.1", "layers.2", "embed"],
        rank_pattern={"out_proj": 2},
        alpha_pattern={"query_proj": 5},
        modules_to_save=["head"],
    )
    model = peft.get_peft_model(torch_model(base), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name or "modules_to_save" in name:
                param.add_(0.3 * torch.randn_like(param))
    model.save_pretrained(str(tmp_path))
    lt = import_peft(tmp_path, base, name_map=NAME_MAP, layouts=LAYOUTS)
    assert lt["params/attn/out/kernel"].rank == 2
    assert set(lt) == {
        "params/embed/embedding",
        "params/attn/query/kernel",
        "params/attn/out/kernel",
        "params/layers/kernel",
        "params/head/kernel",
        "params/head/bias",
    }
    tokens = np.arange(2 * V) % V
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(tokens)).numpy()
    got = np.asarray(forward(lorax_fn.merge(base, lt), jnp.asarray(tokens)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert isinstance(lt["params/layers/kernel"], LoraFactors)
