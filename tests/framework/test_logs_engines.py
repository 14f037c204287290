"""``ballast logs summarize``: the native and DuckDB engines give the streaming engine's document exactly.

Every comparison runs the engines on the same file: the streaming engine in one pass
and split across processes, and the native engine (on one thread and on three) and the
DuckDB engine called directly (so a test fails if one declined a file it should read)
and through ``summarize_file(engine=...)``. The
malformed-input file holds the inputs on which the two JSON readers differ unless the
summary's reading rules (:mod:`ballast.logs.jsonline`) are applied: repeated keys,
``NaN``/``Infinity``/``1e400``, trailing commas, invalid UTF-8, ``null``, arrays and
scalars, mistyped fields, escapes, whitespace of every kind.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import PEAK_RSS_KIB, run_logs_cli

import ballast.logs.parallel as parallel
from ballast.logs import format_summary_text, groups, native, render_html, summarize_file
from ballast.logs.jsonline import INVALID, read_lenient
from ballast.logs.summarize import EngineMissing, choose_engine

duckdb = pytest.importorskip("duckdb", reason="the DuckDB engine needs DuckDB: pip install 'ballast[logs]'")
from ballast.logs import duck  # noqa: E402

if not native.available():
    # Built wherever a C compiler is found; only a machine without one may skip these.
    assert not (shutil.which("cc") or shutil.which("gcc")), "a C compiler is here: the scanner was not built"
    pytest.skip("the native scanner was not built (no C compiler at install)", allow_module_level=True)

T0 = datetime(2026, 11, 28, 14, 0, 0, tzinfo=UTC)


def stamp(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def rec(event: Any, at: float | None = 0.0, level: Any = "info", **fields: Any) -> bytes:
    record: dict[str, Any] = {"level": level, "event": event, **fields}
    if at is not None:
        record["timestamp"] = stamp(at)
    return orjson.dumps(record)


TS = stamp(5).encode()

#: Lines the two JSON readers disagree on unless the summary's rules are applied.
PATHOLOGICAL: list[bytes] = [
    b"", b"   ", b"\t \r", b"\x0b", b"\x0c", b"\r",
    b"null", b"  null  ", b"[1, 2, 3]", b'"a string"', b"42", b"true", b"{}", b"[]",
    b'{"timestamp": "2026-11-28T14:00:00Z", "event": ',  # truncated
    b'{"event": "x"} trailing', b'{"a": 1}{"b": 2}', b"{'event': 'single'}", b'{"event": tru}',
    b'\xff\xfe{"event": "bad utf-8"}', b'{"event": "bad \xc3\x28 utf-8"}', b'{"event": "sur\\ud800"}',
    b'\xef\xbb\xbf{"event": "bom"}', b'{"event": "ctl\tchar"}', b'{"event":"x"}\x00',
    # Repeated keys: the first value counts.
    b'{"event":"http.request","event":"other","timestamp":"' + TS + b'","status":500,"route":"/dup"}',
    b'{"event":"http.request","timestamp":"' + TS + b'","status":200,"status":503,"route":"/dup",'
    b'"duration_ms":1.5,"duration_ms":900.0}',
    b'{"event":"auth.denied","reason":"first","reason":"second","timestamp":"' + TS + b'"}',
    b'{"level":"info","level":"error","event":"server.started","timestamp":"' + TS + b'"}',
    b'{"event":"http.request","msg":"a \\":\\" b","route":"/r","route":"/s","timestamp":"' + TS + b'"}',
    # NaN, infinities and out-of-range numbers, in fields read and not read.
    b'{"event":"http.request","timestamp":"' + TS + b'","route":"/nan","duration_ms":NaN}',
    b'{"event":"http.request","timestamp":"' + TS + b'","route":"/nan","duration_ms":-Infinity}',
    b'{"event":"http.request","timestamp":"' + TS + b'","route":"/nan","duration_ms":1e400,"status":nan}',
    b'{"event":"http.request","timestamp":"' + TS + b'","route":"/nan","duration_ms":inf,"x":[NaN,1,]}',
    b'{"event":"server.started","timestamp":"' + TS + b'","port":Infinity}',
    b'{"event":"server.started","timestamp":"' + TS + b'","big":1' + b"0" * 400 + b"}",
    b'{"event":"load.shed","timestamp":"' + TS + b'","count":1e400,"route":"/shed"}',
    b'{"event":"load.shed","timestamp":"' + TS + b'","count":NaN,"route":"/shed"}',
    b'{"event":"x","v":+inf}', b'{"event":"x","v":InfinityX}', b'{"event":"x","v":[1,,]}',
    # Trailing commas.
    b'{"event":"server.started","timestamp":"' + TS + b'",}',
    b'{"event":"http.request","timestamp":"' + TS + b'","route":"/comma","status":201 , }',
    b'{"event":"x","v":[,]}', b"{,}",
    # Whitespace around the object.
    b'  {"event":"server.started","timestamp":"' + TS + b'"}  ',
    b'{"event":"server.started","timestamp":"' + TS + b'"}\r',
    b'{"event":"server.started","timestamp":"' + TS + b'"}\x0b',
    # Mistyped and odd fields.
    rec(5), rec(None), rec(["http.request"]), rec({"a": 1}), rec("http.request", level=3),
    rec("http.request", level=None), rec("http.request", route={"a": 1}, method=["GET"], status="500"),
    rec("http.request", route="/t", status=503.0, duration_ms="12"),
    rec("http.request", route="/t", status=True, duration_ms=True),
    rec("http.request", route="/t", status=-0, duration_ms=-0.0),
    rec("http.request", route="/t", status=9223372036854775808, duration_ms=1e20),
    b'{"event":"http.request","timestamp":"' + TS + b'","route":"/t","status":18446744073709551616}',
    b'{"event":"upstream.retry","timestamp":"' + TS + b'","status":-9223372036854775809}',
    rec("http.request", route="/t", status=-1, duration_ms=-1),
    rec("http.request", route="/t", status=599, duration_ms=0),
    rec("http.request", route="/t", status=600, duration_ms=12),
    rec("http.request", route="/t", status=100, duration_ms=0.0005),
    rec("http.request", route="/ünï/c\u00f6de", method="PATCH", status=204, duration_ms=3),
    b'{"event":"http.\\u0072equest","timestamp":"' + TS + b'","route":"/esc\\/aped","status":404}',
    b'{"event":"nul\\u0000z","timestamp":"' + TS + b'"}',
    rec("http.request", None, route="/no-time", status=200, duration_ms=1.0),
    rec("http.request", None, route="/t", status=200, duration_ms=1.0, timestamp=12345),
    rec("http.request", None, route="/t", status=200, duration_ms=1.0, timestamp=None),
    rec("http.request", None, route="/t", status=200, duration_ms=2.0, timestamp="2026-11-28T14:00:09Z"),
    rec("upstream.retry", level="warning", name="n", status=True, error_type=""),
    rec("upstream.retry", level="warning", name=7, status="503", error_type="E"),
    rec("upstream.retry", level="warning", name="n", status=9223372036854775807),
    rec("upstream.failed", level="error", kind=None, name=["x"], error_type=5),
    rec("session.mutation_failed", level="error", session_id=12, error_type="E"),
    rec("finalize.stage", stage="report", duration_ms=True), rec("finalize.stage", stage=None, duration_ms=4),
    rec("finalize.completed", state="weird"), rec("finalize.completed", state=None),
    rec("load.shed", level="warning", count=True, route=None), rec("load.shed", count=0, route="/z"),
    rec("load.shed", count=(1 << 53), route="/z"), rec("load.shed", count=-3, route="/z"),
    rec("circuit.opened", level="warning", upstream=None), rec("auth.denied", reason=None),
]


def messy(n: int, seed: int) -> list[bytes]:
    """Every event the summary treats specially, mistyped fields, malformed lines, over hours."""
    rnd = random.Random(seed)
    events = [
        "upstream.retry", "upstream.failed", "error.unhandled", "session.mutation_failed",
        "finalize.stage", "finalize.timed_out", "finalize.completed", "finalize.failed",
        "bulkhead.rejected", "circuit.opened", "circuit.half_open", "circuit.closed",
        "upstream.retry_denied", "fallback.used", "load.shed", "auth.denied", "server.started",
    ]
    out: list[bytes] = []
    for i in range(n):
        roll = rnd.random()
        at = rnd.uniform(0, 5 * 3600)
        if roll < 0.05:
            out.append(rnd.choice(PATHOLOGICAL))
        elif roll < 0.7:
            out.append(rec(
                "http.request", at, rnd.choice(["info", "info", "warning"]),
                route=rnd.choice(["/a", "/b/{id}", "/c", None]), method=rnd.choice(["GET", "POST", None]),
                status=rnd.choice([200, 201, 404, 500, 503, "200", None]),
                duration_ms=rnd.choice([round(rnd.lognormvariate(1, 1.5), 3), rnd.randint(0, 50), None]),
                request_id=f"r{i}",
            ))
        else:
            out.append(rec(
                rnd.choice(events), at, rnd.choice(["info", "warning", "error"]),
                name=rnd.choice(["inference.resolve", "inference.report"]),
                status=rnd.choice([503, 429, None]), error_type=rnd.choice(["E1", "E2", None, ""]),
                kind=rnd.choice(["status", "budget", "cooldown"]), stage=rnd.choice(["report", "drain"]),
                state=rnd.choice(["succeeded", "failed", "timed_out"]), session_id=f"s{i % 50}",
                duration_ms=rnd.uniform(0, 100), count=rnd.choice([1, 5, 40, "x"]), reason="unknown",
                upstream="u1", operation="resolve", route="/a",
            ))
    return out


def write(path: Path, lines: list[bytes], *, final_newline: bool = True) -> Path:
    path.write_bytes(b"\n".join(lines) + (b"\n" if final_newline else b""))
    return path


def assert_engines_agree(path: Path, **options: Any) -> dict[str, Any]:
    """The streaming engine (one pass, split) and the DuckDB engine: one document."""
    stream = summarize_file(str(path), workers=1, engine="stream", **options)
    expected = orjson.dumps(stream)
    direct = duck.summarize_duckdb(str(path), **options)
    assert direct is not None, "the DuckDB engine declined the file"
    assert orjson.dumps(direct) == expected
    assert orjson.dumps(summarize_file(str(path), engine="duckdb", **options)) == expected
    for threads in (1, 3):
        scanned = native.summarize_native(str(path), threads=threads, **options)
        assert scanned is not None, "the native engine declined the file"
        assert orjson.dumps(scanned) == expected, f"native, {threads} threads"
    assert orjson.dumps(summarize_file(str(path), engine="native", **options)) == expected
    assert orjson.dumps(summarize_file(str(path), workers=3, engine="stream", **options)) == expected
    for report in (direct, scanned):
        assert format_summary_text(report) == format_summary_text(stream)
        assert render_html(report) == render_html(stream)
    return dict(stream)


@pytest.fixture(autouse=True)
def split_small_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "MIN_PARALLEL_BYTES", 0)


def test_engines_agree_on_the_pathological_lines(tmp_path: Path) -> None:
    log = write(tmp_path / "bad.log", PATHOLOGICAL)
    report = assert_engines_agree(log)
    skipped = report["lines"]["skipped"]
    assert skipped["not_json"] >= 10 and skipped["no_event"] >= 6
    assert report["lines"]["by_event"]["http.request"] >= 10
    # The first of two repeated keys counts, in both engines.
    assert report["protections"]["auth_denied"] == {"first": 1, "(none)": 1}
    assert report["requests"]["by_route"]["/dup"]["by_status_class"]["5xx"] == 1
    assert report["requests"]["by_route"]["/dup"]["max_ms"] == 1.5
    assert report["requests"]["by_route"]["/r"]["count"] == 1
    assert report["requests"]["by_route"]["/nan"]["count"] == 4
    assert report["requests"]["by_route"]["/nan"]["max_ms"] is None  # NaN, infinities: unusable


def test_engines_agree_on_messy_logs_filtered_and_bucketed(tmp_path: Path) -> None:
    for seed in (1, 2, 3):
        log = write(tmp_path / f"messy{seed}.log", messy(4000, seed), final_newline=seed != 2)
        report = assert_engines_agree(log)
        assert report["requests"]["total"] > 2000 and report["series"]["times"]
        assert_engines_agree(log, interval_s=60)
        assert_engines_agree(log, since=T0 + timedelta(hours=1), until=T0 + timedelta(hours=3))
        assert_engines_agree(log, since=T0 + timedelta(seconds=3601.5))


def test_a_byte_order_mark_at_the_start_is_not_part_of_the_first_line(tmp_path: Path) -> None:
    lines = [rec("server.started", 1), rec("http.request", 2, route="/a", status=200), b"\xef\xbb\xbf{}"]
    log = tmp_path / "bom.log"
    log.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")
    report = assert_engines_agree(log)
    assert report["lines"]["counted"] == 2 and report["lines"]["skipped"]["not_json"] == 1


def test_engines_agree_on_empty_and_blank_files(tmp_path: Path) -> None:
    assert_engines_agree(write(tmp_path / "empty.log", [], final_newline=False))
    assert_engines_agree(write(tmp_path / "blank.log", [b"", b"  ", b"\t"]))
    assert_engines_agree(write(tmp_path / "null.log", [b"null"]))


def test_engines_agree_on_binary_garbage(tmp_path: Path) -> None:
    noise = random.Random(99).randbytes(256 * 1024).replace(b"\x1f", b"\x00")
    log = tmp_path / "garbage.log"
    log.write_bytes(noise + b"\n" + (b'{"event": "http.request", "status": 500}\n' * 50) + noise)
    assert_engines_agree(log)


def test_the_duckdb_engine_knows_every_handled_event() -> None:
    """A handler added to the streaming engine must be added to ``groups.RARE`` too."""
    from ballast.logs import LogSummary

    handled = set(LogSummary()._handlers)
    assert set(groups.RARE) == handled
    assert handled >= groups.TIMED
    assert {field for fields in groups.RARE.values() for field in fields} <= set(groups.FIELDS)


def test_lenient_reading_rules() -> None:
    assert read_lenient(b'{"a": NaN, "b": -inf, "c": 1e400, "d": [1, 2,], }') == {
        "a": 1e300, "b": -1e300, "c": 1e300, "d": [1, 2]}
    assert read_lenient(b'{"s": "NaN, inf,]", "n": nan}') == {"s": "NaN, inf,]", "n": 1e300}  # strings kept
    for text in (b"[,]", b"{,}", b"[1,,]", b'{"v":+inf}', b'{"v":InfinityX}', b"\xff", b'{"a":1} x'):
        assert read_lenient(text) is INVALID, text
    assert read_lenient(b'{"k": 1, "k": 2, "n": NaN}') == {"k": 1, "n": 1e300}


# --------------------------------------------------------------------------- when DuckDB declines


def test_duckdb_declines_what_it_cannot_read_exactly(tmp_path: Path) -> None:
    zoned = rec("y", None, timestamp="2026-11-28T15:00:00+01:00")
    other_zone = write(tmp_path / "zone.log", [rec("x"), zoned])
    naive = write(tmp_path / "naive.log", [rec("y", None, timestamp="2026-11-28T15:00:00")])
    bad_date = write(tmp_path / "date.log", [rec("y", None, timestamp="2026-02-30T15:00:00.000000Z")])
    midnight = write(tmp_path / "24.log", [rec("y", None, timestamp="2026-02-27T24:00:00Z")])
    long_line = write(tmp_path / "long.log", [rec("x"), b'{"event":"x","p":"' + b"y" * (9 << 20) + b'"}'])
    pattern = write(tmp_path / "l*g?[1].log", [rec("x")])
    for path in (other_zone, naive, bad_date, midnight, long_line, pattern):
        assert duck.summarize_duckdb(str(path)) is None, path.name
        # ... and summarize_file falls back to the streaming engine, same document.
        expected = orjson.dumps(summarize_file(str(path), engine="stream"))
        assert orjson.dumps(summarize_file(str(path), engine="duckdb")) == expected
        # The native engine hands such lines to the streaming engine's reader; it
        # declines only the line over 8 MiB.
        scanned = native.summarize_native(str(path))
        if path is long_line:
            assert scanned is None
        else:
            assert scanned is not None and orjson.dumps(scanned) == expected, path.name
        assert orjson.dumps(summarize_file(str(path), engine="native")) == expected


def test_duckdb_and_native_decline_when_a_table_reaches_its_cap(tmp_path: Path) -> None:
    lines = [rec("session.mutation_failed", i, "error", session_id=f"s{i}") for i in range(10_050)]
    random.Random(5).shuffle(lines)
    log = write(tmp_path / "keys.log", lines)
    assert duck.summarize_duckdb(str(log)) is None
    assert native.summarize_native(str(log)) is None
    for engine in ("duckdb", "native", "auto"):
        report = summarize_file(str(log), engine=engine)
        assert report["mutation_failures"]["(other)"] == 50


def test_native_lines_across_read_chunks_and_ranges(tmp_path: Path) -> None:
    """Over 4 MiB (one read of the scanner) with lines cut at every boundary, a 5 MiB line
    (read whole, handed back: too long for a group key) and a last line without newline."""
    rnd = random.Random(11)
    lines = messy(12_000, 4)
    lines.insert(7000, rec("http.request", 9, route="/" + "x" * (5 << 20), status=200, duration_ms=1.0))
    lines += [rec("http.request", rnd.uniform(0, 99), route=f"/p{i % 7}", status=200 + i % 5,
                  duration_ms=rnd.uniform(0, 50), pad="y" * rnd.randrange(0, 900)) for i in range(8000)]
    log = write(tmp_path / "chunks.log", lines, final_newline=False)
    assert log.stat().st_size > 9 << 20
    report = assert_engines_agree(log)
    assert report["requests"]["by_route"]["/p3"]["count"] > 1000
    for threads in (2, 5, 16):
        assert orjson.dumps(native.summarize_native(str(log), threads=threads)) == orjson.dumps(report)


def test_engine_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small = write(tmp_path / "small.log", [rec("x")])
    big = write(tmp_path / "big.log", [rec("x", i) for i in range(20_000)])
    gz = tmp_path / "x.log.gz"
    gz.write_bytes(b"\x1f\x8b" + b"\x00" * (2 << 20))
    assert choose_engine(str(big)) == choose_engine(str(small)) == "native"
    assert choose_engine(str(small), "duckdb") == "duckdb"
    assert choose_engine(str(small), "native") == "native"
    assert choose_engine(str(big), "stream") == "stream"
    assert choose_engine("-", "duckdb") == choose_engine(None) == "stream"
    assert choose_engine(str(gz), "duckdb") == "stream"
    assert choose_engine(str(tmp_path / "missing.log"), "duckdb") == "stream"
    with pytest.raises(ValueError):
        choose_engine(str(big), "fast")
    # Without the scanner: DuckDB for 1 MiB or more, else the streaming engine.
    monkeypatch.setattr(native, "available", lambda: False)
    assert choose_engine(str(big)) == "duckdb" and choose_engine(str(small)) == "stream"
    with pytest.raises(EngineMissing):
        choose_engine(str(big), "native")


def test_the_engine_option_on_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = write(tmp_path / "a.log", messy(300, 7))
    outputs = set()
    for engine in ("auto", "native", "duckdb", "stream"):
        code, out, err = run_logs_cli("summarize", "--json", "--engine", engine, str(log))
        assert code == 0 and err == "", err
        outputs.add(out)
    assert len(outputs) == 1
    with pytest.raises(SystemExit) as exited:
        run_logs_cli("summarize", "--engine", "fast", str(log))
    assert exited.value.code == 2
    monkeypatch.setattr(duck, "available", lambda: False)
    code, out, err = run_logs_cli("summarize", "--engine", "duckdb", str(log))
    assert code == 1 and out == "" and "pip install 'ballast[logs]'" in err
    monkeypatch.setattr(native, "available", lambda: False)
    code, out, err = run_logs_cli("summarize", "--engine", "native", str(log))
    assert code == 1 and out == "" and "C compiler" in err
    code, out, _ = run_logs_cli("summarize", "--json", str(log))  # auto: the streaming engine
    assert code == 0 and out in outputs


# --------------------------------------------------------------------------- bounded memory


PEAK_RSS = PEAK_RSS_KIB + """
import sys
from ballast.logs import duck, native
engine = duck.summarize_duckdb if sys.argv[2] == "duckdb" else native.summarize_native
assert engine(sys.argv[1]) is not None
print(_peak_rss_kib())
"""


@pytest.mark.parametrize("engine", ["duckdb", "native"])
def test_engine_peak_memory_is_bounded(tmp_path: Path, engine: str) -> None:
    """Ten times the lines, each second and duration new: the peak RSS stays under the bound.

    The bound, DuckDB: its ``MEMORY_LIMIT`` (256 MB) for its own state, plus the summary's
    bounded tables; the grouped rows are read in chunks of ``FETCH_ROWS``. Native: a
    12 MiB read buffer per thread, at most 2^19 groups per thread (their keys in at most
    32 MiB) and 2^20 handed-back lines, then one row object per group.
    """

    def log(n: int) -> Path:
        path = tmp_path / f"m{n}.log"
        rnd = random.Random(n)
        with open(path, "wb") as fh:
            for start in range(0, n, 10_000):
                fh.write(b"".join(
                    rec("http.request", float(i * 7), route=f"/r{i % 200}", method="GET",
                        status=200 + i % 400, duration_ms=rnd.uniform(0, 1e6), request_id=f"{i:032x}")
                    + b"\n"
                    for i in range(start, min(n, start + 10_000))
                ))
        return path

    def peak_kb(path: Path) -> int:
        proc = subprocess.run([sys.executable, "-c", PEAK_RSS, str(path), engine], capture_output=True,
                              text=True, timeout=600, check=True)
        return int(proc.stdout.strip())

    small, big = peak_kb(log(30_000)), peak_kb(log(300_000))
    assert big < 400 * 1024, f"peak RSS {big} KiB"
    assert big - small < 160 * 1024, f"peak RSS grew from {small} KiB to {big} KiB"


# --------------------------------------------------------------------------- generated lines


_STAMPS = st.sampled_from([
    stamp(1), stamp(3600.25), "2026-11-28T14:00:09Z", "2026-02-29T10:00:00Z", "2028-02-29T10:00:00.000001Z",
    "2026-02-27T24:00:00Z", "2026-13-01T00:00:00Z", "2026-11-28T14:00:60Z", "0000-01-01T00:00:00Z",
    "2026-11-28 14:00:00Z", "2026-11-28T14:00:00+00:00", "2026-11-28T14:00:00.5Z", "2026-11-28",
    "2100-02-29T10:00:00Z", "2000-02-29T10:00:00.000000Z", "2026-04-31T10:00:00Z",
])
_SCALARS = (
    st.none() | st.booleans() | st.integers(min_value=-(1 << 70), max_value=1 << 70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
    | st.sampled_from(["http.request", "upstream.retry", "finalize.stage", "session.mutation_failed",
                       "load.shed", "info", "error", "GET", "/a", "503", "a\"b", "tab\there", "é", "\u2028"])
)
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)
_KEYS = st.sampled_from([*groups.FIELDS, "request_id", "path", "x", "Event", "évent"])


@st.composite
def _line(draw: st.DrawFn) -> bytes:
    record: dict[str, Any] = {}
    if draw(st.booleans()):
        record["timestamp"] = draw(_STAMPS)
    if draw(st.integers(0, 9)):
        record["event"] = draw(st.sampled_from(["http.request", *groups.RARE, "server.started", 5, None]))
    record.update(draw(st.dictionaries(_KEYS, _VALUES, max_size=8)))
    text = json.dumps(record, separators=(",", ":"), ensure_ascii=draw(st.booleans())).encode()
    how = draw(st.integers(0, 11))
    if how == 0:  # a repeated key, the first of them counts
        text = text[:-1] + b',"event":"other","status":1}' if len(text) > 2 else text
    elif how == 1:  # whitespace where JSON allows it
        text = text.replace(b'":', b'" :', 1).replace(b",", b", ", 1)
    elif how == 2:
        text = text[: draw(st.integers(0, len(text)))]  # cut short
    elif how == 3:
        text = b" " + text + b"\r"
    return text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_line(), min_size=1, max_size=40))
def test_native_agrees_with_the_streaming_engine_on_generated_lines(
    tmp_path: Path, lines: list[bytes],
) -> None:
    log = write(tmp_path / "gen.log", lines)
    expected = orjson.dumps(summarize_file(str(log), workers=1, engine="stream"))
    for threads in (1, 2):
        scanned = native.summarize_native(str(log), threads=threads)
        assert scanned is not None and orjson.dumps(scanned) == expected  # no cap is near: never declined
    window = {"since": T0, "until": T0 + timedelta(hours=1)}
    expected = orjson.dumps(summarize_file(str(log), workers=1, engine="stream", **window))
    scanned = native.summarize_native(str(log), **window)
    assert scanned is not None and orjson.dumps(scanned) == expected


def test_native_reads_each_duration_as_python_does(tmp_path: Path) -> None:
    """Every duration's double is exactly ``float(text)`` (the scanner's own decimal reader
    takes the short forms; strtod the rest): seen in each group's largest duration."""
    from ballast.logs import _scan
    from ballast.logs.sketch import _INV_LOG_GAMMA, _MIN_MS

    rnd = random.Random(3)
    texts = ["0", "-0", "0.0", "1", "1.5", "0.1", "0.3", "2.675", "999999999999999", "123456789012345.6",
             "0.000123456789012345", "9007199254740993", "0.1000000000000000055511151231257827"]
    texts += [f"{rnd.randrange(10 ** rnd.randrange(1, 16))}.{rnd.randrange(10 ** 6):0{rnd.randrange(1, 7)}d}"
              for _ in range(3000)]
    texts += [repr(rnd.uniform(0, 1e6)) for _ in range(1000)]
    texts = [t for t in texts if "e" not in t]
    lines = [b'{"event":"http.request","route":"/r%d","duration_ms":%s}' % (i, t.encode())
             for i, t in enumerate(texts)]
    log = write(tmp_path / "durations.log", lines)
    with open(log, "rb") as fh:
        result = _scan.scan(fh.fileno(), [(0, log.stat().st_size)], 1 << 20, None, None, [], [],
                            _MIN_MS, _INV_LOG_GAMMA, groups.ZERO_BUCKET)
    assert result is not None
    _, buckets, _, handed_back, simple = result
    assert simple == len(lines) and handed_back == b""
    got = {orjson.loads(rj): dmax for ej, rj, sj, b, win, n, dmax in buckets}
    assert got == {f"/r{i}": float(t) for i, t in enumerate(texts) if 0 <= float(t) < 1e15}  # usable ones
    assert len(got) > 4000


