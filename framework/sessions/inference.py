"""The inference port: what the session service asks of a model, whoever provides it.

Two questions are asked: *resolve* (which participant is each speaker label?) and
*report* (summarise a finalized session). Providers (``builtin``, ``openai``) implement
:class:`InferenceProvider`; replies are validated with the models below, extra keys
ignored, so a chatty model cannot corrupt stored data.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

#: Runs blocking work off the event loop (the app's executor for blocking work).
RunBlocking = Callable[..., Awaitable[Any]]


@dataclass(slots=True)
class ResolveInput:
    session_id: str
    participants: list[str]
    utterances: Sequence[tuple[str, int, int, str]]
    known: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class ReportInput:
    session_id: str
    title: str | None
    participants: list[str]
    speakers: dict[str, str]
    stats: dict[str, Any]
    utterances: Sequence[tuple[str, int, int, str]]
    notes: list[str] = field(default_factory=list)


class _Reply(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ResolveReply(_Reply):
    mapping: dict[str, str]


class ActionItemReply(_Reply):
    owner: str | None = None
    text: str = Field(min_length=1)


class ReportReply(_Reply):
    summary: str
    highlights: list[str] = []
    action_items: list[ActionItemReply] = []


class InferenceProvider(Protocol):
    """A source of speaker resolution and session reports."""

    name: str

    async def resolve(self, data: ResolveInput) -> ResolveReply:
        """Map speaker labels to participant names; labels it cannot place are left out."""
        ...

    async def report(self, data: ReportInput) -> ReportReply:
        """Summary, highlights and action items for a finalized session."""
        ...

    async def close(self) -> None: ...
