"""EVA (Paischer et al. 2024; PEFT's ``init_lora_weights="eva"``): A from the inputs' principal
directions, with the ranks redistributed by explained variance.

:func:`collect_inputs` runs your function over a few batches and gathers, for every
targeted weight, the second moments of the input it is multiplied with — in one pass of
the function per batch, without hooks: the function is traced to a jaxpr and evaluated
with every ``dot_general`` that reads a targeted weight also recording its other operand
(through ``jit``, ``remat``, custom-derivative calls and ``scan``; a weight scanned over
its leading axis, as ``nn.scan`` stacks it, gets one record per layer). A targeted weight
read by anything else (a ``while`` loop, a transpose before the product, ...) is refused.

:func:`eva` then takes, per weight (per layer of a stack), the eigendecomposition of the
centered input covariance (PEFT's incremental PCA, computed exactly here), and
redistributes the ranks as PEFT does: each weight offers its ``round(rank·rho)`` top
explained-variance ratios, the ``Σ rank`` largest of all win, and each weight gets as
many components as it won. A = those principal directions (``whiten``: divided by the
root of their singular values), B = 0, so the model starts at the base. Split with
``Eva.adjusted(spec)``: the spec with EVA's ranks and alphas such that the scale stays
``alpha/rank`` (PEFT's default ``adjust_scaling_factors=True``). A stack gets the largest
of its layers' ranks, its other layers' extra columns of A being zero (they stay zero in
training: with B = 0 neither factor gets a gradient there); a weight that wins nothing
gets one zero column (PEFT drops its adapter).

Memory: one float32 ``fan_in × fan_in`` matrix per targeted weight (per layer), plus the
model's forward activations for one batch.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core

from lorax_fn.errors import LoraError
from lorax_fn.factors import Layout, LoraFactors
from lorax_fn.inits.base import Init, factors_of, register
from lorax_fn.paths import compile_filter, leaves_with_paths
from lorax_fn.spec import LoraSpec
from lorax_fn.transform.primitives import SUB_JAXPR

# Primitives that hand a weight on unchanged but for its dtype.
_PASS = ("convert_element_type", "copy", "copy_p")


@dataclasses.dataclass(frozen=True)
class InputStats:
    """The inputs one targeted weight was multiplied with, summed over rows and batches.

    Each array has the weight's batch axes (layers of a stack) first.

    Attributes:
      xtx: ``Σ xᵀx``, ``(*batch, fan_in, fan_in)`` float32 (``x`` a row of the input,
        its contracted axes flattened in the weight's order).
      total: ``Σ x``, ``(*batch, fan_in)``.
      rows: the number of rows summed, ``(*batch,)``.
      calls: how many products were recorded (per batch and use), ``(*batch,)``.
      in_axes: the weight's axes the inputs were contracted with.
      batch_axes: the weight's axes the records are per (a scan's layers first).
    """

    xtx: jax.Array
    total: jax.Array
    rows: jax.Array
    calls: jax.Array
    in_axes: tuple[int, ...]
    batch_axes: tuple[int, ...]

    def covariance(self) -> jax.Array:
        """The centered covariance ``(Σxᵀx − n·μμᵀ)/(n − 1)`` (PCA's, per layer)."""
        n = self.rows[..., None, None]
        mean = self.total / self.rows[..., None]
        return (self.xtx - n * mean[..., :, None] * mean[..., None, :]) / (n - 1)

    def check(self, path: str, layout: Layout) -> None:
        """Refuse a layout the records do not match (they would be another matrix's)."""
        if self.in_axes != tuple(layout.in_axes) or self.batch_axes != tuple(layout.batch_axes):
            raise LoraError(
                f"{path}: its inputs were recorded contracted over axes {self.in_axes} per "
                f"axes {self.batch_axes}, but split's layout is {layout}; give split a "
                "layout matching how the function uses the weight (layouts= or fn=)"
            )


def targeted(params: Any, spec: LoraSpec) -> dict[str, Any]:
    """``{path: leaf}`` of the floating leaves ``spec`` adapts (its targets less excludes).

    Example:
        >>> sorted(targeted({"w": jnp.ones((2, 2)), "b": jnp.ones(2)}, LoraSpec("w")))
        ['w']
    """
    tgt = [compile_filter(f) for f in spec.targets]
    exc = [compile_filter(f) for f in spec.exclude]
    return {
        p: x
        for p, x in leaves_with_paths(params)
        if any(t(p, x) for t in tgt)
        and not any(e(p, x) for e in exc)
        and jnp.issubdtype(getattr(x, "dtype", jnp.int32), jnp.floating)
    }


# --------------------------------------------------------------------------- the walker

_Record = tuple[tuple[jax.Array, ...], tuple[int, ...], tuple[int, ...]]


def _bind(eqn: core.JaxprEqn, invals: Sequence[Any]) -> list[Any]:
    out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
    return list(out) if eqn.primitive.multiple_results else [out]


def _add(records: dict[str, _Record], path: str, record: _Record) -> None:
    if path not in records:
        records[path] = record
        return
    old = records[path]
    if old[1:] != record[1:] or old[0][0].shape != record[0][0].shape:
        raise LoraError(
            f"{path}: the weight is multiplied with inputs in two different ways (axes "
            f"{old[1]} and {record[1]}); EVA/CorDA need one input covariance per weight"
        )
    records[path] = (tuple(a + b for a, b in zip(old[0], record[0], strict=True)), *record[1:])


def _record(eqn: core.JaxprEqn, invals: list[Any], side: int, normalize: bool) -> _Record:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    wc, xc, wb, xb = (lc, rc, lb, rb) if side == 0 else (rc, lc, rb, lb)
    x = invals[1 - side].astype(jnp.float32)
    by_w = sorted(zip(wc, xc, strict=True))
    batch = sorted(zip(wb, xb, strict=True))
    lead = [k for _, k in batch]
    tail = [k for _, k in by_w]
    free = [k for k in range(x.ndim) if k not in lead and k not in tail]
    x = jnp.transpose(x, lead + free + tail)
    fan_in = math.prod(x.shape[x.ndim - len(tail) :])
    x = x.reshape(x.shape[: len(lead)] + (-1, fan_in))
    if normalize:  # PEFT's CorDA hook: each call's input divided by |max(x)|
        x = x / jnp.abs(jnp.max(x))
    xtx = jnp.einsum("...ni,...nj->...ij", x, x)
    ones = jnp.ones(x.shape[: len(lead)], jnp.float32)
    stats = (xtx, x.sum(-2), ones * x.shape[-2], ones)
    return stats, tuple(w for w, _ in by_w), tuple(w for w, _ in batch)


def _walk(
    jaxpr: core.Jaxpr,
    consts: Sequence[Any],
    args: Sequence[Any],
    tags: Sequence[str | None],
    normalize: bool,
) -> tuple[list[Any], list[str | None], dict[str, _Record]]:
    """Evaluate ``jaxpr``; ``tags`` name the inputs that are targeted weights."""
    env: dict[Any, Any] = dict(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    tag: dict[Any, str] = {v: t for v, t in zip(jaxpr.invars, tags, strict=True) if t}
    records: dict[str, _Record] = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, core.Literal) else env[v]

    def tag_of(v: Any) -> str | None:
        return None if isinstance(v, core.Literal) else tag.get(v)

    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        in_tags = [tag_of(v) for v in eqn.invars]
        out_tags: list[str | None] = [None] * len(eqn.outvars)
        name = eqn.primitive.name
        if not any(in_tags):
            outvals = _bind(eqn, invals)
        elif name == "dot_general" and sum(map(bool, in_tags)) == 1:
            side = 0 if in_tags[0] else 1
            _add(records, in_tags[side], _record(eqn, invals, side, normalize))
            outvals = _bind(eqn, invals)
        elif name in _PASS:
            outvals, out_tags = _bind(eqn, invals), in_tags[:1]
        elif name in SUB_JAXPR:
            sub = eqn.params[SUB_JAXPR[name]]
            inner, inner_consts = (sub.jaxpr, sub.consts) if hasattr(sub, "consts") else (sub, ())
            outvals, out_tags, sub_records = _walk(inner, inner_consts, invals, in_tags, normalize)
            for p, r in sub_records.items():
                _add(records, p, r)
        elif name == "scan":
            outvals, sub_records = _scan(eqn, invals, in_tags, normalize)
            for p, r in sub_records.items():
                _add(records, p, r)
        else:
            path = next(t for t in in_tags if t)
            raise LoraError(
                f"{path}: collecting this weight's inputs needs it multiplied by dot_general "
                f"(through jit, remat, custom derivatives or scan), but it reaches `{name}`; "
                "adapt it with another init, or exclude it from the spec"
            )
        for v, x, t in zip(eqn.outvars, outvals, out_tags, strict=True):
            if not isinstance(v, core.DropVar):
                env[v] = x
                if t:
                    tag[v] = t
    return [read(v) for v in jaxpr.outvars], [tag_of(v) for v in jaxpr.outvars], records


def _scan(
    eqn: core.JaxprEqn, invals: list[Any], in_tags: list[str | None], normalize: bool
) -> tuple[list[Any], dict[str, _Record]]:
    p = eqn.params
    n_consts, n_carry = p["num_consts"], p["num_carry"]
    if any(in_tags[n_consts : n_consts + n_carry]):
        path = next(t for t in in_tags[n_consts : n_consts + n_carry] if t)
        raise LoraError(f"{path}: a targeted weight carried through a scan is not supported")
    consts, carry, xs = (
        invals[:n_consts],
        invals[n_consts : n_consts + n_carry],
        invals[n_consts + n_carry :],
    )
    static: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def body(carry_vals, xs_vals):
        outs, _, records = _walk(
            p["jaxpr"].jaxpr,
            p["jaxpr"].consts,
            [*consts, *carry_vals, *xs_vals],
            in_tags,
            normalize,
        )
        static.update({path: r[1:] for path, r in records.items()})
        return outs[:n_carry], (outs[n_carry:], {path: r[0] for path, r in records.items()})

    carry_out, (ys, stats) = lax.scan(
        body, carry, xs, length=p["length"], reverse=p["reverse"], unroll=p["unroll"]
    )
    scanned = {t for t in in_tags[n_consts + n_carry :] if t}
    records: dict[str, _Record] = {}
    for path, arrays in stats.items():
        in_axes, batch_axes = static[path]
        if path in scanned:  # one record per layer: the weight's leading axis
            shift = tuple(a + 1 for a in in_axes), (0, *(a + 1 for a in batch_axes))
            records[path] = (arrays, *shift)
        else:  # the same weight at every step: sum the steps
            records[path] = (tuple(a.sum(0) for a in arrays), in_axes, batch_axes)
    return [*carry_out, *ys], records


def collect_inputs(
    fn: Callable[..., Any],
    params: Any,
    spec: LoraSpec,
    batches: Iterable[Any],
    *,
    normalize: bool = False,
) -> dict[str, InputStats]:
    """The inputs every weight ``spec`` targets is multiplied with in ``fn(params, *batch)``.

    ``batches`` yields ``fn``'s arguments after the params (a tuple, or one argument).
    One traced pass of ``fn`` per batch; the output is discarded. ``normalize`` divides
    each recorded input by ``|max(x)|`` first (PEFT's CorDA does).

    Example:
        >>> params = {"w": jnp.ones((3, 2))}
        >>> x = jnp.arange(6.0).reshape(2, 3)
        >>> stats = collect_inputs(lambda p, x: x @ p["w"], params, LoraSpec("w"), [x])
        >>> bool(jnp.allclose(stats["w"].xtx, x.T @ x))
        True
    """
    chosen = targeted(params, spec)
    if not chosen:
        raise LoraError("collect_inputs: the spec's targets match no floating leaf of params")
    flat, treedef = jax.tree_util.tree_flatten(params)
    paths = [p for p, _ in leaves_with_paths(params)]
    tags = [p if p in chosen else None for p in paths]
    static: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def run(leaves: list[Any], args: tuple[Any, ...]) -> Any:
        return fn(jax.tree_util.tree_unflatten(treedef, leaves), *args)

    @jax.jit
    def one(leaves: list[Any], args: tuple[Any, ...]) -> dict[str, tuple[jax.Array, ...]]:
        closed = jax.make_jaxpr(run)(leaves, args)
        arg_leaves = jax.tree_util.tree_leaves(args)
        _, _, records = _walk(
            closed.jaxpr,
            closed.consts,
            [*leaves, *arg_leaves],
            tags + [None] * len(arg_leaves),
            normalize,
        )
        static.update({p: r[1:] for p, r in records.items()})
        return {p: r[0] for p, r in records.items()}

    sums: dict[str, tuple[jax.Array, ...]] = {}
    for batch in batches:
        out = one(flat, batch if isinstance(batch, tuple) else (batch,))
        sums = {
            p: tuple(a + b for a, b in zip(sums[p], s, strict=True)) if p in sums else s
            for p, s in out.items()
        }
    if missing := sorted(set(chosen) - set(sums)):
        raise LoraError(
            f"collect_inputs: no input was recorded for {missing}: fn never multiplied "
            "them (or no batch was given); exclude them from the spec"
        )
    return {p: InputStats(*sums[p], *static[p]) for p in chosen}


# --------------------------------------------------------------------------- EVA


def rank_distribution(
    ratios: Mapping[Any, np.ndarray], ranks: Mapping[Any, int], rho: float
) -> dict[Any, int]:
    """PEFT's EVA rule: each layer offers its top ``round(rank·rho)`` explained-variance
    ratios; the ``Σ rank`` largest of all decide how many each layer gets.

    Example:
        >>> rank_distribution({"a": np.array([0.9, 0.05]), "b": np.array([0.5, 0.4])},
        ...                   {"a": 1, "b": 1}, rho=2.0)
        {'a': 1, 'b': 1}
    """
    keys, values = [], []
    for k, r in ranks.items():
        offered = np.asarray(ratios[k])[: round(r * rho)]
        keys += [k] * len(offered)
        values += list(offered)
    budget = sum(ranks.values())
    order = np.argsort(-np.asarray(values, np.float64), kind="stable")[:budget]
    counts = {k: 0 for k in ranks}
    for i in order:
        counts[keys[i]] += 1
    return counts


@dataclasses.dataclass(frozen=True)
class Components:
    """One weight's principal input directions (per layer) and its explained variance."""

    vectors: np.ndarray  # (*batch, fan_in, k): eigenvectors, largest first
    values: np.ndarray  # (*batch, k): the covariance's eigenvalues
    ratios: np.ndarray  # (*batch, k): explained-variance ratios
    rows: np.ndarray  # (*batch,)


def components(stats: InputStats) -> Components:
    """The centered covariance's eigendecomposition, largest first (per layer).

    Example:
        >>> x = jnp.array([[2.0, 0.0], [-2.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
        >>> c = components(collect_inputs(lambda p, x: x @ p["w"], {"w": jnp.ones((2, 2))},
        ...                               LoraSpec("w"), [x])["w"])
        >>> c.ratios.round(2).tolist()
        [0.8, 0.2]
    """
    cov = np.asarray(stats.covariance(), np.float64)
    values, vectors = np.linalg.eigh(cov)
    values, vectors = values[..., ::-1].clip(0), vectors[..., ::-1]
    total = values.sum(-1, keepdims=True)
    return Components(
        vectors, values, values / np.where(total > 0, total, 1), np.asarray(stats.rows)
    )


@dataclasses.dataclass(frozen=True, eq=False)
class Eva(Init):
    """The EVA init, holding each weight's A (see :func:`eva`).

    Args:
      a: ``{path: (*batch, fan_in, r) A}``, zero columns where a layer got a lower rank.
      ranks: ``{path: per-layer ranks}`` (an int array shaped like the batch axes).
      stats: ``{path: InputStats}`` the components came from (checked against the layout).
    """

    a: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    ranks: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    stats: Mapping[str, InputStats] = dataclasses.field(default_factory=dict)
    name = "eva"

    def adjusted(self, spec: LoraSpec) -> LoraSpec:
        """``spec`` with EVA's ranks, keeping each weight's scale (PEFT's
        ``adjust_scaling_factors=True``): split with it.

        Example:
            >>> Eva(a={"w": np.zeros((4, 3))}).adjusted(LoraSpec("w", rank=2)).rank_for("w")
            3
        """
        ranks, alphas = [], []
        for path, a in self.a.items():
            width = a.shape[-1]
            exact = "re:^" + re.escape(path) + "$"
            root = math.sqrt(width) if spec.scaling == "rslora" else width
            ranks.append((exact, width))
            alphas.append((exact, spec.scale_for(path) * root))
        return dataclasses.replace(
            spec,
            rank_pattern=ranks + list(spec.rank_pattern),
            alpha_pattern=alphas + list(spec.alpha_pattern),
        )

    def __call__(
        self,
        path: str,
        w: jax.Array,
        layout: Layout,
        rank: int,
        scale: float,
        spec: LoraSpec,
        key: jax.Array,
    ) -> tuple[LoraFactors, Any]:
        if path not in self.a:
            raise LoraError(
                f"{path}: init='eva' needs this weight's inputs: register "
                "lorax_fn.inits.eva(fn, params, spec, batches) before split"
            )
        self.stats[path].check(path, layout)
        a = jnp.asarray(self.a[path], jnp.float32)
        if rank != a.shape[-1]:
            raise LoraError(
                f"{path}: EVA gave this weight rank {a.shape[-1]}, the spec says {rank}: split "
                "with init.adjusted(spec), which records EVA's ranks (checkpoints check them)"
            )
        b = jnp.zeros(a.shape[:-2] + (a.shape[-1], layout.fan_out(w.shape)), jnp.float32)
        return factors_of(a, b, tuple(w.shape), layout, scale, spec), w


def eva(
    fn: Callable[..., Any],
    params: Any,
    spec: LoraSpec,
    batches: Iterable[Any],
    *,
    rho: float = 2.0,
    whiten: bool = False,
) -> Eva:
    """The EVA init for ``spec``'s targets, from their inputs in ``fn(params, *batch)``.

    ``batches`` yields ``fn``'s arguments after the params (a tuple, or one argument);
    ``rho`` (PEFT's ``EvaConfig.rho``, ≥ 1) bounds a weight's rank at ``round(rank·rho)``;
    ``whiten`` divides each direction by the root of its singular value. Register the
    result and split with ``init.adjusted(spec)`` (``init="eva"``, EVA's ranks).

    Example:
        >>> import jax, lorax_fn
        >>> params = {"w": jax.random.normal(jax.random.key(0), (16, 8))}
        >>> xs = [jax.random.normal(jax.random.key(i), (32, 16)) for i in range(2)]
        >>> spec = lorax_fn.LoraSpec("w", rank=2, init="eva")
        >>> init = register(eva(lambda p, x: x @ p["w"], params, spec, xs))
        >>> base, lt = lorax_fn.split(params, init.adjusted(spec), key=jax.random.key(1))
        >>> lt["w"].a.shape, float(abs(lt["w"].b).sum())
        ((16, 2), 0.0)
    """
    if rho < 1:
        raise LoraError(f"eva: rho must be >= 1 (PEFT's EvaConfig), got {rho}")
    stats = collect_inputs(fn, params, spec, batches)
    leaves = targeted(params, spec)
    comps, caps = {}, {}
    for path, st in stats.items():
        comps[path] = components(st)
        size = math.prod(np.shape(leaves[path]))
        batch = math.prod(np.shape(leaves[path])[a] for a in st.batch_axes)
        fan_in = st.xtx.shape[-1]
        caps[path] = min(fan_in, size // (batch * fan_in))
        if np.any(comps[path].rows < 2):
            raise LoraError(f"eva: {path} saw fewer than 2 input rows; give more batches")
    # Every layer of a stack is a layer of its own in PEFT's budget.
    offers, layer_ranks = {}, {}
    for path, c in comps.items():
        r = spec.rank_for(path, leaves[path])
        for idx in np.ndindex(c.ratios.shape[:-1]):
            offers[path, idx] = c.ratios[idx][: min(caps[path], round(r * rho))]
            layer_ranks[path, idx] = r
    won = rank_distribution(offers, layer_ranks, rho)
    a_all, rank_all = {}, {}
    for path, c in comps.items():
        per_layer = np.zeros(c.ratios.shape[:-1], int)
        for idx in np.ndindex(per_layer.shape):
            per_layer[idx] = won[path, idx]
        width = max(int(per_layer.max(initial=0)), 1)
        a = np.array(c.vectors[..., :width])
        if whiten:
            singular = np.sqrt(c.values[..., :width] * (c.rows[..., None] - 1))
            a = a / np.sqrt(np.where(singular > 0, singular, 1))[..., None, :]
        a = a * (np.arange(width) < per_layer[..., None])[..., None, :]
        a_all[path], rank_all[path] = a, per_layer
    return Eva(a_all, rank_all, stats)


register(Eva())
