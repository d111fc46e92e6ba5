"""Typed configurations of every stage, and their YAML form.

One class per stage; its fields are the stage's keyword arguments, so the same
run is a YAML section, a ``Trainer(**fields)`` call, or ``Trainer(config)``.
YAML is read with a safe loader; unknown keys are errors that name the file,
the key's full path and the closest valid key.

>>> from cmsmlkit.config import TrainConfig
>>> TrainConfig(inputs=["data.h5"], max_epochs=3).max_epochs
3
"""

from __future__ import annotations

import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from .errors import ConfigError, closest

__all__ = [
    "BaseConfig",
    "ClusterConfig",
    "DatasetConfig",
    "SourceConfig",
    "ObjectConfig",
    "SelectionConfig",
    "SkimConfig",
    "CollectionConfig",
    "ConvertConfig",
    "ModelConfig",
    "TrackingConfig",
    "TrainConfig",
    "ParamSpec",
    "TuneConfig",
    "PredictConfig",
    "SubmitConfig",
    "PipelineConfig",
    "STAGES",
    "load_config",
    "load_yaml",
    "dump_yaml",
    "config_hash",
    "build_config",
    "validate",
]

C = TypeVar("C", bound="BaseConfig")


class BaseConfig(BaseModel):
    """Common behaviour: unknown keys refused, assignments validated, YAML round trip."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    def to_dict(self, full: bool = True) -> dict[str, Any]:
        """The config as plain data, in the YAML spelling of its keys.

        ``full=False`` keeps only the keys that were given, so a YAML file read
        and written back is the same mapping; ``full=True`` adds every default.
        """
        return self.model_dump(mode="json", by_alias=True, exclude_unset=not full)

    def to_yaml(self, full: bool = False) -> str:
        """The config as YAML text that :func:`load_config` reads back unchanged."""
        return dump_yaml(self.to_dict(full=full))

    @classmethod
    def from_yaml(cls: type[C], path: str | Path, section: str | None = None) -> C:
        """Read one config from a YAML file (optionally from one ``section`` of it)."""
        data = load_yaml(path)
        if section is not None:
            if section not in data:
                raise ConfigError(f"{path}: no '{section}:' section; the file has {sorted(data)}.")
            data = data[section]
        return validate(cls, data, source=str(path), prefix=section or "")

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{k}={v!r}" for k, v in self.to_dict().items() if v not in (None, {}, [])
        )
        return f"{type(self).__name__}({fields})"


# --------------------------------------------------------------------------- execution


class ClusterConfig(BaseConfig):
    """Where the work runs: one block for every stage.

    ``local`` runs in-process for one worker, or on a dask LocalCluster;
    ``slurm`` and ``htcondor`` submit one batch job per worker (dask-jobqueue);
    ``address`` connects to a running scheduler. Settings of the other types are
    ignored, so one block can switch between laptop and cluster by ``type`` alone.
    """

    type: Literal["local", "slurm", "htcondor", "address"] = Field(
        "local",
        description="local (this machine), slurm, htcondor, or the address of a running scheduler",
    )
    workers: int = Field(1, ge=1, description="number of workers (jobs on a batch cluster)")
    threads_per_worker: int = Field(1, ge=1, description="threads per worker")
    address: str | None = Field(
        None, description="scheduler address, e.g. tcp://host:8786 (type: address)"
    )
    adapt_min: int | None = Field(
        None, ge=0, description="adaptive scaling: at least this many workers (needs adapt_max)"
    )
    adapt_max: int | None = Field(
        None,
        ge=1,
        description="adaptive scaling: at most this many workers, started as work waits; "
        "none: a fixed number of workers",
    )
    cores: int | None = Field(
        None,
        ge=1,
        description="slurm/htcondor: CPUs per job; none: threads_per_worker. A job runs "
        "cores / threads_per_worker worker processes",
    )
    memory: str | None = Field(
        None, description="slurm/htcondor: memory per job, e.g. '4GB'; none: 2GB per core"
    )
    disk: str | None = Field(
        None, description="htcondor: scratch disk per job, e.g. '4GB'; none: 2GB per core"
    )
    walltime: str | None = Field(
        None,
        description="slurm: time limit per job, e.g. '02:00:00'; htcondor: MaxRuntime "
        "overriding job_flavour; none: 01:00:00 on slurm, the flavour's on htcondor",
    )
    partition: str | None = Field(
        None, description="slurm: the partition (queue); none: the cluster's default"
    )
    account: str | None = Field(
        None, description="slurm: the account to charge; htcondor: accounting_group"
    )
    job_flavour: Literal[
        "espresso", "microcentury", "longlunch", "workday", "tomorrow", "testmatch", "nextweek"
    ] = Field(
        "longlunch",
        description="htcondor (CERN): the job flavour, i.e. its time limit "
        "(espresso 20m, microcentury 1h, longlunch 2h, workday 8h, tomorrow 1d, ...)",
    )
    lcg_view: str | None = Field(
        None,
        description="the Python environment on the workers: an LCG view sourced before the "
        "worker starts, 'LCG_105/x86_64-el9-gcc13-opt' or a full /cvmfs path",
    )
    container: str | None = Field(
        None,
        description="htcondor: the image the workers run in (MY.SingularityImage), e.g. "
        "/cvmfs/unpacked.cern.ch/registry.hub.docker.com/coffeateam/coffea-dask:latest",
    )
    python: str | None = Field(
        None,
        description="the Python command on the workers; none: python3 with lcg_view or "
        "container, else this Python (a shared filesystem)",
    )
    proxy: str | None = Field(
        None,
        description="htcondor: the GRID proxy shipped to the workers; none: "
        "$X509_USER_PROXY, else /tmp/x509up_u<uid>",
    )
    ship_proxy: bool = Field(
        True, description="htcondor: ship the GRID proxy (needed to read root:// CMS data)"
    )
    ports: str = Field(
        "10000-10100",
        description="htcondor: ports the scheduler and workers listen on (at CERN only "
        "10000-10100 are open from batch nodes to the submit host)",
    )
    interface: str | None = Field(
        None, description="slurm/htcondor: network interface of scheduler and workers, e.g. ib0"
    )
    local_directory: str | None = Field(
        None, description="slurm/htcondor: worker scratch directory; none: the job's own"
    )
    log_directory: str | None = Field(
        None, description="slurm/htcondor: directory of the worker jobs' logs; none: no logs kept"
    )
    extra_directives: list[str] | dict[str, str] = Field(
        default_factory=list,
        description="slurm: extra #SBATCH options, e.g. ['--gres=gpu:1']; htcondor: extra "
        "submit lines, {'requirements': '...'} or ['key = value']",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ClusterConfig:
        cores = self.cores or self.threads_per_worker
        if cores % self.threads_per_worker:
            raise ValueError(
                f"cores: {cores} is not a multiple of threads_per_worker: "
                f"{self.threads_per_worker}; a job runs cores / threads_per_worker workers"
            )
        if self.adapt_min is not None and self.adapt_max is None:
            raise ValueError("adapt_min needs adapt_max (the most workers to scale up to)")
        if self.adapt_max is not None and (self.adapt_min or 0) > self.adapt_max:
            raise ValueError(
                f"adapt_min: {self.adapt_min} is larger than adapt_max: {self.adapt_max}"
            )
        if self.lcg_view and self.container:
            raise ValueError(
                "set lcg_view or container, not both: each brings the workers' Python environment"
            )
        low, _, high = self.ports.replace(":", "-").partition("-")
        if not (low.isdigit() and high.isdigit() and 0 < int(low) <= int(high) < 65536):
            raise ValueError(f"ports must read 'LOW-HIGH', e.g. '10000-10100', not {self.ports!r}")
        if self.type == "address" and not self.address:
            raise ValueError("type: address needs address: the scheduler's, e.g. tcp://host:8786")
        if self.address and self.type != "address":
            raise ValueError(
                f"address is set but type is {self.type!r}; set type: address to connect to it"
            )
        return self


# --------------------------------------------------------------------------- data stages


class DatasetConfig(BaseConfig):
    """One dataset: its files and what it is."""

    files: list[str] = Field(..., min_length=1, description="paths, globs, root:// URLs")
    label: str = Field(..., description="the class this dataset belongs to, e.g. signal")
    is_mc: bool = Field(True, description="simulation (has genWeight) or collision data")
    xsec: float | None = Field(None, gt=0, description="cross-section in pb, for normalisation")
    max_files: int | None = Field(None, ge=1, description="use at most this many files")
    cuts: list[str] = Field(
        default_factory=list,
        description="extra event cuts for this dataset only, applied before skim.selection.cuts",
    )
    lumi_mask: str | None = Field(
        None,
        description="golden JSON of certified luminosity blocks (collision data), e.g. "
        "Cert_314472-325175_13TeV_Legacy2018_Collisions18_JSON.txt",
    )
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="anything else to carry along"
    )

    @field_validator("files", mode="before")
    @classmethod
    def _one_file_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class SourceConfig(BaseConfig):
    """The input datasets (NanoAODSource)."""

    datasets: dict[str, DatasetConfig] = Field(
        ..., min_length=1, description="dataset name -> dataset"
    )
    treename: str = Field("Events", description="the TTree holding the events")
    redirector: str = Field(
        "root://cms-xrd-global.cern.ch/", description="XRootD redirector for /store paths"
    )


class ObjectConfig(BaseConfig):
    """A selected collection: ``{from: Jet, where: "pt > 30"}``."""

    from_: str = Field(
        ..., alias="from", description="the NanoAOD collection (or defined object) to select from"
    )
    where: str = Field("", description="expression over the collection's fields; empty keeps all")


class SelectionConfig(BaseConfig):
    """Object definitions, event cuts and derived variables (DESIGN.md, selection)."""

    objects: dict[str, ObjectConfig] = Field(
        default_factory=dict, description="new collection -> definition"
    )
    cuts: list[str] = Field(default_factory=list, description="event cuts, applied in order")
    variables: dict[str, str] = Field(
        default_factory=dict, description="per-event variable -> expression"
    )


class SkimConfig(BaseConfig):
    """The Skimmer: selection plus what to keep."""

    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    collections: dict[str, list[str]] = Field(
        default_factory=dict,
        description="collections to keep -> fields (wildcards allowed, ['*'] for all)",
    )
    chunksize: int = Field(100_000, ge=1, description="events per chunk")
    output: str | None = Field(
        None, description="directory for skimmed ROOT files; none keeps results in memory"
    )
    skip_bad_files: bool = Field(
        False, description="skip unreadable files with a report instead of stopping"
    )
    retries: int = Field(
        2, ge=0, description="extra attempts at reading a chunk before its file counts as bad"
    )
    keep: list[str] = Field(
        default_factory=list,
        description="per-event NanoAOD branches to carry into the output as they are "
        "(wildcards), e.g. [HLT_IsoMu24, PV_npvs, Flag_*]",
    )
    drop: list[str] = Field(
        default_factory=list,
        description="output columns to leave out (wildcards): variables, kept branches and "
        "Coll_field names, e.g. [GoodJet_mass, tmp_*]; run, luminosityBlock, event and "
        "genWeight are always kept",
    )


class CollectionConfig(BaseConfig):
    """How one jagged collection is padded to a fixed length."""

    max_len: int | None = Field(
        None, ge=1, description="objects kept per event; none chooses from the data"
    )
    quantile: float = Field(
        0.95, gt=0, le=1, description="multiplicity quantile that sets max_len when it is none"
    )
    sort_by: str | None = Field(
        "pt", description="field to order objects by (descending); none keeps file order"
    )
    pad_value: float = Field(0.0, description="value in padded slots")
    fields: list[str] = Field(
        default_factory=lambda: ["*"], description="fields to write (wildcards)"
    )


class ConvertConfig(BaseConfig):
    """The HDF5Writer: padding, normalisation, compression."""

    output: str = Field("data.h5", description="HDF5 file to write")
    collections: dict[str, CollectionConfig] = Field(
        default_factory=dict,
        description="collection -> padding; unlisted collections use the defaults",
    )
    scalars: list[str] = Field(
        default_factory=lambda: ["*"], description="per-event variables to write (wildcards)"
    )
    lumi: float = Field(
        1.0, gt=0, description="integrated luminosity in /pb for xsec normalisation"
    )
    compression: Literal["none", "lzf", "gzip", "blosc2-lz4", "blosc2-zstd"] = Field(
        "blosc2-lz4",
        description="HDF5 filter; blosc2-* (hdf5plugin) is fast and multithreaded, "
        "readable by h5py after `import hdf5plugin`",
    )
    shuffle: bool = Field(True, description="shuffle rows across datasets (seeded)")
    seed: int = Field(42, description="seed of the row shuffle")
    inputs: dict[str, list[str]] = Field(
        default_factory=dict,
        description="class label -> NanoAOD ROOT files or globs converted directly, without a "
        "skim (HDF5Writer.convert); empty: the events come from the skim or the source",
    )
    objects: list[str] = Field(
        default_factory=lambda: ["*"],
        description="collections to write, by name or wildcard ('all' or '*': every one)",
    )
    step_size: int = Field(
        65536,
        ge=1,
        description="events read and written at a time (peak memory follows it; 65536 keeps "
        "a conversion under about 400 MB and reads as fast as larger steps)",
    )
    merge: bool = Field(
        True,
        description="one output file for all inputs; false writes one file per input into "
        "the directory named like output without .h5",
    )
    skip_bad_files: bool = Field(
        False, description="skip unreadable input files with a report instead of stopping"
    )


# --------------------------------------------------------------------------- ML stages


class ModelConfig(BaseConfig):
    """The network architecture.

    ``mlp``: fully connected over the input row (scalars and object fields
    flattened slot by slot). ``deepsets``: a permutation-invariant Deep Sets
    network over each padded collection (a per-object network ``object_hidden``,
    masked ``pooling``), its pooled output concatenated with the scalars and
    passed through ``hidden``. ``custom``: your own ``torch.nn.Module`` given by
    ``import_path``, built with ``n_inputs``, ``n_outputs``, ``n_classes`` and
    ``layout`` (those its constructor accepts) plus ``kwargs``.
    """

    type: Literal["mlp", "deepsets", "custom"] = Field(
        "mlp", description="model family: mlp, deepsets, or custom (import_path)"
    )
    hidden: list[int] = Field(
        default_factory=lambda: [64, 64], min_length=1, description="hidden layer widths"
    )
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout probability")
    activation: Literal["relu", "gelu", "silu", "tanh", "elu"] = Field(
        "relu", description="activation function"
    )
    object_hidden: list[int] = Field(
        default_factory=lambda: [64, 64],
        min_length=1,
        description="deepsets: widths of the per-object network (the last is the set embedding)",
    )
    pooling: Literal["mean", "sum", "max"] = Field(
        "mean", description="deepsets: how the objects of a set are pooled (padded slots excluded)"
    )
    import_path: str | None = Field(
        None, description="custom: the nn.Module class as 'package.module:ClassName'"
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="custom: extra keyword arguments of the class"
    )

    @model_validator(mode="after")
    def _custom_needs_a_class(self) -> ModelConfig:
        if self.type == "custom" and not self.import_path:
            raise ValueError("type: custom needs import_path: 'package.module:ClassName'")
        if self.import_path and ":" not in self.import_path:
            raise ValueError(
                f"import_path {self.import_path!r} must read 'package.module:ClassName'"
            )
        return self


class TrackingConfig(BaseConfig):
    """MLflow tracking."""

    enabled: bool = Field(True, description="log to MLflow")
    uri: str | None = Field(
        None, description="tracking URI; none means sqlite:///mlflow.db beside the output directory"
    )
    experiment: str = Field("cmsmlkit", description="MLflow experiment name")


class TrainConfig(BaseConfig):
    """The Trainer."""

    inputs: list[str] = Field(default_factory=list, description="HDF5 files or globs")
    output: str = Field("model", description="directory of the model bundle")
    features: list[str] = Field(
        default_factory=lambda: ["*"],
        description="scalar names and Collection.field names, wildcards allowed",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    batch_size: int = Field(512, ge=1)
    max_epochs: int = Field(20, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    patience: int = Field(5, ge=1, description="epochs without improvement before early stopping")
    val_fraction: float = Field(0.2, gt=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    class_weights: Literal["balanced", "none"] | list[float] = Field(
        "balanced", description="balanced, none, or one weight per class"
    )
    event_weights: bool = Field(False, description="multiply the loss by |weight| of each event")
    seed: int = Field(42, description="seed of the split, the initial weights and the shuffling")
    accelerator: str = Field("auto", description="cpu, gpu or auto (a GPU when present)")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    val_inputs: list[str] = Field(
        default_factory=list,
        description="split by file: HDF5 files (globs) for validation; needs test_inputs too, "
        "and then inputs are the training files and the fractions are not used",
    )
    test_inputs: list[str] = Field(
        default_factory=list, description="split by file: HDF5 files (globs) for the test split"
    )
    optimizer: Literal["adamw", "adam", "sgd"] = Field(
        "adamw", description="optimiser (sgd uses Nesterov momentum 0.9)"
    )
    scheduler: Literal["none", "cosine", "onecycle", "plateau"] = Field(
        "none",
        description="learning-rate schedule: cosine over max_epochs, onecycle per step, "
        "plateau (halve on a stalled val_loss)",
    )
    monitor: Literal["val_auc", "val_loss"] = Field(
        "val_auc", description="validation metric of early stopping and checkpointing"
    )
    target: float | None = Field(
        None, description="stop training as soon as the monitored metric reaches this value"
    )
    gradient_clip: float | None = Field(
        None, gt=0, description="clip the gradient norm to this value; none does not clip"
    )
    precision: Literal["auto", "32", "16-mixed", "bf16-mixed"] = Field(
        "auto", description="auto: mixed precision on a GPU (bf16 where supported), 32 on a CPU"
    )
    loader: Literal["auto", "memory", "blocks"] = Field(
        "auto",
        description="memory: read all events once; blocks: stream HDF5 chunks, shuffled in a "
        "buffer; auto: memory when the inputs fit in memory_limit_gb",
    )
    memory_limit_gb: float = Field(
        4.0, gt=0, description="loader auto: largest input (GB of float32 rows) held in memory"
    )
    block_buffer: int = Field(
        8, ge=1, description="loader blocks: HDF5 blocks whose events are shuffled together"
    )
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes (0: in process)")
    nan_value: float | None = Field(
        None,
        description="replace NaN and infinite feature values by this number; none refuses them",
    )
    resume: bool = Field(
        True,
        description="keep checkpoints in <output>.checkpoints and resume an interrupted training "
        "of the same config from the last one",
    )

    @field_validator("inputs", "val_inputs", "test_inputs", mode="before")
    @classmethod
    def _one_input_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> TrainConfig:
        if bool(self.val_inputs) != bool(self.test_inputs):
            raise ValueError(
                "split by file needs both val_inputs and test_inputs (or neither, to split "
                "inputs by val_fraction and test_fraction)"
            )
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g} leaves "
                "less than 10% for training; lower them"
            )
        return self


class ParamSpec(BaseConfig):
    """How one parameter of the ``tune.space`` is searched: a range, choices, or a fixed value.

    ``{low: 1.0e-4, high: 1.0e-2, log: true}`` is a range (whole numbers when
    ``low`` and ``high`` are integers), ``{choices: [relu, gelu]}`` a choice,
    ``{value: [64, 64]}`` a fixed value. In ``space:`` a plain list is short for
    ``choices`` and a plain number or word for ``value``.
    """

    low: int | float | None = Field(None, description="lower end of a range")
    high: int | float | None = Field(None, description="upper end of a range")
    log: bool = Field(False, description="sample the range on a log scale (low > 0)")
    step: int | float | None = Field(None, gt=0, description="spacing of a range's values")
    choices: list[Any] | None = Field(
        None, min_length=1, description="values to choose from (numbers, words, lists)"
    )
    value: Any = Field(None, description="a fixed value, the same in every trial")

    @model_validator(mode="after")
    def _one_kind(self) -> ParamSpec:
        kinds = [
            name
            for name, given in (
                ("low/high", self.low is not None or self.high is not None),
                ("choices", self.choices is not None),
                ("value", "value" in self.model_fields_set),
            )
            if given
        ]
        if len(kinds) != 1:
            raise ValueError(
                "give exactly one of low/high (a range), choices, or value; "
                f"got {' and '.join(kinds) or 'none of them'}"
            )
        if kinds[0] == "low/high":
            if self.low is None or self.high is None:
                raise ValueError("a range needs both low and high")
            if self.low > self.high:
                raise ValueError(f"low ({self.low}) is larger than high ({self.high})")
            if self.log and self.low <= 0:
                raise ValueError(f"a log-scale range needs low > 0, got low = {self.low}")
            if self.log and self.step is not None:
                raise ValueError("a log-scale range cannot have a step")
        elif self.log or self.step is not None:
            raise ValueError("log and step belong to a range (low/high)")
        return self

    @model_serializer(mode="wrap")
    def _write_as_given(self, handler: Any) -> Any:
        # a spec is written as it was given (a plain list or value stays plain), without the
        # unused keys, so that it reads back the same
        data = {k: v for k, v in handler(self).items() if k in self.model_fields_set}
        if set(data) == {"choices"}:
            return data["choices"]
        if set(data) == {"value"} and not isinstance(data["value"], (list, dict)):
            return data["value"]
        return data


class TuneConfig(BaseConfig):
    """The Tuner: an Optuna study over the Trainer's configuration.

    ``space`` maps dotted paths of the ``train:`` section (``learning_rate``,
    ``model.dropout``, ``model.type``) to what is searched; ``depth`` and ``width``
    there build ``model.hidden`` as ``[width] * depth``. Without ``space`` the
    default searches depth, width, learning rate, dropout, activation, batch size
    and weight decay, with the ranges of the ``depth``, ``width`` and
    ``learning_rate`` keys below.
    """

    output: str = Field("tune", description="directory of the study and the best bundle")
    n_trials: int = Field(10, ge=1, description="number of models to train")
    timeout: float | None = Field(None, gt=0, description="seconds after which no new trial starts")
    target: float | None = Field(None, description="stop when the validation AUC reaches this")
    storage: str | None = Field(
        None, description="Optuna storage URL; none means sqlite in the output directory"
    )
    study_name: str = Field("cmsmlkit")
    depth: list[int] = Field(
        default_factory=lambda: [1, 4], min_length=2, max_length=2, description="[min, max]"
    )
    width: list[int] = Field(
        default_factory=lambda: [16, 256], min_length=2, max_length=2, description="[min, max]"
    )
    learning_rate: list[float] = Field(
        default_factory=lambda: [1e-4, 1e-2],
        min_length=2,
        max_length=2,
        description="[min, max], log scale",
    )
    max_epochs: int | None = Field(
        None, ge=1, description="epochs per trial; none uses train.max_epochs"
    )
    seed: int = Field(42, description="seed of the sampler")
    space: dict[str, ParamSpec] | None = Field(
        None,
        description="dotted train paths (and depth, width) -> {low, high, log, step}, "
        "{choices}, {value}, a list (choices) or a fixed value; none: the default space",
    )
    sampler: Literal["tpe", "random", "cmaes"] = Field(
        "tpe", description="Optuna sampler: tpe, random, or cmaes (pip install cmaes)"
    )
    pruner: Literal["asha", "median", "percentile", "hyperband", "none"] = Field(
        "asha",
        description="stops hopeless trials on the validation AUC of each epoch: asha "
        "(successive halving: a trial goes on past epochs 2, 5, 17, ... (factor 4) only while "
        "in the best 1/pruner_reduction_factor of the trials that got there, and is stopped "
        "after its first epoch when below the median), median (below the median of the finished trials "
        "at the same epoch), percentile (outside their best pruner_percentile percent), "
        "hyperband, or none",
    )
    pruner_startup_trials: int = Field(
        3,
        ge=0,
        description="median, percentile, asha's first-epoch cut: trials that run to the end "
        "before any is pruned",
    )
    pruner_warmup_epochs: int = Field(
        0,
        ge=0,
        description="median, percentile, asha: epochs of every trial before it can be pruned "
        "(0: pruned after its first epoch)",
    )
    pruner_percentile: float = Field(
        25.0,
        gt=0,
        le=100,
        description="percentile: a trial goes on while in the best this many percent",
    )
    pruner_reduction_factor: int = Field(
        4, ge=2, description="asha: one trial in this many goes on at each rung"
    )
    threads_per_trial: int | None = Field(
        None,
        ge=1,
        description="CPU threads of each trial (torch.set_num_threads); none: the worker's "
        "threads on a cluster, torch's default in this process",
    )
    heartbeat: float = Field(
        60.0,
        gt=0,
        description="seconds between signs of life of a running trial; one silent for 3 "
        "heartbeats (its worker died) is marked failed and retried",
    )
    retries: int = Field(2, ge=0, description="times a trial of a dead worker is retried")
    figures: bool = Field(
        True,
        description="draw the study's figures (history, parameter importances, parallel "
        "coordinates, per-epoch curves) in <output>/figures",
    )

    @field_validator("space", mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        return {
            key: (
                spec
                if isinstance(spec, (dict, ParamSpec))
                else {"choices": spec}
                if isinstance(spec, list)
                else {"value": spec}
            )
            for key, spec in value.items()
        }


class PredictConfig(BaseConfig):
    """The Predictor."""

    bundle: str = Field("model", description="directory of the model bundle")
    inputs: list[str] = Field(default_factory=list, description="NanoAOD or HDF5 files or globs")
    output: str = Field("predictions", description="directory of the score files")
    batch_size: int = Field(
        65536, ge=1, description="events per batch through the network (larger is faster)"
    )
    formats: list[Literal["hdf5", "parquet", "friend", "nanoaod"]] = Field(
        default_factory=lambda: ["hdf5"],
        description="outputs per input: hdf5 and parquet (scored events with run, "
        "luminosityBlock, event), friend (ROOT tree, one entry per input event), nanoaod "
        "(a copy of the input ROOT file with the score branches added)",
    )
    chunksize: int = Field(
        500_000,
        ge=1,
        description="NanoAOD events read, selected and scored at a time: each chunk has a "
        "fixed cost (about 30 ms), so larger is faster, and takes more memory (about 400 MB "
        "more at 500000 than at 100000 events for a typical model's inputs)",
    )
    compression: Literal["lz4", "zlib", "lzma"] = Field(
        "lz4",
        description="codec of the friend and nanoaod ROOT outputs: lz4 writes scores about 8 "
        "times faster than zlib for files about 40% larger (ROOT and uproot read all three)",
    )
    name: str = Field(
        "score",
        pattern=r"^[A-Za-z][A-Za-z0-9_]*$",
        description="prefix of the score branches: <name>_<class> and <name>_selected",
    )
    default: float = Field(
        -1.0, description="score written for events that fail the bundle's selection"
    )
    backend: Literal["torch", "onnx"] = Field(
        "torch", description="torch, or onnx (ONNX Runtime on the bundle's model.onnx)"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the network runs: auto takes a GPU when one is present"
    )
    retries: int = Field(
        1, ge=0, description="extra attempts at a file whose reading fails (e.g. over the network)"
    )
    skip_bad_files: bool = Field(
        False, description="skip files that still fail after the retries, with a report"
    )
    rerun: bool = Field(
        False, description="score every file again, even those finished with the same bundle"
    )
    hist_bins: int = Field(20, ge=1, description="bins of the score histograms (predict_fileset)")
    hist_range: tuple[float, float] = Field((0.0, 1.0), description="range of the score histograms")
    hist_class: str | None = Field(
        None, description="class whose score is histogrammed; default: the first class"
    )
    lumi: float | None = Field(
        None,
        gt=0,
        description="integrated luminosity in 1/pb; with a dataset's xsec (pb), its histogram "
        "is normalised to xsec * lumi / sum of genWeight",
    )
    channel: str | None = Field(
        None, description="directory of the histograms in the Combine file (<channel>/<process>)"
    )

    @field_validator("inputs", "formats", mode="before")
    @classmethod
    def _one_input_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class SubmitConfig(BaseConfig):
    """A batch job (``cmsml submit``): scheduler, resources, and the environment on the worker.

    Sizes take units (``"4GB"``, ``"500MB"``; a bare number is MB); times take
    ``"90m"``, ``"2h"``, ``"1d"``, ``"1:30:00"`` or seconds.
    """

    scheduler: Literal["htcondor", "slurm"] = Field(
        "htcondor", description="batch system: htcondor (LXPLUS) or slurm"
    )
    cpus: int = Field(1, ge=1, description="CPU cores per job")
    memory: str | int | None = Field(
        None, description="memory per job, e.g. 4GB; none takes the scheduler's default"
    )
    disk: str | int | None = Field(
        None, description="local scratch disk per job, e.g. 20GB; none takes the default"
    )
    gpus: int = Field(0, ge=0, description="GPUs per job")
    job_flavour: Literal[
        "espresso", "microcentury", "longlunch", "workday", "tomorrow", "testmatch", "nextweek"
    ] = Field(
        "workday", description="HTCondor job flavour at CERN (20 min espresso ... 1 week nextweek)"
    )
    max_runtime: str | int | None = Field(
        None,
        description="wall-time limit, e.g. 2h (HTCondor MaxRuntime, SLURM --time); none: the "
        "flavour's or the partition's",
    )
    partition: str | None = Field(None, description="SLURM partition (none: the default one)")
    account: str | None = Field(None, description="SLURM account to charge")
    max_retries: int = Field(
        0, ge=0, description="HTCondor: resubmit a job that exits non-zero this many times"
    )
    requeue: bool = Field(
        False, description="SLURM: requeue the job after a node failure or preemption"
    )
    lcg_view: str | None = Field(
        None,
        description="LCG view to source on the worker, e.g. "
        "/cvmfs/sft.cern.ch/lcg/views/LCG_105/x86_64-el9-gcc13-opt",
    )
    container: str | None = Field(
        None,
        description="Apptainer image to run the stage in (a .sif file or /cvmfs/unpacked path)",
    )
    binds: list[str] = Field(
        default_factory=list, description="extra paths bound into the container, e.g. /eos"
    )
    venv: str | None = Field(
        None,
        description="virtual environment on a shared filesystem to activate on the worker; none "
        "with no lcg_view or container: the environment that submits",
    )
    proxy: str | None = Field(
        None,
        description="GRID proxy file; none: $X509_USER_PROXY, else /tmp/x509up_u<uid>",
    )
    job_dir: str = Field(
        "jobs", description="directory of the job directories (relative: to the pipeline YAML)"
    )
    transfer_inputs: bool = Field(
        False,
        description="HTCondor: ship the local input files with the job (for pools without a "
        "shared filesystem); false reads them in place (AFS, EOS, NFS)",
    )
    eos_url: str | None = Field(
        None,
        description="XRootD URL that /eos/ outputs are copied to with xrdcp; none: "
        "root://eoscms.cern.ch/ for /eos/cms, else root://eosuser.cern.ch/",
    )
    extra: list[str] = Field(
        default_factory=list,
        description="lines added verbatim to the submit file, e.g. '+AccountingGroup = \"...\"'",
    )


STAGES = ("skim", "convert", "train", "tune", "predict")


class PipelineConfig(BaseConfig):
    """A whole chain: a section per stage and a ``cluster:`` block; absent sections are not run."""

    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    source: SourceConfig | None = None
    skim: SkimConfig | None = None
    convert: ConvertConfig | None = None
    train: TrainConfig | None = None
    tune: TuneConfig | None = None
    predict: PredictConfig | None = None
    submit: SubmitConfig | None = None


# --------------------------------------------------------------------------- YAML


class _SafeLoader(yaml.SafeLoader):
    """Safe loader that refuses duplicate keys (a silent override is a classic YAML trap)."""


def _no_duplicates(
    loader: _SafeLoader, node: yaml.MappingNode, deep: bool = False
) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
        if key in seen:
            raise ConfigError(f"duplicate key '{key}' at line {key_node.start_mark.line + 1}")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_SafeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


class _Dumper(yaml.SafeDumper):
    """Keeps key order and writes lists of numbers inline."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = (
        all(isinstance(x, (int, float, str)) and len(str(x)) < 40 for x in data) and len(data) <= 8
    )
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with a safe loader; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (working directory: {Path.cwd()}).")
    try:
        data = yaml.load(path.read_text(), Loader=_SafeLoader)  # noqa: S506 - _SafeLoader is a SafeLoader
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys, not a {type(data).__name__}.")
    return data


