"""Entry point: ``python chaos/chaos.py [options]``; see ``--help``."""

from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
import sys  # noqa: E402

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from chaos.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
