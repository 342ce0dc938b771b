"""Benchmark tables and figures rendered at build time from the committed JSON results.

Two MyST directives read a file under ``docs/results/``: the JSON that
``benchmarks/run_all.py --docs`` writes (``{"started", "machine", "scripts": [{"script",
"rows", ...}]}``; an entry may carry its own ``started``/``machine`` when the file joins
several runs), or a ``.jsonl`` of rows (a row holding a ``machine`` object describes the
run). Each table and figure says the machine and date it was measured on::

    ```{results-table} benchmarks.json
    :script: train_step.py
    :columns: config, trainable_params, step_ms, gflops
    ```

    ```{results-figure} benchmarks.json
    :script: decode.py
    :where: benchmark=decode
    :x: adapters
    :y: vs_merged
    :series: method
    ```

A figure is drawn with matplotlib (Agg) into ``docs/_generated/`` (git-ignored), from
where Sphinx copies it like any image.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

# Columns that identify a row rather than measure it (as in run_all.py's report).
_KEY_COLUMNS = ("config", "method", "benchmark", "format")


def load(path: Path) -> list[dict[str, Any]]:
    """Every run in ``path`` as ``{"script", "rows", "started", "machine"}``."""
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        meta = next((r for r in rows if isinstance(r.get("machine"), dict)), {})
        data = [r for r in rows if r is not meta]
        started = meta.get("date") or meta.get("started") or ""
        return [{"script": path.stem, "rows": data, "started": started, "machine": meta}]
    results = json.loads(path.read_text())
    return [
        {
            "started": results.get("started", ""),
            "machine": results.get("machine", {}),
            **entry,
            "rows": [r for r in entry.get("rows", []) if not isinstance(r.get("machine"), dict)],
        }
        for entry in results.get("scripts", [])
    ]


def machine_line(entry: dict[str, Any]) -> str:
    """'Measured <date> on <machine>' for one run."""
    info = entry.get("machine", {})
    info = info.get("machine", info) if isinstance(info.get("machine"), dict) else info
    parts = [f"{k}={v}" for k, v in info.items() if k in ("jax", "backend", "cpus", "device")]
    devices = info.get("devices")
    if devices:
        parts.append(f"device={devices[0]}")
    if info.get("platform"):
        parts.append(str(info["platform"]))
    when = str(entry.get("started", "")).replace("T", " ")[:16] or "date not recorded"
    script = entry.get("script", "")
    return f"Measured {when} UTC by {script} on: {', '.join(parts) or 'machine not recorded'}."


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return str(value)


def select(entries: list[dict[str, Any]], script: str | None, where: str | None) -> tuple:
    """The run of ``script`` (the only one if not named), and its rows matching ``where``."""
    matching = [e for e in entries if script is None or e["script"] == script]
    if not matching:
        raise ValueError(f"no results for script {script!r}; have {[e['script'] for e in entries]}")
    entry = matching[-1]
    rows = entry["rows"]
    for clause in filter(None, (c.strip() for c in (where or "").split(","))):
        key, _, want = clause.partition("=")
        rows = [r for r in rows if cell(r.get(key.strip())) == want.strip()]
    if not rows:
        raise ValueError(f"{entry['script']}: no rows match {where!r}")
    return entry, rows


def columns_of(rows: Sequence[dict[str, Any]], wanted: str | None) -> list[str]:
    """The requested columns, or those that vary between rows (key columns first)."""
    if wanted:
        return [c.strip() for c in wanted.split(",")]
    keys = list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], list | dict)))
    varying = [k for k in keys if len({cell(r.get(k)) for r in rows}) > 1 or len(rows) == 1]
    return [k for k in _KEY_COLUMNS if k in varying] + [k for k in varying if k not in _KEY_COLUMNS]


def table_node(columns: list[str], rows: Sequence[dict[str, Any]]) -> nodes.table:
    table = nodes.table(classes=["results-table"])
    group = nodes.tgroup(cols=len(columns))
    table += group
    group += [nodes.colspec(colwidth=1) for _ in columns]

    def row_node(values: list[str]) -> nodes.row:
        row = nodes.row()
        for text in values:
            row += nodes.entry("", nodes.paragraph(text=text))
        return row

    head = nodes.thead()
    head += row_node(columns)
    body = nodes.tbody()
    body += [row_node([cell(r.get(c)) for c in columns]) for r in rows]
    group += [head, body]
    return table


def draw(path: Path, rows: Sequence[dict[str, Any]], opts: dict[str, Any]) -> None:
    """A bar chart (categorical x) or line chart (numeric x) of each ``y`` per ``series``.

    Several comma-separated ``y`` columns are series of their own; ``relative`` divides
    each by its first row's value (the baseline each script lists first).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, series = opts["x"], opts.get("series")
    ys = [c.strip() for c in opts["y"].split(",")]
    groups: dict[str, list[tuple[Any, float]]] = {}
    for y in ys:
        first = next((r[y] for r in rows if r.get(y) is not None), 1.0)
        scale = 1.0 / first if "relative" in opts else 1.0
        for r in rows:
            if r.get(y) is not None:
                name = cell(r.get(series)) if series else y
                name = f"{name} ({y})" if series and len(ys) > 1 else name
                groups.setdefault(name, []).append((r.get(x), r[y] * scale))
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    if all(isinstance(xv, int | float) for g in groups.values() for xv, _ in g):
        for name, g in groups.items():
            ax.plot([xv for xv, _ in g], [yv for _, yv in g], marker="o", label=name)
        if "logx" in opts:
            ax.set_xscale("log", base=2)
            ticks = sorted({xv for g in groups.values() for xv, _ in g})
            ax.set_xticks(ticks, [cell(t) for t in ticks])
        ax.set_xlabel(x)
    else:
        labels = list(dict.fromkeys(cell(xv) for g in groups.values() for xv, _ in g))
        width = 0.8 / len(groups)
        for k, (name, g) in enumerate(groups.items()):
            values = {cell(xv): yv for xv, yv in g}
            xs = [i + (k - (len(groups) - 1) / 2) * width for i in range(len(labels))]
            ax.bar(xs, [values.get(lab, 0) for lab in labels], width, label=name)
        ax.set_xticks(range(len(labels)), labels, rotation=15 if len(labels) > 4 else 0)
    if opts.get("hline") is not None:
        ax.axhline(float(opts["hline"]), color="grey", linewidth=0.8, linestyle="--")
    ax.set_ylabel(opts.get("ylabel") or ", ".join(ys))
    if opts.get("title"):
        ax.set_title(opts["title"], fontsize=10)
    if len(groups) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


