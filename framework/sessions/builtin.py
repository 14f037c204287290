"""The ``builtin`` inference provider: offline, deterministic, and good enough by default.

A session service should work without any model endpoint: speaker resolution and a
usable report must come out of a fresh install, in tests, and when the network is
down. This provider answers both questions with plain text analysis:

* *resolve* looks for self-introductions ("I'm Alice", "my name is Carol", "Bob here")
  and matches the introduced name against the participant list;
* *report* is extractive: a summary built from the statistics and the most frequent
  content words, the most informative utterances as highlights, and sentences that
  promise work ("I will ...", "we need to ...", "action item: ...") as action items.

The same input always gives the same output: nothing here reads a clock, draws a random
number or depends on hash order. CPU work runs through the ``run_blocking`` callable so
the event loop stays free, and every scan is bounded so a very long session costs a
bounded amount of work.
"""

from __future__ import annotations

import heapq
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ballast.inference import (
    ActionItemReply,
    ReportInput,
    ReportReply,
    ResolveInput,
    ResolveReply,
    RunBlocking,
)
from ballast.sessions.people import name_key

# --- bounds -----------------------------------------------------------------------

#: Introductions come early: only this many utterances of each label are searched,
#: and only the start of each.
RESOLVE_UTTERANCES_PER_LABEL = 200
RESOLVE_TEXT_CHARS = 400

#: The report reads at most this many utterances; longer sessions are sampled at an
#: even stride (deterministically), and only the start of each utterance is read.
REPORT_SCAN_UTTERANCES = 40_000
REPORT_TEXT_CHARS = 1_000
#: Highlights are scored over at most this many of those (again an even stride).
HIGHLIGHT_SCAN_UTTERANCES = 15_000

MAX_HIGHLIGHTS = 5
MAX_ACTION_ITEMS = 20
MAX_TOPICS = 5
HIGHLIGHT_CHARS = 280
ACTION_ITEM_CHARS = 280
MIN_HIGHLIGHT_WORDS = 6

# --- vocabulary -------------------------------------------------------------------


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


_STOPWORDS = _words(
    """
    a about above after again against all almost also although always am among an and
    another any anybody anyone anything anyway are around as at away back be because
    been before being below between both but by can cannot come could did do does
    doing done down during each either else enough even ever every everybody everyone
    everything few for from further get gets getting give go goes going gone gonna
    good got great had has have having he her here hers herself him himself his how
    however i if in into is it its itself just keep kind know last least less let
    like likely little look lot lots made make many may maybe me might mine more most
    much must my myself need needs never new next no nobody none nor not nothing now
    of off often oh ok okay on once one only onto or other others otherwise our ours
    ourselves out over own part per perhaps please pretty put quite rather really
    right said same say says see seem seems shall she should since so some somebody
    someone something sometimes soon sorry still such sure take taken tell than thank
    thanks that the their theirs them themselves then there these they thing things
    think this those though through thus till time to today together too toward try
    two uh um under unless until up upon us use used very via want wanted wants was
    way we well went were what whatever when where whether which while who whoever
    whole whom whose why will with within without would yeah yes yet you your yours
    yourself yourselves hmm mhm huh hey hello hi bye actually basically literally
    mean means meant stuff guess sort yep nope alright cool fine lets gotta wanna
    kinda sorta able
    """
)

#: Capitalised words that follow "I'm", "this is" or precede "here" without being a
#: name. Consulted only when the introduced name is not on the participant list.
_NOT_NAMES = _STOPWORDS | _words(
    """
    afraid back busy excited fine glad going happy here honestly joining just late
    listening new not now ok okay on ready really sorry sure still thrilled trying
    working everyone everybody nobody someone somebody anyone team guys folks all
    monday tuesday wednesday thursday friday saturday sunday january february march
    april june july august september october november december today tomorrow
    yesterday morning afternoon evening tonight great good awesome perfect correct
    right wrong true false important interesting weird crazy amazing exactly totally
    definitely probably actually basically literally also only always never still
    speaking calling talking thinking wondering curious confused done finished
    """
)

