"""`import lorax_fn` loads no checkpoint or PEFT machinery until it is used (issue #20)."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("orbax", "tensorstore", "safetensors")


def _run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    return result.stdout.strip()


def test_import_loads_neither_orbax_nor_tensorstore_nor_safetensors():
    loaded = _run(
        "import sys, jax, lorax_fn; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))"
    )
    assert loaded == "[]"


@pytest.mark.parametrize(
    ("name", "module", "heavy"),
    [
        ("save", "lorax_fn.checkpoint", "orbax"),
        ("LoraCheckpointManager", "lorax_fn.checkpoint", "orbax"),
        ("import_peft", "lorax_fn.peft", "safetensors"),
    ],
)
def test_the_wings_load_when_first_used(name, module, heavy):
    out = _run(
        "import sys, importlib, lorax_fn; "
        f"before = {heavy!r} in sys.modules; "
        f"from lorax_fn import {name}; "
        f"same = {name} is getattr(importlib.import_module({module!r}), {name!r}); "
        f"print(before, {heavy!r} in sys.modules, same, {name!r} in dir(lorax_fn))"
    )
    assert out == "False True True True"


def test_an_unknown_name_is_an_attribute_error():
    import lorax_fn

    with pytest.raises(AttributeError, match="no attribute 'sav'"):
        lorax_fn.sav  # noqa: B018
