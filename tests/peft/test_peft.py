"""export_peft / import_peft: exact round trips, PEFT's file layout, refusals, torch parity."""

import dataclasses
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import lorax_fn
from lorax_fn import Layout, LoraError, LoraFactors
from lorax_fn.peft.io import export_peft, import_peft

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


def make_lora(scaling: str = "standard", seed: int = 0, dora: bool = False) -> tuple[dict, dict]:
    spec = dataclasses.replace(make_spec(scaling), use_dora=dora)
    base, lt = lorax_fn.split(make_params(seed), spec, key=jax.random.key(1), layouts=LAYOUTS)
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
        delta, np.asarray(lorax_fn.factors.delta(f)).reshape(H * K, D).T, rtol=1e-5, atol=1e-6
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
    # (lora_bias=True is read as lorax_fn.variants.lora_bias, bias="all" | "lora_only" by
    # lorax_fn.peft.biases: tests/peft/test_bias_modes.py; other modes are not PEFT's LoRA.)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"bias": "boft_only"}))
    with pytest.raises(LoraError, match="bias='boft_only' is not one of PEFT's modes"):
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
    with pytest.raises(LoraError, match=r"name_map rule \('params/\(', 'x'\) is not a valid"):
        export_peft(tmp_path, lt, make_spec(), name_map=[("params/(", "x")])
    with pytest.raises(LoraError, match=r"rule \('params/\(\.\*\)', 'x\\\\2'\) is not a valid"):
        export_peft(tmp_path, lt, make_spec(), name_map=[("params/(.*)", r"x\2")])
    pissa = lorax_fn.LoraSpec(targets="**/attn/*/kernel", init="pissa")
    with pytest.raises(LoraError, match="PiSSA adapter is relative to the residual base"):
        export_peft(tmp_path, lt, pissa, name_map=NAME_MAP)
    assert not (tmp_path / "adapter_config.json").exists()


# --------------------------------------------------------------------------- PyTorch parity


def torch_model(params: dict):
    torch = pytest.importorskip("torch")
    p = {k: np.asarray(v) for k, v in lorax_fn.paths.leaves_with_paths(params)}

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


# --------------------------------------------------------------------------- convolutions

CONV = "**/conv*/kernel"
CONV_SPEC = lorax_fn.LoraSpec(targets=CONV, rank=2, alpha=3.0, trainable="**/head/*")


def conv_params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    normal = lambda *s: jnp.asarray(rng.standard_normal(s) / math.sqrt(math.prod(s[:-1])))  # noqa: E731
    return {
        "params": {
            "conv2": {"kernel": normal(3, 3, 3, 4), "bias": normal(4)},  # HWIO
            "conv1": {"kernel": normal(3, 4, 5), "bias": normal(5)},  # WIO
            "head": {"kernel": normal(5, 2), "bias": normal(2)},
        }
    }


def conv_forward(params: dict, x: jax.Array) -> jax.Array:
    """NHWC images: a 3x3 conv (padding 1), then a stride-2 1-D conv over the pixels."""
    p = params["params"]
    y = jax.lax.conv_general_dilated(
        x,
        p["conv2"]["kernel"],
        (1, 1),
        [(1, 1), (1, 1)],
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    y = jnp.tanh(y + p["conv2"]["bias"]).reshape(x.shape[0], -1, 4)
    z = jax.lax.conv_general_dilated(
        y, p["conv1"]["kernel"], (2,), [(1, 1)], dimension_numbers=("NWC", "WIO", "NWC")
    )
    return jnp.tanh(z + p["conv1"]["bias"]).mean(axis=1) @ p["head"]["kernel"] + p["head"]["bias"]


def conv_lora(dora: bool = False) -> tuple[dict, dict, jax.Array]:
    params = conv_params()
    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 6, 6, 3)), jnp.float32)
    layouts = lorax_fn.infer_layouts(conv_forward, params, x)
    spec = dataclasses.replace(CONV_SPEC, use_dora=dora)
    base, lt = lorax_fn.split(params, spec, key=jax.random.key(0), layouts=layouts)
    rng = np.random.default_rng(3)
    noise = lambda x: jnp.asarray(np.asarray(x) + 0.3 * rng.standard_normal(x.shape), x.dtype)  # noqa: E731
    return base, jax.tree.map(noise, lt), x


