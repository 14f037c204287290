"""The floor for the overhead benchmark: ``GET /v1/sessions/{id}`` with no framework at all.

A plain aiohttp application that reads the same rows from the same SQLite file as
Ballast's session read (the session row, then its finalize job) and answers the same
JSON body, with no middleware, no plugins, no validation beyond a missing row, and no
logging. ``--read thread`` does the SQLite read on a worker thread (as Ballast does,
to keep the event loop free); the default runs it on the event loop, the cheapest
possible way.

    python bench/bare_app.py --db var/ballast.db --port 8090 [--read loop|thread]
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
from typing import Any

import orjson
from aiohttp import web

_SESSION = (
    "SELECT session_id, state, title, participants, mutation_count, last_seq, speakers"
    " FROM sessions WHERE session_id = ?"
)
_JOB = "SELECT body FROM jobs WHERE session_id = ?"
_JOB_KEYS = ("state", "attempt", "budget_ms", "elapsed_ms", "stages", "error")

CONN = web.AppKey("conn", sqlite3.Connection)


def read_view(conn: sqlite3.Connection, session_id: str) -> dict[str, Any] | None:
    row = conn.execute(_SESSION, (session_id,)).fetchone()
    if row is None:
        return None
    sid, state, title, participants, mutation_count, last_seq, speakers = row
    job_row = conn.execute(_JOB, (session_id,)).fetchone()
    job = None
    if job_row is not None:
        body = orjson.loads(job_row[0])
        job = {k: body[k] for k in _JOB_KEYS}
    return {
        "session_id": sid, "state": state, "title": title,
        "participants": [{"name": n} for n in orjson.loads(participants)],
        "mutation_count": mutation_count, "last_seq": last_seq,
        "speakers": orjson.loads(speakers), "finalize": job,
    }


def build(db: str, read: str) -> web.Application:
    conn = sqlite3.connect(db, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA query_only = ON")
    app = web.Application()
    app[CONN] = conn

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(body=b'{"status":"ok"}', content_type="application/json")

    async def get_session(request: web.Request) -> web.Response:
        sid = request.match_info["session_id"]
        if read == "thread":
            view = await asyncio.to_thread(read_view, conn, sid)
        else:
            view = read_view(conn, sid)
        if view is None:
            raise web.HTTPNotFound()
        return web.Response(body=orjson.dumps(view), content_type="application/json")

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/v1/sessions/{session_id}", get_session)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--read", choices=("loop", "thread"), default="loop")
    args = parser.parse_args()
    web.run_app(build(args.db, args.read), host="127.0.0.1", port=args.port,
                access_log=None, print=None)


if __name__ == "__main__":
    main()
