"""The package tree reads as the architecture: imports go down, never to the root, no cycles.

Ranks, bottom up: the core's vocabulary (errors, paths, factors, spec, ...), quantized
arrays, the variant protocol (variants.base), the core flow (merge, optim, ...)
beside the variants themselves (DoRA builds on merge; the core reaches a variant through
the registry only), the transform beside the inits (EVA/CorDA read the function with the
transform's primitive table), then split (it reads layouts off the function through
the transform's inference) beside the wings. A module may import its own
subpackage and anything of a lower rank; two wings of one rank never import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lorax_fn"
VOCABULARY = {"errors", "version", "paths", "factors", "spec", "conventions"}
RANKS = {"quant": 1, "transform": 4, "inits": 4, "split": 5, "peft": 5, "checkpoint": 5, "multi": 6}
PROTOCOL = "lorax_fn.variants.base"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The lorax_fn modules ``path`` imports at module level or inside functions."""
    found = set()
    tree = ast.parse(path.read_text())
    # Imports for type annotations only (`if TYPE_CHECKING:`) are never executed.
    typing_only = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test).endswith("TYPE_CHECKING")
        for stmt in block.body
        for n in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "lorax_fn"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "lorax_fn":
                continue
            found.add(node.module)
            # `from lorax_fn.quant import nf4` imports the submodule lorax_fn.quant.nf4.
            for alias in node.names:
                sub = PACKAGE.parent / (node.module.replace(".", "/") + f"/{alias.name}")
                if sub.with_suffix(".py").exists() or sub.is_dir():
                    found.add(f"{node.module}.{alias.name}")
    return found


MODULES = {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def _unit(module: str) -> str:
    """The subpackage a module belongs to, or the top-level module's own name."""
    return module.split(".")[1] if module != "lorax_fn" else "lorax_fn"


def _rank(module: str) -> int:
    if module == PROTOCOL:
        return 2
    unit = _unit(module)
    return 0 if unit in VOCABULARY else RANKS.get(unit, 3)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "lorax_fn"))
def test_no_module_imports_the_package_root(module):
    assert "lorax_fn" not in MODULES[module]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down(module):
    if module == "lorax_fn":
        return  # the root re-exports the public API
    up = [
        m
        for m in MODULES[module]
        if m != "lorax_fn"
        and (_unit(m) != _unit(module) or _rank(m) > _rank(module))
        and (_rank(m) > _rank(module) or (_rank(m) == _rank(module) and _rank(m) in (1, 2, 5)))
    ]
    assert not up, f"{module} imports {up}, which are not below it"


def test_no_import_cycles():
    graph = {m: {i for i in imports if i in MODULES} for m, imports in MODULES.items()}
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> None:
        if state.get(m) == 2:
            return
        assert state.get(m) != 1, " -> ".join([*trail, m])
        state[m] = 1
        for n in sorted(graph[m]):
            if n != m and not n.startswith(m + "."):  # a package's __init__ imports its modules
                visit(n, [*trail, m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _unit(m) != "variants"))
def test_variants_are_reached_through_the_registry(module):
    # Only the root (for the public DoRA helpers) imports a variant's own module; every
    # other module asks lorax_fn.variants.base.get(name), so no wing names a variant.
    if module == "lorax_fn":
        return
    named = [m for m in MODULES[module] if m.startswith("lorax_fn.variants.") and m != PROTOCOL]
    assert not named, f"{module} imports {named}"
