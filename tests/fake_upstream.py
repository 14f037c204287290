"""A scriptable, OpenAI-compatible inference upstream on loopback, for tests.

Ballast's reliability features (retries, Retry-After, timeouts, budgets, error
sanitizing) only mean something against an upstream that fails the way real ones do:
over a real socket, with real status codes, hung requests, reset connections, cut and
garbled bodies. This module is that upstream. It speaks ``POST /v1/chat/completions``
(and ``/chat/completions``), plays a queue of scripted :class:`Step` s, one per
request, and records every request so tests can count attempts and inspect what was
sent.

In-process use::

    async with FakeUpstream() as fake:
        fake.script(Step.status(503, retry_after="1"), "ok")
        ...  # point the code under test at fake.base_url
        assert fake.attempts == 2

As a separate process, for black-box tests of a ``ballast serve`` subprocess::

    python tests/fake_upstream.py --port 0 --script '503,503,ok'

prints one JSON line ``{"event": "fake_upstream.ready", "port": ..., "base_url": ...}``
and serves until SIGTERM/SIGINT. The same server has a small admin API
(``POST /_admin/script``, ``POST /_admin/default``, ``GET /_admin/stats``,
``GET /_admin/requests``, ``POST /_admin/reset``); :class:`FakeUpstreamProcess` wraps
the process and that API for synchronous tests.

Error bodies and headers deliberately carry the fake's own host and port and an
"internal" message containing :data:`INTERNAL_MARKER`, so leak tests can assert that
Ballast never relays them to its clients.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import json
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

#: Sits in every error body and internal header the fake sends; it must never reach a
#: Ballast client.
INTERNAL_MARKER = "fake-upstream-internal"

#: What ``Step.not_json_content()`` answers with by default: prose, not JSON.
PROSE_CONTENT = "Sure! Here is what I found: the speakers seem to be Alice and Bob."

KINDS = frozenset({
    "ok", "status", "hang", "reset", "truncated", "malformed", "wrong_shape",
    "slow_body", "not_json_content", "raw", "redirect", "huge",
})

#: Sees the request's JSON body (``{}`` if it was not JSON) and returns the assistant
#: message content: a ``str`` is sent as is, anything else is JSON-encoded.
Responder = Callable[[Mapping[str, Any]], Any]

_STEP_FIELDS = ("kind", "code", "retry_after", "body", "content_type", "seconds", "content",
                "lying_length", "location", "size")


@dataclass(frozen=True, slots=True)
class Step:
    """One scripted answer. Build with the class methods; ``kind`` says which.

    ``retry_after`` is sent verbatim as the ``Retry-After`` header, except
    ``"date+N"``, which is rendered when the step is served as the HTTP-date N
    seconds later.
    """

    kind: str = "ok"
    code: int = 200
    retry_after: str | None = None
    body: str | bytes | None = None
    content_type: str | None = None
    seconds: float = 0.0
    content: Any = None
    lying_length: bool = False
    location: str | None = None
    size: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown step kind {self.kind!r}; use one of {sorted(KINDS)}")

    # -- constructors ---------------------------------------------------------------

    @classmethod
    def ok(cls, content: Any = None) -> Step:
        """200 with a valid chat completion; content from ``content`` or the responder."""
        return cls("ok", content=content)

    @classmethod
    def status(cls, code: int, retry_after: str | float | None = None,
               body: str | bytes | None = None, content_type: str | None = None) -> Step:
        """Answer ``code``; the default body is a JSON error that leaks internals."""
        if not 100 <= code <= 599:
            raise ValueError(f"status code {code} is not an HTTP status")
        ra = None if retry_after is None else _retry_after_text(retry_after)
        return cls("status", code=code, retry_after=ra, body=body, content_type=content_type)

    @classmethod
    def hang(cls, seconds: float = 3600.0) -> Step:
        """Say nothing for ``seconds``, then answer like ``ok`` (if the client waited)."""
        return cls("hang", seconds=seconds)

    @classmethod
    def reset(cls) -> Step:
        """Abort the connection with a TCP reset, sending no response at all."""
        return cls("reset")

    @classmethod
    def truncated(cls, *, lying_length: bool = False) -> Step:
        """200 with a completion cut in half.

        By default the HTTP framing is honest (Content-Length matches the cut body), so
        the client reads a body that is not valid JSON. With ``lying_length`` the
        headers promise the whole body, half is sent and the connection is closed, so
        the client's read itself fails (a payload error).
        """
        return cls("truncated", lying_length=lying_length)

    @classmethod
    def malformed(cls) -> Step:
        """200, ``application/json``, with a body that is not JSON."""
        return cls("malformed")

    @classmethod
    def wrong_shape(cls, content: Any = None) -> Step:
        """A valid completion whose content is JSON of the wrong shape (default ``{"foo": 1}``)."""
        return cls("wrong_shape", content=content)

    @classmethod
    def slow_body(cls, seconds: float = 2.0) -> Step:
        """Headers at once, then an ``ok`` body dribbled out over ``seconds``."""
        return cls("slow_body", seconds=seconds)

    @classmethod
    def not_json_content(cls, text: str = PROSE_CONTENT) -> Step:
        """A valid completion whose message content is prose, not JSON."""
        return cls("not_json_content", content=text)

    @classmethod
    def redirect(cls, location: str, code: int = 307) -> Step:
        """A redirect (``code`` 3xx) to ``location``, e.g. another fake's completions URL."""
        if not 300 <= code <= 399:
            raise ValueError(f"a redirect needs a 3xx status, not {code}")
        return cls("redirect", code=code, location=location)

    @classmethod
    def huge(cls, size: int, *, lying_length: bool = False) -> Step:
        """200 with ``size`` bytes of whitespace, then a valid completion.

        Streamed in chunks (the fake never holds it whole), without ``Content-Length``
        (chunked) unless ``lying_length``: then the true total length is declared up
        front, so a client can refuse it before reading.
        """
        if size < 0:
            raise ValueError("size must be >= 0")
        return cls("huge", size=size, lying_length=lying_length)

    @classmethod
    def raw(cls, body: str | bytes, *, code: int = 200,
            content_type: str = "application/json") -> Step:
        """Exactly this body, e.g. a completion envelope of the wrong shape."""
        return cls("raw", code=code, body=body, content_type=content_type)

    # -- wire form (CLI and admin API) ----------------------------------------------

    @classmethod
    def parse(cls, spec: Step | str | Mapping[str, Any]) -> Step:
        """A step from its short text form, its JSON object form, or a step.

        Text forms: ``ok``, ``503``, ``429:2`` (status with Retry-After), ``503:date+2``,
        ``status:503``, ``status:503:2``, ``hang``, ``hang:5``, ``reset``, ``truncated``,
        ``truncated:length``, ``malformed``, ``wrong_shape``, ``slow_body:2``,
        ``not_json_content``, ``huge:1000000`` (bytes), ``huge:1000000:length``,
        ``redirect:307`` (to the fake's own ``/redirected`` route). Object form: the dataclass fields, e.g.
        ``{"kind": "status", "code": 503, "retry_after": "1"}``.
        """
        if isinstance(spec, Step):
            return spec
        if isinstance(spec, Mapping):
            unknown = set(spec) - set(_STEP_FIELDS)
            if unknown:
                raise ValueError(f"unknown step fields {sorted(unknown)}; use {list(_STEP_FIELDS)}")
            if "kind" not in spec:
                raise ValueError("a step object needs a 'kind'")
            return cls(**dict(spec))
        return cls._parse_text(spec)

    @classmethod
    def _parse_text(cls, text: str) -> Step:
        name, *args = [part.strip() for part in text.strip().split(":")]
        if name.isdigit():
            name, args = "status", [name, *args]
        try:
            if name == "status" and 1 <= len(args) <= 2:
                return cls.status(int(args[0]), retry_after=args[1] if len(args) == 2 else None)
            if name in ("hang", "slow_body") and len(args) <= 1:
                make = cls.hang if name == "hang" else cls.slow_body
                return make(float(args[0])) if args else make()
            if name == "huge" and len(args) in (1, 2) and args[1:] in ([], ["length"]):
                return cls.huge(int(args[0]), lying_length=len(args) == 2)
            if name == "redirect" and len(args) <= 1:
                return cls.redirect("/redirected", int(args[0]) if args else 307)
            if name == "truncated" and args in ([], ["length"]):
                return cls.truncated(lying_length=bool(args))
            simple: dict[str, Callable[[], Step]] = {
                "ok": cls.ok, "reset": cls.reset, "malformed": cls.malformed,
                "wrong_shape": cls.wrong_shape, "not_json_content": cls.not_json_content,
            }
            if name in simple and not args:
                return simple[name]()
        except ValueError as exc:
            raise ValueError(f"bad step {text!r}: {exc}") from None
        raise ValueError(f"bad step {text!r}; see Step.parse for the forms")

    def to_json(self) -> dict[str, Any]:
        """The object form accepted by :meth:`parse` (and the admin API)."""
        out: dict[str, Any] = {"kind": self.kind}
        defaults = Step()
        for name in _STEP_FIELDS[1:]:
            value = getattr(self, name)
            if value != getattr(defaults, name):
                out[name] = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        return out


