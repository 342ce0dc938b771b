"""What `import lorax_fn` costs beyond `import jax, flax, optax`: peak RSS and heavy modules.

Each measurement runs in a fresh interpreter (several repeats, interleaved). Prints one JSON
line per run and a table. Usage: python benchmarks/import_cost.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

BASE = "import jax, flax, optax, flax.linen, flax.nnx"
CASES = {
    "jax+flax+optax": BASE,
    "+ lorax_fn": BASE + "; import lorax_fn",
    "+ lorax_fn, first save": BASE + "; import lorax_fn; lorax_fn.save",
}
PROBE = (
    "; import resource, sys; "
    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "
    "sorted({m.split('.')[0] for m in sys.modules} & {'orbax', 'tensorstore', 'safetensors'}))"
)


def measure(code: str) -> tuple[float, str]:
    out = subprocess.run(
        [sys.executable, "-c", code + PROBE], capture_output=True, text=True, check=True
    ).stdout.split(maxsplit=1)
    return float(out[0]), out[1].strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rss: dict[str, list[float]] = {name: [] for name in CASES}
    heavy: dict[str, str] = {}
    for _ in range(args.repeats):
        for name, code in CASES.items():
            mib, heavy[name] = measure(code)
            rss[name].append(mib)
            print(json.dumps({"case": name, "peak_rss_mib": round(mib, 1), "heavy": heavy[name]}))
    base = statistics.median(rss["jax+flax+optax"])
    print(f"\n{'case':<26}{'peak RSS (median)':>18}{'over base':>11}  heavy modules loaded")
    for name in CASES:
        mib = statistics.median(rss[name])
        print(f"{name:<26}{mib:>14.1f} MiB{mib - base:>7.1f} MiB  {heavy[name]}")


if __name__ == "__main__":
    main()
