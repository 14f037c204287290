"""The ``ballast logs`` command line: argument parsing, output streams and exit codes.

Exit codes: 0 done; 1 the input could not be read (or ended early), an output file could
not be written, or a trace matched no line; 2 a usage error.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from datetime import datetime
from typing import TextIO

import orjson

from ballast.logs.page import render_html
from ballast.logs.query import EngineMissing, QueryError, format_json, format_table, run_query, write_csv
from ballast.logs.reading import LogInputError
from ballast.logs.summarize import ENGINES, summarize_file
from ballast.logs.summarize import EngineMissing as SummaryEngineMissing
from ballast.logs.tail import follow
from ballast.logs.text import format_summary_text
from ballast.logs.timeline import parse_interval
from ballast.logs.times import parse_time_arg
from ballast.logs.trace import format_trace_text, trace_document, trace_file


def _time_arg(text: str) -> datetime:
    return parse_time_arg(text)


def _interval_arg(text: str) -> int:
    try:
        return parse_interval(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _add_subcommands(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="logs_command", metavar="COMMAND", required=True)

    summarize = commands.add_parser(
        "summarize",
        help="counts, latency percentiles and failures of a JSON log",
        description="Summarise a Ballast JSON log (plain, gzip or stdin) in constant memory.",
    )
    summarize.add_argument("file", nargs="?", default="-", metavar="FILE", help="log file, - for stdin")
    summarize.add_argument("--json", action="store_true", help="print one JSON document")
    summarize.add_argument(
        "--since", type=_time_arg, metavar="TIME", help="ISO 8601 time, or a duration before now (30m, 1h)"
    )
    summarize.add_argument("--until", type=_time_arg, metavar="TIME", help="same forms as --since; exclusive")
    summarize.add_argument("--html", metavar="OUT.html", help="also write a self-contained HTML report")
    summarize.add_argument("--top", type=int, default=10, metavar="N", help="rows per table (default 10)")
    summarize.add_argument(
        "--interval", type=_interval_arg, metavar="SPAN",
        help="bucket width of the time series (30s, 5m, 1h); default: chosen from the log's span",
    )
    summarize.add_argument(
        "--engine", choices=ENGINES, default="auto",
        help="auto (default): for a plain file the native scanner when built, else DuckDB (1 MiB or "
        "more, when installed), else stream; native; duckdb; stream (the built-in reader). "
        "The output is the same",
    )
    summarize.add_argument(
        "--workers", type=int, default=None, metavar="N",
        help="stream engine: processes for a large plain file (default: the usable cores; 1: one pass)",
    )

    trace = commands.add_parser(
        "trace",
        help="every line of one request, session or trace, in time order",
        description="Print every line of one request, or of one session and the requests that touched it.",
    )
    which = trace.add_mutually_exclusive_group(required=True)
    which.add_argument("--request-id", metavar="ID", help="the request id (X-Request-ID)")
    which.add_argument("--session", metavar="ID", help="the session id")
    which.add_argument("--trace-id", metavar="ID", help="the trace id (W3C, from the tracing plugin)")
    trace.add_argument("file", nargs="?", default="-", metavar="FILE", help="log file, - for stdin")
    trace.add_argument("--json", action="store_true", help="print one JSON document")

    query = commands.add_parser(
        "query",
        help="run SQL over a log (table logs; needs DuckDB: pip install 'ballast[logs]')",
        description="Run SQL over the log as table logs: the catalogue's fields as columns, "
        "the whole line as JSON in column line.",
    )
    query.add_argument("sql", metavar="SQL", help="e.g. \"SELECT event, count(*) FROM logs GROUP BY 1\"")
    query.add_argument("file", nargs="?", default="-", metavar="FILE", help="log file, - for stdin")
    form = query.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="print a JSON array of row objects")
    form.add_argument("--csv", action="store_true", help="print CSV with a header row")

    tail = commands.add_parser(
        "tail",
        help="follow a growing log, one compact line per second",
        description="Follow a log as it grows and print rates, errors and retries every second.",
    )
    tail.add_argument("file", nargs="?", default="-", metavar="FILE", help="log file, - for stdin")
    tail.add_argument("--from-start", action="store_true", help="count what the file already holds first")
    tail.add_argument("--every", type=float, default=1.0, metavar="S", help="seconds per line (default 1)")


def add_logs_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``logs`` (``summarize``, ``trace``, ``query``, ``tail``) to a CLI's sub-parsers.

    The parsed namespace carries ``func=run_logs``; call ``run_logs(args)`` for the exit code.
    """
    parser = subparsers.add_parser(
        "logs",
        help="summarise, trace, query or follow JSON log files",
        description="Analyse Ballast's JSON log lines.",
    )
    _add_subcommands(parser)
    parser.set_defaults(func=run_logs)


