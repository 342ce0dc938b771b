"""lorax_fn.peft.presets: PEFT name maps that write Hugging Face's own module names."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import lorax_fn
from examples import serve
from lorax_fn.peft.presets import gpt2_name_map, llama_name_map, module_name

CONFIG = serve.Config(vocab=64, d=32, heads=4, kv_heads=2, layers=2, hidden=48)
PROJECTIONS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]
GPT2_MODULES = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def randomized(tree: dict, seed: int = 0) -> dict:
    """The tree with random B (B = 0 would hide a transposed or misplaced factor)."""
    rng = np.random.default_rng(seed)
    return {
        path: dataclasses.replace(e, b=jnp.asarray(rng.normal(0, 0.3, e.b.shape), e.b.dtype))
        if isinstance(e, lorax_fn.LoraFactors)
        else e
        for path, e in tree.items()
    }


def lora_keys(module: str) -> set[str]:
    return {f"base_model.model.{module}.lora_{m}.weight" for m in "AB"}


@pytest.fixture(scope="module")
def llama():
    variables = serve.init_params(CONFIG, 0)
    spec = lorax_fn.LoraSpec(
        serve.TARGETS,
        rank=4,
        alpha=8.0,
        rank_pattern={"**/o_proj/kernel": 2},
        trainable=["params/lm_head/kernel", "params/norm/scale", "**/input_layernorm/scale"],
    )
    base, lt = lorax_fn.split(variables, spec, key=jax.random.key(1))
    return base, randomized(lt), spec


def assert_same_tree(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for path, w in want.items():
        g = got[path]
        if isinstance(w, lorax_fn.LoraFactors):
            assert (g.scale, g.layout) == (w.scale, w.layout), path
            np.testing.assert_array_equal(g.a, w.a, err_msg=path)
            np.testing.assert_array_equal(g.b, w.b, err_msg=path)
        else:
            np.testing.assert_array_equal(g, w, err_msg=path)


def test_llama_preset_writes_peft_names_and_round_trips(llama, tmp_path):
    base, lt, spec = llama
    preset = llama_name_map()
    lorax_fn.export_peft(tmp_path, lt, spec, name_map=preset)
    keys = set(safetensors.numpy.load_file(str(tmp_path / "adapter_model.safetensors")))
    want = {"base_model.model.lm_head.weight", "base_model.model.model.norm.weight"}
    for i in range(CONFIG.layers):
        want |= {f"base_model.model.model.layers.{i}.input_layernorm.weight"}
        for proj in PROJECTIONS:
            want |= lora_keys(f"model.layers.{i}.{proj}")
    assert keys == want
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(
        f"model.layers.{i}.{p}" for i in range(CONFIG.layers) for p in PROJECTIONS
    )
    assert_same_tree(lorax_fn.import_peft(tmp_path, base, name_map=preset), lt)


def test_hugging_face_flax_layout_gives_the_same_names(llama, tmp_path):
    """FlaxLlamaForCausalLM nests layers as params/model/layers/<i>/…"""
    base, lt, _ = llama
    lt = {p: e for p, e in lt.items() if isinstance(e, lorax_fn.LoraFactors)}

    def hf_path(path: str) -> str:
        return path.replace("params/layers_", "params/model/layers/")

    hf_base = {"params": {"model": {"layers": {}}}}
    for path, leaf in lorax_fn.paths.leaves_with_paths(base):
        if path.startswith("params/layers_"):
            i, *rest = hf_path(path).split("/")[3:]
            node = hf_base["params"]["model"]["layers"].setdefault(i, {})
            for part in rest[:-1]:
                node = node.setdefault(part, {})
            node[rest[-1]] = leaf
    hf_lt = {hf_path(p): e for p, e in lt.items()}
    preset = llama_name_map(
        layers="params/model/layers/{i}", embed="params/model/embed_tokens", norm=None, head=None
    )
    lorax_fn.export_peft(tmp_path / "hf", hf_lt, name_map=preset)
    lorax_fn.export_peft(tmp_path / "ours", lt, name_map=llama_name_map())
    files = [
        safetensors.numpy.load_file(str(tmp_path / d / "adapter_model.safetensors"))
        for d in ("hf", "ours")
    ]
    assert sorted(files[0]) == sorted(files[1])
    for key in files[1]:
        np.testing.assert_array_equal(files[0][key], files[1][key], err_msg=key)
    assert_same_tree(lorax_fn.import_peft(tmp_path / "hf", hf_base, name_map=preset), hf_lt)


def test_scanned_stack_gets_one_module_per_layer(tmp_path):
    layers, d = 3, 8
    base = {
        "params": {
            "layers": {
                "self_attn": {"q_proj": {"kernel": jnp.ones((layers, d, d))}},
                "mlp": {"down_proj": {"kernel": jnp.ones((layers, 2 * d, d))}},
            }
        }
    }
    stacked = lorax_fn.Layout(in_axes=(1,), out_axes=(2,), batch_axes=(0,))
    spec = lorax_fn.LoraSpec(["**/kernel"], rank=2, layouts={"**/kernel": stacked})
    _, lt = lorax_fn.split(base, spec, key=jax.random.key(0))
    lt = randomized(lt)
    preset = llama_name_map(layers="params/layers")
    lorax_fn.export_peft(tmp_path, lt, spec, name_map=preset)
    keys = set(safetensors.numpy.load_file(str(tmp_path / "adapter_model.safetensors")))
    want = set()
    for i in range(layers):
        want |= lora_keys(f"model.layers.{i}.self_attn.q_proj")
        want |= lora_keys(f"model.layers.{i}.mlp.down_proj")
    assert keys == want
    assert_same_tree(lorax_fn.import_peft(tmp_path, base, name_map=preset), lt)


def test_renamed_projections():
    preset = llama_name_map(attn="attention", names={"self_attn.q_proj": "wq"})
    assert module_name(preset, "params/layers_2/attention/wq/kernel") == (
        "model.layers.2.self_attn.q_proj"
    )
    assert module_name(preset, "params/layers_2/attention/k_proj/kernel") == (
        "model.layers.2.self_attn.k_proj"
    )
    assert module_name(preset, "params/layers_x/attention/wq/kernel") is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"layers": "params/{i}/layers_{i}"}, "at most once"),
        ({"layers": "params/layers_{j}"}, "no other braces"),
        ({"layers": "/params/layers_{i}"}, "Flax path"),
        ({"attn": "self/attn"}, "one Flax module name"),
        ({"names": {"q_proj": "wq"}}, "unknown modules ['q_proj']"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(lorax_fn.LoraError, match=message.replace("[", r"\[").replace("]", r"\]")):
        llama_name_map(**kwargs)


def gpt2_base(d: int = 16, layers: int = 2) -> dict:
    """GPT-2's Flax paths with (in, out) kernels, as the README's examples name them."""
    block = {
        "attn": {
            "c_attn": {"kernel": jnp.ones((d, 3 * d))},
            "c_proj": {"kernel": jnp.ones((d, d))},
        },
        "mlp": {
            "c_fc": {"kernel": jnp.ones((d, 4 * d))},
            "c_proj": {"kernel": jnp.ones((4 * d, d))},
        },
        "ln_1": {"scale": jnp.ones(d)},
    }
    return {"params": {f"h_{i}": block for i in range(layers)}}


def test_gpt2_preset_writes_peft_names_that_peft_loads(tmp_path):
    base = gpt2_base()
    spec = lorax_fn.LoraSpec(["**/kernel"], rank=2)
    _, lt = lorax_fn.split(base, spec, key=jax.random.key(0))
    lt = randomized(lt)
    lorax_fn.export_peft(tmp_path, lt, spec, name_map=gpt2_name_map())
    tensors = safetensors.numpy.load_file(str(tmp_path / "adapter_model.safetensors"))
    want = set()
    for i in range(2):
        for module in GPT2_MODULES:
            want |= lora_keys(f"transformer.h.{i}.{module}")
    assert set(tensors) == want
    assert_same_tree(lorax_fn.import_peft(tmp_path, base, name_map=gpt2_name_map()), lt)

    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    model = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel(config), str(tmp_path))
    # PEFT put every factor on GPT-2's own module of that name.
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert set(loaded) == want
    for key, value in tensors.items():
        torch.testing.assert_close(loaded[key], torch.from_numpy(value))


def test_llama_adapter_gives_the_same_logits_in_transformers_and_peft(llama, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    base, lt, spec = llama
    lt = {p: e for p, e in lt.items() if isinstance(e, lorax_fn.LoraFactors)}
    preset = llama_name_map()
    hf_config = transformers.LlamaConfig(
        vocab_size=CONFIG.vocab,
        hidden_size=CONFIG.d,
        intermediate_size=CONFIG.hidden,
        num_hidden_layers=CONFIG.layers,
        num_attention_heads=CONFIG.heads,
        num_key_value_heads=CONFIG.kv_heads,
        max_position_embeddings=CONFIG.max_len,
        rms_norm_eps=CONFIG.eps,
        tie_word_embeddings=False,
    )
    hf_config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(hf_config).eval()
    # The preset names every base weight too: a wrong name fails the strict load.
    weights = {}
    for path, leaf in lorax_fn.paths.leaves_with_paths(base):
        x = np.asarray(leaf)
        weights[module_name(preset, path) + ".weight"] = torch.from_numpy(
            np.array(x.T if path.endswith("kernel") else x)
        )
    model.load_state_dict(weights, strict=True)

    tokens = np.random.default_rng(0).integers(0, CONFIG.vocab, 12)
    with torch.no_grad():
        hf_base = model(torch.from_numpy(tokens[None])).logits[0].numpy()
    ours_base, _ = serve.Llama(CONFIG).apply(base, jnp.asarray(tokens))
    np.testing.assert_allclose(hf_base, ours_base, atol=1e-4, rtol=0)

    lorax_fn.export_peft(tmp_path, lt, spec, name_map=preset)
    adapted = peft.PeftModel.from_pretrained(model, str(tmp_path)).eval()
    with torch.no_grad():
        hf_lora = adapted(torch.from_numpy(tokens[None])).logits[0].numpy()
    ours_lora, _ = lorax_fn.lora(serve.Llama(CONFIG).apply)(base, lt, jnp.asarray(tokens))
    assert np.max(np.abs(ours_lora - ours_base)) > 0.1  # the adapter matters
    np.testing.assert_allclose(hf_lora, ours_lora, atol=1e-4, rtol=0)
