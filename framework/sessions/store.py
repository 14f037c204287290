"""The store port: what the session service needs from durable storage, whoever provides it.

The session handlers, the mutation queue and the finalize job speak only to
:class:`Store`. The embedded default is the SQLite adapter
(:mod:`ballast.sessions.sqlite_store`); a PostgreSQL adapter implements the same port
for several server processes on one database. What an adapter must guarantee is written
on each method below; what every adapter shares (numbering a batch with idempotent ids,
the derived participant and speaker rows, session limits, the finalize job's state
machine) is written once in :mod:`ballast.sessions.ingest` and
:mod:`ballast.sessions.jobrecord`, and adapters call it inside their transactions.

Tenants. Every session belongs to a tenant (``default`` when no authentication plugin
names one). A session is identified by ``(tenant, session_id)``: ids are unique per
tenant, and EVERY method takes the tenant and looks only at that tenant's rows, so a
session of another tenant is indistinguishable from a missing one.

Finalize jobs. A session has at most one job record. Its state and the session's state
change together, in ONE transaction per transition, each transition checking the state
it expects (see :mod:`ballast.sessions.jobrecord` for the machine). A running job is
leased: it has an owner, a lease expiry and a fencing token. The owner renews the lease
while it works; when a lease expires (the owner died), any process may claim the job
(:meth:`Store.claim_expired_jobs`), which moves the fencing token on, so every later
write of the old owner fails with :class:`LeaseLost`.

For adapter authors (the SQLite adapter is the reference):

* Every write of one session runs in one transaction that first locks the session
  (SQLite: the database write lock; PostgreSQL: ``SELECT ... FOR UPDATE`` on the
  session row, or a transaction-scoped advisory lock on its key), so seqs stay
  gapless and a job transition sees the states it checks unchanged until it commits.
* Appends: :func:`ingest.number`, insert the rows (a unique index on (session,
  mutation id) catches repeats), :func:`ingest.derive`, insert-if-absent the
  participant and label rows, :func:`ingest.check_limits`, update the session's
  counters.
* Job transitions: read the session state and the job row, call the matching function
  of :mod:`jobrecord` (``plan_start``/``started``, ``check_lease``, ``plan_finish``,
  ``released``, ``taken_over``) and write what it returns. The job columns are
  :data:`jobrecord.JOB_COLUMNS` (``job_row``/``job_from_row`` convert them).
* Lease times are wall-clock Unix seconds (``time.time()``); with several hosts, keep
  their clocks in sync (NTP) or take the time from the database.

The records below are plain dataclasses rather than API models: the store knows
nothing about HTTP, and the API layer builds its responses from them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from ballast.errors import ClientError, Conflict, NotFound, StoreError

#: Every state a session can be in, in lifecycle order.
SESSION_STATES: Final = ("open", "finalizing", "finalized", "failed")

#: The internal mutation type the service appends after speaker resolution
#: (payload ``{"mapping": {label: name}}``); never accepted from clients.
SPEAKERS_RESOLVED: Final = "speakers_resolved"


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """What one session may hold; a batch that would pass a limit is refused whole (409).

    They keep every per-session cost bounded: the size of ``GET /v1/sessions/{id}``
    (participants and speaker names are listed in it), the rows an append touches, and
    the work of replaying the log in finalize.
    """

    max_participants: int = 1000
    max_speaker_labels: int = 1000
    max_mutations: int = 1_000_000


@dataclass(slots=True)
class SessionRecord:
    """A session row, with its participants and named speakers.

    ``participants`` are in order of first joining (each name once); ``speakers`` maps
    the labels that have a name to it. Both are bounded by :class:`SessionLimits`.
    """

    session_id: str
    state: str  # open | finalizing | finalized | failed
    title: str | None
    participants: list[str]
    mutation_count: int
    last_seq: int
    speakers: dict[str, str]
    created_at: str
    tenant: str = "default"


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


@dataclass(slots=True)
class JobRecord:
    """A session's finalize job as stored.

    ``state`` is ``running``, ``succeeded``, ``failed`` or ``timed_out``. ``fence`` is
    the fencing token: it moves on with every start and every takeover, and a write
    that names an older one is refused. ``owner`` and ``lease_expires`` (Unix seconds;
    0 once released) say who runs it and until when; both are meaningful only while
    the job runs. ``takeovers`` counts how often the job changed hands. ``progress`` is
    what clients see: ``budget_ms``, ``elapsed_ms``, ``stages``, ``error``,
    ``started_at``.
    """

    state: str
    attempt: int
    fence: int
    owner: str | None
    lease_expires: float
    heartbeat_at: float | None
    takeovers: int
    progress: dict[str, Any] = field(default_factory=dict)

    def view(self) -> dict[str, Any]:
        """The job as the API shows it."""
        p = self.progress
        return {"state": self.state, "attempt": self.attempt, "budget_ms": p.get("budget_ms"),
                "elapsed_ms": p.get("elapsed_ms", 0), "stages": p.get("stages", []),
                "error": p.get("error")}


@dataclass(frozen=True, slots=True)
class Lease:
    """The right to write one running job: valid while the stored fence is still ``fence``."""

    tenant: str
    session_id: str
    owner: str
    fence: int


@dataclass(slots=True)
class JobStart:
    """The outcome of :meth:`Store.start_job`.

    ``lease`` is set when this call started a new attempt (the caller must now run it);
    otherwise ``job`` is the existing job (running elsewhere, or already succeeded).
    """

    job: JobRecord
    lease: Lease | None


@dataclass(slots=True)
class ClaimedJob:
    """A running job whose owner's lease expired, now leased to the claimer."""

    lease: Lease
    job: JobRecord


