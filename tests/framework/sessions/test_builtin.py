"""Tests of the builtin inference provider: speaker resolution and the extractive report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ballast.inference import InferenceProvider, ReportInput, ReportReply, ResolveInput
from ballast.sessions import builtin
from ballast.sessions.analysis import compute_stats, reconcile, replay
from ballast.sessions.builtin import BuiltinProvider, build_report, resolve_speakers

Utterance = tuple[str, int, int, str]
ROOT = Path(__file__).resolve().parents[3]


def said(*lines: tuple[str, str]) -> list[Utterance]:
    """Utterances a second apart from (label, text) pairs."""
    return [(label, i * 1000, i * 1000 + 900, text) for i, (label, text) in enumerate(lines)]


def resolve(
    lines: Sequence[tuple[str, str]], participants: Sequence[str] = (), known: dict[str, str] | None = None
) -> dict[str, str]:
    data = ResolveInput("s1", list(participants), said(*lines), dict(known or {}))
    return resolve_speakers(data).mapping


def report_input(
    utterances: Sequence[Utterance],
    speakers: dict[str, str] | None = None,
    participants: Sequence[str] = (),
    stats: dict[str, Any] | None = None,
    title: str | None = None,
    notes: Sequence[str] = (),
) -> ReportInput:
    return ReportInput(
        session_id="s1",
        title=title,
        participants=list(participants),
        speakers=dict(speakers or {}),
        stats=dict(stats or {}),
        utterances=utterances,
        notes=list(notes),
    )


# --- resolve ----------------------------------------------------------------------


def test_introduction_forms() -> None:
    mapping = resolve(
        [
            ("spk_0", "Hi everyone, I'm Alice and I run design."),
            ("spk_1", "hello, i am bob"),
            ("spk_2", "Yes, this is Carol, calling from Berlin."),
            ("spk_3", "Right. My name is dave."),
            ("spk_4", "Erin here, sorry I'm late."),
            ("spk_5", "and you can call me Frank"),
        ],
        participants=["Alice", "Bob", "Carol", "Dave", "Erin", "Frank"],
    )
    assert mapping == {
        "spk_0": "Alice",
        "spk_1": "Bob",
        "spk_2": "Carol",
        "spk_3": "Dave",
        "spk_4": "Erin",
        "spk_5": "Frank",
    }


def test_curly_apostrophes() -> None:
    assert resolve([("a", "Hi, I\u2019m Alice.")], ["Alice"]) == {"a": "Alice"}


def test_participant_matching_returns_canonical_spelling() -> None:
    mapping = resolve(
        [("a", "I'm ALICE"), ("b", "this is bob smith speaking"), ("c", "I'm Chris")],
        participants=["Alice Jones", "Bob Smith", "Christopher Lee"],
    )
    # first names match when unique; "Chris" is not a first name on the list but is
    # a capitalised name, so it is taken as said
    assert mapping == {"a": "Alice Jones", "b": "Bob Smith", "c": "Chris"}


def test_shared_first_names_need_the_full_name() -> None:
    participants = ["Alice Jones", "Alice Smith"]
    assert resolve([("a", "i'm alice")], participants) == {}
    assert resolve([("a", "i'm alice smith")], participants) == {"a": "Alice Smith"}


def test_without_participants_a_capitalised_name_is_accepted() -> None:
    mapping = resolve(
        [
            ("a", "I'm Zoë Müller, product."),
            ("b", "i'm tired"),
            ("c", "I'm Sorry, I'm Dave."),
            ("d", "I'm Happy to be Here."),
            ("e", "I'm OK with that"),
            ("f", "Everyone here? Great."),
        ]
    )
    assert mapping == {"a": "Zoë Müller", "c": "Dave"}


def test_names_not_in_the_participant_list() -> None:
    mapping = resolve(
        [("a", "Hi, I'm Alice."), ("b", "I'm Gustavo, filling in for Bob."), ("c", "i'm mallory")],
        participants=["Alice", "Bob"],
    )
    assert mapping == {"a": "Alice", "b": "Gustavo"}


def test_possessives_introduce_nobody() -> None:
    assert resolve([("a", "This is Bob's proposal.")], ["Bob"]) == {}
    assert resolve([("a", "This is Bob's proposal.")]) == {}


def test_duplicate_introductions_first_wins_and_names_stay_unique() -> None:
    mapping = resolve(
        [("a", "I'm Alice."), ("b", "No, I'm Alice!"), ("a", "I am Alice, as I said.")],
        participants=["Alice", "Bob"],
    )
    assert mapping == {"a": "Alice"}


def test_a_label_keeps_looking_when_its_first_name_is_taken() -> None:
    mapping = resolve(
        [("a", "I'm Alice."), ("b", "I'm Alice too... kidding, I'm Bob.")],
        participants=["Alice", "Bob"],
    )
    assert mapping == {"a": "Alice", "b": "Bob"}


def test_self_introduction_beats_introducing_someone_else() -> None:
    mapping = resolve(
        [("a", "This is Bob, he joins from sales."), ("a", "And I'm Alice."), ("b", "Thanks!")],
        participants=["Alice", "Bob"],
    )
    assert mapping == {"a": "Alice"}


def test_known_labels_are_kept_and_their_names_reserved() -> None:
    mapping = resolve(
        [("a", "I'm Bob"), ("b", "I'm Bob actually"), ("c", "I'm Carol")],
        participants=["Alice", "Bob", "Carol"],
        known={"a": "Alice", "b": "Bob"},
    )
    assert mapping == {"a": "Alice", "b": "Bob", "c": "Carol"}
    # Guesswork does not take a known name: weak forms and unlisted names stay out.
    assert resolve([("c", "This is Alice")], ["Alice"], known={"a": "Alice"}) == {"a": "Alice"}
    assert resolve([("c", "I'm Zoe")], [], known={"a": "Zoe"}) == {"a": "Zoe"}


def test_a_known_person_under_a_new_label_is_the_same_person() -> None:
    # The client named spk_2 Alice; spk_0 introduces herself as Alice: one person, two labels.
    mapping = resolve([("spk_0", "Hi, I'm Alice"), ("spk_1", "Bob here"), ("spk_2", "Alice again")],
                      ["Alice", "Bob"], known={"spk_2": "Alice"})
    assert mapping == {"spk_0": "Alice", "spk_1": "Bob", "spk_2": "Alice"}
    # Two unnamed labels claiming one name: still the first only.
    assert resolve([("a", "I'm Alice"), ("b", "I'm Alice")], ["Alice"]) == {"a": "Alice"}


def test_only_the_start_of_each_speaker_is_searched() -> None:
    lines = [("a", "filler")] * builtin.RESOLVE_UTTERANCES_PER_LABEL + [("a", "I'm Alice")]
    assert resolve(lines, ["Alice"]) == {}
    assert resolve(lines[1:], ["Alice"]) == {"a": "Alice"}


def test_empty_session_resolves_nothing() -> None:
    assert resolve([], ["Alice"]) == {}


# --- report -----------------------------------------------------------------------

MEETING = said(
    ("spk_0", "Hi everyone, I'm Alice. Let's go through the launch plan and the budget."),
    ("spk_1", "Bob here. The launch budget is tight, marketing wants more for the launch."),
    ("spk_0", "We decided to move the launch to Friday so that marketing has the budget."),
    ("spk_1", "Okay. I will send the updated budget to finance by Thursday."),
    ("spk_2", "Action item: Bob to confirm the venue for the launch party."),
    ("spk_0", "Carol will draft the press release. We need to update the roadmap too."),
    ("spk_2", "Should we invite the press? Let's go."),
    ("spk_1", "I will send the updated budget to finance by Thursday."),
    ("spk_3", "I'll check the numbers."),
)
NAMES = {"spk_0": "Alice", "spk_1": "Bob"}
FRAGMENTS = [
    "I'm",
    "i am",
    "this is",
    "my name is",
    "here",
    "Alice",
    "bob",
    "Smith",
    "will",
    "I will",
    "we need to",
    "let's",
    "action item:",
    "Bob's",
    ".",
    "?",
    ",",
    "decide",
    "budget",
    "\u2019s",
    "Zoë",
]


def test_report_of_an_empty_session() -> None:
    reply = build_report(report_input([], title="Standup"))
    assert reply == ReportReply(
        summary='In "Standup", no speech was recorded.', highlights=[], action_items=[]
    )
    reply = build_report(report_input([], notes=["remember the milk"]))
    assert reply.summary == "No speech was recorded. 1 note taken."


def test_report_summary_names_speakers_time_and_topics() -> None:
    reply = build_report(report_input(MEETING, NAMES, ["Alice", "Bob", "Carol"], title="Launch sync"))
    summary = reply.summary
    assert summary.startswith('In "Launch sync", 4 speakers talked over 8 s in 9 utterances:')
    assert "spoke the most" in summary
    assert "Key topics: budget, launch" in summary  # a tie: alphabetical
    assert "alice" not in summary.split("Key topics:")[1].lower()  # names are not topics


def test_report_uses_finalize_stats_when_given() -> None:
    rows = [
        {"seq": i + 1, "id": None, "type": "utterance", "speaker": s, "start_ms": a, "end_ms": b, "text": t}
        for i, (s, a, b, t) in enumerate(MEETING)
    ]
    rows[-1]["end_ms"] = 65_000  # spk_3 talks for a minute
    stats = compute_stats(reconcile(replay(rows)))
    reply = build_report(report_input(MEETING, NAMES, stats=stats))
    assert "talked over 1 min 05 s" in reply.summary
    assert "spk_3 spoke the most (57 s," in reply.summary


def test_one_speaker() -> None:
    reply = build_report(report_input(said(("a", "I will write the budget report for the board."))))
    assert "1 speaker talked over 0 s in 1 utterance: a." in reply.summary
    assert "a was the only speaker" in reply.summary
    assert [(i.owner, i.text) for i in reply.action_items] == [
        (None, "I will write the budget report for the board")
    ]


def test_action_items_and_owners() -> None:
    reply = build_report(report_input(MEETING, NAMES, ["Alice", "Bob", "Carol Jones"]))
    assert [(item.owner, item.text) for item in reply.action_items] == [
        (None, "Let's go through the launch plan and the budget"),
        ("Bob", "I will send the updated budget to finance by Thursday"),  # once, not twice
        ("Bob", "Bob to confirm the venue for the launch party"),
        ("Carol Jones", "Carol will draft the press release"),
        (None, "We need to update the roadmap too"),
        (None, "I'll check the numbers"),  # spk_3 is not resolved: no owner
    ]


def test_highlights_prefer_informative_and_decisive_utterances() -> None:
    reply = build_report(report_input(MEETING, NAMES))
    assert 0 < len(reply.highlights) <= builtin.MAX_HIGHLIGHTS
    assert "Alice: We decided to move the launch to Friday so that marketing has the budget." in (
        reply.highlights
    )
    assert not any("I'll check the numbers" in h for h in reply.highlights)  # too short
    # in time order
    positions = [next(i for i, u in enumerate(MEETING) if u[3][:30] in h) for h in reply.highlights]
    assert positions == sorted(positions)


def test_report_is_deterministic_in_process() -> None:
    data = report_input(MEETING, NAMES, ["Alice", "Bob"], title="t", notes=["n"])
    assert build_report(data) == build_report(data)


_SCRIPT = """
import json, sys
from ballast.sessions.builtin import build_report, resolve_speakers
from ballast.inference import ReportInput, ResolveInput
words = "budget launch roadmap pricing design hiring review metrics press venue".split()
utts = []
for i in range(3000):
    text = " ".join(words[(i * 7 + k * 3) % len(words)] for k in range(3 + i % 9))
    if i % 17 == 0:
        text = "We agreed that we will review the " + text + ". I will send it."
    utts.append((f"spk_{i % 4}", i * 1000, i * 1000 + 900, text))