_DECISION_WORDS = _words(
    """
    decide decided decides decision decisions agree agreed agrees agreement conclude
    concluded conclusion approve approved approval commit committed commitment confirm
    confirmed deadline deadlines plan planned resolve resolved finalize finalized
    will shall must owner assign assigned priority priorities next steps
    """
)

# --- patterns ---------------------------------------------------------------------

_NAME_TOKEN = r"[^\W\d_]+(?:['\u2019\-][^\W\d_]+)*"
_NAME = rf"(?P<name>{_NAME_TOKEN}(?:[ \t]+{_NAME_TOKEN}){{0,2}})"

#: Self-introductions. Strong forms speak of the speaker; "this is X" may also
#: introduce somebody else, so it ranks below them.
_STRONG_INTRO = re.compile(
    r"(?:\bi(?:['\u2019]m|\s+am)\s+|\bmy\s+name(?:['\u2019]s|\s+is)\s+|\bcall\s+me\s+)"
    + _NAME
    + r"|(?:^\s*|[.!?,;]\s+|\bit['\u2019]s\s+|\b(?:hi|hello|hey)\s+)"
    + r"(?P<here>"
    + _NAME_TOKEN
    + r"(?:[ \t]+"
    + _NAME_TOKEN
    + r")?)\s+here\b",
    re.IGNORECASE,
)
_WEAK_INTRO = re.compile(r"\bthis\s+is\s+" + _NAME, re.IGNORECASE)
_POSSESSIVE = ("'s", "\u2019s")

#: Punctuation (but not apostrophes, which hold contractions together) to spaces, so
#: that ``str.split`` tokenises: far faster than a regular expression on long sessions.
_PUNCTUATION = str.maketrans(
    dict.fromkeys('!"#$%&()*+,-./:;<=>?@[\\]^_`{|}~\u2018\u201c\u201d\u2026\u2013\u2014', " ")
)
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+")
_ACTION_HINT = re.compile(
    r"\bwill\b|['\u2019]ll\b|\bgoing\s+to\b|\bneeds?\s+to\b|\bhave\s+to\b|\bshould\b|"
    r"\bmust\b|\blet['\u2019]?s\b|\blet\s+us\b|\baction\s+items?\b",
    re.IGNORECASE,
)
_ACTION_LABEL = re.compile(r"\baction\s+items?\s*[:\-\u2013\u2014]\s*(?P<body>.+)", re.IGNORECASE)
_SELF_ACTION = re.compile(
    r"\bI(?:\s+will|['\u2019]ll|\s+am\s+going\s+to|['\u2019]m\s+going\s+to|\s+need\s+to)\s+"
    r"(?P<body>.+)",
    re.IGNORECASE,
)
_GROUP_ACTION = re.compile(
    r"(?:\bwe(?:\s+will|['\u2019]ll|\s+need\s+to|\s+have\s+to|\s+should|\s+must|"
    r"\s+are\s+going\s+to)|\blet['\u2019]s|\blet\s+us)\s+(?P<body>.+)",
    re.IGNORECASE,
)
_NAMED_ACTION = re.compile(
    r"\b(?P<who>"
    + _NAME_TOKEN
    + r")(?:\s+will|['\u2019]ll|\s+is\s+going\s+to|\s+needs\s+to|\s+has\s+to)\s+(?P<body>.+)",
    re.IGNORECASE,
)
_LEADING_OWNER = re.compile(
    r"^(?P<who>" + _NAME_TOKEN + r")(?:\s*[:,\-]\s*|\s+to\s+|\s+will\s+)", re.IGNORECASE
)


def _squash(text: str) -> str:
    return " ".join(text.split())


def _clip(text: str, limit: int) -> str:
    text = _squash(text)
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


