"""The black-box reliability suite: every test here carries the ``reliability`` marker.

``pytest -m reliability`` runs just this folder; a plain ``pytest`` runs it too. The
figures the tests measure (lost writes, attempts per fault, RSS under flood, fuzzing
example counts) are printed in the terminal summary.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from reliability_support import FIGURES, HEAVY

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.reliability)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    if not FIGURES:
        return
    mode = "heavy (BALLAST_HEAVY=1)" if HEAVY else "default"
    terminalreporter.section(f"reliability figures, {mode} run")
    for title, rows in FIGURES:
        terminalreporter.write_line(title)
        for row in rows:
            terminalreporter.write_line(f"    {row}")
