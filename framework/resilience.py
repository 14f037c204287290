"""Shared, cross-call state per upstream: the one home of what outage protection remembers.

Round one's protections decided per call: each call retried on its own, so a hard-down
upstream received three attempts for every call, exactly when it could least take
them. Protections that remember (a circuit breaker, a retry budget, a shared
``Retry-After`` cooldown) need state shared by every call to one upstream. That state
lives here, in one :class:`UpstreamRegistry` per app, keyed by upstream (the provider's
public name plus the host it is reached at), as resilience4j's
``CircuitBreakerRegistry`` or Envoy's per-cluster breakers keep theirs: never in module
globals, so two apps (or two tests) never share a breaker.

The registry is handed to the build hooks of the outbound path
(``ballast_upstream_call``, ``ballast_upstream_attempt_wrappers``) as ``upstreams`` and
is reachable at run time as ``app[UPSTREAM].registry``. A plugin keeps its own objects
in an upstream's :class:`UpstreamState` under a name of its own (:meth:`UpstreamState.slot`);
the state also holds the cooldown (``cooldown_until``), which one plugin writes and
others may read.

Every time read here comes from the registry's ``clock`` (``time.monotonic`` unless a
test gives a fake one), so state machines built on it can be tested without sleeping.

An attempt that a protection refuses before it is sent raises :class:`UpstreamRefused`:
it was never sent, is never retried, and reaches the client as 503 with
``Retry-After`` (the call that itself received the upstream's failure ends as before,
502 on resolve).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from yarl import URL

from ballast.errors import UpstreamError

#: Seconds on a monotonic clock.
Clock = Callable[[], float]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class UpstreamKey:
    """Which upstream: ``label`` is public (logs, metrics); ``host`` never leaves the process."""

    label: str
    host: str


def host_of(url: str) -> str:
    """``host:port`` of ``url`` (empty if it has none): the private half of a key."""
    try:
        parsed = URL(url)
    except (TypeError, ValueError):
        return ""
    return f"{parsed.host or ''}:{parsed.port or ''}"


@dataclass(slots=True)
class UpstreamState:
    """What every call to one upstream shares. Plugins add theirs with :meth:`slot`."""

    key: UpstreamKey
    clock: Clock
    #: Until this point on ``clock`` no attempt may be sent (a shared ``Retry-After``).
    cooldown_until: float = 0.0
    _slots: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.key.label

    def slot(self, name: str, factory: Callable[[UpstreamState], T]) -> T:
        """The object stored under ``name``, made by ``factory(self)`` on first use.

        Names are the owning plugin's name plus a noun (``"circuit_breaker"``,
        ``"retry.budget"``), so plugins do not collide.
        """
        try:
            value: T = self._slots[name]
        except KeyError:
            value = self._slots[name] = factory(self)
        return value

    def peek(self, name: str) -> Any:
        """The object under ``name`` if one was made, else ``None`` (never creates)."""
        return self._slots.get(name)

    def cooldown_left(self) -> float:
        """Seconds until the cooldown ends (0 when none is in force)."""
        return max(self.cooldown_until - self.clock(), 0.0)

    def cool_down(self, seconds: float) -> None:
        """Pause every caller for ``seconds`` from now; a longer pause in force wins."""
        self.cooldown_until = max(self.cooldown_until, self.clock() + max(seconds, 0.0))


class UpstreamRegistry:
    """One per app: the :class:`UpstreamState` of each upstream, made on first use."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self._states: dict[UpstreamKey, UpstreamState] = {}

    def get(self, label: str, host: str = "") -> UpstreamState:
        key = UpstreamKey(label, host)
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = UpstreamState(key, self.clock)
        return state

    def for_url(self, label: str, url: str) -> UpstreamState:
        """The state of the upstream ``label`` reached at ``url``'s host."""
        return self.get(label, host_of(url))

    def __iter__(self) -> Iterator[UpstreamState]:
        return iter(list(self._states.values()))

    def __len__(self) -> int:
        return len(self._states)


def retry_after_header(seconds: float) -> str:
    """Whole seconds for ``Retry-After``: rounded up, at least 1."""
    return str(max(1, math.ceil(seconds - 1e-9)))


class UpstreamRefused(UpstreamError):
    """An attempt refused locally (breaker open, cooldown): never sent, never retried.

    ``kind`` is a :class:`ballast.telemetry.Reason` (``circuit_open``, ``cooldown``);
    ``retry_after_s`` is when the refusal may lift. Public text is the generic
    upstream text; the status is 503 with ``Retry-After`` and the problem carries
    ``kind``.
    """

    status: ClassVar[int] = 503  # type: ignore[misc]

    def __init__(self, public_detail: str | None = None, *, kind: str, retry_after_s: float,
                 **kw: Any) -> None:
        kw.setdefault("headers", {})["Retry-After"] = retry_after_header(retry_after_s)
        kw.setdefault("extra", {})["kind"] = kind
        super().__init__(public_detail, kind=kind, attempts=0, **kw)
        self.retry_after_s = retry_after_s


def republished(error: UpstreamError, public_detail: str) -> UpstreamError:
    """``error`` with another public text, keeping its class, status, headers and kind.

    The session service words upstream failures for its own operations ("Speaker
    resolution temporarily unavailable") without losing a refusal's 503 and
    ``Retry-After``.
    """
    cls = type(error)
    out = cls.__new__(cls)  # no __init__: its signature differs between subclasses
    out.__dict__.update(error.__dict__)
    out.args = error.args
    out.public_detail = public_detail
    out.headers = dict(error.headers)
    out.extra = {**error.extra, "kind": error.kind}
    out.__cause__ = error
    return out


__all__ = [
    "Clock",
    "UpstreamKey",
    "UpstreamRefused",
    "UpstreamRegistry",
    "UpstreamState",
    "host_of",
    "republished",
    "retry_after_header",
]