def test_native_reads_utf8_as_the_json_readers_do(tmp_path: Path) -> None:
    """Well-formed UTF-8 in a simple line is read natively; any malformed sequence makes the
    line the streaming engine's (which counts it as not JSON)."""
    good = ["é", "€", "𝄞", "\u2028", "\uffff", "\U0010ffff", "\x7f", "mixed é€𝄞 text"]
    bad = [b"\xc0\xaf", b"\xc1\xbf", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xf0\x8f\xbf\xbf",
           b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80", b"\xff", b"\x80", b"\xc3", b"\xe2\x82", b"\xf0\x9d\x84",
           b"\xc3\x28", b"\xe2\x28\xa1"]
    lines = []
    for i, text in enumerate(good):
        lines.append(rec("http.request", i, route=f"/{text}", status=200, duration_ms=1.0, user=text))
    for i, raw in enumerate(bad):
        lines.append(b'{"event":"http.request","timestamp":"' + stamp(i).encode()
                     + b'","route":"/bad' + raw + b'","status":500}')
        lines.append(b'{"event":"auth.denied","reason":"r' + raw + b'","timestamp":"' + stamp(i).encode()
                     + b'"}')
    log = write(tmp_path / "utf8.log", lines)
    expected = summarize_file(str(log), workers=1, engine="stream")
    assert expected["lines"]["skipped"]["not_json"] == 2 * len(bad)
    assert set(expected["requests"]["by_route"]) == {f"/{text}" for text in good}
    for threads in (1, 2):
        assert orjson.dumps(native.summarize_native(str(log), threads=threads)) == orjson.dumps(expected)


