"""Tunix NNX models (google-tunix): a LoRA trained in lorax_fn exports with the Tunix
presets to a PEFT adapter that gives the same logits in transformers + PEFT, imports back
exactly, and lora(fn) on the Tunix model equals merge-then-call in values and gradients.

Small random-init configs, nothing from a hub. Every base weight is also random (Tunix
initialises the MLP to zeros and the norms to ones, which would hide a misplaced one) and
so is B (B = 0 would make any adapter look right).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_fn
from lorax_fn.peft.presets import module_name, tunix_llama3_name_map, tunix_qwen3_name_map

nnx = pytest.importorskip("flax.nnx")
llama3 = pytest.importorskip("tunix.models.llama3.model")
qwen3 = pytest.importorskip("tunix.models.qwen3.model")
torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

VOCAB, D, HIDDEN, HEADS, HEAD_DIM, KV_HEADS, LAYERS, EXPERTS = 64, 32, 48, 4, 8, 2, 2, 4
# Tunix's apply_rope is called without the config's theta, so it always uses its default.
ROPE_THETA = 1_000_000
EPS = 1e-6
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (1, 12))
ATTENTION = ["**/attn/q_proj/w", "**/attn/k_proj/w", "**/attn/v_proj/w", "**/attn/o_proj/w"]
MLP = ["**/mlp/gate_proj/kernel", "**/mlp/up_proj/kernel", "**/mlp/down_proj/kernel"]
EXPERT_WEIGHTS = ["**/mlp/gate_proj", "**/mlp/up_proj", "**/mlp/down_proj"]


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    make: object  # () -> the Tunix model, random weights
    targets: list[str]
    preset: list
    hf_model: object  # () -> the transformers model of the same shape


def tunix_llama3() -> nnx.Module:
    config = llama3.ModelConfig(
        num_layers=LAYERS,
        vocab_size=VOCAB,
        embed_dim=D,
        hidden_dim=HIDDEN,
        num_heads=HEADS,
        head_dim=HEAD_DIM,
        num_kv_heads=KV_HEADS,
        rope_theta=ROPE_THETA,
        norm_eps=EPS,
    )
    return randomized(llama3.Llama3(config, rngs=nnx.Rngs(0)))


def tunix_qwen3(experts: int | None = None) -> nnx.Module:
    config = qwen3.ModelConfig(
        num_layers=LAYERS,
        vocab_size=VOCAB,
        embed_dim=D,
        hidden_dim=HIDDEN,
        num_heads=HEADS,
        head_dim=HEAD_DIM,
        num_kv_heads=KV_HEADS,
        rope_theta=ROPE_THETA,
        norm_eps=EPS,
        num_experts=experts,
        num_experts_per_tok=None if experts is None else 2,
    )
    return randomized(qwen3.Qwen3(config, rngs=nnx.Rngs(0)))


def randomized(model: nnx.Module, seed: int = 0) -> nnx.Module:
    """Every weight random: matrices N(0, 0.2²), norm scales 1 + N(0, 0.1²)."""
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(model)

    def draw(x: jax.Array) -> jax.Array:
        noise = rng.standard_normal(x.shape)
        return jnp.asarray(1 + 0.1 * noise if x.ndim == 1 else 0.2 * noise, x.dtype)

    return nnx.merge(graphdef, jax.tree.map(draw, state))


def hf_config_kwargs() -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=D,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        rms_norm_eps=EPS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=False,
        attn_implementation="eager",
    )


def hf_llama3():
    config = transformers.LlamaConfig(intermediate_size=HIDDEN, **hf_config_kwargs())
    return transformers.LlamaForCausalLM(config).eval()


def hf_qwen3():
    config = transformers.Qwen3Config(intermediate_size=HIDDEN, **hf_config_kwargs())
    return transformers.Qwen3ForCausalLM(config).eval()


def hf_qwen3_moe():
    config = transformers.Qwen3MoeConfig(
        moe_intermediate_size=HIDDEN,
        intermediate_size=HIDDEN,
        num_experts=EXPERTS,
        num_experts_per_tok=2,
        norm_topk_prob=True,  # Tunix always renormalises the top-k routing weights
        **hf_config_kwargs(),
    )
    return transformers.Qwen3MoeForCausalLM(config).eval()


FAMILIES = {
    "llama3": Family("llama3", tunix_llama3, ATTENTION + MLP, tunix_llama3_name_map(), hf_llama3),
    # PEFT adapts an nn.Embedding through lora_embedding_A/B, not Linear keys, which it
    # would ignore: Tunix's table is named input_embedding, not embedding.
    "llama3_embedding": Family(
        "llama3_embedding",
        tunix_llama3,
        [*ATTENTION, *MLP, "embedder/input_embedding"],
        tunix_llama3_name_map(),
        hf_llama3,
    ),
    "qwen3": Family("qwen3", tunix_qwen3, ATTENTION + MLP, tunix_qwen3_name_map(), hf_qwen3),
    "qwen3_moe": Family(
        "qwen3_moe",
        lambda: tunix_qwen3(EXPERTS),
        ATTENTION + EXPERT_WEIGHTS,
        tunix_qwen3_name_map(),
        hf_qwen3_moe,
    ),
}


def logits(model: nnx.Module, tokens: jax.Array) -> jax.Array:
    """Tunix's forward pass without a cache: causal mask, positions 0, 1, …"""
    length = tokens.shape[-1]
    positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
    mask = jnp.tril(jnp.ones((1, length, length), bool))
    return model(tokens, positions, None, mask)[0]


