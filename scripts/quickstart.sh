#!/usr/bin/env bash
# Install the library into .venv and run the quickstart end to end (README: "Try it").
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e .
.venv/bin/python examples/quickstart.py
