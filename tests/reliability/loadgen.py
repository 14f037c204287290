"""A lean HTTP/1.1 keep-alive client on asyncio streams, for load generation.

A load generator on the same small machine as the server competes with it for CPU; a
general-purpose client (aiohttp's) spends about a millisecond of Python per request,
which at hundreds of connections throttles the client itself and shows up as server
latency (the server waits for bodies the client is too busy to send). This one writes
a prepared request in one call and parses only the status, the headers it is asked
for and a Content-Length body. Loopback use by tests and benchmarks only.
"""

from __future__ import annotations

import asyncio


class Conn:
    """One keep-alive connection; reconnects when the server closes it."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.connects = 0

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """Send one request; ``(status, lower-cased headers, body)``. Transport errors raise."""
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
            self.connects += 1
        assert self._reader is not None
        head = [f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"]
        if body:
            head.append(f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n")
        for k, v in (headers or {}).items():
            head.append(f"{k}: {v}\r\n")
        head.append("\r\n")
        try:
            self._writer.write("".join(head).encode() + body)
            raw = await self._reader.readuntil(b"\r\n\r\n")
            lines = raw.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            hdrs: dict[str, str] = {}
            for line in lines[1:]:
                if line:
                    k, _, v = line.partition(":")
                    hdrs[k.strip().lower()] = v.strip()
            payload = await self._reader.readexactly(int(hdrs.get("content-length", "0")))
        except BaseException:
            await self.close()
            raise
        if hdrs.get("connection", "").lower() == "close":
            await self.close()
        return status, hdrs, payload

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass
