#!/usr/bin/env bash
# Build the documentation site into docs/_build/html, strictly: any Sphinx warning (a
# docstring docutils cannot read, a broken cross-reference, a page in no toctree) fails.
# Uses the same .venv as scripts/test.sh (created here if missing), adding the `docs`
# extra: Sphinx, MyST-parser, sphinx-book-theme, matplotlib for the benchmark figures.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[docs]'
.venv/bin/sphinx-build -W --keep-going -q -b html docs docs/_build/html "$@"
echo "docs: built docs/_build/html/index.html"
