"""Settings: TOML file + ``BALLAST__SECTION__KEY`` environment overrides, validated.

The file is ``config/default.toml`` unless ``--config`` names another; environment
variables override single keys on top of it. Validation is pydantic's: unknown keys and
bad values are :class:`~ballast.errors.ConfigError` whose message names the dotted key
(``plugins.retry.attempts``). Plugin sections are validated against each plugin's own
settings model once the plugins are known (see :mod:`ballast.plugin_manager`).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ballast.errors import ConfigError

ENV_PREFIX = "BALLAST__"
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = PACKAGE_ROOT / "config" / "default.toml"
SECRET_MARKERS = ("key", "secret", "token", "password", "authorization")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    shutdown_timeout_s: float = Field(10.0, gt=0, le=600)
    #: Serve on a non-loopback address with the ``auth`` plugin disabled.
    allow_unauthenticated: bool = False
    #: A connection that has not sent a complete request head within this is closed.
    header_timeout_s: float = Field(10.0, gt=0, le=600)
    #: Server processes sharing the port (SO_REUSEPORT); 1 runs in this process.
    workers: int = Field(1, ge=1, le=64)
    #: Run on uvloop when it is installed (a dependency on CPython/Linux and macOS):
    #: its sockets and scheduling cost less per request. false: the stdlib event loop.
    uvloop: bool = True


class StorageSettings(_Section):
    backend: Literal["sqlite", "postgres"] = "sqlite"
    path: str = "var/ballast.db"
    durability: Literal["full", "normal"] = "full"
    #: PostgreSQL: the URL itself, or the name of an environment variable holding it
    #: (so no password sits in a file). Exactly one is needed with backend "postgres".
    url: str = ""
    url_env: str = ""
    #: PostgreSQL connections per server process.
    pool_size: int = Field(10, ge=1, le=200)
    #: How long a finalize job's lease lasts without a renewal before another server
    #: process may take the job over.
    job_lease_s: float = Field(15.0, ge=0.5, le=600)

    @model_validator(mode="after")
    def _postgres_needs_url(self) -> StorageSettings:
        if self.backend == "postgres" and not (self.url or self.url_env):
            raise ValueError("url or url_env is required when backend is 'postgres'")
        if self.url and self.url_env:
            raise ValueError("set url or url_env, not both")
        return self

    def postgres_url(self, environ: Mapping[str, str] | None = None) -> str:
        """The PostgreSQL URL, read from ``url_env`` at the time of the call if named."""
        if self.url:
            return self.url
        env = os.environ if environ is None else environ
        value = env.get(self.url_env, "")
        if not value:
            raise ConfigError(f"storage.url_env: environment variable {self.url_env} is not set")
        return value


class SessionSettings(_Section):
    """Limits of one session (a batch past one is refused whole with a 409 problem)."""

    max_participants: int = Field(1000, ge=1, le=100_000)
    max_speaker_labels: int = Field(1000, ge=1, le=100_000)
    max_mutations: int = Field(1_000_000, ge=1, le=100_000_000)


class InferenceSettings(_Section):
    provider: Literal["builtin", "openai"] = "builtin"
    base_url: str = ""
    model: str = ""
    api_key_env: str = ""
    timeout_ms: int = Field(20_000, ge=1, le=600_000)
    #: Larger upstream bodies fail the attempt (kind "too_large") instead of being read.
    max_response_bytes: int = Field(4 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)

    @model_validator(mode="after")
    def _remote_needs_url(self) -> InferenceSettings:
        if self.provider == "openai" and not self.base_url:
            raise ValueError("base_url is required when provider is 'openai'")
        return self


class LoggingSettings(_Section):
    format: Literal["json", "console"] = "json"
    level: Literal["debug", "info", "warning", "error", "critical"] = "info"


class PluginSection(BaseModel):
    """What every ``[plugins.<name>]`` section has; plugins extend it with their keys."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    enabled: bool = True


class Settings(_Section):
    server: ServerSettings = ServerSettings()
    storage: StorageSettings = StorageSettings()
    sessions: SessionSettings = SessionSettings()
    inference: InferenceSettings = InferenceSettings()
    logging: LoggingSettings = LoggingSettings()
    # Raw until the plugin manager validates each against its plugin's model.
    plugins: dict[str, dict[str, Any]] = {}


class Config:
    """Validated settings plus each plugin's validated section."""

    def __init__(self, settings: Settings, source: str) -> None:
        self.settings = settings
        self.source = source
        self.plugins: dict[str, PluginSection] = {}

    def plugin(self, name: str) -> Any:
        """The validated section of plugin ``name`` (its own settings model)."""
        try:
            return self.plugins[name]
        except KeyError:
            raise ConfigError(f"plugins.{name}: no such plugin is registered") from None

    def as_dict(self, *, redact: bool = True) -> dict[str, Any]:
        data = self.settings.model_dump(mode="json")
        data["plugins"] = {n: s.model_dump(mode="json") for n, s in sorted(self.plugins.items())}
        return _redact(data) if redact else data


#: ``scheme://user:password@`` (or ``scheme://token@``): the credentials part of a URL.
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#\s]+@")


def redact_url(text: str) -> str:
    """``http://user:pw@host/v1`` -> ``http://***@host/v1``; other text unchanged."""
    return _URL_USERINFO.sub(r"\1***@", text) if "@" in text else text


def _redact(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _redact(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v, key) for v in value]
    if key and any(m in key.lower() for m in SECRET_MARKERS) and value \
            and not key.endswith(("_env", "_file")):
        return "***"
    if isinstance(value, str):
        return redact_url(value)
    return value


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """One line per problem, each naming the dotted key."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        if err["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown key")
        else:
            lines.append(f"{loc}: {err['msg']} (got {_short(err.get('input'))})")
    return "; ".join(lines)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _parse_env_value(raw: str) -> Any:
    """Env values are TOML/JSON-ish scalars: true, 5, 0.5, "x", [429, 503]; else a string."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        lowered = raw.strip().lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        return raw


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``BALLAST__PLUGINS__RETRY__ATTEMPTS=5`` -> ``{"plugins": {"retry": {"attempts": 5}}}``."""
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX):].split("__")]
        if not all(parts):
            raise ConfigError(f"{name}: malformed override; use BALLAST__SECTION__KEY")
        node = tree
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{name}: conflicts with another override of {part}")
            node = child
        node[parts[-1]] = _parse_env_value(raw)
    return tree


def deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def load_settings(path: str | Path | None = None,
                  environ: Mapping[str, str] | None = None) -> Config:
    """Read the file (default ``config/default.toml``), apply env overrides, validate."""
    file = Path(path) if path is not None else DEFAULT_CONFIG
    data = read_toml(file) if file.exists() or path is not None else {}
    data = deep_merge(data, env_overrides(os.environ if environ is None else environ))
    plugins = data.get("plugins", {})
    if not isinstance(plugins, dict) or not all(isinstance(v, dict) for v in plugins.values()):
        raise ConfigError("plugins: each plugin must be a table [plugins.<name>]")
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    return Config(settings, str(file))
