"""Trainable tokens (lorax_fn.tokens): chosen embedding rows trained as a sparse delta."""

import dataclasses
import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
from helpers import TiedLM, assert_matches_merged, randomize_b

import lorax_fn
from lorax_fn import LoraError, LoraSpec
from lorax_fn.peft.tokens import export_tokens, import_tokens
from lorax_fn.tokens import add_trainable_tokens, token_factors, token_indices

EMBED = "params/Embed_0/embedding"
IDS = jnp.array([[1, 2, 10], [0, 5, 7]])
ROWS = [7, 10, 3]  # 3 is never looked up: only the tied head reaches it


def tied():
    model = TiedLM()
    return model, model.init(jax.random.key(0), IDS)


def adapted(with_lora: bool = True):
    model, params = tied()
    spec = LoraSpec("**/Dense_0/kernel", rank=2)
    base, lt = lorax_fn.split(params, spec, key=jax.random.key(1))
    if not with_lora:
        lt = {}
    return model, base, add_trainable_tokens(base, lt, {EMBED: ROWS})


def test_lookup_and_tied_head_match_merge_then_call_in_values_and_gradients():
    model, base, lt = adapted()
    lt = randomize_b(lt)
    assert_matches_merged(model.apply, base, lt, IDS)
    # The delta reaches the logits through both the lookup and the tied head.
    plain = lorax_fn.lora(model.apply)(base, {**lt, EMBED: token_factors(11, 8, ROWS)}, IDS)
    assert float(jnp.abs(lorax_fn.lora(model.apply)(base, lt, IDS) - plain).max()) > 1e-3


def test_merge_changes_the_chosen_rows_only_by_the_delta():
    _, base, lt = adapted(with_lora=False)
    delta = jax.random.normal(jax.random.key(3), lt[EMBED].b.shape)
    lt = {EMBED: dataclasses.replace(lt[EMBED], b=delta)}
    got = np.asarray(lorax_fn.merge(base, lt)["params"]["Embed_0"]["embedding"])
    want = np.array(base["params"]["Embed_0"]["embedding"])
    want[ROWS] += np.asarray(delta)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_training_changes_only_the_chosen_rows_and_keeps_no_state_for_the_selection():
    model, base, lt = adapted()
    tx = lorax_fn.optimizer(optax.adamw(1e-2, weight_decay=0.1), lt)
    state = tx.init(lt)
    target = jax.random.normal(jax.random.key(4), (2, 3, 11))

    @jax.jit
    def step(lt, state):
        loss = lambda lt: jnp.mean((lorax_fn.lora(model.apply)(base, lt, IDS) - target) ** 2)  # noqa: E731
        grads = jax.grad(loss)(lt)
        updates, state = tx.update(grads, state, lt)
        return optax.apply_updates(lt, updates), state

    selection = np.asarray(lt[EMBED].a)
    for _ in range(5):
        lt, state = step(lt, state)
    assert np.array_equal(np.asarray(lt[EMBED].a), selection)  # P never moves
    merged = np.asarray(lorax_fn.merge(base, lt)["params"]["Embed_0"]["embedding"])
    original = np.asarray(base["params"]["Embed_0"]["embedding"])
    others = np.setdiff1d(np.arange(11), ROWS)
    assert np.array_equal(merged[others], original[others])  # bit-identical
    assert (np.abs(merged[ROWS] - original[ROWS]).max(axis=1) > 1e-4).all()
    # Adam keeps moments for D and the Dense factors only: none the size of P.
    moments = [x.shape for x in jax.tree.leaves(state) if np.ndim(x) > 0]
    assert selection.shape not in moments
    assert lt[EMBED].b.shape in moments


def test_count_params_counts_the_delta_not_the_selection():
    _, base, lt = adapted(with_lora=False)
    count = lorax_fn.count_params(base, lt)
    assert count.trainable == len(ROWS) * 8
    assert (
        count.total == sum(x.size for x in jax.tree.leaves(base)) + 11 * len(ROWS) + len(ROWS) * 8
    )


@pytest.mark.parametrize(
    ("rows", "match"),
    [([3, 3], "repeated"), ([11], "outside"), ([], "non-empty"), ([1.5], "ints")],
)
def test_bad_indices_are_refused(rows, match):
    _, params = tied()
    with pytest.raises(LoraError, match=match):
        add_trainable_tokens(params, {}, {EMBED: rows})


