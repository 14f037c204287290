"""Benchmark 3: finalize time and server memory for sessions of 10k, 100k and 1M utterances.

For each size, one SQLite file is built before any server starts, with the store's own
write path (:meth:`ballast.sessions.sqlite_store.SQLiteStore.append`, in batches of
20,000 mutations validated by the API's own models): a session with four participants,
self-introductions, four speakers, occasional overlaps, joins, leaves and notes.

Each round copies that file, starts ``ballast serve`` on the copy (default config: all
plugins on, the builtin provider, ``finalize_ms = 120000``), calls
``POST .../finalize`` and polls ``GET .../finalize`` every 20 ms until the job leaves
``running``. The time is from the POST to the first poll that sees ``succeeded``; the
memory is the server's peak RSS (``VmHWM`` in ``/proc/<pid>/status``) read after the
job, beside its RSS before the POST. Figures are medians over rounds.

    python bench/bench_finalize.py [--sizes 10000,100000,1000000] [--rounds 3]
"""

from __future__ import annotations

import asyncio
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common

SESSION = "bench-finalize"
PEOPLE = ("Alice", "Bob", "Chen", "Dana")
BUILD_BATCH = 20_000
TARGET_100K_S = 2.0
TARGET_RSS_MB = 300
TARGET_GROWTH = 12.0
WORDS = ("we", "should", "ship", "the", "report", "by", "friday", "and", "then", "review",
         "numbers", "budget", "customer", "latency", "deploy", "plan", "next", "quarter",
         "I", "think", "agree", "maybe", "risk", "owner", "action", "item", "follow", "up")


def mutations(count: int, seed: int = 7) -> Any:
    """``count`` utterances plus a few joins, leaves and notes, in batches (dicts)."""
    rng = random.Random(seed)
    at = 0
    n = 0
    batch: list[dict[str, Any]] = []
    while n < count:
        speaker = rng.randrange(4)
        if n < 4:
            speaker = n
            text = f"Hi everyone, I am {PEOPLE[n]} and I will take notes on the plan."
        else:
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 18)))
        # Short utterances and gaps, so that even a million fit in the API's one-week
        # limit on timestamps.
        duration = rng.randint(200, 800)
        start = max(0, at - rng.randint(0, 150)) if rng.random() < 0.1 else at + rng.randint(0, 60)
        batch.append({"id": f"u{n}", "type": "utterance", "speaker": f"spk_{speaker}",
                      "start_ms": start, "end_ms": start + duration, "text": text})
        at = start + duration
        n += 1
        if n % 5000 == 0:
            batch.append({"type": "note", "text": f"checkpoint {n}: {text}"})
        if n % 50_000 == 0:
            guest = f"Guest {n // 50_000}"
            batch.append({"type": "participant_joined", "name": guest})
            batch.append({"type": "participant_left", "name": guest})
        if len(batch) >= BUILD_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


async def build_db(path: Path, count: int) -> dict[str, Any]:
    """The session file, written by the store itself (API models validate every item)."""
    from ballast.sessions import models as m
    from ballast.sessions.sqlite_store import SQLiteStore
    from ballast.sessions.store import SessionLimits

    t0 = time.perf_counter()
    # The largest size holds a million utterances plus its notes and joins, a little
    # over the default [sessions] max_mutations: that limit is chosen inside the envelope
    # measured here, so the file is built without it.
    store = SQLiteStore(path, durability="normal", limits=SessionLimits(max_mutations=2_000_000))
    await store.open()
    try:
        await store.create_session("default", SESSION, "Quarterly planning", list(PEOPLE))
        total = 0
        for raw in mutations(count):
            # The same validation and dump as the POST handler, in chunks of the API's
            # batch limit.
            items: list[dict[str, Any]] = []
            for i in range(0, len(raw), m.MAX_BATCH):
                batch = m.MutationBatch.model_validate({"mutations": raw[i:i + m.MAX_BATCH]})
                items += [mu.model_dump(exclude_none=False) for mu in batch.mutations]
            result = await store.append("default", SESSION, items)
            total = result.last_seq
    finally:
        await store.close()
    return {"mutations": total, "seconds": round(time.perf_counter() - t0, 1)}