class _Names:
    """Case-insensitive lookup of canonical names by full name or unique first name."""

    __slots__ = ("_first", "_full")

    def __init__(self, names: Iterable[str]) -> None:
        self._full: dict[str, str] = {}
        first: dict[str, str | None] = {}
        for raw in names:
            name = _squash(raw)
            if not name:
                continue
            key = name.casefold()
            self._full.setdefault(key, name)
            given = key.split()[0]
            if given in first and first[given] != name:
                first[given] = None  # ambiguous: two people share this first name
            else:
                first[given] = name
        self._first = {k: v for k, v in first.items() if v is not None}

    def match(self, phrase: str) -> str | None:
        """The canonical name for the longest leading part of ``phrase`` that matches."""
        tokens = phrase.casefold().split()
        for size in range(len(tokens), 0, -1):
            hit = self._full.get(" ".join(tokens[:size]))
            if hit is not None:
                return hit
        return self._first.get(tokens[0]) if tokens else None


def _capitalised_name(phrase: str) -> str | None:
    """A name-like run of capitalised words at the start of ``phrase``, if any."""
    words: list[str] = []
    for token in phrase.split():
        if not token[0].isupper() or token.casefold() in _NOT_NAMES:
            break
        if len(token) > 1 and token.isupper():
            break  # "OK", "USA": an acronym, not a name
        words.append(token)
    return " ".join(words) if words else None


# --- resolve ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Candidate:
    rank: int  # 0 best: participant + strong, 1 participant + weak, 2/3 unlisted
    order: int  # utterance index, then match position
    position: int
    label: str
    name: str


def resolve_speakers(data: ResolveInput) -> ResolveReply:
    """Map speaker labels to names from self-introductions (synchronous).

    Labels in ``data.known`` keep their names and are returned unchanged. For the other
    labels, each introduction is a candidate, ranked: a participant named in a strong
    form ("I'm", "I am", "my name is", "call me", "X here"), then a participant after
    "this is", then an unlisted capitalised name in a strong form, then in the weak
    form. Candidates are taken in rank order, then in order of appearance; a label gets
    the first candidate whose name is still free, so no two labels are given one name
    by guesswork. One exception makes speakers people: a name the client already gave
    a label (``known``) goes to another label that introduces itself by it in a strong
    form and is a listed participant: the same person speaking under a new label, as
    after a dropped microphone.
    """
    participants = _Names(data.participants)
    mapping: dict[str, str] = {label: name for label, name in data.known.items() if label and name}
    reserved = {name.casefold() for name in mapping.values()}
    taken = set(reserved)
    scanned: dict[str, int] = {}
    candidates: list[_Candidate] = []
    seen: set[tuple[str, str, int]] = set()

    for index, (label, _start, _end, text) in enumerate(data.utterances):
        if label in mapping:
            continue
        count = scanned.get(label, 0)
        if count >= RESOLVE_UTTERANCES_PER_LABEL:
            continue
        scanned[label] = count + 1
        window = text[:RESOLVE_TEXT_CHARS]
        for strong, pattern in ((True, _STRONG_INTRO), (False, _WEAK_INTRO)):
            for match in pattern.finditer(window):
                phrase = match.group("name")
                if strong and not phrase:
                    phrase = match.group("here")
                if not phrase or phrase.split()[0].casefold().endswith(_POSSESSIVE):
                    continue  # "this is Bob's idea" introduces nobody
                listed = participants.match(phrase)
                if listed is not None:
                    name, rank = listed, (0 if strong else 1)
                else:
                    unlisted = _capitalised_name(phrase)
                    if unlisted is None:
                        continue
                    name, rank = unlisted, (2 if strong else 3)
                if (label, name, rank) in seen:
                    continue
                seen.add((label, name, rank))
                candidates.append(_Candidate(rank, index, match.start(), label, name))

    candidates.sort(key=lambda c: (c.rank, c.order, c.position))
    for candidate in candidates:
        key = candidate.name.casefold()
        if candidate.label in mapping:
            continue
        if key in taken and not (candidate.rank == 0 and key in reserved):
            continue
        mapping[candidate.label] = candidate.name
        taken.add(key)
    return ResolveReply(mapping=mapping)


