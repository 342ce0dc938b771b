"""How ``split`` initialises each adapted weight: ``LoraSpec(init=name)``, a registry of inits.

Built in: ``"gaussian"``, ``"kaiming_uniform"``, ``"orthogonal"`` (the base unchanged,
:mod:`~lorax_fn.inits.standard`); ``"pissa"``, ``"olora"`` (the base rewritten to a
residual, :mod:`~lorax_fn.inits.residual`); ``"loftq"`` (the base quantized together with
the factors, :mod:`~lorax_fn.inits.loftq`); ``"lora_ga"`` (from one batch's gradients,
:func:`lora_ga`, :mod:`~lorax_fn.inits.gradient`); ``"eva"`` and ``"corda"`` (from the
inputs each adapted weight sees over a few batches: :func:`eva`, :func:`corda`,
:mod:`~lorax_fn.inits.eva`, :mod:`~lorax_fn.inits.corda`). Your own: subclass :class:`Init` and
:func:`register` it (:mod:`~lorax_fn.inits.base`).
"""

from lorax_fn.inits.base import Init, get, names, register, rewrites_base
from lorax_fn.inits.corda import Corda, corda, corda_factors
from lorax_fn.inits.eva import Eva, InputStats, collect_inputs, eva, rank_distribution
from lorax_fn.inits.gradient import LoraGA, lora_ga, lora_ga_factors
from lorax_fn.inits.loftq import LoftQ, loftq_iterates
from lorax_fn.inits.residual import olora_factors
from lorax_fn.inits.standard import orthogonal_factors

__all__ = [
    "Corda",
    "Eva",
    "Init",
    "InputStats",
    "LoftQ",
    "LoraGA",
    "collect_inputs",
    "corda",
    "corda_factors",
    "eva",
    "get",
    "loftq_iterates",
    "lora_ga",
    "lora_ga_factors",
    "names",
    "olora_factors",
    "orthogonal_factors",
    "rank_distribution",
    "register",
    "rewrites_base",
]
