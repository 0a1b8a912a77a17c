"""The counter server: lifecycle, connection loop, counter store and the
operational features around them, each in its own module."""

from counter_server import one_name

one_name(__name__, "counter_server.server")  # before anything else
