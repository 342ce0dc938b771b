"""The model-zoo tests: they skip where the zoo is not installed (the main .venv), and
fail instead of skipping where scripts/zoo.sh installed it (LORAX_FN_REQUIRE_ZOO=1), so
that a broken zoo install cannot pass as a clean run."""

import os

import pytest

REQUIRE_ZOO = os.environ.get("LORAX_FN_REQUIRE_ZOO") == "1"


def _fail_if_skipped(report: pytest.CollectReport | pytest.TestReport) -> None:
    if REQUIRE_ZOO and report.skipped:
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped, but LORAX_FN_REQUIRE_ZOO=1 says the zoo is installed: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    outcome = yield
    _fail_if_skipped(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    _fail_if_skipped(outcome.get_result())
