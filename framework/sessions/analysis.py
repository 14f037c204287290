"""The pure analysis behind finalize: replay, reconcile, stats, timeline, transcript.

Finalize rebuilds a session from its stored mutation log and turns it into numbers and
events a report can be made of. Everything here is synchronous, deterministic and free
of I/O so that it can run in a worker thread and be tested without a server. A session
can hold a million utterances, so the work is one pass over the log (plus a stable sort
that is near-linear on the almost-ordered input clients send), and utterances are kept
column-wise in :mod:`array` buffers with interned speaker labels rather than as one
object per utterance.

Stages and their functions:

* ``replay``  -> :func:`replay` streams the stored rows once into a :class:`SessionState`.
* ``reconcile`` -> :func:`reconcile` applies speaker names, groups labels that carry the
  same name into one person (:mod:`ballast.sessions.people`) and merges each person's
  utterances into turns.
* ``stats`` -> :func:`compute_stats` measures talk time, shares, turns, monologues and
  interruptions per person.
* ``events`` -> :func:`build_timeline` lists joins, leaves, notes and turns in time order.

:func:`ballast.sessions.excerpt.transcript_excerpt` renders a bounded ``Name: text``
transcript of a reconciled session.
"""

from __future__ import annotations

import heapq
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

from ballast.sessions.people import People, group_labels

#: Two consecutive utterances of the same speaker belong to one turn when the second
#: starts at most this long after the turn so far ended (overlaps always qualify),
#: provided nobody else took the floor in between. 250 ms absorbs the small gaps a
#: speech recogniser leaves when it splits one breath of speech into segments, while
#: staying well below a conversational pause (typically 500 ms or more).
MERGE_GAP_MS = 250

#: Longest text kept for a turn or a note in a timeline entry.
TIMELINE_TEXT_CHARS = 160
NOTE_TEXT_CHARS = 1000

_UTTERANCE = "utterance"
_JOINED = "participant_joined"
_LEFT = "participant_left"
_RENAMED = "speaker_renamed"
_NOTE = "note"
_RESOLVED = "speakers_resolved"


def _int_array() -> array[int]:
    return array("q")


def _index_array() -> array[int]:
    return array("L")


@dataclass(slots=True)
class PresenceEvent:
    """A participant joining or leaving.

    ``at_ms`` is derived from the log: the latest utterance end seen before this
    mutation (in seq order), or ``None`` when no utterance preceded it.
    """

    kind: str  # "participant_joined" or "participant_left"
    seq: int
    at_ms: int | None


@dataclass(slots=True)
class ParticipantRecord:
    """One participant (first spelling wins) and their join/leave events in seq order."""

    name: str
    events: list[PresenceEvent] = field(default_factory=list)


@dataclass(slots=True)
class NoteRecord:
    """A note; ``at_ms`` is derived like :attr:`PresenceEvent.at_ms`."""

    seq: int
    at_ms: int | None
    text: str


@dataclass(slots=True)
class SessionState:
    """A session rebuilt from its log.

    Utterances are stored column-wise in seq order: ``starts[i]``, ``ends[i]``,
    ``speaker_ids[i]`` (an index into ``labels``) and ``texts[i]``.
    ``participants`` is keyed by the case-folded name, in order of first appearance.
    ``speakers`` maps labels to names from renames and resolutions, the later wins.
    ``unknown`` counts rows of types this module does not know (they are ignored);
    ``malformed`` counts rows of known types whose fields are unusable.
    """

    participants: dict[str, ParticipantRecord] = field(default_factory=dict)
    notes: list[NoteRecord] = field(default_factory=list)
    speakers: dict[str, str] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)
    label_index: dict[str, int] = field(default_factory=dict)
    starts: array[int] = field(default_factory=_int_array)
    ends: array[int] = field(default_factory=_int_array)
    speaker_ids: array[int] = field(default_factory=_index_array)
    texts: list[str] = field(default_factory=list)
    mutation_count: int = 0
    last_seq: int = 0
    unknown: dict[str, int] = field(default_factory=dict)
    malformed: int = 0

    @property
    def utterance_count(self) -> int:
        return len(self.texts)

    def participant_names(self) -> list[str]:
        """Participant names in order of first appearance."""
        return [record.name for record in self.participants.values()]

    def utterances(self) -> UtteranceView:
        """The utterances in seq order as ``(label, start_ms, end_ms, text)`` tuples."""
        return UtteranceView(self.labels, self.speaker_ids, self.starts, self.ends, self.texts)


