"""Shared bits of the demo and benchmarks: making sure the Debian registry is there."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

__all__ = ["ensure_registry_installed"]


def ensure_registry_installed() -> bool:
    """True when ``docker-registry`` is on PATH, installing it first when we are root on
    Debian; otherwise print exactly what to install and return False."""
    if shutil.which("docker-registry"):
        return True
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("demo: installing Debian's docker-registry (apt-get install -y docker-registry)")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
        done = subprocess.run(
            ["apt-get", "install", "-y", "-qq", "docker-registry"], check=False, env=env
        )
        if done.returncode == 0 and shutil.which("docker-registry"):
            return True
    print(
        "demo: needs Debian's registry: run `sudo apt-get install -y docker-registry` "
        "and try again",
        file=sys.stderr,
    )
    return False
