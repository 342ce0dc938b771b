"""Adapter variants beyond plain LoRA: :mod:`~lorax_fn.variants.dora` (DoRA)."""

from lorax_fn.variants import dora

__all__ = ["dora"]
