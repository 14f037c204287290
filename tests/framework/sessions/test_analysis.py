"""Tests of the finalize analysis: replay, reconcile, stats, timeline and excerpt."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ballast.sessions import analysis
from ballast.sessions.analysis import (
    MERGE_GAP_MS,
    Reconciled,
    build_timeline,
    compute_stats,
    reconcile,
    replay,
)
from ballast.sessions.excerpt import transcript_excerpt
from ballast.sessions.models import SpeakerStats

Row = dict[str, Any]


class Log:
    """Builds stored-mutation rows with increasing seq numbers."""

    def __init__(self) -> None:
        self.rows: list[Row] = []

    def _add(self, kind: str, **fields: Any) -> Log:
        self.rows.append({"seq": len(self.rows) + 1, "id": None, "type": kind, **fields})
        return self

    def say(self, speaker: str, start: int, end: int, text: str = "") -> Log:
        return self._add("utterance", speaker=speaker, start_ms=start, end_ms=end, text=text)

    def join(self, name: str) -> Log:
        return self._add("participant_joined", name=name)

    def leave(self, name: str) -> Log:
        return self._add("participant_left", name=name)

    def rename(self, speaker: str, name: str) -> Log:
        return self._add("speaker_renamed", speaker=speaker, name=name)

    def resolved(self, mapping: dict[str, Any]) -> Log:
        return self._add("speakers_resolved", mapping=mapping)

    def note(self, text: str) -> Log:
        return self._add("note", text=text)

    def other(self, kind: str, **fields: Any) -> Log:
        return self._add(kind, **fields)

    def reconciled(self) -> Reconciled:
        return reconcile(replay(self.rows))


def by_speaker(stats: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["speaker"]: entry for entry in stats["speakers"]}


def turns_of(rec: Reconciled) -> list[tuple[str, int, int, int]]:
    labels = rec.state.labels
    return [
        (labels[rec.turn_speakers[i]], rec.turn_starts[i], rec.turn_ends[i], rec.turn_sizes[i])
        for i in range(rec.turn_count)
    ]


# --- replay -----------------------------------------------------------------------


def test_replay_empty() -> None:
    state = replay([])
    assert state.utterance_count == 0
    assert state.mutation_count == 0
    assert state.last_seq == 0
    assert state.participants == {}
    assert state.notes == []
    assert state.speakers == {}
    assert list(state.utterances()) == []


def test_replay_collects_everything_in_one_pass() -> None:
    log = (
        Log()
        .join("Alice")
        .say("spk_0", 0, 1000, "hello")
        .join("Bob")
        .say("spk_1", 900, 2500, "hi")
        .note("kick-off")
        .leave("alice")
        .rename("spk_0", "Alice")
    )
    state = replay(iter(log.rows))  # any iterable, read once
    assert state.mutation_count == 7
    assert state.last_seq == 7
    assert state.participant_names() == ["Alice", "Bob"]
    alice = state.participants["alice"]
    assert [(e.kind, e.seq, e.at_ms) for e in alice.events] == [
        ("participant_joined", 1, None),  # nothing said yet: no time to derive
        ("participant_left", 6, 2500),  # the latest utterance end before it
    ]
    assert [(e.kind, e.seq, e.at_ms) for e in state.participants["bob"].events] == [
        ("participant_joined", 3, 1000)
    ]
    assert [(n.seq, n.at_ms, n.text) for n in state.notes] == [(5, 2500, "kick-off")]
    assert state.speakers == {"spk_0": "Alice"}
    assert state.labels == ["spk_0", "spk_1"]
    assert list(state.starts) == [0, 900]
    assert list(state.ends) == [1000, 2500]
    assert list(state.speaker_ids) == [0, 1]
    assert state.texts == ["hello", "hi"]


def test_replay_seeds_participants_from_the_session() -> None:
    state = replay(Log().join("carol").join("Dave").rows, participants=["Carol", "Alice"])
    assert state.participant_names() == ["Carol", "Alice", "Dave"]
    assert [e.kind for e in state.participants["carol"].events] == ["participant_joined"]
    assert state.participants["alice"].events == []


def test_replay_counts_unknown_and_malformed_rows() -> None:
    log = (
        Log()
        .other("reaction", emoji="+1")
        .other("reaction", emoji="-1")
        .other("poll")
        .say("spk_0", 0, 10, "ok")
        .other("utterance", speaker="spk_0", start_ms="0", end_ms=5, text="bad start")
        .other("utterance", speaker="", start_ms=0, end_ms=5, text="no speaker")
        .other("utterance", speaker="x", start_ms=-5, end_ms=5, text="negative")
        .other("note", text="")
        .other("speakers_resolved", mapping=["not", "a", "dict"])
    )
    state = replay(log.rows)
    assert state.unknown == {"reaction": 2, "poll": 1}
    assert state.malformed == 5
    assert state.utterance_count == 1
    assert state.mutation_count == 9


def test_replay_clamps_end_before_start() -> None:
    state = replay(Log().say("a", 500, 100).rows)
    assert (state.starts[0], state.ends[0]) == (500, 500)


def test_renamed_then_resolved_later_wins() -> None:
    log = (
        Log()
        .say("spk_0", 0, 10)
        .say("spk_1", 10, 20)
        .rename("spk_0", "Al")
        .resolved({"spk_0": "Alice", "spk_1": "Bob"})
        .rename("spk_1", "Robert")
    )
    state = replay(log.rows)
    assert state.speakers == {"spk_0": "Alice", "spk_1": "Robert"}
    rec = reconcile(state)
    assert rec.names == ["Alice", "Robert"]
    assert by_speaker(compute_stats(rec))["spk_0"]["name"] == "Alice"


def test_resolved_ignores_bad_entries() -> None:
    mapping: dict[str, Any] = {"spk_0": "Alice", "spk_1": "", "": "X", "spk_2": 3}
    state = replay(Log().resolved(mapping).rows)
    assert state.speakers == {"spk_0": "Alice"}


def test_utterance_view_is_a_sequence() -> None:
    state = replay(Log().say("a", 0, 5, "one").say("b", 5, 9, "two").say("a", 9, 12, "three").rows)
    view = state.utterances()
    assert len(view) == 3
    assert view[0] == ("a", 0, 5, "one")
    assert view[-1] == ("a", 9, 12, "three")
    assert view[1:] == [("b", 5, 9, "two"), ("a", 9, 12, "three")]
    with pytest.raises(IndexError):
        view[3]
    assert next(reversed(view)) == ("a", 9, 12, "three")


# --- reconcile --------------------------------------------------------------------


def test_reconcile_sorts_out_of_order_utterances_stably() -> None:
    log = Log().say("a", 2000, 2500, "third").say("b", 0, 400, "first").say("c", 0, 300, "second")
    rec = log.reconciled()
    assert rec.order is not None
    assert [text for *_, text in rec.utterances()] == ["first", "second", "third"]
    assert [t[0] for t in turns_of(rec)] == ["b", "c", "a"]


def test_reconcile_in_order_log_needs_no_permutation() -> None:
    rec = Log().say("a", 0, 10).say("b", 10, 20).say("a", 20, 30).reconciled()
    assert rec.order is None


def test_merge_threshold() -> None:
    rec = (
        Log()
        .say("a", 0, 1000)
        .say("a", 1000 + MERGE_GAP_MS, 2000)  # gap exactly at the threshold: merged
        .say("a", 2000 + MERGE_GAP_MS + 1, 3000)  # one ms more: a new turn
        .say("a", 2900, 3500)  # overlaps its own turn: merged
        .reconciled()
    )
    assert turns_of(rec) == [("a", 0, 2000, 2), ("a", 2251, 3500, 2)]


def test_another_speaker_taking_the_floor_splits_turns() -> None:
    rec = Log().say("a", 0, 1000).say("b", 1000, 1100).say("a", 1200, 2000).reconciled()
    assert turns_of(rec) == [("a", 0, 1000, 1), ("b", 1000, 1100, 1), ("a", 1200, 2000, 1)]


def test_talking_over_a_turn_does_not_split_it() -> None:
    rec = Log().say("a", 0, 5000).say("b", 2000, 2400, "mm-hm").say("a", 5100, 7000).reconciled()
    assert turns_of(rec) == [("a", 0, 7000, 2), ("b", 2000, 2400, 1)]


def test_reconcile_applies_names_where_known() -> None:
    rec = Log().say("spk_0", 0, 1).say("spk_1", 1, 2).rename("spk_1", "Bob").reconciled()
    assert rec.names == [None, "Bob"]
    assert rec.display_name(0) == "spk_0"
    assert rec.display_name(1) == "Bob"


# --- stats ------------------------------------------------------------------------


def test_stats_of_an_empty_session() -> None:
    stats = compute_stats(reconcile(replay([])))
    assert stats == {
        "speakers": [],
        "totals": {
            "duration_ms": 0,
            "utterance_count": 0,
            "turn_count": 0,
            "speaker_count": 0,
            "overlap_ms": 0,
            "speech_ms": 0,
            "participant_count": 0,
            "note_count": 0,
        },
    }


def test_stats_of_one_speaker() -> None:
    log = Log().say("solo", 1000, 3000).say("solo", 2500, 4000).say("solo", 10_000, 11_000)
    stats = compute_stats(log.reconciled())
    assert stats["speakers"] == [
        {
            "speaker": "solo",
            "name": None,
            "labels": ["solo"],
            "talk_time_ms": 4000,  # 1000..4000 (own overlap once) + 1000
            "talk_share": 1.0,
            "turns": 2,
            "longest_monologue_ms": 3000,
            "interruptions": 0,
        }
    ]
    totals = stats["totals"]
    assert totals["duration_ms"] == 10_000
    assert totals["speech_ms"] == 4000
    assert totals["overlap_ms"] == 0
    assert (totals["utterance_count"], totals["turn_count"], totals["speaker_count"]) == (3, 2, 1)


def test_overlapping_speech_counts_as_interruptions() -> None:
    log = (
        Log()
        .rename("a", "Alice")
        .say("a", 0, 5000)
        .say("b", 4000, 8000)  # b cuts in while a is still talking
        .say("a", 7000, 9000)  # a cuts back in
        .say("c", 9000, 10_000)  # a clean handover is no interruption
    )
    stats = compute_stats(log.reconciled())
    speakers = by_speaker(stats)
    assert speakers["a"]["interruptions"] == 1
    assert speakers["b"]["interruptions"] == 1
    assert speakers["c"]["interruptions"] == 0
    assert stats["totals"]["overlap_ms"] == 2000
    assert [entry["speaker"] for entry in stats["speakers"]] == ["a", "b", "c"]
    for entry in stats["speakers"]:
        SpeakerStats(**entry)  # maps onto the report model


def test_simultaneous_starts_interrupt_nobody() -> None:
    stats = compute_stats(Log().say("a", 0, 1000).say("b", 0, 1000).reconciled())
    assert [e["interruptions"] for e in stats["speakers"]] == [0, 0]
    assert stats["totals"]["overlap_ms"] == 1000


def test_overlap_counts_time_not_speakers() -> None:
    log = Log().say("a", 0, 3000).say("b", 1000, 3000).say("c", 2000, 3000)
    assert compute_stats(log.reconciled())["totals"]["overlap_ms"] == 2000


def test_speakers_ordered_by_talk_time_then_label() -> None:
    log = Log().say("z", 0, 100).say("y", 100, 200).say("x", 200, 900)
    assert [e["speaker"] for e in compute_stats(log.reconciled())["speakers"]] == ["x", "y", "z"]


def _reference(rows: list[Row]) -> dict[str, Any]:
    """Brute force over milliseconds, for comparison with compute_stats."""
    talk: dict[str, set[int]] = {}
    for row in rows:
        talk.setdefault(row["speaker"], set()).update(range(row["start_ms"], row["end_ms"]))
    covered: dict[int, int] = {}
    for instants in talk.values():
        for ms in instants:
            covered[ms] = covered.get(ms, 0) + 1
    return {
        "talk": {label: len(instants) for label, instants in talk.items()},
        "overlap": sum(1 for count in covered.values() if count >= 2),
        "speech": len(covered),
    }


utterance_rows = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 400), st.integers(0, 120)),
    max_size=25,
).map(
    lambda items: [
        {"seq": i + 1, "id": None, "type": "utterance", "speaker": s, "start_ms": t, "end_ms": t + d}
        for i, (s, t, d) in enumerate(items)
    ]
)


@settings(max_examples=300, deadline=None)
@given(utterance_rows)
def test_stats_match_a_brute_force_reference(rows: list[Row]) -> None:
    rec = reconcile(replay(rows))
    stats = compute_stats(rec)
    expected = _reference(rows)
    speakers = by_speaker(stats)
    assert {label: e["talk_time_ms"] for label, e in speakers.items()} == expected["talk"]
    assert stats["totals"]["overlap_ms"] == expected["overlap"]
    assert stats["totals"]["speech_ms"] == expected["speech"]

    turns = turns_of(rec)
    assert sum(size for *_, size in turns) == len(rows)
    assert [t[1] for t in turns] == sorted(t[1] for t in turns)
    for label in speakers:
        own = [(start, end) for who, start, end, _ in turns if who == label]
        assert all(own[i][1] <= own[i + 1][0] for i in range(len(own) - 1)), "a speaker's turns overlap"
        assert speakers[label]["turns"] == len(own)
        assert speakers[label]["longest_monologue_ms"] == max(end - start for start, end in own)
        interrupted = sum(
            1 for start, _end in own if any(w != label and s < start < e for w, s, e, _ in turns)
        )
        assert speakers[label]["interruptions"] == interrupted


@settings(max_examples=100, deadline=None)
@given(utterance_rows, st.randoms(use_true_random=False))
def test_stats_do_not_depend_on_arrival_order(rows: list[Row], rnd: random.Random) -> None:
    shuffled = rows[:]
    rnd.shuffle(shuffled)
    first = compute_stats(reconcile(replay(rows)))
    second = compute_stats(reconcile(replay(shuffled)))
    for key in ("duration_ms", "overlap_ms", "speech_ms", "utterance_count"):
        assert first["totals"][key] == second["totals"][key]
    assert {e["speaker"]: e["talk_time_ms"] for e in first["speakers"]} == {
        e["speaker"]: e["talk_time_ms"] for e in second["speakers"]
    }


# --- timeline ---------------------------------------------------------------------


def test_timeline_of_an_empty_session() -> None:
    assert build_timeline(reconcile(replay([]))) == []


def test_timeline_orders_events_and_turns() -> None:
    log = (
        Log()
        .join("Alice")  # before any speech: placed at the first turn
        .say("spk_0", 500, 1500, "Welcome   to\nthe call")
        .join("Bob")  # after the first utterance: at its end
        .say("spk_1", 1500, 2000, "hi")
        .note("agenda shared")
        .leave("Alice")
        .rename("spk_0", "Alice")
    )
    timeline = build_timeline(log.reconciled())
    assert timeline == [
        {"at_ms": 500, "kind": "participant_joined", "name": "Alice", "seq": 1},
        {
            "at_ms": 500,
            "kind": "turn",
            "speaker": "spk_0",
            "name": "Alice",
            "end_ms": 1500,
            "duration_ms": 1000,
            "utterances": 1,
            "text": "Welcome to the call",
        },
        {"at_ms": 1500, "kind": "participant_joined", "name": "Bob", "seq": 3},
        {
            "at_ms": 1500,
            "kind": "turn",
            "speaker": "spk_1",
            "name": None,
            "end_ms": 2000,
            "duration_ms": 500,
            "utterances": 1,
            "text": "hi",
        },
        {"at_ms": 2000, "kind": "note", "text": "agenda shared", "seq": 5},
        {"at_ms": 2000, "kind": "participant_left", "name": "Alice", "seq": 6},
    ]


def test_timeline_without_speech_places_events_at_zero() -> None:
    timeline = build_timeline(Log().join("A").note("n").reconciled())
    assert [(e["at_ms"], e["kind"]) for e in timeline] == [(0, "participant_joined"), (0, "note")]


def test_timeline_truncates_with_a_marker() -> None:
    log = Log()
    for i in range(10):
        log.say("a" if i % 2 else "b", i * 100, i * 100 + 50, f"u{i}")
    log.note("late note")
    rec = log.reconciled()
    assert len(build_timeline(rec, limit=11)) == 11
    assert build_timeline(rec, limit=11)[-1]["kind"] == "note"
    cut = build_timeline(rec, limit=4)
    assert len(cut) == 4
    assert [e["kind"] for e in cut[:3]] == ["turn", "turn", "turn"]
    assert cut[-1] == {"at_ms": 300, "kind": "truncated", "omitted": 8}
    assert build_timeline(rec, limit=1) == [{"at_ms": 0, "kind": "truncated", "omitted": 11}]
    with pytest.raises(ValueError):
        build_timeline(rec, limit=0)


def test_timeline_clips_long_text() -> None:
    rec = Log().say("a", 0, 1, "word " * 1000).note("n" * 5000).reconciled()
    turn, note = build_timeline(rec)
    assert len(turn["text"]) <= analysis.TIMELINE_TEXT_CHARS
    assert turn["text"].endswith("…")
    assert len(note["text"]) == analysis.NOTE_TEXT_CHARS


# --- transcript excerpt -----------------------------------------------------------


def test_excerpt_of_an_empty_session() -> None:
    assert transcript_excerpt(reconcile(replay([])), 1000) == ""


def test_excerpt_uses_names_and_joins_a_speakers_run() -> None:
    rec = (
        Log()
        .say("spk_0", 0, 10, "Hello there.")
        .say("spk_0", 10, 20, "How  are\nyou?")
        .say("spk_1", 20, 30, "Fine.")
        .rename("spk_0", "Alice")
        .reconciled()
    )
    assert transcript_excerpt(rec, 1000) == "Alice: Hello there. How are you?\nspk_1: Fine."
    assert transcript_excerpt(rec, 0) == ""


def test_excerpt_keeps_the_start_and_the_end_when_cut() -> None:
    log = Log()
    for i in range(1000):
        log.say(f"s{i % 3}", i * 10, i * 10 + 5, f"utterance number {i}")
    rec = log.reconciled()
    excerpt = transcript_excerpt(rec, 2000)
    assert len(excerpt) <= 2000
    lines = excerpt.split("\n")
    assert lines[0] == "s0: utterance number 0"
    assert lines[-1] == "s0: utterance number 999"
    marker = [line for line in lines if line.startswith("[...")]
    assert len(marker) == 1
    omitted = int(marker[0].split()[1])
    assert omitted + len(lines) - 1 == 1000


def test_excerpt_with_a_tiny_budget() -> None:
    rec = Log().say("a", 0, 1, "x" * 50).say("b", 1, 2, "y" * 50).reconciled()
    excerpt = transcript_excerpt(rec, 10)
    assert len(excerpt) <= 10
    assert excerpt.startswith("a: x")


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["a", "bb"]), st.text(max_size=60)), max_size=40),
    st.integers(1, 400),
)
def test_excerpt_never_exceeds_its_budget(items: list[tuple[str, str]], budget: int) -> None:
    log = Log()
    for i, (speaker, text) in enumerate(items):
        log.say(speaker, i, i + 1, text)
    assert len(transcript_excerpt(log.reconciled(), budget)) <= budget


# --- determinism and scale --------------------------------------------------------


def _session(n: int, seed: int = 1) -> list[Row]:
    rnd = random.Random(seed)
    rows: list[Row] = [{"seq": 1, "id": None, "type": "participant_joined", "name": "Alice"}]
    t = 0
    for i in range(n):
        length = rnd.randrange(300, 5000)
        rows.append(
            {
                "seq": i + 2,
                "id": f"m{i}",
                "type": "utterance",
                "speaker": f"spk_{rnd.randrange(5)}",
                "start_ms": t,
                "end_ms": t + length,
                "text": f"utterance {i} about the budget",
            }
        )
        t = max(0, t + length + rnd.randrange(-1500, 800))
        if i % 10_000 == 0:
            rows.append({"seq": len(rows) + 1, "id": None, "type": "note", "text": f"note {i}"})
    return rows


def test_same_log_same_results() -> None:
    rows = _session(2000)
    first, second = reconcile(replay(rows)), reconcile(replay(rows))
    assert compute_stats(first) == compute_stats(second)
    assert build_timeline(first) == build_timeline(second)
    assert transcript_excerpt(first, 5000) == transcript_excerpt(second, 5000)


def test_scales_to_a_hundred_thousand_utterances() -> None:
    rec = reconcile(replay(iter(_session(100_000))))
    stats = compute_stats(rec)
    assert stats["totals"]["utterance_count"] == 100_000
    assert sum(e["turns"] for e in stats["speakers"]) == stats["totals"]["turn_count"]
    timeline = build_timeline(rec)
    assert len(timeline) == 1000
    assert timeline[-1]["kind"] == "truncated"
    assert len(transcript_excerpt(rec, 20_000)) <= 20_000
    assert len(rec.utterances()) == 100_000


# --- people -----------------------------------------------------------------------


def test_labels_of_one_name_are_one_person_in_stats_turns_and_timeline() -> None:
    log = (
        Log()
        .say("spk_0", 0, 4000, "Hi, I'm Alice.")
        .say("spk_1", 4000, 6100, "Bob here.")
        .say("spk_2", 6100, 9000, "Alice again.")
        .say("spk_2", 9100, 9500, "Still me.")  # merges with the turn before
        .rename("spk_0", "Alice")
        .rename("spk_2", " alice ")  # the same name, spelled loosely
        .rename("spk_1", "Bob")
    )
    rec = log.reconciled()
    assert [(p.name, p.labels) for p in rec.people.people] == [("Alice", ["spk_0", "spk_2"]),
                                                               ("Bob", ["spk_1"])]
    stats = compute_stats(rec)
    alice, bob = stats["speakers"]
    assert alice == {"speaker": "spk_0", "name": "Alice", "labels": ["spk_0", "spk_2"],
                     "talk_time_ms": 7300, "talk_share": round(7300 / 9400, 4), "turns": 2,
                     "longest_monologue_ms": 4000, "interruptions": 0}
    assert (bob["talk_time_ms"], bob["turns"], bob["talk_share"]) == (2100, 1, round(2100 / 9400, 4))
    assert stats["totals"]["speaker_count"] == 2
    assert stats["totals"]["turn_count"] == 3
    turns = [(e["speaker"], e["name"], e["utterances"]) for e in build_timeline(rec) if e["kind"] == "turn"]
    assert turns == [("spk_0", "Alice", 1), ("spk_1", "Bob", 1), ("spk_2", "Alice", 2)]


def test_a_persons_overlapping_labels_count_once_and_do_not_interrupt_themselves() -> None:
    rec = reconcile(replay(Log().say("a", 0, 1000).say("b", 500, 1500).rows),
                    inferred={"a": "Carol", "b": "Carol"})
    [carol] = compute_stats(rec)["speakers"]
    assert (carol["labels"], carol["talk_time_ms"], carol["turns"], carol["interruptions"]) == (
        ["a", "b"], 1500, 1, 0)
    assert compute_stats(rec)["totals"]["overlap_ms"] == 0


def test_inferred_names_fill_only_unnamed_labels() -> None:
    state = replay(Log().say("a", 0, 10).say("b", 10, 20).rename("a", "Alice").rows)
    rec = reconcile(state, inferred={"a": "Mallory", "b": "Bob"})
    assert rec.names == ["Alice", "Bob"]
    assert state.speakers == {"a": "Alice"}  # the log's names are untouched


def test_excerpt_lines_join_a_persons_labels() -> None:
    rec = reconcile(replay(Log().say("a", 0, 10, "one").say("b", 10, 20, "two").rows),
                    inferred={"a": "Ann", "b": "Ann"})
    assert transcript_excerpt(rec, 1000) == "Ann: one two"
