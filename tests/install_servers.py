"""Install the real servers and tools the test suite starts (Debian/Ubuntu).

The README's test command runs this first (``python3 tests/install_servers.py``),
so that a fresh machine runs the whole suite with nothing skipped: Redis and
its sentinels, etcd, promtool (alert rules), iproute2 (network namespaces
for the partition test) and systemd-analyze (the example unit). It installs
only what is missing, with ``apt-get`` as root and through ``sudo``
otherwise; when it cannot, it names the packages and exits 1. Standard
library only: it runs before the virtualenv exists.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

# Each program some test starts or calls, and the Debian package that has it.
PACKAGES = {
    "redis-server": "redis-server",
    "redis-sentinel": "redis-sentinel",
    "etcd": "etcd-server",
    "etcdctl": "etcd-client",
    "promtool": "prometheus",
    "ip": "iproute2",
    "systemd-analyze": "systemd",
}


def missing_packages() -> list[str]:
    """The packages whose programs are not on ``PATH``, in a stable order."""
    return sorted({PACKAGES[p] for p in PACKAGES if shutil.which(p) is None})


def install_command(packages: list[str]) -> list[list[str]] | None:
    """The commands that install ``packages``, or None when this user cannot."""
    if shutil.which("apt-get") is None:
        return None
    prefix = [] if os.geteuid() == 0 else ["sudo"]
    if prefix and shutil.which("sudo") is None:
        return None
    install = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    return [[*prefix, "apt-get", "update", "-q"], [*prefix, *install]]


def main() -> int:
    packages = missing_packages()
    if not packages:
        return 0
    commands = install_command(packages)
    if commands is None:
        print(
            f"install_servers: the tests need {', '.join(packages)}; install them "
            f"(as root: apt-get install -y {' '.join(packages)}) and run again",
            file=sys.stderr,
        )
        return 1
    print(f"install_servers: installing {' '.join(packages)}", file=sys.stderr)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in commands:
        if subprocess.run(command, env=env).returncode:
            print(f"install_servers: {' '.join(command)} failed", file=sys.stderr)
            return 1
    still = missing_packages()
    if still:
        print(f"install_servers: still missing after install: {', '.join(still)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
