"""The counter server, its client library and load client, as one package.

Its subpackages ``counter_server.server``, ``.client``, ``.protocol`` and
``.common`` are the repository's top-level folders ``server/``, ``client/``,
``protocol/`` and ``common/``: installed, ``pyproject.toml`` maps them; in a
clone, ``counter_server/`` holds a symbolic link to each. Each refuses to be
imported under any other name (``import server``), so every module has one
name and every class one identity (docs/development.md, "Packaging").
"""

import sys


def one_name(name: str, right: str) -> None:
    """The guard each subpackage runs first: refuse to load package ``right``
    under any other ``name`` (from the repository root, ``import server``
    would load a second copy of every module). ``python -m server.server``
    gets one line and exit 2 rather than a traceback."""
    if name == right:
        return
    if sys.argv and sys.argv[0] == "-m":  # python -m is still looking for its module
        print(
            f"python -m {name}...: the package {name} is importable only as {right}: "
            f"run python -m {right}... instead",
            file=sys.stderr,
        )
        sys.exit(2)
    raise ImportError(f"import {right}, not {name} (docs/development.md, 'Packaging')")