def lora_split(family: Family, seed: int = 1) -> tuple[nnx.Module, dict, lorax_fn.LoraSpec]:
    spec = lorax_fn.LoraSpec(family.targets, rank=4, alpha=8.0)
    model = family.make()
    base, lt = lorax_fn.split(
        model, spec, key=jax.random.key(seed), fn=logits, example_args=(jnp.asarray(TOKENS),)
    )
    rng = np.random.default_rng(seed)
    lt = {
        path: dataclasses.replace(e, b=jnp.asarray(rng.normal(0, 0.3, e.b.shape), e.b.dtype))
        for path, e in lt.items()
    }
    return base, lt, spec


def hf_weights(base: nnx.Module, lt: dict, preset: list) -> dict:
    """Tunix's base weights under Hugging Face's names, in PyTorch's layouts.

    Einsum kernels flatten as export_peft flattens their factors, from the layouts split
    inferred: ``(d, heads, head_dim)`` → ``Linear(d, heads·head_dim)``; expert weights
    ``(E, in, out)`` become the fused ``experts.gate_up_proj`` ``(E, 2·hidden, d)`` and
    ``experts.down_proj`` ``(E, d, hidden)``.
    """
    layouts = {path: e.layout for path, e in lt.items()}
    weights, experts = {}, {}
    for path, leaf in lorax_fn.paths.leaves_with_paths(base):
        x, name = np.asarray(leaf), module_name(preset, path)
        assert name is not None, path
        if "{layer}" in name:  # one expert weight, (E, in, out)
            experts[name.replace(".{layer}", "")] = x.transpose(0, 2, 1)
            continue
        if path.endswith("/router/kernel"):
            name += ".weight"  # Qwen3MoeTopKRouter keeps a bare (E, d) parameter
        if x.ndim >= 2 and not path.endswith("input_embedding"):
            layout = layouts.get(path, lorax_fn.Layout(in_axes=(0,), out_axes=(1,)))
            fan_in = math.prod(x.shape[a] for a in layout.in_axes)
            x = x.transpose(*layout.in_axes, *layout.out_axes).reshape(fan_in, -1).T
        weights[name if name.endswith(".weight") else name + ".weight"] = x
    for name in [n for n in experts if n.endswith(".gate_proj")]:
        holder = name.removesuffix(".gate_proj")
        gate, up = experts.pop(name), experts.pop(holder + ".up_proj")
        weights[holder + ".gate_up_proj"] = np.concatenate([gate, up], axis=1)
    weights |= {name: x for name, x in experts.items()}  # down_proj: (E, d, hidden)
    return {name: torch.from_numpy(np.ascontiguousarray(x)) for name, x in weights.items()}


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.numpy()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def trained(request):
    family = FAMILIES[request.param]
    base, lt, spec = lora_split(family)
    return family, base, lt, spec


