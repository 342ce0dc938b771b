#!/usr/bin/env bash
# The JAX model zoos as lorax_fn users (run by .ci/run): a separate venv, .venv-zoo, so
# that the core install stays small. Installs lorax_fn with its test, parity and zoo
# extras (the zoo extra in pyproject.toml is the one place to add a zoo's dependencies),
# then the packages in NO_DEPS below without their declared dependencies; runs every
# examples/zoo/*.py with --smoke, then tests/zoo, where a skip is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

# google-tunix declares its whole training stack (tensorflow-datasets, grain, datasets,
# numba, kagglehub, ...); its models import only what the zoo extra lists.
# gemma declares kauldron's whole stack (tensorflow, tfds, grain, xmanager, ...); its Gemma3
# imports kauldron's typing and kd modules only (examples/zoo/gemma3_linen.py).
NO_DEPS=("google-tunix==0.1.7" "gemma==3.3.0" "kauldron==1.4.2")

start=$SECONDS
python3 -m venv .venv-zoo
.venv-zoo/bin/pip install -q --upgrade pip
.venv-zoo/bin/pip install -q -e '.[test,parity,zoo]'
.venv-zoo/bin/pip install -q --no-deps "${NO_DEPS[@]}"
echo "zoo: installed in $((SECONDS - start)) s"

# tests/zoo skip where the zoo is missing (the main .venv); here that would hide a broken
# install, so tests/zoo/conftest.py turns their skips into failures.
export LORAX_FN_REQUIRE_ZOO=1
for example in examples/zoo/*.py; do
    echo "zoo: $example --smoke"
    .venv-zoo/bin/python -W ignore "$example" --smoke
done
.venv-zoo/bin/python -m pytest -p no:cacheprovider tests/zoo
echo "zoo: done in $((SECONDS - start)) s"
