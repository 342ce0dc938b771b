"""A deterministic text-classification data set made from Python's own standard library.

Each example is one docstring (module, class or function) from the CPython standard library
source that ships with the interpreter; its label is the top-level package it comes from,
e.g. ``asyncio`` or ``email``. The sources are parsed with :mod:`ast`, never imported, so
nothing is executed and packages whose C extensions are missing (``tkinter`` without Tk)
still contribute. No download is needed.

The task is learnable but not trivial: docstrings are short, technical and share a lot of
vocabulary across packages ("Return the ...", "socket", "file"), and ``tkinter`` vs
``idlelib`` (IDLE is built on tkinter) are deliberately confusable.

The text comes from the running interpreter's standard library, so the exact examples
depend on the Python minor version (all default packages exist from 3.11 on). For a given
interpreter, ``seed`` and the arguments fully determine the result.

Example::

    from examples.text_data import load_dataset, tokenize_examples
    train, val, label_names = load_dataset(num_classes=6, max_examples_per_class=200)
    batch = tokenize_examples(train, max_len=128)   # input_ids, attention_mask, ..., labels
"""

from __future__ import annotations

import ast
import functools
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# Ordered: ``num_classes=k`` takes the first k. All have >= 148 distinct docstrings on 3.11.
DEFAULT_PACKAGES = (
    "asyncio",
    "email",
    "importlib",
    "logging",
    "xml",
    "tkinter",
    "idlelib",
    "multiprocessing",
    "unittest",
)
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)

Example = tuple[str, int]


def stdlib_dir() -> Path:
    """Directory holding the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


@functools.cache
def package_docstrings(package: str, min_chars: int = 40) -> tuple[str, ...]:
    """Sorted, de-duplicated, whitespace-normalised docstrings of one stdlib package.

    Test suites inside the package are skipped (they document tests, not the package).

    Example::

        docs = package_docstrings("json")
        len(docs) > 10, docs[0][:30]
    """
    root = stdlib_dir() / package
    if not (root / "__init__.py").is_file():
        raise ValueError(f"{package!r} is not a package in {stdlib_dir()}")
    docs = set()
    for path in sorted(root.rglob("*.py")):
        if _TEST_DIRS.intersection(path.relative_to(root).parts):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, _DOC_NODES) and (doc := ast.get_docstring(node)):
                text = " ".join(doc.split())
                if len(text) >= min_chars:
                    docs.add(text)
    return tuple(sorted(docs))


def load_dataset(
    num_classes: int = 6,
    max_examples_per_class: int = 200,
    seed: int = 0,
    val_fraction: float = 0.2,
    packages: Sequence[str] | None = None,
    min_chars: int = 40,
) -> tuple[list[Example], list[Example], list[str]]:
    """Balanced, stratified train/validation split of stdlib docstrings labelled by package.

    Every class gets exactly ``n = min(max_examples_per_class, smallest class size)``
    examples, of which ``round(n * val_fraction)`` go to validation. A docstring that occurs
    in two packages (e.g. a copied helper) is dropped from both, so identical texts never
    carry different labels and train/validation never share a text.

    Args:
        num_classes: how many of ``packages`` to use (the first ones).
        max_examples_per_class: cap per class before the split.
        seed: seeds the per-class shuffles and the final order; same seed, same split.
        val_fraction: share of each class held out for validation.
        packages: stdlib package names, defaults to :data:`DEFAULT_PACKAGES`.
        min_chars: docstrings shorter than this (after whitespace normalisation) are skipped.

    Returns:
        ``(train, val, label_names)``; ``train``/``val`` are lists of ``(text, label)`` with
        ``label`` an index into ``label_names``.

    Example::

        train, val, names = load_dataset(num_classes=4, max_examples_per_class=100)
        len(train), len(val), names   # (320, 80, ['asyncio', 'email', 'importlib', 'logging'])
    """
    names = list(packages if packages is not None else DEFAULT_PACKAGES)
    if not 2 <= num_classes <= len(names):
        raise ValueError(f"num_classes must be in [2, {len(names)}]; got {num_classes}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction}")
    names = names[:num_classes]
    per_class = {name: set(package_docstrings(name, min_chars)) for name in names}
    counts: dict[str, int] = {}
    for docs in per_class.values():
        for doc in docs:
            counts[doc] = counts.get(doc, 0) + 1
    per_class = {
        name: sorted(doc for doc in docs if counts[doc] == 1) for name, docs in per_class.items()
    }

    n = min(max_examples_per_class, *(len(docs) for docs in per_class.values()))
    n_val = round(n * val_fraction)
    if n_val < 1 or n - n_val < 1:
        raise ValueError(f"{n} examples per class is too few to split with {val_fraction=}")

    rng = np.random.default_rng(seed)
    train: list[Example] = []
    val: list[Example] = []
    for label, name in enumerate(names):
        docs = per_class[name]
        chosen = [docs[k] for k in rng.permutation(len(docs))[:n]]
        val.extend((text, label) for text in chosen[:n_val])
        train.extend((text, label) for text in chosen[n_val:])
    # Interleave classes so that any prefix of train is roughly balanced.
    train = [train[k] for k in rng.permutation(len(train))]
    val = [val[k] for k in rng.permutation(len(val))]
    return train, val, names


def tokenize_examples(examples: Sequence[Example], max_len: int = 128) -> dict[str, np.ndarray]:
    """Tokenizes ``(text, label)`` pairs with the MiniLM tokenizer of ``examples/bert.py``.

    Returns ``input_ids``, ``attention_mask``, ``token_type_ids`` (``(N, max_len)`` int32)
    and ``labels`` (``(N,)`` int32).

    Example::

        batch = tokenize_examples(train[:8], max_len=64)
        batch["input_ids"].shape, batch["labels"]   # (8, 64), array([...])
    """
    try:
        from examples.bert import tokenize
    except ModuleNotFoundError:  # run as a script from inside examples/
        from bert import tokenize  # type: ignore[import-not-found, no-redef]

    batch = tokenize([text for text, _ in examples], max_len=max_len)
    batch["labels"] = np.asarray([label for _, label in examples], dtype=np.int32)
    return batch
