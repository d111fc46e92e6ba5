"""``cmsml init``: a commented starter pipeline YAML for the user's own datasets.

Each dataset is given as ``NAME=LABEL:FILES`` (``FILES``: comma-separated paths,
globs, ``root://`` URLs, text files of paths or DAS names), e.g.
``ttbar=signal:/eos/user/j/jdoe/ttbar/*.root``. Without datasets the file holds
two placeholders to edit. The text is checked with :func:`cmsmlkit.load_config`
before it is written, then written atomically; an existing file is kept unless
``force`` is given.

>>> from cmsmlkit.starter import write_starter
>>> write_starter("pipeline.yaml", ["ttbar=signal:data/ttbar*.root"])  # doctest: +SKIP
PosixPath('pipeline.yaml')
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import ClusterConfig, PipelineConfig, load_yaml, validate
from .errors import ConfigError

__all__ = ["DatasetSpec", "parse_dataset", "starter_yaml", "write_starter"]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")

#: Placeholders used when no dataset is given: edit their files.
DEFAULT_DATASETS = (
    "signal_sample=signal:data/signal/*.root",
    "background_sample=background:data/background/*.root",
)


@dataclass(frozen=True)
class DatasetSpec:
    """One ``--dataset NAME=LABEL:FILES`` argument, parsed."""

    name: str
    label: str
    files: tuple[str, ...]


def parse_dataset(text: str) -> DatasetSpec:
    """Parse ``NAME=LABEL:FILE[,FILE...]``.

    The label ends at the first ``:``, so files may be URLs
    (``wjets=background:root://eosuser.cern.ch//eos/user/j/jdoe/w.root``).

    Examples
    --------
    >>> parse_dataset("ttbar=signal:a.root,b/*.root")
    DatasetSpec(name='ttbar', label='signal', files=('a.root', 'b/*.root'))
    """
    name, eq, rest = text.partition("=")
    label, colon, files = rest.partition(":")
    name, label = name.strip(), label.strip()
    paths = tuple(f.strip() for f in files.split(",") if f.strip())
    if not eq or not colon or not name or not label or not paths:
        raise ConfigError(
            f"--dataset {text!r}: write NAME=LABEL:FILES, e.g. "
            "ttbar=signal:/eos/user/j/jdoe/ttbar/*.root (several files separated by commas)."
        )
    if not _NAME.match(name):
        raise ConfigError(
            f"--dataset {text!r}: the dataset name {name!r} may hold letters, digits, "
            "'_', '.' and '-', and starts with a letter or '_'."
        )
    if not _NAME.match(label):
        raise ConfigError(
            f"--dataset {text!r}: the label {label!r} (the class, e.g. signal or background) "
            "may hold letters, digits, '_', '.' and '-'."
        )
    return DatasetSpec(name, label, paths)


def _q(value: str) -> str:
    """A YAML scalar for ``value``: JSON's double-quoted string is valid YAML."""
    return json.dumps(value)


def starter_yaml(datasets: Sequence[str | DatasetSpec] = (), *, cluster: str = "local") -> str:
    """The text of a commented starter pipeline for ``datasets``.

    Parameters
    ----------
    datasets
        ``NAME=LABEL:FILES`` strings or :class:`DatasetSpec`; none gives two
        placeholders (a signal and a background) to edit.
    cluster
        ``local``, ``htcondor`` or ``slurm``: the ``cluster.type`` written.

    Raises
    ------
    ConfigError
        a malformed dataset, a name given twice, fewer than two classes, or
        an unknown cluster type.
    """
    specs = [d if isinstance(d, DatasetSpec) else parse_dataset(d) for d in datasets]
    if not specs:
        specs = [parse_dataset(d) for d in DEFAULT_DATASETS]
    names = [s.name for s in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"dataset name(s) {', '.join(twice)} given more than once.")
    labels = list(dict.fromkeys(s.label for s in specs))
    if len(labels) < 2:
        raise ConfigError(
            f"every dataset has the label {labels[0]!r}; a classifier needs at least two "
            "classes: give e.g. --dataset ttbar=signal:... --dataset wjets=background:..."
        )
    kinds = ClusterConfig.model_fields["type"].annotation.__args__  # type: ignore[union-attr]
    if cluster not in kinds or cluster == "address":
        raise ConfigError(f"--cluster {cluster!r}: choose local, htcondor or slurm.")

    lines = [
        "# cmsmlkit pipeline, written by `cmsml init`. Edit it, then run:",
        "#   cmsml run pipeline.yaml              (every stage; finished ones are skipped)",
        "#   cmsml skim|convert|train|tune|predict pipeline.yaml   (one stage)",
        "# Relative paths are taken from this file's directory. Every key, its type and",
        "# default: the YAML reference of the docs (or `cmsml demo` for a complete example).",
        "",
        "cluster:",
        f"  type: {cluster}".ljust(23) + "# local | htcondor | slurm",
        "  workers: 1           # 1 = in this process; more = parallel workers (batch jobs)",
    ]
    if cluster == "htcondor":
        lines += [
            "  job_flavour: longlunch  # espresso 20m, microcentury 1h, longlunch 2h, workday 8h",
            "  # lcg_view: LCG_105/x86_64-el9-gcc13-opt   # the same Python on the workers",
        ]
    elif cluster == "slurm":
        lines += [
            "  walltime: '01:00:00'  # time limit per worker job",
            "  # partition: short   # your site's partition",
        ]
    lines += [
        "",
        "source:",
        "  datasets:           # one entry per dataset; `label` is the class it trains as",
    ]
    for spec in specs:
        files = ", ".join(_q(f) for f in spec.files)
        lines.append(f"    {spec.name}:")
        lines.append(f"      files: [{files}]")
        lines.append(f"      label: {spec.label}")
        lines.append(
            "      # xsec: 1.0        # cross-section in pb, weights events by xsec * lumi"
        )
    lines += [
        "",
        "skim:",
        "  selection:          # expressions over NanoAOD collections; see the skim guide",
        "    objects:          # new collections selected from NanoAOD ones",
        '      GoodJet: {from: Jet, where: "pt > 30 & abs(eta) < 2.4 & jetId >= 2"}',
        '      GoodMuon: {from: Muon, where: "pt > 20 & abs(eta) < 2.4 & tightId"}',
        "    cuts:             # event cuts, applied in order (the cutflow follows them)",
        '      - "num(GoodJet) >= 2"',
        "    variables:        # per-event variables, written to /scalars in the HDF5 file",
        '      ht: "sum(GoodJet.pt)"',
        '      n_jets: "num(GoodJet)"',
        '      met: "MET.pt"',
        "  collections:        # collections kept per event, and their fields",
        "    GoodJet: [pt, eta, phi, mass, btagDeepFlavB]",
        "    GoodMuon: [pt, eta, phi]",
        "",
        "convert:",
        "  output: data.h5     # the padded HDF5 training file",
        "  collections:        # objects kept per event (the leading ones in pt)",
        "    GoodJet: {max_len: 6}",
        "    GoodMuon: {max_len: 2}",
        "",
        "train:",
        "  output: model       # the model bundle: weights, ONNX, figures, metrics",
        "  features: ['*']     # every scalar and object field; or e.g. [ht, GoodJet.pt]",
        "  max_epochs: 20",
        "  model: {hidden: [64, 64], dropout: 0.1}",
        "",
        "# Uncomment to search architectures and learning rates with Optuna (one model",
        "# per trial; the best is written to tune/best):",
        "# tune:",
        "#   output: tune",
        "#   n_trials: 10",
        "",
        "# Uncomment and list the files to score with the trained model (or tune/best):",
        "# predict:",
        "#   bundle: model",
        "#   inputs: [new/*.root]   # NanoAOD or HDF5 files",
        "#   output: predictions",
        "",
    ]
    return "\n".join(lines)


def write_starter(
    path: str | Path,
    datasets: Sequence[str | DatasetSpec] = (),
    *,
    cluster: str = "local",
    force: bool = False,
) -> Path:
    """Write :func:`starter_yaml` to ``path``, checked and atomically; return the path.

    Raises
    ------
    ConfigError
        ``path`` exists and ``force`` is False, or the datasets are malformed.
    """
    path = Path(path)
    if path.exists() and not force:
        raise ConfigError(
            f"{path} exists; choose another name or pass --force (force=True) to overwrite it."
        )
    text = starter_yaml(datasets, cluster=cluster)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        validate(PipelineConfig, load_yaml(tmp), source=str(path))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
