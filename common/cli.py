"""Command-line plumbing shared by every entry point: docopt-ng parsing with
usage errors that exit 2 without a traceback, value parsers, and logging setup.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

from docopt import DocoptExit, ParsedOptions, docopt
from pythonjsonlogger.json import JsonFormatter

T = TypeVar("T")

LOG_LEVELS = ("debug", "info", "warning", "error")


class UsageError(ValueError):
    """A command-line value that cannot be used; the message is one line."""


def parse_args(doc: str, argv: list[str] | None = None) -> ParsedOptions:
    """Parse ``argv`` against the docopt ``doc``; exit 2 with usage on a mistake."""
    try:
        return docopt(doc, argv)
    except DocoptExit as exc:
        detail = str(exc).split("\n", 1)[0].strip()
        if not detail or detail.lower().startswith("usage:"):
            given = argv if argv is not None else sys.argv[1:]
            detail = "unrecognised arguments: " + " ".join(given)
        usage_exit(doc, detail)


def usage_exit(doc: str, message: str) -> NoReturn:
    """Print ``message`` on one line and the usage section to stderr; exit 2."""
    prog = os.path.basename(sys.argv[0]) or "counter"
    usage = doc[doc.lower().find("usage:") :].split("\n\n", 1)[0]
    print(f"{prog}: error: {message}\n{usage}", file=sys.stderr)
    sys.exit(2)


def convert(doc: str, option: str, raw: str, parser: Callable[[str], T]) -> T:
    """``parser(raw)``, turning a ValueError into a usage exit naming ``option``."""
    try:
        return parser(raw)
    except ValueError as exc:
        usage_exit(doc, f"{option}: {exc}")


def positive_int(raw: str) -> int:
    """An integer >= 1."""
    value = _int(raw)
    if value < 1:
        raise UsageError(f"must be a positive integer, got {raw!r}")
    return value


def non_negative_float(raw: str) -> float:
    """A finite number >= 0."""
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"must be a number of seconds, got {raw!r}") from None
    if not 0 <= value < float("inf"):
        raise UsageError(f"must be a number >= 0, got {raw!r}")
    return value


def positive_float(raw: str) -> float:
    """A finite number > 0."""
    value = non_negative_float(raw)
    if value == 0:
        raise UsageError(f"must be a number > 0, got {raw!r}")
    return value


def port_number(raw: str) -> int:
    """A TCP port: ``8080`` or the Go style ``:8080``; 0 asks for a free port."""
    text = raw[1:] if raw.startswith(":") else raw
    value = _int(text, what="a port number (8080 or :8080)", raw=raw)
    if not 0 <= value <= 65535:
        raise UsageError(f"port must be between 0 and 65535, got {raw!r}")
    return value


def host_port(raw: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6; ``:PORT`` means 127.0.0.1)."""
    host, sep, port = raw.rpartition(":")
    if not sep:
        raise UsageError(f"expected HOST:PORT, got {raw!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    number = port_number(port)
    if number == 0:
        raise UsageError(f"port must be between 1 and 65535, got {raw!r}")
    return host or "127.0.0.1", number


def log_level(raw: str) -> int:
    """One of debug, info, warning, error (any case)."""
    if raw.lower() not in LOG_LEVELS:
        raise UsageError(f"must be one of {', '.join(LOG_LEVELS)}, got {raw!r}")
    return getattr(logging, raw.upper())


LOG_FORMATS = ("text", "json")


def log_format(raw: str) -> str:
    """``text`` or ``json``."""
    if raw not in LOG_FORMATS:
        raise UsageError(f"must be text or json, got {raw!r}")
    return raw


def configure_logging(level: int, fmt: str = "text") -> None:
    """One line per event on stderr, as SPEC §6 asks; ``fmt="json"`` writes one
    JSON object per line (time, level, logger, message, exc_info) for shippers."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def cpu_count() -> int:
    """CPUs this process may run on (like Go's runtime.NumCPU, affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _int(text: str, what: str = "an integer", raw: str | None = None) -> int:
    try:
        return int(text.strip(), 10)
    except ValueError:
        raise UsageError(f"must be {what}, got {raw if raw is not None else text!r}") from None


def format_address(address: tuple) -> str:
    """``host:port``, or ``[host]:port`` for IPv6, from a socket address tuple."""
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
