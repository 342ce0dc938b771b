#!/usr/bin/env bash
# Dependency ranges, checked rather than assumed (run by .ci/run after the tests):
# 1. lorax_fn resolves beside the JAX model zoos users install it with (pip's resolver,
#    nothing installed): google-tunix and the gemma package. MaxText needs Python >= 3.12
#    and is checked only where the interpreter allows it.
# 2. The oldest versions pyproject.toml allows (uv's lowest-direct resolution) pass the
#    tests that exercise each dependency's API: split/apply/merge (jax, flax, numpy),
#    the optimizer (optax), checkpoints (orbax), PEFT files (safetensors).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv-deps
.venv-deps/bin/pip install -q --upgrade pip uv
for zoo in google-tunix gemma; do
    echo "resolver: lorax_fn beside $zoo"
    .venv-deps/bin/pip install -q --dry-run --ignore-installed . "$zoo"
done
if python3 -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
    echo "resolver: lorax_fn beside maxtext"
    .venv-deps/bin/pip install -q --dry-run --ignore-installed . maxtext
fi

echo "oldest allowed versions:"
.venv-deps/bin/uv pip install -q --python .venv-deps/bin/python --resolution lowest-direct \
    -e '.[test]'
.venv-deps/bin/uv pip list --python .venv-deps/bin/python 2>/dev/null |
    grep -Ei '^(jax|jaxlib|flax|optax|orbax-checkpoint|chex|numpy|safetensors) '
.venv-deps/bin/python -m pytest -q -p no:cacheprovider \
    tests/test_core.py tests/test_optim.py tests/checkpoint/test_checkpoint.py tests/peft/test_peft.py
