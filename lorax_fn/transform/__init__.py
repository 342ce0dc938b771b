"""``lora(fn)``: the transformation, and what it is built from.

- :mod:`~lorax_fn.transform.apply`: :func:`lora`, which traces ``fn`` and evaluates its
  jaxpr with each adapted weight held symbolically;
- :mod:`~lorax_fn.transform.symbolic`: the symbolic weight ``W0 + s·A·B`` and its rules,
  by consumer family;
- :mod:`~lorax_fn.transform.primitives`: the primitive table shared with layout inference;
- :mod:`~lorax_fn.transform.layouts`: :func:`infer_layouts`;
- :mod:`~lorax_fn.transform.signature`, :mod:`~lorax_fn.transform.usage`: input
  signatures (what is traced, what is static) and which params ``fn`` reads;
- :mod:`~lorax_fn.transform.routing`: the routed weight of ``multi_lora(method="grouped")``.
"""

from lorax_fn.transform.apply import FallbackMode, lora
from lorax_fn.transform.layouts import InferredLayouts, infer_layouts

__all__ = ["FallbackMode", "InferredLayouts", "infer_layouts", "lora"]
