"""``python -m ballast.logs summarize|trace ...``: the same as ``ballast logs``."""

import sys

from ballast.logs.cli import main

sys.exit(main())
