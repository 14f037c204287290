"""Reading only the ends of a transcript: what a bounded prompt needs, and no more.

A prompt has a budget of characters, so it can show only so many lines, and those come
from the start and the end of a conversation. Reading a 100,000-utterance session to
render 24,000 characters of it would cost work proportional to the session, per call;
these helpers read a bounded number of rows instead, whatever the session's length.

* :class:`StoredTranscript` is a session's transcript in the store: iterable (streamed,
  blocking, for a worker thread) and windowed (two bounded page reads, async).
* :func:`read_window` takes the window of either that or an in-memory sequence.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from ballast.inference import TranscriptSource, TranscriptWindow, Utterance
from ballast.sessions.store import Store

_UTTERANCE = "utterance"


def _utterance(row: dict[str, Any]) -> Utterance | None:
    if row.get("type") != _UTTERANCE:
        return None
    return (row["speaker"], row["start_ms"], row["end_ms"], row["text"])


class StoredTranscript:
    """The utterances of one session as stored, in seq order, read on demand.

    ``last_seq`` is the session's last seq when the transcript was taken: the window's
    tail ends there, so mutations appended meanwhile are not read.
    """

    __slots__ = ("_last_seq", "_session_id", "_store", "_tenant", "rows_read")

    def __init__(self, store: Store, tenant: str, session_id: str, last_seq: int) -> None:
        self._store = store
        self._tenant = tenant
        self._session_id = session_id
        self._last_seq = last_seq
        #: Rows this transcript has read from the store so far (of any type).
        self.rows_read = 0

    def __iter__(self) -> Iterator[Utterance]:
        for row in self._store.iter_mutations(self._tenant, self._session_id):
            if row["seq"] > self._last_seq:
                return
            self.rows_read += 1
            utterance = _utterance(row)
            if utterance is not None:
                yield utterance

    async def window(self, head: int, tail: int) -> TranscriptWindow:
        """The first ``head`` and last ``tail`` mutations, as utterances: two page reads.

        Counts are in rows (mutations of any type), so the work is bounded even when
        other mutations come between the utterances.
        """
        last = self._last_seq
        rows: list[dict[str, Any]] = []
        if head > 0:
            rows = await self._store.list_mutations(self._tenant, self._session_id, 0, min(head, last))
        self.rows_read += len(rows)
        first = [u for u in map(_utterance, rows) if u is not None]
        read_to = rows[-1]["seq"] if rows else 0
        start = max(read_to, last - tail)
        tail_rows = []
        if tail > 0 and start < last:
            tail_rows = await self._store.list_mutations(self._tenant, self._session_id, start,
                                                         last - start)
            self.rows_read += len(tail_rows)
        end = [u for u in map(_utterance, tail_rows) if u is not None]
        return TranscriptWindow(first, end, omitted=max(0, start - read_to))


def sequence_window(utterances: Sequence[Utterance], head: int, tail: int) -> TranscriptWindow:
    """The window of an in-memory sequence: slices, so O(head + tail)."""
    n = len(utterances)
    if n <= head + tail:
        return TranscriptWindow(list(utterances))
    return TranscriptWindow(list(utterances[:head]), list(utterances[n - tail:] if tail else []),
                            omitted=n - head - tail)


async def read_window(utterances: Sequence[Utterance] | TranscriptSource, head: int,
                      tail: int) -> TranscriptWindow:
    """The window of a stored transcript (bounded reads) or of a sequence (slices)."""
    if isinstance(utterances, Sequence):
        return sequence_window(utterances, head, tail)
    return await utterances.window(head, tail)
