"""Layer subsets of scanned stacks (lorax_fn.subsets): adapt chosen layers of an nn.scan stack."""

import dataclasses
import importlib
import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
from helpers import assert_matches_merged, randomize_b

import lorax_fn
from lorax_fn import Layout, LoraError, LoraSpec
from lorax_fn.peft.subsets import export_layers, import_layers
from lorax_fn.subsets import LayerGroups, LayerSubset, expand_subsets, select_layers

L, D = 6, 8
KERNEL = "params/ScanBlock_0/Dense_0/kernel"
CHOSEN = (4, 5)  # the last two of six


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + jnp.tanh(nn.Dense(D)(x)), None


class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=L)
        x, _ = scan(name="ScanBlock_0")(x, None)
        return nn.Dense(3)(x)


X = jax.random.normal(jax.random.key(2), (4, D))


def adapted(layers=(-2, -1), rank: int = 2):
    model = Stack()
    params = model.init(jax.random.key(0), X)
    spec = LoraSpec("**/kernel", rank=rank)
    base, lt = lorax_fn.split(
        params, spec, key=jax.random.key(1), fn=model.apply, example_args=(X,)
    )
    full = randomize_b(lt, std=0.3)
    return model, base, full, select_layers(full, {"**/ScanBlock_0/**": layers})


def zeros_elsewhere(full: dict) -> dict:
    """The reference: the full stack's factors with every unchosen layer zeroed by hand."""
    f = full[KERNEL]
    keep = np.isin(np.arange(L), CHOSEN)[:, None, None]
    return {**full, KERNEL: dataclasses.replace(f, a=f.a * keep, b=f.b * keep)}


def test_subset_holds_the_chosen_layers_compactly():
    _, _, full, lt = adapted()
    entry = lt[KERNEL]
    assert isinstance(entry, LayerSubset) and entry.layers == CHOSEN and entry.num_layers == L
    assert entry.factors.a.shape == (2, D, 2) and entry.factors.b.shape == (2, 2, D)
    np.testing.assert_array_equal(entry.factors.a, full[KERNEL].a[np.asarray(CHOSEN)])
    assert not isinstance(lt["params/Dense_0/kernel"], LayerSubset)  # not stacked


def test_matches_merge_then_call_and_the_zeroed_full_stack():
    model, base, full, lt = adapted()
    assert_matches_merged(model.apply, base, lt, X, rtol=1e-5, atol=1e-5)
    reference = model.apply(lorax_fn.merge(base, zeros_elsewhere(full)), X)
    got = lorax_fn.lora(model.apply)(base, lt, X)
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(got - model.apply(base, X)).max()) > 1e-3

    def loss(tree):
        return jnp.sum(jnp.sin(lorax_fn.lora(model.apply)(base, tree, X)))

    grads = jax.grad(loss)(lt)[KERNEL].factors
    want = jax.grad(loss)(zeros_elsewhere(full))[KERNEL]
    np.testing.assert_allclose(grads.b, want.b[np.asarray(CHOSEN)], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads.a, want.a[np.asarray(CHOSEN)], rtol=1e-5, atol=1e-6)


def test_training_moves_the_chosen_layers_only_and_keeps_state_for_them_only():
    model, base, _, lt = adapted()
    tx = lorax_fn.optimizer(optax.adam(1e-2), lt)
    state = tx.init(lt)
    target = jax.random.normal(jax.random.key(3), (4, 3))

    @jax.jit
    def step(lt, state):
        loss = lambda t: jnp.mean((lorax_fn.lora(model.apply)(base, t, X) - target) ** 2)  # noqa: E731
        updates, state = tx.update(jax.grad(loss)(lt), state, lt)
        return optax.apply_updates(lt, updates), state

    for _ in range(3):
        lt, state = step(lt, state)
    merged = np.asarray(lorax_fn.merge(base, lt)["params"]["ScanBlock_0"]["Dense_0"]["kernel"])
    original = np.asarray(base["params"]["ScanBlock_0"]["Dense_0"]["kernel"])
    others = [i for i in range(L) if i not in CHOSEN]
    assert np.array_equal(merged[others], original[others])  # bit-identical
    assert (np.abs(merged[list(CHOSEN)] - original[list(CHOSEN)]).max(axis=(1, 2)) > 1e-4).all()
    shapes = {x.shape for x in jax.tree.leaves(state) if np.ndim(x) > 0}
    assert (len(CHOSEN), D, 2) in shapes and (L, D, 2) not in shapes


