"""The inference port: what the session service asks of a model, whoever provides it.

Two questions are asked: *resolve* (which participant is each speaker label?) and
*report* (summarise a finalized session). Providers (``builtin``, ``openai``) implement
:class:`InferenceProvider`; replies are validated with the models below, extra keys
ignored, so a chatty model cannot corrupt stored data.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

#: Response header on an answer that a fallback gave instead of the configured provider.
DEGRADED_HEADER = "X-Ballast-Degraded"

#: Runs blocking work off the event loop (the app's executor for blocking work).
RunBlocking = Callable[..., Awaitable[Any]]


#: One utterance: ``(speaker label, start_ms, end_ms, text)``.
Utterance = tuple[str, int, int, str]


@dataclass(slots=True)
class TranscriptWindow:
    """The two ends of a transcript: ``head`` (its first utterances), ``tail`` (its last,
    after the head) and how many entries lie between them unread (``omitted``)."""

    head: list[Utterance]
    tail: list[Utterance] = field(default_factory=list)
    omitted: int = 0

    def labels(self) -> set[str]:
        return {u[0] for u in self.head} | {u[0] for u in self.tail}


class TranscriptSource(Protocol):
    """A session's utterances in seq order, read from storage on demand.

    Iterating reads every utterance and blocks: do it in a worker thread (the builtin
    provider does, through ``run_blocking``). :meth:`window` reads only the two ends,
    whatever the session's length: what a bounded prompt needs.
    """

    def __iter__(self) -> Iterator[Utterance]: ...

    async def window(self, head: int, tail: int) -> TranscriptWindow:
        """At most ``head`` utterances from the start and ``tail`` from the end."""
        ...


@dataclass(slots=True)
class ResolveInput:
    session_id: str
    participants: list[str]
    utterances: Sequence[Utterance] | TranscriptSource
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
    #: Set only by code (never from a model's reply): the answer came from a fallback.
    _degraded: str | None = PrivateAttr(default=None)

    @property
    def degraded(self) -> bool:
        """True when this answer is not the configured provider's (see :func:`mark_degraded`)."""
        return self._degraded is not None

    @property
    def degraded_reason(self) -> str | None:
        """Why the configured provider's answer was replaced (a ``Reason`` code), if it was."""
        return self._degraded


class ResolveReply(_Reply):
    mapping: dict[str, str]


class ActionItemReply(_Reply):
    owner: str | None = None
    text: str = Field(min_length=1)


class ReportReply(_Reply):
    summary: str
    highlights: list[str] = []
    action_items: list[ActionItemReply] = []


_R = TypeVar("_R", bound=_Reply)


def mark_degraded(reply: _R, reason: str) -> _R:
    """Mark ``reply`` as a stand-in for the configured provider's answer.

    The session service passes the mark on to its client (``X-Ballast-Degraded:
    inference`` and ``"degraded": true``): a degraded answer is never passed off as
    the real thing. A model's reply cannot set it: it is not a field.
    """
    reply._degraded = reason
    return reply


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


#: Wraps the provider the session service uses (hook ``ballast_inference_wrappers``).
InferenceWrapper = Callable[[InferenceProvider], InferenceProvider]


def wrap_provider(provider: InferenceProvider, wrappers: Sequence[InferenceWrapper]) -> InferenceProvider:
    """Apply ``wrappers`` so that the first one is outermost."""
    for wrap in reversed(wrappers):
        provider = wrap(provider)
    return provider
