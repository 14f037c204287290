"""The example third-party plugin (examples/ballast-plugin-example) installs and works.

It is built and installed with pip, as a plugin author's users would, into a scratch
directory put on ``PYTHONPATH`` (so this test environment is left as it was), then its
own test suite runs against it: unit tests of its parts, and a real ``ballast serve``
that finds it through its ``ballast.plugins`` entry point.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import REPO, run_cli

EXAMPLE = REPO / "examples" / "ballast-plugin-example"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    work = tmp_path_factory.mktemp("plugin-example")
    source = work / "source"
    # Built from a copy: a build writes build/ and *.egg-info next to the sources.
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = work / "site"
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    env = {"PYTHONPATH": os.pathsep.join([str(target), *filter(None, [os.environ.get("PYTHONPATH")])])}
    yield source, env


def test_the_example_plugin_is_found_through_its_entry_point(installed: tuple[Path, dict[str, str]]) -> None:
    _, env = installed
    out = run_cli("plugins", "--json", env=env)
    assert out.returncode == 0, out.stderr
    stamp = [p for p in json.loads(out.stdout) if p["name"] == "stamp"]
    assert [(p["source"], p["enabled"]) for p in stamp] == [("entry point ballast-stamp", True)]
    # Without the install on the path, Ballast has never heard of it.
    plain = run_cli("plugins", "--json")
    assert "stamp" not in {p["name"] for p in json.loads(plain.stdout)}


def test_the_example_plugins_own_tests_pass(installed: tuple[Path, dict[str, str]]) -> None:
    source, env = installed
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        capture_output=True, text=True, cwd=source, env={**os.environ, **env}, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout, out.stdout[-2000:]
