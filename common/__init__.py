"""Helpers shared by the server and client command lines (no protocol, no I/O)."""

if __name__ != "counter_server.common":  # one module, one name (docs/development.md)
    raise ImportError(f"import counter_server.common, not {__name__}")

# Both also in pyproject.toml (a test keeps them equal); --version prints them.
DISTRIBUTION = "counter-server"
__version__ = "0.3.0"