# --- report -----------------------------------------------------------------------


def _format_ms(ms: int) -> str:
    seconds = max(0, int(ms)) // 1000
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


def _join_names(names: Sequence[str], limit: int = 5) -> str:
    shown = list(names[:limit])
    if len(names) > limit:
        shown.append(f"{len(names) - limit} others")
    if len(shown) <= 1:
        return "".join(shown)
    return ", ".join(shown[:-1]) + " and " + shown[-1]


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


@dataclass(slots=True)
class _SpeakerTotals:
    label: str
    name: str | None
    talk_ms: int


def _speaker_totals(
    data: ReportInput, sample: Sequence[tuple[str, int, int, str]]
) -> tuple[list[_SpeakerTotals], int, int]:
    """Talk time per speaker (most first), session duration and utterance count.

    Taken from ``data.stats`` when it carries them (the finalize statistics:
    ``{"speakers": [...], "totals": {...}}``), else estimated from the utterances.
    """
    stats = data.stats if isinstance(data.stats, dict) else {}
    totals = stats.get("totals") if isinstance(stats.get("totals"), dict) else stats
    listed = stats.get("speakers")
    if isinstance(listed, list) and all(
        isinstance(entry, dict)
        and isinstance(entry.get("speaker"), str)
        and isinstance(entry.get("talk_time_ms"), int)
        for entry in listed
    ):
        speakers = [
            _SpeakerTotals(
                entry["speaker"],
                entry.get("name") if isinstance(entry.get("name"), str) else None,
                entry["talk_time_ms"],
            )
            for entry in listed
        ]
    else:
        # No statistics: estimate per person (labels of the same name count once).
        names = {label: name for label, name in data.speakers.items() if name}
        talk: dict[str, _SpeakerTotals] = {}
        for label, start, end, _text in sample:
            name = names.get(label)
            key = name_key(name) if name else "\0" + label
            entry = talk.get(key)
            if entry is None:
                entry = talk[key] = _SpeakerTotals(label, name, 0)
            entry.talk_ms += max(0, end - start)
        speakers = list(talk.values())
    speakers.sort(key=lambda s: (-s.talk_ms, s.label))

    duration = totals.get("duration_ms") if isinstance(totals, dict) else None
    if not isinstance(duration, int):
        starts = [start for _label, start, _end, _text in sample]
        ends = [end for _label, _start, end, _text in sample]
        duration = max(ends) - min(starts) if sample else 0
    count = totals.get("utterance_count") if isinstance(totals, dict) else None
    return speakers, duration, count if isinstance(count, int) else len(data.utterances)


def _sample(utterances: Sequence[tuple[str, int, int, str]]) -> list[tuple[str, int, int, str]]:
    """The utterances the report reads: all of them, or an even stride through them."""
    n = len(utterances)
    if n <= REPORT_SCAN_UTTERANCES:
        return list(utterances)
    stride = n / REPORT_SCAN_UTTERANCES
    return [utterances[int(k * stride)] for k in range(REPORT_SCAN_UTTERANCES)]


def _tokens(text: str) -> list[str]:
    """Lower-cased words of ``text``; contractions stay whole ("don't")."""
    return text.lower().translate(_PUNCTUATION).split()


def _term_frequency(sample: list[tuple[str, int, int, str]], ignored: frozenset[str]) -> dict[str, int]:
    """How often each content word occurs: alphabetic, three letters or more, and
    neither a stopword nor part of a speaker's name or label."""
    counts = Counter(_tokens("\n".join(text[:REPORT_TEXT_CHARS] for *_, text in sample)))
    return {
        term: count
        for term, count in counts.items()
        if len(term) >= 3 and term.isalpha() and term not in _STOPWORDS and term not in ignored
    }


