"""Where the events come from: datasets of NanoAOD files, as a coffea fileset.

:class:`NanoAODSource` turns the ``source:`` section of a pipeline (one entry
per dataset: its files, class label, cross-section, ...) into coffea's fileset
form, ``{dataset: {"files": {path_or_url: "Events"}, "metadata": {...}}}``.
A file entry may be

- a local path or a glob (``~`` expanded; glob matches sorted), or a directory
  (its ``*.root`` files, sorted);
- a URL (``root://...``, ``https://...``), passed through unchanged;
- a CMS logical file name (``/store/...``), read through ``redirector``;
- a text file (``*.txt``) with one entry per line (``#`` starts a comment;
  relative paths are relative to the text file);
- a DAS dataset name (``/Primary/Processed/NANOAODSIM``), looked up with
  ``dasgoclient`` (needs a CMS environment and a GRID proxy).

Building a source checks the configuration only; :meth:`NanoAODSource.fileset`
resolves the entries, and :meth:`NanoAODSource.check` opens the files.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from ..config import DatasetConfig, SourceConfig, build_config
from ..errors import ConfigError, InputFileError, MissingDependencyError, closest, did_you_mean

__all__ = ["NanoAODSource", "is_das_dataset", "is_remote"]

#: A DAS dataset name: /<primary>/<processed>/<TIER>, e.g. /DYJets.../RunII...-v1/NANOAODSIM.
DAS_PATTERN = re.compile(r"^/[^/]+/[^/]+/[A-Z]+[A-Z0-9-]*$")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_GLOB_CHARS = set("*?[")
_RESERVED = ("dataset", "label", "is_mc", "xsec")
_MAX_TXT_DEPTH = 5
_DAS_TIMEOUT_S = 300


def is_remote(entry: str) -> bool:
    """True for a URL such as ``root://host//store/file.root``."""
    return bool(_URL.match(entry))


def is_das_dataset(entry: str) -> bool:
    """True for a DAS dataset name such as ``/TTToSemiLeptonic_.../...-v1/NANOAODSIM``."""
    return bool(DAS_PATTERN.match(entry)) and not entry.startswith("/store/")


