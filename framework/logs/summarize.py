"""``summarize_file``: the one entry point of the summary, choosing its engine.

Callers (the CLI, the benchmarks, tests) ask for a summary of a path; which engine reads
it is decided here, and the document is the same whichever did:

* ``duckdb`` (:mod:`ballast.logs.duck`): a plain regular file, when DuckDB is installed
  (``pip install 'ballast[logs]'``) and, under ``auto``, the file holds at least
  ``MIN_DUCKDB_BYTES``; the engine may decline an input it cannot read exactly as the
  streaming engine does, which then reads it;
* ``stream``: the streaming engine, split across processes for a large plain file
  (:mod:`ballast.logs.parallel`), else one pass (:class:`~ballast.logs.aggregate.LogSummary`
  over a stream): standard input, gzip files, small files, and whatever DuckDB declined.
"""

from __future__ import annotations

import os
from datetime import datetime
from typing import BinaryIO

from ballast.logs import duck
from ballast.logs.aggregate import LogSummary
from ballast.logs.parallel import summarize_parallel
from ballast.logs.reading import GZIP_MAGIC, open_log
from ballast.logs.report import SummaryReport

ENGINES = ("auto", "duckdb", "stream")
MIN_DUCKDB_BYTES = 1 << 20


class EngineMissing(Exception):
    """``engine="duckdb"`` was asked for and DuckDB is not installed."""


def choose_engine(path: str | None, engine: str = "auto") -> str:
    """``"duckdb"`` or ``"stream"``: the engine that will be tried first for ``path``."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: one of {', '.join(ENGINES)}")
    if engine == "stream" or path is None or path == "-":
        return "stream"
    if not duck.available():
        if engine == "duckdb":
            raise EngineMissing("the duckdb engine needs DuckDB: pip install 'ballast[logs]'")
        return "stream"
    try:
        if not os.path.isfile(path):
            return "stream"
        if engine == "auto" and os.path.getsize(path) < MIN_DUCKDB_BYTES:
            return "stream"
        with open(path, "rb") as fh:
            if fh.read(2) == GZIP_MAGIC:
                return "stream"
    except OSError:
        return "stream"  # the streaming engine reports the error in its own words
    return "duckdb"


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

    ``engine`` is ``auto`` (DuckDB for a plain file of ``MIN_DUCKDB_BYTES`` or more when
    it is installed, else the streaming engine), ``duckdb`` (for any plain file; raises
    :class:`EngineMissing` without DuckDB) or ``stream``. The streaming engine splits a
    large plain file across ``workers`` processes (default: the usable cores; see
    :mod:`ballast.logs.parallel`). The result is the same whichever runs.
    """
    if path is not None and choose_engine(path, engine) == "duckdb":
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