def test_adapter_gives_the_same_logits_in_transformers_and_peft(trained, tmp_path):
    family, base, lt, spec = trained
    model = family.hf_model()
    # Every base weight goes through the preset: a wrong name fails the strict load.
    model.load_state_dict(hf_weights(base, lt, family.preset), strict=True)
    tokens = jnp.asarray(TOKENS)
    ours_base = np.asarray(logits(base, tokens))
    np.testing.assert_allclose(hf_logits(model, TOKENS), ours_base, atol=1e-4, rtol=0)

    lorax_fn.export_peft(tmp_path, lt, spec, name_map=family.preset)
    adapted = peft.PeftModel.from_pretrained(model, str(tmp_path)).eval()
    adapted_logits = lorax_fn.lora(logits, on_fallback="error")
    ours = np.asarray(adapted_logits(base, lt, tokens))
    assert np.max(np.abs(ours - ours_base)) > 0.1  # the adapter matters
    # ... and so do its MLP (expert) factors alone, so PEFT cannot match by dropping them.
    no_mlp = {p: dataclasses.replace(e, b=0 * e.b) if "/mlp/" in p else e for p, e in lt.items()}
    assert np.max(np.abs(ours - np.asarray(adapted_logits(base, no_mlp, tokens)))) > 0.1
    got = hf_logits(adapted, TOKENS)
    print(f"{family.name}: max |logits(PEFT) - logits(lorax_fn)| = {np.abs(got - ours).max():.2e}")
    np.testing.assert_allclose(got, ours, atol=1e-4, rtol=0)


def test_adapter_imports_back_exactly(trained, tmp_path):
    family, base, lt, spec = trained
    lorax_fn.export_peft(tmp_path, lt, spec, name_map=family.preset)
    back = lorax_fn.import_peft(tmp_path, base, name_map=family.preset)
    assert sorted(back) == sorted(lt)
    for path, want in lt.items():
        got = back[path]
        assert (got.scale, got.layout) == (want.scale, want.layout), path
        np.testing.assert_array_equal(got.a, want.a, err_msg=path)
        np.testing.assert_array_equal(got.b, want.b, err_msg=path)


def test_lora_equals_merge_then_call_in_values_and_gradients(trained):
    _, base, lt, _ = trained
    tokens = jnp.asarray(TOKENS)
    weights = jax.random.normal(jax.random.key(2), (*TOKENS.shape, VOCAB))

    def loss_lora(lt):
        return jnp.sum(lorax_fn.lora(logits, on_fallback="error")(base, lt, tokens) * weights)

    def loss_merged(lt):
        return jnp.sum(logits(lorax_fn.merge(base, lt), tokens) * weights)

    value, grads = jax.value_and_grad(loss_lora)(lt)
    want_value, want_grads = jax.value_and_grad(loss_merged)(lt)
    np.testing.assert_allclose(value, want_value, rtol=1e-4)  # a sum of 12·vocab terms
    for path in lt:
        for factor in ("a", "b"):
            got, want = getattr(grads[path], factor), getattr(want_grads[path], factor)
            scale = float(jnp.max(jnp.abs(want)))
            assert scale > 0, (path, factor)
            np.testing.assert_allclose(got, want, atol=1e-4 * scale, err_msg=f"{path}.{factor}")
