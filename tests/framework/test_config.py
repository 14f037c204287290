"""Config: file + environment overrides, validated; errors name the key; CLI exits 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import run_cli

from ballast.config import env_overrides, load_settings
from ballast.errors import ConfigError
from ballast.plugin_manager import load_plugins


def test_defaults_load_and_validate_every_plugin() -> None:
    config = load_settings(environ={})
    plugins = load_plugins(config)
    assert config.settings.inference.provider == "builtin"
    assert config.settings.storage.durability == "full"
    assert config.plugin("retry").attempts == 3
    assert config.plugin("bulkhead").max_workers == 8
    assert config.plugin("timeout_budget").finalize_ms == 120_000
    assert {i.name for i in plugins.infos} >= {
        "error_sanitizer", "retry", "timeout_budget", "queue_logging", "bulkhead", "shared_client"}


def test_env_overrides_are_nested_and_typed() -> None:
    tree = env_overrides({"BALLAST__PLUGINS__RETRY__ATTEMPTS": "5",
                          "BALLAST__PLUGINS__RETRY__ENABLED": "false",
                          "BALLAST__SERVER__HOST": "127.0.0.2", "OTHER": "x"})
    assert tree == {"plugins": {"retry": {"attempts": 5, "enabled": False}},
                    "server": {"host": "127.0.0.2"}}
    config = load_settings(environ={"BALLAST__PLUGINS__RETRY__ATTEMPTS": "5"})
    load_plugins(config)
    assert config.plugin("retry").attempts == 5


@pytest.mark.parametrize(("toml", "env", "key"), [
    ("[server]\nprot = 1\n", {}, "server.prot"),
    ("[server]\nport = \"eighty\"\n", {}, "server.port"),
    ("[storage]\ndurability = \"sometimes\"\n", {}, "storage.durability"),
    ("[plugins.retry]\nattempts = 0\n", {}, "plugins.retry.attempts"),
    ("[plugins.retry]\nbogus = 1\n", {}, "plugins.retry.bogus"),
    ("[plugins.nosuch]\nenabled = true\n", {}, "plugins.nosuch"),
    ("", {"BALLAST__PLUGINS__BULKHEAD__MAX_WORKERS": "lots"}, "plugins.bulkhead.max_workers"),
    ("", {"BALLAST__SERVER__NOPE": "1"}, "server.nope"),
    ("[inference]\nprovider = \"openai\"\n", {}, "inference"),
])
def test_config_errors_name_the_key(tmp_path: Path, toml: str, env: dict[str, str], key: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_plugins(load_settings(path, environ=env))
    assert key in str(info.value)
    # The same through the CLI: exit 2 and the key in the message.
    result = run_cli("config", "check", str(path), env=env)
    assert result.returncode == 2, result.stderr
    assert key in result.stderr


def test_config_check_ok_and_show_redacts(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[inference]\nprovider = "openai"\nbase_url = "http://127.0.0.1:9/v1"\n'
                    'api_key_env = "BALLAST_TEST_KEY"\n')
    ok = run_cli("config", "check", str(path))
    assert ok.returncode == 0 and "ok" in ok.stdout
    show = run_cli("config", "show", "--config", str(path), env={"BALLAST_TEST_KEY": "sk-secret-123"})
    assert show.returncode == 0
    assert "sk-secret-123" not in show.stdout
    assert '"api_key_env": "BALLAST_TEST_KEY"' in show.stdout


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    assert run_cli("config", "check", str(tmp_path / "absent.toml")).returncode == 2
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    result = run_cli("config", "check", str(bad))
    assert result.returncode == 2 and "TOML" in result.stderr


def test_config_show_redacts_credentials_in_urls(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[inference]\nprovider = "openai"\nbase_url = "http://user:pa%40ss@127.0.0.1:9/v1"\n')
    show = run_cli("config", "show", "--config", str(path))
    assert show.returncode == 0, show.stderr
    assert "pa%40ss" not in show.stdout and "user:" not in show.stdout
    assert '"base_url": "http://***@127.0.0.1:9/v1"' in show.stdout
    # Paths are not secrets although their key says "keys".
    assert '"keys_file": "var/keys.toml"' in show.stdout


@pytest.mark.parametrize(("url", "shown"), [
    ("http://user:password@host/v1", "http://***@host/v1"),
    ("https://token@host:8443/x?y=1", "https://***@host:8443/x?y=1"),
    ("postgresql://app:s3cr@t@db.internal:5432/ballast", "postgresql://***@db.internal:5432/ballast"),
    ("http://host/v1?email=a@b.c", "http://host/v1?email=a@b.c"),
    ("http://host/v1", "http://host/v1"),
    ("", ""),
])
def test_redact_url(url: str, shown: str) -> None:
    from ballast.config import redact_url

    assert redact_url(url) == shown


def test_server_security_settings_default_and_validate() -> None:
    server = load_settings(environ={}).settings.server
    assert server.allow_unauthenticated is False
    assert server.header_timeout_s == 10.0
    with pytest.raises(ConfigError, match=r"server\.header_timeout_s"):
        load_settings(environ={"BALLAST__SERVER__HEADER_TIMEOUT_S": "0"})
