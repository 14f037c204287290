"""What a plugin author imports from the package root resolves, and only that."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import ballast


def test_every_public_name_resolves_to_its_defining_module() -> None:
    assert sorted(ballast.__all__) == sorted(ballast._PUBLIC)
    for name, module in ballast._PUBLIC.items():
        assert getattr(ballast, name) is getattr(importlib.import_module(module), name)


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_thing"):
        ballast.no_such_thing  # noqa: B018


def test_importing_the_root_imports_nothing_else() -> None:
    code = "import sys, ballast; print(sorted(m for m in sys.modules if m.startswith('ballast')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['ballast']"