def test_conv_kernels_export_in_peft_conv_format_and_round_trip(tmp_path):
    base, lt, _ = conv_lora()
    export_peft(tmp_path, lt, CONV_SPEC, conv=CONV)
    tensors = safetensors.numpy.load_file(str(tmp_path / "adapter_model.safetensors"))
    p = "base_model.model."
    assert tensors[p + "conv2.lora_A.weight"].shape == (2, 3, 3, 3)  # (r, in, kh, kw)
    assert tensors[p + "conv2.lora_B.weight"].shape == (4, 2, 1, 1)  # (out, r, 1, 1)
    assert tensors[p + "conv1.lora_A.weight"].shape == (2, 4, 3)
    assert tensors[p + "conv1.lora_B.weight"].shape == (5, 2, 1)
    # PEFT's ΔW = scale · B·A over r, in PyTorch's (out, in, *window): the Flax ΔW transposed.
    f = lt["params/conv2/kernel"]
    peft_delta = f.scale * np.einsum(
        "or,rihw->oihw",
        tensors[p + "conv2.lora_B.weight"][:, :, 0, 0],
        tensors[p + "conv2.lora_A.weight"],
    )
    np.testing.assert_allclose(
        peft_delta,
        np.asarray(lorax_fn.factors.delta(f)).transpose(3, 2, 0, 1),
        rtol=1e-5,
        atol=1e-6,
    )
    assert_same_tree(import_peft(tmp_path, base), lt)
    # As PEFT writes it, without lorax_fn's header: the conv format alone says what it is.
    safetensors.numpy.save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    got = import_peft(tmp_path, base)
    for path in ("params/conv2/kernel", "params/conv1/kernel"):
        assert got[path].layout == lt[path].layout
        np.testing.assert_array_equal(got[path].a, lt[path].a)
        np.testing.assert_array_equal(got[path].b, lt[path].b)


def test_conv_refusals(tmp_path):
    base, lt, _ = conv_lora()
    dense = {
        "params/head/kernel": LoraFactors(
            jnp.ones((5, 1)), jnp.ones((1, 2)), 1.0, Layout((0,), (1,))
        )
    }
    with pytest.raises(LoraError, match=r"params/head/kernel: conv= names it, but .* is not a "):
        export_peft(tmp_path, dense, conv="**/head/kernel")
    export_peft(tmp_path / "a", lt, CONV_SPEC, conv=CONV)
    other = jax.tree.map(lambda x: x, base)
    other["params"]["conv2"]["kernel"] = jnp.ones((3, 3, 3, 6))
    with pytest.raises(
        LoraError,
        match=r"conv2 → params/conv2/kernel: conv lora_A \[2, 3, 3, 3\] / lora_B \[4, 2, 1, 1\]",
    ):
        import_peft(tmp_path / "a", other)


# --------------------------------------------------------------------------- overwriting


