"""The floor for the overhead benchmark: ``GET /v1/sessions/{id}`` with no framework at all.

A plain aiohttp application that reads the same rows from the same SQLite file as
Ballast's session read (one statement: the session by tenant and id, its participants
in order, its named speakers and its finalize job) and answers the same JSON body, byte
for byte, with no middleware, no plugins, no validation beyond a missing row, and no
logging. ``--read thread`` does the SQLite read on a worker thread (as Ballast does,
to keep the event loop free); the default runs it on the event loop, the cheapest
possible way.

    python bench/bare_app.py --db var/ballast.db --port 8090 [--read loop|thread] [--tenant default]
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common

# The store's schema version 2 (framework/sessions/sqlite_schema.py): participants and
# speaker labels are rows keyed by the session's ``pk``; the job's progress is JSON.
_SESSION = (
    "SELECT s.session_id, s.state, s.title, s.mutation_count, s.last_seq,"
    " (SELECT json_group_array(name) FROM"
    "   (SELECT name FROM participants WHERE session_pk = s.pk ORDER BY position)),"
    " (SELECT json_group_object(label, name) FROM speakers WHERE session_pk = s.pk AND name IS NOT NULL),"
    " j.state, j.attempt, j.progress"
    " FROM sessions s LEFT JOIN jobs j ON j.session_pk = s.pk"
    " WHERE s.tenant = ? AND s.session_id = ?"
)

CONN = web.AppKey("conn", sqlite3.Connection)


def read_view(conn: sqlite3.Connection, tenant: str, session_id: str) -> dict[str, Any] | None:
    row = conn.execute(_SESSION, (tenant, session_id)).fetchone()
    if row is None:
        return None
    sid, state, title, mutation_count, last_seq, participants, speakers, job_state, attempt, progress = row
    job = None
    if job_state is not None:
        p = orjson.loads(progress)
        job = {"state": job_state, "attempt": attempt, "budget_ms": p.get("budget_ms"),
               "elapsed_ms": p.get("elapsed_ms", 0), "stages": p.get("stages", []),
               "error": p.get("error")}
    return {
        "session_id": sid, "state": state, "title": title,
        "participants": [{"name": n} for n in orjson.loads(participants)],
        "mutation_count": mutation_count, "last_seq": last_seq,
        "speakers": orjson.loads(speakers), "finalize": job,
    }


def build(args: argparse.Namespace) -> web.Application:
    read, tenant = args.read, args.tenant
    conn = sqlite3.connect(args.db, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA query_only = ON")
    app = web.Application()
    app[CONN] = conn

    async def get_session(request: web.Request) -> web.Response:
        sid = request.match_info["session_id"]
        if read == "thread":
            view = await asyncio.to_thread(read_view, conn, tenant, sid)
        else:
            view = read_view(conn, tenant, sid)
        if view is None:
            raise web.HTTPNotFound()
        return web.Response(body=orjson.dumps(view), content_type="application/json")

    app.router.add_get("/v1/sessions/{session_id}", get_session)
    return app


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--read", choices=("loop", "thread"), default="loop")
    parser.add_argument("--tenant", default="default", help="the tenant whose sessions are read")


if __name__ == "__main__":
    common.app_main(__doc__, build, options)
