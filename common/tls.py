"""TLS contexts for the server and the client (stdlib ssl; gevent makes the
sockets cooperative once monkey-patched)."""

from __future__ import annotations

import os
import socket
import ssl

from counter_server.common.values import phrase


class TLSSetupError(ValueError):
    """Certificates or keys that cannot be loaded; the message is one line."""


def server_context(cert: str, key: str, client_ca: str | None = None) -> ssl.SSLContext:
    """TLS 1.2+ server context; with ``client_ca``, clients must present a
    certificate signed by it (mutual TLS)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, cert, key)
    if client_ca:
        _load_ca(context, client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(
    ca: str | None = None, cert: str | None = None, key: str | None = None
) -> ssl.SSLContext:
    """TLS 1.2+ client context verifying the server against ``ca`` (the system
    store when None); ``cert``/``key`` present a client certificate."""
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca:
        _load_ca(context, ca)
    if cert:
        _load_chain(context, cert, key)
    return context


def probe_context() -> ssl.SSLContext:
    """A TLS client context that only asks whether the peer speaks TLS: no
    verification, since the answer only words an error."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def speaks_tls(host: str, port: int, timeout: float) -> bool:
    """Whether the server at ``host:port`` completes a TLS handshake within
    ``timeout`` seconds (not verified; see ``probe_context``)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            probe_context().wrap_socket(sock, server_hostname=host).close()
        return True
    except (OSError, ValueError):  # ssl.SSLError included; ValueError: timeout spent
        return False


def speaks_plain(host: str, port: int, hello: bytes, answers: tuple[bytes, ...],
                 timeout: float) -> bool:  # fmt: skip
    """Whether the server at ``host:port`` answers ``hello``, sent
    unencrypted, with bytes that start with one of ``answers`` within
    ``timeout`` seconds (a TLS port waits for a handshake instead)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(hello)
            return sock.recv(64).startswith(answers)
    except OSError:
        return False


# What a URL's user is told when its server speaks TLS and the URL does not.
CA_HINT = "with ?ca=FILE unless a CA this machine trusts signed its certificate"


def _load_chain(context: ssl.SSLContext, cert: str, key: str | None) -> None:
    for path in (cert, key):
        _check_readable(path)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise TLSSetupError(
            f"cannot load certificate {cert} with key {key}: {phrase(exc)}"
        ) from None


def _load_ca(context: ssl.SSLContext, ca: str) -> None:
    _check_readable(ca)
    try:
        context.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise TLSSetupError(f"cannot load CA certificates from {ca}: {phrase(exc)}") from None


def _check_readable(path: str | None) -> None:
    if path is not None and not os.path.isfile(path):
        raise TLSSetupError(f"cannot read {path}: no such file")
