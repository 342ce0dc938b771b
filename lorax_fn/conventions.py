"""The documented layout convention for weights whose layout the caller did not give.

:func:`lorax_fn.split`, :func:`lorax_fn.quant.quantize_base` and
:func:`lorax_fn.peft.import_peft` place such weights the same way; everything else comes
from :func:`lorax_fn.infer_layouts` or ``LoraSpec(layouts=...)``.
"""

from __future__ import annotations

from collections.abc import Mapping

from lorax_fn.factors import Layout

_QKV = ("query", "key", "value")
_ATTENTION = (*_QKV, "out")


def default_layout(
    path: str, shape: tuple[int, ...], shapes: Mapping[str, tuple[int, ...]] | None = None
) -> Layout | None:
    """The documented convention for weights whose layout the caller did not give.

    - 2-D ``(in, out)`` weights: Dense kernels, Einsum ``"...i,io->...o"`` kernels,
      and ``Embed`` tables ``(vocab, features)`` (the vocabulary axis is gathered,
      so it plays the fan-in role).
    - Flax attention (linen ``MultiHeadDotProductAttention``, ``nnx.MultiHeadAttention``):
      a 3-D kernel under ``query``/``key``/``value`` is ``(d, heads, head_dim)`` with
      fan-in ``d``; under ``out`` it is ``(heads, head_dim, d)`` with fan-out ``d``.

    The name alone does not decide the attention case: an ``nn.scan`` stack of Dense
    layers named ``query``/…/``out`` has kernels ``(layers, in, out)`` of the same rank,
    and one kernel's shape cannot tell ``(layers, d, d)`` from ``(d, heads, head_dim)``
    (nor may heads·head_dim be required to equal ``d``: ``qkv_features`` can be set).
    So the kernel's module in ``shapes`` (every leaf's shape by path, as
    :func:`lorax_fn.split` passes) must look like attention: an ``out`` kernel
    ``(heads, head_dim, d_out)`` and each ``query``/``key``/``value`` kernel present
    ``(d_in, heads, head_dim)`` with the same ``(heads, head_dim)`` and ``d_in !=
    heads``. A stack of Dense layers never passes: its kernels share the leading layer
    axis, so ``out`` would give ``heads = layers`` and ``query`` ``d_in = layers``.
    Without ``shapes`` the module cannot be checked and 3-D kernels get ``None``.

    Anything else (convolutions, other ``DenseGeneral`` kernels, ``nn.scan`` stacks)
    is ambiguous from the shape and gets ``None``: pass ``layouts=`` from
    :func:`lorax_fn.infer_layouts`, or give ``LoraSpec(layouts=...)``.

    Example:
        >>> shapes = {"attn/query/kernel": (32, 4, 8), "attn/out/kernel": (4, 8, 32)}
        >>> default_layout("attn/out/kernel", (4, 8, 32), shapes)
        Layout(in_axes=(0, 1), out_axes=(2,), batch_axes=())
        >>> stack = {"attn/query/kernel": (12, 64, 64), "attn/out/kernel": (12, 64, 64)}
        >>> default_layout("attn/query/kernel", (12, 64, 64), stack) is None
        True
    """
    if len(shape) == 2:
        return Layout((0,), (1,))
    parts = path.split("/")
    if not attention_named(parts, shape) or not _attention_module(parts[:-2], shapes or {}):
        return None
    return Layout((0,), (1, 2)) if parts[-2] in _QKV else Layout((0, 1), (2,))


def attention_named(parts: list[str], shape: tuple[int, ...]) -> bool:
    return len(shape) == 3 and len(parts) >= 2 and parts[-1] == "kernel" and parts[-2] in _ATTENTION


def _attention_module(module: list[str], shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """Whether the kernels of ``module`` have Flax attention's shapes (see default_layout)."""
    prefix = "".join(f"{part}/" for part in module)
    kernels = {
        name: tuple(shapes[f"{prefix}{name}/kernel"])
        for name in _ATTENTION
        if f"{prefix}{name}/kernel" in shapes
    }
    out = kernels.pop("out", None)
    if out is None or len(out) != 3 or not kernels:
        return False
    heads = out[:2]
    return all(len(s) == 3 and s[1:] == heads and s[0] != heads[0] for s in kernels.values())