utts[5] = ("spk_1", 5000, 5900, "I'm Bob, hello.")
report = build_report(ReportInput("s", "t", ["Alice", "Bob"], {"spk_1": "Bob"}, {}, utts, []))
mapping = resolve_speakers(ResolveInput("s", ["Alice", "Bob"], utts, {}))
print(json.dumps([report.model_dump(), mapping.model_dump()], sort_keys=True))
"""


def test_report_is_deterministic_across_hash_seeds() -> None:
    outputs = set()
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        done = subprocess.run(
            [sys.executable, "-c", _SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True, check=True
        )
        outputs.add(done.stdout)
    assert len(outputs) == 1
    report, mapping = json.loads(outputs.pop())
    assert report["highlights"] and report["action_items"]
    assert mapping == {"mapping": {"spk_1": "Bob"}}


def test_report_scales_to_a_hundred_thousand_utterances() -> None:
    words = ["budget", "launch", "roadmap", "pricing", "design", "hiring", "review", "metrics"]
    words += ["the", "we", "and", "to", "so"]
    utts = [
        (
            f"spk_{i % 5}",
            i * 1000,
            i * 1000 + 900,
            ("I will " if i % 101 == 0 else "") + " ".join(words[(i + k) % len(words)] for k in range(12)),
        )
        for i in range(100_000)
    ]
    reply = build_report(report_input(utts, {"spk_0": "Alice"}))
    assert "100000 utterances" in reply.summary
    assert len(reply.highlights) == builtin.MAX_HIGHLIGHTS
    assert len(reply.action_items) == builtin.MAX_ACTION_ITEMS
    assert resolve_speakers(ResolveInput("s", [], utts)).mapping == {}


# --- provider ---------------------------------------------------------------------


def recording_runner(calls: list[str]) -> Callable[..., Any]:
    async def run_blocking(fn: Callable[..., Any], *args: Any) -> Any:
        calls.append(fn.__name__)
        return fn(*args)

    return run_blocking


async def test_provider_runs_work_through_run_blocking() -> None:
    calls: list[str] = []
    provider: InferenceProvider = BuiltinProvider(recording_runner(calls))
    assert provider.name == "builtin"
    resolved = await provider.resolve(ResolveInput("s", ["Alice"], said(("a", "I'm Alice"))))
    assert resolved.mapping == {"a": "Alice"}
    reply = await provider.report(report_input(MEETING, NAMES))
    assert reply.summary
    assert calls == ["resolve_speakers", "build_report"]
    await provider.close()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c"]),
            st.one_of(
                st.text(max_size=80),
                st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=8).map(" ".join),
            ),
        ),
        max_size=30,
    ),
    st.lists(st.sampled_from(["Alice", "Bob Smith", "bob", "Ann Lee", "Will"]), max_size=4),
)
def test_any_text_gives_valid_replies(lines: list[tuple[str, str]], participants: list[str]) -> None:
    mapping = resolve(lines, participants)
    assert len({name.casefold() for name in mapping.values()}) == len(mapping)
    assert set(mapping) <= {label for label, _ in lines}
    reply = build_report(report_input(said(*lines), mapping, participants))
    assert len(reply.highlights) <= builtin.MAX_HIGHLIGHTS
    assert len(reply.action_items) <= builtin.MAX_ACTION_ITEMS
    assert all(item.text for item in reply.action_items)