class NanoAODSource:
    """Datasets of NanoAOD files with their class labels: the input of the Skimmer.

    Parameters
    ----------
    config
        A :class:`~cmsmlkit.config.SourceConfig`, the same as a dict, or the
        path of a YAML file holding it.
    **fields
        The fields of :class:`~cmsmlkit.config.SourceConfig` (``datasets``,
        ``treename``, ``redirector``); they override ``config``.

    Examples
    --------
    >>> from cmsmlkit.data.source import NanoAODSource
    >>> source = NanoAODSource(datasets={
    ...     "ttbar": {"files": ["data/ttbar*.root"], "label": "signal", "xsec": 833.9},
    ...     "wjets": {"files": ["wjets_files.txt"], "label": "background"},
    ... })
    >>> source.class_names
    ['signal', 'background']
    >>> fileset = source.fileset()  # doctest: +SKIP
    >>> fileset["ttbar"]["metadata"]["label"]  # doctest: +SKIP
    'signal'
    """

    def __init__(
        self,
        config: SourceConfig | dict[str, Any] | str | Path | None = None,
        **fields: Any,
    ) -> None:
        self.config: SourceConfig = build_config(SourceConfig, config, fields)
        for name, dataset in self.config.datasets.items():
            for entry in dataset.files:
                if not entry.strip():
                    raise ConfigError(
                        f"source.datasets.{name}.files holds an empty entry; remove it or give a path."
                    )
            clash = [key for key in dataset.metadata if key in _RESERVED]
            if clash:
                raise ConfigError(
                    f"source.datasets.{name}.metadata sets {', '.join(map(repr, clash))}, which the "
                    f"source fills itself; set them as keys of the dataset (e.g. 'label:') instead."
                )
        self._das_cache: dict[str, list[str]] = {}
        self._resolved: dict[str, list[str]] = {}

    # ------------------------------------------------------------------ description

    @property
    def datasets(self) -> list[str]:
        """Names of the datasets, in configuration order."""
        return list(self.config.datasets)

    @property
    def class_names(self) -> list[str]:
        """Class labels in order of first appearance; a class index is a position here."""
        names: list[str] = []
        for dataset in self.config.datasets.values():
            if dataset.label not in names:
                names.append(dataset.label)
        return names

    def metadata(self, dataset: str) -> dict[str, Any]:
        """The fileset metadata of one dataset: name, label, is_mc, xsec and the user's own keys."""
        ds = self._dataset(dataset)
        return {
            "dataset": dataset,
            "label": ds.label,
            "is_mc": ds.is_mc,
            "xsec": ds.xsec,
            **ds.metadata,
        }

    def __repr__(self) -> str:
        parts = []
        for name, ds in self.config.datasets.items():
            if name in self._resolved:
                count = f"{len(self._resolved[name])} files"
            else:
                n = len(ds.files)
                count = f"{n} entr{'y' if n == 1 else 'ies'}"
            parts.append(f"{name}: {count}, label {ds.label!r}")
        return (
            f"NanoAODSource({len(parts)} datasets [{'; '.join(parts)}], "
            f"classes={self.class_names}, treename={self.config.treename!r})"
        )

    # ------------------------------------------------------------------ resolution

    def files(self, dataset: str) -> list[str]:
        """The resolved files of one dataset: local paths (absolute) and URLs.

        Raises :class:`~cmsmlkit.errors.InputFileError` for a missing file, a
        glob that matches nothing, or a dataset left without files.
        """
        ds = self._dataset(dataset)
        found: list[str] = []
        for entry in ds.files:
            for path in self._expand(dataset, entry.strip(), base=None, depth=0):
                if path not in found:
                    found.append(path)
        if not found:
            raise InputFileError(
                f"dataset '{dataset}' has no files: its entries {ds.files} list none. "
                "Add files to the text file(s) or fix the entries."
            )
        if ds.max_files is not None:
            found = found[: ds.max_files]
        self._resolved[dataset] = found
        return found

    def fileset(self) -> dict[str, dict[str, Any]]:
        """The datasets in coffea's fileset form.

        Returns
        -------
        dict
            ``{dataset: {"files": {path_or_url: treename}, "metadata": {"dataset": name,
            "label": ..., "is_mc": ..., "xsec": ..., **metadata}}}``
        """
        tree = self.config.treename
        return {
            name: {
                "files": {path: tree for path in self.files(name)},
                "metadata": self.metadata(name),
            }
            for name in self.config.datasets
        }

    def check(self) -> dict[str, dict[str, int]]:
        """Open every file and count its events: ``{dataset: {file: entries}}``.

        Raises :class:`~cmsmlkit.errors.InputFileError` naming the file when it
        cannot be opened or lacks the tree (with the trees it does have).
        """
        import uproot

        tree = self.config.treename
        counts: dict[str, dict[str, int]] = {}
        for name in self.config.datasets:
            counts[name] = {}
            for path in self.files(name):
                try:
                    with uproot.open(path) as file:
                        if tree not in file:
                            trees = [k.split(";")[0] for k in file.keys(recursive=False)]
                            raise InputFileError(
                                f"dataset '{name}': {path} has no tree '{tree}'."
                                f"{did_you_mean(tree, trees)} It holds: {', '.join(trees) or 'nothing'}. "
                                "Set source.treename if your events live in another tree."
                            )
                        counts[name][path] = int(file[tree].num_entries)
                except InputFileError:
                    raise
                except Exception as exc:  # uproot raises many kinds for a broken file
                    raise InputFileError(
                        f"dataset '{name}': cannot read {path}: {type(exc).__name__}: {exc}"
                    ) from exc
        return counts

    # ------------------------------------------------------------------ helpers

    def _dataset(self, name: str) -> DatasetConfig:
        try:
            return self.config.datasets[name]
        except KeyError:
            raise ConfigError(
                f"no dataset '{name}' in the source; it has {', '.join(self.config.datasets)}."
                + did_you_mean(name, self.config.datasets)
            ) from None

    def _expand(self, dataset: str, entry: str, base: Path | None, depth: int) -> list[str]:
        """One file entry -> files (recursing into text files)."""
        if is_remote(entry):
            return [entry]
        if entry.startswith("/store/"):
            return [self._redirect(entry)]
        local = Path(entry).expanduser()
        if base is not None and not local.is_absolute():
            local = base / local
        if is_das_dataset(entry) and not local.exists():
            return [self._redirect(f) for f in self._das_files(dataset, entry)]
        text = str(local)
        if _GLOB_CHARS & set(text):
            # directories matched by a pattern are skipped: a pattern names files
            matches = sorted(m for m in glob.glob(text, recursive=True) if not os.path.isdir(m))
            if not matches:
                raise InputFileError(
                    f"dataset '{dataset}': the pattern '{entry}' matches no file"
                    f"{_where(base)}. Check the directory and the pattern."
                )
            files: list[str] = []
            for match in matches:
                files.extend(self._expand_local(dataset, Path(match), entry, depth))
            return files
        return self._expand_local(dataset, local, entry, depth, base)

    def _expand_local(
        self, dataset: str, path: Path, entry: str, depth: int, base: Path | None = None
    ) -> list[str]:
        if path.is_dir():
            roots = sorted(p for p in path.glob("*.root") if p.is_file())
            if not roots:
                raise InputFileError(
                    f"dataset '{dataset}': the directory {path} holds no .root files."
                )
            return [os.path.abspath(p) for p in roots]
        if not path.is_file():
            raise InputFileError(_missing_file(dataset, entry, path, base))
        if path.suffix == ".txt":
            if depth >= _MAX_TXT_DEPTH:
                raise InputFileError(
                    f"dataset '{dataset}': {path} nests file lists more than {_MAX_TXT_DEPTH} deep; "
                    "does a list include itself?"
                )
            return self._read_list(dataset, path, depth + 1)
        return [os.path.abspath(path)]

    def _read_list(self, dataset: str, path: Path, depth: int) -> list[str]:
        files: list[str] = []
        for line in path.read_text().splitlines():
            entry = line.split("#", 1)[0].strip()
            if entry:
                files.extend(self._expand(dataset, entry, base=path.parent, depth=depth))
        return files

    def _redirect(self, lfn: str) -> str:
        if not lfn.startswith("/store/"):
            return lfn
        redirector = self.config.redirector
        return redirector + ("/" if not redirector.endswith("/") else "") + lfn

    def _das_files(self, dataset: str, name: str) -> list[str]:
        if name in self._das_cache:
            return self._das_cache[name]
        client = shutil.which("dasgoclient")
        if client is None:
            raise MissingDependencyError(
                f"dataset '{dataset}': '{name}' is a DAS dataset name, and looking it up needs "
                "`dasgoclient`, which is not on PATH. Run in a CMS environment (`cmsenv` in a CMSSW "
                "release, or on LXPLUS) with a valid GRID proxy (`voms-proxy-init -voms cms`), "
                "or list the files (a .txt file with one /store/... path per line works anywhere)."
            )
        query = f"file dataset={name}"
        try:
            result = subprocess.run(
                [client, "-query", query],
                capture_output=True,
                text=True,
                timeout=_DAS_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise InputFileError(
                f"dataset '{dataset}': `dasgoclient -query \"{query}\"` took more than "
                f"{_DAS_TIMEOUT_S} s; DAS may be down, try again later."
            ) from None
        if result.returncode != 0:
            message = (result.stderr or result.stdout).strip().splitlines()
            tail = " ".join(message[-3:])[:500]
            raise InputFileError(
                f"dataset '{dataset}': `dasgoclient -query \"{query}\"` failed "
                f"(exit {result.returncode}): {tail}. Check the dataset name on "
                "https://cmsweb.cern.ch/das and that your GRID proxy is valid "
                "(`voms-proxy-info`; renew with `voms-proxy-init -voms cms`)."
            )
        files = sorted(line.strip() for line in result.stdout.splitlines() if line.strip())
        if not files:
            raise InputFileError(
                f"dataset '{dataset}': DAS knows no files of '{name}'. Check the name on "
                "https://cmsweb.cern.ch/das (is it VALID, is the tier NANOAOD/NANOAODSIM?)."
            )
        self._das_cache[name] = files
        return files


def _where(base: Path | None) -> str:
    return f" (relative to {base})" if base is not None else ""


def _missing_file(dataset: str, entry: str, path: Path, base: Path | None) -> str:
    directory = path.parent
    message = f"dataset '{dataset}': the file {path} does not exist"
    if entry != str(path):
        message += f" (entry '{entry}'{_where(base)})"
    message += "."
    if directory.is_dir():
        names = sorted(p.name for p in directory.iterdir())
        near = closest(path.name, names)
        if near:
            message += " Close names in that directory: " + ", ".join(near) + "."
        elif names:
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            message += f" That directory holds: {shown}."
        else:
            message += " That directory is empty."
    else:
        message += f" The directory {directory} does not exist either."
    if not path.is_absolute():
        message += f" Relative paths are read from {Path.cwd()}."
    return message
