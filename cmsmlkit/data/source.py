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
  ``dasgoclient`` (needs a CMS environment and a GRID proxy: the file named by
  ``X509_USER_PROXY``, else ``/tmp/x509up_u<uid>``; it is checked, present and
  not expired, before DAS is asked).

Building a source checks the configuration only; :meth:`NanoAODSource.fileset`
resolves the entries, :meth:`NanoAODSource.nevents` opens the files and counts
their events (from the tree's header: no event data is read), and
:meth:`NanoAODSource.open_events` opens one file as coffea NanoEvents for
exploring in a notebook.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..cluster import PROXY_FIX, grid_proxy, proxy_path
from ..config import DatasetConfig, SourceConfig, build_config
from ..errors import ConfigError, InputFileError, MissingDependencyError, closest, did_you_mean

__all__ = ["NanoAODSource", "check_proxy", "is_das_dataset", "is_remote", "normalise_fileset"]

#: A DAS dataset name: /<primary>/<processed>/<TIER>, e.g. /DYJets.../RunII...-v1/NANOAODSIM.
DAS_PATTERN = re.compile(r"^/[^/]+/[^/]+/[A-Z]+[A-Z0-9-]*$")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_GLOB_CHARS = set("*?[")
_RESERVED = ("dataset", "label", "is_mc", "xsec", "cuts", "lumi_mask")
_MAX_TXT_DEPTH = 5
_DAS_TIMEOUT_S = 300
#: The command that makes a GRID proxy CMS services accept (valid 8 days).
PROXY_COMMAND = PROXY_FIX


def is_remote(entry: str) -> bool:
    """True for a URL such as ``root://host//store/file.root``."""
    return bool(_URL.match(entry))


def is_das_dataset(entry: str) -> bool:
    """True for a DAS dataset name such as ``/TTToSemiLeptonic_.../...-v1/NANOAODSIM``."""
    return bool(DAS_PATTERN.match(entry)) and not entry.startswith("/store/")


def normalise_fileset(fileset: Any, *, what: str = "the fileset") -> dict[str, dict[str, Any]]:
    """``{dataset: {"files": {path: tree}, "metadata": {...}}}`` from the forms a fileset takes.

    ``fileset`` is coffea's fileset form, ``{dataset: [files]}``, ``{dataset: file}``, or an
    object with ``.fileset()`` (a :class:`NanoAODSource`). A list of files maps each to the
    tree ``Events``; the metadata is carried (a copy, ``{}`` when absent). Files are not
    expanded nor checked, and a dataset may have none: the caller decides. ``what`` names the
    fileset in messages (``"the fileset"`` -> ``fileset['ds'] must be ...``).

    Raises
    ------
    ConfigError
        ``fileset`` is not a non-empty mapping, or an entry has no ``files``.
    """
    if hasattr(fileset, "fileset") and callable(fileset.fileset):
        fileset = fileset.fileset()
    if not isinstance(fileset, Mapping) or not fileset:
        raise ConfigError(
            f"{what} must be a non-empty mapping {{dataset: {{'files': {{path: 'Events'}}, "
            f"'metadata': {{...}}}}}}, or a NanoAODSource, not {type(fileset).__name__}."
        )
    name = what.removeprefix("the ")
    out: dict[str, dict[str, Any]] = {}
    for dataset, entry in fileset.items():
        if isinstance(entry, (str, Path)):
            entry = {"files": [entry]}
        elif isinstance(entry, (list, tuple)):
            entry = {"files": list(entry)}
        if not isinstance(entry, Mapping) or "files" not in entry:
            raise ConfigError(
                f"{name}['{dataset}'] must be a mapping with a 'files' key (or a list of files)."
            )
        files = entry["files"]
        if isinstance(files, (str, Path)):
            files = [files]
        if not isinstance(files, Mapping):
            files = {str(f): "Events" for f in files}
        out[str(dataset)] = {
            "files": {str(k): str(v) for k, v in files.items()},
            "metadata": dict(entry.get("metadata") or {}),
        }
    return out


def check_proxy(path: str | Path | None = None) -> Path:
    """Check that the GRID proxy exists and has not expired; return its path.

    The time left is read with ``voms-proxy-info --timeleft`` when it is
    installed, else from the certificate's notAfter (with ``cryptography``);
    without either only the file's presence is checked. The proxy's content is
    never logged or put into a message.

    Raises
    ------
    InputFileError
        the proxy file is missing, unreadable or expired; the message gives
        the command that makes a new one.
    """
    path = Path(path) if path is not None else proxy_path()
    where = "X509_USER_PROXY" if os.environ.get("X509_USER_PROXY") else "the default location"
    if not path.is_file():
        raise InputFileError(
            f"no GRID proxy at {path} ({where}); reading CMS data needs one. "
            f"Create it with `{PROXY_COMMAND}` (and `export X509_USER_PROXY=...` if you keep it "
            "elsewhere, e.g. on AFS for batch jobs)."
        )
    try:
        return grid_proxy(path)  # the time left, as cluster.py reads it
    except ConfigError:
        raise InputFileError(
            f"the GRID proxy at {path} has expired. Renew it with `{PROXY_COMMAND}`."
        ) from None


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
            if dataset.lumi_mask and dataset.is_mc:
                raise ConfigError(
                    f"source.datasets.{name}.lumi_mask is set but the dataset is simulation "
                    "(is_mc: true); a golden JSON selects certified collision data: set "
                    "is_mc: false, or remove lumi_mask."
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
        meta: dict[str, Any] = {
            "dataset": dataset,
            "label": ds.label,
            "is_mc": ds.is_mc,
            "xsec": ds.xsec,
        }
        if ds.cuts:
            meta["cuts"] = list(ds.cuts)
        if ds.lumi_mask:
            meta["lumi_mask"] = os.path.abspath(os.path.expanduser(ds.lumi_mask))
        return {**meta, **ds.metadata}

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
        """Open every file and count its events (the same as :meth:`nevents` of all datasets)."""
        return self.nevents()

    def nevents(self, dataset: str | None = None) -> dict[str, dict[str, int]]:
        """Events per file, ``{dataset: {file: entries}}``, for one dataset or all.

        Only the tree's header is read (its entry count), no event data, so
        this is quick even over ``root://``.

        Raises :class:`~cmsmlkit.errors.InputFileError` naming the file when it
        cannot be opened or lacks the tree (with the trees it does have).

        Examples
        --------
        >>> source.nevents("ttbar")  # doctest: +SKIP
        {'ttbar': {'/data/ttbar_1.root': 100000, '/data/ttbar_2.root': 98211}}
        """
        import uproot

        tree = self.config.treename
        if dataset is not None:
            self._dataset(dataset)  # an unknown name is an error listing the known ones
        names = self.datasets if dataset is None else [dataset]
        counts: dict[str, dict[str, int]] = {}
        for name in names:
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

    def open_events(
        self, dataset: str | None = None, file: int = 0, *, entry_stop: int | None = None
    ) -> Any:
        """One file as coffea NanoEvents, for exploring in a notebook.

        Parameters
        ----------
        dataset : str, optional
            The dataset (default: the first one).
        file : int
            Position of the file among the dataset's resolved files.
        entry_stop : int, optional
            Read only the first ``entry_stop`` events.

        Returns
        -------
        NanoEventsArray
            ``events.Jet.pt``, ``events.Muon[:, 0]``, ... with coffea's vector
            behaviour; columns are read when first used.

        Examples
        --------
        >>> events = source.open_events("ttbar")  # doctest: +SKIP
        >>> events.fields[:3]  # doctest: +SKIP
        ['Jet', 'Muon', 'MET']
        """
        import warnings

        from coffea.nanoevents import NanoAODSchema, NanoEventsFactory

        name = dataset if dataset is not None else self.datasets[0]
        files = self.files(name)
        if not -len(files) <= file < len(files):
            raise ConfigError(
                f"dataset '{name}' has {len(files)} file(s); file={file} is out of range."
            )
        path = files[file]
        tree = self.config.treename
        try:
            with warnings.catch_warnings():
                # real NanoAOD makes the schema note missing cross-references and Photon fields
                warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"coffea\.")
                return NanoEventsFactory.from_root(
                    {path: tree},
                    schemaclass=NanoAODSchema,
                    mode="virtual",
                    entry_stop=entry_stop,
                    metadata=self.metadata(name),
                ).events()
        except Exception as exc:
            raise InputFileError(
                f"dataset '{name}': cannot open {path}:{tree} as NanoEvents "
                f"({type(exc).__name__}: {exc}). Check it with source.nevents('{name}')."
            ) from None

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
                f"release, or on LXPLUS) with a valid GRID proxy (`{PROXY_COMMAND}`), "
                "or list the files (a .txt file with one /store/... path per line works anywhere)."
            )
        proxy = check_proxy()
        query = f"file dataset={name}"
        try:
            result = subprocess.run(
                [client, "-query", query],
                capture_output=True,
                text=True,
                timeout=_DAS_TIMEOUT_S,
                check=False,
                env={**os.environ, "X509_USER_PROXY": str(proxy)},
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
                f"(`voms-proxy-info`; renew with `{PROXY_COMMAND}`)."
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
