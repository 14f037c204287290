"""API keys: the keys file, and the in-memory table the ``auth`` plugin checks requests against.

A key is shown once, when it is created, and never stored: the keys file holds its
SHA-256 hash, tenant, scope and creation time (and, once revoked, the revocation time).
A request's key is hashed and looked up by that hash, so what decides is a dictionary
lookup on a digest the caller cannot steer, never a character-by-character comparison
with a stored secret; the one comparison that follows is ``hmac.compare_digest``.

The file is TOML, written atomically (a temporary file in the same directory, fsynced,
renamed over the old one) with mode 0600. A running server re-reads it when it changes
(checked by ``stat`` at most once a second), so a revocation takes effect within about
a second without a restart.

Not to be confused with :mod:`ballast.keys`, which holds the typed application keys.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from ballast.errors import ConfigError

Scope = Literal["read", "write", "admin"]
SCOPES: tuple[Scope, ...] = ("read", "write", "admin")
KEY_PREFIX = "bk_"
TENANT_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
_TENANT = re.compile(TENANT_PATTERN)
_KEY_ID = re.compile(r"^[a-z0-9_]{1,32}$")
_HASH = re.compile(r"^[0-9a-f]{64}$")
#: Longest Authorization value worth hashing: a real key is 46 characters.
MAX_KEY_LENGTH = 256
#: The keys file is checked for changes at most this often (seconds).
RELOAD_CHECK_S = 1.0


def digest(key: str) -> str:
    """The stored form of a key: its SHA-256, as 64 hex digits."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def new_key() -> str:
    """``bk_`` + 43 url-safe characters (32 random bytes)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One key as the keys file holds it (no key, only its hash)."""

    id: str
    hash: str
    tenant: str
    scope: Scope
    created: str
    revoked: str | None = None

    def public(self) -> dict[str, str | None]:
        """What ``ballast keys list`` shows: everything but the hash."""
        return {"id": self.id, "tenant": self.tenant, "scope": self.scope,
                "created": self.created, "revoked": self.revoked}


# ------------------------------------------------------------------------------ the file


