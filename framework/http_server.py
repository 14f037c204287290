"""The connection layer under the app: slow heads, parser refusals and request bodies.

aiohttp's own connection handler is kept; this module adjusts three things that no
middleware can reach, because they happen before a request exists:

* **Slow heads.** A connection that has not sent a complete request head within
  ``server.header_timeout_s`` is closed (slowloris: thousands of connections each
  holding half a head). One timer per connection, armed when it opens and again when
  bytes of a new head start arriving while it is idle; cancelled when the head is
  complete. No work per request beyond two attribute reads.
* **Parser refusals** (a malformed request line or header, an oversized head) are
  answered with a problem+json body like every other error, without echoing the
  client's bytes and without aiohttp's traceback on stderr.
* **Compressed bodies are never inflated by the server** (``auto_decompress=False``):
  the request path refuses ``Content-Encoding`` other than ``identity`` with 415
  (:func:`ballast.problems.read_json`), so a small gzip bomb costs only the bytes it
  sends, not gigabytes of inflation after the answer.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from ballast.problems import PROBLEM_CONTENT_TYPE, generic

#: The ``Server`` header on every response: a name, no versions.
SERVER_NAME = "ballast"
#: An idle keep-alive connection (no bytes since its last response) is closed after this.
#: aiohttp's handler default is an hour; 75 s is what ``web.run_app`` and nginx use.
KEEPALIVE_TIMEOUT_S = 75.0


class HeadTimeoutHandler(RequestHandler):
    """aiohttp's request handler plus a deadline for each request head."""

    # aiohttp's handler uses __slots__; a subclass without them gets a __dict__, so the
    # attributes below need no declaration.
    head_timeout_s: float = 10.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        self._head_count = self._request_count
        self._head_timer: asyncio.TimerHandle | None = self._loop.call_later(
            self.head_timeout_s, self._head_timed_out)

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        super().data_received(data)
        timer = self._head_timer
        if self._request_count != before:
            # A head is complete: its deadline is met.
            if timer is not None:
                timer.cancel()
                self._head_timer = None
        elif timer is None and self._current_request is None and not self._messages:
            # Idle, and bytes arrived that do not complete a head: a new head has begun.
            self._arm_head_timer()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._request_count == self._head_count and self._current_request is None \
                and not self._messages and self.transport is not None:
            self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status == 500:
            # A handler crashed outside every middleware: aiohttp's own path logs it.
            resp = super().handle_error(request, status, exc, message)
            resp.headers["Server"] = SERVER_NAME
            return resp
        if request.writer.output_size > 0:
            raise ConnectionError("Response is sent already")
        # Parser refusals: the status and generic text only. The exception text quotes
        # the client's raw bytes (which may hold an Authorization header), so it is
        # neither logged nor echoed.
        title, detail = generic(status)
        rid = secrets.token_hex(16)
        body = {"type": "about:blank", "title": title, "status": status, "detail": detail,
                "request_id": rid}
        resp = web.Response(status=status, body=orjson.dumps(body), content_type=PROBLEM_CONTENT_TYPE,
                            headers={"Server": SERVER_NAME, "X-Content-Type-Options": "nosniff",
                                     "X-Request-ID": rid})
        resp.force_close()
        return resp


class BallastServer(Server):
    """aiohttp's low-level server, making :class:`HeadTimeoutHandler` connections."""

    head_timeout_s: float = 10.0

    def __call__(self) -> RequestHandler:
        handler = HeadTimeoutHandler(self, loop=self._loop, **self._kwargs)
        handler.head_timeout_s = self.head_timeout_s
        return handler


class BallastAppRunner(web.AppRunner):
    """``web.AppRunner`` whose connections have a head deadline and never inflate bodies."""

    def __init__(self, app: web.Application, *, header_timeout_s: float, **kwargs: Any) -> None:
        kwargs.setdefault("auto_decompress", False)
        kwargs.setdefault("keepalive_timeout", KEEPALIVE_TIMEOUT_S)
        super().__init__(app, **kwargs)
        self._header_timeout_s = header_timeout_s

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        server.__class__ = BallastServer
        server.head_timeout_s = self._header_timeout_s  # type: ignore[attr-defined]
        return server


__all__ = ["KEEPALIVE_TIMEOUT_S", "SERVER_NAME", "BallastAppRunner", "BallastServer", "HeadTimeoutHandler"]
