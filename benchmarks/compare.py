"""Flags benchmark ratios more than 10 % worse than the committed ones.

Absolute times on a shared machine say little; the ratios each script measures within
one run (LoRA's step over full fine-tuning's, a decode method's throughput over the
merged model's) are what a change to lorax_fn moves. This compares the ratios of a
fresh ``run_all.py`` JSON with those of a baseline (by default the committed
``docs/results/benchmarks.json``) row by row, and exits with status 1 when any is worse
by more than ``--tolerance``. Which ratios each script has is :data:`RATIOS`:

- ``train_step.py``, ``latency.py``, ``qlora_train.py``, ``moe.py``, ``dora.py``: each
  row's ``step_ms`` (and deterministic ``gflops`` / memory) over the first row's, the
  ``× first`` column of the report; lower is better.
- ``multi_adapter.py``: ``vs_single``; ``decode.py``: ``vs_merged`` and ``vs_single``
  (throughput over a reference method's); higher is better.
- ``adapter_size.py``, ``qlora.py``: sizes and errors, no ratios; not compared.

Rows are matched by their key columns; a script run with other flags (``run_all.py
--args``), or a matched row whose settings (its int, str and bool fields) differ from
the baseline's, is reported and not compared.

    python benchmarks/run_all.py --only train_step.py latency.py
    python benchmarks/compare.py results/benchmarks.json   # exit 1 if a ratio is >10 % worse
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "docs" / "results" / "benchmarks.json"


@dataclasses.dataclass(frozen=True)
class Ratios:
    """How to read one script's rows: what identifies a row, and which ratios it has.

    ``over_first`` fields become ``row[f] / first_row[f]`` (lower is better);
    ``higher_better`` fields are ratios the script already computed.
    """

    keys: tuple[str, ...]
    over_first: tuple[str, ...] = ()
    higher_better: tuple[str, ...] = ()


_STEP = ("step_ms", "gflops", "temp_mib")
RATIOS: dict[str, Ratios] = {
    "train_step.py": Ratios(("config",), over_first=_STEP),
    "latency.py": Ratios(("config",), over_first=_STEP),
    "qlora_train.py": Ratios(("config",), over_first=("step_ms", "compiled_mib")),
    "moe.py": Ratios(("config",), over_first=_STEP),
    "dora.py": Ratios(("config",), over_first=_STEP),
    "multi_adapter.py": Ratios(("method", "adapters"), higher_better=("vs_single",)),
    "decode.py": Ratios(
        ("method", "benchmark", "adapters"), higher_better=("vs_merged", "vs_single")
    ),
}


@dataclasses.dataclass(frozen=True)
class Finding:
    """One ratio of one row, in both runs; ``worse`` > 1 means the new run is worse."""

    script: str
    row: str
    ratio: str
    old: float
    new: float
    higher_better: bool

    @property
    def worse(self) -> float:
        return self.old / self.new if self.higher_better else self.new / self.old


def _plain_rows(entry: dict[str, Any]) -> list[dict[str, Any]]:
    # A row holding a nested object describes the run (machine, settings), not a config.
    return [r for r in entry.get("rows", []) if not any(isinstance(v, dict) for v in r.values())]


def ratios_of(script: str, entry: dict[str, Any]) -> dict[tuple, dict[str, float]]:
    """``{row key: {ratio name: value}}`` for one script's entry of a run_all JSON.

    Example::

        entry = {"rows": [{"config": "full", "step_ms": 10.0},
                          {"config": "lora", "step_ms": 7.0}]}
        ratios_of("train_step.py", entry)
        # {('lora',): {'step_ms × first': 0.7}}
    """
    spec = RATIOS[script]
    rows = _plain_rows(entry)
    out: dict[tuple, dict[str, float]] = {}
    for i, row in enumerate(rows):
        values = {}
        for field in spec.over_first if i else ():  # the first row's are 1 by definition
            first = rows[0].get(field)
            if isinstance(row.get(field), int | float) and first:
                values[f"{field} × first"] = row[field] / first
        for field in spec.higher_better:
            if isinstance(row.get(field), int | float):
                values[field] = row[field]
        if values:
            out[tuple(row.get(k) for k in spec.keys)] = values
    return out


def _settings(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if isinstance(v, int | str | bool)}


def _rows_by_key(script: str, entry: dict[str, Any]) -> dict[tuple, dict[str, Any]]:
    keys = RATIOS[script].keys
    return {tuple(r.get(k) for k in keys): r for r in _plain_rows(entry)}


def compare(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[Finding], list[str]]:
    """Every ratio present in both runs, and notes on what could not be compared.

    Example::

        findings, notes = compare(json.load(open(BASELINE)), json.load(open("new.json")))
        [f for f in findings if f.worse > 1.10]
    """
    old_entries = {e["script"]: e for e in old["scripts"]}
    findings, notes = [], []
    for entry in new["scripts"]:
        script = entry["script"]
        if script not in RATIOS:
            continue
        if entry.get("status") != "ok":
            notes.append(f"{script}: status {entry.get('status')} in the new run")
        base = old_entries.get(script)
        if base is None or not _plain_rows(base):
            notes.append(f"{script}: no rows in the baseline")
            continue
        if base.get("args", []) != entry.get("args", []):
            notes.append(
                f"{script}: run with other flags ({base.get('args')} vs {entry.get('args')})"
            )
            continue
        old_rows, new_rows = _rows_by_key(script, base), _rows_by_key(script, entry)
        if next(iter(old_rows)) != next(iter(new_rows), None):
            notes.append(f"{script}: the first rows differ, so '× first' means different things")
            continue
        old_ratios, new_ratios = ratios_of(script, base), ratios_of(script, entry)
        for key, values in new_ratios.items():
            label = " ".join(str(k) for k in key if k is not None)
            if key not in old_ratios:
                notes.append(f"{script} {label}: not in the baseline")
                continue
            a, b = _settings(old_rows[key]), _settings(new_rows[key])
            differ = sorted(k for k in a.keys() & b.keys() if a[k] != b[k])
            if differ:
                notes.append(f"{script} {label}: settings differ ({', '.join(differ)})")
                continue
            for name, value in values.items():
                if name in old_ratios[key] and value and old_ratios[key][name]:
                    higher = name in RATIOS[script].higher_better
                    findings.append(
                        Finding(script, label, name, old_ratios[key][name], value, higher)
                    )
    return findings, notes


def render(findings: Sequence[Finding], tolerance: float) -> str:
    """A markdown table of the findings, the ones past ``tolerance`` marked."""
    lines = [
        "| script | row | ratio | baseline | new | worse by | |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in findings:
        flag = "**REGRESSION**" if f.worse > 1 + tolerance else ""
        lines.append(
            f"| {f.script} | {f.row} | {f.ratio} | {f.old:.3g} | {f.new:.3g} "
            f"| {100 * (f.worse - 1):+.1f} % | {flag} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Compare, print the table; 1 if a ratio is worse than the tolerance, 2 if none compared."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("new", type=Path, help="a run_all.py JSON (e.g. results/benchmarks.json)")
    parser.add_argument("--baseline", type=Path, default=BASELINE)
    parser.add_argument("--tolerance", type=float, default=0.10, help="0.10: flag >10 %% worse")
    args = parser.parse_args(argv)
    old = json.loads(args.baseline.read_text())
    new = json.loads(args.new.read_text())
    findings, notes = compare(old, new)
    print(f"baseline {args.baseline} ({old.get('started')}, load {old.get('load_before')})")
    print(f"new      {args.new} ({new.get('started')}, load {new.get('load_before')})\n")
    print(render(findings, args.tolerance))
    for note in notes:
        print(f"note: {note}")
    bad = [f for f in findings if f.worse > 1 + args.tolerance]
    if not findings:
        print("nothing compared: no script of the new run has ratios in the baseline")
        return 2
    print(f"\n{len(bad)} of {len(findings)} ratios more than {100 * args.tolerance:.0f} % worse")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
