"""What the benchmark scripts share (run as ``python benchmarks/<name>.py``, this folder is on the path)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def branches_read(work: Callable[[], Any]) -> list[str]:
    """The branches uproot reads while ``work()`` runs (every basket read asks the branch first)."""
    import uproot

    seen: set[str] = set()
    branch = uproot.behaviors.TBranch.TBranch
    original = branch.entries_to_ranges_or_baskets

    def recording(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.add(self.name)
        return original(self, *args, **kwargs)

    branch.entries_to_ranges_or_baskets = recording
    try:
        work()
    finally:
        branch.entries_to_ranges_or_baskets = original
    return sorted(seen)
