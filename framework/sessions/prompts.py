"""Prompts for an OpenAI-compatible model: bounded by a character budget, read bounded.

The prompt is bounded (``MAX_PROMPT_CHARS``) and built deterministically, so the same
session always sends the same request. Its cost is bounded too: only the two ends of a
transcript can appear in it, so only the two ends are read (a
:class:`~ballast.inference.TranscriptWindow` of at most
:func:`window_rows` utterances), whatever the session's length, and the provider builds
the prompt in a worker thread, off the event loop.

Every line is flattened (a newline in a transcript would forge prompt structure) and
clipped; omitted lines are marked in place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import orjson

from ballast.inference import ReportInput, ResolveInput, TranscriptWindow
from ballast.sessions.transcript import sequence_window

#: Upper bound on the user message, in characters (roughly 6k tokens).
MAX_PROMPT_CHARS = 24_000
#: Longest single transcript line or list entry in the prompt; longer ones are cut.
MAX_LINE_CHARS = 1_000
#: Share of the prompt that the lists before the transcript (participants, notes) may use.
_HEADER_SHARE = 4
_STATS_CHARS = 2_000
#: The shortest line a transcript can hold ("a: b" and its newline) is 5 characters, so
#: a budget of N characters never shows more than N / 5 lines: no end needs more rows.
_MIN_LINE = 5


def window_rows(limit: int) -> int:
    """Utterances to read from each end of a transcript for a prompt of ``limit`` chars."""
    return max(1, limit // _MIN_LINE)


def resolve_prompt(data: ResolveInput, limit: int = MAX_PROMPT_CHARS,
                   window: TranscriptWindow | None = None) -> str:
    """Participants, known speakers and as much transcript as fits in ``limit`` chars.

    When the transcript does not fit, every speaker's first lines are kept before
    anyone's later ones: self-introductions come early, and each label needs evidence.
    ``window`` is the transcript's ends as read by the caller; without it, the
    utterances must be an in-memory sequence and are windowed here.
    """
    header = _header([
        ("Participants", data.participants),
        ("Known speakers", [f"{label}: {name}" for label, name in sorted(data.known.items())]),
    ], limit // _HEADER_SHARE)
    if window is None:
        if not isinstance(data.utterances, Sequence):
            raise TypeError("resolve_prompt: pass the window of a stored transcript")
        window = sequence_window(data.utterances, window_rows(limit), window_rows(limit))
    lines = [(label, text) for label, _, _, text in (*window.head, *window.tail)]
    return header + _transcript(lines, limit - len(header), _round_robin,
                                gap_at=len(window.head), gap=window.omitted)


def report_prompt(data: ReportInput, limit: int = MAX_PROMPT_CHARS) -> str:
    """Title, participants, statistics, notes and as much transcript as fits.

    Lines are labelled with resolved names where known. When the transcript does not
    fit, its beginning and end are kept (context, then decisions and action items); only
    those ends are read.
    """
    head = f"Title: {_clip(data.title)}\n" if data.title else ""
    head += _header([("Participants", data.participants), ("Notes", data.notes)],
                    limit // _HEADER_SHARE)
    head += f"Statistics:\n{_stats(data.stats)}\n"
    window = sequence_window(data.utterances, window_rows(limit), window_rows(limit))
    lines = [(data.speakers.get(label, label), text) for label, _, _, text in (*window.head, *window.tail)]
    return head + _transcript(lines, limit - len(head), _ends_first,
                              gap_at=len(window.head), gap=window.omitted)


def _clip(text: str, limit: int = MAX_LINE_CHARS) -> str:
    """One line of at most ``limit`` chars: newlines would forge prompt structure."""
    flat = " ".join(text[: limit * 4].split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _header(blocks: Iterable[tuple[str, Sequence[str]]], budget: int) -> str:
    out = ""
    for title, items in blocks:
        if not items:
            continue
        block = f"{title}:\n"
        for n, item in enumerate(items):
            entry = f"- {_clip(item)}\n"
            if len(out) + len(block) + len(entry) > budget:
                block += f"- (and {len(items) - n} more)\n"
                break
            block += entry
        out += block
    return out


def _stats(stats: Mapping[str, Any]) -> str:
    whole = orjson.dumps(stats, default=str, option=orjson.OPT_SORT_KEYS).decode()
    if len(whole) <= _STATS_CHARS:
        return whole
    parts = []
    for key in sorted(stats, key=str):
        part = f"{key}: {orjson.dumps(stats[key], default=str, option=orjson.OPT_SORT_KEYS).decode()}"
        parts.append(part if len(part) <= _STATS_CHARS // 2 else f"{key}: (omitted)")
    return _clip(" | ".join(parts), _STATS_CHARS)


def _transcript(lines: Sequence[tuple[str, str]], budget: int,
                priority: Callable[[Sequence[tuple[str, str]]], list[int]],
                gap_at: int = 0, gap: int = 0) -> str:
    """The ``Transcript:`` section within ``budget`` chars, omissions marked in place.

    ``gap`` lines that were never read lie before line ``gap_at`` (between a window's
    head and tail); they count as omitted there.
    """
    rendered = [f"{_clip(label, 64)}: {_clip(text)}" for label, text in lines]
    keep = [i for i, (_, text) in enumerate(lines) if text.strip()]
    title = "Transcript:\n"
    if not keep:
        return title + "(empty)\n"
    chosen: list[int] = []
    used = len(title)
    for i in priority([lines[i] for i in keep]):
        cost = len(rendered[keep[i]]) + 1
        if used + cost > budget:
            break
        chosen.append(keep[i])
        used += cost
    while True:
        text = _render(title, rendered, keep, sorted(chosen), gap_at, gap)
        if len(text) <= budget or not chosen:
            return text
        chosen.pop()  # the omission markers did not fit: give up the last line chosen


def _render(title: str, rendered: Sequence[str], keep: Sequence[int], chosen: Sequence[int],
            gap_at: int, unread: int) -> str:
    out = [title]
    picked = set(chosen)
    gap = 0
    for i in keep:
        if unread and i >= gap_at:
            gap, unread = gap + unread, 0
        if i in picked:
            if gap:
                out.append(f"[... {gap} lines omitted ...]\n")
                gap = 0
            out.append(rendered[i] + "\n")
        else:
            gap += 1
    gap += unread
    if gap:
        out.append(f"[... {gap} lines omitted ...]\n")
    return "".join(out)


def _round_robin(lines: Sequence[tuple[str, str]]) -> list[int]:
    """Each speaker's first line, then each one's second line, and so on."""
    by_label: dict[str, list[int]] = {}
    for i, (label, _) in enumerate(lines):
        by_label.setdefault(label, []).append(i)
    order: list[int] = []
    depth = 0
    while len(order) < len(lines):
        for indices in by_label.values():
            if depth < len(indices):
                order.append(indices[depth])
        depth += 1
    return order


def _ends_first(lines: Sequence[tuple[str, str]]) -> list[int]:
    """First line, last line, second line, second to last, ... towards the middle."""
    order: list[int] = []
    lo, hi = 0, len(lines) - 1
    while lo <= hi:
        order.append(lo)
        if hi != lo:
            order.append(hi)
        lo, hi = lo + 1, hi - 1
    return order