def parse_script(text: str) -> list[Step]:
    """Steps from ``"503,503:1,ok"`` or from a JSON array of step forms."""
    text = text.strip()
    if not text:
        return []
    if text.startswith("["):
        items = json.loads(text)
        if not isinstance(items, list):
            raise ValueError("a JSON script must be an array of steps")
        return [Step.parse(item) for item in items]
    return [Step.parse(part) for part in text.split(",") if part.strip()]


def http_date(delay_s: float) -> str:
    """The HTTP-date ``delay_s`` seconds from now, for ``Retry-After``."""
    return email.utils.formatdate(time.time() + delay_s, usegmt=True)


def _retry_after_text(value: str | float) -> str:
    if isinstance(value, str):
        return value
    return str(int(value)) if float(value).is_integer() else str(value)


def _render_retry_after(value: str) -> str:
    match = re.fullmatch(r"date\+(\d+(?:\.\d+)?)", value)
    return http_date(float(match.group(1))) if match else value


# -- the default responder ---------------------------------------------------------------

_SECTION = re.compile(r"^([A-Za-z][A-Za-z ]*):\s*$")
_LINE = re.compile(r"^([^\s:][^:]{0,63}):\s?(.*)$")
_INTRO = r"\b(?:i am|i'm|im|this is|my name is|it's|here is)\s+{name}\b"