def test_trainable_parameters_are_the_chosen_layers():
    _, base, full, lt = adapted()
    stack = full[KERNEL].a.size + full[KERNEL].b.size
    saved = stack - stack * len(CHOSEN) // L
    count = lorax_fn.count_params(base, lt).trainable
    assert count == lorax_fn.count_params(base, full).trainable - saved


def test_expand_is_identity_without_subsets_and_the_list_form_takes_every_stack():
    _, _, full, _ = adapted()
    assert expand_subsets(full) is full
    every = select_layers(full, [0, -1])
    assert every[KERNEL].layers == (0, L - 1)


@pytest.mark.parametrize(
    ("layers", "match"),
    [([6], "outside"), ([1, -5], "twice"), ([], "no layers")],
)
def test_bad_layers_are_refused(layers, match):
    with pytest.raises(LoraError, match=match):
        adapted(layers)


def test_refusals():
    _, _, full, _ = adapted()
    with pytest.raises(LoraError, match="match no stacked"):
        select_layers(full, {"**/Dense_0/kernel": [0]} | {"nothing/**": [0]})
    dora = {KERNEL: dataclasses.replace(full[KERNEL], variant="dora")}
    with pytest.raises(LoraError, match="plain LoRA"):
        select_layers(dora, [0])


# --------------------------------------------------------------------------- PEFT format

NAME_MAP = [
    (r"params/ScanBlock_0/Dense_0/(kernel|bias)", "layers.{layer}.lin"),
    (r"params/Dense_0/(kernel|bias)", "head"),
]
STACKED = {KERNEL: Layout((1,), (2,), (0,))}


def parity_modules():
    """torch and peft; where CI installed them (LORAX_FN_REQUIRE_PARITY=1) a failed
    import fails the test instead of skipping it."""
    if os.environ.get("LORAX_FN_REQUIRE_PARITY") == "1":
        return importlib.import_module("torch"), importlib.import_module("peft")
    return pytest.importorskip("torch"), pytest.importorskip("peft")


def test_peft_files_hold_the_chosen_layers_and_round_trip(tmp_path):
    _, base, _, lt = adapted()
    spec = LoraSpec("**/kernel", rank=2)
    export_layers(tmp_path, lt, spec, name_map=NAME_MAP)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["head", "layers.4.lin", "layers.5.lin"]
    keys = safetensors.numpy.load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {k.split(".")[3] for k in keys if ".layers." in k} == {"4", "5"}
    back = import_layers(tmp_path, base, name_map=NAME_MAP)  # layouts from lorax_fn's header
    assert isinstance(back[KERNEL], LayerSubset) and back[KERNEL].layers == CHOSEN
    for path in lt:
        for got, want in zip(jax.tree.leaves(back[path]), jax.tree.leaves(lt[path]), strict=True):
            np.testing.assert_array_equal(got, want)
    assert back[KERNEL].factors.layout == lt[KERNEL].factors.layout


def torch_model(params: dict):
    torch, _ = parity_modules()
    p = {k: np.asarray(v) for k, v in lorax_fn.paths.leaves_with_paths(params)}

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(D, D)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(Block() for _ in range(L))
            self.head = torch.nn.Linear(D, 3)

        def forward(self, x):
            for block in self.layers:
                x = x + torch.tanh(block.lin(x))
            return self.head(x)

    stack = "params/ScanBlock_0/Dense_0"
    weights = {"head.weight": p["params/Dense_0/kernel"].T, "head.bias": p["params/Dense_0/bias"]}
    for i in range(L):
        weights[f"layers.{i}.lin.weight"] = p[f"{stack}/kernel"][i].T
        weights[f"layers.{i}.lin.bias"] = p[f"{stack}/bias"][i]
    model = Model()
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
    return model.eval()


