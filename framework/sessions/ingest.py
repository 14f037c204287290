"""What appending a batch means, independent of the database: numbering and derived rows.

Every adapter applies a batch the same way inside its transaction: it reads the
session's ``last_seq``, numbers the batch with :func:`number` (idempotent ids keep the
seq they were first stored with), inserts the rows, and then applies
:func:`derive`'s outcome to the session's participant and speaker rows, checking the
:class:`~ballast.sessions.store.SessionLimits` with :func:`check_limits`. All of it
costs O(batch): nothing here reads or rewrites the whole session.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from ballast.sessions.store import SPEAKERS_RESOLVED, Accepted, SessionLimits, session_limit

#: A stored mutation row: (session key, seq, mutation_id, type, payload JSON).
Row = tuple[Any, int, str | None, str, str]


def number(mutations: list[dict[str, Any]], last_seq: int, known: dict[str, int],
           key: Any = None) -> tuple[list[Accepted], list[Row], int]:
    """Give each new mutation the next seq; a known id (or one repeated) keeps its seq.

    ``known`` maps ids already stored to their seq (an adapter may pass ``{}`` first
    and call again with the ids its unique index reported); it is filled in with the ids
    of this batch as they are numbered. Returns the outcome per mutation, the rows to
    insert (each starting with ``key``, the adapter's key of the session) and the
    session's new ``last_seq``.
    """
    accepted: list[Accepted] = []
    rows: list[Row] = []
    seq = last_seq
    dumps = orjson.dumps
    for mutation in mutations:
        mutation_id = mutation.get("id")
        if mutation_id is not None:
            original = known.get(mutation_id)
            if original is not None:
                accepted.append(Accepted(mutation_id, original, True))
                continue
            known[mutation_id] = seq + 1
        seq += 1
        payload = mutation.copy()
        payload.pop("id", None)
        type_ = payload.pop("type")
        rows.append((key, seq, mutation_id, type_, dumps(payload).decode()))
        accepted.append(Accepted(mutation_id, seq, False))
    return accepted, rows, seq


@dataclass(slots=True)
class Derived:
    """What a batch changes besides its own rows.

    ``joined``: participant names in order of joining (each once; the adapter stores
    those not yet stored). ``labels``: every speaker label the batch mentions (each
    once). ``names``: label -> name after the batch (renames and resolutions, the later
    wins).
    """

    joined: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)


def derive(mutations: list[dict[str, Any]], accepted: list[Accepted]) -> Derived:
    """The participant and speaker changes of the newly stored mutations of a batch."""
    joined: dict[str, None] = {}
    labels: dict[str, None] = {}
    names: dict[str, str] = {}
    for mutation, outcome in zip(mutations, accepted, strict=True):
        if outcome.duplicate:
            continue
        type_ = mutation["type"]
        if type_ == "utterance":
            labels[mutation["speaker"]] = None
        elif type_ == "participant_joined":
            joined[mutation["name"]] = None
        elif type_ == "speaker_renamed":
            labels[mutation["speaker"]] = None
            names[mutation["speaker"]] = mutation["name"]
        elif type_ == SPEAKERS_RESOLVED:
            for label, name in mutation["mapping"].items():
                labels[label] = None
                names[label] = name
    return Derived(list(joined), list(labels), names)


def check_limits(session_id: str, limits: SessionLimits, *, mutations: int, participants: int,
                 labels: int) -> None:
    """Raise the limit error if the session's counts after the batch pass a limit."""
    if mutations > limits.max_mutations:
        raise session_limit(session_id, "mutations", limits.max_mutations)
    if participants > limits.max_participants:
        raise session_limit(session_id, "participants", limits.max_participants)
    if labels > limits.max_speaker_labels:
        raise session_limit(session_id, "distinct speaker labels", limits.max_speaker_labels)
