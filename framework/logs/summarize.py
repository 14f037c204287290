"""``summarize_file``: the one entry point of the summary, choosing its engine.

Callers (the CLI, the benchmarks, tests) ask for a summary of a path; which engine reads
it is decided here, and the document is the same whichever did:

* ``native`` (:mod:`ballast.logs.native`): a plain regular file, when the C scanner was
  built at install (it needs a C compiler; the build goes on without it);
* ``duckdb`` (:mod:`ballast.logs.duck`): a plain regular file, when DuckDB is installed
  (``pip install 'ballast[logs]'``) and, under ``auto``, the file holds at least
  ``MIN_DUCKDB_BYTES``;
* ``stream``: the streaming engine, split across processes for a large plain file
  (:mod:`ballast.logs.parallel`), else one pass (:class:`~ballast.logs.aggregate.LogSummary`
  over a stream): standard input, gzip files, small files, and whatever the others declined.

``auto`` tries them in that order. Any engine may decline an input it cannot read
exactly as the streaming engine does (a line over 8 MiB, a table over its cap, ...); the
next one then reads it.
"""

from __future__ import annotations

import os
from datetime import datetime
from typing import BinaryIO

from ballast.logs import duck, native
from ballast.logs.aggregate import LogSummary
from ballast.logs.parallel import summarize_parallel
from ballast.logs.reading import GZIP_MAGIC, open_log
from ballast.logs.report import SummaryReport

ENGINES = ("auto", "native", "duckdb", "stream")
MIN_DUCKDB_BYTES = 1 << 20


class EngineMissing(Exception):
    """An engine was asked for by name and is not installed."""


def _plain_file(path: str) -> bool:
    try:
        if not os.path.isfile(path):
            return False
        with open(path, "rb") as fh:
            return fh.read(2) != GZIP_MAGIC
    except OSError:
        return False  # the streaming engine reports the error in its own words


def choose_engine(path: str | None, engine: str = "auto") -> str:
    """``"native"``, ``"duckdb"`` or ``"stream"``: the engine tried first for ``path``."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: one of {', '.join(ENGINES)}")
    if engine == "native" and not native.available():
        raise EngineMissing("the native engine was not built: reinstall ballast where a C compiler is found")
    if engine == "duckdb" and not duck.available():
        raise EngineMissing("the duckdb engine needs DuckDB: pip install 'ballast[logs]'")
    if engine == "stream" or path is None or path == "-" or not _plain_file(path):
        return "stream"
    if engine == "auto":
        if native.available():
            return "native"
        if not duck.available():
            return "stream"
        try:
            if os.path.getsize(path) < MIN_DUCKDB_BYTES:
                return "stream"
        except OSError:
            return "stream"
        return "duckdb"
    return engine


def summarize_file(
    path: str | None,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    stdin: BinaryIO | None = None,
    interval_s: int | None = None,
    workers: int | None = None,
    engine: str = "auto",
) -> SummaryReport:
    """Summarise the log at ``path`` (``None``/``"-"``: stdin). Raises :class:`LogInputError`.

    ``engine`` is ``auto`` (see the module's notes), ``native`` or ``duckdb`` (that
    engine for any plain file, the streaming engine for what it declines; raises
    :class:`EngineMissing` when it is not installed) or ``stream``. The streaming engine splits a
    large plain file across ``workers`` processes (default: the usable cores; see
    :mod:`ballast.logs.parallel`). The result is the same whichever runs.
    """
    first = choose_engine(path, engine)
    if path is not None and first == "native":
        report: SummaryReport | None = native.summarize_native(
            path, since=since, until=until, interval_s=interval_s)
        if report is not None:
            return report
        if engine == "auto" and duck.available():
            first = "duckdb"
    if path is not None and first == "duckdb":
        report = duck.summarize_duckdb(path, since=since, until=until, interval_s=interval_s)
        if report is not None:
            return report
    if path is not None and path != "-" and workers != 1:
        report = summarize_parallel(path, since=since, until=until, interval_s=interval_s, workers=workers)
        if report is not None:
            return report
    summary = LogSummary(since=since, until=until, interval_s=interval_s)
    with open_log(path, stdin=stdin) as source:
        summary.source = source.name
        summary.gzip = source.gzip
        summary.feed_stream(source.stream)
    return summary.report()