def test_peft_model_with_exported_subset_matches_flax(tmp_path):
    torch, peft = parity_modules()
    model, base, _, lt = adapted()
    lt = {KERNEL: lt[KERNEL]}
    export_layers(tmp_path, lt, LoraSpec("**/kernel", rank=2), name_map=NAME_MAP)
    peft_model = peft.PeftModel.from_pretrained(torch_model(base), str(tmp_path)).eval()
    with torch.no_grad():
        got = peft_model(torch.from_numpy(np.array(X))).numpy()
    want = np.asarray(lorax_fn.lora(model.apply)(base, lt, X))
    assert np.abs(want - np.asarray(model.apply(base, X))).max() > 1e-3
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_peft_layers_to_transform_imports_as_a_subset_and_matches(tmp_path):
    torch, peft = parity_modules()
    model, base, _, _ = adapted()
    config = peft.LoraConfig(
        r=2,
        lora_alpha=3,
        target_modules=["lin"],
        layers_to_transform=[1, 4],
        layers_pattern="layers",
    )
    peft_model = peft.get_peft_model(torch_model(base), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.add_(0.3 * torch.randn_like(param))
    peft_model.save_pretrained(str(tmp_path))
    lt = import_layers(tmp_path, base, name_map=NAME_MAP, layouts=STACKED)
    assert sorted(lt) == [KERNEL] and lt[KERNEL].layers == (1, 4)
    assert lt[KERNEL].factors.scale == 1.5
    with torch.no_grad():
        want = peft_model.eval()(torch.from_numpy(np.array(X))).numpy()
    got = np.asarray(lorax_fn.lora(model.apply)(base, lt, X))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_peft_refusals(tmp_path):
    _, _, _, lt = adapted()
    with pytest.raises(LoraError, match="placeholder"):
        export_layers(
            tmp_path / "x", lt, name_map={KERNEL: "layers.lin", "params/Dense_0/kernel": "h"}
        )


def test_summary_names_the_layers_and_counts_the_compact_factors():
    _, base, _, lt = adapted()
    row = next(r for r in lorax_fn.summary(base, lt).splitlines() if r.startswith(KERNEL))
    assert "layers [4, 5]" in row and row.split()[-1] == str(2 * (D * 2 + 2 * D))
    total = sum(x.size for x in jax.tree.leaves(base)) + sum(x.size for x in jax.tree.leaves(lt))
    assert lorax_fn.count_params(base, lt).total == total


def test_stack_adapters_refuses_a_subset_naming_it():
    # Round trips through checkpoints: tests/checkpoint/test_subsets_checkpoint.py.
    _, base, full, lt = adapted()
    with pytest.raises(LoraError, match=rf"adapter 1: \['{KERNEL}'\] .* expand_subsets first"):
        lorax_fn.multi.stack_adapters([full, lt], base=base)
    stack = lorax_fn.multi.stack_adapters([full, expand_subsets(lt)], base=base)
    np.testing.assert_array_equal(stack.entries[KERNEL].a[1], expand_subsets(lt)[KERNEL].a)


def test_with_trainable_tokens_in_one_peft_adapter(tmp_path):
    from lorax_fn.peft.tokens import export_tokens, import_tokens
    from lorax_fn.tokens import add_trainable_tokens

    model, base, _, lt = adapted()
    kernel = "params/Dense_0/kernel"  # the head: (D, 3), its rows read as 8 "tokens"
    lt = add_trainable_tokens(base, {KERNEL: lt[KERNEL]}, {kernel: [1, 6]})
    lt[kernel] = dataclasses.replace(lt[kernel], b=jnp.ones_like(lt[kernel].b))
    export_tokens(tmp_path, lt, base, LoraSpec("**/kernel", rank=2), name_map=NAME_MAP)
    back = import_tokens(tmp_path, base, name_map=NAME_MAP)
    assert back[KERNEL].layers == CHOSEN
    got = lorax_fn.lora(model.apply)(base, back, X)
    np.testing.assert_allclose(got, lorax_fn.lora(model.apply)(base, lt, X), rtol=1e-5, atol=1e-5)


def test_export_peft_and_import_peft_point_to_the_layer_functions(tmp_path):
    _, base, _, lt = adapted()
    with pytest.raises(LoraError, match="export_layers"):
        lorax_fn.export_peft(tmp_path / "a", lt, name_map=NAME_MAP)
    export_layers(tmp_path / "b", lt, name_map=NAME_MAP)
    with pytest.raises(LoraError, match=r"no module for layers .*import_layers"):
        lorax_fn.import_peft(tmp_path / "b", base, name_map=NAME_MAP, layouts=STACKED)


def test_nnx_scan_stack():
    nnx = pytest.importorskip("flax.nnx")

    class NnxBlock(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(D, D, rngs=rngs)

        def __call__(self, x):
            return x + jnp.tanh(self.lin(x))

    class NnxStack(nnx.Module):
        def __init__(self, rngs):
            @nnx.split_rngs(splits=L)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return NnxBlock(rngs)

            self.blocks = make(rngs)

        def __call__(self, x):
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def body(x, block):
                return block(x)

            return body(x, self.blocks)

    graphdef, state = nnx.split(NnxStack(nnx.Rngs(0)))
    fn = lambda st, x: nnx.merge(graphdef, st)(x)  # noqa: E731
    spec = LoraSpec("**/kernel", rank=2)
    base, lt = lorax_fn.split(state, spec, key=jax.random.key(1), fn=fn, example_args=(X,))
    lt = select_layers(randomize_b(lt, std=0.3), [1, -1])
    assert lt["blocks/lin/kernel"].layers == (1, L - 1)
    assert_matches_merged(fn, base, lt, X, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- a rank per layer

RANKS = {4: 2, 5: 1}


def test_a_rank_per_layer_matches_the_truncated_full_stack():
    model, base, full, _ = adapted(rank=2)
    lt = select_layers(full, {"**/ScanBlock_0/**": RANKS})
    entry = lt[KERNEL]
    assert isinstance(entry, LayerGroups) and entry.layers == (4, 5) and entry.ranks == (2, 1)
    f = full[KERNEL]
    keep_a = np.zeros((L, 1, 2), np.float32)
    keep_a[4], keep_a[5, :, 0] = 1.0, 1.0  # layer 5 keeps its first rank-1 column
    truncated = dataclasses.replace(f, a=f.a * keep_a, b=f.b * keep_a.transpose(0, 2, 1))
    reference = {**full, KERNEL: truncated}
    got = lorax_fn.lora(model.apply)(base, lt, X)
    np.testing.assert_allclose(got, model.apply(lorax_fn.merge(base, reference), X), 1e-5, 1e-5)
    assert_matches_merged(model.apply, base, lt, X, rtol=1e-5, atol=1e-5)

    def loss(tree):
        return jnp.sum(jnp.sin(lorax_fn.lora(model.apply)(base, tree, X)))

    grads, want = jax.grad(loss)(lt)[KERNEL], jax.grad(loss)(reference)[KERNEL]
    np.testing.assert_allclose(grads.parts[1].factors.a[0], want.a[5][:, :1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads.parts[0].factors.b[0], want.b[4], rtol=1e-5, atol=1e-6)
    trained = lorax_fn.count_params(base, lt).trainable - lorax_fn.count_params(base, {}).trainable
    assert trained == 2 * (D + D) + 1 * (D + D) + lt["params/Dense_0/kernel"].a.size + 2 * 3


def test_a_rank_per_layer_refusals():
    _, _, full, _ = adapted(rank=2)
    with pytest.raises(LoraError, match="must be ints"):
        select_layers(full, {"**/ScanBlock_0/**": {4: 3}})


def test_peft_rank_pattern_per_layer_both_ways(tmp_path):
    torch, peft = parity_modules()
    model, base, full, _ = adapted(rank=2)
    lt = select_layers({KERNEL: full[KERNEL]}, {"**": RANKS})
    export_layers(tmp_path / "ours", lt, LoraSpec("**/kernel", rank=2), name_map=NAME_MAP)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    rank = {
        m: config["rank_pattern"].get(re.escape(m), config["r"]) for m in config["target_modules"]
    }
    assert rank == {"layers.4.lin": 2, "layers.5.lin": 1}
    peft_model = peft.PeftModel.from_pretrained(torch_model(base), str(tmp_path / "ours"))
    with torch.no_grad():
        got = peft_model.eval()(torch.from_numpy(np.array(X))).numpy()
    want = np.asarray(lorax_fn.lora(model.apply)(base, lt, X))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

    config = peft.LoraConfig(
        r=2,
        lora_alpha=2,
        target_modules=["lin"],
        layers_to_transform=[0, 2, 3],
        layers_pattern="layers",
        rank_pattern={"layers.2.lin": 1},
    )
    peft_model = peft.get_peft_model(torch_model(base), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.add_(0.3 * torch.randn_like(param))
    peft_model.save_pretrained(str(tmp_path / "theirs"))
    back = import_layers(tmp_path / "theirs", base, name_map=NAME_MAP, layouts=STACKED)
    assert back[KERNEL].layers == (0, 2, 3) and back[KERNEL].ranks == (2, 1, 2)
    assert [p.factors.scale for p in back[KERNEL].parts] == [1.0, 2.0]  # alpha / r per layer
    with torch.no_grad():
        want = peft_model.eval()(torch.from_numpy(np.array(X))).numpy()
    got = np.asarray(lorax_fn.lora(model.apply)(base, back, X))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