def read_keys(path: Path) -> list[KeyRecord]:
    """Every record in the keys file; a missing file holds none.

    Raises :class:`ConfigError` naming the file and the entry for anything malformed.
    """
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        return []
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    table = data.get("keys", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [keys] must be a table of [keys.<id>] entries")
    records = []
    for kid, entry in table.items():
        where = f"{path}: keys.{kid}"
        if not _KEY_ID.match(kid) or not isinstance(entry, dict):
            raise ConfigError(f"{where}: malformed entry")
        h, tenant, scope = entry.get("hash"), entry.get("tenant"), entry.get("scope")
        created, revoked = entry.get("created", ""), entry.get("revoked")
        if not isinstance(h, str) or not _HASH.match(h):
            raise ConfigError(f"{where}.hash: must be 64 lowercase hex digits (a SHA-256)")
        if not isinstance(tenant, str) or not _TENANT.match(tenant):
            raise ConfigError(f"{where}.tenant: must match {TENANT_PATTERN}")
        if scope not in SCOPES:
            raise ConfigError(f"{where}.scope: must be one of {', '.join(SCOPES)}")
        if not isinstance(created, str) or (revoked is not None and not isinstance(revoked, str)):
            raise ConfigError(f"{where}: created and revoked must be strings")
        records.append(KeyRecord(kid, h, tenant, scope, created, revoked))
    return records


def _toml_str(value: str) -> str:
    # A JSON string literal is a valid TOML basic string for the characters we write.
    return json.dumps(value, ensure_ascii=True)


def write_keys(path: Path, records: list[KeyRecord]) -> None:
    """Replace the keys file atomically; the new file is 0600 from its first byte."""
    lines = ["# Ballast API keys: SHA-256 hashes only, never the keys themselves.",
             "# Managed with `ballast keys create | list | revoke`.", ""]
    for r in records:
        lines.append(f"[keys.{r.id}]")
        lines.append(f"hash = {_toml_str(r.hash)}")
        lines.append(f"tenant = {_toml_str(r.tenant)}")
        lines.append(f"scope = {_toml_str(r.scope)}")
        lines.append(f"created = {_toml_str(r.created)}")
        if r.revoked is not None:
            lines.append(f"revoked = {_toml_str(r.revoked)}")
        lines.append("")
    data = "\n".join(lines).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp creates the file with mode 0600.
    fd, tmp = tempfile.mkstemp(prefix=".keys-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def _editing(path: Path) -> Iterator[None]:
    """Serialise read-modify-write of the keys file between concurrent ``keys`` commands.

    The lock is a sidecar file (``<keys file>.lock``): the keys file itself is replaced
    on every write, so a lock on it would not be held on the new one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def create_key(path: Path, tenant: str, scope: Scope = "write") -> tuple[KeyRecord, str]:
    """Add a new key to the file; returns its record and the key (shown once)."""
    if not _TENANT.match(tenant):
        raise ConfigError(f"--tenant: must match {TENANT_PATTERN}")
    if scope not in SCOPES:
        raise ConfigError(f"--scope: must be one of {', '.join(SCOPES)}")
    with _editing(path):
        records = read_keys(path)
        taken = {r.id for r in records}
        kid = "k_" + secrets.token_hex(6)
        while kid in taken:
            kid = "k_" + secrets.token_hex(6)
        key = new_key()
        record = KeyRecord(kid, digest(key), tenant, scope, _now_iso())
        write_keys(path, [*records, record])
    return record, key


def revoke_key(path: Path, key_id: str) -> KeyRecord:
    """Mark a key revoked (kept in the file, so ``keys list`` still shows it)."""
    with _editing(path):
        records = read_keys(path)
        for i, r in enumerate(records):
            if r.id == key_id:
                if r.revoked is None:
                    records[i] = replace(r, revoked=_now_iso())
                    write_keys(path, records)
                return records[i]
    raise KeyError(key_id)


# ------------------------------------------------------------------------------ the live table


@dataclass(frozen=True, slots=True)
class Lookup:
    """The outcome of checking one presented key."""

    record: KeyRecord | None
    reason: Literal["ok", "unknown", "revoked"]


class KeyTable:
    """The keys a server accepts, re-read from the file when it changes.

    ``clock`` is injectable so tests can move time without sleeping. Reloading happens
    on the caller's thread (the event loop); the file is small and read only after a
    ``stat`` says it changed, at most once per :data:`RELOAD_CHECK_S`.
    """

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.monotonic,
                 on_reload: Callable[[int], None] | None = None,
                 on_error: Callable[[str], None] | None = None) -> None:
        self.path = path
        self._clock = clock
        self._on_reload = on_reload
        self._on_error = on_error
        self._by_hash: dict[str, KeyRecord] = {}
        self._signature: tuple[int, int, int] | None = None
        self._checked = float("-inf")
        self.refresh(force=True)

    def __len__(self) -> int:
        return len(self._by_hash)

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def refresh(self, *, force: bool = False) -> None:
        """Re-read the file if it changed; at most one ``stat`` per second unless forced."""
        now = self._clock()
        if not force and now - self._checked < RELOAD_CHECK_S:
            return
        self._checked = now
        signature = self._stat()
        if signature == self._signature and not force:
            return
        try:
            records = read_keys(self.path)
        except (ConfigError, OSError) as exc:
            # Keep serving with the keys we had; a half-edited file must not open or
            # close the door. The message names the file and entry, never a key.
            if self._on_error is not None:
                self._on_error(str(exc) if isinstance(exc, ConfigError) else type(exc).__name__)
            self._signature = signature
            return
        self._by_hash = {r.hash: r for r in records}
        self._signature = signature
        if self._on_reload is not None:
            self._on_reload(len(records))

    def lookup(self, key: str) -> Lookup:
        """Check a presented key: hash it, look the digest up, confirm in constant time."""
        self.refresh()
        presented = digest(key)
        record = self._by_hash.get(presented)
        if record is None or not hmac.compare_digest(record.hash, presented):
            return Lookup(None, "unknown")
        if record.revoked is not None:
            return Lookup(record, "revoked")
        return Lookup(record, "ok")


__all__ = ["KEY_PREFIX", "SCOPES", "KeyRecord", "KeyTable", "Lookup", "Scope", "create_key",
           "digest", "new_key", "read_keys", "revoke_key", "write_keys"]
