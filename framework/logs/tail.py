"""``ballast logs tail [FILE|-]``: follow a growing log and print one compact line per second.

For an operator watching a deployment: is traffic flowing, are errors starting, is the
upstream being retried, did the breaker open, are we shedding load? Each line covers
the lines that arrived since the previous one (rates are per second of wall time)::

    14:03:05  12 lines  req 120.0/s  5xx 2  4xx 1  p95 35.2 ms  retries 3  give-ups 0  ...

A file is followed like ``tail -F``: from its end (``--from-start`` reads what is
already there first), reopened when it is replaced (log rotation) or truncated.
Standard input is read as it arrives. Interrupt (Ctrl-C, SIGINT) prints the totals and
exits 0. Memory is one window's counters and one partial line (capped at 8 MiB).
"""

from __future__ import annotations

import os
import select
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import BinaryIO, TextIO

import orjson

from ballast.logs.reading import MAX_LINE_BYTES, LogInputError
from ballast.logs.sketch import LatencySketch

#: Events counted in the live line, with their short labels.
WATCHED: dict[str, str] = {
    "upstream.retry": "retries",
    "upstream.failed": "give-ups",
    "upstream.retry_denied": "retry-denied",
    "circuit.opened": "breaker-opened",
    "fallback.used": "fallbacks",
    "auth.denied": "auth-denied",
    "error.unhandled": "errors",
    "finalize.completed": "finalized",
}
_POLL_S = 0.1


class Window:
    """Counters of the lines seen since the last printed line."""

    def __init__(self) -> None:
        self.lines = 0
        self.skipped = 0
        self.requests = 0
        self.status = {"4xx": 0, "5xx": 0}
        self.shed = 0
        self.events = dict.fromkeys(WATCHED.values(), 0)
        self.sketch = LatencySketch()

    def feed(self, line: bytes) -> None:
        if not line.strip():
            return
        self.lines += 1
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            self.skipped += 1
            return
        if type(obj) is not dict:
            self.skipped += 1
            return
        event = obj.get("event")
        if event == "http.request":
            self.requests += 1
            status = obj.get("status")
            if type(status) is int and 400 <= status <= 599:
                self.status["5xx" if status >= 500 else "4xx"] += 1
            duration = obj.get("duration_ms")
            if isinstance(duration, (int, float)) and type(duration) is not bool and 0 <= duration < 1e15:
                self.sketch.add(float(duration))
        elif event == "load.shed":
            count = obj.get("count")
            self.shed += count if type(count) is int and count > 0 else 1
        elif type(event) is str and event in WATCHED:
            self.events[WATCHED[event]] += 1

    def line(self, now: datetime, seconds: float) -> str:
        seconds = max(seconds, 1e-6)
        (p95,) = self.sketch.quantiles((0.95,))
        p95_text = "-" if p95 is None else f"{p95:.1f} ms"
        parts = [
            now.strftime("%H:%M:%S"),
            f"{self.lines} lines",
            f"req {self.requests / seconds:.1f}/s",
            f"5xx {self.status['5xx']}",
            f"4xx {self.status['4xx']}",
            f"p95 {p95_text}",
            *(f"{label} {n}" for label, n in self.events.items()),
            f"shed {self.shed}",
        ]
        if self.skipped:
            parts.append(f"not-json {self.skipped}")
        return "  ".join(parts)


class _Follower:
    """Reads what was appended to a file since the last call; handles rotation and truncation."""

    def __init__(self, path: str, from_start: bool) -> None:
        self.path = path
        self.fh: BinaryIO | None = None
        self.inode = -1
        self._open(from_start)
        if self.fh is None:  # later, a missing file is a rotation in progress; now, a mistake
            raise LogInputError(f"cannot read {path}: No such file or directory")

    def _open(self, from_start: bool) -> None:
        try:
            fh = open(self.path, "rb")  # noqa: SIM115 - kept open while following
        except FileNotFoundError:
            return  # not there yet (or rotated away): try again on the next poll
        except OSError as exc:
            raise LogInputError(f"cannot read {self.path}: {exc.strerror or exc}") from exc
        if self.fh is not None:
            self.fh.close()
        self.fh = fh
        self.inode = os.fstat(fh.fileno()).st_ino
        if not from_start:
            fh.seek(0, os.SEEK_END)

    def read(self) -> bytes:
        if self.fh is None:
            self._open(True)
            return b"" if self.fh is None else self.fh.read(1 << 20)
        data = self.fh.read(1 << 20)
        if data:
            return data
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return b""
        if st.st_ino != self.inode:
            self._open(True)  # replaced: the new file is read from its start
        elif st.st_size < self.fh.tell():
            self.fh.seek(0)  # truncated in place
        return b""

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()


def _stdin_reader(stream: BinaryIO) -> Callable[[], bytes | None]:
    fd = stream.fileno()

    def read() -> bytes | None:
        ready, _, _ = select.select([fd], [], [], _POLL_S)
        if not ready:
            return b""
        data = os.read(fd, 1 << 20)
        return data if data else None  # None: the writer closed the pipe

    return read


def follow(
    path: str | None,
    out: TextIO,
    *,
    from_start: bool = False,
    every_s: float = 1.0,
    stdin: BinaryIO | None = None,
) -> int:
    """Follow the log until SIGINT (or the end of standard input); 0 when stopped that way."""
    follower = _Follower(path, from_start) if path not in (None, "-") else None
    if follower is None:
        stream = stdin if stdin is not None else sys.stdin.buffer
        read_stdin = _stdin_reader(stream)
    total = Window()
    window = Window()
    pending = b""
    started = last = time.monotonic()
    ended = False
    try:
        while not ended:
            if follower is not None:
                data: bytes | None = follower.read()
                if not data:
                    time.sleep(_POLL_S)
            else:
                data = read_stdin()
            if data is None:
                ended = True
                data = b"\n" if pending else b""
            if data:
                lines = (pending + data).split(b"\n")
                pending = lines.pop()
                if len(pending) > MAX_LINE_BYTES:
                    pending = b""
                for line in lines:
                    window.feed(line)
                    total.feed(line)
            now = time.monotonic()
            if now - last >= every_s or ended:
                out.write(window.line(datetime.now(UTC), now - last) + "\n")
                out.flush()
                window = Window()
                last = now
    except KeyboardInterrupt:
        pass
    finally:
        if follower is not None:
            follower.close()
    out.write("-- total: " + total.line(datetime.now(UTC), time.monotonic() - started) + "\n")
    out.flush()
    return 0
