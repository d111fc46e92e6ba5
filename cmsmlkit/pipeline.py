"""Run the configured stages in order, skipping those already done for the same config.

A pipeline YAML holds a section per stage (``source``, ``skim``, ``convert``,
``train``, ``tune``, ``predict``) and a ``cluster:`` block. Relative paths in
it are taken relative to the YAML file's directory, so a pipeline directory
can be moved or copied whole.

>>> from cmsmlkit import Pipeline
>>> result = Pipeline("pipeline.yaml").run()  # doctest: +SKIP
>>> result.outputs["train"]  # doctest: +SKIP
[PosixPath('.../model/bundle.json')]
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .config import STAGES, PipelineConfig, build_config, config_hash
from .errors import ConfigError

__all__ = ["NEEDS", "Pipeline", "PipelineResult"]

log = logging.getLogger(__name__)

#: The sections each stage needs, besides its own.
NEEDS: dict[str, tuple[str, ...]] = {
    "skim": ("source", "skim"),
    "convert": ("convert",),
    "train": ("train",),
    "tune": ("train", "tune"),
    "predict": ("predict",),
}
#: The sections whose config decides whether a stage's output is still valid.
_DEPENDS: dict[str, tuple[str, ...]] = {
    "skim": ("source", "skim"),
    "convert": ("source", "skim", "convert"),
    "train": ("source", "skim", "convert", "train"),
    "tune": ("source", "skim", "convert", "train", "tune"),
    "predict": ("source", "skim", "convert", "train", "tune", "predict"),
}


@dataclass
class PipelineResult:
    """What a pipeline run did: per stage, its outputs, whether it was skipped, its result."""

    outputs: dict[str, list[Path]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def test_auc(self) -> float | None:
        """The test AUC of the trained model, when the train stage ran or was found done."""
        train = self.results.get("train")
        metrics = getattr(train, "metrics", None) or {}
        return metrics.get("test_auc")

    def __repr__(self) -> str:
        lines = ["PipelineResult("]
        for stage, paths in self.outputs.items():
            state = "skipped, already done" if stage in self.skipped else "ran"
            lines.append(f"  {stage} ({state}): " + ", ".join(str(p) for p in paths))
        lines.append(")")
        return "\n".join(lines)


def _is_remote(path: str) -> bool:
    return "://" in path


class Pipeline:
    """Runs the stages of a :class:`~cmsmlkit.config.PipelineConfig` in order.

    Parameters
    ----------
    config
        A ``PipelineConfig``, a dict of sections, or the path of a pipeline YAML.
    base_dir
        Directory that relative paths are taken from; defaults to the YAML
        file's directory, or the working directory for a config object.
    """

    def __init__(
        self,
        config: PipelineConfig | dict[str, Any] | str | Path,
        *,
        base_dir: str | Path | None = None,
    ) -> None:
        if isinstance(config, (str, Path)) and base_dir is None:
            base_dir = Path(config).resolve().parent
        self.config = build_config(PipelineConfig, config, {})
        self.base_dir = Path(base_dir or Path.cwd()).resolve()
        self._skim_result: Any = None

    def __repr__(self) -> str:
        present = [s for s in ("source", *STAGES) if getattr(self.config, s) is not None]
        return f"Pipeline(base_dir={str(self.base_dir)!r}, sections={present})"

    # ------------------------------------------------------------------ paths

    def path(self, value: str | Path) -> Path:
        """``value`` as an absolute path, relative ones taken from ``base_dir``."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    def _files(self, values: list[str]) -> list[str]:
        return [v if _is_remote(v) else str(self.path(v)) for v in values]

    def _resolved(self, section: str) -> Any:
        """A copy of one section with every path made absolute."""
        cfg = getattr(self.config, section)
        if cfg is None:
            return None
        if section == "source":
            datasets = {
                name: ds.model_copy(
                    update={
                        "files": self._files(ds.files),
                        "lumi_mask": str(self.path(ds.lumi_mask)) if ds.lumi_mask else None,
                    }
                )
                for name, ds in cfg.datasets.items()
            }
            return cfg.model_copy(update={"datasets": datasets})
        update: dict[str, Any] = {}
        for key in ("output", "bundle"):
            value = getattr(cfg, key, None)
            if isinstance(value, str):
                update[key] = str(self.path(value))
        inputs = getattr(cfg, "inputs", None)
        if isinstance(inputs, dict):  # convert: {label: [files]}
            update["inputs"] = {label: self._files(files) for label, files in inputs.items()}
        elif inputs:
            update["inputs"] = self._files(inputs)
        storage = getattr(cfg, "storage", None)
        if isinstance(storage, str):
            for prefix in ("sqlite:///", "journal://"):
                rest = storage[len(prefix) :] if storage.startswith(prefix) else None
                if rest and not rest.startswith("/"):  # a relative file: from the YAML's directory
                    update["storage"] = prefix + str(self.path(rest))
        for key in ("val_inputs", "test_inputs"):
            if getattr(cfg, key, None):
                update[key] = self._files(getattr(cfg, key))
        return cfg.model_copy(update=update)

    # ------------------------------------------------------------------ stamps

    def stamp_path(self, stage: str) -> Path:
        """Where the record of a finished ``stage`` lives: ``<base_dir>/.cmsml/<stage>.json``."""
        return self.base_dir / ".cmsml" / f"{stage}.json"

    def stage_hash(self, stage: str) -> str:
        """The hash of what decides ``stage``'s outputs: its section and every one upstream."""
        return config_hash(*(getattr(self.config, s) for s in _DEPENDS[stage]))

    def _done(self, stage: str) -> list[Path] | None:
        """The outputs of a finished stage for the same config, or None."""
        stamp = self.stamp_path(stage)
        if not stamp.is_file():
            return None
        try:
            record = json.loads(stamp.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        outputs = [Path(p) for p in record.get("outputs", [])]
        if (
            record.get("hash") != self.stage_hash(stage)
            or not outputs
            or not all(p.exists() for p in outputs)
        ):
            return None
        return outputs

    def _mark_done(self, stage: str, outputs: list[Path]) -> None:
        stamp = self.stamp_path(stage)
        stamp.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "stage": stage,
            "hash": self.stage_hash(stage),
            "outputs": [str(p) for p in outputs],
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        tmp = stamp.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, stamp)

    # ------------------------------------------------------------------ stages

    def stages(self) -> list[str]:
        """The stages this config can run, in order."""
        present = [s for s in STAGES if getattr(self.config, s) is not None]
        # A skim without an output directory only feeds the convert stage in memory.
        if "skim" in present and self.config.skim is not None and self.config.skim.output is None:
            present.remove("skim")
        return present

    def run(self, stages: list[str] | None = None, *, force: bool = False) -> PipelineResult:
        """Run ``stages`` (default: every configured one) in order.

        A stage whose outputs exist for the same config (its own section and
        every section upstream of it) is skipped unless ``force``.
        """
        wanted = self.stages() if stages is None else list(stages)
        for stage in wanted:
            if stage not in STAGES:
                raise ConfigError(f"unknown stage '{stage}'; stages are {', '.join(STAGES)}.")
            missing = [s for s in NEEDS[stage] if getattr(self.config, s) is None]
            if (
                stage == "convert"
                and self.config.source is None
                and not (self.config.convert is not None and self.config.convert.inputs)
            ):
                missing.append("source")
            if missing:
                raise ConfigError(
                    f"stage '{stage}' needs the section(s) {', '.join(repr(m + ':') for m in missing)} "
                    "in the pipeline YAML."
                )
        result = PipelineResult()
        for stage in wanted:
            done = None if force else self._done(stage)
            if done is not None:
                log.info("%s: already done for this config, skipping (%s)", stage, done[0])
                result.outputs[stage] = done
                result.skipped.append(stage)
                if stage == "train":
                    result.results["train"] = _FinishedTraining.from_bundle_dir(done[0].parent)
                continue
            outputs, stage_result = getattr(self, f"_run_{stage}")()
            self._mark_done(stage, outputs)
            result.outputs[stage] = outputs
            result.results[stage] = stage_result
        return result

    def _source(self) -> Any:
        from .data.source import NanoAODSource

        return NanoAODSource(self._resolved("source"))

    def _skim(self) -> Any:
        """Run the skim once per pipeline object (the convert stage reuses it in memory)."""
        if self._skim_result is None:
            from .data.skim import Skimmer

            skimmer = Skimmer(self._resolved("skim"), cluster=self.config.cluster)
            self._skim_result = skimmer.run(self._source().fileset())
        return self._skim_result

    def _run_skim(self) -> tuple[list[Path], Any]:
        result = self._skim()
        return [self.path(self.config.skim.output)], result  # type: ignore[union-attr]

    def _run_convert(self) -> tuple[list[Path], Any]:
        from .data.hdf5 import HDF5Writer

        cfg = self._resolved("convert")
        writer = HDF5Writer(cfg, cluster=self.config.cluster)
        if self.config.skim is not None:
            path = writer.write(self._skim(), skim_config=self.config.skim)
            return [Path(path)], path
        # No selection: stream the NanoAOD files straight into HDF5.
        result = writer.convert(self._source().fileset() if cfg.inputs == {} else None)
        return list(result.outputs), result

    def _train_config(self) -> Any:
        cfg = self._resolved("train")
        if not cfg.inputs:
            if self.config.convert is None:
                raise ConfigError(
                    "train.inputs is empty and there is no 'convert:' section to take it from."
                )
            cfg = cfg.model_copy(update={"inputs": [str(self.path(self.config.convert.output))]})
        return cfg

    def _run_train(self) -> tuple[list[Path], Any]:
        from .ml.trainer import Trainer

        result = Trainer(self._train_config(), cluster=self.config.cluster).fit()
        return [Path(result.bundle_path) / "bundle.json"], result

    def _run_tune(self) -> tuple[list[Path], Any]:
        from .ml.tuner import Tuner

        tuner = Tuner(
            self._resolved("tune"), train=self._train_config(), cluster=self.config.cluster
        )
        result = tuner.run()
        return [Path(result.bundle_path) / "bundle.json"], result

    def _run_predict(self) -> tuple[list[Path], Any]:
        from .ml.predictor import Predictor

        cfg = self._resolved("predict")
        if not cfg.inputs:
            raise ConfigError("predict.inputs is empty: list the NanoAOD or HDF5 files to score.")
        predictor = Predictor.from_bundle(cfg.bundle, config=cfg, cluster=self.config.cluster)
        paths = predictor.predict_files(cfg.inputs, cfg.output)
        return [Path(p) for p in paths], paths


@dataclass
class _FinishedTraining:
    """The metrics of a training found finished on disk (a skipped train stage)."""

    bundle_path: Path
    metrics: dict[str, Any]

    @classmethod
    def from_bundle_dir(cls, path: Path) -> _FinishedTraining:
        metrics_file = path / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        return cls(bundle_path=path, metrics=metrics)