class LeaseLost(StoreError):
    """A job write named a fence that is no longer current (or the job is no longer running).

    The job was taken over by another process (or ended): the writer must stop working
    on it and write nothing more. Never shown to a client.
    """


#: Called (on the event loop) when a batch of mutations failed to commit for a reason
#: other than the client's: ``(session_id, mutations of the failed batch, error)``.
FailureHook = Callable[[str, list[dict[str, Any]], BaseException], None]


def session_not_found(session_id: str) -> NotFound:
    """The error every adapter raises for an unknown session id (or another tenant's)."""
    return NotFound(f"Session '{session_id}' does not exist.")


def session_exists(session_id: str) -> Conflict:
    """The error every adapter raises when a session id is already taken."""
    return Conflict(f"Session '{session_id}' already exists; choose another session_id.")


def session_not_open(session_id: str, state: str) -> Conflict:
    """The error every adapter raises for a mutation to a session that is not open."""
    return Conflict(f"Session '{session_id}' is {state}; mutations are accepted only while it is open.")


def session_limit(session_id: str, what: str, limit: int) -> ClientError:
    """The error for a batch that would take a session past one of its limits."""
    return ClientError(
        f"Session '{session_id}' can hold at most {limit} {what}; this batch would pass "
        "that limit and was not applied.",
        status=409, title="Session limit reached")


def unknown_cursor(after: str) -> ClientError:
    """The error for a listing cursor that names no session of the caller."""
    return ClientError(f"Query parameter 'after' names no session of yours ({after[:64]!r}).")


