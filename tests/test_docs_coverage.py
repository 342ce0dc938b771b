"""Every public name has an entry in the API reference (docs/api/*.md).

A new public name without documentation fails here, in the test suite, before the docs
build (scripts/docs.sh) would silently leave it out. Pure Python: no Sphinx needed.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import lorax_fn

API = Path(__file__).resolve().parent.parent / "docs" / "api"

# The modules whose public names users reach: the top level, each wing, and the helper
# modules the top level exports or the docs send users to.
MODULES = [
    "lorax_fn",
    "lorax_fn.transform",
    "lorax_fn.variants",
    "lorax_fn.quant",
    "lorax_fn.multi",
    "lorax_fn.checkpoint",
    "lorax_fn.peft",
    "lorax_fn.peft.presets",
    "lorax_fn.conventions",
    "lorax_fn.sharding",
    "lorax_fn.parallel",
    "lorax_fn.analysis",
    "lorax_fn.inits",
]

# `.. autofunction:: lorax_fn.split` and its kin, with the option lines that follow.
_DIRECTIVE = re.compile(
    r"^\.\. auto(module|class|function|data|exception|attribute)::\s+(\S+)\n"
    r"((?:[ \t]+:[\w-]+:.*\n)*)",
    re.MULTILINE,
)


def public_names(module: ModuleType) -> list[str]:
    """``__all__``, or else the names the module itself defines without a leading ``_``."""
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == module.__name__
    ]


def resolve(dotted: str, module: bool = False) -> Any:
    """The object ``dotted`` names, read as autodoc reads it.

    A module is imported; anything else is an attribute of the longest importable prefix
    of its parent (``lorax_fn.merge`` is the function, not the module it is defined in).
    """
    if module:
        return importlib.import_module(dotted)
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            value = getattr(value, attr)
        return value
    raise ImportError(dotted)


def documented() -> list[Any]:
    """Every object an autodoc directive of docs/api/*.md documents.

    ``automodule`` with ``:members:`` documents the module's public names too, as autodoc
    does.
    """
    objects = []
    for page in sorted(API.glob("*.md")):
        for kind, target, options in _DIRECTIVE.findall(page.read_text()):
            value = resolve(target, module=kind == "module")
            objects.append(value)
            if kind == "module" and "members" in re.findall(r":([\w-]+):", options):
                objects += [getattr(value, name) for name in public_names(value)]
    return objects


def _present(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.parametrize("module", [m for m in MODULES if _present(m)])
def test_every_public_name_is_in_the_api_reference(module: str) -> None:
    mod = importlib.import_module(module)
    ids = {id(obj) for obj in documented()}
    missing = [name for name in public_names(mod) if id(getattr(mod, name)) not in ids]
    assert not missing, (
        f"{module}: {missing} are public but have no autodoc entry in docs/api/*.md "
        "(add an `.. autofunction::`/`.. autoclass::` line to the wing's page)"
    )


def test_only_members_documents_a_modules_names(tmp_path, monkeypatch) -> None:
    # `:no-members:` must not count as `:members:` (it contains the string).
    page = ".. automodule:: lorax_fn.multi\n   :no-members:\n"
    monkeypatch.setattr(__import__(__name__), "API", tmp_path)
    (tmp_path / "p.md").write_text(page)
    assert documented() == [lorax_fn.multi]
    (tmp_path / "p.md").write_text(page.replace("no-members", "members"))
    assert lorax_fn.multi.combine in documented()


def test_the_resolver_finds_lazy_wings_and_top_level_names() -> None:
    # The top level's lazy names (lorax_fn.save) are the wing's objects, so documenting
    # lorax_fn.checkpoint.save covers lorax_fn.save.
    assert resolve("lorax_fn.checkpoint.save") is lorax_fn.save
    assert resolve("lorax_fn.split") is lorax_fn.split
    assert resolve("lorax_fn.multi", module=True) is lorax_fn.multi
    assert resolve("lorax_fn.merge") is lorax_fn.merge  # not the module lorax_fn.merge
