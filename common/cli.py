"""Command-line plumbing shared by every entry point: docopt-ng parsing with
usage errors that exit 2 without a traceback, and logging setup (the values
themselves are parsed by ``common.values``).
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


def parse_args(
    doc: str, argv: list[str] | None = None, version: str | None = None
) -> ParsedOptions:
    """Parse ``argv`` against the docopt ``doc``; exit 2 with usage on a
    mistake (``unknown option --bogus``), 0 after ``--version`` if given.
    Go's flag forms of the long options are accepted too (``-port 8080``,
    ``-port=8080``: one dash or two, as the Go original takes them)."""
    doc = as_invoked(doc)
    given = go_flags(doc, list(sys.argv[1:] if argv is None else argv))
    try:
        return docopt(doc, given, version=version)
    except DocoptExit as exc:
        unknown = unknown_option(doc, given)
        if unknown is not None:
            usage_exit(doc, f"unknown option {unknown}")
        detail = str(exc).split("\n", 1)[0].strip()
        if not detail or detail.lower().startswith("usage:") or "unmatched" in detail:
            stray = stray_arguments(doc, given)
            detail = "unexpected arguments: " + " ".join(stray or given)
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


def stray_arguments(doc: str, argv: list[str]) -> list[str]:
    """The words of ``argv`` that are neither options nor their values
    (``doc``'s options, which take none of their own positional arguments)."""
    takes = {name: option.argcount for option in parse_options(doc)
             for name in (option.short, option.longer) if name}  # fmt: skip
    stray, expecting_value = [], False
    for token in argv:
        if expecting_value:
            expecting_value = False
        elif token.startswith("-") and token != "-":
            name = token.split("=", 1)[0] if token.startswith("--") else token[:2]
            expecting_value = bool(takes.get(name)) and token == name
        else:
            stray.append(token)
    return stray


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


def as_invoked(doc: str) -> str:
    """``doc`` with its usage lines naming the program as it was started:
    ``counter-server`` once installed, ``server.py`` from a clone."""
    prog = os.path.basename(sys.argv[0])
    usage = doc[doc.lower().find("usage:") :].split()
    written = usage[1] if len(usage) > 1 else ""
    if not prog or prog.startswith("-") or prog == written or not written:
        return doc  # python -c, or already so
    return doc.replace(f"\n  {written} ", f"\n  {prog} ")


def usage_exit(doc: str, message: str) -> NoReturn:
    """Print ``message`` on one line and the usage section to stderr; exit 2."""
    prog = os.path.basename(sys.argv[0]) or "counter"
    doc = as_invoked(doc)
    usage = doc[doc.lower().find("usage:") :].split("\n\n", 1)[0]
    print(f"{prog}: error: {message}\n{usage}", file=sys.stderr)
    sys.exit(2)


def convert(doc: str, option: str, raw: str, parser: Callable[[str], T]) -> T:
    """``parser(raw)``, turning a ValueError into a usage exit naming ``option``."""
    try:
        return parser(raw)
    except ValueError as exc:
        usage_exit(doc, f"{option}: {exc}")


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
