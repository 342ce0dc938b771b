"""Quantized frozen bases (QLoRA): int8 and NF4 weights, and the lazy weight of ``lora``.

A :class:`QuantizedArray` is one leaf of the base wherever a base is accepted; ``lora(fn)``
dequantizes it inside each consumer (:mod:`~lorax_fn.quant.lazy`), one weight at a time.
"""

from lorax_fn.quant.quantized import (
    QuantizedArray,
    bits_per_param,
    dequantize,
    dequantize_base,
    quantize,
    quantize_base,
    quantized_shardings,
    storage_bytes,
)

__all__ = [
    "QuantizedArray",
    "bits_per_param",
    "dequantize",
    "dequantize_base",
    "quantize",
    "quantize_base",
    "quantized_shardings",
    "storage_bytes",
]