def _topics(frequency: dict[str, int]) -> list[str]:
    ranked = heapq.nsmallest(MAX_TOPICS, frequency.items(), key=lambda item: (-item[1], item[0]))
    return [term for term, count in ranked if count >= 2]


def _highlights(
    sample: list[tuple[str, int, int, str]], frequency: dict[str, int], names: dict[str, str]
) -> list[str]:
    """The most informative utterances, in time order.

    Score: how common the utterance's distinct content words are across the session
    (summed log frequency, divided by the square root of its word count so long rambles
    do not win by size alone), plus a bonus for decision words. Utterances shorter than
    :data:`MIN_HIGHLIGHT_WORDS` words, or with neither a recurring term nor a decision
    word, are not candidates. Sums use ``math.fsum``, which does not depend on the
    order of the (hash-ordered) term sets, so scores are reproducible.
    """
    weight = {term: math.log1p(count) for term, count in frequency.items()}
    recurring = {term for term, count in frequency.items() if count >= 2}
    content = weight.keys()

    stride = max(1, math.ceil(len(sample) / HIGHLIGHT_SCAN_UTTERANCES))

    def candidates() -> Iterable[tuple[float, int]]:
        for position in range(0, len(sample), stride):
            words = _tokens(sample[position][3][:REPORT_TEXT_CHARS])
            if len(words) < MIN_HIGHLIGHT_WORDS:
                continue
            distinct = set(words)
            decisions = len(_DECISION_WORDS.intersection(distinct))
            terms = content & distinct
            if not decisions and recurring.isdisjoint(terms):
                continue
            value = math.fsum(map(weight.__getitem__, terms)) / math.sqrt(len(words))
            yield value + 1.5 * min(decisions, 2), -position

    best = sorted(-negated for _score, negated in heapq.nlargest(MAX_HIGHLIGHTS * 2, candidates()))
    chosen: list[str] = []
    seen: set[str] = set()
    for position in best:
        label, _start, _end, text = sample[position]
        key = _squash(text[:REPORT_TEXT_CHARS]).casefold()
        if key in seen:
            continue
        seen.add(key)
        chosen.append(f"{names.get(label, label)}: {_clip(text[: HIGHLIGHT_CHARS * 4], HIGHLIGHT_CHARS)}")
        if len(chosen) == MAX_HIGHLIGHTS:
            break
    return chosen


def _tidy(text: str) -> str:
    text = _squash(text).rstrip(" .!;,")
    if text:
        text = text[0].upper() + text[1:]
    return _clip(text, ACTION_ITEM_CHARS)


def _action_in_sentence(sentence: str, speaker_name: str | None, people: _Names) -> ActionItemReply | None:
    if sentence.rstrip().endswith("?"):
        return None
    labelled = _ACTION_LABEL.search(sentence)
    if labelled is not None:
        body = labelled.group("body")
        owner: str | None = None
        lead = _LEADING_OWNER.match(body)
        if lead is not None:
            owner = people.match(lead.group("who"))
        if owner is None and _SELF_ACTION.match(body):
            owner = speaker_name
        return _item(owner, body)
    mine = _SELF_ACTION.search(sentence)
    if mine is not None:
        return _item(speaker_name, sentence[mine.start() :], mine.group("body"))
    for named in _NAMED_ACTION.finditer(sentence):
        owner = people.match(named.group("who"))
        if owner is not None and named.group("who").casefold() not in _STOPWORDS:
            return _item(owner, sentence[named.start() :], named.group("body"))
    ours = _GROUP_ACTION.search(sentence)
    if ours is not None:
        return _item(None, sentence[ours.start() :], ours.group("body"))
    return None


def _item(owner: str | None, text: str, body: str | None = None) -> ActionItemReply | None:
    """An action item, unless what is promised is too short to be one ("let's go")."""
    if len(_tokens(body if body is not None else text)) < 2:
        return None
    tidy = _tidy(text)
    return ActionItemReply(owner=owner, text=tidy) if tidy else None


