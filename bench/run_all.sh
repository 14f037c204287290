#!/bin/sh
# Run every benchmark; results in bench/results/ (see bench/README.md).
# Uses $PYTHON if set, else the python3 on PATH (the project must be installed in it).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
exec "${PYTHON:-python3}" "$here/run_all.py" "$@"
