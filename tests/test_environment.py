"""The test environment itself: where scripts/test.sh installed PyTorch + PEFT, the parity
tests in tests/test_peft.py must run, so a broken install cannot turn them into skips."""

import importlib.util
import os

import pytest


@pytest.mark.skipif(
    os.environ.get("LORAX_FN_REQUIRE_PARITY") != "1",
    reason="only where scripts/test.sh installed the parity extra",
)
@pytest.mark.parametrize("module", ["torch", "peft", "transformers"])
def test_parity_dependencies_are_importable(module: str) -> None:
    assert importlib.util.find_spec(module) is not None, (
        f"{module} is missing: `pip install -e '.[parity]'` (scripts/test.sh does)"
    )
