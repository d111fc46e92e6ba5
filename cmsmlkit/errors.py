"""Exception classes of cmsmlkit.

Every error a user can cause derives from :class:`CmsmlError`, so a notebook
or a script can catch them all at once; each says what was wrong, where, and
how to fix it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "CmsmlError",
    "ConfigError",
    "ExpressionError",
    "InputFileError",
    "MissingBranchError",
    "EmptySelectionError",
    "DataError",
    "BundleError",
    "MissingDependencyError",
    "SubmitError",
    "ProxyError",
    "closest",
]


def closest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Return up to ``n`` names of ``candidates`` that look most like ``name``."""
    candidates = list(candidates)
    matches = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    if not matches:
        lowered = {c.lower(): c for c in candidates}
        matches = [
            lowered[m] for m in difflib.get_close_matches(name.lower(), lowered, n=n, cutoff=0.5)
        ]
    return matches


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """A ``did you mean ...?`` sentence, or an empty string when nothing is close."""
    matches = closest(name, candidates)
    if not matches:
        return ""
    return " Did you mean " + " or ".join(repr(m) for m in matches) + "?"


class CmsmlError(Exception):
    """Base class of every error cmsmlkit raises on purpose."""


class ConfigError(CmsmlError, ValueError):
    """A configuration key, value or type is wrong."""


class ExpressionError(CmsmlError, ValueError):
    """A selection expression is malformed, unsafe, or names something unknown."""


class InputFileError(CmsmlError, OSError):
    """An input file is missing, unreadable, corrupt, or lacks the expected tree."""


class MissingBranchError(InputFileError, KeyError):
    """A branch, collection or field is not in an input file."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class EmptySelectionError(CmsmlError, ValueError):
    """A selection keeps no event at all."""


class DataError(CmsmlError, ValueError):
    """Training or prediction data are unusable (one class only, NaN, empty split, ...)."""


class BundleError(CmsmlError, ValueError):
    """A model bundle is missing, incomplete, corrupt or from a newer cmsmlkit."""


class MissingDependencyError(CmsmlError, ImportError):
    """An optional package is not installed; the message gives the pip line."""


class SubmitError(CmsmlError, RuntimeError):
    """A batch job could not be written or submitted (scheduler missing, submission refused)."""


class ProxyError(SubmitError):
    """The GRID proxy a batch job needs is missing, unreadable or expired."""
