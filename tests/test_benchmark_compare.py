"""benchmarks/compare.py on hand-made run_all JSON: which ratios it flags, and its exit code."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/ is not an installed package.
sys.path.insert(0, str(ROOT / "benchmarks"))

import compare  # noqa: E402


def _run(*scripts: dict[str, Any]) -> dict[str, Any]:
    return {"started": "now", "load_before": [0.0], "scripts": list(scripts)}


def _train_step(lora_ms: float, *, d: int = 768, full_ms: float = 100.0) -> dict[str, Any]:
    rows = [
        {"benchmark": "train_step", "config": "full", "d": d, "step_ms": full_ms, "gflops": 10.0},
        {"benchmark": "train_step", "config": "lora", "d": d, "step_ms": lora_ms, "gflops": 7.0},
    ]
    return {"script": "train_step.py", "status": "ok", "rows": rows}


def _decode(vs_merged: float) -> dict[str, Any]:
    rows = [
        {"machine": {"cpus": 2}, "batch": 64},  # a settings line, not a configuration
        {"method": "merged", "benchmark": "decode", "adapters": 1, "vs_merged": 1.0},
        {"method": "multi", "benchmark": "decode", "adapters": 4, "vs_merged": vs_merged},
    ]
    return {"script": "decode.py", "status": "ok", "rows": rows}


def _worst(old: dict[str, Any], new: dict[str, Any]) -> dict[tuple[str, str], float]:
    findings, _ = compare.compare(old, new)
    return {(f.row, f.ratio): f.worse for f in findings}


def test_step_ratio_is_relative_to_the_first_row() -> None:
    # Both steps 20 % slower (a busier machine): the ratio, and so the verdict, is unchanged.
    worse = _worst(_run(_train_step(70.0)), _run(_train_step(84.0, full_ms=120.0)))
    assert worse == {
        ("lora", "step_ms × first"): pytest.approx(1.0),
        ("lora", "gflops × first"): 1.0,
    }


@pytest.mark.parametrize(("lora_ms", "flagged"), [(76.0, False), (80.0, True), (60.0, False)])
def test_lower_is_better_ratios(lora_ms: float, flagged: bool) -> None:
    worse = _worst(_run(_train_step(70.0)), _run(_train_step(lora_ms)))
    assert worse[("lora", "step_ms × first")] == pytest.approx(lora_ms / 70.0)
    assert (worse[("lora", "step_ms × first")] > 1.10) is flagged


@pytest.mark.parametrize(("vs_merged", "flagged"), [(0.85, False), (0.75, True), (1.5, False)])
def test_higher_is_better_ratios(vs_merged: float, flagged: bool) -> None:
    worse = _worst(_run(_decode(0.9)), _run(_decode(vs_merged)))
    assert worse[("multi decode 4", "vs_merged")] == pytest.approx(0.9 / vs_merged)
    assert worse[("merged decode 1", "vs_merged")] == 1.0
    assert (worse[("multi decode 4", "vs_merged")] > 1.10) is flagged


def test_rows_measured_at_other_settings_are_not_compared() -> None:
    findings, notes = compare.compare(_run(_train_step(70.0)), _run(_train_step(200.0, d=64)))
    assert findings == []
    assert any("settings differ (d)" in n for n in notes)


def test_main_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def main(old: dict[str, Any], new: dict[str, Any]) -> int:
        (tmp_path / "old.json").write_text(json.dumps(old))
        (tmp_path / "new.json").write_text(json.dumps(new))
        return compare.main([str(tmp_path / "new.json"), "--baseline", str(tmp_path / "old.json")])

    old = _run(_train_step(70.0), _decode(0.9))
    assert main(old, _run(_train_step(72.0), _decode(0.88))) == 0
    assert main(old, _run(_train_step(90.0), _decode(0.88))) == 1
    assert "REGRESSION" in capsys.readouterr().out
    # A run with nothing to compare must not pass as "no regression".
    assert main(old, _run({"script": "qlora.py", "status": "ok", "rows": []})) == 2


def test_scripts_run_with_other_flags_are_not_compared() -> None:
    gpu_sized = {**_train_step(200.0), "args": ["--d", "2048"]}
    findings, notes = compare.compare(_run(_train_step(70.0)), _run(gpu_sized))
    assert findings == []
    assert any("other flags" in n for n in notes)
