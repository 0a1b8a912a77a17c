"""The counter server: lifecycle, connection loop, counter store and the
operational features around them, each in its own module."""

if __name__ != "counter_server.server":  # one module, one name (docs/development.md)
    raise ImportError(f"import counter_server.server, not {__name__}")
