"""Values as people write them on a command line or in a setting, and as
the project prints them: numbers of seconds, ports, ``HOST:PORT``
addresses, log levels, counts, an error as a phrase. Standard library only:
the client library imports it.
"""

from __future__ import annotations

import errno
import logging
import os

LOG_LEVELS = ("debug", "info", "warning", "error")


class UsageError(ValueError):
    """A command-line value that cannot be used; the message is one line."""


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


def _int(text: str, what: str = "an integer", raw: str | None = None) -> int:
    try:
        return int(text.strip(), 10)
    except ValueError:
        raise UsageError(f"must be {what}, got {raw if raw is not None else text!r}") from None


def plural(count: int, noun: str, many: str | None = None) -> str:
    """``1 connection``, ``2 connections``, ``1,000 connections``; ``many``
    for an irregular plural (``plural(2, "reply", "replies")``)."""
    return f"{count:,} {noun if count == 1 else many or noun + 's'}"


def phrase(exc: BaseException) -> str:
    """An exception as the lower-case phrase a one-line message ends with,
    the way Go prints its errors: "timed out", "connection refused" (from the
    errno), a TLS failure's reason ("certificate verify failed: self-signed
    certificate", "wrong version number"), else the first line of its text,
    else its class name."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    verify = getattr(exc, "verify_message", None)
    if verify:  # ssl.SSLCertVerificationError
        return f"certificate verify failed: {verify}"
    reason = getattr(exc, "reason", None)  # ssl.SSLError: WRONG_VERSION_NUMBER
    if isinstance(reason, str) and reason:
        return reason.lower().replace("_", " ")
    if isinstance(exc, OSError):
        if exc.errno in errno.errorcode:  # not strerror: create_server adds the address to it
            return os.strerror(exc.errno).lower()
        if exc.strerror:  # socket.gaierror: a resolver's code, not an errno
            return exc.strerror.lower()
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def format_address(address: tuple) -> str:
    """``host:port``, or ``[host]:port`` for IPv6, from a socket address
    tuple; an IPv4 client of a dual-stack socket (``::ffff:1.2.3.4``) as IPv4."""
    host, port = address[0], address[1]
    if host.startswith("::ffff:") and "." in host:
        host = host[len("::ffff:") :]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
