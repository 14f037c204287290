"""Prompts cost what they show, not what the session holds.

A 100,000-utterance session in a real SQLite store: the transcript window is two page
reads, the openai provider reads only those rows and builds its prompt in a worker
thread, and a real server keeps answering ``/healthz`` while resolves run on such a
session (measured against the same server's own baseline, with a generous factor).
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import pytest_asyncio
from fake_upstream import FakeUpstream, FakeUpstreamProcess
from support import ServerProcess, request

from ballast.inference import ReportInput, ResolveInput, Utterance
from ballast.sessions.openai import OpenAIProvider
from ballast.sessions.prompts import MAX_PROMPT_CHARS, report_prompt, resolve_prompt, window_rows
from ballast.sessions.sqlite_store import SQLiteStore
from ballast.sessions.transcript import StoredTranscript, read_window, sequence_window
from ballast.upstream import PerCallClientProvider, Upstream, single_attempt_call

LONG = 100_000
T = "default"  # the tenant


def _row(i: int) -> dict[str, Any]:
    if i == 0:
        text = "Hi all, I'm Alice."
    elif i == LONG - 1:
        text = "Dave here, joining at the very end."
    else:
        text = f"point {i} about the quarterly roadmap and its budget"
    speaker = "spk_9" if i == LONG - 1 else f"spk_{i % 3}"
    return {"id": None, "type": "utterance", "speaker": speaker, "start_ms": i * 1000,
            "end_ms": i * 1000 + 900, "text": text}


async def _long_session(path: Path, sid: str = "long") -> int:
    """A session of LONG utterances (and a note every 1,000), written through the store."""
    store = SQLiteStore(path, durability="normal")
    await store.open()
    try:
        await store.create_session(T, sid, "Roadmap", ["Alice", "Bob", "Carol", "Dave"])
        batch: list[dict[str, Any]] = []
        for i in range(LONG):
            batch.append(_row(i))
            if i % 1000 == 500:
                batch.append({"id": None, "type": "note", "text": f"note {i}"})
            if len(batch) >= 5000:
                await store.append(T, sid, batch)
                batch = []
        if batch:
            await store.append(T, sid, batch)
        record = await store.get_session(T, sid)
        assert record is not None
        return record.last_seq
    finally:
        await store.close()


@pytest_asyncio.fixture
async def long_store(tmp_path: Path) -> AsyncIterator[tuple[SQLiteStore, int]]:
    last_seq = await _long_session(tmp_path / "long.db")
    store = SQLiteStore(tmp_path / "long.db", durability="normal")
    await store.open()
    yield store, last_seq
    await store.close()


async def test_a_stored_window_is_two_bounded_reads(long_store: tuple[SQLiteStore, int]) -> None:
    store, last_seq = long_store
    transcript = StoredTranscript(store, T, "long", last_seq)
    window = await transcript.window(600, 200)
    assert transcript.rows_read == 800
    assert window.head[0] == ("spk_0", 0, 900, "Hi all, I'm Alice.")
    assert window.tail[-1][0] == "spk_9"
    assert window.omitted == last_seq - 800
    assert len(window.head) == 599  # a note among the first 600 rows
    # A short session: one read covers it, nothing omitted.
    await store.create_session(T, "short", None, [])
    await store.append(T, "short", [_row(1), _row(2)])
    short = StoredTranscript(store, T, "short", 2)
    small = await short.window(300, 200)
    assert (len(small.head), small.tail, small.omitted, short.rows_read) == (2, [], 0, 2)


async def test_openai_resolve_reads_only_the_ends_and_builds_off_the_loop(
        long_store: tuple[SQLiteStore, int]) -> None:
    store, last_seq = long_store
    built: list[tuple[str, bool]] = []
    loop_thread = threading.get_ident()

    async def run_blocking(fn: Callable[..., Any], *args: Any) -> Any:
        def call() -> Any:
            built.append((fn.__name__, threading.get_ident() != loop_thread))
            return fn(*args)

        return await asyncio.to_thread(call)

    async with FakeUpstream() as fake:
        clients = PerCallClientProvider()
        provider = OpenAIProvider(Upstream(single_attempt_call(clients), clients), base_url=fake.base_url,
                                  model="m", api_key=None, timeout_ms=5000, run_blocking=run_blocking)
        transcript = StoredTranscript(store, T, "long", last_seq)
        reply = await provider.resolve(ResolveInput("long", ["Alice", "Bob", "Carol", "Dave"], transcript))
        [received] = fake.requests
        prompt = received.user_prompt
    assert built == [("resolve_prompt", True)]
    assert transcript.rows_read <= 2 * window_rows(MAX_PROMPT_CHARS) < last_seq // 10
    assert len(prompt) <= MAX_PROMPT_CHARS
    # Both ends made it in: the first introduction and the speaker who joined at the end.
    assert "spk_0: Hi all, I'm Alice." in prompt
    assert "spk_9: Dave here, joining at the very end." in prompt
    assert "lines omitted ...]" in prompt
    assert reply.mapping.get("spk_9") == "Dave" and reply.mapping.get("spk_0") == "Alice"


class CountingSequence(Sequence[Utterance]):
    """A list that counts the items read from it."""

    def __init__(self, items: list[Utterance]) -> None:
        self._items = items
        self.reads = 0

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, index: int) -> Utterance: ...

    @overload
    def __getitem__(self, index: slice) -> list[Utterance]: ...

    def __getitem__(self, index: int | slice) -> Utterance | list[Utterance]:
        got = self._items[index]
        self.reads += len(got) if isinstance(got, list) else 1
        return got

    def __iter__(self) -> Iterator[Utterance]:
        for item in self._items:
            self.reads += 1
            yield item


def test_prompts_over_a_sequence_read_only_its_ends() -> None:
    items = [(r["speaker"], r["start_ms"], r["end_ms"], r["text"]) for r in map(_row, range(LONG))]
    seq = CountingSequence(items)
    prompt = report_prompt(ReportInput("long", None, [], {"spk_0": "Alice"}, {}, seq))
    assert seq.reads <= 2 * window_rows(MAX_PROMPT_CHARS)
    assert prompt.count("lines omitted ...]") == 1 and "Dave here" in prompt
    seq.reads = 0
    prompt = resolve_prompt(ResolveInput("long", ["Alice"], seq))
    assert seq.reads <= 2 * window_rows(MAX_PROMPT_CHARS)
    assert "spk_9: Dave here" in prompt and len(prompt) <= MAX_PROMPT_CHARS


def test_a_window_counts_what_it_leaves_out() -> None:
    items = [("a", i, i, f"t{i}") for i in range(10)]
    window = sequence_window(items, 3, 2)
    assert ([u[3] for u in window.head], [u[3] for u in window.tail], window.omitted) == (
        ["t0", "t1", "t2"], ["t8", "t9"], 5)
    assert sequence_window(items, 5, 5).omitted == 0
    assert asyncio.run(read_window(items, 3, 0)).tail == []
    prompt = resolve_prompt(ResolveInput("s", [], items), window=window)
    assert "a: t2\n[... 5 lines omitted ...]\na: t8\n" in prompt


def test_resolve_on_a_long_session_does_not_block_healthz(tmp_path: Path) -> None:
    last_seq = asyncio.run(_long_session(tmp_path / "server" / "ballast.db"))
    assert last_seq > LONG
    with FakeUpstreamProcess() as fake:
        config = f'[inference]\nprovider = "openai"\nbase_url = "{fake.base_url}"\nmodel = "m"\n'
        with ServerProcess(tmp_path / "server", config) as server:
            base = server.base_url

            def healthz_ms() -> float:
                t0 = time.perf_counter()
                status, _, _ = request("GET", f"{base}/healthz", timeout=30)
                assert status == 200
                return (time.perf_counter() - t0) * 1000

            baseline = [healthz_ms() for _ in range(40)]
            during: list[float] = []
            statuses: list[int] = []
            done = threading.Event()

            def resolve() -> None:
                statuses.append(request("POST", f"{base}/v1/sessions/long/resolve", timeout=60)[0])

            def sample() -> None:
                while not done.is_set():
                    during.append(healthz_ms())
                    time.sleep(0.01)

            sampler = threading.Thread(target=sample)
            sampler.start()
            workers = [threading.Thread(target=resolve) for _ in range(8)]
            for w in workers:
                w.start()
            for w in workers:
                w.join(90)
            done.set()
            sampler.join(30)
            assert statuses == [200] * 8
            base_ms = statistics.median(baseline)
            # Generous bounds, for a shared machine. Measured here: baseline ~2 ms; during
            # the resolves, median 8 ms and worst 245 ms. Before prompts were bounded the
            # loop rendered every line of the session per resolve: median 77 ms, worst 2 s.
            assert statistics.mean(during) <= max(10 * base_ms, 150), (base_ms, during)
            assert max(during) <= max(20 * base_ms, 1000), (base_ms, during)
