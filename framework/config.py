"""Settings: TOML file + ``BALLAST__SECTION__KEY`` environment overrides, validated.

The file is ``config/default.toml`` unless ``--config`` names another; environment
variables override single keys on top of it. Validation is pydantic's: unknown keys and
bad values are :class:`~ballast.errors.ConfigError` whose message names the dotted key
(``plugins.retry.attempts``). Plugin sections are validated against each plugin's own
settings model once the plugins are known (see :mod:`ballast.plugin_manager`).
"""

from __future__ import annotations

import os
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
    #: Run on uvloop when it is installed (a dependency on CPython/Linux and macOS):
    #: its sockets and scheduling cost less per request. false: the stdlib event loop.
    uvloop: bool = True


class StorageSettings(_Section):
    backend: Literal["sqlite"] = "sqlite"
    path: str = "var/ballast.db"
    durability: Literal["full", "normal"] = "full"


class InferenceSettings(_Section):
    provider: Literal["builtin", "openai"] = "builtin"
    base_url: str = ""
    model: str = ""
    api_key_env: str = ""
    timeout_ms: int = Field(20_000, ge=1, le=600_000)

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


def _redact(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _redact(v, k) for k, v in value.items()}
    if key and any(m in key.lower() for m in SECRET_MARKERS) and not key.endswith("_env") and value:
        return "***"
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
