"""server.errors: one family for everything the server raises, owned by one module."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import counter_server.server
from counter_server.server.errors import ConnectionEnded, ServerError, SetupError


def _server_modules():
    for info in pkgutil.walk_packages(counter_server.server.__path__, "counter_server.server."):
        if info.name.endswith(".server"):  # the entry script: monkey-patches on import
            continue
        yield importlib.import_module(info.name)


def test_every_exception_the_server_defines_is_a_server_error_in_one_module():
    defined = {
        (module.__name__, name)
        for module in _server_modules()
        for name, value in vars(module).items()
        if inspect.isclass(value)
        and issubclass(value, BaseException)
        and value.__module__ == module.__name__
    }
    assert defined, "no exception classes found"
    assert {module for module, _ in defined} == {"counter_server.server.errors"}, defined
    errors = importlib.import_module("counter_server.server.errors")
    assert all(issubclass(getattr(errors, name), ServerError) for _, name in defined)


def test_setup_and_connection_errors_are_apart():
    # main() prints a SetupError and exits 1; a ConnectionEnded must never reach it.
    assert not issubclass(ConnectionEnded, SetupError)
    assert not issubclass(SetupError, ConnectionEnded)
