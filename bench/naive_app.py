"""The ingest baseline: what a user would write instead of Ballast.

Plain aiohttp, ``json.loads`` of the body, and per request one transaction on a worker
thread (``asyncio.to_thread``): ``BEGIN IMMEDIATE``, one ``INSERT`` per mutation,
``COMMIT``, on SQLite in WAL mode with ``synchronous=FULL`` (so a 200 means fsynced, as
with Ballast's ``durability = "full"``). It validates nothing beyond the JSON shape,
has no idempotent ids (a duplicate id is a 409 of the whole batch), no per-session
ordering queue, no log line. One connection per worker thread (sqlite3 connections are
not shared across threads here); SQLite's write lock serialises the writers.

    python bench/naive_app.py --db /tmp/naive.db --port 8091
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import threading
from pathlib import Path
from typing import Any

from aiohttp import web

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (session_id TEXT PRIMARY KEY, title TEXT, last_seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS mutations (
    session_id TEXT NOT NULL, seq INTEGER NOT NULL, id TEXT NOT NULL, type TEXT NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (session_id, seq), UNIQUE (session_id, id));
"""


class Db:
    def __init__(self, path: str) -> None:
        self.path = path
        self.local = threading.local()
        conn = self.conn()
        conn.executescript(_SCHEMA)

    def conn(self) -> sqlite3.Connection:
        c: sqlite3.Connection | None = getattr(self.local, "conn", None)
        if c is None:
            c = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("PRAGMA synchronous=FULL")
            self.local.conn = c
        return c

    def create(self, sid: str, title: str | None) -> bool:
        try:
            self.conn().execute("INSERT INTO sessions VALUES (?, ?, 0)", (sid, title))
            return True
        except sqlite3.IntegrityError:
            return False

    def append(self, sid: str, mutations: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        c = self.conn()
        c.execute("BEGIN IMMEDIATE")
        try:
            row = c.execute("SELECT last_seq FROM sessions WHERE session_id = ?", (sid,)).fetchone()
            if row is None:
                c.execute("ROLLBACK")
                return None
            seq = row[0]
            accepted = []
            for m in mutations:
                seq += 1
                c.execute("INSERT INTO mutations VALUES (?, ?, ?, ?, ?)",
                          (sid, seq, str(m.get("id") or f"auto-{seq}"), str(m.get("type")), json.dumps(m)))
                accepted.append({"id": m.get("id"), "seq": seq, "duplicate": False})
            c.execute("UPDATE sessions SET last_seq = ? WHERE session_id = ?", (seq, sid))
            c.execute("COMMIT")
            return accepted
        except BaseException:
            c.execute("ROLLBACK")
            raise


DB = web.AppKey("db", Db)


def build(args: argparse.Namespace) -> web.Application:
    app = web.Application()
    app[DB] = Db(args.db)

    async def create_session(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        if not await asyncio.to_thread(app[DB].create, body["session_id"], body.get("title")):
            return web.json_response({"error": "exists"}, status=409)
        return web.json_response({"session_id": body["session_id"]}, status=201)

    async def append(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        mutations = body.get("mutations") if isinstance(body, dict) else None
        if not isinstance(mutations, list) or not mutations:
            return web.json_response({"error": "mutations must be a non-empty list"}, status=400)
        try:
            accepted = await asyncio.to_thread(app[DB].append, request.match_info["session_id"], mutations)
        except sqlite3.IntegrityError:
            return web.json_response({"error": "duplicate id"}, status=409)
        if accepted is None:
            return web.json_response({"error": "no such session"}, status=404)
        return web.json_response({"accepted": accepted, "last_seq": accepted[-1]["seq"]})

    app.router.add_post("/v1/sessions", create_session)
    app.router.add_post("/v1/sessions/{session_id}/mutations", append)
    return app


if __name__ == "__main__":
    common.app_main(__doc__, build)
