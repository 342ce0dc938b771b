"""Runs every benchmark script in benchmarks/ and writes one JSON file and one markdown report.

Each script in :data:`SCRIPTS` runs as its own subprocess with its default settings; a
script that does not exist (yet) is skipped with a note. The JSON lines a script prints
(one object per configuration) are collected into ``results/benchmarks.json`` and rendered
as a markdown table per script in ``results/benchmarks.md``, together with the machine and
the load average before and after (other processes on the machine perturb timings).

    python benchmarks/run_all.py                     # everything, ~15 min on 2 CPU cores
    python benchmarks/run_all.py --only latency.py   # a subset
    python benchmarks/run_all.py --docs              # also copy both to docs/results/
    python benchmarks/run_all.py --only dora.py --args "dora.py=--d 256 --repeats 3"

``--docs`` copies the JSON next to the report, so that ``benchmarks/compare.py`` can
check a later run's ratios against the committed ones.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOCS = ROOT / "docs" / "results"
SCRIPTS = (
    "train_step.py",
    "latency.py",
    "adapter_size.py",
    "multi_adapter.py",
    "decode.py",
    "qlora.py",
    "qlora_train.py",
    "moe.py",
    "dora.py",
)
# Columns that identify a row rather than measure it; kept first in each table.
_KEY_COLUMNS = ("config", "method", "benchmark")


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of ``text`` that is a JSON object, parsed; other output is ignored.

    Example::

        json_lines('compiling...\\n{"config": "base", "step_ms": 3.2}')
        # [{'config': 'base', 'step_ms': 3.2}]
    """
    rows = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def run_script(name: str, timeout_s: float, args: Sequence[str] = ()) -> dict[str, Any]:
    """Runs ``benchmarks/<name> *args`` in a subprocess; returns its rows, status and wall time."""
    path = HERE / name
    if not path.is_file():
        return {"script": name, "status": "skipped", "note": f"{name} does not exist"}
    print(f"== {name} {shlex.join(args)}", flush=True)
    start = time.perf_counter()
    # A session of its own: a timeout stops the script's per-configuration children too
    # (left running, they would hold the cores or the accelerator the next script needs).
    proc = subprocess.Popen(
        [sys.executable, str(path), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        status, stderr = "timeout", f"killed after {timeout_s:.0f} s\n{stderr}"
    result = {
        "script": name,
        "args": list(args),
        "status": status,
        "wall_s": round(time.perf_counter() - start, 1),
        "rows": json_lines(stdout),
    }
    if status != "ok":
        result["note"] = stderr[-2000:]
    for row in result["rows"]:
        print(json.dumps(row), flush=True)
    print(f"   {result['status']} in {result['wall_s']} s", flush=True)
    return result


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return str(value)


def rows_table(rows: Sequence[dict[str, Any]]) -> str:
    """Settings shared by every row as one line, then a markdown table of what varies.

    Rows with a ``step_ms`` get a ``× first`` column: the ratio to the first row (the
    baseline each script lists first: full fine-tuning, the base model, ...).

    Example::

        print(rows_table([{"config": "base", "d": 64, "step_ms": 2.0},
                          {"config": "lora", "d": 64, "step_ms": 3.0}]))
    """
    rows = [dict(r) for r in rows]
    if rows and all("step_ms" in r for r in rows):
        for r in rows:
            r["× first"] = r["step_ms"] / rows[0]["step_ms"]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    scalar = [k for k in keys if all(not isinstance(r.get(k), list | dict) for r in rows)]
    shared = [k for k in scalar if len(rows) > 1 and len({_cell(r.get(k)) for r in rows}) == 1]
    columns = [k for k in _KEY_COLUMNS if k in scalar and k not in shared]
    columns += [k for k in scalar if k not in shared and k not in columns]
    lines = []
    if shared:
        lines += [", ".join(f"{k}={_cell(rows[0].get(k))}" for k in shared), ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    lines += ["| " + " | ".join(_cell(r.get(k)) for k in columns) + " |" for r in rows]
    return "\n".join(lines)


def report(results: dict[str, Any]) -> str:
    """The markdown report of a :func:`main` run."""
    info = results["machine"]
    lines = [
        "# Benchmarks",
        "",
        f"Measured {results['started']} by `python benchmarks/run_all.py` on: "
        + ", ".join(f"{k}={v}" for k, v in info.items())
        + f". Load average (1, 5, 15 min) before: {results['load_before']}, after: "
        f"{results['load_after']} — other work on the machine perturbs the timings.",
    ]
    for entry in results["scripts"]:
        lines += ["", f"## {entry['script']}", ""]
        status = entry["status"]
        if status == "skipped":
            lines.append(f"Skipped: {entry['note']}.")
            continue
        lines.append(f"Status: {status}, {entry['wall_s']} s.")
        if entry.get("args"):
            lines.append(f"Run as `{shlex.join([entry['script'], *entry['args']])}`.")
        # A line holding a nested object (e.g. {"machine": {...}, "batch": 64}) describes
        # the run rather than one configuration: its plain values become a settings line.
        meta = [r for r in entry["rows"] if any(isinstance(v, dict) for v in r.values())]
        rows = [r for r in entry["rows"] if r not in meta]
        for r in meta:
            plain = {k: v for k, v in r.items() if not isinstance(v, dict | list)}
            lines += ["", ", ".join(f"{k}={_cell(v)}" for k, v in plain.items())]
        if rows:
            lines += ["", rows_table(rows)]
        if "note" in entry:
            lines += ["", "```text", entry["note"].strip(), "```"]
    return "\n".join(lines) + "\n"


def script_flags(specs: Sequence[str]) -> dict[str, list[str]]:
    """``["dora.py=--d 256"]`` as ``{"dora.py": ["--d", "256"]}``; an unknown script raises.

    Example::

        script_flags(["latency.py=--batch 8 --seq 512"])
        # {'latency.py': ['--batch', '8', '--seq', '512']}
    """
    flags = {}
    for spec in specs:
        name, _, rest = spec.partition("=")
        if name not in SCRIPTS:
            raise SystemExit(f"--args {spec!r}: {name!r} is not one of {', '.join(SCRIPTS)}")
        flags[name] = shlex.split(rest)
    return flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=SCRIPTS, help="run just these scripts")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per script")
    parser.add_argument(
        "--args",
        action="append",
        default=[],
        metavar="SCRIPT=FLAGS",
        help="flags for one script instead of its defaults (repeatable)",
    )
    parser.add_argument(
        "--docs", action="store_true", help=f"copy the report and its JSON to {DOCS}"
    )
    args = parser.parse_args()
    flags = script_flags(args.args)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results: dict[str, Any] = {
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "scripts": [
            run_script(name, args.timeout, flags.get(name, ())) for name in args.only or SCRIPTS
        ],
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }
    results["total_wall_s"] = round(time.perf_counter() - start, 1)
    (args.out / "benchmarks.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    text = report(results)
    (args.out / "benchmarks.md").write_text(text)
    if args.docs:
        DOCS.mkdir(parents=True, exist_ok=True)
        for name in ("benchmarks.md", "benchmarks.json"):
            shutil.copyfile(args.out / name, DOCS / name)
    print("\n" + text)
    print(f"total {results['total_wall_s']} s; wrote {args.out}/benchmarks.{{json,md}}")


if __name__ == "__main__":
    main()
