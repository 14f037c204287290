"""The hook specification stays honest: every hook is documented, tested and in the docs.

Also the hooks that no builtin plugin exercises on its own, driven with small
third-party plugins registered beside the builtins, and the promises about order.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from fake_upstream import FakeUpstream
from pydantic import BaseModel
from pytest_aiohttp import AiohttpClient

from ballast import hookspecs
from ballast.app import build_app
from ballast.config import DEFAULT_CONFIG, Config, PluginSection, load_settings
from ballast.errors import ConfigError, PluginError
from ballast.executor import LoopDefaultExecutor
from ballast.hookspecs import hookimpl
from ballast.keys import EXECUTOR, UPSTREAM
from ballast.middleware import Handler, MiddlewareSpec
from ballast.plugin_manager import BUILTIN_PLUGINS, ENTRY_POINT_GROUP, load_plugins
from ballast.plugins import error_sanitizer, timeout_budget
from ballast.plugins.bulkhead import BoundedExecutor
from ballast.sessions.finalize import JobContext, JobRun
from ballast.upstream import UpstreamCall, UpstreamRequest, UpstreamResponse

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "plugins.md"
HOOKS = sorted(name for name, obj in vars(hookspecs).items()
               if name.startswith("ballast_") and hasattr(obj, "ballast_spec"))


def spec_of(name: str) -> Any:
    return getattr(hookspecs, name)


def firstresult(name: str) -> bool:
    return bool(spec_of(name).ballast_spec["firstresult"])


def docs_section(text: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same or a higher level."""
    level = heading.split(" ", 1)[0]
    start = text.index(heading + "\n")
    stop = re.compile(rf"^#{{1,{len(level)}}} ", re.MULTILINE)
    match = stop.search(text, start + len(heading) + 1)
    return text[start:match.start() if match else len(text)]


def make_config(tmp_path: Path, **env: str) -> Config:
    path = tmp_path / "ballast.toml"
    path.write_text("")
    return load_settings(path, environ={"BALLAST__STORAGE__PATH": str(tmp_path / "b.db"),
                                        "BALLAST__STORAGE__DURABILITY": "normal", **env})


# --------------------------------------------------------------------------------------
# the spec is documented and tested
# --------------------------------------------------------------------------------------


def test_the_spec_declares_the_hooks_the_docs_list() -> None:
    expected = ["ballast_settings_model", "ballast_configure", "ballast_middlewares",
                "ballast_client_provider", "ballast_upstream_call", "ballast_upstream_wrappers",
                "ballast_upstream_attempt_wrappers", "ballast_inference_wrappers",
                "ballast_executor", "ballast_finalize_wrappers", "ballast_mutation_failed",
                "ballast_app_built"]
    assert sorted(expected) == HOOKS


@pytest.mark.parametrize("name", HOOKS)
def test_every_hook_has_a_docstring_that_says_whether_the_first_result_wins(name: str) -> None:
    doc = inspect.getdoc(spec_of(name))
    assert doc and len(doc.split()) >= 15, f"{name} needs a docstring: when, parameters, return"
    says_first_wins = "First non-None result wins" in " ".join(doc.split())
    assert says_first_wins == firstresult(name), name


def test_every_hook_has_a_test_named_after_it() -> None:
    defined = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        defined.update(re.findall(r"^(?:async )?def test_hook_(ballast_\w+)\(", path.read_text(),
                                  re.MULTILINE))
    missing = [h for h in HOOKS if not any(d == h or d.startswith(h + "_") for d in defined)]
    assert missing == [], f"no test_hook_<name> test for {missing}"


@pytest.mark.parametrize("name", HOOKS)
def test_every_hook_is_documented_in_docs_plugins(name: str) -> None:
    text = DOCS.read_text()
    section = docs_section(text, f"#### `{name}`")
    for part in ("**When**", "**Parameters**", "**Returns**"):
        assert part in section, f"{name}: {part} missing"
    match = re.search(r"\*\*firstresult\*\*: (yes|no)\b", section)
    assert match is not None, f"{name}: say whether it is firstresult"
    assert (match.group(1) == "yes") == firstresult(name), name
    for param in inspect.signature(spec_of(name)).parameters:
        assert f"`{param}`" in section, f"{name}: parameter {param} is not documented"


