"""Helpers shared by the server and client command lines (no protocol, no I/O)."""

__version__ = "0.3.0"  # also in pyproject.toml (a test keeps them equal)
