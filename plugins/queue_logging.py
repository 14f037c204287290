"""queue_logging: a failed mutation is logged, never swallowed.

The per-session mutation queue keeps going after a batch fails to apply (the core
guarantees that); this plugin makes every failure visible: one ``session.mutation_failed``
line per mutation of the failed batch, with the session id, the mutation's id and type,
and the error's type and message. The message is server-side only; the caller gets a
sanitized error.

Disabled: failures still fail their caller and the queue still goes on, but nothing is
logged about which mutation failed or why.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from ballast.config import Config, PluginSection
from ballast.hookspecs import hookimpl
from ballast.logging import get_logger

log = get_logger("ballast.queue")


class Settings(PluginSection):
    max_logged_per_batch: int = Field(
        500, ge=1, le=500, description="mutations of one failed batch logged individually")


@hookimpl
def ballast_settings_model() -> type[PluginSection]:
    return Settings


@hookimpl
def ballast_mutation_failed(config: Config, session_id: str, mutations: list[dict[str, Any]],
                            error: BaseException) -> None:
    error_type = type(error).__name__
    message = getattr(error, "internal", None) or str(error)
    settings: Settings = config.plugin("queue_logging")
    limit = settings.max_logged_per_batch
    for index, mutation in enumerate(mutations[:limit]):
        log.error("session.mutation_failed", session_id=session_id,
                  mutation_id=mutation.get("id"), mutation_type=mutation.get("type"),
                  batch_index=index, batch_size=len(mutations),
                  error_type=error_type, error=message)
    if len(mutations) > limit:
        log.error("session.mutation_failed", session_id=session_id, mutation_id=None,
                  mutation_type=None, batch_index=limit, batch_size=len(mutations),
                  error_type=error_type, error=message, omitted=len(mutations) - limit)
