"""The counter server, its client library and load client, as one package.

Its subpackages ``counter_server.server``, ``.client``, ``.protocol`` and
``.common`` are the repository's top-level folders ``server/``, ``client/``,
``protocol/`` and ``common/``: installed, ``pyproject.toml`` maps them; in a
clone, ``counter_server/`` holds a symbolic link to each. Each refuses to be
imported under any other name (``import server``), so every module has one
name and every class one identity (docs/development.md, "Packaging").
"""