def _action_items(
    sample: list[tuple[str, int, int, str]], names: dict[str, str], people: _Names
) -> list[ActionItemReply]:
    items: list[ActionItemReply] = []
    seen: set[tuple[str | None, str]] = set()
    for label, _start, _end, raw in sample:
        text = raw[:REPORT_TEXT_CHARS]
        if _ACTION_HINT.search(text) is None:
            continue
        speaker_name = names.get(label)
        for sentence in _SENTENCE_SPLIT.split(text):
            item = _action_in_sentence(sentence, speaker_name, people)
            if item is None:
                continue
            key = (item.owner, item.text.casefold())
            if key in seen:
                continue
            seen.add(key)
            items.append(item)
            if len(items) == MAX_ACTION_ITEMS:
                return items
    return items


def _summary(
    data: ReportInput,
    speakers: list[_SpeakerTotals],
    duration_ms: int,
    utterance_count: int,
    topics: list[str],
    action_count: int,
    names: dict[str, str],
) -> str:
    sentences: list[str] = []
    where = f'In "{_squash(data.title)}", ' if data.title and _squash(data.title) else ""
    talking = [s for s in speakers if s.talk_ms > 0] or speakers
    if not utterance_count or not talking:
        sentences.append(f"{where}no speech was recorded." if where else "No speech was recorded.")
    else:
        who = [names.get(s.label) or s.name or s.label for s in talking]
        sentences.append(
            f"{where}{_plural(len(who), 'speaker')} talked over {_format_ms(duration_ms)}"
            f" in {_plural(utterance_count, 'utterance')}: {_join_names(who)}."
        )
        top = talking[0]
        total_talk = sum(s.talk_ms for s in talking)
        if len(talking) == 1:
            sentences.append(f"{who[0]} was the only speaker ({_format_ms(top.talk_ms)}).")
        elif total_talk > 0:
            share = round(100 * top.talk_ms / total_talk)
            sentences.append(f"{who[0]} spoke the most ({_format_ms(top.talk_ms)}, {share}% of talk time).")
    if topics:
        sentences.append(f"Key topics: {_join_names(topics, MAX_TOPICS)}.")
    if data.notes:
        sentences.append(f"{_plural(len(data.notes), 'note')} taken.")
    if action_count:
        sentences.append(f"{_plural(action_count, 'action item')} noted.")
    return " ".join(sentences)


def build_report(data: ReportInput) -> ReportReply:
    """An extractive report: summary, highlights and action items (synchronous)."""
    names = {label: name for label, name in data.speakers.items() if name}
    people = _Names([*data.participants, *names.values()])
    ignored = frozenset(
        token for name in [*data.participants, *names.values(), *names.keys()] for token in _tokens(name)
    )
    sample = _sample(data.utterances)
    frequency = _term_frequency(sample, ignored)
    topics = _topics(frequency)
    highlights = _highlights(sample, frequency, names)
    actions = _action_items(sample, names, people)
    speakers, duration, count = _speaker_totals(data, sample)
    summary = _summary(data, speakers, duration, count, topics, len(actions), names)
    return ReportReply(summary=summary, highlights=highlights, action_items=actions)


# --- provider ---------------------------------------------------------------------


class BuiltinProvider:
    """The embedded inference provider; see the module docstring."""

    name = "builtin"

    def __init__(self, run_blocking: RunBlocking) -> None:
        self._run_blocking = run_blocking

    async def resolve(self, data: ResolveInput) -> ResolveReply:
        reply: ResolveReply = await self._run_blocking(resolve_speakers, data)
        return reply

    async def report(self, data: ReportInput) -> ReportReply:
        reply: ReportReply = await self._run_blocking(build_report, data)
        return reply

    async def close(self) -> None:
        return None
