"""``ballast logs query SQL [FILE|-]``: ad hoc SQL over a log, one line per row of table ``logs``.

The summary answers the questions asked every time; the next question is always a new
one ("which sessions timed out after 14:00, on which stage?"). Rather than grow a flag
per question, the log is offered to DuckDB as a table, so any SQL works, and at DuckDB's
speed. DuckDB is an optional dependency (``pip install 'ballast[logs]'``); without it
this command says how to install it and exits 1, and every other ``ballast logs``
command works as before.

Table ``logs`` has one row per line that is a JSON object, with the fields of the event
catalogue (docs/logging.md) as typed columns (``timestamp`` is a ``TIMESTAMPTZ``; a
field of another type than the catalogue's, or absent, is ``NULL``) and the whole line
as ``line`` (DuckDB ``JSON``: ``line->>'field'`` reads any other field). Lines that are
not JSON objects are not in the table. The session time zone is UTC.

Standard input is first copied to a temporary file (DuckDB reads files); a gzip input
is recognised by its magic bytes, like the other commands.
"""

from __future__ import annotations

import csv
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, BinaryIO, TextIO

import orjson

from ballast.logs.reading import GZIP_MAGIC, LogInputError
from ballast.logs.times import format_time

#: Catalogue fields offered as columns, with their DuckDB types.
COLUMNS: dict[str, str] = {
    "timestamp": "TIMESTAMPTZ",
    "level": "VARCHAR",
    "event": "VARCHAR",
    "request_id": "VARCHAR",
    "session_id": "VARCHAR",
    "trace_id": "VARCHAR",
    "span_id": "VARCHAR",
    "method": "VARCHAR",
    "route": "VARCHAR",
    "path": "VARCHAR",
    "status": "BIGINT",
    "duration_ms": "DOUBLE",
    "name": "VARCHAR",
    "upstream": "VARCHAR",
    "attempt": "BIGINT",
    "attempts": "BIGINT",
    "kind": "VARCHAR",
    "error_type": "VARCHAR",
    "error": "VARCHAR",
    "delay_ms": "DOUBLE",
    "remaining_ms": "DOUBLE",
    "stage": "VARCHAR",
    "state": "VARCHAR",
    "budget_ms": "DOUBLE",
    "elapsed_ms": "DOUBLE",
    "operation": "VARCHAR",
    "reason": "VARCHAR",
    "key_id": "VARCHAR",
    "count": "BIGINT",
    "mutation_id": "VARCHAR",
    "mutation_type": "VARCHAR",
    "in_flight": "BIGINT",
}
MEMORY_LIMIT = "512MB"


class QueryError(Exception):
    """The SQL was rejected by DuckDB; the message is DuckDB's, about the user's SQL."""


class EngineMissing(Exception):
    """DuckDB is not installed."""


def _duckdb() -> Any:
    try:
        import duckdb
    except ImportError as exc:
        raise EngineMissing(
            "ballast logs query needs DuckDB: pip install 'ballast[logs]' (or pip install duckdb)"
        ) from exc
    return duckdb


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _view_sql(path: str, gzip: bool) -> str:
    # One JSON parse per line: json_transform fills every column at once; a value of
    # another type than the column's becomes NULL instead of failing the query.
    shape = {name: ("VARCHAR" if kind == "TIMESTAMPTZ" else kind) for name, kind in COLUMNS.items()}
    columns = ",\n  ".join(
        f"TRY_CAST(f.{_quote(name)} AS TIMESTAMPTZ) AS {_quote(name)}"
        if kind == "TIMESTAMPTZ"
        else f"f.{_quote(name)} AS {_quote(name)}"
        for name, kind in COLUMNS.items()
    )
    source = (
        f"read_ndjson_objects({_sql_string(path)}, ignore_errors = true, "
        f"compression = {_sql_string('gzip' if gzip else 'none')})"
    )
    return (
        f"CREATE VIEW logs AS SELECT\n  {columns},\n  o.line AS line\n"
        f"FROM (SELECT json AS line, json_transform(json, {_sql_string(orjson.dumps(shape).decode())}) AS f"
        f" FROM {source} WHERE json_type(json) = 'OBJECT') AS o(line, f)"
    )


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@contextmanager
def _as_file(path: str | None, stdin: BinaryIO | None) -> Iterator[tuple[str, bool]]:
    """The input as a file DuckDB can read, and whether it is gzip."""
    if path is not None and path != "-":
        try:
            with open(path, "rb") as fh:
                head = fh.read(2)
        except OSError as exc:
            raise LogInputError(f"cannot read {path}: {exc.strerror or exc}") from exc
        yield path, head == GZIP_MAGIC
        return
    source = stdin if stdin is not None else sys.stdin.buffer
    if stdin is None and sys.stdin.isatty():
        raise LogInputError("no log file given and standard input is a terminal: pass FILE or pipe a log in")
    fd, spool = tempfile.mkstemp(prefix="ballast-logs-", suffix=".log")
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
        with open(spool, "rb") as fh:
            head = fh.read(2)
        yield spool, head == GZIP_MAGIC
    finally:
        os.unlink(spool)


