"""Helpers shared by the server and client command lines (no protocol, no I/O)."""

from counter_server import one_name

one_name(__name__, "counter_server.common")  # before anything else

# Both also in pyproject.toml (a test keeps them equal); --version prints them.
DISTRIBUTION = "counter-server"
__version__ = "0.3.0"