def finalize_once(db: Path, log: Path) -> dict[str, Any]:
    server = common.ballast_server(db, stdout=log)
    with server:
        base = f"{server.origin}/v1/sessions/{SESSION}"
        rss_before = server.status()
        t0 = time.perf_counter()
        status, body = common.http_json("POST", f"{base}/finalize")
        if status != 202:
            raise RuntimeError(f"finalize did not start: {status} {body}")
        job = body["job"]
        polls = 0
        while job["state"] == "running":
            time.sleep(0.02)
            status, body = common.http_json("GET", f"{base}/finalize")
            job = body["job"]
            polls += 1
        seconds = time.perf_counter() - t0
        rss_after = server.status()
        status, report = common.http_json("GET", f"{base}/report")
    totals = report.get("stats", {}) if isinstance(report, dict) else {}
    return {
        "state": job["state"], "seconds": round(seconds, 3), "job_elapsed_ms": job["elapsed_ms"],
        "stages_ms": {s["name"]: s["duration_ms"] for s in job["stages"]},
        "rss_before_mb": round(rss_before.get("VmRSS", 0) / 1024, 1),
        "peak_rss_mb": round(rss_after.get("VmHWM", 0) / 1024, 1),
        "report_status": status, "utterance_count": totals.get("utterance_count"),
        "polls": polls, "error": job.get("error"),
    }


def run(sizes: list[int], rounds: int) -> dict[str, Any]:
    info = common.machine()  # taken before the run: date and load average at its start
    by_size: dict[str, Any] = {}
    with common.WorkDir("finalize") as work:
        for size in sizes:
            source = work / f"s{size}.db"
            built = asyncio.run(build_db(source, size))
            built["bytes"] = source.stat().st_size
            print(f"{size}: built {built}", file=sys.stderr)
            runs = []
            for r in range(rounds):
                db = work / f"run-{size}-{r}.db"
                shutil.copyfile(source, db)
                runs.append(finalize_once(db, work / f"run-{size}-{r}.log"))
                db.unlink()
                print(f"{size} round {r + 1}/{rounds}: {runs[-1]['state']} in "
                      f"{runs[-1]['seconds']} s, peak {runs[-1]['peak_rss_mb']} MB", file=sys.stderr)
            source.unlink()
            ok = [x for x in runs if x["state"] == "succeeded"]
            by_size[str(size)] = {
                "build": built,
                "succeeded": f"{len(ok)}/{len(runs)}",
                "median_seconds": common.median([x["seconds"] for x in ok]) if ok else None,
                "median_peak_rss_mb": common.median([x["peak_rss_mb"] for x in runs]),
                "median_rss_before_mb": common.median([x["rss_before_mb"] for x in runs]),
                "median_stages_ms": {
                    stage: common.median([x["stages_ms"][stage] or 0 for x in runs])
                    for stage in runs[0]["stages_ms"]},
                "runs": runs,
            }

    targets: dict[str, Any] = {}
    s100 = by_size.get("100000")
    if s100:
        t = s100["median_seconds"]
        targets["100k_seconds"] = {"target": f"<= {TARGET_100K_S}", "measured": t,
                                   "result": common.verdict(t is not None and t <= TARGET_100K_S)}
        rss = s100["median_peak_rss_mb"]
        targets["100k_peak_rss_mb"] = {"target": f"<= {TARGET_RSS_MB}", "measured": rss,
                                       "result": common.verdict(rss <= TARGET_RSS_MB)}
    s1m = by_size.get("1000000")
    if s100 and s1m and s100["median_seconds"] and s1m["median_seconds"]:
        growth = s1m["median_seconds"] / s100["median_seconds"]
        targets["1m_vs_100k_time"] = {"target": f"<= {TARGET_GROWTH}x", "measured": round(growth, 2),
                                      "result": common.verdict(growth <= TARGET_GROWTH)}
    elif s100 and s1m:
        targets["1m_vs_100k_time"] = {"target": f"<= {TARGET_GROWTH}x", "measured": None,
                                      "result": common.verdict(False)}
    return {
        "benchmark": "finalize",
        "machine": info,
        "method": {
            "load": "SQLite file built before the server starts, with SQLiteStore.append in "
                    f"batches of {BUILD_BATCH} (items validated by the API models)",
            "server": "ballast serve, default config (all plugins, builtin provider)",
            "timing": "POST .../finalize to the first GET .../finalize (20 ms polls) that "
                      "shows succeeded",
            "memory": "VmHWM of the server process after the job (fresh process per round)",
            "rounds": rounds,
        },
        "sizes": by_size,
        "targets": targets,
    }


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__, rounds=3)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    result = run(sizes, args.rounds)
    summary = {size: {k: v for k, v in data.items() if k != "runs"} for size, data in result["sizes"].items()}
    return common.finish("finalize", result, args, {"sizes": summary, "targets": result["targets"]})


if __name__ == "__main__":
    sys.exit(main())
