"""The ``ballast`` command: ``serve``, ``plugins``, ``config show|check``, ``keys`` and ``logs``.

Exit codes: 0 success, 1 runtime failure, 2 bad usage or invalid configuration (the
message names the offending key).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import signal
import sys
from typing import Any

import orjson

from ballast import logging as blog
from ballast.config import Config, load_settings, redact_url
from ballast.errors import ConfigError, PluginError, StoreError
from ballast.plugin_manager import Plugins, load_plugins

EXIT_CONFIG = 2


def _fail(message: str, code: int = EXIT_CONFIG) -> int:
    print(f"ballast: error: {message}", file=sys.stderr)
    return code


def _load(path: str | None) -> tuple[Config, Plugins]:
    config = load_settings(path)
    return config, load_plugins(config)


# ------------------------------------------------------------------------------ serve


async def _serve(config: Config, plugins: Plugins, *, worker: int | None = None) -> None:
    from aiohttp import web

    from ballast.app import build_app
    from ballast.http_server import BallastAppRunner
    from ballast.keys import STATE

    server = config.settings.server
    if worker is not None:
        # Every line of a `--workers N` worker says which one wrote it.
        blog.bind_process_fields(worker=worker)
    app = build_app(config, plugins)
    runner = BallastAppRunner(app, access_log=None, handle_signals=False,
                              shutdown_timeout=server.shutdown_timeout_s,
                              header_timeout_s=server.header_timeout_s)
    await runner.setup()
    # A worker of `--workers N` shares its port with its siblings (SO_REUSEPORT).
    site = web.TCPSite(runner, server.host, server.port, reuse_address=True,
                       reuse_port=True if worker is not None else None)
    await site.start()
    log = blog.get_logger("ballast.server")
    bound = runner.addresses[0] if runner.addresses else (server.host, server.port)
    log.info("server.started", host=bound[0], port=bound[1], config=config.source,
             plugins=[i.name for i in plugins.infos if i.enabled])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    received: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await stop.wait()
    finally:
        app[STATE]["draining"] = True
        log.info("server.stopping", signal=received[0] if received else None)
        # Stops listening, lets in-flight requests finish (up to shutdown_timeout),
        # then runs the cleanup contexts that close the store and clients.
        await runner.cleanup()
        log.info("server.stopped")


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        config = load_settings(args.config)
        if args.host is not None:
            config.settings.server.host = args.host
        if args.port is not None:
            config.settings.server.port = args.port
        if args.workers is not None:
            config.settings.server.workers = args.workers
        blog.configure(config.settings.logging.format, config.settings.logging.level)
        plugins = load_plugins(config)
    except (ConfigError, PluginError) as exc:
        return _fail(str(exc))
    except ValueError as exc:
        return _fail(f"server: {exc}")
    refusal = exposure_refusal(config, plugins)
    if refusal is not None:
        return _fail(refusal)
    server = config.settings.server
    if server.workers > 1 and args.worker_index is None:
        from ballast.workers import supervise

        try:
            return supervise(args.config, server.host, server.port, server.workers,
                             server.shutdown_timeout_s)
        except OSError as exc:
            return _fail(f"server: cannot listen on {server.host}:{server.port}: "
                         f"{exc.strerror or type(exc).__name__}", 1)
    try:
        with asyncio.Runner(loop_factory=_loop_factory(server.uvloop)) as runner:
            runner.run(_serve(config, plugins, worker=args.worker_index))
    except StoreError as exc:  # the database cannot be opened: say why, without a traceback
        return _fail(f"storage: {redact_url(exc.internal)}", 1)
    except OSError as exc:  # the address is taken or not ours to bind
        return _fail(f"server: cannot listen on {server.host}:{server.port}: "
                     f"{exc.strerror or type(exc).__name__}", 1)
    return 0


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses; any other name or address is not."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_refusal(config: Config, plugins: Plugins) -> str | None:
    """Why ``serve`` must not start open to a network, or None when it may start."""
    server = config.settings.server
    if is_loopback(server.host) or plugins.enabled("auth") or server.allow_unauthenticated:
        return None
    return (f"server.host {server.host!r} is reachable from other machines and the auth plugin "
            "is disabled: every session would be open to anyone. Enable it "
            "([plugins.auth] enabled = true, keys from `ballast keys create`), bind to "
            "127.0.0.1, or set server.allow_unauthenticated = true to serve without "
            "authentication on purpose.")


def _loop_factory(use_uvloop: bool) -> Any:
    """uvloop's event loop when wanted and installed, else the stdlib's (None)."""
    if not use_uvloop:
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


# ------------------------------------------------------------------------------ plugins / config


def cmd_plugins(args: argparse.Namespace) -> int:
    try:
        _, plugins = _load(args.config)
    except (ConfigError, PluginError) as exc:
        return _fail(str(exc))
    rows = [i.as_dict() for i in plugins.infos]
    if args.json:
        sys.stdout.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        state = "enabled " if r["enabled"] else "disabled"
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items() if k != "enabled")
        print(f"{r['name']:<{width}}  {state}  {r['source']:<10}  hooks: {', '.join(r['hooks'])}")
        if settings:
            print(f"{'':<{width}}  {settings}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    path = args.file if args.action == "check" else args.config
    try:
        config, _ = _load(path)
    except (ConfigError, PluginError) as exc:
        return _fail(str(exc))
    if args.action == "check":
        print(f"{config.source}: ok")
        return 0
    sys.stdout.write(orjson.dumps(config.as_dict(redact=True), option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


# ------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    from ballast.keys_cli import add_keys_parser
    from ballast.logs import add_logs_parser

    parser = argparse.ArgumentParser(prog="ballast", description="Ballast session service.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--config", help="TOML config file (default: config/default.toml)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int, metavar="N",
                       help="server processes sharing the port (default: server.workers)")
    # Set by the supervisor of --workers N on each worker it starts.
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    serve.set_defaults(func=cmd_serve)

    plugins = sub.add_parser("plugins", help="list plugins, their state and settings")
    plugins.add_argument("--config")
    plugins.add_argument("--json", action="store_true")
    plugins.set_defaults(func=cmd_plugins)

    config = sub.add_parser("config", help="show or check configuration")
    csub = config.add_subparsers(dest="action", required=True)
    show = csub.add_parser("show", help="effective config, secrets redacted")
    show.add_argument("--config")
    show.set_defaults(func=cmd_config)
    check = csub.add_parser("check", help="validate a config file")
    check.add_argument("file")
    check.set_defaults(func=cmd_config, config=None)

    add_keys_parser(sub)
    add_logs_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "logs":
        from ballast.logs import run_logs

        return run_logs(args)
    func: Any = args.func
    code: int = func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
