"""Entry point: ``python server/server.py [options]``; see ``--help``."""

from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
import sys  # noqa: E402

if not __package__:
    # Run as a script: import our packages from the repository root rather
    # than from server/ (where this file would shadow the server package).
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from server.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