class UtteranceView(Sequence[tuple[str, int, int, str]]):
    """A lazy, read-only sequence of ``(label, start_ms, end_ms, text)`` tuples.

    Built over the column buffers of a :class:`SessionState`, optionally through a
    permutation, so handing a million utterances to an inference provider costs no
    copy.
    """

    __slots__ = ("_ends", "_labels", "_order", "_speakers", "_starts", "_texts")

    def __init__(
        self,
        labels: Sequence[str],
        speakers: Sequence[int],
        starts: Sequence[int],
        ends: Sequence[int],
        texts: Sequence[str],
        order: Sequence[int] | None = None,
    ) -> None:
        self._labels = labels
        self._speakers = speakers
        self._starts = starts
        self._ends = ends
        self._texts = texts
        self._order = order

    def __len__(self) -> int:
        return len(self._texts)

    @overload
    def __getitem__(self, index: int) -> tuple[str, int, int, str]: ...

    @overload
    def __getitem__(self, index: slice) -> list[tuple[str, int, int, str]]: ...

    def __getitem__(self, index: int | slice) -> tuple[str, int, int, str] | list[tuple[str, int, int, str]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        # The column buffers themselves accept negative indices and raise IndexError.
        i = index if self._order is None else self._order[index]
        return (self._labels[self._speakers[i]], self._starts[i], self._ends[i], self._texts[i])

    def __iter__(self) -> Iterator[tuple[str, int, int, str]]:
        labels, speakers, starts, ends, texts = (
            self._labels,
            self._speakers,
            self._starts,
            self._ends,
            self._texts,
        )
        indices: Iterable[int] = range(len(texts)) if self._order is None else self._order
        for i in indices:
            yield (labels[speakers[i]], starts[i], ends[i], texts[i])


def _as_text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def replay(rows: Iterable[dict[str, Any]], participants: Iterable[str] = ()) -> SessionState:
    """Rebuild a session from its stored mutations, read once in seq order.

    ``participants`` seeds the participant list with the names given when the session
    was created (they have no join event). Rows of unknown type are counted in
    ``unknown`` and otherwise ignored; rows of a known type with unusable fields are
    counted in ``malformed``.
    """
    state = SessionState()
    people = state.participants
    for seeded in participants:
        if isinstance(seeded, str) and seeded and seeded.casefold() not in people:
            people[seeded.casefold()] = ParticipantRecord(seeded)

    label_index = state.label_index
    labels = state.labels
    add_start = state.starts.append
    add_end = state.ends.append
    add_speaker = state.speaker_ids.append
    add_text = state.texts.append
    speakers = state.speakers
    clock = -1  # latest utterance end so far; -1 until the first utterance
    count = 0
    last_seq = 0

    for row in rows:
        count += 1
        seq = row.get("seq")
        if seq.__class__ is not int:
            seq = last_seq + 1
        last_seq = seq if seq > last_seq else last_seq
        kind = row.get("type")
        if kind == _UTTERANCE:
            label = row.get("speaker")
            start = row.get("start_ms")
            end = row.get("end_ms")
            if (
                start.__class__ is not int
                or end.__class__ is not int
                or start < 0
                or label.__class__ is not str
                or not label
            ):
                state.malformed += 1
                continue
            end = end if end > start else start
            index = label_index.get(label)
            if index is None:
                index = label_index[label] = len(labels)
                labels.append(label)
            add_start(start)
            add_end(end)
            add_speaker(index)
            text = row.get("text")
            add_text(text if text.__class__ is str else "")
            clock = end if end > clock else clock
        elif kind in (_JOINED, _LEFT):
            person = _as_text(row.get("name"))
            if person is None:
                state.malformed += 1
                continue
            record = people.get(person.casefold())
            if record is None:
                record = people[person.casefold()] = ParticipantRecord(person)
            record.events.append(PresenceEvent(kind, seq, None if clock < 0 else clock))
        elif kind == _RENAMED:
            label = _as_text(row.get("speaker"))
            name = _as_text(row.get("name"))
            if label is None or name is None:
                state.malformed += 1
                continue
            speakers[label] = name
        elif kind == _RESOLVED:
            mapping = row.get("mapping")
            if not isinstance(mapping, dict):
                state.malformed += 1
                continue
            for label, name in mapping.items():
                if _as_text(label) is not None and _as_text(name) is not None:
                    speakers[label] = name
        elif kind == _NOTE:
            text = _as_text(row.get("text"))
            if text is None:
                state.malformed += 1
                continue
            state.notes.append(NoteRecord(seq, None if clock < 0 else clock, text))
        else:
            key = kind if isinstance(kind, str) else repr(kind)
            state.unknown[key] = state.unknown.get(key, 0) + 1

    state.mutation_count = count
    state.last_seq = last_seq
    return state


@dataclass(slots=True)
class Reconciled:
    """A session with speaker names applied and utterances merged into turns.

    ``order`` maps a position in time order to an utterance index of ``state``
    (``None`` when the log was already in time order). ``names[label_id]`` is the
    label's name, or ``None`` when unknown; ``people`` groups labels of the same name
    into persons. Turns are stored column-wise in order of start time: ``turn_starts``,
    ``turn_ends``, ``turn_speakers`` (person ids), ``turn_sizes`` (utterances in the
    turn) and ``turn_first`` (time-order position of the turn's first utterance). A
    person's turns never overlap each other.
    """

    state: SessionState
    order: array[int] | None
    names: list[str | None]
    people: People
    turn_starts: array[int] = field(default_factory=_int_array)
    turn_ends: array[int] = field(default_factory=_int_array)
    turn_speakers: array[int] = field(default_factory=_index_array)
    turn_sizes: array[int] = field(default_factory=_index_array)
    turn_first: array[int] = field(default_factory=_index_array)

    @property
    def utterance_count(self) -> int:
        return self.state.utterance_count

    @property
    def turn_count(self) -> int:
        return len(self.turn_starts)

    def display_name(self, label_id: int) -> str:
        """The name of the person speaking as this label if known, else the label."""
        name = self.names[label_id]
        return name if name is not None else self.state.labels[label_id]

    def person_of(self, label_id: int) -> int:
        return self.people.person_of[label_id]

    def utterance_index(self, position: int) -> int:
        """The ``state`` utterance index at a time-order position."""
        return position if self.order is None else self.order[position]

    def utterances(self) -> UtteranceView:
        """The utterances in time order as ``(label, start_ms, end_ms, text)`` tuples."""
        s = self.state
        return UtteranceView(s.labels, s.speaker_ids, s.starts, s.ends, s.texts, self.order)


def _time_order(starts: array[int]) -> array[int] | None:
    """A stable permutation putting ``starts`` in order, or ``None`` if already ordered."""
    previous = -1
    for value in starts:
        if value < previous:
            break
        previous = value
    else:
        return None
    return array("L", sorted(range(len(starts)), key=starts.__getitem__))


def _in_time_order(
    state: SessionState, order: array[int] | None, people: People | None = None
) -> Iterator[tuple[int, int, int]]:
    """``(speaker, start_ms, end_ms)`` of every utterance, in time order.

    ``speaker`` is the label id, or the person id when ``people`` is given (the
    mapping is skipped when every label is its own person).
    """
    ids: Iterable[int] = state.speaker_ids
    if order is not None:
        ids = map(state.speaker_ids.__getitem__, order)
    if people is not None and len(people) != len(state.labels):
        ids = map(people.person_of.__getitem__, ids)
    if order is None:
        return zip(ids, state.starts, state.ends, strict=True)
    return zip(
        ids,
        map(state.starts.__getitem__, order),
        map(state.ends.__getitem__, order),
        strict=True,
    )


def reconcile(state: SessionState, inferred: Mapping[str, str] | None = None) -> Reconciled:
    """Apply speaker names, group labels into people, and merge each person's
    consecutive utterances into turns.

    A label's name is the one the log gave it (rename or resolve), else the one in
    ``inferred`` (names finalize found for labels the log left unnamed). Labels that
    carry the same name are one person: their utterances form turns together.

    Utterances are first put in order of start time, stably (ties keep seq order), as
    clients may send them slightly out of order. An utterance extends its speaker's
    current turn when it starts no later than :data:`MERGE_GAP_MS` after that turn's
    end and no other speaker started talking after the turn ended (someone who merely
    talked over the turn does not break it). Otherwise it starts a new turn.
    """
    order = _time_order(state.starts)
    extra = inferred or {}
    names: list[str | None] = [state.speakers.get(label) or extra.get(label) for label in state.labels]
    people = group_labels(state.labels, names)
    result = Reconciled(state=state, order=order, names=names, people=people)

    t_starts, t_ends, t_speakers = (
        result.turn_starts,
        result.turn_ends,
        result.turn_speakers,
    )
    t_sizes, t_first = result.turn_sizes, result.turn_first
    open_turn = [-1] * len(people)
    # The latest utterance start so far, by whom, and the latest start by anyone else.
    last_speaker = -1
    last_start = -1
    other_start = -1

    for position, (speaker, start, end) in enumerate(_in_time_order(state, order, people)):
        latest_by_other = last_start if speaker != last_speaker else other_start
        turn = open_turn[speaker]
        turn_end = t_ends[turn] if turn >= 0 else -1
        if start <= turn_end + MERGE_GAP_MS and latest_by_other < turn_end:
            if end > turn_end:
                t_ends[turn] = end
            t_sizes[turn] += 1
        else:
            open_turn[speaker] = len(t_starts)
            t_starts.append(start)
            t_ends.append(end)
            t_speakers.append(speaker)
            t_sizes.append(1)
            t_first.append(position)
        if speaker != last_speaker:
            other_start = last_start
            last_speaker = speaker
        last_start = start
    return result


def compute_stats(reconciled: Reconciled) -> dict[str, Any]:
    """Talk time, share, turns, longest monologue and interruptions per person, plus totals.

    A speaker is a person (:mod:`ballast.sessions.people`): labels that carry the same
    name are counted once. Returns ``{"speakers": [...], "totals": {...}}``. Each
    speaker entry has exactly the fields of ``models.SpeakerStats``: ``speaker`` (the
    person's first label), ``name`` (or ``None``), ``labels`` (every label the person
    spoke as, in order of first utterance), ``talk_time_ms`` (the union of the person's
    utterances, so their own overlaps count once), ``talk_share`` (of the summed talk
    time of everyone, 0..1, four decimals), ``turns``, ``longest_monologue_ms`` (the
    longest turn, start to end) and ``interruptions`` (turns the person started while
    someone else's turn was still running; two turns starting at the same instant
    interrupt neither). Speakers are ordered by talk time, most first, then by label.

    ``totals`` holds ``duration_ms`` (first utterance start to last utterance end),
    ``utterance_count``, ``turn_count``, ``speaker_count`` (people), ``overlap_ms`` (time
    during which two or more people talk at once), ``speech_ms`` (time during which
    anyone talks), ``participant_count`` and ``note_count``.
    """
    state = reconciled.state
    people = reconciled.people
    n_speakers = len(people)
    order = reconciled.order

    # Per-speaker unions of utterance intervals, in order of start. A speaker's
    # intervals are disjoint, so at most one per speaker is open at any instant.
    talk = [0] * n_speakers
    slot = [-1] * n_speakers  # where the speaker's open interval sits in iv_*
    open_start = [0] * n_speakers
    open_end = [-1] * n_speakers
    iv_starts: array[int] = array("q")
    iv_ends: array[int] = array("q")
    speech = 0
    first_start = union_start = 0
    union_end = -1
    for speaker, start, end in _in_time_order(state, order, people):
        current_end = open_end[speaker]
        if start <= current_end:
            if end > current_end:
                open_end[speaker] = end
        else:
            k = slot[speaker]
            if k >= 0:
                iv_ends[k] = current_end
                talk[speaker] += current_end - open_start[speaker]
            slot[speaker] = len(iv_starts)
            iv_starts.append(start)
            iv_ends.append(end)
            open_start[speaker] = start
            open_end[speaker] = end
        if start <= union_end:
            union_end = end if end > union_end else union_end
        else:
            if union_end < 0:
                first_start = start
            else:
                speech += union_end - union_start
            union_start, union_end = start, end
    last_end = union_end if union_end >= 0 else first_start
    speech += last_end - union_start
    for speaker, k in enumerate(slot):
        if k >= 0:
            iv_ends[k] = open_end[speaker]
            talk[speaker] += open_end[speaker] - open_start[speaker]

    overlap = _overlap_ms(iv_starts, iv_ends)
    del iv_starts, iv_ends

    turns = [0] * n_speakers
    longest = [0] * n_speakers
    interruptions = [0] * n_speakers
    t_starts, t_ends, t_speakers = (
        reconciled.turn_starts,
        reconciled.turn_ends,
        reconciled.turn_speakers,
    )
    # The latest turn end so far, whose it is, and the latest end of anyone else's.
    # A speaker's turn ends only grow, which keeps this two-entry summary exact.
    best_end = second_end = -1
    best_speaker = -1
    count = len(t_starts)
    i = 0
    while i < count:
        at = t_starts[i]
        j = i
        while j < count and t_starts[j] == at:
            speaker = t_speakers[j]
            others_end = second_end if speaker == best_speaker else best_end
            if others_end > at:
                interruptions[speaker] += 1
            j += 1
        for k in range(i, j):
            speaker = t_speakers[k]
            end = t_ends[k]
            turns[speaker] += 1
            if end - at > longest[speaker]:
                longest[speaker] = end - at
            if speaker == best_speaker:
                best_end = end if end > best_end else best_end
            elif end > best_end:
                second_end = best_end
                best_end = end
                best_speaker = speaker
            elif end > second_end:
                second_end = end
        i = j

    all_talk = sum(talk)
    speakers: list[dict[str, Any]] = [
        {
            "speaker": person.label,
            "name": person.name,
            "labels": list(person.labels),
            "talk_time_ms": talk[pid],
            "talk_share": round(talk[pid] / all_talk, 4) if all_talk else 0.0,
            "turns": turns[pid],
            "longest_monologue_ms": longest[pid],
            "interruptions": interruptions[pid],
        }
        for pid, person in enumerate(people.people)
    ]
    speakers.sort(key=lambda entry: (-entry["talk_time_ms"], entry["speaker"]))
    totals = {
        "duration_ms": last_end - first_start,
        "utterance_count": state.utterance_count,
        "turn_count": count,
        "speaker_count": n_speakers,
        "overlap_ms": overlap,
        "speech_ms": speech,
        "participant_count": len(state.participants),
        "note_count": len(state.notes),
    }
    return {"speakers": speakers, "totals": totals}


def _overlap_ms(starts: array[int], ends: array[int]) -> int:
    """Time covered by two or more of the intervals, given in order of start."""
    heap: list[int] = []
    active = 0
    overlap = 0
    cursor = 0
    for start, end in zip(starts, ends, strict=True):
        while heap and heap[0] <= start:
            finish = heapq.heappop(heap)
            if active >= 2:
                overlap += finish - cursor
            cursor = finish
            active -= 1
        if active >= 2:
            overlap += start - cursor
        cursor = start
        active += 1
        heapq.heappush(heap, end)
    while heap:
        finish = heapq.heappop(heap)
        if active >= 2:
            overlap += finish - cursor
        cursor = finish
        active -= 1
    return overlap


def clip_text(text: str, limit: int) -> str:
    """``text`` on one line, cut to ``limit`` characters with an ellipsis."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def build_timeline(reconciled: Reconciled, limit: int = 1000) -> list[dict[str, Any]]:
    """Joins, leaves, notes and turns in time order, at most ``limit`` entries.

    Entries (each has ``at_ms`` and ``kind``):

    * ``{"kind": "participant_joined" | "participant_left", "name", "seq"}``
    * ``{"kind": "note", "text", "seq"}`` (text clipped to :data:`NOTE_TEXT_CHARS`)
    * ``{"kind": "turn", "speaker", "name", "end_ms", "duration_ms", "utterances",
      "text"}``: a person's turn (which may span several of their labels); ``speaker``
      is the label of its first utterance and ``text`` that utterance's start.
    * when entries were left out, the last entry is
      ``{"kind": "truncated", "omitted": N, "at_ms"}`` (``at_ms`` of the first omitted
      entry), and the list still holds at most ``limit`` entries.

    Joins, leaves and notes carry no time of their own; they are placed at the latest
    utterance end logged before them, or at the session start when none was. At equal
    times they come before turns.
    """
    if limit < 1:
        raise ValueError("limit must be at least 1")
    state = reconciled.state
    t_starts = reconciled.turn_starts
    origin = t_starts[0] if len(t_starts) else 0

    others: list[tuple[int, int, dict[str, Any]]] = []
    for record in state.participants.values():
        for event in record.events:
            at = origin if event.at_ms is None else event.at_ms
            others.append(
                (
                    at,
                    event.seq,
                    {
                        "at_ms": at,
                        "kind": event.kind,
                        "name": record.name,
                        "seq": event.seq,
                    },
                )
            )
    for note in state.notes:
        at = origin if note.at_ms is None else note.at_ms
        entry = {
            "at_ms": at,
            "kind": "note",
            "text": clip_text(note.text, NOTE_TEXT_CHARS),
            "seq": note.seq,
        }
        others.append((at, note.seq, entry))
    others.sort(key=lambda item: (item[0], item[1]))

    total = len(others) + len(t_starts)
    keep = total if total <= limit else limit - 1
    timeline: list[dict[str, Any]] = []
    o = t = 0
    texts = state.texts
    while len(timeline) < keep:
        if o < len(others) and (t >= len(t_starts) or others[o][0] <= t_starts[t]):
            timeline.append(others[o][2])
            o += 1
        else:
            timeline.append(_turn_entry(reconciled, t, texts))
            t += 1
    if keep < total:
        if o < len(others) and (t >= len(t_starts) or others[o][0] <= t_starts[t]):
            next_at = others[o][0]
        else:
            next_at = t_starts[t]
        timeline.append({"at_ms": next_at, "kind": "truncated", "omitted": total - keep})
    return timeline


def _turn_entry(reconciled: Reconciled, turn: int, texts: list[str]) -> dict[str, Any]:
    person = reconciled.people.people[reconciled.turn_speakers[turn]]
    start = reconciled.turn_starts[turn]
    end = reconciled.turn_ends[turn]
    first = reconciled.utterance_index(reconciled.turn_first[turn])
    return {
        "at_ms": start,
        "kind": "turn",
        "speaker": reconciled.state.labels[reconciled.state.speaker_ids[first]],
        "name": person.name,
        "end_ms": end,
        "duration_ms": end - start,
        "utterances": reconciled.turn_sizes[turn],
        "text": clip_text(texts[first][: TIMELINE_TEXT_CHARS * 4], TIMELINE_TEXT_CHARS),
    }
