"""A complete ssepg server: ``python examples/server.py [--port 8080]``.

With ``DATABASE_URL`` set it fans out through Postgres (run several, on
different ports, to see events cross instances); without it, it runs on the
in-process broker. Every option of ``python -m ssepg --help`` applies.
"""

import sys

from ssepg.server import main

if __name__ == "__main__":
    sys.exit(main(prog="examples/server.py"))