def test_refusals():
    _, base, lt = adapted()
    with pytest.raises(LoraError, match="already in the LoRA tree"):
        add_trainable_tokens(base, {**lt, EMBED: lt["params/Dense_0/kernel"]}, {EMBED: [1]})
    with pytest.raises(LoraError, match="no such leaf"):
        add_trainable_tokens(base, {}, {"params/Embed_1/embedding": [1]})
    with pytest.raises(LoraError, match="vocab, features"):
        add_trainable_tokens(base, {}, {"params/Dense_0/bias": [1]})
    with pytest.raises(LoraError, match="add_trainable_tokens"):
        lorax_fn.split(base, LoraSpec("**/Dense_0/kernel", variant="tokens"), key=jax.random.key(0))
    trained_selection = dataclasses.replace(lt[EMBED], a=lt[EMBED].a + 0.1)
    with pytest.raises(LoraError, match="no longer one-hot"):
        token_indices(trained_selection)
    assert token_indices(lt[EMBED]) == tuple(ROWS)


# --------------------------------------------------------------------------- PEFT format

V, D = 11, 8
PEFT_ROWS = [7, 10, 3]


def parity_modules():
    """torch and peft; where CI installed them (LORAX_FN_REQUIRE_PARITY=1) a failed
    import fails the test instead of skipping it."""
    if os.environ.get("LORAX_FN_REQUIRE_PARITY") == "1":
        return importlib.import_module("torch"), importlib.import_module("peft")
    return pytest.importorskip("torch"), pytest.importorskip("peft")


def peft_params() -> dict:
    rng = np.random.default_rng(0)
    return {
        "params": {
            "embed": {"embedding": jnp.asarray(rng.standard_normal((V, D)), jnp.float32)},
            "lin": {
                "kernel": jnp.asarray(rng.standard_normal((D, D)) / 3, jnp.float32),
                "bias": jnp.asarray(rng.standard_normal(D), jnp.float32),
            },
        }
    }


def tied_forward(params: dict, ids: jax.Array, tied: bool = True) -> jax.Array:
    p = params["params"]
    x = jnp.tanh(p["embed"]["embedding"][ids] @ p["lin"]["kernel"] + p["lin"]["bias"])
    return x @ p["embed"]["embedding"].T if tied else x


def trained(with_lora: bool) -> tuple[dict, dict]:
    spec = LoraSpec("**/lin/kernel", rank=2, alpha=3.0)
    base, lt = lorax_fn.split(peft_params(), spec, key=jax.random.key(1))
    lt = randomize_b(lt if with_lora else {}, std=0.5)
    lt = add_trainable_tokens(base, lt, {"params/embed/embedding": PEFT_ROWS})
    delta = jax.random.normal(jax.random.key(5), (len(PEFT_ROWS), D))
    lt["params/embed/embedding"] = dataclasses.replace(lt["params/embed/embedding"], b=delta)
    return base, lt


@pytest.mark.parametrize("with_lora", [True, False])
def test_peft_round_trip(tmp_path, with_lora):
    base, lt = trained(with_lora)
    spec = LoraSpec("**/lin/kernel", rank=2, alpha=3.0) if with_lora else None
    export_tokens(tmp_path, lt, base, spec)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    tensors = safetensors.numpy.load_file(str(tmp_path / "adapter_model.safetensors"))
    if with_lora:
        assert config["peft_type"] == "LORA"
        assert config["trainable_token_indices"] == {"embed": PEFT_ROWS}
        key = "base_model.model.embed.token_adapter.trainable_tokens_delta"
    else:
        assert config["peft_type"] == "TRAINABLE_TOKENS" and config["token_indices"] == PEFT_ROWS
        key = "base_model.model.embed.trainable_tokens_delta"
    table = np.asarray(base["params"]["embed"]["embedding"])
    np.testing.assert_allclose(tensors[key], table[PEFT_ROWS] + np.asarray(lt[EMBED_P].b), 1e-6)
    back = import_tokens(tmp_path, base)
    assert sorted(back) == sorted(lt)
    assert token_indices(back[EMBED_P]) == tuple(PEFT_ROWS)
    np.testing.assert_allclose(back[EMBED_P].b, lt[EMBED_P].b, atol=1e-6)
    if with_lora:
        np.testing.assert_array_equal(back[LIN].b, lt[LIN].b)