def _messages(body: Mapping[str, Any]) -> tuple[str, str]:
    system: list[str] = []
    user: list[str] = []
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else []:
        if not isinstance(message, Mapping) or not isinstance(message.get("content"), str):
            continue
        (system if message.get("role") == "system" else user).append(message["content"])
    return "\n".join(system), "\n".join(user)


def _sections(user: str) -> dict[str, list[str]]:
    """Lines of the prompt grouped under ``Header:`` lines (lower-cased)."""
    sections: dict[str, list[str]] = {}
    current = ""
    for line in user.splitlines():
        header = _SECTION.match(line)
        if header:
            current = header.group(1).strip().lower()
            sections.setdefault(current, [])
        elif line.strip():
            sections.setdefault(current, []).append(line)
    return sections


def _transcript(sections: Mapping[str, list[str]]) -> list[tuple[str, str]]:
    lines = []
    for line in sections.get("transcript", []):
        match = _LINE.match(line)
        if match:
            lines.append((match.group(1).strip(), match.group(2).strip()))
    return lines


def _bullets(lines: Iterable[str]) -> list[str]:
    return [line.strip()[2:].strip() for line in lines if line.strip().startswith("- ")]


def guess_mapping(participants: Sequence[str], transcript: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Labels to names: self-introductions first, then the rest in order of appearance."""
    labels = list(dict.fromkeys(label for label, _ in transcript))
    mapping: dict[str, str] = {}
    for label, text in transcript:
        if label in mapping:
            continue
        for name in participants:
            if name not in mapping.values() and re.search(
                    _INTRO.format(name=re.escape(name)), text, re.IGNORECASE):
                mapping[label] = name
                break
    free = [name for name in participants if name not in mapping.values()]
    for label in labels:
        if label not in mapping and free:
            mapping[label] = free.pop(0)
    return mapping


def default_responder(body: Mapping[str, Any]) -> Any:
    """Plausible, deterministic replies, told apart by the task marker in the system prompt.

    ``task: resolve`` -> ``{"mapping": ...}`` from the ``Participants:`` bullets and the
    ``Transcript:`` lines of the user prompt; ``task: report`` -> summary, highlights
    and action items (lines with "will" or "todo"); anything else -> ``{"reply": "ok"}``.
    """
    system, user = _messages(body)
    sections = _sections(user)
    transcript = _transcript(sections)
    if "task: resolve" in system:
        return {"mapping": guess_mapping(_bullets(sections.get("participants", [])), transcript)}
    if "task: report" in system:
        speakers = list(dict.fromkeys(label for label, _ in transcript))
        return {
            "summary": f"A conversation between {', '.join(speakers) or 'nobody'} "
                       f"in {len(transcript)} lines.",
            "highlights": [text for _, text in transcript[:2]],
            "action_items": [
                {"owner": label, "text": text} for label, text in transcript
                if re.search(r"\b(will|todo)\b", text, re.IGNORECASE)
            ],
        }
    return {"reply": "ok"}


# -- the server --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """A request the fake received on the completions route, and the step it played."""

    attempt: int
    method: str
    path: str
    headers: CIMultiDictProxy[str]
    json: Any
    raw: bytes
    step: Step
    received_at: float  # time.monotonic()

    @property
    def system_prompt(self) -> str:
        return _messages(self.json if isinstance(self.json, Mapping) else {})[0]

    @property
    def user_prompt(self) -> str:
        return _messages(self.json if isinstance(self.json, Mapping) else {})[1]

    def to_json(self) -> dict[str, Any]:
        return {"attempt": self.attempt, "method": self.method, "path": self.path,
                "headers": dict(self.headers), "json": self.json, "step": self.step.to_json(),
                "received_at": self.received_at}


class FakeUpstream:
    """The fake upstream server; see the module docstring."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0,
                 responder: Responder | None = None, default: Step | str = "ok") -> None:
        self.host = host
        self.port = port
        self.responder: Responder = responder or default_responder
        self._initial_default = Step.parse(default)
        #: Played when the script is exhausted.
        self.default: Step = self._initial_default
        #: Requests received on the completions route (admin calls do not count).
        self.attempts = 0
        #: Requests that followed a redirect to the fake's own ``/redirected`` route.
        self.redirected = 0
        self.requests: list[ReceivedRequest] = []
        self._script: deque[Step] = deque()
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()

    # -- control --------------------------------------------------------------------

    @property
    def origin(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What an OpenAI client's ``base_url`` should be."""
        return f"{self.origin}/v1"

    @property
    def pending(self) -> list[Step]:
        """Scripted steps not yet played."""
        return list(self._script)

    def script(self, *steps: Step | str | Mapping[str, Any]) -> None:
        """Queue steps, played one per request in order; then :attr:`default` is played."""
        self._script.extend(Step.parse(step) for step in steps)

    def reset(self) -> None:
        """Forget the script, the count and the recorded requests; restore the default."""
        self._script.clear()
        self.attempts = 0
        self.redirected = 0
        self.requests.clear()
        self.default = self._initial_default

    async def wait_for_attempts(self, n: int, within_s: float = 5.0) -> None:
        """Wait until at least ``n`` requests have arrived (e.g. one is now hanging)."""
        deadline = time.monotonic() + within_s
        while self.attempts < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fake upstream saw {self.attempts} attempts, wanted {n}")
            await asyncio.sleep(0.005)

    # -- lifecycle ------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        for path in ("/v1/chat/completions", "/chat/completions"):
            app.router.add_post(path, self._completions)
        app.router.add_post("/redirected", self._redirected)
        app.router.add_post("/_admin/script", self._admin_script)
        app.router.add_post("/_admin/default", self._admin_default)
        app.router.add_get("/_admin/stats", self._admin_stats)
        app.router.add_get("/_admin/requests", self._admin_requests)
        app.router.add_post("/_admin/reset", self._admin_reset)
        return app

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("FakeUpstream is already started")
        self._closing = asyncio.Event()
        # handler_cancellation: a client that gives up on a hung request ends its handler.
        runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True,
                               shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        self._runner = runner
        self.port = int(runner.addresses[0][1])  # the bound port, when asked for port 0

    async def stop(self) -> None:
        if self._runner is None:
            return
        self._closing.set()  # hung and dribbling handlers give up at once
        runner, self._runner = self._runner, None
        await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    async def _redirected(self, request: web.Request) -> web.Response:
        await request.read()
        self.redirected += 1
        return self._json(self._completion({}, {"mapping": {}}))

    # -- the completions route ------------------------------------------------------

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        self.attempts += 1
        step = self._script.popleft() if self._script else self.default
        self.requests.append(ReceivedRequest(
            attempt=self.attempts, method=request.method, path=request.path,
            headers=CIMultiDictProxy(CIMultiDict(request.headers)), json=body, raw=raw,
            step=step, received_at=time.monotonic()))
        return await self._play(step, request, body if isinstance(body, Mapping) else {})

    async def _play(self, step: Step, request: web.Request,
                    body: Mapping[str, Any]) -> web.StreamResponse:
        kind = step.kind
        if kind == "ok":
            return self._json(self._completion(body, self._content(step, body)))
        if kind == "status":
            return self._status(step)
        if kind == "hang":
            if await self._idle(step.seconds):
                self._abort(request)
                return web.Response(status=500)  # never sent: the connection is gone
            return self._json(self._completion(body, self._content(step, body)))
        if kind == "reset":
            self._abort(request)
            return web.Response(status=500)  # never sent: aiohttp drops the failed write
        if kind == "truncated":
            whole = _dumps(self._completion(body, self._content(step, body)))
            half = whole[: len(whole) // 2]
            if not step.lying_length:
                return web.Response(body=half, content_type="application/json")
            return await self._send_partial(request, whole, half)
        if kind == "malformed":
            return web.Response(body=b'{"id": "chatcmpl-fake", "choices": [{"message": oops}',
                                content_type="application/json")
        if kind == "wrong_shape":
            content = {"foo": 1} if step.content is None else step.content
            return self._json(self._completion(body, json.dumps(content)))  # always JSON
        if kind == "not_json_content":
            return self._json(self._completion(body, str(step.content or PROSE_CONTENT)))
        if kind == "slow_body":
            return await self._dribble(request, _dumps(self._completion(
                body, self._content(step, body))), step.seconds)
        if kind == "redirect":
            return web.Response(status=step.code, headers={"Location": step.location or "/"})
        if kind == "huge":
            return await self._huge(request, body, step)
        if kind == "raw":
            raw = step.body if isinstance(step.body, bytes) else (step.body or "").encode()
            return web.Response(status=step.code, body=raw,
                                content_type=step.content_type or "application/json")
        raise AssertionError(f"unplayable step {step!r}")

    def _content(self, step: Step, body: Mapping[str, Any]) -> Any:
        return self.responder(body) if step.content is None else step.content

    def _completion(self, body: Mapping[str, Any], content: Any) -> dict[str, Any]:
        text = content if isinstance(content, str) else json.dumps(content)
        model = body.get("model")
        return {
            "id": f"chatcmpl-fake-{self.attempts}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model if isinstance(model, str) else "fake-model",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }

    def _json(self, payload: Any) -> web.Response:
        return web.Response(body=_dumps(payload), content_type="application/json")

    def _status(self, step: Step) -> web.Response:
        headers = {"X-Internal-Node": f"worker-7@{self.host}:{self.port} ({INTERNAL_MARKER})"}
        if step.retry_after is not None:
            headers["Retry-After"] = _render_retry_after(step.retry_after)
        if step.body is None:
            body: bytes = _dumps({"error": {
                "message": f"upstream internal error at {self.host}:{self.port}: worker crashed "
                           f"({INTERNAL_MARKER})",
                "type": "server_error",
                "code": step.code,
            }})
            content_type = "application/json"
        else:
            body = step.body if isinstance(step.body, bytes) else step.body.encode()
            content_type = step.content_type or _guess_type(body)
        return web.Response(status=step.code, body=body, headers=headers,
                            content_type=content_type)

    async def _idle(self, seconds: float) -> bool:
        """Sleep ``seconds``; True if the server is shutting down meanwhile."""
        try:
            await asyncio.wait_for(self._closing.wait(), timeout=seconds)
        except TimeoutError:
            return False
        return True

    def _abort(self, request: web.Request) -> None:
        """Reset the connection; whatever the handler returns after this is never sent."""
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                # SO_LINGER 0: close() sends RST instead of FIN: a reset, not a clean close.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()

    async def _send_partial(self, request: web.Request, whole: bytes,
                            part: bytes) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(whole)
        await response.prepare(request)
        await response.write(part)
        if request.transport is not None:
            request.transport.close()  # FIN after the bytes already sent
        return response

    async def _dribble(self, request: web.Request, whole: bytes,
                       seconds: float) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(whole)
        await response.prepare(request)
        chunks = max(1, min(len(whole), 20))
        size = -(-len(whole) // chunks)
        for i in range(0, len(whole), size):
            await response.write(whole[i:i + size])
            if await self._idle(seconds / chunks):
                self._abort(request)
                return response
        await response.write_eof()
        return response

    async def _huge(self, request: web.Request, body: Mapping[str, Any],
                    step: Step) -> web.StreamResponse:
        tail = _dumps(self._completion(body, self._content(step, body)))
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        if step.lying_length:
            response.content_length = step.size + len(tail)
        else:
            response.enable_chunked_encoding()
        await response.prepare(request)
        chunk = b" " * (256 * 1024)
        left = step.size
        try:
            while left > 0:
                await response.write(chunk[:left])
                left -= min(left, len(chunk))
            await response.write(tail)
            await response.write_eof()
        except (ConnectionResetError, ConnectionError):
            pass  # the client stopped reading: what a capped client does
        return response

    # -- the admin API --------------------------------------------------------------

    async def _admin_script(self, request: web.Request) -> web.Response:
        try:
            payload = await request.json()
            steps, default = payload, None
            if isinstance(payload, Mapping):
                steps, default = payload.get("steps", []), payload.get("default")
            if not isinstance(steps, list):
                raise TypeError("send a JSON array of steps, or {'steps': [...], 'default': step}")
            parsed = [Step.parse(item) for item in steps]
            new_default = None if default is None else Step.parse(default)
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        self._script.extend(parsed)
        if new_default is not None:
            self.default = new_default
        return web.json_response({"pending": len(self._script)})

    async def _admin_default(self, request: web.Request) -> web.Response:
        try:
            self.default = Step.parse(await request.json())
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"default": self.default.to_json()})

    async def _admin_stats(self, request: web.Request) -> web.Response:
        return web.json_response({"attempts": self.attempts, "redirected": self.redirected,
                                  "pending": len(self._script),
                                  "default": self.default.to_json()})

    async def _admin_requests(self, request: web.Request) -> web.Response:
        return web.json_response([r.to_json() for r in self.requests])

    async def _admin_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"attempts": 0})


