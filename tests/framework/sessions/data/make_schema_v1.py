# How schema_v1.db was written: run at commit 029a23f (schema version 1) from the
# repository root. Kept for the record; the current store cannot write version 1.
import asyncio
import sqlite3

from ballast.sessions.sqlite_store import SQLiteStore

PATH = "tests/framework/sessions/data/schema_v1.db"


async def main():
    s = SQLiteStore(PATH)
    await s.open()
    await s.create_session("demo", "Weekly sync", ["Alice", "Bob"])
    await s.append(
        "demo",
        [
            {
                "id": "m1",
                "type": "utterance",
                "speaker": "spk_0",
                "start_ms": 0,
                "end_ms": 1000,
                "text": "Hi, I'm Alice.",
            },
            {
                "id": "m2",
                "type": "utterance",
                "speaker": "spk_1",
                "start_ms": 1000,
                "end_ms": 2000,
                "text": "Bob here.",
            },
            {"type": "participant_joined", "name": "Carol"},
            {"type": "speaker_renamed", "speaker": "spk_0", "name": "Alice"},
            {"type": "note", "text": "budget"},
        ],
    )
    await s.create_session("done", None, [])
    await s.append(
        "done",
        [{"id": "x", "type": "utterance", "speaker": "spk_0", "start_ms": 0, "end_ms": 5, "text": "hello"}],
    )
    await s.set_state("done", "finalized")
    await s.save_job(
        "done",
        {
            "state": "succeeded",
            "attempt": 1,
            "budget_ms": 120000,
            "elapsed_ms": 12,
            "stages": [
                {"name": n, "state": "succeeded", "duration_ms": 1}
                for n in ("freeze", "drain", "replay", "reconcile", "stats", "events", "report", "persist")
            ],
            "error": None,
            "started_at": "2026-01-01T00:00:00+00:00",
        },
    )
    await s.save_report(
        "done",
        {
            "session_id": "done",
            "title": None,
            "summary": "s",
            "highlights": [],
            "action_items": [],
            "stats": {},
            "speakers": [],
            "timeline": [],
            "generated_at": "2026-01-01T00:00:00+00:00",
        },
    )
    await s.create_session("stuck", None, ["Dan"])
    await s.append(
        "stuck", [{"type": "utterance", "speaker": "spk_0", "start_ms": 0, "end_ms": 5, "text": "I'm Dan"}]
    )
    await s.set_state("stuck", "finalizing")
    await s.save_job(
        "stuck",
        {
            "state": "running",
            "attempt": 2,
            "budget_ms": 120000,
            "elapsed_ms": 3,
            "stages": [
                {
                    "name": n,
                    "state": ("succeeded" if i < 2 else "running" if i == 2 else "pending"),
                    "duration_ms": None,
                }
                for i, n in enumerate(
                    ("freeze", "drain", "replay", "reconcile", "stats", "events", "report", "persist")
                )
            ],
            "error": None,
            "started_at": "2026-01-01T00:00:00+00:00",
        },
    )
    await s.close()


asyncio.run(main())
c = sqlite3.connect(PATH)
c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
c.execute("PRAGMA journal_mode=DELETE")
c.execute("VACUUM")
c.close()
