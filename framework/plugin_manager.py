"""The plugin manager: which plugins exist, which are enabled, and their settings.

Builtin plugins are listed here, in one place, in their explicit order; third-party
plugins come from the entry-point group ``ballast.plugins`` (the entry-point name is the
plugin name and its ``[plugins.<name>]`` section). A disabled plugin is blocked before
registration, so none of its hooks run, but its settings are still validated and shown.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from types import ModuleType
from typing import Any

import pluggy
from pydantic import BaseModel, ValidationError

from ballast import hookspecs
from ballast.config import Config, PluginSection, format_validation_error
from ballast.errors import ConfigError, PluginError

ENTRY_POINT_GROUP = "ballast.plugins"

#: Builtin plugins, in order. Middleware order is set by each plugin's ``order``; this
#: order decides registration (and so the order of wrappers: first is outermost).
BUILTIN_PLUGINS: tuple[tuple[str, str], ...] = (
    ("error_sanitizer", "ballast.plugins.error_sanitizer"),
    ("timeout_budget", "ballast.plugins.timeout_budget"),
    ("retry", "ballast.plugins.retry"),
    ("shared_client", "ballast.plugins.shared_client"),
    ("bulkhead", "ballast.plugins.bulkhead"),
    ("queue_logging", "ballast.plugins.queue_logging"),
    ("circuit_breaker", "ballast.plugins.circuit_breaker"),
    ("fallback", "ballast.plugins.fallback"),
    ("auth", "ballast.plugins.auth"),
    ("metrics", "ballast.plugins.metrics"),
    ("tracing", "ballast.plugins.tracing"),
    ("adaptive_concurrency", "ballast.plugins.adaptive_concurrency"),
)


@dataclass(slots=True)
class PluginInfo:
    name: str
    source: str
    enabled: bool
    module: Any
    settings: BaseModel
    hooks: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "enabled": self.enabled,
            "source": self.source,
            "hooks": self.hooks,
            "settings": self.settings.model_dump(mode="json"),
        }


def _hook_names(obj: Any) -> list[str]:
    return sorted(n for n in dir(obj) if n.startswith("ballast_") and callable(getattr(obj, n)))


def _settings_model(name: str, plugin: Any) -> type[PluginSection]:
    factory = getattr(plugin, "ballast_settings_model", None)
    model = factory() if factory is not None else PluginSection
    if not (isinstance(model, type) and issubclass(model, PluginSection)):
        raise PluginError(f"plugin {name!r}: ballast_settings_model must return a "
                          "subclass of ballast.config.PluginSection")
    return model


def _import_builtin(name: str, module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except Exception as exc:
        raise PluginError(f"builtin plugin {name!r} failed to import ({module}): "
                          f"{type(exc).__name__}: {exc}") from exc


def _load_entry_point(ep: EntryPoint) -> Any:
    try:
        return ep.load()
    except Exception as exc:
        raise PluginError(f"plugin {ep.name!r} from entry point {ep.value!r} failed to load: "
                          f"{type(exc).__name__}: {exc}") from exc


class Plugins:
    """The loaded plugin manager plus what ``ballast plugins`` reports."""

    def __init__(self, pm: pluggy.PluginManager, infos: list[PluginInfo]) -> None:
        self.pm = pm
        self.infos = infos

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def enabled(self, name: str) -> bool:
        return any(i.name == name and i.enabled for i in self.infos)


def load_plugins(config: Config, *, eps: Iterable[EntryPoint] | None = None,
                 extra: Iterable[tuple[str, Any]] = ()) -> Plugins:
    """Register builtin and entry-point plugins per ``config``; validate their sections.

    :param eps: entry points to load instead of the installed ``ballast.plugins`` group.
    :param extra: ``(name, plugin object)`` pairs registered after the rest (tests).
    Raises :class:`ConfigError` for bad settings or unknown plugin names and
    :class:`PluginError` for a plugin that fails to load.
    """
    pm = pluggy.PluginManager("ballast")
    pm.add_hookspecs(hookspecs)
    raw_sections = config.settings.plugins
    candidates: list[tuple[str, str, Any]] = [
        (name, "builtin", _import_builtin(name, module)) for name, module in BUILTIN_PLUGINS
    ]
    found = entry_points(group=ENTRY_POINT_GROUP) if eps is None else eps
    for ep in found:
        dist = getattr(ep, "dist", None)
        source = f"entry point {dist.name}" if dist is not None else f"entry point {ep.value}"
        candidates.append((ep.name, source, _load_entry_point(ep)))
    candidates.extend((name, "registered", obj) for name, obj in extra)

    known = {name for name, _, _ in candidates}
    if len(known) != len(candidates):
        dupes = sorted({n for n, _, _ in candidates if [c[0] for c in candidates].count(n) > 1})
        raise PluginError(f"plugin name registered twice: {', '.join(dupes)}")
    unknown = sorted(set(raw_sections) - known)
    if unknown:
        raise ConfigError("; ".join(
            f"plugins.{n}: unknown plugin (known: {', '.join(sorted(known))})" for n in unknown))

    infos: list[PluginInfo] = []
    for name, source, plugin in candidates:
        model = _settings_model(name, plugin)
        try:
            section = model.model_validate(raw_sections.get(name, {}))
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, prefix=f"plugins.{name}")) from None
        config.plugins[name] = section
        if not section.enabled:
            pm.set_blocked(name)
        else:
            pm.register(plugin, name=name)
        infos.append(PluginInfo(name, source, section.enabled, plugin, section, _hook_names(plugin)))

    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin implements an unknown hook: {exc}") from exc
    pm.hook.ballast_configure(config=config)
    return Plugins(pm, infos)
