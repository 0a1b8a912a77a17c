"""Helpers shared by the server and client command lines (no protocol, no I/O)."""