EMBED_P, LIN = "params/embed/embedding", "params/lin/kernel"


def torch_model(params: dict, tied: bool = True):
    torch, _ = parity_modules()
    p = {k: np.asarray(v) for k, v in lorax_fn.paths.leaves_with_paths(params)}

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(V, D)
            self.lin = torch.nn.Linear(D, D)

        def forward(self, ids):
            x = torch.tanh(self.lin(self.embed(ids)))
            return x @ self.embed.weight.T if tied else x

    model = Model()
    weights = {
        "embed.weight": p[EMBED_P],
        "lin.weight": p[LIN].T,
        "lin.bias": p["params/lin/bias"],
    }
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
    return model.eval()


@pytest.mark.parametrize("with_lora", [True, False])
def test_peft_model_with_exported_tokens_matches_flax(tmp_path, with_lora):
    torch, peft = parity_modules()
    base, lt = trained(with_lora)
    export_tokens(tmp_path, lt, base, LoraSpec("**/lin/kernel", rank=2, alpha=3.0))
    # PEFT ties a TRAINABLE_TOKENS adapter to the output head of Hugging Face models
    # only (by their tied-weights keys); beside LoRA, `embed.weight` reads the new rows.
    tied = with_lora
    model = peft.PeftModel.from_pretrained(torch_model(base, tied), str(tmp_path)).eval()
    ids = np.arange(2 * V) % V
    with torch.no_grad():
        got = model(torch.from_numpy(ids)).numpy()
    ids = jnp.asarray(ids)
    want = np.asarray(lorax_fn.lora(tied_forward)(base, lt, ids, tied))
    assert np.abs(want - np.asarray(tied_forward(base, ids, tied))).max() > 0.1
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_tokens_saved_by_peft_import_and_match(tmp_path):
    torch, peft = parity_modules()
    base = peft_params()
    config = peft.LoraConfig(
        r=2, lora_alpha=5, target_modules=["lin"], trainable_token_indices={"embed": PEFT_ROWS}
    )
    model = peft.get_peft_model(torch_model(base), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                param.add_(0.5 * torch.randn_like(param))
    model.save_pretrained(str(tmp_path))
    lt = import_tokens(tmp_path, base)
    assert sorted(lt) == [EMBED_P, LIN]
    ids = np.arange(2 * V) % V
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(ids)).numpy()
    got = np.asarray(lorax_fn.lora(tied_forward)(base, lt, jnp.asarray(ids)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_peft_refusals(tmp_path):
    base, lt = trained(with_lora=False)
    with pytest.raises(LoraError, match="no trainable tokens"):
        export_tokens(tmp_path / "none", {}, base)
    two = add_trainable_tokens(base, lt, {LIN: [0]})
    with pytest.raises(LoraError, match="one token_indices"):
        export_tokens(tmp_path / "two", two, base)
    export_tokens(tmp_path / "ok", lt, base)
    with pytest.raises(LoraError, match="matches no module"):
        import_tokens(tmp_path / "ok", base, name_map={LIN: "lin"})


def test_summary_counts_the_delta_and_checkpoints_round_trip(tmp_path):
    _, base, lt = adapted()
    row = next(r for r in lorax_fn.summary(base, lt).splitlines() if r.startswith(EMBED))
    assert " tokens " in row and row.split()[-1] == str(len(ROWS) * 8)
    lorax_fn.save(tmp_path / "ck", lt, None)
    back = lorax_fn.restore(tmp_path / "ck")
    assert token_indices(back[EMBED]) == tuple(ROWS) and back[EMBED].variant == "tokens"


def test_export_peft_and_import_peft_point_to_the_token_functions(tmp_path):
    base, lt = trained(with_lora=True)
    with pytest.raises(LoraError, match="export_tokens"):
        lorax_fn.export_peft(tmp_path / "a", lt)
    export_tokens(tmp_path / "b", lt, base, LoraSpec("**/lin/kernel", rank=2, alpha=3.0))
    with pytest.raises(LoraError, match="import_tokens"):
        lorax_fn.import_peft(tmp_path / "b", base)
