"""Helpers for tests that start real servers (XRootD, SLURM) from Debian packages.

On a machine without the packages these tests are skipped with the apt line to
install them; CI sets ``CMSML_REQUIRE_SERVERS=1`` (see ``.ci/run``), which turns
a missing package into a failure so that nothing is silently skipped there.
"""

from __future__ import annotations

import os
import shutil

import pytest


def require_binaries(*names: str, apt: str) -> None:
    """Skip (or, in CI, fail) unless every program in ``names`` is installed."""
    missing = [n for n in names if shutil.which(n) is None]
    if not missing:
        return
    message = f"needs {', '.join(missing)}: apt-get install {apt}"
    if os.environ.get("CMSML_REQUIRE_SERVERS"):
        pytest.fail(message + " (CMSML_REQUIRE_SERVERS is set)")
    pytest.skip(message)
