"""Entry point: ``python chaos/chaos.py [options]``; see ``--help``."""

import os
import sys

if not __package__:
    # Run as a script: import our packages from the repository root rather
    # than from chaos/ (where this file would shadow the chaos package).
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from counter_server.common.bootstrap import require_packages  # standard library only

require_packages("chaos.py")

from gevent import monkey  # noqa: E402

monkey.patch_all()

from chaos.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
