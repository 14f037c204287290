"""The scale-out settings: ``storage.backend = "postgres"`` with its URL, and ``server.workers``."""

from __future__ import annotations

from pathlib import Path

import pytest

from ballast.config import load_settings
from ballast.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_postgres_needs_a_url_or_the_name_of_a_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"storage: .*url or url_env is required"):
        load_settings(write(tmp_path, '[storage]\nbackend = "postgres"\n'), environ={})
    with pytest.raises(ConfigError, match=r"not both"):
        load_settings(write(tmp_path, '[storage]\nbackend = "postgres"\nurl = "postgresql://a/b"\n'
                                      'url_env = "X"\n'), environ={})
    with pytest.raises(ConfigError, match=r"storage.backend"):
        load_settings(write(tmp_path, '[storage]\nbackend = "mysql"\n'), environ={})


def test_url_env_is_read_when_asked_and_a_missing_variable_is_named(tmp_path: Path) -> None:
    config = load_settings(write(tmp_path, '[storage]\nbackend = "postgres"\nurl_env = "PG_URL"\n'),
                           environ={})
    storage = config.settings.storage
    assert storage.postgres_url({"PG_URL": "postgresql://u:pw@h/db"}) == "postgresql://u:pw@h/db"
    with pytest.raises(ConfigError, match=r"storage.url_env: environment variable PG_URL is not set"):
        storage.postgres_url({})


def test_defaults_and_overrides(tmp_path: Path) -> None:
    config = load_settings(write(tmp_path, ""), environ={
        "BALLAST__SERVER__WORKERS": "3", "BALLAST__STORAGE__POOL_SIZE": "4",
        "BALLAST__STORAGE__JOB_LEASE_S": "2.5"})
    assert config.settings.server.workers == 3
    assert config.settings.storage.pool_size == 4
    assert config.settings.storage.job_lease_s == 2.5
    default = load_settings(write(tmp_path, ""), environ={})
    assert default.settings.server.workers == 1
    assert default.settings.storage.job_lease_s == 15.0
    with pytest.raises(ConfigError, match=r"server.workers"):
        load_settings(write(tmp_path, "[server]\nworkers = 0\n"), environ={})


def test_config_show_never_prints_the_password_of_the_url(tmp_path: Path) -> None:
    config = load_settings(write(tmp_path, '[storage]\nbackend = "postgres"\n'
                                           'url = "postgresql://ballast:s3cret@db:5432/prod"\n'),
                           environ={})
    shown = config.as_dict(redact=True)["storage"]["url"]
    assert shown == "postgresql://***@db:5432/prod"
    assert "s3cret" not in str(config.as_dict(redact=True))


def test_serve_with_an_unreachable_database_exits_1_naming_storage_not_the_password() -> None:
    from support import free_port, run_cli

    result = run_cli("serve", env={
        "BALLAST__STORAGE__BACKEND": "postgres", "BALLAST__SERVER__PORT": str(free_port()),
        "BALLAST__STORAGE__URL": "postgresql://ballast:s3cret-pw@127.0.0.1:1/none"})
    assert result.returncode == 1
    assert "ballast: error: storage: cannot open the PostgreSQL store" in result.stderr
    assert "Traceback" not in result.stderr
    assert "s3cret-pw" not in result.stderr + result.stdout
