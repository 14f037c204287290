"""Reading a log: a file, a gzip file (by its magic bytes) or standard input, in batches of lines.

Every ``ballast logs`` command reads the same inputs the same way, so the rules live
here once: the input is read in fixed-size chunks and split into lines; a line longer
than ``max_line_bytes`` (8 MiB) is dropped as it streams past and counted as
``too_long``; a gzip stream cut short yields what could be decompressed, then raises
:class:`EOFError` so the caller can say the input ended early.
"""

from __future__ import annotations

import io
import sys
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol, cast

GZIP_MAGIC = b"\x1f\x8b"
CHUNK_BYTES = 1 << 20
MAX_LINE_BYTES = 8 << 20


class LogInputError(Exception):
    """The log could not be opened; the message names the file and the reason."""


class Readable(Protocol):
    """What the readers need of an input: ``read(size)``, ``b""`` at the end."""

    def read(self, size: int, /) -> bytes: ...


@dataclass(slots=True)
class LogSource:
    """An opened log: the decompressed byte stream and what it was opened from."""

    stream: Readable
    name: str
    gzip: bool


class GunzipReader:
    """Decompresses a gzip stream (one member or several) as it is read.

    Unlike :class:`gzip.GzipFile`, a truncated stream yields every byte that could be
    decompressed before the reader raises :class:`EOFError`, so a summary of a log cut
    short (a copy taken while it was written, a full disk) still counts what is there.
    Output per call is bounded by ``size``, so one highly compressed line cannot blow up
    memory.
    """

    def __init__(self, raw: Readable, input_bytes: int = 1 << 16) -> None:
        self._raw = raw
        self._input_bytes = input_bytes
        self._pending = b""
        self._inflate: Any = None  # the zlib decompressor of the current member
        self._ended = False

    def read(self, size: int, /) -> bytes:
        while not self._ended:
            if not self._pending:
                self._pending = self._raw.read(self._input_bytes)
                if not self._pending:
                    self._ended = True
                    if self._inflate is not None:
                        raise EOFError("compressed file ended before the end-of-stream marker")
                    break
            if self._inflate is None:
                # Between members: gzip tolerates zero padding here.
                self._pending = self._pending.lstrip(b"\x00")
                if not self._pending:
                    continue
                self._inflate = zlib.decompressobj(wbits=31)
            out: bytes = self._inflate.decompress(self._pending, size)
            self._pending = self._inflate.unconsumed_tail
            if self._inflate.eof:
                self._pending = self._inflate.unused_data + self._pending
                self._inflate = None
            if out:
                return out
        return b""


def _peek(stream: BinaryIO, n: int) -> tuple[BinaryIO, bytes]:
    """Look at the first ``n`` bytes without consuming them (wrapping if needed)."""
    peek = getattr(stream, "peek", None)
    if peek is None:
        buffered = io.BufferedReader(cast(io.RawIOBase, stream))
        peek = buffered.peek
        stream = cast(BinaryIO, buffered)
    head: bytes = peek(n)[:n]
    return stream, head


@contextmanager
def open_log(path: str | None, *, stdin: BinaryIO | None = None) -> Iterator[LogSource]:
    """Open ``path`` (``None`` or ``"-"``: standard input) for reading, gunzipping if needed.

    Gzip is recognised by its magic bytes, so a compressed file without a ``.gz`` name
    (or a compressed stream on stdin) is read correctly. Raises :class:`LogInputError`.
    """
    if path is None or path == "-":
        if stdin is None and sys.stdin.isatty():
            raise LogInputError(
                "no log file given and standard input is a terminal: pass FILE or pipe a log in"
            )
        raw: BinaryIO = stdin if stdin is not None else sys.stdin.buffer
        name = "-"
        owned = False
    else:
        try:
            raw = open(path, "rb")  # noqa: SIM115 - closed below, after the caller is done
        except OSError as exc:
            raise LogInputError(f"cannot read {path}: {exc.strerror or exc}") from exc
        name = path
        owned = True
    try:
        try:
            raw, head = _peek(raw, 2)
        except OSError as exc:
            raise LogInputError(f"cannot read {name}: {exc.strerror or exc}") from exc
        if head == GZIP_MAGIC:
            yield LogSource(GunzipReader(raw), name, True)
        else:
            yield LogSource(raw, name, False)
    finally:
        if owned:
            raw.close()


class LineCounter:
    """Counts what :func:`read_batches` drops: lines over the length limit."""

    __slots__ = ("too_long",)

    def __init__(self) -> None:
        self.too_long = 0


def read_batches(
    stream: Readable,
    *,
    max_line_bytes: int = MAX_LINE_BYTES,
    counter: LineCounter | None = None,
) -> Iterator[list[bytes]]:
    """Yield lists of lines (without ``\\n``) read from ``stream`` in fixed-size chunks.

    Batches let the caller loop over a plain list instead of paying a generator step per
    line. A line longer than ``max_line_bytes`` is discarded as it streams past (memory
    stays at one chunk plus one line) and counted in ``counter.too_long``.
    """
    chunk_bytes = max(1, min(CHUNK_BYTES, max_line_bytes))
    read = stream.read
    pending = b""
    dropping = False
    while True:
        chunk = read(chunk_bytes)
        if not chunk:
            break
        parts = chunk.split(b"\n")
        rest = parts.pop()
        if parts:
            if dropping:
                # The end of an over-long line: discard its last piece.
                dropping = False
                del parts[0]
            elif pending:
                first = pending + parts[0]
                if len(first) > max_line_bytes:
                    if counter is not None:
                        counter.too_long += 1
                    del parts[0]
                else:
                    parts[0] = first
            pending = b""
            if parts:
                yield parts
        if dropping:
            continue
        pending += rest
        if len(pending) > max_line_bytes:
            dropping = True
            pending = b""
            if counter is not None:
                counter.too_long += 1
    if pending:
        yield [pending]