class _ResultsDirective(SphinxDirective):
    required_arguments = 1
    option_spec: ClassVar[dict[str, Any]] = {
        "script": directives.unchanged,
        "where": directives.unchanged,
        "columns": directives.unchanged,
    }

    def entry_and_rows(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        path = Path(self.env.srcdir) / "results" / self.arguments[0]
        self.env.note_dependency(str(path))
        return select(load(path), self.options.get("script"), self.options.get("where"))

    def caption(self, entry: dict[str, Any]) -> nodes.paragraph:
        return nodes.paragraph(text=machine_line(entry), classes=["results-machine"])


class ResultsTable(_ResultsDirective):
    """A table of one script's rows, with the machine and date they were measured on."""

    def run(self) -> list[nodes.Node]:
        entry, rows = self.entry_and_rows()
        return [table_node(columns_of(rows, self.options.get("columns")), rows)] + [
            self.caption(entry)
        ]


class ResultsFigure(_ResultsDirective):
    """A matplotlib figure of one script's rows, with the machine and date."""

    option_spec: ClassVar[dict[str, Any]] = {
        **_ResultsDirective.option_spec,
        "x": directives.unchanged_required,
        "y": directives.unchanged_required,
        "series": directives.unchanged,
        "ylabel": directives.unchanged,
        "title": directives.unchanged,
        "hline": directives.unchanged,
        "logx": directives.flag,
        "relative": directives.flag,
        "alt": directives.unchanged,
    }

    def run(self) -> list[nodes.Node]:
        entry, rows = self.entry_and_rows()
        key = json.dumps([self.arguments, sorted(self.options.items()), rows], default=str)
        name = f"{Path(self.arguments[0]).stem}-{hashlib.sha1(key.encode()).hexdigest()[:10]}.png"
        draw(Path(self.env.srcdir) / "_generated" / name, rows, self.options)
        figure = nodes.figure()
        alt = self.options.get("alt") or f"{self.options['y']} by {self.options['x']}"
        figure += nodes.image(uri=f"/_generated/{name}", alt=alt)
        figure += nodes.caption(text=machine_line(entry))
        return [figure]


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("results-table", ResultsTable)
    app.add_directive("results-figure", ResultsFigure)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
