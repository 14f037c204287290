"""``ballast keys create | list | revoke``: manage the API keys the ``auth`` plugin accepts.

The keys file is ``--keys-file`` when given, else ``plugins.auth.keys_file`` of the
config (``--config``, default ``config/default.toml``). A new key is printed once and
never stored; ``list`` shows ids, tenants, scopes and times, never a key or its hash.
A running server picks up changes within about a second.

Exit codes: 0 success, 1 no such key, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson

from ballast.apikeys import SCOPES, create_key, read_keys, revoke_key
from ballast.errors import ConfigError, PluginError

EXIT_CONFIG = 2
EXIT_NOT_FOUND = 1


def _fail(message: str, code: int = EXIT_CONFIG) -> int:
    print(f"ballast: error: {message}", file=sys.stderr)
    return code


def _keys_file(args: argparse.Namespace) -> Path:
    if args.keys_file:
        return Path(args.keys_file)
    from ballast.config import load_settings
    from ballast.plugin_manager import load_plugins

    config = load_settings(args.config)
    load_plugins(config)
    return Path(config.plugin("auth").keys_file)


def _print_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


def cmd_keys(args: argparse.Namespace) -> int:
    path = Path(args.keys_file or "keys file")
    try:
        path = _keys_file(args)
        if args.keys_action == "create":
            record, key = create_key(path, args.tenant, args.scope)
            if args.json:
                _print_json({"id": record.id, "key": key, "tenant": record.tenant, "scope": record.scope})
            else:
                print(f"id:     {record.id}\ntenant: {record.tenant}\nscope:  {record.scope}\nkey:    {key}")
                print("The key is shown only now; the keys file keeps its SHA-256 hash.", file=sys.stderr)
            return 0
        if args.keys_action == "list":
            rows = [r.public() for r in read_keys(path)]
            if args.json:
                _print_json(rows)
            elif not rows:
                print(f"no keys in {path}")
            else:
                print(f"{'id':<16} {'tenant':<20} {'scope':<6} {'created':<21} revoked")
                for r in rows:
                    print(f"{r['id']:<16} {r['tenant']:<20} {r['scope']:<6} {r['created']:<21} "
                          f"{r['revoked'] or '-'}")
            return 0
        try:
            record = revoke_key(path, args.key_id)
        except KeyError:
            return _fail(f"no key with id {args.key_id!r} in {path}", EXIT_NOT_FOUND)
        print(f"revoked {record.id} (tenant {record.tenant}) at {record.revoked}")
        return 0
    except (ConfigError, PluginError) as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"{path}: {exc.strerror or type(exc).__name__}", 1)


def add_keys_parser(sub: Any) -> None:
    keys = sub.add_parser("keys", help="create, list and revoke API keys (auth plugin)")
    ksub = keys.add_subparsers(dest="keys_action", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--keys-file", help="keys file (default: plugins.auth.keys_file of the config)")
        p.add_argument("--config", help="config file whose plugins.auth.keys_file to use")
        p.set_defaults(func=cmd_keys)

    create = ksub.add_parser("create", help="create a key and print it once")
    create.add_argument("--tenant", required=True)
    create.add_argument("--scope", choices=SCOPES, default="write")
    create.add_argument("--json", action="store_true")
    common(create)
    listing = ksub.add_parser("list", help="list keys (never the keys themselves)")
    listing.add_argument("--json", action="store_true")
    common(listing)
    revoke = ksub.add_parser("revoke", help="revoke a key by id; effective within 2 s")
    revoke.add_argument("key_id", metavar="ID")
    common(revoke)


__all__ = ["add_keys_parser", "cmd_keys"]
