"""Resumable training checkpoints: LoRA tree + optimizer state + step (+ data position).

:class:`LoraCheckpointManager` builds on orbax's ``CheckpointManager``: each step
directory holds the ``lora`` and ``lorax_fn`` items of
:mod:`lorax_fn.checkpoint_format` plus an ``opt_state`` item (the optimizer
state's leaves, keyed by leaf index), and the metadata also records the step,
metrics, data-iterator state and each optimizer leaf's shape, dtype and SHA-256.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import numpy as np
import orbax.checkpoint as ocp

from lorax_fn.checkpoint_format import (
    LORA_ITEM,
    META_ITEM,
    OPT_ITEM,
    Shardings,
    abstract_lora,
    array_info,
    check_against_base,
    check_entries,
    checkpoint_path,
    decode,
    encode,
    leaf_specs,
    read_error,
    verify_array,
)
from lorax_fn.errors import LoraError
from lorax_fn.spec import LoraSpec

# orbax deletes old steps with a plain rmtree, so a kill mid-delete would leave a broken
# step under its final name; renaming it here first (atomic) and purging later avoids that.
_DELETED = "_lorax_deleted"


@dataclasses.dataclass(frozen=True)
class TrainState:
    """What :meth:`LoraCheckpointManager.restore` returns."""

    step: int
    lora_tree: dict[str, Any]
    opt_state: Any
    data_state: Any
    metrics: dict[str, float] | None


def _opt_leaves(opt_state: Any) -> tuple[list[str], list[Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(opt_state)
    # Python scalars in custom states become 0-d arrays, which orbax and JSON both describe.
    leaves = [leaf if hasattr(leaf, "dtype") else np.asarray(leaf) for _, leaf in flat]
    return [jax.tree_util.keystr(k) for k, _ in flat], leaves


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
    A step directory is also a valid :func:`lorax_fn.restore` / :func:`lorax_fn.checkpoint_info`
    target.

    Example:
        >>> mngr = lorax_fn.LoraCheckpointManager("/tmp/run", spec, base=base,  # doctest: +SKIP
        ...                                       max_to_keep=2, best_metric="loss")
        >>> if mngr.latest_step() is not None:  # doctest: +SKIP
        ...     state = mngr.restore(opt_state=opt_state)
        ...     lt, opt_state, start = state.lora_tree, state.opt_state, state.step
        >>> mngr.save(step, lt, opt_state, metrics={"loss": 0.3},  # doctest: +SKIP
        ...           data_state={"epoch": 1, "index": 512})
        >>> mngr.close()  # doctest: +SKIP
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
    ) -> None:
        if max_to_keep < 1 or keep_best < 1:
            raise LoraError(
                f"max_to_keep and keep_best must be >= 1, got {max_to_keep}, {keep_best}"
            )
        if best_mode not in ("min", "max"):
            raise LoraError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        self.directory = checkpoint_path(directory)
        self._spec = spec
        self._base_leaves = None if base is None else leaf_specs(base)
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
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                LORA_ITEM: ocp.StandardCheckpointHandler(),
                OPT_ITEM: ocp.StandardCheckpointHandler(),
                META_ITEM: ocp.JsonCheckpointHandler(),
            },
        )
        self._purge_deleted()

    def _purge_deleted(self) -> None:
        # Only called with no save in flight: orbax renames into this folder while saving.
        if jax.process_index() == 0:
            shutil.rmtree(self.directory / _DELETED, ignore_errors=True)

    def latest_step(self) -> int | None:
        """The newest step, or ``None`` (with ``async_save``, possibly one still being written).

        Example:
            >>> mngr.latest_step()  # doctest: +SKIP
            1200
        """
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the best ``best_metric`` (the latest step without one).

        Example:
            >>> mngr.best_step()  # doctest: +SKIP
            800
        """
        return self._manager.best_step()

    def all_steps(self) -> list[int]:
        """Every committed step still kept, ascending.

        Example:
            >>> mngr.all_steps()  # doctest: +SKIP
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
    ) -> None:
        """Save one step. ``data_state`` must be JSON-able (e.g. an iterator position).

        Everything is validated (and, with ``base``, checked to fit it) before any
        file is written. With ``async_save=True`` this returns once the arrays are
        copied to host memory; call :meth:`wait_until_finished` or :meth:`close`.

        Example:
            >>> mngr.save(100, lt, opt_state, metrics={"loss": 1.7},  # doctest: +SKIP
            ...           data_state={"index": 3200})
        """
        step = int(step)
        if step in self._manager.all_steps():
            raise LoraError(f"step {step} is already saved in {self.directory}")
        arrays, meta = encode(lora_tree, self._spec, self._base_leaves)
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
        meta |= {
            "step": step,
            "metrics": metrics,
            "data_state": data_state,
            "opt_state": [{"path": n} | array_info(x) for n, x in zip(names, leaves, strict=True)],
        }
        self._manager.wait_until_finished()  # orbax's save would wait for it anyway
        self._purge_deleted()
        items = {LORA_ITEM: ocp.args.StandardSave(arrays), META_ITEM: ocp.args.JsonSave(meta)}
        if leaves:
            items[OPT_ITEM] = ocp.args.StandardSave({str(i): x for i, x in enumerate(leaves)})
        self._manager.save(
            step,
            args=ocp.args.Composite(**items),
            metrics=metrics if self._best_metric is not None else None,
        )

    def restore(
        self,
        step: int | None = None,
        *,
        opt_state: Any = None,
        base: Any = None,
        shardings: Shardings = None,
    ) -> TrainState:
        """Restore ``step`` (default: the latest) after validating it.

        ``opt_state`` is a template of the optimizer state (concrete, or abstract from
        ``jax.eval_shape(optimizer.init, lora_tree)``): its structure, shapes and dtypes
        must match the checkpoint, and its leaves' shardings (if any) place the restored
        leaves. With ``opt_state=None`` only the LoRA tree is read. ``base`` (default:
        the manager's) and ``shardings`` work as in :func:`lorax_fn.restore`.

        Example:
            >>> state = mngr.restore(opt_state=jax.eval_shape(tx.init, lt))  # doctest: +SKIP
            >>> state.step, state.data_state  # doctest: +SKIP
            (1200, {'index': 38400})
        """
        self._manager.wait_until_finished()  # an async save of the step asked for may be pending
        if step is None:
            step = self.latest_step()
            if step is None:
                raise LoraError(f"no checkpoint in {self.directory}")
        if step not in self._manager.all_steps():
            raise LoraError(f"no step {step} in {self.directory}; steps: {self.all_steps()}")
        where = f"step {step} in {self.directory}"
        try:
            meta = self._manager.restore(
                step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()})
            )[META_ITEM]
        except Exception as err:  # orbax/tensorstore/json raise many types
            raise read_error(f"the metadata of {where}", err) from err
        if not isinstance(meta, dict) or "opt_state" not in meta:
            raise LoraError(f"{where}: malformed metadata (not a training checkpoint)")
        check_entries(meta, where)
        base_leaves = self._base_leaves if base is None else leaf_specs(base)
        if base_leaves is not None:
            check_against_base(meta, base_leaves, where)
        items = {LORA_ITEM: ocp.args.StandardRestore(abstract_lora(meta, shardings))}
        if opt_state is not None:
            abstract_opt = self._abstract_opt(meta["opt_state"], opt_state, where)
            if abstract_opt:
                items[OPT_ITEM] = ocp.args.StandardRestore(abstract_opt)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as err:  # orbax/tensorstore raise many types; all mean unreadable
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
        return TrainState(
            step=int(meta["step"]),
            lora_tree=lora_tree,
            opt_state=new_opt,
            data_state=meta["data_state"],
            metrics=meta["metrics"],
        )

    @staticmethod
    def _abstract_opt(saved: list[dict[str, Any]], template: Any, where: str) -> dict[str, Any]:
        names, leaves = _opt_leaves(template)
        if names != [s["path"] for s in saved]:
            missing = sorted(set(s["path"] for s in saved) - set(names))
            extra = sorted(set(names) - set(s["path"] for s in saved))
            raise LoraError(
                f"{where}: the opt_state template does not match the saved "
                f"optimizer state: saved-only leaves {missing}, template-only "
                f"leaves {extra} (same optimizer and LoRA tree?)"
            )
        out = {}
        for i, (name, leaf, info) in enumerate(zip(names, leaves, saved, strict=True)):
            shape, dtype = tuple(np.shape(leaf)), np.dtype(leaf.dtype).name
            if shape != tuple(info["shape"]) or dtype != info["dtype"]:
                raise LoraError(
                    f"{where}: opt_state{name} is {tuple(info['shape'])} "
                    f"{info['dtype']} in the checkpoint, {shape} {dtype} in the "
                    "template"
                )
            sharding = getattr(leaf, "sharding", None) or jax.sharding.SingleDeviceSharding(
                jax.devices()[0]
            )
            out[str(i)] = jax.ShapeDtypeStruct(shape, np.dtype(dtype), sharding=sharding)
        return out

    def wait_until_finished(self) -> None:
        """Block until an async save has been committed.

        Example:
            >>> mngr.wait_until_finished()  # doctest: +SKIP
        """
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release orbax's resources.

        Example:
            >>> mngr.close()  # doctest: +SKIP
        """
        self._manager.close()
        self._purge_deleted()

    def __enter__(self) -> LoraCheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
