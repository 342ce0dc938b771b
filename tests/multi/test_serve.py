"""examples/serve.py: a mixed-adapter batch decodes exactly as each request alone, merged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_fn
from examples import serve

CONFIG = serve.Config()
STEPS = 8


@pytest.fixture(scope="module")
def setup():
    variables = serve.init_params(CONFIG, 0)
    base, trees = serve.random_adapters(variables, [2, 4, 8, 8], seed=0)
    trees, spare = trees[:3], trees[3]
    requests = serve.make_requests(CONFIG, 6, len(trees), seed=1, lengths=(4, 7))
    return base, trees, spare, requests, lorax_fn.stack_adapters(trees, base=base)


def test_mixed_batch_equals_each_request_alone_on_its_merged_model(setup):
    base, trees, _, requests, stack = setup
    tokens, logits = serve.run_batch(CONFIG, base, stack, requests, STEPS)
    alone = serve.run_alone(CONFIG, base, trees, requests, STEPS, padded=True)
    for i, (want_tokens, want_logits) in enumerate(alone):
        np.testing.assert_array_equal(tokens[i], want_tokens, err_msg=f"request {i}")
        np.testing.assert_allclose(logits[i], want_logits, atol=1e-4, rtol=0)
    # The check means something only if the adapters change what the base would say.
    on_base = serve.run_alone(
        CONFIG, base, [], {**requests, "adapter_ids": -np.ones(6)}, STEPS, padded=True
    )
    for i, k in enumerate(requests["adapter_ids"]):
        same = np.array_equal(tokens[i], on_base[i][0])
        assert same == (k == -1), (i, k)


def test_hot_swap_does_not_recompile_and_takes_effect(setup):
    base, trees, spare, requests, stack = setup
    before_tokens, _ = serve.run_batch(CONFIG, base, stack, requests, STEPS)
    compiled = serve.TRACES["generate_with_adapters"]

    swapped = lorax_fn.multi.replace_adapter(stack, 1, spare)
    tokens, logits = serve.run_batch(CONFIG, base, swapped, requests, STEPS)
    assert serve.TRACES["generate_with_adapters"] == compiled

    new_trees = [trees[0], spare, trees[2]]
    alone = serve.run_alone(CONFIG, base, new_trees, requests, STEPS, padded=True)
    uses_slot_1 = requests["adapter_ids"] == 1
    assert uses_slot_1.any()
    for i, (want_tokens, want_logits) in enumerate(alone):
        np.testing.assert_array_equal(tokens[i], want_tokens, err_msg=f"request {i}")
        np.testing.assert_allclose(logits[i], want_logits, atol=1e-4, rtol=0)
        assert np.array_equal(tokens[i], before_tokens[i]) != uses_slot_1[i], i

    # The counter does see a retrace: a stack padded to a larger rank has new shapes
    # (lowering traces without compiling, to keep the test fast).
    bigger = lorax_fn.stack_adapters([*trees, lorax_fn.multi.combine([spare, spare], [0.5, 0.5])])
    args = [requests[f] for f in ("adapter_ids", "prompts", "lengths")]
    sampling = serve.sampling_of(requests)
    serve.generate_with_adapters.lower(CONFIG, base, bigger, *args, sampling, steps=STEPS)
    assert serve.TRACES["generate_with_adapters"] == compiled + 1


def test_cached_decoding_of_the_base_equals_full_forward_passes(setup):
    """Id -1 is the base model, and the KV cache changes nothing: each step's logits are
    those of one uncached forward pass over the prompt plus the tokens chosen so far."""
    base, _, _, requests, stack = setup
    requests = {**requests, "adapter_ids": -np.ones(6, np.int32)}
    tokens, logits = serve.run_batch(CONFIG, base, stack, requests, STEPS)
    model = jax.jit(serve.Llama(CONFIG).apply)
    for i, (prompt, length) in enumerate(
        zip(requests["prompts"], requests["lengths"], strict=True)
    ):
        sequence = jnp.concatenate([jnp.asarray(prompt[:length]), jnp.asarray(tokens[i])])
        full, _ = model(base, sequence)
        np.testing.assert_allclose(logits[i], full[length - 1 : -1], atol=1e-4, rtol=0)
        np.testing.assert_array_equal(tokens[i], np.argmax(full[length - 1 : -1], -1))


def test_greedy_and_sampled_requests_share_a_batch_and_match_their_runs_alone(setup):
    base, trees, _, _, stack = setup
    # One prompt length: one compile of the per-request runs.
    requests = serve.make_requests(CONFIG, 6, len(trees), seed=2, lengths=(7,))
    requests["temperature"][:] = [0.0, 1.5, 1.5, 0.0, 1.5, 1.5]
    requests["top_k"][:] = [0, 5, 5, 0, 0, 5]
    tokens, logits = serve.run_batch(CONFIG, base, stack, requests, STEPS)
    alone = serve.run_alone(CONFIG, base, trees, requests, STEPS, padded=True)
    for i, (want_tokens, _) in enumerate(alone):
        np.testing.assert_array_equal(tokens[i], want_tokens, err_msg=f"request {i}")
    greedy = requests["temperature"] == 0
    rank = (np.argsort(-logits, axis=-1) == tokens[..., None]).argmax(-1)  # 0: the argmax
    assert (rank[greedy] == 0).all()
    assert (rank[requests["top_k"] == 5] < 5).all()
    assert (rank[~greedy] > 0).mean() > 0.3  # at temperature 1.5, often not the argmax
    assert (rank[~greedy & (requests["top_k"] == 0)] >= 5).any()  # no cut without top-k