SPLICES = [b'"event":"upstream.retry",', b'"duration_ms":1e5,', b'"status":"5',
           b'"timestamp":"2028-02-29T00:00:00Z",']


def test_native_agrees_on_byte_mutations_of_real_lines(tmp_path: Path) -> None:
    """Ballast-shaped lines with bytes flipped, inserted (quotes, backslashes, brackets,
    digits, UTF-8 lead bytes), deleted or cut, and fields spliced in: the scanner's parser
    must draw the simple/other line exactly where the JSON readers do."""
    rnd = random.Random(17)
    base = messy(2000, 8)
    for round_ in range(12):
        lines = []
        for _ in range(300):
            line = bytearray(rnd.choice(base))
            for _ in range(rnd.randrange(0, 4)):
                at = rnd.randrange(len(line) + 1)
                op = rnd.randrange(5)
                if op == 0 and at < len(line):
                    line[at] = rnd.randrange(256)
                elif op == 1:
                    line.insert(at, rnd.choice(b'"\\{}[],:0123456789.-eE \t\xc3\xe2\x80\xff'))
                elif op == 2 and at < len(line):
                    del line[at]
                elif op == 3:
                    del line[at:]
                else:
                    line[at:at] = rnd.choice(SPLICES)
            lines.append(bytes(line).replace(b"\n", b""))
        log = write(tmp_path / f"mutated{round_}.log", lines)
        expected = orjson.dumps(summarize_file(str(log), workers=1, engine="stream"))
        for threads in (1, 3):
            scanned = native.summarize_native(str(log), threads=threads)
            assert scanned is not None and orjson.dumps(scanned) == expected, (round_, threads)