def test_the_docs_name_the_entry_point_group_and_the_order() -> None:
    text = docs_section(DOCS.read_text(), "## Writing a plugin")
    assert f"`{ENTRY_POINT_GROUP}`" in text and ENTRY_POINT_GROUP == "ballast.plugins"
    assert "lower is outer" in text
    assert f"`error_sanitizer` ({error_sanitizer.ORDER})" in text
    assert f"`timeout_budget` ({timeout_budget.ORDER})" in text
    assert "request-context middleware is outermost" in text
    builtins = ", ".join(f"`{name}`" for name, _ in BUILTIN_PLUGINS)
    assert f"({builtins})" in re.sub(r"\s+", " ", text)


@pytest.mark.parametrize("name", [name for name, _ in BUILTIN_PLUGINS])
def test_each_builtin_plugin_is_documented_with_its_true_defaults(name: str) -> None:
    section = docs_section(DOCS.read_text(), f"## `{name}`")
    assert "**Protects against**" in section and "**When disabled**" in section
    rows = re.findall(r"^\| `(\w+)` \| (.+?) \| .*\|$", section, re.MULTILINE)
    documented = dict(rows)
    module = __import__(dict(BUILTIN_PLUGINS)[name], fromlist=["Settings"])
    model: type[BaseModel] = module.ballast_settings_model()
    assert set(documented) == set(model.model_fields), name
    for key, shown in documented.items():
        default = model.model_fields[key].default
        if shown == "unset":
            assert default is None, f"plugins.{name}.{key}"
        else:
            assert tomllib.loads(f"v = {shown.strip('`')}")["v"] == default, f"plugins.{name}.{key}"
    # config/default.toml spells out the same defaults.
    shipped = tomllib.loads(DEFAULT_CONFIG.read_text())["plugins"][name]
    for key, value in shipped.items():
        assert value == model.model_fields[key].default, f"default.toml plugins.{name}.{key}"


# --------------------------------------------------------------------------------------
# hooks no builtin drives on its own
# --------------------------------------------------------------------------------------


class Recorder:
    """A third-party plugin that records what it is asked and can refuse its config."""

    class Settings(PluginSection):
        low: int = 1
        high: int = 10

    def __init__(self) -> None:
        self.configured: list[Config] = []

    @hookimpl
    def ballast_settings_model(self) -> type[PluginSection]:
        return self.Settings

    @hookimpl
    def ballast_configure(self, config: Config) -> None:
        s = config.plugin("recorder")
        if s.low > s.high:
            raise ConfigError(f"plugins.recorder.low: must not exceed high ({s.high})")
        self.configured.append(config)


def test_hook_ballast_configure(tmp_path: Path) -> None:
    recorder = Recorder()
    config = make_config(tmp_path, BALLAST__PLUGINS__RECORDER__HIGH="20")
    load_plugins(config, eps=[], extra=[("recorder", recorder)])
    [seen] = recorder.configured
    assert seen is config
    assert (seen.plugin("recorder").low, seen.plugin("recorder").high) == (1, 20)

    bad = make_config(tmp_path, BALLAST__PLUGINS__RECORDER__LOW="50")
    with pytest.raises(ConfigError, match=r"plugins\.recorder\.low"):
        load_plugins(bad, eps=[], extra=[("recorder", Recorder())])


def test_hook_ballast_settings_model_of_a_third_party_plugin(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"plugins\.recorder\.middle: unknown key"):
        load_plugins(make_config(tmp_path, BALLAST__PLUGINS__RECORDER__MIDDLE="5"),
                     eps=[], extra=[("recorder", Recorder())])

    class WrongModel:
        @hookimpl
        def ballast_settings_model(self) -> type[BaseModel]:
            return BaseModel

    with pytest.raises(PluginError, match="PluginSection"):
        load_plugins(make_config(tmp_path), eps=[], extra=[("wrong", WrongModel())])


class Tracer:
    """Wraps the upstream call, the finalize run and the request path, noting the order."""

    def __init__(self, name: str, trace: list[Any]) -> None:
        self.name = name
        self.trace = trace

    @hookimpl
    def ballast_upstream_wrappers(self, config: Config) -> list[Any]:
        def wrap(call: UpstreamCall) -> UpstreamCall:
            async def traced(request: UpstreamRequest) -> UpstreamResponse:
                self.trace.append(("upstream", self.name))
                return await call(request)

            return traced

        return [wrap]

    @hookimpl
    def ballast_finalize_wrappers(self, config: Config) -> list[Any]:
        def wrap(run: JobRun) -> JobRun:
            async def traced(job: JobContext) -> None:
                # The builtin budget (registered first) is outside: its deadline is set.
                self.trace.append(("finalize", self.name, job.deadline is not None))
                await run(job)

            return traced

        return [wrap]

    @hookimpl
    def ballast_middlewares(self, config: Config) -> list[MiddlewareSpec]:
        async def traced(request: web.Request, handler: Handler) -> web.StreamResponse:
            self.trace.append(("middleware", self.name))
            return await handler(request)

        return [MiddlewareSpec(f"tracer-{self.name}", 150, traced)]


