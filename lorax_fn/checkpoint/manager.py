"""Resumable training checkpoints: LoRA tree + optimizer state + step (+ data position).

:class:`LoraCheckpointManager` builds on orbax's ``CheckpointManager``: each step
directory holds the ``lora`` and ``lorax_fn`` items of
:mod:`lorax_fn.checkpoint.format` plus an ``opt_state`` item (the optimizer
state's leaves, keyed by leaf index), and the metadata also records the step,
metrics, data-iterator state and each optimizer leaf's shape, dtype and SHA-256
(and optionally an ``extra`` item of chosen base leaves, e.g. BatchNorm statistics).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import numpy as np
import orbax.checkpoint as ocp

from lorax_fn.checkpoint.errors import CheckpointDamaged, one_clear_error, read_error
from lorax_fn.checkpoint.extra import (
    abstract_extra,
    apply_extra,
    encode_extra,
    requested_extra,
    select_extra,
    warn_unsaved,
)
from lorax_fn.checkpoint.format import (
    EXTRA_ITEM,
    LORA_ITEM,
    META_ITEM,
    OPT_ITEM,
    Shardings,
    abstract_lora,
    array_info,
    check_against_base,
    check_entries,
    check_pissa_base,
    check_spec,
    checkpoint_path,
    decode,
    default_sharding,
    encode,
    leaf_specs,
    seal,
    spec_paths,
    verify_array,
)
from lorax_fn.errors import LoraError
from lorax_fn.inits import rewrites_base
from lorax_fn.pissa import base_sketches
from lorax_fn.spec import LoraSpec

# orbax deletes old steps with a plain rmtree, so a kill mid-delete would leave a broken
# step under its final name; renaming it here first (atomic) and purging later avoids that.
_DELETED = "_lorax_deleted"


@dataclasses.dataclass(frozen=True)
class TrainState:
    """What :meth:`LoraCheckpointManager.restore` returns.

    ``base`` is the base given to ``restore(extra=True)`` with the step's saved extra
    leaves put in (``None`` without ``extra=True``).
    """

    step: int
    lora_tree: dict[str, Any]
    opt_state: Any
    data_state: Any
    metrics: dict[str, float] | None
    base: Any = None


def _opt_leaves(opt_state: Any) -> tuple[list[str], list[Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(opt_state)
    # Python scalars in custom states become 0-d arrays, which orbax and JSON both describe.
    leaves = [leaf if hasattr(leaf, "dtype") else np.asarray(leaf) for _, leaf in flat]
    return [jax.tree_util.keystr(k) for k, _ in flat], leaves


def _lora_key(key_path: tuple[Any, ...]) -> tuple[str, str | None] | None:
    """The LoRA leaf an optimizer-state leaf mirrors: ``(path, role)``.

    ``role`` is ``"a"``, ``"b"``, the name of a variant's extra array, or ``None`` for a
    leaf trained in full. optax states hold param-shaped trees (``mu``, ``nu``,
    ``trace`` ...), so such a leaf's key path ends with the LoRA tree's own: ``[path]``,
    ``[path].a``/``.b`` or ``[path].extras['name']``; a layer subset's (``[path].factors.a``,
    ``[path].parts[k].factors.a``) gives the role ``"k.a"`` (``k`` 0 for a ``LayerSubset``).
    """
    keys = list(key_path)
    role = None
    if _attr(keys, -2) == "extras" and isinstance(keys[-1], jax.tree_util.DictKey):
        role = str(keys[-1].key)
        del keys[-2:]
    elif _attr(keys, -1) in ("a", "b"):
        role = keys.pop().name
        if _attr(keys, -1) == "factors":
            keys.pop()
            part = 0
            if _attr(keys, -2) == "parts" and isinstance(keys[-1], jax.tree_util.SequenceKey):
                part = keys[-1].idx
                del keys[-2:]
            role = f"{part}.{role}"
    if keys and isinstance(keys[-1], jax.tree_util.DictKey) and isinstance(keys[-1].key, str):
        return keys[-1].key, role
    return None


def _attr(keys: list[Any], i: int) -> str | None:
    """The attribute name at ``keys[i]``, if that key is an attribute access."""
    key = keys[i] if len(keys) >= -i else None
    return key.name if isinstance(key, jax.tree_util.GetAttrKey) else None


def _concrete(sharding: Any) -> bool:
    return isinstance(sharding, jax.sharding.Sharding) and not isinstance(
        getattr(sharding, "mesh", None), jax.sharding.AbstractMesh
    )


class LoraCheckpointManager:
    """Resumable training checkpoints on orbax's ``CheckpointManager``.

    Each step directory holds the LoRA tree, the optimizer state (any optax state
    pytree), the step, optional metrics and an optional JSON-able data-iterator state.
    It keeps the last ``max_to_keep`` steps and, with ``best_metric``, also the
    ``keep_best`` best ones. Steps are committed atomically (orbax writes a temporary
    directory and renames it), so a process killed mid-save leaves the previous step
    loadable; what such a save leaves behind is invisible and removed by the next save.
    Old steps are renamed aside before they are deleted, so a kill mid-delete (orbax
    deletes with a plain ``rmtree``) never leaves a half-deleted step listed.
    A step directory is also a valid :func:`lorax_fn.restore` /
    :func:`lorax_fn.checkpoint.checkpoint_info`
    target. ``spec`` must agree with every tree saved or restored (ranks, scales,
    targets); a PiSSA adapter is refused on its original weights, with ``base`` here or
    in :meth:`save`/:meth:`restore` (:mod:`lorax_fn.pissa`); ``extra`` (path filters over
    the base, e.g. ``"batch_stats/**"``) saves those base leaves with every step, taken
    from the ``base`` given to :meth:`save`.

    Example:
        >>> import jax, jax.numpy as jnp, optax, lorax_fn
        >>> spec = lorax_fn.LoraSpec("w", rank=2)
        >>> base, lt = lorax_fn.split({"w": jnp.ones((8, 4))}, spec, key=jax.random.key(0))
        >>> tx = optax.adam(1e-2)
        >>> opt_state, start = tx.init(lt), 0
        >>> mngr = lorax_fn.LoraCheckpointManager("run", spec, base=base,
        ...                                       max_to_keep=2, best_metric="loss")
        >>> if mngr.latest_step() is not None:  # resuming: nothing saved yet here
        ...     state = mngr.restore(opt_state=jax.eval_shape(tx.init, lt))
        ...     lt, opt_state, start = state.lora_tree, state.opt_state, state.step + 1
        >>> for step, loss in zip(range(start, 4), [0.9, 0.3, 0.5, 0.4]):
        ...     grads = jax.tree.map(jnp.ones_like, lt)
        ...     updates, opt_state = tx.update(grads, opt_state, lt)
        ...     lt = optax.apply_updates(lt, updates)
        ...     mngr.save(step, lt, opt_state, metrics={"loss": loss},
        ...               data_state={"epoch": 0, "index": 32 * step})
        >>> mngr.all_steps(), mngr.best_step()  # the last two, and the best one
        ([1, 2, 3], 1)
        >>> state = mngr.restore(opt_state=jax.eval_shape(tx.init, lt))
        >>> state.step, state.data_state, bool((state.lora_tree["w"].b == lt["w"].b).all())
        (3, {'epoch': 0, 'index': 96}, True)
        >>> mngr.close()
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        spec: LoraSpec | None,
        *,
        base: Any = None,
        max_to_keep: int = 3,
        best_metric: str | None = None,
        best_mode: Literal["min", "max"] = "min",
        keep_best: int = 1,
        async_save: bool = False,
        extra: Any = None,
    ) -> None:
        if max_to_keep < 1 or keep_best < 1:
            raise LoraError(
                f"max_to_keep and keep_best must be >= 1, got {max_to_keep}, {keep_best}"
            )
        if best_mode not in ("min", "max"):
            raise LoraError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        self.directory = checkpoint_path(directory)
        self._spec = spec
        try:
            self._spec_json = None if spec is None else spec.to_json()
        except LoraError:  # callable filters: nothing is stored, so nothing can contradict it
            self._spec_json = None
        self._extra = extra
        self._base_leaves = None if base is None else leaf_specs(base)
        # PiSSA adapters are checked against these (see lorax_fn.pissa), not the base itself,
        # which the caller may donate or delete while the manager lives.
        self._base_sketches = None if base is None else base_sketches(base, self._pissa_paths())
        if base is not None:
            saved = set() if extra is None else set(select_extra(base, extra, {}))
            warn_unsaved(base, saved, f"the checkpoints in {self.directory}")
        self._best_metric = best_metric
        policies: list[Any] = [ocp.checkpoint_managers.LatestN(n=max_to_keep)]
        best_fn: Callable[[Any], float] | None = None
        if best_metric is not None:
            best_fn = lambda metrics: float(metrics[best_metric])  # noqa: E731
            policies.append(
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=best_fn,
                    reverse=best_mode == "min",
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            best_fn=best_fn,
            best_mode=best_mode,
            cleanup_tmp_directories=True,
            todelete_subdir=_DELETED,
            enable_async_checkpointing=async_save,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        )
        try:
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=options,
                item_handlers={
                    LORA_ITEM: ocp.StandardCheckpointHandler(),
                    OPT_ITEM: ocp.StandardCheckpointHandler(),
                    EXTRA_ITEM: ocp.StandardCheckpointHandler(),
                    META_ITEM: ocp.JsonCheckpointHandler(),
                },
            )
        except OSError as err:
            raise LoraError(
                f"cannot keep checkpoints in {self.directory}: {type(err).__name__}: {err}"
            ) from err
        self._purge_deleted()

    def _pissa_paths(self) -> set[str]:
        paths = self._base_leaves or {}
        if self._spec_json is None:
            return set(paths)  # no stored spec to hold trees to: any weight may be PiSSA's
        # Under another init, check_spec refuses PiSSA factors before they are compared.
        return spec_paths(self._spec, paths) if rewrites_base(self._spec.init) else set()

    def _check_pissa(self, meta: dict[str, Any], base: Any, where: str) -> None:
        if base is not None:
            check_pissa_base(meta, base, where)
        elif self._base_sketches is not None:
            check_pissa_base(meta, self._base_sketches, where, sketches=True)

    def _purge_deleted(self) -> None:
        # Only called with no save in flight: orbax renames into this folder while saving.
        if jax.process_index() == 0:
            shutil.rmtree(self.directory / _DELETED, ignore_errors=True)

    def latest_step(self) -> int | None:
        """The newest step, or ``None`` (with ``async_save``, possibly one still being written).

        Example:
            >>> import jax, jax.numpy as jnp, optax, lorax_fn
            >>> spec = lorax_fn.LoraSpec("w", rank=2)
            >>> base, lt = lorax_fn.split({"w": jnp.ones((8, 4))}, spec, key=jax.random.key(0))
            >>> with lorax_fn.LoraCheckpointManager("run", spec) as mngr:
            ...     print(mngr.latest_step())
            ...     mngr.save(1200, lt, optax.sgd(0.1).init(lt))
            ...     print(mngr.latest_step())
            None
            1200
        """
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the best ``best_metric`` (the latest step without one).

        Example:
            >>> import jax, jax.numpy as jnp, optax, lorax_fn
            >>> spec = lorax_fn.LoraSpec("w", rank=2)
            >>> base, lt = lorax_fn.split({"w": jnp.ones((8, 4))}, spec, key=jax.random.key(0))
            >>> with lorax_fn.LoraCheckpointManager("run", spec, best_metric="loss") as mngr:
            ...     for step, loss in ((800, 0.2), (1100, 0.5), (1200, 0.4)):
            ...         mngr.save(step, lt, (), metrics={"loss": loss})
            ...     print(mngr.best_step())
            800
        """
        return self._manager.best_step()

    def all_steps(self) -> list[int]:
        """Every committed step still kept, ascending.

        Example:
            >>> import jax, jax.numpy as jnp, optax, lorax_fn
            >>> spec = lorax_fn.LoraSpec("w", rank=2)
            >>> base, lt = lorax_fn.split({"w": jnp.ones((8, 4))}, spec, key=jax.random.key(0))
            >>> with lorax_fn.LoraCheckpointManager("run", spec, max_to_keep=3) as mngr:
            ...     for step in (500, 800, 1100, 1200):
            ...         mngr.save(step, lt, ())
            ...     print(mngr.all_steps())
            [800, 1100, 1200]
        """
        return sorted(self._manager.all_steps())

    def save(
        self,
        step: int,
        lora_tree: Mapping[str, Any],
        opt_state: Any,
        *,
        metrics: Mapping[str, float] | None = None,
        data_state: Any = None,
        base: Any = None,
    ) -> None:
        """Save one step. ``data_state`` must be JSON-able (e.g. an iterator position).

        Everything is validated (and, with ``base`` here or at construction, checked to
        fit it) before any file is written. A manager made with ``extra=`` saves those
        leaves of ``base`` (the current one: BatchNorm statistics change as you train),
        so ``base`` is then required. With ``async_save=True`` this returns once the
        arrays are copied to host memory; call :meth:`wait_until_finished` or :meth:`close`.

        Example:
            >>> import jax, jax.numpy as jnp, optax, lorax_fn
            >>> variables = {"params": {"w": jnp.ones((8, 4))},
            ...              "batch_stats": {"mean": jnp.ones(4)}}
            >>> spec = lorax_fn.LoraSpec("params/w", rank=2)
            >>> base, lt = lorax_fn.split(variables, spec, key=jax.random.key(0))
            >>> mngr = lorax_fn.LoraCheckpointManager("run", spec, extra="batch_stats/**")
            >>> mngr.save(100, lt, optax.adam(1e-3).init(lt), metrics={"loss": 1.7},
            ...           data_state={"index": 3200}, base=base)
            >>> mngr.save(100, lt, ())
            Traceback (most recent call last):
            ...
            lorax_fn.errors.LoraError: step 100 is already saved in ...run
            >>> info = lorax_fn.checkpoint.checkpoint_info("run/100")  # a step is a checkpoint
            >>> info.entries, info.extra
            ({'params/w': 'factors'}, {'batch_stats/mean': ((4,), 'float32')})
            >>> mngr.close()
        """
        step = int(step)
        if step in self._manager.all_steps():
            raise LoraError(f"step {step} is already saved in {self.directory}")
        base_leaves = self._base_leaves if base is None else leaf_specs(base)
        arrays, meta = encode(lora_tree, self._spec, base_leaves)
        self._check_pissa(meta, base, f"the LoRA tree of step {step}")
        if self._extra is not None and base is None:
            raise LoraError(
                f"step {step}: this manager saves extra={self._extra!r} from the base: "
                "pass base= to save()"
            )
        extra_leaves = {} if self._extra is None else select_extra(base, self._extra, lora_tree)
        if base is not None:
            warn_unsaved(base, set(extra_leaves), f"step {step} in {self.directory}")
        if metrics is not None:
            metrics = {str(k): float(v) for k, v in metrics.items()}
        if self._best_metric is not None and self._best_metric not in (metrics or {}):
            raise LoraError(
                f"step {step}: metrics {metrics} lack best_metric {self._best_metric!r}"
            )
        try:
            json.dumps(data_state)
        except (TypeError, ValueError) as err:
            raise LoraError(f"step {step}: data_state is not JSON-able: {err}") from None
        names, leaves = _opt_leaves(opt_state)
        extra_arrays, extra_infos = encode_extra(extra_leaves)
        meta |= {
            "step": step,
            "metrics": metrics,
            "data_state": data_state,
            "opt_state": [{"path": n} | array_info(x) for n, x in zip(names, leaves, strict=True)],
            "extra": extra_infos,
        }
        meta = seal(meta)
        self._manager.wait_until_finished()  # orbax's save would wait for it anyway
        self._purge_deleted()
        items = {LORA_ITEM: ocp.args.StandardSave(arrays), META_ITEM: ocp.args.JsonSave(meta)}
        if leaves:
            items[OPT_ITEM] = ocp.args.StandardSave({str(i): x for i, x in enumerate(leaves)})
        if extra_arrays:
            items[EXTRA_ITEM] = ocp.args.StandardSave(extra_arrays)
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(**items),
                metrics=metrics if self._best_metric is not None else None,
            )
        except OSError as err:
            raise LoraError(
                f"cannot write step {step} in {self.directory}: {type(err).__name__}: {err}"
            ) from err

    def restore(
        self,
        step: int | None = None,
        *,
        opt_state: Any = None,
        base: Any = None,
        shardings: Shardings = None,
        extra: bool = False,
        fallback: bool = False,
    ) -> TrainState:
        """Restore ``step`` (default: the latest) after validating it.

        ``opt_state`` is a template of the optimizer state (concrete, or abstract from
        ``jax.eval_shape(optimizer.init, lora_tree)``): its structure, shapes and dtypes
        must match the checkpoint. Each restored leaf goes where the template's leaf is
        (when that is a concrete sharding), else where the restored LoRA leaf it mirrors
        goes (``mu``/``nu`` of a factor follow that factor), else replicated like the
        LoRA tree (step counts). With ``opt_state=None`` only the LoRA tree is read.
        ``base`` (default: the manager's), ``shardings`` and ``extra`` work as in
        :func:`lorax_fn.restore`; with ``extra=True``, ``state.base`` is ``base`` with the
        step's saved extra leaves put in. The step must agree with the manager's spec (a
        plain-LoRA step under a spec of another adapter variant, or the reverse, is
        refused by path before any array is read).

        A damaged latest step (truncated, corrupted or edited files) is an error that
        says so; ``fallback=True`` instead resumes from the newest undamaged step, with
        a warning naming each damaged step skipped.

        Example:
            >>> import jax, jax.numpy as jnp, optax, lorax_fn
            >>> spec = lorax_fn.LoraSpec("w", rank=2)
            >>> base, lt = lorax_fn.split({"w": jnp.ones((8, 4))}, spec, key=jax.random.key(0))
            >>> tx = optax.adam(1e-2)
            >>> updates, opt_state = tx.update(jax.tree.map(jnp.ones_like, lt), tx.init(lt), lt)
            >>> with lorax_fn.LoraCheckpointManager("run", spec, base=base) as mngr:
            ...     mngr.save(1200, lt, opt_state, data_state={"index": 38400})
            ...     state = mngr.restore(opt_state=jax.eval_shape(tx.init, lt))
            >>> state.step, state.data_state, state.metrics
            (1200, {'index': 38400}, None)
            >>> mu = state.opt_state[0].mu["w"].a  # the optimizer state, as saved
            >>> bool((mu == opt_state[0].mu["w"].a).all()) and bool(mu.any())
            True
        """
        self._manager.wait_until_finished()  # an async save of the step asked for may be pending
        args = dict(opt_state=opt_state, base=base, shardings=shardings, extra=extra)
        if step is not None:
            if fallback:
                raise LoraError("fallback=True chooses the step itself; do not pass step=")
            return self._restore_step(int(step), **args)
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            raise LoraError(f"no checkpoint in {self.directory}")
        if not fallback:
            try:
                return self._restore_step(steps[0], **args)
            except CheckpointDamaged as err:
                if len(steps) == 1:
                    raise
                raise CheckpointDamaged(
                    f"{err}\n(pass fallback=True to resume from the newest undamaged step)"
                ) from err.__cause__
        skipped = []
        for candidate in steps:
            try:
                state = self._restore_step(candidate, **args)
            except CheckpointDamaged as err:
                skipped.append(str(err))
                continue
            if skipped:
                warnings.warn(
                    f"resuming from step {candidate}, skipping damaged newer steps:\n  "
                    + "\n  ".join(skipped),
                    UserWarning,
                    stacklevel=2,
                )
            return state
        raise CheckpointDamaged(
            f"every step in {self.directory} is damaged:\n  " + "\n  ".join(skipped)
        )

    def _restore_step(
        self, step: int, *, opt_state: Any, base: Any, shardings: Shardings, extra: bool
    ) -> TrainState:
        if step not in self._manager.all_steps():
            raise LoraError(f"no step {step} in {self.directory}; steps: {self.all_steps()}")
        where = f"step {step} in {self.directory}"
        try:
            with one_clear_error():
                meta = self._manager.restore(
                    step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()})
                )[META_ITEM]
        except Exception as err:  # orbax/tensorstore/json raise many types
            raise read_error(f"the metadata of {where}", err) from err
        if not isinstance(meta, dict) or "opt_state" not in meta:
            raise CheckpointDamaged(f"{where}: malformed metadata (not a training checkpoint)")
        check_entries(meta, where)
        if self._spec_json is not None:
            check_spec(meta, self._spec_json, where, "this manager's spec")
        base_leaves = self._base_leaves if base is None else leaf_specs(base)
        if base_leaves is not None:
            check_against_base(meta, base_leaves, where)
        self._check_pissa(meta, base, where)
        saved_extra = requested_extra(meta, extra, base, where, stacklevel=4)
        lora_target = abstract_lora(meta, shardings)
        items = {LORA_ITEM: ocp.args.StandardRestore(lora_target)}
        if opt_state is not None:
            abstract_opt = self._abstract_opt(meta, opt_state, lora_target, where)
            if abstract_opt:
                items[OPT_ITEM] = ocp.args.StandardRestore(abstract_opt)
        if saved_extra:
            items[EXTRA_ITEM] = ocp.args.StandardRestore(abstract_extra(saved_extra, base, where))
        try:
            with one_clear_error():
                restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as err:  # orbax/tensorstore raise many types
            raise read_error(where, err) from err
        lora_tree = decode(meta, restored[LORA_ITEM], where)
        new_opt = None
        if opt_state is not None:
            leaves = []
            for i, info in enumerate(meta["opt_state"]):
                x = restored[OPT_ITEM][str(i)]
                verify_array(f"opt_state{info['path']}", info, x, where)
                leaves.append(x)
            new_opt = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(opt_state), leaves)
        new_base = None
        if extra:
            new_base = (
                apply_extra(saved_extra, restored[EXTRA_ITEM], base, where) if saved_extra else base
            )
        return TrainState(
            step=int(meta["step"]),
            lora_tree=lora_tree,
            opt_state=new_opt,
            data_state=meta["data_state"],
            metrics=meta["metrics"],
            base=new_base,
        )

    @staticmethod
    def _abstract_opt(
        meta: dict[str, Any], template: Any, lora_target: dict[str, Any], where: str
    ) -> dict[str, Any]:
        saved = meta["opt_state"]
        names, leaves = _opt_leaves(template)
        if names != [s["path"] for s in saved]:
            missing = sorted(set(s["path"] for s in saved) - set(names))
            extra = sorted(set(names) - set(s["path"] for s in saved))
            raise LoraError(
                f"{where}: the opt_state template does not match the saved "
                f"optimizer state: saved-only leaves {missing}, template-only "
                f"leaves {extra} (same optimizer and LoRA tree?)"
            )
        # Where each restored LoRA array goes, by (path, "a" | "b" | extra's name | None).
        placed: dict[tuple[str, str | None], jax.ShapeDtypeStruct] = {}
        for i, e in enumerate(meta["entries"]):
            target = lora_target[str(i)]
            if e["kind"] == "factors":
                placed |= {(e["path"], r): x for r, x in target.items()}
            elif e["kind"] == "subset":
                for k, part in target.items():
                    placed |= {(e["path"], f"{k}.{r}"): x for r, x in part.items()}
            else:
                placed[(e["path"], None)] = target
        first = next(iter(placed.values())).sharding
        replicated = (
            jax.sharding.NamedSharding(first.mesh, jax.sharding.PartitionSpec())
            if isinstance(first, jax.sharding.NamedSharding)
            else first
            if isinstance(first, jax.sharding.SingleDeviceSharding)
            else default_sharding()
        )
        keys = [k for k, _ in jax.tree_util.tree_flatten_with_path(template)[0]]
        out = {}
        for i, (name, key, leaf, info) in enumerate(zip(names, keys, leaves, saved, strict=True)):
            shape, dtype = tuple(np.shape(leaf)), np.dtype(leaf.dtype).name
            if shape != tuple(info["shape"]) or dtype != info["dtype"]:
                raise LoraError(
                    f"{where}: opt_state{name} is {tuple(info['shape'])} "
                    f"{info['dtype']} in the checkpoint, {shape} {dtype} in the "
                    "template"
                )
            sharding = getattr(leaf, "sharding", None)
            if not _concrete(sharding):
                mirrored = placed.get(_lora_key(key) or ("", "none"))
                sharding = (
                    mirrored.sharding
                    if mirrored is not None and mirrored.shape == shape
                    else replicated
                )
            out[str(i)] = jax.ShapeDtypeStruct(shape, np.dtype(dtype), sharding=sharding)
        return out

    def wait_until_finished(self) -> None:
        """Block until an async save has been committed.

        Example:
            >>> import jax, jax.numpy as jnp, optax, lorax_fn
            >>> spec = lorax_fn.LoraSpec("w", rank=2)
            >>> base, lt = lorax_fn.split({"w": jnp.ones((8, 4))}, spec, key=jax.random.key(0))
            >>> mngr = lorax_fn.LoraCheckpointManager("run", spec, async_save=True)
            >>> mngr.save(1, lt, ())  # returns once the arrays are copied to host memory
            >>> mngr.wait_until_finished()
            >>> mngr.all_steps(), lorax_fn.checkpoint.checkpoint_info("run/1").entries
            ([1], {'w': 'factors'})
            >>> mngr.close()
        """
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release orbax's resources.

        Example:
            >>> import jax, jax.numpy as jnp, optax, lorax_fn
            >>> spec = lorax_fn.LoraSpec("w", rank=2)
            >>> base, lt = lorax_fn.split({"w": jnp.ones((8, 4))}, spec, key=jax.random.key(0))
            >>> mngr = lorax_fn.LoraCheckpointManager("run", spec, async_save=True)
            >>> mngr.save(1, lt, ())
            >>> mngr.close()  # waits for the save
            >>> with lorax_fn.LoraCheckpointManager("run", spec) as reopened:
            ...     print(reopened.all_steps())
            [1]
        """
        self._manager.close()
        self._purge_deleted()

    def __enter__(self) -> LoraCheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
