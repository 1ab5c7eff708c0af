"""Test-suite wide hooks and fixtures.

`instance`: a throw-away instance of our master (tests/instance.py),
stopped and removed after the test.

Long runs (fuzzing, durability under kill -9, load with reloads) print their
figures on lines starting with `FIGURES `; pytest keeps a passing test's
output to itself, so the terminal summary repeats those lines at the end of
every run, where the README's test command shows them.
"""

import pytest

from tests.instance import temporary_instance

MARK = "FIGURES "


@pytest.fixture
def instance(tmp_path):
    with temporary_instance(tmp_path) as inst:
        yield inst


def pytest_terminal_summary(terminalreporter):
    lines = []
    for key in ("passed", "failed", "xpassed"):
        for report in terminalreporter.stats.get(key, []):
            for line in getattr(report, "capstdout", "").splitlines():
                if line.startswith(MARK):
                    lines.append(f"{report.nodeid.split('::')[-1]}: {line[len(MARK):]}")
    if lines:
        terminalreporter.section("figures from the long runs")
        for line in lines:
            terminalreporter.write_line(line)