def _write(out: TextIO, text: str) -> None:
    # Log text may hold anything; never fail on an encoding the terminal lacks.
    encoding = getattr(out, "encoding", None) or "utf-8"
    out.write(text.encode(encoding, "backslashreplace").decode(encoding))


def _run_summarize(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.since is not None and args.until is not None and args.since >= args.until:
        err.write("ballast logs summarize: --since must be before --until\n")
        return 2
    if args.workers is not None and args.workers < 1:
        err.write("ballast logs summarize: --workers must be at least 1\n")
        return 2
    try:
        report = summarize_file(
            args.file, since=args.since, until=args.until, interval_s=args.interval, workers=args.workers,
            engine=args.engine,
        )
    except SummaryEngineMissing as exc:
        err.write(f"ballast logs summarize: {exc}\n")
        return 1
    if args.html:
        try:
            with open(args.html, "w", encoding="utf-8") as fh:
                fh.write(render_html(report))
        except OSError as exc:
            err.write(f"ballast logs summarize: cannot write {args.html}: {exc.strerror or exc}\n")
            return 1
    if args.json:
        _write(out, orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        _write(out, format_summary_text(report, top=max(1, args.top)))
    if report["input"]["error"]:
        err.write(f"ballast logs summarize: {report['input']['error']}\n")
        return 1
    return 0


def _run_trace(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    result = trace_file(
        args.file, request_id=args.request_id, session_id=args.session, trace_id=args.trace_id
    )
    if args.json:
        _write(out, orjson.dumps(trace_document(result), option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        _write(out, format_trace_text(result))
    if result.error:
        err.write(f"ballast logs trace: {result.error}\n")
        return 1
    return 0 if result.entries else 1


def _run_query(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        result = run_query(args.sql, args.file)
    except EngineMissing as exc:
        err.write(f"ballast logs query: {exc}\n")
        return 1
    except QueryError as exc:
        err.write(f"ballast logs query: {exc}\n")
        return 2
    if args.json:
        _write(out, format_json(result))
    elif args.csv:
        write_csv(out, result.names, result.rows)
    else:
        _write(out, format_table(result.names, result.rows))
    return 0


def run_logs(args: argparse.Namespace, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run a parsed ``logs`` command; the exit code (0 ok, 1 nothing found or I/O error, 2 usage)."""
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    try:
        if args.logs_command == "summarize":
            return _run_summarize(args, out, err)
        if args.logs_command == "trace":
            return _run_trace(args, out, err)
        if args.logs_command == "query":
            return _run_query(args, out, err)
        if args.logs_command == "tail":
            if args.every <= 0:
                err.write("ballast logs tail: --every must be positive\n")
                return 2
            return follow(args.file, out, from_start=args.from_start, every_s=args.every)
    except LogInputError as exc:
        err.write(f"ballast logs {args.logs_command}: {exc}\n")
        return 1
    except BrokenPipeError:
        # The reader (head, less) went away: that is not an error.
        _silence_stdout()
        return 0
    err.write(f"ballast logs: unknown command {args.logs_command!r}\n")
    return 2


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        pass


def main(argv: list[str] | None = None) -> int:
    """``python -m ballast.logs summarize|trace|query|tail ...``: the same as ``ballast logs``."""
    parser = argparse.ArgumentParser(prog="ballast logs", description="Analyse Ballast's JSON log lines.")
    _add_subcommands(parser)
    return run_logs(parser.parse_args(argv))

