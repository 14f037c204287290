"""`ballast keys create | list | revoke` and the secure default of `ballast serve`."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from support import free_port, run_cli

from ballast.cli import exposure_refusal, is_loopback
from ballast.config import load_settings
from ballast.plugin_manager import load_plugins

# ------------------------------------------------------------------------------ keys


def test_create_prints_the_key_once_and_stores_its_hash(tmp_path: Path) -> None:
    keys_file = tmp_path / "var" / "keys.toml"
    result = run_cli("keys", "create", "--tenant", "acme", "--keys-file", str(keys_file))
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(":", 1) for line in result.stdout.strip().splitlines())
    key = fields["key"].strip()
    assert key.startswith("bk_") and len(key) >= 35
    assert fields["scope"].strip() == "write" and fields["tenant"].strip() == "acme"
    text = keys_file.read_text()
    assert key not in text and key[3:] not in text
    assert keys_file.stat().st_mode & 0o777 == 0o600
    left = [p.name for p in keys_file.parent.iterdir() if p.name not in ("keys.toml", "keys.toml.lock")]
    assert not left, f"temporary file left: {left}"


def test_list_and_revoke(tmp_path: Path) -> None:
    keys_file = str(tmp_path / "keys.toml")
    made = [json.loads(run_cli("keys", "create", "--tenant", t, "--scope", s, "--keys-file", keys_file,
                               "--json").stdout) for t, s in (("a", "read"), ("b", "admin"))]
    listed = run_cli("keys", "list", "--keys-file", keys_file, "--json")
    rows = json.loads(listed.stdout)
    assert [(r["id"], r["tenant"], r["scope"], r["revoked"]) for r in rows] == [
        (made[0]["id"], "a", "read", None), (made[1]["id"], "b", "admin", None)]
    assert all(m["key"] not in listed.stdout for m in made)
    assert run_cli("keys", "revoke", made[0]["id"], "--keys-file", keys_file).returncode == 0
    rows = json.loads(run_cli("keys", "list", "--keys-file", keys_file, "--json").stdout)
    assert rows[0]["revoked"] and rows[1]["revoked"] is None
    text = run_cli("keys", "list", "--keys-file", keys_file)
    assert text.returncode == 0 and made[0]["id"] in text.stdout and made[1]["key"] not in text.stdout
    missing = run_cli("keys", "revoke", "k_nope", "--keys-file", keys_file)
    assert missing.returncode == 1 and "k_nope" in missing.stderr


def test_keys_file_from_the_config(tmp_path: Path) -> None:
    keys_file = tmp_path / "from-config.toml"
    config = tmp_path / "c.toml"
    config.write_text(f'[plugins.auth]\nkeys_file = "{keys_file}"\n')
    assert run_cli("keys", "create", "--tenant", "acme", "--config", str(config)).returncode == 0
    assert keys_file.exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--tenant", "no spaces"], "--tenant"),
    (["--tenant", "x" * 65], "--tenant"),
])
def test_bad_create_arguments_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    result = run_cli("keys", "create", *args, "--keys-file", str(tmp_path / "k.toml"))
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "k.toml").exists()


def test_a_broken_keys_file_is_named(tmp_path: Path) -> None:
    keys_file = tmp_path / "k.toml"
    keys_file.write_text('[keys.k_1]\nhash = "nothex"\ntenant = "a"\nscope = "read"\n')
    result = run_cli("keys", "list", "--keys-file", str(keys_file))
    assert result.returncode == 2 and "keys.k_1.hash" in result.stderr


# ------------------------------------------------------------------------------ secure default


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("", False), ("10.1.2.3", False), ("example.com", False),
])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(("env", "refused"), [
    ({}, True),
    ({"BALLAST__SERVER__ALLOW_UNAUTHENTICATED": "true"}, False),
    ({"BALLAST__PLUGINS__AUTH__ENABLED": "true"}, False),
    ({"BALLAST__SERVER__HOST": "127.0.0.1"}, False),
])
def test_exposure_refusal(env: dict[str, str], refused: bool) -> None:
    config = load_settings(environ={"BALLAST__SERVER__HOST": "0.0.0.0", **env})
    message = exposure_refusal(config, load_plugins(config))
    assert (message is not None) is refused
    if message:
        assert "server.allow_unauthenticated" in message


def test_serve_on_a_network_address_without_auth_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[storage]\npath = "{tmp_path / "b.db"}"\n')
    result = run_cli("serve", "--config", str(config), "--host", "0.0.0.0", "--port", str(free_port()),
                     timeout=30)
    assert result.returncode == 2
    assert "server.allow_unauthenticated" in result.stderr
    assert not (tmp_path / "b.db").exists(), "it refused before opening anything"


def test_serve_with_allow_unauthenticated_gets_past_the_guard(tmp_path: Path) -> None:
    """With the setting it goes on to listen. Test servers bind only to loopback, so the
    port is held on 127.0.0.1 first: binding 0.0.0.0 to it fails, which proves the
    guard let it through without ever listening on a network address."""
    config = tmp_path / "c.toml"
    config.write_text(f'[server]\nallow_unauthenticated = true\n[storage]\npath = "{tmp_path / "b.db"}"\n')
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_cli("serve", "--config", str(config), "--host", "0.0.0.0", "--port", str(port),
                         timeout=30)
    assert result.returncode == 1, result.stderr
    assert "cannot listen on 0.0.0.0" in result.stderr
    assert "allow_unauthenticated" not in result.stderr
    assert "Traceback" not in result.stderr
