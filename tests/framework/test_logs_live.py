"""``ballast logs tail`` on a real growing file and a real pipe, and the HTML charts in a real browser."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from ballast.logs import render_html, summarize_file

T0 = "2026-11-28T14:00:{:02d}.000000Z"


def request_line(status: int, second: int = 0) -> bytes:
    return (
        orjson.dumps(
            {
                "timestamp": T0.format(second % 60),
                "level": "info",
                "event": "http.request",
                "status": status,
                "duration_ms": 4.0,
                "route": "/v1/sessions",
            }
        )
        + b"\n"
    )


def event_line(event: str, **fields: Any) -> bytes:
    return orjson.dumps({"timestamp": T0.format(0), "level": "warning", "event": event, **fields}) + b"\n"


class Tail:
    """``python -m ballast.logs tail`` as a child process, its output lines read on a thread."""

    def __init__(self, *argv: str, stdin: int | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ballast.logs", "tail", *argv, "--every", "0.2"],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.pump.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode())

    def until(self, predicate: Any, timeout: float = 30.0) -> list[str]:
        """Live lines up to the first one that satisfies ``predicate`` (fails after ``timeout``)."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                text = self.lines.get(timeout=0.5)
            except queue.Empty:
                continue
            seen.append(text)
            if predicate(text):
                return seen
        raise AssertionError(f"no such line within {timeout}s; saw {seen[-5:]}")

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout=30)
        rest = self.until(lambda text: text.startswith("-- total:"), timeout=10)
        return code, rest[-1]

    def close(self) -> str:
        """Wait for the pump to drain stdout, close the pipes; what was written on stderr."""
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.proc.wait(timeout=30)
        self.pump.join(timeout=30)  # stdout reached its end
        err = self.proc.stderr.read().decode()
        self.proc.stderr.close()
        self.proc.stdout.close()
        assert "Traceback" not in err, err
        return err


def count(text: str, label: str) -> int:
    """The count labelled ``label`` in a live line (``N lines``, then ``5xx N`` and so on)."""
    words = text.split()
    at = words.index(label)
    return int(words[at - 1] if label == "lines" else words[at + 1])


def test_tail_follows_appended_lines_and_exits_cleanly_on_sigint(tmp_path: Path) -> None:
    log = tmp_path / "ballast.log"
    log.write_bytes(b"".join(request_line(200) for _ in range(50)))  # already there: not counted
    tail = Tail(str(log))
    try:
        tail.until(lambda text: "lines" in text)  # it is running and past the old content
        with open(log, "ab") as fh:
            fh.write(request_line(200) + request_line(503) + request_line(404))
            fh.write(event_line("upstream.retry", name="inference.resolve", status=503))
            fh.write(event_line("load.shed", count=7, route="/v1/sessions"))
            fh.write(event_line("circuit.opened", upstream="openai:x"))
        seen = tail.until(lambda text: " 6 lines" in text or count(text, "shed") > 0)
        live = seen[-1]
        assert count(live, "5xx") == 1 and count(live, "4xx") == 1 and count(live, "retries") == 1
        assert count(live, "shed") == 7 and count(live, "breaker-opened") == 1
        # A rotated log: the new file is followed from its start.
        os.rename(log, tmp_path / "ballast.log.1")
        log.write_bytes(request_line(500) + request_line(500))
        seen = tail.until(lambda text: count(text, "5xx") == 2)
    finally:
        code, total = tail.stop()
        tail.close()
    assert code == 0
    assert count(total, "lines") == 8 and count(total, "5xx") == 3


def test_tail_reads_a_pipe_until_it_closes() -> None:
    tail = Tail("-", stdin=subprocess.PIPE)
    assert tail.proc.stdin is not None
    tail.proc.stdin.write(request_line(200) * 4 + b"not json\n")
    tail.proc.stdin.flush()
    tail.until(lambda text: "not-json 1" in text)
    tail.proc.stdin.write(request_line(502))
    tail.proc.stdin.close()
    assert tail.proc.wait(timeout=30) == 0
    total = tail.until(lambda text: text.startswith("-- total:"))[-1]
    tail.close()
    assert count(total, "lines") == 6 and count(total, "5xx") == 1 and "not-json 1" in total