class Store(Protocol):
    """Durable sessions, their mutation logs, finalize jobs and reports, per tenant.

    Writes are ordered: appends and job transitions for a session are applied in the
    order they were called (per process), and a write that returns has been committed
    (with SQLite durability ``full``, fsynced; with PostgreSQL, ``synchronous_commit``
    on). Failures that are the caller's (unknown session, session not open, id taken,
    a limit) raise a :class:`~ballast.errors.ClientError`; a job write with a stale
    fence raises :class:`LeaseLost`; anything else raises
    :class:`~ballast.errors.StoreError`. A write whose outcome is unknown (the
    connection died during COMMIT) raises ``StoreError``: the caller must treat it as
    possibly committed, which is why every write here is safe to repeat.
    """

    @property
    def failure(self) -> str | None:
        """Why the store can no longer write (its writer died), or ``None`` while healthy.

        Readiness reports a store with a failure as not ready.
        """
        ...

    async def open(self) -> None:
        """Create the database (and its directories), migrate the schema, start the writer.

        Migrations run in order, each in its own transaction, and are recorded in a
        version table; a database newer than the code is refused with a StoreError.
        """
        ...

    async def close(self) -> None:
        """Commit what is already queued, stop the writer and close every connection."""
        ...

    # ------------------------------------------------------------------ sessions

    async def create_session(
        self, tenant: str, session_id: str, title: str | None, participants: list[str]
    ) -> SessionRecord:
        """Create an open session; an id the tenant already has raises ``Conflict``.

        Repeated participant names are kept once; more than ``max_participants`` is a
        limit error.
        """
        ...

    async def get_session(self, tenant: str, session_id: str) -> SessionRecord | None:
        """The session, or ``None`` if the tenant has none with that id."""
        ...

    async def get_session_with_job(
        self, tenant: str, session_id: str
    ) -> tuple[SessionRecord | None, JobRecord | None]:
        """The session and its finalize job, read together (one snapshot, one round trip).

        ``(None, None)`` if the tenant has no session with that id; the job is ``None``
        if the session has none.
        """
        ...

    async def list_sessions(
        self, tenant: str, after: str | None, limit: int
    ) -> list[tuple[SessionRecord, JobRecord | None]]:
        """Up to ``limit`` of the tenant's sessions in creation order, each with its job.

        One snapshot for the whole page.
        ``after`` is a session id of the tenant (the last one of the previous page):
        only sessions created after it are returned. An ``after`` the tenant does not
        have raises :func:`unknown_cursor`. Creation order is the order the creating
        transactions were assigned their keys (a monotonic key per database).
        """
        ...

    # ------------------------------------------------------------------ mutations

    async def append(
        self, tenant: str, session_id: str, mutations: list[dict[str, Any]]
    ) -> AppendResult:
        """Apply a batch of validated mutations whole, or not at all.

        Each mutation is ``{"id"?, "type", **fields}``. New mutations get the next
        seqs of the session in order (gapless, assigned inside the transaction); a
        mutation whose id is already stored (or repeated earlier in the batch) is not
        stored again and reports its original seq with ``duplicate=True``. The session's
        participant and speaker rows are updated in the same transaction, at a cost
        proportional to the batch, never to the session. A batch that would pass a
        :class:`SessionLimits` limit is refused whole.
        """
        ...

    async def list_mutations(
        self, tenant: str, session_id: str, after: int, limit: int
    ) -> list[dict[str, Any]]:
        """Up to ``limit`` mutations with seq > ``after``, in seq order.

        Each is ``{"seq", "id", "type", **fields}``. An unknown session has none.
        """
        ...

    def iter_mutations(self, tenant: str, session_id: str, batch: int = 5000) -> Iterator[dict[str, Any]]:
        """Every mutation of the session in seq order, streamed in constant memory.

        Synchronous and blocking: call it from a worker thread. It reads with its own
        connection, so it never competes with the request path's readers.
        """
        ...

    async def pending(self, tenant: str, session_id: str) -> int:
        """How many of this process's appended batches of the session are not yet settled."""
        ...

    async def drain(self, tenant: str, session_id: str) -> None:
        """Wait until every batch this process appended to the session so far is settled."""
        ...

    # ------------------------------------------------------------------ finalize jobs

    async def get_job(self, tenant: str, session_id: str) -> JobRecord | None:
        """The session's finalize job, or ``None``."""
        ...

    async def start_job(
        self, tenant: str, session_id: str, owner: str, lease_s: float, progress: dict[str, Any]
    ) -> JobStart:
        """Transition START, in one transaction (see :func:`jobrecord.plan_start`).

        With no job, or the last one ``failed``/``timed_out``, and the session ``open``
        or ``failed``: store a ``running`` job (attempt + 1, fence + 1, leased to
        ``owner`` for ``lease_s``) and set the session ``finalizing``, together; return
        its lease. A job ``running`` or ``succeeded`` is returned as it is, without a
        lease. A finalized session without a succeeded job raises ``Conflict``; an
        unknown session ``NotFound``.
        """
        ...

    async def save_progress(self, lease: Lease, progress: dict[str, Any], lease_s: float) -> None:
        """Store the running job's progress and renew its lease, if ``lease`` is current.

        Raises :class:`LeaseLost` if the job's fence moved on or it no longer runs.
        """
        ...

    async def renew_lease(self, lease: Lease, lease_s: float) -> None:
        """Extend the lease to now + ``lease_s`` (a heartbeat); ``LeaseLost`` as above."""
        ...

    async def finish_job(
        self, lease: Lease, state: str, progress: dict[str, Any], report: dict[str, Any] | None
    ) -> None:
        """Transition END, in one transaction (see :func:`jobrecord.plan_finish`).

        ``succeeded`` stores ``report`` (required), sets the job ``succeeded`` and the
        session ``finalized``; ``failed`` or ``timed_out`` sets the job so and the
        session ``failed``. The job must be running under ``lease`` (else ``LeaseLost``,
        and nothing is written) and the session ``finalizing``. Safe to repeat after an
        unknown outcome: a repeat of a committed END raises ``LeaseLost`` (the job no
        longer runs), which the caller then reads back with :meth:`get_job`.
        """
        ...

    async def release_job(self, lease: Lease) -> None:
        """Give the lease up (a clean shutdown): the job stays ``running``, unowned, its
        lease already expired, so the next process to look claims it at once.
        ``LeaseLost`` if it was not ours any more."""
        ...

    async def claim_expired_jobs(self, owner: str, lease_s: float, limit: int = 16) -> list[ClaimedJob]:
        """Transition TAKEOVER for up to ``limit`` running jobs whose lease has expired.

        Each claimed job gets a new fence, ``owner`` and a lease of ``lease_s``, in one
        transaction per job or for all of them; a job already taken over
        :data:`jobrecord.MAX_TAKEOVERS` times is ended ``failed`` instead (its session
        ``failed``), so a job that kills every process that runs it cannot loop. Jobs
        of every tenant are considered. Jobs whose owner is ``owner`` itself are not
        claimed: they still run in the claiming process (their lease expired while the
        store was unreachable; their own END or renewal lands once it is back).
        """
        ...

    # ------------------------------------------------------------------ reports

    async def get_report(self, tenant: str, session_id: str) -> dict[str, Any] | None:
        """The session's report, or ``None``. A report exists only with a succeeded job."""
        ...
