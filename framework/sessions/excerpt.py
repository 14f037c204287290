"""A bounded ``Name: text`` transcript of a reconciled session.

Kept apart from :mod:`ballast.sessions.analysis` (which measures) because it renders:
an excerpt whose cost is bounded by its size, not by the session's length.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from ballast.sessions.analysis import Reconciled
from ballast.sessions.analysis import clip_text as _clip

#: Longest single line in a transcript excerpt; longer runs of speech by one person
#: continue on a new ``Name:`` line.
EXCERPT_LINE_CHARS = 1000


def _lines(
    reconciled: Reconciled,
    positions: Iterable[int],
    line_chars: int,
    backwards: bool = False,
) -> Iterator[tuple[str, int]]:
    """``Name: text`` lines over utterances at the given time-order positions.

    Consecutive utterances of one speaker share a line until it reaches ``line_chars``.
    Yields each line with the number of utterances it covers. With ``backwards`` the
    positions run from late to early and each line's parts are put back in time order.
    """
    state = reconciled.state
    speaker_ids, texts = state.speaker_ids, state.texts
    person_of = reconciled.people.person_of
    speaker = -1
    parts: list[str] = []
    size = 0
    covered = 0
    for position in positions:
        i = reconciled.utterance_index(position)
        if speaker < 0 or person_of[speaker] != person_of[speaker_ids[i]] or size >= line_chars:
            if covered:
                yield (
                    _line(reconciled.display_name(speaker), parts, line_chars, backwards),
                    covered,
                )
            speaker = speaker_ids[i]
            parts = []
            size = 0
            covered = 0
        covered += 1
        text = " ".join(texts[i][: line_chars * 2].split())
        if text and size < line_chars:
            parts.append(text)
            size += len(text) + 1
    if covered:
        yield (
            _line(reconciled.display_name(speaker), parts, line_chars, backwards),
            covered,
        )


def _line(name: str, parts: list[str], line_chars: int, backwards: bool) -> str:
    if backwards:
        parts.reverse()
    return _clip(f"{name}: {' '.join(parts)}", line_chars)


def transcript_excerpt(reconciled: Reconciled, max_chars: int) -> str:
    """A ``Name: text`` transcript of at most ``max_chars`` characters, for a prompt.

    Speakers appear by name where known, else by label; consecutive utterances of one
    speaker share a line (up to :data:`EXCERPT_LINE_CHARS`). When the whole transcript
    does not fit, the excerpt keeps the opening (about two thirds of the budget) and the
    close (the rest), joined by a ``[... N utterances omitted ...]`` line. The work done
    is bounded by ``max_chars`` rather than by the session's length, except for runs of
    empty utterances.
    """
    n = reconciled.utterance_count
    if max_chars <= 0 or n == 0:
        return ""
    line_chars = min(EXCERPT_LINE_CHARS, max_chars)

    head: list[tuple[str, int]] = []
    used = 0
    covered_total = 0
    for line, covered in _lines(reconciled, range(n), line_chars):
        cost = len(line) + (1 if head else 0)
        if used + cost > max_chars:
            break
        head.append((line, covered))
        used += cost
        covered_total += covered
    if covered_total == n:
        return "\n".join(line for line, _ in head)

    marker_room = len(f"[... {n} utterances omitted ...]") + 2
    head_budget = max(0, max_chars - marker_room) * 2 // 3
    kept: list[str] = []
    kept_covered = 0
    used = 0
    for line, covered in head:
        cost = len(line) + (1 if kept else 0)
        if used + cost > head_budget:
            break
        kept.append(line)
        kept_covered += covered
        used += cost

    tail_budget = max_chars - marker_room - used
    tail: list[str] = []
    tail_covered = 0
    used_tail = 0
    earlier = range(n - 1, kept_covered - 1, -1)
    for line, covered in _lines(reconciled, earlier, line_chars, backwards=True):
        cost = len(line) + 1
        if used_tail + cost > tail_budget:
            break
        tail.append(line)
        used_tail += cost
        tail_covered += covered
    tail.reverse()

    if not kept and not tail:
        # Not even one line fits beside the marker: show the start of the first line.
        return _clip(
            head[0][0] if head else next(_lines(reconciled, range(n), line_chars))[0],
            max_chars,
        )
    omitted = n - kept_covered - tail_covered
    if omitted == 0:
        return "\n".join([*kept, *tail])
    return "\n".join([*kept, f"[... {omitted} utterances omitted ...]", *tail])
