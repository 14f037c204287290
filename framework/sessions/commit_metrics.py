"""What every store adapter reports about its writes: mutations committed, batch sizes.

Both adapters commit appends in groups (SQLite's writer thread, PostgreSQL's flushers);
each calls :meth:`CommitMetrics.committed` once per committed transaction with the
results it is about to hand back, so the two metrics mean the same on either backend.
"""

from __future__ import annotations

from collections.abc import Iterable

from ballast.sessions.store import AppendResult
from ballast.telemetry import Telemetry


class CommitMetrics:
    """``ballast_mutations_committed_total`` and ``ballast_commit_batch_size``."""

    __slots__ = ("_batch", "_committed")

    def __init__(self, telemetry: Telemetry | None = None) -> None:
        tel = telemetry or Telemetry()
        self._committed = tel.counter("ballast_mutations_committed_total")
        self._batch = tel.histogram("ballast_commit_batch_size")

    def committed(self, results: Iterable[object]) -> None:
        """One transaction committed these results; repeated mutation ids are not new."""
        new = sum(1 for r in results if isinstance(r, AppendResult)
                  for a in r.accepted if not a.duplicate)
        if new:
            self._committed.inc(amount=new)
            self._batch.observe(new)
