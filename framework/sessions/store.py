"""The store port: what the session service needs from durable storage, whoever provides it.

The session handlers, the mutation queue and the finalize job speak only to
:class:`Store`. The embedded default is the SQLite adapter
(:mod:`ballast.sessions.sqlite_store`); the port is shaped so that a PostgreSQL
adapter can follow without touching the callers: every write goes through one ordered
path per session, sequence numbers are assigned inside the committing transaction, and
a returned write is a committed write.

The records below are plain dataclasses rather than API models: the store knows
nothing about HTTP, and the API layer builds its responses from them.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any, Final, Protocol

from ballast.errors import Conflict, NotFound

#: Every state a session can be in, in lifecycle order.
SESSION_STATES: Final = ("open", "finalizing", "finalized", "failed")

#: The internal mutation type the service appends after speaker resolution
#: (payload ``{"mapping": {label: name}}``); never accepted from clients.
SPEAKERS_RESOLVED: Final = "speakers_resolved"

#: The error a job that was running when the server stopped is left with by
#: :meth:`Store.recover`.
INTERRUPTED_JOB_ERROR: Final = {
    "title": "Finalize interrupted",
    "detail": "The server stopped while the job was running; run finalize again.",
}


@dataclass(slots=True)
class SessionRecord:
    """A session row, with the state materialized from its mutation log."""

    session_id: str
    state: str  # open | finalizing | finalized | failed
    title: str | None
    participants: list[str]
    mutation_count: int
    last_seq: int
    speakers: dict[str, str]
    created_at: str


@dataclass(slots=True)
class Accepted:
    """The outcome of one mutation of a batch: its seq, or the original seq of a repeat."""

    id: str | None
    seq: int
    duplicate: bool


@dataclass(slots=True)
class AppendResult:
    """The outcome of a committed batch; ``last_seq`` is the session's after the batch."""

    accepted: list[Accepted]
    last_seq: int


#: Called (on the event loop) when a batch of mutations failed to commit for a reason
#: other than the client's: ``(session_id, mutations of the failed batch, error)``.
FailureHook = Callable[[str, list[dict[str, Any]], BaseException], None]


def session_not_found(session_id: str) -> NotFound:
    """The error every adapter raises for an unknown session id."""
    return NotFound(f"Session '{session_id}' does not exist.")


def session_exists(session_id: str) -> Conflict:
    """The error every adapter raises when a session id is already taken."""
    return Conflict(f"Session '{session_id}' already exists; choose another session_id.")


def session_not_open(session_id: str, state: str) -> Conflict:
    """The error every adapter raises for a mutation to a session that is not open."""
    return Conflict(f"Session '{session_id}' is {state}; mutations are accepted only while it is open.")


class Store(Protocol):
    """Durable sessions, their mutation logs, finalize jobs and reports.

    Writes are ordered: appends, state changes and saves for a session are applied in
    the order they were called, and a write that returns has been committed (with
    durability ``full``, fsynced). Failures that are the caller's (unknown session,
    session not open, id taken) raise :class:`~ballast.errors.NotFound` or
    :class:`~ballast.errors.Conflict`; anything else raises
    :class:`~ballast.errors.StoreError`.
    """

    async def open(self) -> None:
        """Create the database (and its directories and schema) and start the writer."""
        ...

    async def close(self) -> None:
        """Commit what is already queued, stop the writer and close every connection."""
        ...

    async def create_session(
        self, session_id: str, title: str | None, participants: list[str]
    ) -> SessionRecord:
        """Create an open session; an existing id raises ``Conflict``."""
        ...

    async def get_session(self, session_id: str) -> SessionRecord | None:
        """The session, or ``None`` if there is none with that id."""
        ...

    async def get_session_with_job(
        self, session_id: str
    ) -> tuple[SessionRecord | None, dict[str, Any] | None]:
        """The session and its finalize job, read together (one snapshot, one round trip).

        ``(None, None)`` if there is no session with that id; the job is ``None`` if the
        session has none.
        """
        ...

    async def list_sessions(
        self, after: str | None, limit: int
    ) -> list[tuple[SessionRecord, dict[str, Any] | None]] | None:
        """Up to ``limit`` sessions created after session ``after`` (from the first when
        ``None``), in creation order, each with its finalize job (or ``None``).

        ``None`` when ``after`` names no session: a cursor must come from a listing.
        """
        ...

    async def append(self, session_id: str, mutations: list[dict[str, Any]]) -> AppendResult:
        """Apply a batch of validated mutations whole, or not at all.

        Each mutation is ``{"id"?, "type", **fields}``. New mutations get the next
        seqs of the session in order; a mutation whose id is already stored (or
        repeated earlier in the batch) is not stored again and reports its original
        seq with ``duplicate=True``.
        """
        ...

    async def list_mutations(self, session_id: str, after: int, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` mutations with seq > ``after``, in seq order.

        Each is ``{"seq", "id", "type", **fields}``. An unknown session has none.
        """
        ...

    def iter_mutations(self, session_id: str, batch: int = 5000) -> Iterator[dict[str, Any]]:
        """Every mutation of the session in seq order, streamed in constant memory.

        Synchronous and blocking: call it from a worker thread. It reads with its own
        connection, so it never competes with the request path's readers.
        """
        ...

    async def pending(self, session_id: str) -> int:
        """How many appended batches of the session are queued but not yet committed."""
        ...

    async def drain(self, session_id: str) -> None:
        """Wait until every batch appended to the session so far has been settled."""
        ...

    async def set_state(self, session_id: str, state: str, *, expect: Collection[str] | None = None) -> bool:
        """Set the session's state, ordered with appends.

        With ``expect``, only if the current state is one of those (compare-and-set):
        returns ``False`` and changes nothing otherwise. Unknown session: ``NotFound``.
        """
        ...

    async def save_job(self, session_id: str, job: dict[str, Any]) -> None:
        """Store (replace) the session's finalize job."""
        ...

    async def get_job(self, session_id: str) -> dict[str, Any] | None:
        """The session's finalize job, or ``None``."""
        ...

    async def save_report(self, session_id: str, report: dict[str, Any]) -> None:
        """Store (replace) the session's report."""
        ...

    async def get_report(self, session_id: str) -> dict[str, Any] | None:
        """The session's report, or ``None``."""
        ...

    async def recover(self) -> int:
        """Repair what a stopped server left behind; call once at start-up.

        Every job still ``running`` becomes ``failed`` with
        :data:`INTERRUPTED_JOB_ERROR` (and its running stage ``failed``), and every
        session still ``finalizing`` becomes ``failed``, so finalize can be run again.
        Returns how many jobs were repaired.
        """
        ...
