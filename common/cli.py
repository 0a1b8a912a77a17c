"""Command-line plumbing shared by every entry point: docopt-ng parsing with
usage errors that exit 2 without a traceback, value parsers, and logging setup.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from typing import NoReturn, TypeVar

from docopt import DocoptExit, ParsedOptions, docopt, parse_options
from pythonjsonlogger.json import JsonFormatter

T = TypeVar("T")

LOG_LEVELS = ("debug", "info", "warning", "error")


class UsageError(ValueError):
    """A command-line value that cannot be used; the message is one line."""


def parse_args(
    doc: str, argv: list[str] | None = None, version: str | None = None
) -> ParsedOptions:
    """Parse ``argv`` against the docopt ``doc``; exit 2 with usage on a
    mistake (``unknown option --bogus``), 0 after ``--version`` if given.
    Go's flag forms of the long options are accepted too (``-port 8080``,
    ``-port=8080``: one dash or two, as the Go original takes them)."""
    given = go_flags(doc, list(sys.argv[1:] if argv is None else argv))
    try:
        return docopt(doc, given, version=version)
    except DocoptExit as exc:
        unknown = unknown_option(doc, given)
        if unknown is not None:
            usage_exit(doc, f"unknown option {unknown}")
        detail = str(exc).split("\n", 1)[0].strip()
        if not detail or detail.lower().startswith("usage:") or "unmatched" in detail:
            detail = "unexpected arguments: " + " ".join(given)
        usage_exit(doc, detail)


def go_flags(doc: str, argv: list[str]) -> list[str]:
    """``argv`` with ``-name`` and ``-name=VALUE`` written ``--name...`` where
    ``--name`` is one of ``doc``'s long options; one-letter options such as
    ``-h`` and the values of options are untouched."""
    options = [option for option in parse_options(doc) if option.longer]
    longs = {option.longer for option in options}
    with_value = {option.longer for option in options if option.argcount}
    rewritten: list[str] = []
    expecting_value = False
    for index, token in enumerate(argv):
        if token == "--":
            return rewritten + argv[index:]
        if expecting_value:
            rewritten.append(token)
            expecting_value = False
            continue
        name = token.split("=", 1)[0]
        if token.startswith("-") and not token.startswith("--") and f"-{name}" in longs:
            token, name = f"-{token}", f"-{name}"
        expecting_value = name in with_value and "=" not in token
        rewritten.append(token)
    return rewritten


def unknown_option(doc: str, argv: list[str]) -> str | None:
    """The first option in ``argv`` that ``doc`` does not define, or None.
    Values of options that take one are skipped (``--rate -5`` is a value)."""
    known = {name: option.argcount for option in parse_options(doc)
             for name in (option.short, option.longer) if name}  # fmt: skip
    takes_value = False
    for token in argv:
        if takes_value:
            takes_value = False
            continue
        if token == "--":
            return None
        if not token.startswith("-") or token == "-":
            continue
        name = token.split("=", 1)[0] if token.startswith("--") else token[:2]
        if name not in known:
            return name
        takes_value = bool(known[name]) and token == name  # not --name=VALUE nor -xVALUE
    return None


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


def _number(raw: str, what: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"must be {what}, got {raw!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise UsageError(f"must be a finite number, got {raw!r}")
    return value


def non_negative_float(raw: str) -> float:
    """A finite number of seconds >= 0."""
    value = _number(raw, "a number of seconds")
    if value < 0:
        raise UsageError(f"must be a number of seconds >= 0, got {raw!r}")
    return value


def positive_float(raw: str, what: str = "a number of seconds") -> float:
    """A finite number > 0 (of ``what``)."""
    value = _number(raw, what)
    if value <= 0:
        raise UsageError(f"must be {what} > 0, got {raw!r}")
    return value


def positive_rate(raw: str) -> float:
    """Frames per second, > 0."""
    return positive_float(raw, "a number of frames per second")


def port_number(raw: str) -> int:
    """A TCP port: ``8080`` or the Go style ``:8080``; 0 asks for a free port."""
    text = raw[1:] if raw.startswith(":") else raw
    value = _int(text, what="a port number (8080 or :8080)", raw=raw)
    if not 0 <= value <= 65535:
        raise UsageError(f"port must be between 0 and 65535, got {raw!r}")
    return value


def host_port(raw: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6; ``:PORT`` means 127.0.0.1)."""
    if (raw.startswith("[") and raw.endswith("]")) or (raw.count(":") > 1 and "]" not in raw):
        raise UsageError(f"the port is missing: expected [IPv6]:PORT, e.g. [::1]:8080, got {raw!r}")
    host, sep, port = raw.rpartition(":")
    if not sep:
        raise UsageError(f"the port is missing: expected HOST:PORT, got {raw!r}")
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


class _UTCJsonFormatter(JsonFormatter):
    """JSON lines whose ``time`` is ISO 8601 in UTC (2026-11-24T16:05:03.298Z)."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        moment = datetime.fromtimestamp(record.created, tz=timezone.utc)
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def configure_logging(level: int, fmt: str = "text") -> None:
    """One line per event on stderr; ``fmt="json"`` writes one JSON object per
    line for shippers: time (ISO 8601, UTC), level, logger, message, the
    event's facts as fields of their own (peer, reason, counts...), exc_info."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(
            _UTCJsonFormatter(
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


def plural(count: int, noun: str, many: str | None = None) -> str:
    """``1 connection``, ``2 connections``, ``1,000 connections``; ``many``
    for an irregular plural (``plural(2, "reply", "replies")``)."""
    return f"{count:,} {noun if count == 1 else many or noun + 's'}"


def format_address(address: tuple) -> str:
    """``host:port``, or ``[host]:port`` for IPv6, from a socket address
    tuple; an IPv4 client of a dual-stack socket (``::ffff:1.2.3.4``) as IPv4."""
    host, port = address[0], address[1]
    if host.startswith("::ffff:") and "." in host:
        host = host[len("::ffff:") :]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