def test_export_refuses_to_overwrite_unless_asked_and_never_leaves_half_an_adapter(
    tmp_path, monkeypatch
):
    base, lt = make_lora()
    out = tmp_path / "adapter"
    export_peft(out, lt, make_spec(), name_map=NAME_MAP)
    first = (out / "adapter_model.safetensors").read_bytes()
    _, other = make_lora(seed=1)
    with pytest.raises(LoraError, match=rf"{out} already exists; pass overwrite=True"):
        export_peft(out, other, make_spec(), name_map=NAME_MAP)
    assert (out / "adapter_model.safetensors").read_bytes() == first

    def killed(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", killed)
    with pytest.raises(OSError, match="disk full"):
        export_peft(out, other, make_spec(), name_map=NAME_MAP, overwrite=True)
    monkeypatch.undo()
    assert (out / "adapter_model.safetensors").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary left

    export_peft(out, other, make_spec(), name_map=NAME_MAP, overwrite=True)
    assert_same_tree(import_peft(out, base, name_map=NAME_MAP), other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    with pytest.raises(LoraError, match=rf"refusing to overwrite {notes}: it has no adapter_"):
        export_peft(notes, lt, make_spec(), name_map=NAME_MAP, overwrite=True)
    assert [p.name for p in notes.iterdir()] == ["todo.txt"]


# --------------------------------------------------------------------------- fan_in_fan_out


def test_fan_in_fan_out_keeps_full_kernels_in_in_out_order(tmp_path):
    base, lt = make_lora()
    export_peft(tmp_path, lt, make_spec(), name_map=NAME_MAP, fan_in_fan_out=True)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    tensors = safetensors.numpy.load_file(str(tmp_path / "adapter_model.safetensors"))
    p = "base_model.model."
    np.testing.assert_array_equal(tensors[p + "head.weight"], lt["params/head/kernel"])  # (in, out)
    assert tensors[p + "attn.query_proj.lora_A.weight"].shape == (4, D)  # factors: unchanged
    assert tensors[p + "attn.query_proj.lora_B.weight"].shape == (H * K, 4)
    assert_same_tree(import_peft(tmp_path, base, name_map=NAME_MAP), lt)  # read from the config
    with pytest.raises(LoraError, match=r"params/head/kernel: modules_to_save tensor of shape"):
        import_peft(tmp_path, base, name_map=NAME_MAP, fan_in_fan_out=False)


# --------------------------------------------------------------------------- PyTorch parity: conv


def torch_conv_model(params: dict):
    torch = pytest.importorskip("torch")
    p = {k: np.asarray(v) for k, v in lorax_fn.paths.leaves_with_paths(params)}

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv2 = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.conv1 = torch.nn.Conv1d(4, 5, 3, stride=2, padding=1)
            self.head = torch.nn.Linear(5, 2)

        def forward(self, x):  # x: NHWC, as the Flax model takes it
            n = x.shape[0]
            y = torch.tanh(self.conv2(x.permute(0, 3, 1, 2)))  # NCHW
            y = y.permute(0, 2, 3, 1).reshape(n, -1, 4).permute(0, 2, 1)  # pixels in Flax order
            return self.head(torch.tanh(self.conv1(y)).mean(dim=2))

    model = Model()
    weights = {  # Flax (*window, in, out) → PyTorch (out, in, *window)
        "conv2.weight": p["params/conv2/kernel"].transpose(3, 2, 0, 1),
        "conv2.bias": p["params/conv2/bias"],
        "conv1.weight": p["params/conv1/kernel"].transpose(2, 1, 0),
        "conv1.bias": p["params/conv1/bias"],
        "head.weight": p["params/head/kernel"].T,
        "head.bias": p["params/head/bias"],
    }
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
    return model.eval()


def test_peft_conv_model_with_exported_adapter_matches_flax(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    base, lt, x = conv_lora()
    with torch.no_grad():  # the two base models agree before any adapter
        torch_base = torch_conv_model(base)(torch.from_numpy(np.asarray(x))).numpy()
    np.testing.assert_allclose(torch_base, conv_forward(base, x), rtol=1e-5, atol=1e-5)
    export_peft(tmp_path, lt, CONV_SPEC, conv=CONV)
    model = peft.PeftModel.from_pretrained(torch_conv_model(base), str(tmp_path)).eval()
    with torch.no_grad():
        got = model(torch.from_numpy(np.asarray(x))).numpy()
    want = np.asarray(lorax_fn.lora(conv_forward, on_fallback="error")(base, lt, x))
    assert np.abs(want - torch_base).max() > 0.05  # the adapter matters
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_conv_adapter_saved_by_peft_imports_and_matches(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    base, _, x = conv_lora()
    config = peft.LoraConfig(
        r=2, lora_alpha=5, target_modules=["conv2", "conv1"], modules_to_save=["head"]
    )
    model = peft.get_peft_model(torch_conv_model(base), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(0.3 * torch.randn_like(param))
    model.save_pretrained(str(tmp_path))
    lt = import_peft(tmp_path, base)
    assert set(lt) == {
        "params/conv2/kernel",
        "params/conv1/kernel",
        "params/head/kernel",
        "params/head/bias",
    }
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(np.asarray(x))).numpy()
    got = np.asarray(lorax_fn.lora(conv_forward, on_fallback="error")(base, lt, x))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- GPT-2's Conv1D


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_fan_in_fan_out_adapter_loads_into_conv1d_modules(tmp_path, dora):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    rng = np.random.default_rng(0)
    normal = lambda *s: jnp.asarray(rng.standard_normal(s) / 4, jnp.float32)  # noqa: E731
    params = {
        "params": {m: {"kernel": normal(D, D), "bias": normal(D)} for m in ("c_attn", "c_proj")}
    }
    spec = lorax_fn.LoraSpec("**/c_attn/kernel", rank=3, trainable="**/c_proj/*", use_dora=dora)
    base, lt = lorax_fn.split(params, spec, key=jax.random.key(0))
    lt = jax.tree.map(lambda x: x + normal(*x.shape), lt)

    class Model(torch.nn.Module):  # GPT-2's layout: Conv1D weights are (in, out)
        def __init__(self):
            super().__init__()
            self.c_attn = conv1d(D, D)
            self.c_proj = conv1d(D, D)

        def forward(self, x):
            return self.c_proj(torch.tanh(self.c_attn(x)))

    torch_model = Model()
    weights = {f"{m}.weight": base["params"][m]["kernel"] for m in ("c_attn", "c_proj")}
    weights |= {f"{m}.bias": base["params"][m]["bias"] for m in ("c_attn", "c_proj")}
    torch_model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
    export_peft(tmp_path, lt, spec, fan_in_fan_out=True)
    model = peft.PeftModel.from_pretrained(torch_model.eval(), str(tmp_path)).eval()
    x = rng.standard_normal((3, D)).astype(np.float32)
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()

    def forward(params, x):
        p = params["params"]
        h = jnp.tanh(x @ p["c_attn"]["kernel"] + p["c_attn"]["bias"])
        return h @ p["c_proj"]["kernel"] + p["c_proj"]["bias"]

    want = forward(lorax_fn.merge(base, lt), x)
    assert np.abs(want - forward(base, x)).max() > 0.1
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert_same_tree(import_peft(tmp_path, base), lt)


def test_a_trained_norm_weight_exports_as_modules_to_save(tmp_path):
    # Hugging Face's Flax ports name an RMSNorm's scale `weight`, as PyTorch does.
    params = {"q": jnp.ones((8, 8)), "norm": {"weight": jnp.arange(8.0)}}
    spec = lorax_fn.LoraSpec("q", rank=2, trainable=["norm/weight"])
    base, lt = lorax_fn.split(params, spec, key=jax.random.key(0))
    lt = {**lt, "norm/weight": lt["norm/weight"] + 1.0}
    rules = {"q": "q", "norm/weight": "norm"}
    export_peft(tmp_path, lt, spec, name_map=rules)
    tensors = safetensors.numpy.load_file(str(tmp_path / "adapter_model.safetensors"))
    np.testing.assert_array_equal(tensors["base_model.model.norm.weight"], np.arange(8.0) + 1.0)
    assert_same_tree(import_peft(tmp_path, base, name_map=rules), lt)


# --------------------------------------------------------------------------- DoRA

MAG = ".lora_magnitude_vector"


def test_dora_round_trip_is_exact_and_files_follow_peft(tmp_path):
    base, lt = make_lora(dora=True)
    export_peft(tmp_path, lt, make_spec(), name_map=NAME_MAP)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    tensors = safetensors.numpy.load_file(str(tmp_path / "adapter_model.safetensors"))
    p = "base_model.model."
    # PEFT's norm is per row of the (out, in) weight: one entry per fan-out index.
    m = {path: np.asarray(f.magnitude) for path, f in lt.items() if isinstance(f, LoraFactors)}
    np.testing.assert_array_equal(
        tensors[p + "attn.query_proj" + MAG], m["params/attn/query/kernel"].reshape(H * K)
    )
    np.testing.assert_array_equal(tensors[p + "attn.out_proj" + MAG], m["params/attn/out/kernel"])
    np.testing.assert_array_equal(tensors[p + "layers.2" + MAG], m["params/layers/kernel"][2])
    np.testing.assert_array_equal(tensors[p + "embed" + MAG], m["params/embed/embedding"])  # (D,)
    assert sum(k.endswith(MAG) for k in tensors) == 6  # embed, query, out, 3 layers
    assert_same_tree(import_peft(tmp_path, base, name_map=NAME_MAP), lt)
    # As PEFT writes it (no lorax_fn header): the stack's layout is given, the rest guessed.
    safetensors.numpy.save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    got = import_peft(tmp_path, base, name_map=NAME_MAP, layouts=LAYOUTS)
    for path, f in m.items():
        np.testing.assert_array_equal(got[path].magnitude, f, err_msg=path)


def test_dora_refusals(tmp_path):
    base, lt = make_lora(dora=True)
    _, plain = make_lora()
    mixed = lt | {"params/layers/kernel": plain["params/layers/kernel"]}
    with pytest.raises(
        LoraError,
        match=r"mixes DoRA entries \['params/attn/out/kernel'.* with plain LoRA entries "
        r"\['params/layers/kernel'\]",
    ):
        export_peft(tmp_path, mixed, make_spec(), name_map=NAME_MAP)
    export_peft(tmp_path, lt, make_spec(), name_map=NAME_MAP)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = safetensors.numpy.load_file(str(weights))
    key = "base_model.model.attn.query_proj" + MAG
    safetensors.numpy.save_file(tensors | {key: np.ones(H * K + 1, np.float32)}, str(weights))
    with pytest.raises(
        LoraError,
        match=rf"{re.escape(key)} → params/attn/query/kernel: DoRA magnitude of shape "
        r"\[33\], .* needs \[32\]",
    ):
        import_peft(tmp_path, base, name_map=NAME_MAP, layouts=LAYOUTS)
    safetensors.numpy.save_file({k: v for k, v in tensors.items() if k != key}, str(weights))
    with pytest.raises(
        LoraError, match=rf"attn.query_proj: .*use_dora=True, .* no {re.escape(key)}"
    ):
        import_peft(tmp_path, base, name_map=NAME_MAP, layouts=LAYOUTS)
    safetensors.numpy.save_file(tensors, str(weights))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"use_dora": False}))
    with pytest.raises(
        LoraError, match=r"lora_magnitude_vector but its config says use_dora=False"
    ):
        import_peft(tmp_path, base, name_map=NAME_MAP, layouts=LAYOUTS)


def plain_part(lt: dict) -> dict:
    """The tree without its magnitudes: plain LoRA with the same A and B."""
    return {p: f.plain() if isinstance(f, LoraFactors) else f for p, f in lt.items()}


def test_peft_dora_model_with_exported_adapter_matches_flax(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    base, lt = make_lora(dora=True)
    export_peft(tmp_path, lt, make_spec(), name_map=NAME_MAP)
    model = peft.PeftModel.from_pretrained(torch_model(base), str(tmp_path)).eval()
    assert model.peft_config["default"].use_dora
    tokens = np.arange(2 * V) % V
    with torch.no_grad():
        got = model(torch.from_numpy(tokens)).numpy()
    want = np.asarray(forward(lorax_fn.merge(base, lt), jnp.asarray(tokens)))
    plain = np.asarray(forward(lorax_fn.merge(base, plain_part(lt)), jnp.asarray(tokens)))
    assert np.abs(want - plain).max() > 0.05  # the magnitudes matter
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    factorized = lorax_fn.lora(forward, on_fallback="ignore")(base, lt, jnp.asarray(tokens))
    np.testing.assert_allclose(got, factorized, rtol=1e-4, atol=1e-5)


def test_dora_adapter_saved_by_peft_imports_and_matches(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    base = make_params()
    config = peft.LoraConfig(
        r=4,
        lora_alpha=6,
        target_modules=["query_proj", "out_proj", "layers.0", "layers.1", "layers.2", "embed"],
        rank_pattern={"out_proj": 2},
        use_dora=True,
        init_lora_weights=False,  # B ≠ 0: PEFT's magnitude init is ‖W0 + s·B·A‖, not ‖W0‖
        modules_to_save=["head"],
    )
    torch.manual_seed(0)
    model = peft.get_peft_model(torch_model(base), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:  # trained away from the init
                param.mul_(1 + 0.3 * torch.randn_like(param))
    model.save_pretrained(str(tmp_path))
    lt = import_peft(tmp_path, base, name_map=NAME_MAP, layouts=LAYOUTS)
    assert all(f.variant == "dora" for f in lt.values() if isinstance(f, LoraFactors))
    assert lt["params/layers/kernel"].magnitude.shape == (L, D)
    assert lt["params/attn/query/kernel"].magnitude.shape == (H, K)
    tokens = np.arange(2 * V) % V
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(tokens)).numpy()
    got = np.asarray(forward(lorax_fn.merge(base, lt), jnp.asarray(tokens)))
    plain = np.asarray(forward(lorax_fn.merge(base, plain_part(lt)), jnp.asarray(tokens)))
    assert np.abs(want - plain).max() > 0.05
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    factorized = lorax_fn.lora(forward, on_fallback="ignore")(base, lt, jnp.asarray(tokens))
    np.testing.assert_allclose(factorized, want, rtol=1e-4, atol=1e-5)


def test_dora_conv_adapter_matches_peft_both_ways(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    base, lt, x = conv_lora(dora=True)
    spec = dataclasses.replace(CONV_SPEC, use_dora=True)
    export_peft(tmp_path / "ours", lt, spec, conv=CONV)
    tensors = safetensors.numpy.load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert tensors["base_model.model.conv2" + MAG].shape == (1, 4, 1, 1)  # PEFT's Conv2d
    assert tensors["base_model.model.conv1" + MAG].shape == (1, 5, 1)
    assert_same_tree(import_peft(tmp_path / "ours", base), lt)
    model = peft.PeftModel.from_pretrained(torch_conv_model(base), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        got = model(torch.from_numpy(np.asarray(x))).numpy()
    want = np.asarray(conv_forward(lorax_fn.merge(base, lt), x))
    plain = np.asarray(conv_forward(lorax_fn.merge(base, plain_part(lt)), x))
    assert np.abs(want - plain).max() > 0.02
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

    # And back: a DoRA conv adapter made and trained by PEFT.
    config = peft.LoraConfig(
        r=2, lora_alpha=5, target_modules=["conv2", "conv1"], use_dora=True, init_lora_weights=False
    )
    torch.manual_seed(1)
    model = peft.get_peft_model(torch_conv_model(base), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.3 * torch.randn_like(param))
    model.save_pretrained(str(tmp_path / "peft"))
    imported = import_peft(tmp_path / "peft", base)
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(np.asarray(x))).numpy()
    got = np.asarray(conv_forward(lorax_fn.merge(base, imported), x))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- MoE experts

E, HID, INTER, TOPK, TOKENS = 4, 8, 6, 2, 10
EXPERT_MAP = [
    (r"params/layers/experts/(\w+)", r"layers.{layer}.experts.\1"),
    (r"params/head/kernel", "head"),
]
EXPERT_SPEC = lorax_fn.LoraSpec(
    targets=["**/experts/*", "**/head/kernel"],
    rank=2,
    alpha=3.0,
    rank_pattern={"**/down_proj": 3},
)


def moe_params(seed: int = 0) -> dict:
    """Two stacked Mixtral-style expert blocks (Flax (L, E, in, out)) and a head."""
    rng = np.random.default_rng(seed)
    normal = lambda *s: jnp.asarray(rng.standard_normal(s) / math.sqrt(s[-2]), jnp.float32)  # noqa: E731
    return {
        "params": {
            "layers": {
                "experts": {
                    "gate_up_proj": normal(2, E, HID, 2 * INTER),
                    "down_proj": normal(2, E, INTER, HID),
                }
            },
            "head": {"kernel": normal(HID, HID)},
        }
    }


def moe_inputs() -> tuple[jax.Array, jax.Array, jax.Array]:
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((TOKENS, HID)), jnp.float32)
    chosen = np.stack([rng.permutation(E)[:TOPK] for _ in range(2 * TOKENS)]).reshape(2, TOKENS, 2)
    gates = jnp.asarray(rng.uniform(0.1, 1.0, (2, TOKENS, TOPK)), jnp.float32)
    return x, jnp.asarray(chosen, jnp.int32), gates


def moe_forward(params: dict, x: jax.Array, chosen: jax.Array, gates: jax.Array) -> jax.Array:
    """Per layer, as MixtralExperts: token copies sorted by expert, ragged_dot, SiLU(gate)·up."""
    p = params["params"]
    for layer in range(chosen.shape[0]):
        flat = chosen[layer].reshape(-1)
        order = jnp.argsort(flat)
        sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
        routed = jnp.repeat(x, TOPK, axis=0)[order]
        h = jax.lax.ragged_dot(routed, p["layers"]["experts"]["gate_up_proj"][layer], sizes)
        gate, up = jnp.split(h, 2, axis=-1)
        y = jax.lax.ragged_dot(
            jax.nn.silu(gate) * up, p["layers"]["experts"]["down_proj"][layer], sizes
        )
        y = jnp.zeros_like(y).at[order].set(y)
        x = x + jnp.sum(y.reshape(TOKENS, TOPK, HID) * gates[layer][..., None], axis=1)
    return x @ p["head"]["kernel"]


def moe_lora(seed: int = 0) -> tuple[dict, dict]:
    params = moe_params(seed)
    layouts = lorax_fn.infer_layouts(moe_forward, params, *moe_inputs())
    base, lt = lorax_fn.split(params, EXPERT_SPEC, key=jax.random.key(2), layouts=layouts)
    rng = np.random.default_rng(seed + 4)
    noise = lambda x: jnp.asarray(np.asarray(x) + 0.3 * rng.standard_normal(x.shape), x.dtype)  # noqa: E731
    return base, jax.tree.map(noise, lt)


def test_experts_export_as_peft_target_parameters_and_round_trip(tmp_path):
    base, lt = moe_lora()
    f = lt["params/layers/experts/gate_up_proj"]
    assert f.layout == Layout(in_axes=(2,), out_axes=(3,), batch_axes=(0, 1))  # (L, E, in, out)
    export_peft(tmp_path, lt, EXPERT_SPEC, name_map=EXPERT_MAP, experts="**/experts/*")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    names = [f"layers.{i}.experts.{p}" for i in range(2) for p in ("down_proj", "gate_up_proj")]
    assert config["target_parameters"] == sorted(names) and config["target_modules"] == ["head"]
    assert (config["r"], config["lora_alpha"]) == (2, 3)
    assert config["rank_pattern"] == {re.escape(n): 3 for n in names if "down" in n}
    assert config["alpha_pattern"] == {}  # alpha 3 at rank 3 too: the spec's scale is alpha / r
    tensors = safetensors.numpy.load_file(str(tmp_path / "adapter_model.safetensors"))
    p = "base_model.model.layers.1.experts."
    # gate_up_proj was registered first: PEFT's innermost wrapper, one .base_layer down.
    lora_a, lora_b = (
        tensors[p + "base_layer.lora_A.weight"],
        tensors[p + "base_layer.lora_B.weight"],
    )
    assert lora_a.shape == (2 * E, HID) and lora_b.shape == (2 * INTER, 2 * E)
    assert tensors[p + "lora_A.weight"].shape == (3 * E, INTER)  # down_proj, rank 3
    assert tensors[p + "lora_B.weight"].shape == (HID, 3 * E)
    a, b = np.asarray(f.a[1]), np.asarray(f.b[1])  # (E, in, r), (E, r, out)
    for e in range(E):
        for k in range(2):
            np.testing.assert_array_equal(lora_a[e * 2 + k], a[e][:, k])  # expert-major rows
            np.testing.assert_array_equal(lora_b[:, k * E + e], b[e][k])  # rank-major columns
    assert_same_tree(import_peft(tmp_path, base, name_map=EXPERT_MAP), lt)
    # As PEFT writes it: no header; the layout of a target parameter defaults to (L, E, in, out).
    safetensors.numpy.save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    got = import_peft(tmp_path, base, name_map=EXPERT_MAP)
    for path, want in lt.items():
        assert got[path].layout == want.layout and got[path].scale == pytest.approx(want.scale)
        np.testing.assert_array_equal(got[path].a, want.a)
        np.testing.assert_array_equal(got[path].b, want.b)


def test_experts_refusals(tmp_path):
    base, lt = moe_lora()
    kw = {"name_map": EXPERT_MAP, "experts": "**/experts/*"}
    with pytest.raises(
        LoraError, match=r"experts/down_proj: PEFT.s target_parameters .* refuse lora_d"
    ):
        export_peft(tmp_path, lt, dataclasses.replace(EXPERT_SPEC, dropout=0.1), **kw)
    with pytest.raises(LoraError, match=r"refuse fan_in_fan_out=True"):
        export_peft(tmp_path, lt, EXPERT_SPEC, fan_in_fan_out=True, **kw)
    with pytest.raises(
        LoraError, match=r"layers.0.experts: PEFT nests .* does not place \['down_proj'\]"
    ):
        export_peft(tmp_path, lt, EXPERT_SPEC, parameter_order=("gate_up_proj",), **kw)
    with pytest.raises(LoraError, match=r"params/head/kernel: PEFT's target_parameters take a 3-D"):
        export_peft(tmp_path, lt, EXPERT_SPEC, name_map=EXPERT_MAP, experts="**/kernel")
    assert not (tmp_path / "adapter_config.json").exists()
    export_peft(tmp_path, lt, EXPERT_SPEC, **kw)
    other = jax.tree.map(lambda x: x, base)
    other["params"]["layers"]["experts"]["down_proj"] = jnp.ones((2, E, INTER + 1, HID))
    with pytest.raises(
        LoraError,
        match=r"layers.0.experts → params/layers/experts/down_proj: lora_A \[12, 6\] / lora_B "
        r"\[8, 12\] do not fit 4 experts .* \(expected \[r·4, 7\] / \[8, r·4\]\)",
    ):
        import_peft(tmp_path, other, name_map=EXPERT_MAP)


def torch_moe_model(params: dict):
    torch = pytest.importorskip("torch")
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    config = pytest.importorskip("transformers").MixtralConfig(
        hidden_size=HID, intermediate_size=INTER, num_local_experts=E, num_experts_per_tok=TOPK
    )
    config._experts_implementation = "eager"
    p = {k: np.asarray(v) for k, v in lorax_fn.paths.leaves_with_paths(params)}

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = mixtral.MixtralExperts(config)  # gate_up (E, 2I, H), down (E, H, I)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(Block() for _ in range(2))
            self.head = torch.nn.Linear(HID, HID, bias=False)

        def forward(self, x, chosen, gates):
            for i, block in enumerate(self.layers):
                x = x + block.experts(x, chosen[i], gates[i])
            return self.head(x)

    model = Model()
    weights = {"head.weight": p["params/head/kernel"].T}
    for i in range(2):
        for name in ("gate_up_proj", "down_proj"):  # Flax (E, in, out) → PyTorch (E, out, in)
            weights[f"layers.{i}.experts.{name}"] = p[f"params/layers/experts/{name}"][i].transpose(
                0, 2, 1
            )
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
    return model.eval()


def run_torch_moe(model, inputs) -> np.ndarray:
    torch = pytest.importorskip("torch")
    x, chosen, gates = (torch.from_numpy(np.array(v)) for v in inputs)
    with torch.no_grad():
        return model(x, chosen.long(), gates).numpy()


def test_peft_moe_experts_match_flax_both_ways(tmp_path):
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    base, lt = moe_lora()
    inputs = moe_inputs()
    np.testing.assert_allclose(
        run_torch_moe(torch_moe_model(base), inputs),
        moe_forward(base, *inputs),
        rtol=1e-5,
        atol=1e-5,
    )
    export_peft(tmp_path / "ours", lt, EXPERT_SPEC, name_map=EXPERT_MAP, experts="**/experts/*")
    model = peft.PeftModel.from_pretrained(torch_moe_model(base), str(tmp_path / "ours")).eval()
    got = run_torch_moe(model, inputs)
    want = np.asarray(lorax_fn.lora(moe_forward, on_fallback="error")(base, lt, *inputs))
    assert np.abs(want - np.asarray(moe_forward(base, *inputs))).max() > 0.1
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

    # And back: an adapter PEFT made on the experts' parameters (B ≠ 0 from the start).
    config = peft.LoraConfig(
        r=2,
        lora_alpha=5,
        target_modules=["head"],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
        rank_pattern={"down_proj": 3},
        init_lora_weights=False,
    )
    torch.manual_seed(0)
    model = peft.get_peft_model(torch_moe_model(base), config)
    model.save_pretrained(str(tmp_path / "peft"))
    imported = import_peft(tmp_path / "peft", base, name_map=EXPERT_MAP)
    assert imported["params/layers/experts/down_proj"].rank == 3
    assert imported["params/layers/experts/gate_up_proj"].scale == 2.5
    assert imported["params/layers/experts/down_proj"].scale == pytest.approx(5 / 3)
    want = run_torch_moe(model.eval(), inputs)
    assert np.abs(want - np.asarray(moe_forward(base, *inputs))).max() > 0.1
    got = np.asarray(lorax_fn.lora(moe_forward, on_fallback="error")(base, imported, *inputs))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- embeddings, lm_head

LLAMA_VOCAB, LLAMA_D, LLAMA_HEADS, LLAMA_KV = 32, 16, 4, 2
LLAMA_MAP = [
    (r"params/embed_tokens/embedding", "model.embed_tokens"),
    (r"params/lm_head/kernel", "lm_head"),
]
PROJECTIONS = {
    "self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}


def torch_llama(seed: int = 0):
    """A one-layer transformers Llama, untied, so that lm_head is a module of its own."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=LLAMA_VOCAB,
        hidden_size=LLAMA_D,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=LLAMA_HEADS,
        num_key_value_heads=LLAMA_KV,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def llama_params(model) -> dict:
    """The Flax-layout params of ``model``: kernels (in, out), norms as ``scale``."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    layer = {
        name: {"kernel": jnp.asarray(sd[f"model.layers.0.{group}.{name}.weight"].T)}
        for group, names in PROJECTIONS.items()
        for name in names
    } | {
        norm: {"scale": jnp.asarray(sd[f"model.layers.0.{norm}.weight"])}
        for norm in ("input_layernorm", "post_attention_layernorm")
    }
    return {
        "params": {
            "embed_tokens": {"embedding": jnp.asarray(sd["model.embed_tokens.weight"])},
            "layers_0": layer,
            "norm": {"scale": jnp.asarray(sd["model.norm.weight"])},
            "lm_head": {"kernel": jnp.asarray(sd["lm_head.weight"].T)},
        }
    }


def llama_forward(params: dict, tokens: jax.Array) -> jax.Array:
    """LlamaForCausalLM's logits for one sequence: RMSNorm, RoPE, causal GQA, SwiGLU."""
    p = params["params"]
    hd, group = LLAMA_D // LLAMA_HEADS, LLAMA_HEADS // LLAMA_KV
    rms = lambda x, w: w * x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)  # noqa: E731
    angles = jnp.arange(len(tokens))[:, None] / 10000.0 ** (jnp.arange(0, hd, 2) / hd)
    cos, sin = (f(jnp.concatenate([angles, angles], -1))[:, None] for f in (jnp.cos, jnp.sin))
    rope = lambda t: t * cos + jnp.concatenate([-t[..., hd // 2 :], t[..., : hd // 2]], -1) * sin  # noqa: E731
    x = p["embed_tokens"]["embedding"][tokens]
    w = {k: v["kernel"] for k, v in p["layers_0"].items() if "kernel" in v}
    h = rms(x, p["layers_0"]["input_layernorm"]["scale"])
    q = rope((h @ w["q_proj"]).reshape(len(tokens), LLAMA_HEADS, hd))
    k = jnp.repeat(rope((h @ w["k_proj"]).reshape(len(tokens), LLAMA_KV, hd)), group, axis=1)
    v = jnp.repeat((h @ w["v_proj"]).reshape(len(tokens), LLAMA_KV, hd), group, axis=1)
    scores = jnp.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
    scores = jnp.where(jnp.tri(len(tokens), dtype=bool), scores, -jnp.inf)
    attn = jnp.einsum("hqk,khd->qhd", jax.nn.softmax(scores, -1), v)
    x = x + attn.reshape(len(tokens), LLAMA_D) @ w["o_proj"]
    h = rms(x, p["layers_0"]["post_attention_layernorm"]["scale"])
    x = x + (jax.nn.silu(h @ w["gate_proj"]) * (h @ w["up_proj"])) @ w["down_proj"]
    return rms(x, p["norm"]["scale"]) @ p["lm_head"]["kernel"]


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        return model(torch.from_numpy(tokens)[None]).logits[0].numpy()


def peft_embedding_adapter(directory) -> tuple[dict, object]:
    """PEFT's default save of a LoRA on ``embed_tokens`` and ``lm_head``, and its model."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    model = torch_llama()
    base = llama_params(model)
    config = peft.LoraConfig(r=4, lora_alpha=6, target_modules=["lm_head", "embed_tokens"])
    model = peft.get_peft_model(model, config)
    with torch.no_grad():  # PEFT's init leaves lora_B / lora_embedding_A at zero
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.3 * torch.randn_like(param))
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        model.save_pretrained(str(directory))
    return base, model.eval()


def test_peft_default_save_of_embedding_and_lm_head_adapters_imports_and_matches(tmp_path):
    peft = pytest.importorskip("peft")
    base, model = peft_embedding_adapter(tmp_path / "peft")
    tensors = safetensors.numpy.load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    copies = {f"base_model.model.{m}.base_layer.weight" for m in ("lm_head", "model.embed_tokens")}
    assert copies <= set(tensors)  # the case at hand: PEFT wrote the base weights too
    tokens = np.arange(12) * 5 % LLAMA_VOCAB
    want = torch_logits(model, tokens)
    np.testing.assert_allclose(
        llama_forward(base, jnp.asarray(tokens)),
        torch_logits(torch_llama(), tokens),
        rtol=1e-5,
        atol=1e-5,
    )  # the JAX model is the transformers one

    lt = import_peft(tmp_path / "peft", base, name_map=LLAMA_MAP)
    assert set(lt) == {"params/embed_tokens/embedding", "params/lm_head/kernel"}
    assert all(isinstance(f, LoraFactors) and f.scale == 1.5 for f in lt.values())
    got = np.asarray(llama_forward(lorax_fn.merge(base, lt), jnp.asarray(tokens)))
    assert np.abs(want - np.asarray(llama_forward(base, jnp.asarray(tokens)))).max() > 0.1
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

    # A half-precision save rounds the copies: equal within float16's rounding, accepted.
    half = {k: v.astype(np.float16) for k, v in tensors.items()}
    safetensors.numpy.save_file(half, str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert set(import_peft(tmp_path / "peft", base, name_map=LLAMA_MAP)) == set(lt)

    # And back: our export of these targets loads in PEFT with the same logits.
    export_peft(tmp_path / "ours", lt, name_map=LLAMA_MAP)
    exported = peft.PeftModel.from_pretrained(torch_llama(), str(tmp_path / "ours")).eval()
    np.testing.assert_allclose(torch_logits(exported, tokens), want, rtol=1e-4, atol=1e-5)


def test_import_refuses_peft_base_weight_copies_that_are_not_the_base(tmp_path):
    base, _ = peft_embedding_adapter(tmp_path)
    other = jax.tree.map(lambda x: x, base)
    head = other["params"]["lm_head"]
    head["kernel"] = head["kernel"].at[3, 7].add(0.01)  # another base, one value apart
    with pytest.raises(
        LoraError,
        match=r"lm_head\.base_layer\.weight: PEFT saved this copy of the base weight .* "
        r"differs from the base's params/lm_head/kernel in 1 of 512 values",
    ):
        import_peft(tmp_path, other, name_map=LLAMA_MAP)
    other = jax.tree.map(lambda x: x, base)
    embed = other["params"]["embed_tokens"]
    embed["embedding"] = jnp.concatenate([embed["embedding"], embed["embedding"][:1]])
    with pytest.raises(
        LoraError,
        match=r"embed_tokens\.base_layer\.weight: .* has shape \[32, 16\], but the base's "
        r"params/embed_tokens/embedding is \[33, 16\] .* vocabulary resized",
    ):
        import_peft(tmp_path, other, name_map=LLAMA_MAP)
    quantized = lorax_fn.quantize_base(base, "**/lm_head/kernel")
    with pytest.raises(LoraError, match=r"cannot be compared with the quantized base leaf params/"):
        import_peft(tmp_path, quantized, name_map=LLAMA_MAP)