def _dumps(payload: Any) -> bytes:
    return json.dumps(payload).encode()


def _guess_type(body: bytes) -> str:
    try:
        json.loads(body)
    except ValueError:
        return "text/plain"
    return "application/json"


# -- the separate process ----------------------------------------------------------------


class FakeUpstreamProcess:
    """The fake as a child process, driven over its admin API (synchronous).

    ``with FakeUpstreamProcess(script=["503", "ok"]) as fake: ...`` starts
    ``python tests/fake_upstream.py`` on a free port and stops it on exit.
    """

    def __init__(self, *, script: Sequence[Step | str] = (), default: Step | str = "ok",
                 host: str = "127.0.0.1", port: int = 0, start_timeout: float = 10.0) -> None:
        self.host = host
        self.port = port
        self._script = [Step.parse(s).to_json() for s in script]
        self._default = Step.parse(default).to_json()
        self._start_timeout = start_timeout
        self.proc: subprocess.Popen[str] | None = None

    @property
    def origin(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.origin}/v1"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--host", self.host, "--port", str(self.port),
             "--script", json.dumps(self._script), "--default", json.dumps(self._default)],
            stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], self._start_timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.stop()
            raise RuntimeError("the fake upstream process did not report ready")
        self.port = int(json.loads(line)["port"])

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _admin(self, method: str, path: str, payload: Any = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(f"{self.origin}/_admin/{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read())

    def script(self, *steps: Step | str) -> None:
        self._admin("POST", "script", [Step.parse(s).to_json() for s in steps])

    def set_default(self, step: Step | str) -> None:
        self._admin("POST", "default", Step.parse(step).to_json())

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self._admin("GET", "stats")
        return result

    @property
    def attempts(self) -> int:
        return int(self.stats()["attempts"])

    def requests(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._admin("GET", "requests")
        return result

    def reset(self) -> None:
        self._admin("POST", "reset", {})


async def _serve(host: str, port: int, script: list[Step], default: Step) -> None:
    fake = FakeUpstream(host=host, port=port, default=default)
    fake.script(*script)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with fake:
        print(json.dumps({"event": "fake_upstream.ready", "port": fake.port,
                          "base_url": fake.base_url}), flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A scriptable OpenAI-compatible fake upstream.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    parser.add_argument("--script", default="",
                        help="steps, e.g. '503,503:1,ok', or a JSON array of step objects")
    parser.add_argument("--default", default="ok",
                        help="the step once the script is exhausted (text or JSON object)")
    args = parser.parse_args(argv)
    try:
        script = parse_script(args.script)
        text = args.default.strip()
        default = Step.parse(json.loads(text) if text.startswith("{") else text)
    except ValueError as exc:
        parser.error(str(exc))
    asyncio.run(_serve(args.host, args.port, script, default))


if __name__ == "__main__":
    main()
