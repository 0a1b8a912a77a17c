"""Values as written on command lines (common/values.py), shared by the server and client."""

from __future__ import annotations

import errno
import logging
import socket
import ssl

import pytest

from counter_server.common.values import (
    UsageError,
    format_address,
    host_port,
    log_level,
    non_negative_float,
    phrase,
    port_number,
    positive_int,
)


@pytest.mark.parametrize(
    ("raw", "port"), [("8080", 8080), (":8080", 8080), ("0", 0), ("65535", 65535)]
)
def test_port_number(raw, port):
    assert port_number(raw) == port


@pytest.mark.parametrize("raw", ["", ":", "abc", "-1", "65536", "80.5", "::8080"])
def test_port_number_rejects(raw):
    with pytest.raises(UsageError):
        port_number(raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("localhost:1", ("localhost", 1)),
        (":9000", ("127.0.0.1", 9000)),
        ("[::1]:8080", ("::1", 8080)),
    ],
)
def test_host_port(raw, expected):
    assert host_port(raw) == expected


@pytest.mark.parametrize("raw", ["127.0.0.1", "host:", "host:0", "host:x", "host:70000"])
def test_host_port_rejects(raw):
    with pytest.raises(UsageError):
        host_port(raw)


def test_numbers_and_levels():
    assert positive_int("3") == 3
    assert non_negative_float("0") == 0.0
    assert non_negative_float("2.5") == 2.5
    assert log_level("DEBUG") == logging.DEBUG
    for parser, raw in [
        (positive_int, "0"),
        (positive_int, "x"),
        (non_negative_float, "-1"),
        (non_negative_float, "inf"),
        (non_negative_float, "nan"),
        (log_level, "loud"),
    ]:
        with pytest.raises(UsageError):
            parser(raw)


def test_format_address():
    assert format_address(("127.0.0.1", 80)) == "127.0.0.1:80"
    assert format_address(("::1", 80, 0, 0)) == "[::1]:80"


class _Verify(ssl.SSLCertVerificationError):
    verify_message = "self-signed certificate"


class _WrongVersion(ssl.SSLError):
    reason = "WRONG_VERSION_NUMBER"  # as the ssl module sets it


@pytest.mark.parametrize(
    ("exc", "said"),
    [
        (TimeoutError("read operation timed out"), "timed out"),
        (TimeoutError(), "timed out"),
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), "connection refused"),
        (OSError(errno.EADDRINUSE, "Address already in use (while attempting to bind on ...)"),
         "address already in use"),
        (_WrongVersion(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"),
         "wrong version number"),
        (socket.gaierror(-2, "Name or service not known"), "name or service not known"),
        (_Verify(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"),
         "certificate verify failed: self-signed certificate"),
        (ValueError("no counter\nsecond line"), "no counter"),
        (RuntimeError(), "RuntimeError"),
    ],
)  # fmt: skip
def test_an_error_is_one_lower_case_phrase(exc, said):
    assert phrase(exc) == said
