"""Adapter variants: what a kind of adapter adds to plain LoRA, behind one protocol.

:class:`Variant` (:mod:`~lorax_fn.variants.base`) is the protocol every wing asks —
``split``, ``lora(fn)``, ``merge``/``unmerge``, the optimizer, sharding, checkpoints,
PEFT, stacks — so that no wing names a variant. :func:`register` makes one known by its
name (``LoraSpec(variant=name)``). Shipped: plain LoRA and :mod:`~lorax_fn.variants.dora`
(DoRA, ``LoraSpec(use_dora=True)``), which is imported when first used.
"""

from lorax_fn.variants.base import Variant, get, names, register

__all__ = ["Variant", "get", "names", "register"]
