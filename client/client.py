"""Entry point: ``python client/client.py [options]``; see ``--help``."""

import os
import sys

if not __package__:
    # Run as a script: import our packages from the repository root rather
    # than from client/ (where this file would shadow the client package).
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from counter_server.common.bootstrap import patched_main  # standard library only

main = patched_main("client.py", "counter_server.client.cli")

if __name__ == "__main__":
    sys.exit(main())
