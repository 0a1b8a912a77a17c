"""The messages docs/operations.md quotes are the ones the server prints:
each case runs the mistake for real and finds the doc's quote in the output
(a port in the doc's example is the test's own port)."""

from __future__ import annotations

import socket

import pytest

from support import documented, free_port, run_server_command, start_server

DOC_PORT = "8080"  # the port the doc's examples use


def quoted(text: str) -> str:
    """``text``, which docs/operations.md quotes whole (inside backticks)."""
    return documented(f"`{text}`").strip("`")


@pytest.mark.parametrize(
    ("args", "quote"),
    [
        (["--multiplier", "0"],
         "server.py: error: --multiplier: must be a positive integer, got '0'"),
        (["--bogus"], "server.py: error: unknown option --bogus"),
    ],
)  # fmt: skip
def test_usage_errors_as_quoted(args, quote):
    result = run_server_command(*args)
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == quoted(quote)


def test_a_port_in_use_as_quoted():
    quote = quoted("error: cannot listen on [::]:8080: address already in use")
    if not socket.has_dualstack_ipv6():
        pytest.skip("this machine has no IPv6: the server listens on 0.0.0.0")
    port = free_port()
    with socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True):
        result = run_server_command("--port", str(port))
    assert result.returncode == 1
    assert result.stderr.strip() == quote.replace(DOC_PORT, str(port))


def test_a_redis_down_at_start_as_quoted():
    quote = quoted("Redis ... not reachable yet: serving once it is")
    head, _, tail = quote.partition(" ... ")
    with start_server("--backend", f"redis://127.0.0.1:{free_port()}/0") as server:
        line = server.stdout_path.read_text().splitlines()[0]
    assert f"{head} redis://127.0.0.1:" in line and tail in line, line