def dump_yaml(data: dict[str, Any]) -> str:
    """YAML text of plain data, keys in their given order."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


# --------------------------------------------------------------------------- validation


def _unwrap(annotation: Any) -> Any:
    """Strip Optional/Union-with-None from an annotation."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if models:
            return models[0]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _keys_at(cls: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """Valid keys of the mapping at ``loc`` inside ``cls``, or None if not a model."""
    current: Any = cls
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            fields = {(f.alias or n): f for n, f in current.model_fields.items()}
            fields.update(current.model_fields)
            if part not in fields:
                return None
            current = fields[part].annotation
        elif typing.get_origin(current) in (dict, list):
            current = typing.get_args(current)[-1]
        else:
            return None
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [f.alias or n for n, f in current.model_fields.items()]
    return None


_TYPE_WORDS = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def _describe(error: dict[str, Any], cls: type[BaseModel], prefix: str) -> str:
    loc = tuple(error["loc"])
    # a Union's branch name (e.g. 'list[float]') shows up in loc; keep the user's path only
    user_loc = tuple(
        p for p in loc if not (isinstance(p, str) and ("[" in p or p.startswith("literal")))
    )
    path = ".".join(str(p) for p in ((prefix,) if prefix else ()) + user_loc) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        key = str(user_loc[-1])
        valid = _keys_at(cls, user_loc[:-1]) or []
        near = closest(key, valid)
        hint = f" Did you mean '{near[0]}'?" if near else ""
        return f"unknown key '{path}'.{hint} Valid keys here: {', '.join(valid)}."
    if kind == "missing":
        return f"missing required key '{path}'."
    got = error.get("input")
    got_text = f" (got {got!r}, a {type(got).__name__})" if not isinstance(got, dict) else ""
    if kind in _TYPE_WORDS:
        return f"'{path}' must be {_TYPE_WORDS[kind]}{got_text}."
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return f"'{path}' must be one of {expected}{got_text}."
    return f"'{path}': {error['msg']}{got_text}."


def validate(cls: type[C], data: Any, *, source: str | None = None, prefix: str = "") -> C:
    """Build ``cls`` from plain data, turning pydantic's errors into one :class:`ConfigError`."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        # For a Union field pydantic reports every branch; the first per location is enough.
        seen: dict[str, str] = {}
        for error in errors:
            text = _describe(error, cls, prefix)
            seen.setdefault(text.split("'")[1] if "'" in text else text, text)
        where = f"{source}: " if source else ""
        lines = list(seen.values())
        if len(lines) == 1:
            raise ConfigError(f"{where}{lines[0]}") from None
        raise ConfigError(where + "invalid configuration:\n  - " + "\n  - ".join(lines)) from None


def build_config(
    cls: type[C], config: C | dict[str, Any] | str | Path | None, overrides: dict[str, Any]
) -> C:
    """What every stage's constructor does: a config object, a dict, a YAML path, and/or keywords.

    Keywords override the fields of ``config``; the result is validated as a whole.
    """
    if config is None:
        data: dict[str, Any] = {}
        source = None
    elif isinstance(config, cls):
        data = config.to_dict()
        source = None
    elif isinstance(config, (str, Path)):
        data = load_yaml(config)
        source = str(config)
    elif isinstance(config, dict):
        data = dict(config)
        source = None
    else:
        raise ConfigError(
            f"expected a {cls.__name__}, a dict or a YAML path, not {type(config).__name__}."
        )
    data.update(
        {k: (v.to_dict() if isinstance(v, BaseConfig) else v) for k, v in overrides.items()}
    )
    return validate(cls, data, source=source)


def load_config(path: str | Path) -> PipelineConfig:
    """Load a pipeline YAML (all sections optional) into a :class:`PipelineConfig`.

    >>> cfg = load_config("pipeline.yaml")  # doctest: +SKIP
    >>> cfg.train.max_epochs  # doctest: +SKIP
    20
    """
    return validate(PipelineConfig, load_yaml(path), source=str(path))


def config_hash(*configs: BaseConfig | None) -> str:
    """A short, stable hash of configs: the key that says "this output is for that config"."""
    payload = json.dumps([c.to_dict() if c is not None else None for c in configs], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
