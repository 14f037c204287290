"""Speakers are people, not labels: group speaker labels that carry the same name.

A speech recogniser hands out a new label whenever it loses track of a voice (a dropped
microphone, a reconnect), so one person can speak under ``spk_0`` and later ``spk_2``.
Once both labels carry the same name (by resolve, a rename, or finalize's own naming),
statistics, turns and the report must count that person once. This module decides who
is who; :mod:`ballast.sessions.analysis` measures per person.

Names are compared the way people read them: case-insensitively and with runs of
whitespace collapsed ("alice " is Alice). A label without a name is a person of its own.
The first label (in order of first utterance) gives the person its spelling and its id,
so when no two labels share a name, person ids are label ids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


def name_key(name: str) -> str:
    """The form two names are compared in: case-folded, whitespace collapsed."""
    return " ".join(name.split()).casefold()


@dataclass(slots=True)
class Person:
    """One speaker: a name (``None`` for an unnamed label) and the labels it spoke as."""

    name: str | None
    labels: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """The person's first label: what identifies an unnamed speaker."""
        return self.labels[0]

    def display_name(self) -> str:
        return self.name if self.name is not None else self.labels[0]


@dataclass(slots=True)
class People:
    """The people behind a session's labels.

    ``person_of[label_id]`` is the person id of each label (label ids index the
    session's label list); ``people[person_id]`` is the :class:`Person`.
    """

    person_of: list[int]
    people: list[Person]

    def __len__(self) -> int:
        return len(self.people)


def group_labels(labels: Sequence[str], names: Sequence[str | None]) -> People:
    """Group ``labels`` (in order of first utterance) by their ``names`` (same length)."""
    if len(labels) != len(names):
        raise ValueError("labels and names must have the same length")
    person_of: list[int] = []
    people: list[Person] = []
    by_name: dict[str, int] = {}
    for label, name in zip(labels, names, strict=True):
        if name is None or not name.strip():
            person_of.append(len(people))
            people.append(Person(None, [label]))
            continue
        key = name_key(name)
        pid = by_name.get(key)
        if pid is None:
            pid = by_name[key] = len(people)
            people.append(Person(" ".join(name.split()), []))
        people[pid].labels.append(label)
        person_of.append(pid)
    return People(person_of, people)


def names_by_label(speakers: Mapping[str, str], people: People) -> dict[str, str]:
    """Every named label mapped to its person's spelling of the name."""
    out: dict[str, str] = {}
    for person in people.people:
        if person.name is not None:
            for label in person.labels:
                out[label] = person.name
    for label, name in speakers.items():  # labels that never spoke keep their own name
        out.setdefault(label, name)
    return out