# ------------------------------------------------------------------------------ charts in a browser


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[int]:
    """A headless Chromium with its DevTools port; the test skips where none is installed."""
    binary = _browser()
    if binary is None:
        pytest.skip("no Chromium or Chrome on PATH (Debian: apt-get install chromium)")
    profile = tmp_path / "profile"
    proc = subprocess.Popen(
        [
            binary,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text().strip():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("Chromium did not start its DevTools endpoint")
            time.sleep(0.1)
        yield int(port_file.read_text().split()[0])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


MEASURE_CHARTS = """
JSON.stringify([...document.querySelectorAll('figure.chart')].map(f => {
  const svg = f.querySelector('svg').getBoundingClientRect();
  const bars = [...f.querySelectorAll('rect')].map(r => r.getBoundingClientRect());
  return {series: f.dataset.series, width: svg.width, height: svg.height,
          bars: bars.length, tallest: Math.max(0, ...bars.map(b => b.height)),
          fill: bars.length ? getComputedStyle(f.querySelector('rect')).fill : null};
}))
"""


async def _render(port: int, page: Path) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/json/list") as resp:
            targets = await resp.json(content_type=None)
        target = next(t for t in targets if t["type"] == "page")
        async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            ids = iter(range(1, 1000))

            async def call(method: str, **params: Any) -> dict[str, Any]:
                msg_id = next(ids)
                await ws.send_json({"id": msg_id, "method": method, "params": params})
                while True:
                    msg = await ws.receive_json(timeout=30)
                    if msg.get("id") == msg_id:
                        assert "error" not in msg, msg
                        result: dict[str, Any] = msg["result"]
                        return result

            await call("Page.navigate", url=page.as_uri())
            for _ in range(300):
                state = await call("Runtime.evaluate", expression="document.readyState", returnByValue=True)
                if (
                    state["result"]["value"] == "complete"
                    and "Over time"
                    in (
                        await call(
                            "Runtime.evaluate", expression="document.body.innerText", returnByValue=True
                        )
                    )["result"]["value"]
                ):
                    break
                await asyncio.sleep(0.1)
            measured = await call("Runtime.evaluate", expression=MEASURE_CHARTS, returnByValue=True)
            charts: list[dict[str, Any]] = json.loads(measured["result"]["value"])
            return charts


def test_html_charts_render_in_a_headless_browser(tmp_path: Path, browser: int) -> None:
    lines = [request_line(503 if s % 4 == 0 else 200, s) for s in range(60)]
    lines += [event_line("circuit.opened", upstream="openai:x")]
    log = tmp_path / "app.log"
    log.write_bytes(b"".join(lines))
    report = summarize_file(str(log), interval_s=10)
    page = tmp_path / "report.html"
    page.write_text(render_html(report), encoding="utf-8")
    charts = asyncio.run(_render(browser, page))
    by_series = {c["series"]: c for c in charts}
    assert set(by_series) == {"requests", "5xx", "circuit.opened"}
    for chart in charts:
        assert chart["width"] > 100 and chart["height"] > 50, chart
        # The tallest bar is the series' peak, drawn the full height of the chart.
        assert abs(chart["tallest"] - chart["height"]) < 3, chart
    assert by_series["requests"]["bars"] == 6  # six 10 s buckets, each with requests
    assert by_series["5xx"]["bars"] == 6 and by_series["circuit.opened"]["bars"] == 1
    assert by_series["5xx"]["fill"] != by_series["requests"]["fill"]  # errors drawn in another colour


def test_tail_of_a_missing_file_fails_at_once(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ballast.logs", "tail", str(tmp_path / "nope.log")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert "cannot read" in proc.stderr and "Traceback" not in proc.stderr
