"""The plugin manager: builtin toggles by config and env, entry points, clear errors."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pytest
from support import ServerProcess, request, run_cli

from ballast.config import load_settings
from ballast.errors import PluginError
from ballast.plugin_manager import BUILTIN_PLUGINS, load_plugins

BUILTINS = [name for name, _ in BUILTIN_PLUGINS]
#: Whether each builtin is enabled when the config does not say (``fallback`` and
#: ``auth`` are off).
ON_BY_DEFAULT = {name: importlib.import_module(module).ballast_settings_model()().enabled
                 for name, module in BUILTIN_PLUGINS}


def _plugins_json(*args: str, env: dict[str, str] | None = None) -> dict[str, dict[str, object]]:
    result = run_cli("plugins", "--json", *args, env=env)
    assert result.returncode == 0, result.stderr
    return {row["name"]: row for row in json.loads(result.stdout)}


def test_plugins_json_lists_every_builtin_in_its_default_state_with_settings() -> None:
    rows = _plugins_json()
    assert set(BUILTINS) <= set(rows)
    # Both rounds' builtins, and which of them ship disabled.
    assert set(BUILTINS) == {"error_sanitizer", "timeout_budget", "retry", "shared_client", "bulkhead",
                             "queue_logging", "circuit_breaker", "fallback", "auth", "metrics", "tracing",
                             "adaptive_concurrency"}
    assert {n for n, on in ON_BY_DEFAULT.items() if not on} == {"fallback", "auth", "tracing"}
    for name in BUILTINS:
        assert rows[name]["enabled"] is ON_BY_DEFAULT[name]
        assert rows[name]["source"] == "builtin"
        assert rows[name]["hooks"], name
    assert rows["retry"]["settings"]["attempts"] == 3  # type: ignore[index]
    assert rows["bulkhead"]["settings"]["max_workers"] == 8  # type: ignore[index]


def test_plugins_text_output() -> None:
    result = run_cli("plugins")
    assert result.returncode == 0
    for name in BUILTINS:
        assert name in result.stdout


def _exercise(server: ServerProcess) -> None:
    """The server answers the core flow with the plugin off."""
    status, headers, _ = request("GET", server.base_url + "/healthz")
    assert status == 200 and headers.get("X-Request-ID")
    status, _, body = request("POST", server.base_url + "/v1/sessions", {"title": "t"})
    assert status == 201, body
    sid = body["session_id"]
    status, _, body = request("POST", f"{server.base_url}/v1/sessions/{sid}/mutations", {"mutations": [
        {"id": "m1", "type": "utterance", "speaker": "spk_0", "start_ms": 0, "end_ms": 900,
         "text": "Hi, I'm Alice."}]})
    assert status == 200 and body["accepted"][0]["seq"] == 1, body
    status, _, body = request("GET", f"{server.base_url}/v1/sessions/{sid}/nothing-here")
    assert status == 404


@pytest.mark.parametrize("name", ON_BY_DEFAULT)
@pytest.mark.parametrize("how", ["config", "env"])
def test_each_builtin_can_be_disabled(tmp_path: Path, name: str, how: str) -> None:
    config, env = "", {}
    if how == "config":
        config = f"[plugins.{name}]\nenabled = false\n"
    else:
        env = {f"BALLAST__PLUGINS__{name.upper()}__ENABLED": "false"}
    server = ServerProcess(tmp_path, config=config, env=env)
    rows = _plugins_json("--config", str(server.config_path), env=env)
    assert rows[name]["enabled"] is False
    assert all(rows[other]["enabled"] is ON_BY_DEFAULT[other] for other in BUILTINS if other != name)
    with server:
        _exercise(server)


def test_all_plugins_disabled_still_serves(tmp_path: Path) -> None:
    config = "".join(f"[plugins.{n}]\nenabled = false\n" for n in BUILTINS)
    with ServerProcess(tmp_path, config=config) as server:
        _exercise(server)


def _third_party(site: Path, body: str, module: str = "ballast_headers_plugin") -> dict[str, str]:
    """A real installed distribution: a module plus a dist-info with an entry point."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(body)
    dist = site / "ballast_headers_plugin-0.1.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ballast-headers-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[ballast.plugins]\nheaders = {module}\n")
    return {"PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


PLUGIN_SOURCE = '''
from pydantic import Field
from ballast.config import PluginSection
from ballast.hookspecs import hookimpl
from ballast.middleware import MiddlewareSpec


class Settings(PluginSection):
    value: str = Field("yes")


@hookimpl
def ballast_settings_model():
    return Settings


@hookimpl
def ballast_middlewares(config):
    value = config.plugin("headers").value

    async def impl(request, handler):
        response = await handler(request)
        response.headers["X-Third-Party"] = value
        return response

    return [MiddlewareSpec("headers", 500, impl)]
'''


def test_third_party_plugin_from_entry_point(tmp_path: Path) -> None:
    env = _third_party(tmp_path / "site", PLUGIN_SOURCE)
    server = ServerProcess(tmp_path / "srv", config='[plugins.headers]\nvalue = "on"\n', env=env)
    rows = _plugins_json("--config", str(server.config_path), env=env)
    assert rows["headers"]["enabled"] is True
    assert rows["headers"]["source"] == "entry point ballast-headers-plugin"
    assert rows["headers"]["settings"] == {"enabled": True, "value": "on"}
    with server:
        status, headers, _ = request("GET", server.base_url + "/healthz")
        assert status == 200 and headers["X-Third-Party"] == "on"
    # And disabled by env, it is listed but its middleware is gone.
    env_off = {**env, "BALLAST__PLUGINS__HEADERS__ENABLED": "false"}
    with ServerProcess(tmp_path / "srv2", env=env_off) as server:
        status, headers, _ = request("GET", server.base_url + "/healthz")
        assert status == 200 and "X-Third-Party" not in headers


def test_broken_entry_point_is_named(tmp_path: Path) -> None:
    env = _third_party(tmp_path / "site", "raise ImportError('missing dependency')\n")
    result = run_cli("plugins", "--json", env=env)
    assert result.returncode == 2
    assert "'headers'" in result.stderr and "failed to load" in result.stderr


def test_misspelled_hookimpl_is_caught() -> None:
    from ballast.hookspecs import hookimpl

    class Typo:
        @hookimpl
        def ballast_middlewarez(self, config: object) -> list[object]:
            return []

    with pytest.raises(PluginError, match="unknown hook"):
        load_plugins(load_settings(environ={}), extra=[("typo", Typo())])


def test_unknown_plugin_section_names_it(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[plugins.retyr]\nenabled = false\n")
    result = run_cli("plugins", "--config", str(path))
    assert result.returncode == 2 and "plugins.retyr" in result.stderr
