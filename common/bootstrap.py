"""The first thing every entry point runs (standard library only): if the
third-party packages are missing (run with a bare ``python3`` before the
virtualenv exists), say which one and how to install them, in one line,
instead of a ModuleNotFoundError traceback.

``python -m counter_server.common.bootstrap PROGRAM`` does the same check for shell scripts.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Callable

from counter_server.common import DISTRIBUTION

# import name -> the requirements.txt name that provides it
REQUIRED = {
    "gevent": "gevent",
    "xxhash": "xxhash",
    "docopt": "docopt-ng",
    "prometheus_client": "prometheus-client",
    "pythonjsonlogger": "python-json-logger",
    "redis": "redis",
    "hdrh": "hdrhistogram",
    "urllib3": "urllib3",
}
INSTALL = "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt"
INSTALL_EXTRA = "pip install 'counter-server[server]' (the library alone was installed)"


def missing_package() -> str | None:
    """The first required package this interpreter cannot import, or None."""
    for module, package in REQUIRED.items():
        if importlib.util.find_spec(module) is None:
            return package
    return None


def _installed() -> bool:
    """True when run from an installed package (editable too) rather than a
    bare clone, whose counter_server/ holds links to its folders."""
    package = importlib.util.find_spec("counter_server")
    where = (package.submodule_search_locations or [""])[0] if package else ""
    if not os.path.islink(os.path.join(where, "server")):
        return True
    try:
        importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def require_packages(program: str) -> None:
    """Exit 1 with one line if a required package is missing, saying how to
    install it: in a clone, the virtualenv; installed, the [server] extra."""
    package = missing_package()
    if package is None:
        return
    if _installed():
        program = os.path.basename(sys.argv[0]) or program
        how = f"run: {INSTALL_EXTRA}"
    else:
        how = f"from the repository root run: {INSTALL} (then use .venv/bin/python)"
    print(
        f"{program}: the Python package {package} is not installed for {sys.executable}; {how}",
        file=sys.stderr,
    )
    sys.exit(1)


def patched_main(program: str, module: str) -> Callable[[], int]:
    """What an entry point runs first: exit in one line if a package is
    missing, then monkey-patch with gevent (before anything imports the
    standard library's sockets), then import ``module``; its ``main``."""
    require_packages(program)
    from gevent import monkey

    monkey.patch_all()
    return importlib.import_module(module).main


if __name__ == "__main__":
    require_packages(sys.argv[1] if len(sys.argv) > 1 else "counter")
