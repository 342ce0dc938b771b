"""LoRA bias (PEFT's ``lora_bias=True``): a trainable bias on B's output.

The adapted layer computes ``x·W0 + scale·(x·A·B + β)`` (+ its own bias): ``β`` has one
entry per (batch, fan-out) index of the weight, like a layer bias, starts at zero (so
the model starts equal to the base) and PEFT saves it as ``lora_B.bias``. No weight
expresses it, so it is the variant's :meth:`~lorax_fn.variants.Variant.output_bias`:
``lora(fn)`` adds ``scale·β`` to every product contracting the weight's whole fan-in (a
dense layer, a conv) and refuses any other use of the weight (an embedding lookup, a
product over its fan-out, forming the weight) rather than drop it; ``merge`` adds it to
the layer's own bias leaf and refuses a layer without one, as PEFT does.

PEFT's ``bias="all" | "lora_only"`` modes train the *base* biases instead; they are
:func:`trainable_biases`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp

from lorax_fn.errors import LoraError
from lorax_fn.factors import LoraFactors
from lorax_fn.merge import bias_path
from lorax_fn.quant.quantized import weight_leaves
from lorax_fn.variants.base import Variant, register


class LoraBias(Variant):
    """PEFT's ``lora_bias``: ``output_bias = scale·β``, the weight itself plain LoRA.

    Its one extra array is ``bias`` (``β``, zeros at ``split``), labelled
    ``"lora_bias"`` for the optimizer and not decayed (Hugging Face's Trainer exempts
    every ``*.bias`` from weight decay, ``lora_B.bias`` included). PEFT forbids it with
    DoRA: ``LoraSpec(use_dora=True, variant="lora_bias")`` is refused.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lorax_fn import LoraSpec, split
        >>> params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
        >>> _, lt = split(params, LoraSpec("**/kernel", rank=2, variant="lora_bias"),
        ...               key=jax.random.key(0))
        >>> lt["dense/kernel"].variant, lt["dense/kernel"].bias
        ('lora_bias', Array([0., 0., 0.], dtype=float32))
    """

    name = "lora_bias"
    title = "LoRA-bias"
    extras = ("bias",)
    peft_config = {"lora_bias": True}  # noqa: RUF012 - a class-level constant
    peft_tensors = {"bias": ".lora_B.bias"}  # noqa: RUF012
    # β of a stacked weight is sliced with the layer: a scan hands each step its own.
    per_layer = True

    def init(self, w0: jax.Array, factors: LoraFactors) -> dict[str, jax.Array]:
        return {"bias": jnp.zeros(factors.column_shape, factors.a.dtype)}

    def output_bias(self, factors: LoraFactors) -> jax.Array:
        return factors.scale * factors.extras["bias"].astype(jnp.float32)


register(LoraBias())


BiasMode = Literal["none", "all", "lora_only"]


def trainable_biases(mode: BiasMode, base: Any = None, adapted: Sequence[str] = ()) -> list[str]:
    """PEFT's ``bias=`` modes as ``LoraSpec(trainable=...)`` filters of the base biases.

    ``"none"``: no bias; ``"all"``: every leaf named ``bias`` (``"**/bias"``);
    ``"lora_only"``: the biases of the adapted layers, ``adapted`` the paths of their
    weights (e.g. the LoRA tree of a first ``split``) and ``base`` the params they are
    looked up in, so that a layer without a bias is left out as PEFT leaves it out.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lorax_fn import LoraSpec, split
        >>> params = {"q": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)},
        ...           "o": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}
        >>> spec = LoraSpec("q/kernel", rank=2)
        >>> _, lt = split(params, spec, key=jax.random.key(0))
        >>> trainable_biases("lora_only", params, lt)
        ['q/bias']
        >>> spec = LoraSpec("q/kernel", rank=2, trainable=trainable_biases("all"))
        >>> sorted(split(params, spec, key=jax.random.key(0))[1])
        ['o/bias', 'q/bias', 'q/kernel']
    """
    if mode == "none":
        return []
    if mode == "all":
        return ["**/bias"]
    if mode != "lora_only":
        raise LoraError(f"bias must be 'none', 'all' or 'lora_only' (PEFT's modes), got {mode!r}")
    if base is None:
        raise LoraError("trainable_biases('lora_only') needs the base params to find the biases")
    leaves = {p for p, _ in weight_leaves(base)}
    return sorted({b for p in adapted if (b := bias_path(p)) is not None and b in leaves})
