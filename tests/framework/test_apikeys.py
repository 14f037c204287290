"""The keys file and the live key table: hashes only, atomic 0600 writes, reloads that
cost one ``stat`` a second, and a lookup decided by the digest, not by the key's bytes."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

import pytest

from ballast import apikeys
from ballast.apikeys import KeyTable, create_key, digest, read_keys, revoke_key, write_keys
from ballast.errors import ConfigError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_create_read_revoke_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "keys.toml"
    record, key = create_key(path, "acme", "read")
    assert key.startswith("bk_") and len(key) == 46
    assert record.hash == hashlib.sha256(key.encode()).hexdigest()
    assert read_keys(path) == [record]
    assert os.stat(path).st_mode & 0o777 == 0o600
    revoked = revoke_key(path, record.id)
    assert revoked.revoked is not None and read_keys(path) == [revoked]
    assert revoke_key(path, record.id) == revoked  # revoking twice changes nothing
    with pytest.raises(KeyError):
        revoke_key(path, "k_missing")


def test_concurrent_edits_lose_no_key(tmp_path: Path) -> None:
    """Several `keys create` at once (threads here, processes in the CLI test) keep all."""
    import threading

    path = tmp_path / "keys.toml"
    made: list[str] = []

    def create() -> None:
        for _ in range(5):
            made.append(create_key(path, "acme")[0].id)

    threads = [threading.Thread(target=create) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.id for r in read_keys(path)) == sorted(made) and len(made) == 30


def test_write_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    record, _ = create_key(path, "acme")
    inode = os.stat(path).st_ino
    write_keys(path, [record])
    assert os.stat(path).st_ino != inode, "written in place instead of renamed over"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.toml", "keys.toml.lock"]


@pytest.mark.parametrize(("text", "where"), [
    ("[keys\n", "not valid TOML"),
    ('keys = 3\n', "[keys]"),
    ('[keys."BAD ID"]\nhash = "0"\n', "keys.BAD ID"),
    (f'[keys.k_1]\nhash = "{"a" * 64}"\ntenant = "x y"\nscope = "read"\n', "keys.k_1.tenant"),
    (f'[keys.k_1]\nhash = "{"a" * 64}"\ntenant = "x"\nscope = "root"\n', "keys.k_1.scope"),
])
def test_malformed_files_name_the_entry(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="keys") as info:
        read_keys(path)
    assert where in str(info.value)


def test_lookup_outcomes(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    record, key = create_key(path, "acme")
    table = KeyTable(path)
    assert table.lookup(key).record == record and table.lookup(key).reason == "ok"
    assert table.lookup(key + "x").reason == "unknown"
    assert table.lookup("").reason == "unknown"
    revoke_key(path, record.id)
    table.refresh(force=True)
    found = table.lookup(key)
    assert found.reason == "revoked" and found.record is not None and found.record.id == record.id


def test_changes_are_picked_up_with_at_most_one_stat_a_second(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "keys.toml"
    record, key = create_key(path, "acme")
    clock = Clock()
    reloads: list[int] = []
    table = KeyTable(path, clock=clock, on_reload=reloads.append)
    stats = []
    real_stat = os.stat
    monkeypatch.setattr(apikeys.os, "stat",
                        lambda p, *a, **k: (p == path and stats.append(p)) or real_stat(p, *a, **k))
    for _ in range(1000):
        assert table.lookup(key).reason == "ok"
    assert stats == [], "stat on every request"
    revoke_key(path, record.id)
    assert table.lookup(key).reason == "ok"  # within the second: not yet seen
    clock.now += 1.0
    assert table.lookup(key).reason == "revoked"
    assert len(stats) == 1 and reloads == [1, 1]
    clock.now += 1.0
    table.lookup(key)
    assert len(stats) == 2 and reloads == [1, 1], "an unchanged file is not re-read"


def test_a_broken_edit_keeps_the_keys_in_force(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    _, key = create_key(path, "acme")
    clock = Clock()
    errors: list[str] = []
    table = KeyTable(path, clock=clock, on_error=errors.append)
    path.write_text("[keys\n")
    clock.now += 1.0
    assert table.lookup(key).reason == "ok"
    assert errors and "not valid TOML" in errors[0] and key not in errors[0]


def test_a_missing_file_accepts_no_key_until_it_appears(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    clock = Clock()
    table = KeyTable(path, clock=clock)
    assert len(table) == 0
    _, key = create_key(path, "acme")
    clock.now += 1.0
    assert table.lookup(key).reason == "ok"


def test_the_digest_decides_and_the_confirmation_is_constant_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Why a wrong key's response time says nothing about the right one.

    A presented key is hashed first; the table is searched by the digest (a dict lookup
    on a value the caller cannot steer towards a stored digest), and the one comparison
    with stored material is ``hmac.compare_digest`` over two 64-character digests. So a
    wrong key sharing a long prefix with a real one and a wrong key of another length
    take the same path: one SHA-256, one dict miss, no comparison at all. The table
    never holds a key, so no code path could compare one byte by byte.
    """
    path = tmp_path / "keys.toml"
    record, key = create_key(path, "acme")
    table = KeyTable(path)
    digests: list[str] = []
    compares: list[tuple[str, str]] = []
    real_digest, real_compare = apikeys.digest, hmac.compare_digest
    monkeypatch.setattr(apikeys, "digest", lambda k: digests.append(k) or real_digest(k))
    monkeypatch.setattr(apikeys.hmac, "compare_digest",
                        lambda a, b: compares.append((a, b)) or real_compare(a, b))

    near_miss = key[:-1] + ("A" if key[-1] != "A" else "B")  # right prefix, right length
    other_length = key[:10]
    for wrong in (near_miss, other_length, "x" * 200):
        assert table.lookup(wrong).reason == "unknown"
    assert digests == [near_miss, other_length, "x" * 200]
    assert compares == [], "a wrong key must not reach a comparison"
    assert table.lookup(key).reason == "ok"
    assert compares == [(record.hash, digest(key))]
    assert all(len(a) == len(b) == 64 for a, b in compares)
    # Nothing in the table could be compared with a key: it holds digests only.
    assert key not in repr(vars(table)) and key not in path.read_text()
