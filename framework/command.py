"""The ``ballast`` console command.

``ballast logs ...`` is handed straight to :mod:`ballast.logs.cli`, so reading a log does
not first import the server (aiohttp, pydantic, the plugins): about 0.2 s less per run.
Every other command goes to :func:`ballast.cli.main`.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["logs"]:
        from ballast.logs.cli import main as logs_main

        return logs_main(args[1:])
    from ballast.cli import main as cli_main

    return cli_main(args)
