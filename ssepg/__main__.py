"""``python -m ssepg``: run a server (see `ssepg.server`)."""

import sys

from .server import main

sys.exit(main(prog="python -m ssepg"))
