"""The latency sketch behind every percentile and histogram of the summary.

A log-bucketed histogram (the DDSketch layout) with 1% relative error whose size is
bounded by the range of the values, not their count. It is hand-written rather than
taken from ``ddsketch`` or ``hdrhistogram`` because the summary's hot loop updates its
buckets inline (no call per value), and because it was measured against both on the
benchmark log: see bench/README.md, "Latency sketch".
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterable

from ballast.logs.report import HistogramBin

_ACCURACY = 0.01
_GAMMA = (1 + _ACCURACY) / (1 - _ACCURACY)
_INV_LOG_GAMMA = 1.0 / math.log(_GAMMA)
_MIN_MS = 0.001
# Display bins: a 1-2-5 series from 1 µs to ~11.6 days, in ms.
_DISPLAY_EDGES: tuple[float, ...] = tuple(m * 10.0**e for e in range(-3, 10) for m in (1.0, 2.0, 5.0))


class LatencySketch:
    """A log-bucketed histogram of non-negative values (ms): 1% relative error, bounded size.

    Bucket ``i`` counts values in ``(gamma**(i-1), gamma**i]``; a quantile is answered
    with the midpoint (in relative terms) of the bucket that holds its rank. Values below
    ``0.001`` count as zero. The maximum is tracked exactly. The summary's hot loop
    updates ``buckets``/``zeros``/``max`` inline, the same way :meth:`add` does.
    """

    __slots__ = ("buckets", "max", "zeros")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.zeros = 0
        self.max = -1.0  # below any value: no value yet

    @property
    def count(self) -> int:
        return self.zeros + sum(self.buckets.values())

    def maximum(self) -> float | None:
        return None if self.max < 0 else self.max

    def add(self, value: float) -> None:
        """Count ``value``; it must be a finite, non-negative number."""
        if value >= _MIN_MS:
            index = math.ceil(math.log(value) * _INV_LOG_GAMMA)
            buckets = self.buckets
            buckets[index] = buckets.get(index, 0) + 1
        else:
            self.zeros += 1
        if value > self.max:
            self.max = value

    def merge(self, other: LatencySketch) -> None:
        self.zeros += other.zeros
        self.max = max(self.max, other.max)
        buckets = self.buckets
        for index, n in other.buckets.items():
            buckets[index] = buckets.get(index, 0) + n

    @staticmethod
    def _estimate(index: int) -> float:
        return 2.0 * _GAMMA**index / (_GAMMA + 1.0)

    def quantiles(self, qs: Iterable[float]) -> list[float | None]:
        """Nearest-rank quantiles (``q`` in ``[0, 1]``), ``None`` for an empty sketch."""
        wanted = list(qs)
        count = self.count
        if count == 0:
            return [None for _ in wanted]
        order = sorted(self.buckets.items())
        out: list[float | None] = []
        for q in wanted:
            rank = max(1, math.ceil(q * count))
            if rank <= self.zeros:
                out.append(0.0)
                continue
            seen = self.zeros
            value = self.max
            for index, n in order:
                seen += n
                if seen >= rank:
                    value = self._estimate(index)
                    break
            out.append(min(value, self.max))
        return out

    def histogram(self) -> list[HistogramBin]:
        """Counts in 1-2-5 bins, trimmed to the occupied range (inner empty bins kept)."""
        counts = [0] * (len(_DISPLAY_EDGES) + 1)
        counts[0] = self.zeros
        for index, n in self.buckets.items():
            counts[bisect_right(_DISPLAY_EDGES, self._estimate(index))] += n
        occupied = [i for i, n in enumerate(counts) if n]
        if not occupied:
            return []
        bins: list[HistogramBin] = []
        for i in range(occupied[0], occupied[-1] + 1):
            lower = 0.0 if i == 0 else _DISPLAY_EDGES[i - 1]
            upper = _DISPLAY_EDGES[i] if i < len(_DISPLAY_EDGES) else math.inf
            bins.append({"lower_ms": lower, "upper_ms": upper, "count": counts[i]})
        return bins


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
