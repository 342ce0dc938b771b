"""Read failures of a checkpoint: damaged files versus everything else, told once.

Damaged files (missing, short, unparsable, or failing their SHA-256) raise
:class:`CheckpointDamaged`, defined here, at the bottom of the wing; any other
orbax failure (placement, a dead peer) is a :class:`LoraError` naming the directory with
its cause chained. orbax's abandoned reads print their own tracebacks after the error
has been raised; :func:`one_clear_error` keeps those out of the user's stderr.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any

from lorax_fn.errors import LoraError


class CheckpointDamaged(LoraError):
    """A checkpoint whose files are truncated, corrupted or edited (not a caller error).

    :meth:`lorax_fn.LoraCheckpointManager.restore` with ``fallback=True`` skips steps
    that raise it.

    Example:
        >>> issubclass(CheckpointDamaged, LoraError)
        True
    """


# tensorstore/orbax texts that mean the files are missing, short or unparsable.
_DAMAGE_MARKERS = (
    "OUT_OF_RANGE",
    "NOT_FOUND",
    "DATA_LOSS",
    "not compatible with the stored shape",
    "was not found in the checkpoint",
)


def _chain(err: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    todo = [err]
    while todo:
        e = todo.pop()
        if e is None or any(e is seen for seen in out):
            continue
        out.append(e)
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    return out


def read_error(where: str, err: BaseException) -> LoraError:
    """The :class:`LoraError` to raise when orbax fails to read (part of) a checkpoint.

    Missing, short or unparsable files give :class:`CheckpointDamaged` ("truncated or
    corrupted"); any other failure (a placement error, a dead peer process) names its
    cause instead. Raise it ``from err``: the chained cause keeps its type and message
    but not orbax's traceback, whose frames keep failed reads alive.

    Example:
        >>> print(read_error("/x", OSError("DATA_LOSS: short read")))
        /x is truncated or corrupted; could not read it: OSError: DATA_LOSS: short read
        >>> print(read_error("/x", RuntimeError("DEADLINE_EXCEEDED: barrier")))
        could not restore /x (not a sign of damaged files): RuntimeError: DEADLINE_EXCEEDED: barrier
    """
    chain = _chain(err)
    for e in chain:
        e.__traceback__ = None
    cause = f"{type(err).__name__}: {str(err)[:500]}"
    if any(
        isinstance(e, FileNotFoundError | json.JSONDecodeError)
        or any(marker in str(e) for marker in _DAMAGE_MARKERS)
        for e in chain
    ):
        return CheckpointDamaged(f"{where} is truncated or corrupted; could not read it: {cause}")
    return LoraError(f"could not restore {where} (not a sign of damaged files): {cause}")


class _DropOrbaxLeftovers(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage() + repr(record.exc_info)
        return not ("never retrieved" in text and ("tensorstore" in text or "orbax" in text))


def _from_orbax(unraisable: Any) -> bool:
    files = [getattr(getattr(unraisable.object, "cr_code", None), "co_filename", "")]
    tb = unraisable.exc_traceback
    while tb is not None:
        files.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    return any(f"{os.sep}orbax{os.sep}" in f for f in files)


def _closed_loop_leftover(exc_type: type, exc: BaseException, tb: Any) -> bool:
    if not (exc_type is RuntimeError and str(exc) == "Event loop is closed"):
        return False
    names = []
    while tb is not None:
        names.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    # Raised straight from a foreign thread's callback: no Python caller above it.
    return names[:1] == ["call_soon_threadsafe"]


def _mute_orbax_leftovers() -> None:
    """Install (once) filters for exactly what orbax's abandoned reads print, nothing else."""
    if getattr(sys.unraisablehook, "lorax_fn_filter", False):
        return
    unraisablehook = sys.unraisablehook

    def unraisable_hook(u: Any) -> None:
        if not (_from_orbax(u) or _closed_loop_leftover(u.exc_type, u.exc_value, u.exc_traceback)):
            unraisablehook(u)

    unraisable_hook.lorax_fn_filter = True  # type: ignore[attr-defined]
    sys.unraisablehook = unraisable_hook
    # tensorstore reports a callback's error on its own thread through PyErr_Print,
    # which goes to sys.excepthook rather than the unraisable hook.
    excepthook = sys.excepthook

    def except_hook(exc_type: type, exc: BaseException, tb: Any) -> None:
        if not _closed_loop_leftover(exc_type, exc, tb):
            excepthook(exc_type, exc, tb)

    sys.excepthook = except_hook
    logging.getLogger("asyncio").addFilter(_DropOrbaxLeftovers())


@contextlib.contextmanager
def one_clear_error() -> Iterator[None]:
    """Keep a failed orbax read from printing anything besides the LoraError raised for it.

    When a read fails, orbax abandons the others: their coroutines, futures and
    tensorstore callbacks finish or are garbage-collected later, each printing a
    traceback ("Future exception was never retrieved", "Exception ignored in
    <coroutine ...>", "RuntimeError: Event loop is closed"), possibly after the error
    has been raised, and tensorstore's callbacks may print from their own threads
    before the error even reaches this frame. So every read runs behind filters for
    exactly those messages (orbax coroutines, tensorstore errors nobody retrieved,
    asyncio's closed-loop error in ``call_soon_threadsafe``), installed once in front
    of ``sys.unraisablehook`` and the ``asyncio`` logger; everything else passes
    through.

    Example:
        >>> with one_clear_error():
        ...     pass
    """
    _mute_orbax_leftovers()
    try:
        yield
    except BaseException:
        with warnings.catch_warnings():  # the abandoned coroutines orbax never started
            warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
            gc.collect()
        raise