@dataclass(slots=True)
class QueryResult:
    names: list[str]
    rows: list[tuple[Any, ...]]
    json_columns: frozenset[str]  # columns of DuckDB type JSON: printed as JSON with --json


def run_query(sql: str, path: str | None, *, stdin: BinaryIO | None = None) -> QueryResult:
    """Run ``sql`` against table ``logs`` built from the log."""
    duckdb = _duckdb()
    with (
        _as_file(path, stdin) as (filename, gzip),
        tempfile.TemporaryDirectory(prefix="ballast-sql-") as spill,
    ):
        con = duckdb.connect(":memory:")
        try:
            con.execute(f"SET memory_limit = {_sql_string(MEMORY_LIMIT)}")
            con.execute(f"SET temp_directory = {_sql_string(spill)}")
            con.execute("SET TimeZone = 'UTC'")
            con.execute("SET enable_progress_bar = false")
            con.execute(_view_sql(filename, gzip))
            try:
                cursor = con.execute(sql)
                description = cursor.description or []
                names = [d[0] for d in description]
                json_columns = frozenset(str(d[0]) for d in description if str(d[1]) == "JSON")
                rows = cursor.fetchall() if cursor.description else []
            except duckdb.IOException as exc:
                raise LogInputError(f"cannot read {path or '-'}: {exc}") from exc
            except duckdb.Error as exc:
                raise QueryError(str(exc)) from exc
        finally:
            con.close()
    return QueryResult(names, [tuple(row) for row in rows], json_columns)


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return format_time(value) or ""
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) < 1e15 else repr(value)
    return str(value)


def format_table(names: Sequence[str], rows: Sequence[tuple[Any, ...]], *, max_width: int = 60) -> str:
    """Aligned columns (numbers right-aligned), a header, and a row count."""
    cells = [[_cell(v)[:max_width] for v in row] for row in rows]
    widths = [max([len(n), *(len(r[i]) for r in cells)]) for i, n in enumerate(names)]
    numeric = [
        all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) for i in range(len(names))
    ]

    def fmt(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)
        ).rstrip()
    out = [fmt(names), "  ".join("-" * w for w in widths)]
    out += [fmt(r) for r in cells]
    out.append(f"({len(rows):,} row{'' if len(rows) == 1 else 's'})")
    return "\n".join(out) + "\n"


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return format_time(value)
    return str(value)


def format_json(result: QueryResult) -> str:
    """An array of objects, one per row; JSON columns (``line``) are embedded as JSON."""
    docs = [dict(zip(result.names, row, strict=True)) for row in result.rows]
    for doc in docs:
        for key, value in doc.items():
            if isinstance(value, datetime):
                doc[key] = format_time(value)
            elif isinstance(value, str) and key in result.json_columns:
                doc[key] = orjson.Fragment(value)
    return orjson.dumps(docs, default=_json_default, option=orjson.OPT_INDENT_2).decode() + "\n"


def write_csv(out: TextIO, names: Sequence[str], rows: Sequence[tuple[Any, ...]]) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(names)
    for row in rows:
        writer.writerow([_cell(v) for v in row])