async def test_hook_ballast_upstream_wrappers(tmp_path: Path, aiohttp_client: AiohttpClient) -> None:
    trace: list[Any] = []
    config = make_config(tmp_path)
    plugins = load_plugins(config, eps=[], extra=[("first", Tracer("first", trace)),
                                                  ("second", Tracer("second", trace))])
    client = await aiohttp_client(build_app(config, plugins))
    async with FakeUpstream() as fake:
        response = await client.app[UPSTREAM].request(UpstreamRequest(
            "POST", fake.base_url + "/chat/completions", name="test", json={"model": "m"}))
    assert response.status == 200
    assert fake.attempts == 1
    # Registration order, the first one outermost.
    assert [t for t in trace if t[0] == "upstream"] == [("upstream", "first"), ("upstream", "second")]


async def test_finalize_wrappers_and_tied_middlewares_follow_registration_order(
        tmp_path: Path, aiohttp_client: AiohttpClient) -> None:
    trace: list[Any] = []
    config = make_config(tmp_path)
    plugins = load_plugins(config, eps=[], extra=[("first", Tracer("first", trace)),
                                                  ("second", Tracer("second", trace))])
    client = await aiohttp_client(build_app(config, plugins))
    assert (await client.get("/healthz")).status == 200
    assert [t for t in trace if t[0] == "middleware"] == [("middleware", "first"),
                                                          ("middleware", "second")]
    assert (await client.post("/v1/sessions", json={"session_id": "s1"})).status == 201
    assert (await client.post("/v1/sessions/s1/finalize")).status == 202
    for _ in range(1000):  # 20 s at most
        job = (await (await client.get("/v1/sessions/s1/finalize")).json())["job"]
        if job["state"] != "running":
            break
        await asyncio.sleep(0.02)
    assert job["state"] == "succeeded", job
    assert [t for t in trace if t[0] == "finalize"] == [("finalize", "first", True),
                                                        ("finalize", "second", True)]


async def test_hook_ballast_app_built(tmp_path: Path, aiohttp_client: AiohttpClient) -> None:
    events: list[str] = []

    class Extension:
        @hookimpl
        def ballast_app_built(self, app: web.Application, config: Config) -> Any:
            async def hello(request: web.Request) -> web.Response:
                return web.json_response({"plugin": "extension"})

            app.router.add_get("/extension", hello)

            async def resource(app: web.Application) -> AsyncIterator[None]:
                events.append("set up")
                yield
                events.append("torn down")

            return resource

    class Nothing:
        @hookimpl
        def ballast_app_built(self, app: web.Application, config: Config) -> None:
            events.append("called")

    config = make_config(tmp_path)
    plugins = load_plugins(config, eps=[], extra=[("extension", Extension()), ("nothing", Nothing())])
    app = build_app(config, plugins)
    assert events == ["called"]
    client = await aiohttp_client(app)
    assert events == ["called", "set up"]
    resp = await client.get("/extension")
    assert (resp.status, await resp.json()) == (200, {"plugin": "extension"})
    assert resp.headers["X-Request-ID"]  # behind the core's request path like any route
    await client.close()
    assert events == ["called", "set up", "torn down"]


def test_a_registered_plugin_replaces_the_builtin_for_firstresult_hooks(tmp_path: Path) -> None:
    class OwnExecutor:
        @hookimpl
        def ballast_executor(self, config: Config) -> LoopDefaultExecutor:
            return LoopDefaultExecutor()

    class Defers:
        @hookimpl
        def ballast_executor(self, config: Config) -> None:
            return None

    config = make_config(tmp_path)
    app = build_app(config, load_plugins(config, eps=[], extra=[("own", OwnExecutor())]))
    assert isinstance(app[EXECUTOR], LoopDefaultExecutor)
    app = build_app(config, load_plugins(config, eps=[], extra=[("defers", Defers())]))
    executor = app[EXECUTOR]
    assert isinstance(executor, BoundedExecutor)
    executor.shutdown()


def test_a_misspelled_hook_is_refused(tmp_path: Path) -> None:
    class Typo:
        @hookimpl
        def ballast_middleware(self, config: Config) -> list[MiddlewareSpec]:
            return []

    with pytest.raises(PluginError, match="unknown hook"):
        load_plugins(make_config(tmp_path), eps=[], extra=[("typo", Typo())])
