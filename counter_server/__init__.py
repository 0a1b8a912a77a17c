"""The counter server, its client library and load client, as one package.

Installed (``pip install .``), ``counter_server.server``, ``.client``,
``.protocol`` and ``.common`` are its subpackages. In a clone of the
repository they are the top-level folders ``server/``, ``client/``,
``protocol/`` and ``common/``: this package then lists the repository root
as where its subpackages live, so the same imports work in both.
"""

import os

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not os.path.isdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "server")):
    __path__.append(_ROOT)
