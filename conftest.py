"""Doctest setup: every docstring example runs in a fresh, empty working directory.

The checkpoint, PEFT and plotting examples write files under relative paths
(``lorax_fn.save("adapter", ...)``); running each in its own temporary directory lets
them run for real on every test run instead of being skipped, and leaves nothing behind.
"""

import pytest


@pytest.fixture(autouse=True)
def _doctest_in_tmp_dir(request: pytest.FixtureRequest, tmp_path, monkeypatch) -> None:
    if isinstance(request.node, pytest.DoctestItem):
        monkeypatch.chdir(tmp_path)
