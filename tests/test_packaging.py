"""The distribution installs one import package, ``ballast``, and runs from anywhere.

framework/ and plugins/ are mapped to ``ballast`` and ``ballast.plugins`` by setup.cfg;
these tests build the real wheel, check what it would put into site-packages, and run
``ballast serve`` from the installed copy in a directory outside the checkout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
from support import REPO, free_port


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out),
                    str(REPO)], check=True, capture_output=True, timeout=300)
    (found,) = out.glob("ballast-*.whl")
    return found


def _source_modules() -> set[str]:
    """Every module of the source tree, named as it must be installed."""
    names = set()
    for top, package in (("framework", "ballast"), ("plugins", "ballast/plugins")):
        for path in (REPO / top).rglob("*.py"):
            names.add(f"{package}/{path.relative_to(REPO / top).as_posix()}")
    return names


def test_wheel_holds_exactly_the_ballast_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        files = [n for n in zf.namelist() if ".dist-info/" not in n]
        entry_points = next(zf.read(n).decode() for n in zf.namelist()
                            if n.endswith(".dist-info/entry_points.txt"))
    assert {n.split("/")[0] for n in files} == {"ballast"}
    assert _source_modules() <= set(files), "a module of the tree is missing from the wheel"
    assert "ballast/py.typed" in files
    assert "ballast = ballast.command:main" in entry_points


def test_installed_wheel_serves_from_outside_the_checkout(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, timeout=300)
    # --target also holds the console script under bin/; the importable tree is ballast alone
    assert {p.name for p in target.iterdir() if not p.name.endswith(".dist-info")} - {"bin"} \
        == {"ballast"}
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "BALLAST__SERVER__PORT": str(port := free_port())}
    where = subprocess.run([sys.executable, "-c", "import ballast; print(ballast.__file__)"],
                           env=env, cwd=workdir, capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(target)), where.stdout
    proc = subprocess.Popen([sys.executable, "-m", "ballast.cli", "serve"], env=env, cwd=workdir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        body = b""
        while time.monotonic() < deadline and not body:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                    body = r.read()
            except OSError:
                time.sleep(0.1)
        assert json.loads(body) == {"status": "ok"}
        assert (workdir / "var" / "ballast.db").exists(), "embedded default: SQLite under ./var"
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        if proc.stderr:
            proc.stderr.close()
