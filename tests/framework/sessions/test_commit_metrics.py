"""Both store adapters report committed mutations and group-commit sizes the same way."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from metrics_support import Scrape

from ballast.plugins.metrics import PrometheusExporter
from ballast.telemetry import Telemetry

T = "default"
StoreFactory = Callable[..., AbstractAsyncContextManager[Any]]


def _utterance(i: int) -> dict[str, object]:
    return {"id": f"u{i}", "type": "utterance", "speaker": "spk_0", "start_ms": i, "end_ms": i + 1,
            "text": f"line {i}"}


async def test_committed_mutations_exclude_repeated_ids_on_every_adapter(stores: StoreFactory) -> None:
    telemetry = Telemetry()
    exporter = PrometheusExporter()
    telemetry.attach(exporter)
    async with stores(telemetry=telemetry) as store:
        await store.create_session(T, "m", None, [])
        await store.append(T, "m", [_utterance(0), _utterance(1)])
        await store.append(T, "m", [_utterance(1), _utterance(2)])  # u1 again: not new
        # Concurrent appends may share a commit: the batch histogram sums to the total.
        await asyncio.gather(*(store.append(T, "m", [_utterance(10 + i)]) for i in range(5)))
    got = Scrape(exporter.scrape().decode())
    assert got.total("ballast_mutations_committed_total") == 8
    assert got.total("ballast_commit_batch_size_sum") == 8
    assert 3 <= got.total("ballast_commit_batch_size_count") <= 7
