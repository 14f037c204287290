"""``summarize_file``: the one entry point of the summary, choosing one pass or several processes.

Callers (the CLI, the benchmarks, tests) ask for a summary of a path; whether it is read
in one pass (:class:`~ballast.logs.aggregate.LogSummary` over a stream) or split across
processes (:mod:`ballast.logs.parallel`) is decided here, and either way the document
is the same.
"""

from __future__ import annotations

from datetime import datetime
from typing import BinaryIO

from ballast.logs.aggregate import LogSummary
from ballast.logs.parallel import summarize_parallel
from ballast.logs.reading import open_log
from ballast.logs.report import SummaryReport


def summarize_file(
    path: str | None,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    stdin: BinaryIO | None = None,
    interval_s: int | None = None,
    workers: int | None = None,
) -> SummaryReport:
    """Summarise the log at ``path`` (``None``/``"-"``: stdin). Raises :class:`LogInputError`.

    A large plain file is summarised on ``workers`` processes (default: the usable
    cores; see :mod:`ballast.logs.parallel`), with the same result as one pass.
    """
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
