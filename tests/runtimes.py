"""The session fixture :func:`dockerd`: a private ``dockerd`` (:class:`bench.dockerd.Dockerd`,
re-exported here) for end-to-end tests, and the reasons to skip them.

The fixture skips when not root or when dockerd is not installed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from bench.dockerd import Dockerd, DockerdError

__all__ = [
    "CTR_MISSING_REASON",
    "DOCKERD_MISSING_REASON",
    "DOCKER_CLI_MISSING_REASON",
    "NOT_ROOT_REASON",
    "Dockerd",
    "DockerdError",
    "dockerd",
    "dockerd_skip_reason",
]

DOCKERD_MISSING_REASON = "dockerd not installed: apt-get install docker.io"
DOCKER_CLI_MISSING_REASON = "docker CLI not installed: apt-get install docker.io"
CTR_MISSING_REASON = "ctr not installed: apt-get install containerd"
NOT_ROOT_REASON = "dockerd needs root (run the tests as root)"


def dockerd_skip_reason() -> str | None:
    """Why a private dockerd cannot run here (None if it can)."""
    if os.geteuid() != 0:
        return NOT_ROOT_REASON
    if shutil.which("dockerd") is None:
        return DOCKERD_MISSING_REASON
    return None


@pytest.fixture(scope="session")
def dockerd() -> Iterator[Dockerd]:
    """A private dockerd for the whole session (no mirrors until :meth:`Dockerd.set_mirrors`).

    Skips when not root or when dockerd is not installed.  Tests that need the docker CLI or
    ctr should skip on their own (``DOCKER_CLI_MISSING_REASON``, ``CTR_MISSING_REASON``).
    """
    reason = dockerd_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    with Dockerd.start() as d:
        yield d
