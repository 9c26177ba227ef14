"""A complete ssepg server: ``python examples/server.py [--port 8080]``.

It also serves a live page at ``/`` (``examples/static/index.html``, plain
HTML and JavaScript): pick topics, watch their events arrive over one
``EventSource``, publish from a form. Restart the server and the page
reconnects by itself, shows a reset notice where events may have been missed,
then live events again.

With ``DATABASE_URL`` set it fans out through Postgres (run several, on
different ports, to see events cross instances); without it, it runs on the
in-process broker. Every option of ``python -m ssepg --help`` applies.
"""

import os
import sys

from ssepg.server import main, page_routes

STATIC_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")

if __name__ == "__main__":
    sys.exit(
        main(
            prog="examples/server.py",
            extra_routes=lambda service: page_routes(service, STATIC_PATH),
        )
    )
