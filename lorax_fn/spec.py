"""`LoraSpec`: which leaves to adapt, at which rank and scale, initialised how."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax.numpy as jnp

from lorax_fn.errors import LoraError
from lorax_fn.factors import Layout
from lorax_fn.paths import AnyOf, PathFilter, as_filters, compile_filter, filter_name

INITS = ("gaussian", "kaiming_uniform", "orthogonal", "pissa", "olora", "loftq", "lora_ga")
"""The inits lorax_fn ships (:mod:`lorax_fn.inits`); more are added by registering them."""
# Names lorax_fn.inits.register has seen: the spec checks names without importing the
# inits (they build on this module).
_REGISTERED_INITS: set[str] = set(INITS)
SCALINGS = ("standard", "rslora")

Filters = str | re.Pattern[str] | Sequence[PathFilter]


def add_init_name(name: str) -> None:
    """Let ``LoraSpec(init=name)`` pass (called by :func:`lorax_fn.inits.register`).

    Example:
        >>> add_init_name("doc_init")
        >>> LoraSpec("w", init="doc_init").init
        'doc_init'
    """
    _REGISTERED_INITS.add(name)


def _as_pattern_map(value: Any, name: str) -> tuple[tuple[PathFilter, Any], ...]:
    items = value.items() if isinstance(value, Mapping) else value
    out = tuple((k, v) for k, v in items)
    for k, _ in out:
        compile_filter(k)
    return out


def _first_match(pairs: Sequence[tuple[PathFilter, Any]], path: str, leaf: Any) -> Any:
    for pattern, value in pairs:
        if compile_filter(pattern)(path, leaf):
            return value
    return None


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """What to adapt and how — the JAX counterpart of PEFT's ``LoraConfig``.

    Args:
      targets: path filters of the weights to adapt with low-rank factors: globs over
        ``/``-joined key paths (``*`` one level, ``**`` any depth), regular expressions
        (``"re:..."`` or a compiled pattern, full match) or callables ``(path, leaf)``.
      rank: the default rank ``r``.
      alpha: the default ``alpha``; ``None`` means ``alpha = rank``.
      exclude: filters of paths never adapted even when a target matches them (they can
        still be listed in ``trainable``).
      rank_pattern, alpha_pattern: per-path overrides, ``{filter: value}``; the first
        matching filter wins (PEFT's ``rank_pattern`` / ``alpha_pattern``).
      scaling: ``"standard"`` (``alpha / r``, the paper) or ``"rslora"`` (``alpha / √r``).
      init: how :func:`lorax_fn.split` draws A and B (:mod:`lorax_fn.inits`). With B = 0,
        the model starts equal to the base: ``"gaussian"`` (the paper; std ``init_std``,
        default ``1/r`` as in PEFT), ``"kaiming_uniform"`` (PEFT's default:
        U(±1/√fan_in)); ``"orthogonal"`` (PEFT's: A, B ≠ 0 with ``A·B = 0``, even ranks).
        Rewriting the base, so the model is unchanged at init but the base is not the
        weights: ``"pissa"`` (the top-``r`` singular directions of ``W0``) and
        ``"olora"`` (the thin QR of ``W0``) move a part of ``W0`` into A, B and return
        the *residual* ``W0 - scale·A·B`` as the base; ``"loftq"`` returns the base
        quantized (NF4) with ``Q + scale·A·B ≈ W0``; ``"lora_ga"`` takes A, B from one
        batch's gradients (register :func:`lorax_fn.inits.lora_ga` first) and returns the
        residual. Or the name of an init registered with :func:`lorax_fn.inits.register`.
      factor_dtype: dtype of A and B (float32 even for a bfloat16 base, by default).
      trainable: filters of leaves trained in full (heads, norms, biases). BitFit is
        ``LoraSpec(trainable=["**/bias"])`` with no targets.
      layouts: ``{filter: Layout}``: which axes of a matched weight are fan-in, fan-out
        and stacked (batch), for weights whose shape alone does not say.
      dropout: LoRA dropout rate on the input of the low-rank path (training only).
      use_dora: DoRA (PEFT's ``use_dora``): each adapted weight also gets a trainable
        magnitude per output column, ``W = m·(W0 + scale·A·B)/‖W0 + scale·A·B‖_c``,
        initialised to ``‖W0‖_c`` so the model starts equal to the base
        (:mod:`lorax_fn.variants.dora`). The same as ``variant="dora"``.
      variant: the adapter variant (:mod:`lorax_fn.variants`): ``"lora"`` (plain),
        ``"dora"``, or the name of one registered with
        :func:`lorax_fn.variants.register`; ``split`` checks that it is registered.
        Stored as ``None`` for plain LoRA and DoRA, which ``use_dora`` says (so that
        ``dataclasses.replace(spec, use_dora=False)`` gives plain LoRA); read the
        resolved name from :attr:`variant_name`.

    Example:
        >>> spec = LoraSpec(targets=["**/query/kernel", "**/value/kernel"], rank=8,
        ...                 rank_pattern={"**/layer_0/**": 16}, trainable=["**/head/**"])
        >>> spec.rank_for("params/layer_0/query/kernel"), spec.scale_for("params/x/kernel")
        (16, 1.0)
    """

    targets: Filters = ()
    rank: int = 8
    alpha: float | None = None
    exclude: Filters = ()
    rank_pattern: Mapping[PathFilter, int] | Sequence[tuple[PathFilter, int]] = ()
    alpha_pattern: Mapping[PathFilter, float] | Sequence[tuple[PathFilter, float]] = ()
    scaling: Literal["standard", "rslora"] = "standard"
    init: str = "gaussian"
    init_std: float | None = None
    factor_dtype: Any = jnp.float32
    trainable: Filters = ()
    layouts: Mapping[PathFilter, Layout] | Sequence[tuple[PathFilter, Layout]] = ()
    dropout: float = 0.0
    use_dora: bool = False
    variant: str | None = None

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("targets", as_filters(self.targets))
        set_("exclude", as_filters(self.exclude))
        set_("trainable", as_filters(self.trainable))
        set_("rank_pattern", _as_pattern_map(self.rank_pattern, "rank_pattern"))
        set_("alpha_pattern", _as_pattern_map(self.alpha_pattern, "alpha_pattern"))
        set_("layouts", _as_pattern_map(self.layouts, "layouts"))
        for f in self.targets + self.exclude + self.trainable:
            compile_filter(f)
        if not self.targets and not self.trainable:
            raise LoraError(
                "LoraSpec has no targets and no trainable leaves, so it would train nothing: "
                "give targets=... (e.g. '**/kernel') and/or trainable=... (e.g. ['**/bias'])"
            )
        _check_rank("rank", self.rank)
        if self.alpha is not None:
            _check_alpha("alpha", self.alpha)
        for pattern, r in self.rank_pattern:
            _check_rank(f"rank_pattern[{filter_name(pattern)!r}]", r)
        for pattern, a in self.alpha_pattern:
            _check_alpha(f"alpha_pattern[{filter_name(pattern)!r}]", a)
        for pattern, layout in self.layouts:
            if not isinstance(layout, Layout):
                raise LoraError(
                    f"layouts[{filter_name(pattern)!r}] must be a lorax_fn.Layout, got {layout!r}"
                )
        if self.scaling not in SCALINGS:
            raise LoraError(f"unknown scaling {self.scaling!r}; expected one of {SCALINGS}")
        if not isinstance(self.init, str) or self.init not in _REGISTERED_INITS:
            raise LoraError(
                f"unknown init {self.init!r}; expected one of {sorted(_REGISTERED_INITS)} "
                "(register your own with lorax_fn.inits.register, also before restoring a "
                "checkpoint whose spec names it)"
            )
        if self.init_std is not None and not 0 < self.init_std < math.inf:
            raise LoraError(f"init_std must be finite and > 0, got {self.init_std!r}")
        if not jnp.issubdtype(jnp.dtype(self.factor_dtype), jnp.floating):
            raise LoraError(f"factor_dtype must be a floating dtype, got {self.factor_dtype!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoraError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.use_dora, bool):
            raise LoraError(f"use_dora must be True or False, got {self.use_dora!r}")
        if self.variant is not None and (not isinstance(self.variant, str) or not self.variant):
            raise LoraError(f"variant must be a variant's name, got {self.variant!r}")
        # use_dora is PEFT's name for the DoRA variant: the flag holds it, so the two
        # can never disagree silently.
        if self.variant == "dora":
            set_("use_dora", True)
        elif self.use_dora and self.variant is not None:
            raise LoraError(f"use_dora=True contradicts variant={self.variant!r}")
        if self.variant in ("lora", "dora"):
            set_("variant", None)

    @property
    def variant_name(self) -> str:
        """The adapter variant's registry name: ``"lora"``, ``"dora"`` or a registered one.

        Example:
            >>> LoraSpec("w", use_dora=True).variant_name, LoraSpec("w").variant_name
            ('dora', 'lora')
        """
        if self.variant is not None:
            return self.variant
        return "dora" if self.use_dora else "lora"

    def rank_for(self, path: str, leaf: Any = None) -> int:
        """The rank of the weight at ``path`` (first matching ``rank_pattern``, else ``rank``)."""
        r = _first_match(self.rank_pattern, path, leaf)
        return self.rank if r is None else int(r)

    def alpha_for(self, path: str, leaf: Any = None) -> float:
        """The alpha at ``path`` (first matching ``alpha_pattern``, else ``alpha`` or rank)."""
        a = _first_match(self.alpha_pattern, path, leaf)
        if a is not None:
            return float(a)
        return float(self.rank_for(path, leaf) if self.alpha is None else self.alpha)

    def scale_for(self, path: str, leaf: Any = None) -> float:
        """``alpha / r`` (or ``alpha / √r`` for rsLoRA) at ``path``."""
        r = self.rank_for(path, leaf)
        denominator = math.sqrt(r) if self.scaling == "rslora" else r
        return self.alpha_for(path, leaf) / denominator

    def layout_for(self, path: str, leaf: Any = None) -> Layout | None:
        """The spec's explicit layout for ``path``, if one of ``layouts`` matches."""
        return _first_match(self.layouts, path, leaf)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able description (string filters only), for checkpoint metadata.

        Example:
            >>> LoraSpec(targets="**/kernel", rank=4).to_json()["targets"]
            ['**/kernel']
        """

        def names(filters: Sequence[PathFilter]) -> list:
            out = []
            for f in filters:
                if isinstance(f, AnyOf):
                    out.append({"any_of": names(f.alternatives)})
                elif isinstance(f, str | re.Pattern):
                    out.append(filter_name(f))
                else:
                    raise LoraError(f"cannot serialise the callable filter {filter_name(f)!r}")
            return out

        def pairs(items: Sequence[tuple[PathFilter, Any]], encode: Any = lambda v: v) -> list:
            return [
                [n, encode(v)]
                for n, (_, v) in zip(names([k for k, _ in items]), items, strict=True)
            ]

        return {
            "targets": names(self.targets),
            "rank": self.rank,
            "alpha": self.alpha,
            "exclude": names(self.exclude),
            "rank_pattern": pairs(self.rank_pattern),
            "alpha_pattern": pairs(self.alpha_pattern),
            "scaling": self.scaling,
            "init": self.init,
            "init_std": self.init_std,
            "factor_dtype": jnp.dtype(self.factor_dtype).name,
            "trainable": names(self.trainable),
            "layouts": pairs(self.layouts, Layout.to_json),
            "dropout": self.dropout,
            "use_dora": self.use_dora,
            # Plain LoRA and DoRA keep the JSON of specs saved before variants existed.
            **({} if self.variant is None else {"variant": self.variant}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LoraSpec:
        """Inverse of :meth:`to_json` (a spec saved before DoRA existed reads as plain LoRA).

        Example:
            >>> spec = LoraSpec(targets=["re:.*kernel"], rank=4, rank_pattern={"a/*": 2})
            >>> LoraSpec.from_json(spec.to_json()) == spec
            True
        """
        data = dict(data)
        for key in ("targets", "exclude", "trainable"):
            data[key] = [_filter_from_json(f) for f in data[key]]
        data["factor_dtype"] = jnp.dtype(data["factor_dtype"]).type
        data["layouts"] = [(k, Layout(**v)) for k, v in data["layouts"]]
        for key in ("rank_pattern", "alpha_pattern"):
            data[key] = [(_filter_from_json(f), v) for f, v in data[key]]
        data["layouts"] = [(_filter_from_json(f), v) for f, v in data["layouts"]]
        return cls(**data)


def _filter_from_json(value: Any) -> PathFilter:
    if isinstance(value, Mapping):
        return AnyOf(*(_filter_from_json(f) for f in value["any_of"]))
    return value


def _check_rank(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise LoraError(f"{name} must be a positive int, got {value!r}")


def _check_alpha(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise LoraError(f"{name} must be > 0, got {value!r}")
    # An infinite alpha turns the B = 0 init into inf·0 = NaN in every adapted weight.
    if not math.isfinite(value):
        raise LoraError(f"{name} must be finite, got {value!r}")
