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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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
    "TuneConfig",
    "PredictConfig",
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

    ``local`` runs in-process for one worker, or on a dask LocalCluster.
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


# --------------------------------------------------------------------------- data stages


class DatasetConfig(BaseConfig):
    """One dataset: its files and what it is."""

    files: list[str] = Field(..., min_length=1, description="paths, globs, root:// URLs")
    label: str = Field(..., description="the class this dataset belongs to, e.g. signal")
    is_mc: bool = Field(True, description="simulation (has genWeight) or collision data")
    xsec: float | None = Field(None, gt=0, description="cross-section in pb, for normalisation")
    max_files: int | None = Field(None, ge=1, description="use at most this many files")
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
    compression: Literal["none", "lzf", "gzip"] = Field("lzf", description="HDF5 filter")
    shuffle: bool = Field(True, description="shuffle rows across datasets (seeded)")
    seed: int = Field(42, description="seed of the row shuffle")


# --------------------------------------------------------------------------- ML stages


class ModelConfig(BaseConfig):
    """The network architecture."""

    type: Literal["mlp"] = Field("mlp", description="model family")
    hidden: list[int] = Field(
        default_factory=lambda: [64, 64], min_length=1, description="hidden layer widths"
    )
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout probability")
    activation: Literal["relu", "gelu", "silu", "tanh", "elu"] = Field(
        "relu", description="activation function"
    )


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
    seed: int = Field(42)
    accelerator: str = Field("auto", description="cpu, gpu or auto (a GPU when present)")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("inputs", mode="before")
    @classmethod
    def _one_input_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> TrainConfig:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g} leaves "
                "less than 10% for training; lower them"
            )
        return self


class TuneConfig(BaseConfig):
    """The Tuner: an Optuna study over the Trainer's model."""

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
    seed: int = Field(42)


class PredictConfig(BaseConfig):
    """The Predictor."""

    bundle: str = Field("model", description="directory of the model bundle")
    inputs: list[str] = Field(default_factory=list, description="NanoAOD or HDF5 files or globs")
    output: str = Field("predictions", description="directory of the score files")
    batch_size: int = Field(65536, ge=1)

    @field_validator("inputs", mode="before")
    @classmethod
    def _one_input_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


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
