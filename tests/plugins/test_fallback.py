"""The fallback plugin: a failing provider's answers replaced by the builtin's, marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from resilience_support import RecordingExporter
from structlog.testing import capture_logs

from ballast.config import load_settings
from ballast.errors import UpstreamError
from ballast.executor import LoopDefaultExecutor
from ballast.inference import (
    ReportInput,
    ReportReply,
    ResolveInput,
    ResolveReply,
    wrap_provider,
)
from ballast.plugin_manager import load_plugins
from ballast.plugins import fallback
from ballast.plugins.fallback import FallbackProvider, Settings
from ballast.resilience import UpstreamRefused
from ballast.sessions.builtin import BuiltinProvider
from ballast.telemetry import Telemetry

UTTERANCES = [("spk_0", 0, 900, "Hello everyone, I'm Alice."),
              ("spk_1", 1000, 1900, "This is Bob, joining from Berlin."),
              ("spk_0", 2000, 2900, "I will send the notes.")]


class Failing:
    """A provider whose every call fails the way a sick upstream does."""

    name = "openai"

    def __init__(self, error: UpstreamError | None = None) -> None:
        self.error = error or UpstreamError(kind="status", upstream_status=503, attempts=3)
        self.closed = False

    async def resolve(self, data: ResolveInput) -> ResolveReply:
        raise self.error

    async def report(self, data: ReportInput) -> ReportReply:
        raise self.error

    async def close(self) -> None:
        self.closed = True


class Healthy(Failing):
    async def resolve(self, data: ResolveInput) -> ResolveReply:
        return ResolveReply(mapping={"spk_0": "Zed"})


def resolve_input() -> ResolveInput:
    return ResolveInput("s", ["Alice", "Bob"], UTTERANCES)


def report_input() -> ReportInput:
    return ReportInput(session_id="s", title="t", participants=["Alice", "Bob"],
                       speakers={"spk_0": "Alice", "spk_1": "Bob"},
                       stats={"totals": {}, "speakers": []}, utterances=UTTERANCES)


def wrapped(primary: Any, exporter: RecordingExporter | None = None) -> Any:
    telemetry = Telemetry()
    if exporter is not None:
        telemetry.attach(exporter)  # type: ignore[arg-type]
    return FallbackProvider(primary, BuiltinProvider(LoopDefaultExecutor().run),
                            telemetry.counter("ballast_fallback_total"))


async def test_a_failed_resolve_is_answered_by_the_builtin_provider_marked() -> None:
    exporter = RecordingExporter()
    with capture_logs() as logs:
        reply = await wrapped(Failing(), exporter).resolve(resolve_input())
    assert reply.mapping == {"spk_0": "Alice", "spk_1": "Bob"}
    assert reply.degraded and reply.degraded_reason == "status"
    [used] = [e for e in logs if e["event"] == "fallback.used"]
    assert (used["operation"], used["kind"], used["provider"], used["attempts"]) == \
        ("resolve", "status", "openai", 3)
    assert exporter.count("ballast_fallback_total", "resolve", "status") == 1


async def test_a_refused_call_falls_back_too() -> None:
    refused = UpstreamRefused(kind="circuit_open", retry_after_s=3)
    reply = await wrapped(Failing(refused)).report(report_input())
    assert reply.summary and reply.degraded and reply.degraded_reason == "circuit_open"


async def test_a_healthy_answer_is_not_marked() -> None:
    reply = await wrapped(Healthy()).resolve(resolve_input())
    assert reply.mapping == {"spk_0": "Zed"} and not reply.degraded


async def test_a_model_cannot_mark_its_own_reply_degraded() -> None:
    reply = ResolveReply.model_validate({"mapping": {}, "degraded": True, "_degraded": "x"})
    assert not reply.degraded


async def test_when_the_fallback_fails_too_the_upstream_error_is_raised() -> None:
    class Broken(BuiltinProvider):
        async def resolve(self, data: ResolveInput) -> ResolveReply:
            raise RuntimeError("builtin broke")

    primary = Failing()
    provider = FallbackProvider(primary, Broken(LoopDefaultExecutor().run),
                                Telemetry().counter("ballast_fallback_total"))
    with capture_logs() as logs, pytest.raises(UpstreamError) as caught:
        await provider.resolve(resolve_input())
    assert caught.value is primary.error
    assert [e["event"] for e in logs] == ["fallback.failed"]


async def test_close_closes_both() -> None:
    primary = Failing()
    await wrapped(primary).close()
    assert primary.closed


def test_off_by_default() -> None:
    assert Settings().enabled is False


def test_hook_ballast_inference_wrappers(tmp_path: Path) -> None:
    path = tmp_path / "ballast.toml"
    path.write_text("[plugins.fallback]\nenabled = true\n")
    config = load_settings(path, environ={})
    plugins = load_plugins(config)
    groups = plugins.hook.ballast_inference_wrappers(config=config, telemetry=Telemetry(),
                                                      run_blocking=LoopDefaultExecutor().run)
    wrappers = [w for group in reversed(groups) for w in group]
    assert len(wrappers) == 1
    provider = wrap_provider(Failing(), wrappers)
    assert isinstance(provider, FallbackProvider)
    builtin = BuiltinProvider(LoopDefaultExecutor().run)
    assert wrap_provider(builtin, wrappers) is builtin  # nothing to fall back to

    path.write_text("")
    off = load_plugins(load_settings(path, environ={}))
    assert off.hook.ballast_inference_wrappers(config=config, telemetry=Telemetry(),
                                               run_blocking=LoopDefaultExecutor().run) == []
    assert fallback.ballast_settings_model() is Settings
