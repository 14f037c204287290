"""Appends cost O(batch), not O(session): participant joins as a session grows.

The store keeps participants and speaker labels as rows, so an append touches only
the rows its batch names. This measures it on the store itself (a real SQLite file,
durability ``normal``), with the session limit raised so the session can grow to
``--participants``: the time of one 500-join batch near the end over the time of one
near the start (1.0 means flat), and the time of a one-note append to another session
while the first is large over the same append while it is small. Each round measures
early and late batches of the same run, so the ratios are side by side.

    python bench/bench_participants.py [--participants 150000] [--rounds 3]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common

BATCH = 500
SAMPLES = 10  # batches timed at each end


async def one_round(total: int) -> dict[str, float]:
    from ballast.sessions.sqlite_store import SQLiteStore
    from ballast.sessions.store import SessionLimits

    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "p.db", durability="normal",
                            limits=SessionLimits(max_participants=total + BATCH))
        await store.open()
        try:
            await store.create_session("default", "big", None, [])
            await store.create_session("default", "other", None, [])
            batches = total // BATCH
            joins: list[float] = []
            notes: list[float] = []
            for b in range(batches):
                batch = [{"type": "participant_joined", "name": f"guest {b}-{i}"} for i in range(BATCH)]
                t0 = time.perf_counter()
                await store.append("default", "big", batch)
                joins.append(time.perf_counter() - t0)
                if b < SAMPLES or b >= batches - SAMPLES:
                    t0 = time.perf_counter()
                    await store.append("default", "other", [{"type": "note", "text": f"n{b}"}])
                    notes.append(time.perf_counter() - t0)
        finally:
            await store.close()
    return {
        "join_early_ms": statistics.median(joins[:SAMPLES]) * 1000,
        "join_late_ms": statistics.median(joins[-SAMPLES:]) * 1000,
        "note_early_ms": statistics.median(notes[:SAMPLES]) * 1000,
        "note_late_ms": statistics.median(notes[-SAMPLES:]) * 1000,
    }


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__, rounds=3)
    parser.add_argument("--participants", type=int, default=150_000)
    args = parser.parse_args(argv)
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        row = asyncio.run(one_round(args.participants))
        row["join_ratio"] = row["join_late_ms"] / row["join_early_ms"]
        row["note_ratio"] = row["note_late_ms"] / row["note_early_ms"]
        rounds.append({k: round(v, 3) for k, v in row.items()})
        print(f"round {r + 1}: {rounds[-1]}", file=sys.stderr)
    join_ratio = statistics.median(r["join_ratio"] for r in rounds)
    note_ratio = statistics.median(r["note_ratio"] for r in rounds)
    result = {
        "machine": common.machine(),
        "method": f"{args.participants} participants joined in batches of {BATCH} on the store; "
                  f"median of the first and last {SAMPLES} batches per round",
        "rounds": rounds,
        "medians": {"join_late_over_early": round(join_ratio, 2),
                    "note_late_over_early": round(note_ratio, 2)},
        "targets": {
            "join batch at the end vs the start": {
                "target": "<= 2.0", "measured": round(join_ratio, 2),
                "result": common.verdict(join_ratio <= 2.0)},
        },
    }
    return common.finish("participants", result, args, result["medians"])


if __name__ == "__main__":
    raise SystemExit(main())
