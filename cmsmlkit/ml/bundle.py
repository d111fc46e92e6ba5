"""The model bundle: everything needed to apply a trained classifier, in one directory.

::

    bundle.json   architecture, features, standardisation, padding, class names,
                  skim/convert configs, provenance, metrics, versions, file hashes
    model.pt      the state_dict only (read back with torch.load(weights_only=True))
    model.onnx    the network with its probabilities, for ONNX Runtime (CMSSW): input
                  "features" [batch, n_inputs] float32, output "probabilities" [batch, C]
    model.ts      the same as TorchScript (torch.jit.load; coffea's torch_wrapper)
    metrics.json  the metrics alone, for a quick look
    figures/      <name>.png and <name>.pdf

:func:`save_bundle` writes it atomically (a reader sees the old bundle or the
new one, never half of one); :class:`Bundle` reads it back, checks it, and
predicts with exactly the training's preprocessing.

>>> from cmsmlkit.ml.bundle import Bundle
>>> bundle = Bundle.load("model")  # doctest: +SKIP
>>> bundle.predict_proba({"scalars/ht": ht, "objects/GoodJet/pt": jet_pt, ...})  # doctest: +SKIP
array([[0.91, 0.09], ...], dtype=float32)
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import pickle
import platform
import shutil
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..config import ModelConfig
from ..errors import BundleError
from .dataset import (
    FeatureSpec,
    InputLayout,
    Standardiser,
    check_finite,
    feature_matrix,
    file_sha256,
)
from .models import MLP, WithProbabilities, build_model, probabilities

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["FORMAT_VERSION", "Bundle", "save_bundle"]

#: Version of the bundle layout; a reader refuses bundles with a larger number.
FORMAT_VERSION = 1

#: Largest difference allowed between ONNX Runtime's and torch's probabilities.
ONNX_TOLERANCE = 1e-5

_ONNX_OPSET = 17


# --------------------------------------------------------------------------- helpers


def _plain(value: Any) -> Any:
    """``value`` as strict JSON data: numpy and Path made plain, NaN and infinity made null."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, torch.Tensor):
        return _plain(value.detach().cpu().tolist())
    return value


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(_plain(data), indent=2, allow_nan=False) + "\n")


def _versions() -> dict[str, str]:
    from .. import __version__

    versions = {
        "cmsmlkit": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    for package in ("lightning", "onnxruntime"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return versions


def _export_onnx(net: nn.Module, n_inputs: int, n_classes: int, n_out: int, target: Path) -> None:
    """Export ``net`` + probabilities to ``target`` and check ONNX Runtime agrees with torch."""
    wrapper = WithProbabilities(net, n_classes, n_out).eval()
    example = torch.zeros(2, n_inputs, dtype=torch.float32)
    torch.onnx.export(
        wrapper,
        (example,),
        str(target),
        input_names=["features"],
        output_names=["probabilities"],
        dynamic_axes={"features": {0: "batch"}, "probabilities": {0: "batch"}},
        opset_version=_ONNX_OPSET,
        dynamo=False,
    )
    import onnxruntime

    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    for batch in (1, 7):
        x = torch.randn(batch, n_inputs, generator=generator)
        with torch.no_grad():
            expected = wrapper(x).numpy()
        (got,) = session.run(["probabilities"], {"features": x.numpy()})
        diff = float(np.max(np.abs(got - expected)))
        if not diff <= ONNX_TOLERANCE:
            raise BundleError(
                f"the ONNX export differs from the torch model by {diff:.3g} (allowed "
                f"{ONNX_TOLERANCE:g}) for a batch of {batch}; the model uses an operation that "
                "ONNX Runtime computes differently. Report it with the model configuration."
            )


def _export_torchscript(
    net: nn.Module, n_inputs: int, n_classes: int, n_out: int, target: Path
) -> None:
    """Trace ``net`` + probabilities to TorchScript and check the traced graph agrees."""
    wrapper = WithProbabilities(net, n_classes, n_out).eval()
    generator = torch.Generator().manual_seed(1)
    example = torch.randn(4, n_inputs, generator=generator)
    with torch.no_grad():
        try:
            traced = torch.jit.trace(wrapper, (example,), check_trace=False)
        except Exception as exc:
            raise BundleError(
                f"the model cannot be traced to TorchScript ({type(exc).__name__}: {exc}); "
                "its forward must take one float tensor [batch, n_inputs]."
            ) from None
        x = torch.randn(9, n_inputs, generator=generator)
        diff = float((traced(x) - wrapper(x)).abs().max())
    if not diff <= ONNX_TOLERANCE:
        raise BundleError(
            f"the TorchScript export differs from the torch model by {diff:.3g}: the forward "
            "depends on the batch size or on Python control flow that tracing cannot record."
        )
    torch.jit.save(traced, str(target))


def _write_contents(
    directory: Path, model: nn.Module, info: Mapping[str, Any], figures: Mapping[str, Figure] | None
) -> None:
    model_info = info.get("model") or {}
    if "n_inputs" not in model_info or "n_classes" not in model_info:
        raise BundleError("info['model'] must hold 'n_inputs' and 'n_classes' of the network.")
    net = copy.deepcopy(model).cpu().float().eval()
    state = {key: value.detach().clone() for key, value in net.state_dict().items()}
    torch.save(state, directory / "model.pt")
    n_inputs, n_classes = int(model_info["n_inputs"]), int(model_info["n_classes"])
    with torch.no_grad():
        n_out = int(net(torch.zeros(2, n_inputs)).shape[1])
    if n_out not in (n_classes, 1 if n_classes == 2 else n_classes):
        raise BundleError(
            f"the network gives {n_out} outputs for {n_classes} classes; it must give "
            f"{'1 (binary) or 2' if n_classes == 2 else n_classes} logits."
        )
    _export_onnx(net, n_inputs, n_classes, n_out, directory / "model.onnx")
    _export_torchscript(net, n_inputs, n_classes, n_out, directory / "model.ts")
    if figures:
        from ..plots import save_figure

        for name, fig in figures.items():
            save_figure(fig, directory / "figures", name)
    _write_json(directory / "metrics.json", info.get("metrics") or {})
    bundle_json = {
        **info,
        "model": {**model_info, "n_outputs": n_out},
        "format_version": FORMAT_VERSION,
        "versions": _versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": {
            name: file_sha256(directory / name) for name in ("model.pt", "model.onnx", "model.ts")
        },
    }
    _write_json(directory / "bundle.json", bundle_json)


def save_bundle(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    info: Mapping[str, Any],
    figures: Mapping[str, Figure] | None = None,
) -> Path:
    """Write a model bundle to the directory ``path`` and return it.

    Everything is built in ``<path>.tmp`` and swapped into place at the end,
    replacing a bundle already at ``path``; when anything fails, the old
    bundle stays as it was and no ``.tmp`` directory is left behind.

    Parameters
    ----------
    path
        The bundle directory.
    model
        The network mapping standardised rows [B, D] to logits [B, C]
        (it is copied to the CPU; the caller's model is not changed).
    info
        What ``bundle.json`` holds: ``model`` (ModelConfig fields plus
        ``n_inputs``, ``n_classes`` and ``n_outputs``), ``layout`` (the
        :class:`~cmsmlkit.ml.dataset.InputLayout`, when the rows carry masks), ``features``,
        ``standardisation``,
        ``class_names``, ``padding``, ``skim``, ``convert``, ``train``,
        ``provenance``, ``metrics``, ``history``. NaN and infinite numbers are
        written as ``null`` (strict JSON).
    figures
        Figures to save as ``figures/<name>.png`` and ``.pdf``.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BundleError(
            f"cannot write a model bundle to {path}: it exists and is not a directory."
        )
    if path.is_dir() and any(path.iterdir()) and not (path / "bundle.json").is_file():
        raise BundleError(
            f"{path} holds files but no bundle.json, so it is not a model bundle and will not be "
            "replaced; choose another output directory or empty it."
        )
    tmp = path.with_name(path.name + ".tmp")
    old = path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_contents(tmp, model, info, figures)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old, path)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- reading


class Bundle:
    """A saved model bundle, checked and ready to predict.

    Use :meth:`load`; it checks the layout, the format version and the
    sha256 of ``model.pt``, and builds the network with its weights.

    Examples
    --------
    >>> bundle = Bundle.load("model")  # doctest: +SKIP
    >>> bundle  # doctest: +SKIP
    Bundle('model': 2 classes ['signal', 'background'], 14 features / 52 inputs, MLP [64, 64], test AUC 0.93)
    >>> proba = bundle.predict_proba(columns)  # doctest: +SKIP
    >>> proba.shape  # doctest: +SKIP
    (1000, 2)
    """

    def __init__(self, path: str | os.PathLike[str], info: Mapping[str, Any]) -> None:
        self.path = Path(path)
        self.info = dict(info)
        self._model: nn.Module | None = None
        try:
            self.features = [FeatureSpec.from_dict(d) for d in self.info["features"]]
            self.standardiser = Standardiser.from_dict(self.info["standardisation"])
            self.class_names = [str(c) for c in self.info["class_names"]]
            model_info = self.info["model"]
            self.n_inputs = int(model_info["n_inputs"])
            self.n_classes = int(model_info["n_classes"])
            self.layout = (
                InputLayout.from_dict(self.info["layout"])
                if self.info.get("layout")
                else InputLayout(self.features)
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(
                f"{self.path / 'bundle.json'} is incomplete or malformed ({type(exc).__name__}: {exc}); "
                "it was not written by cmsmlkit's save_bundle. Train the model again."
            ) from None
        if (
            self.standardiser.n_inputs != self.layout.n_features
            or self.layout.n_inputs != self.n_inputs
        ):
            raise BundleError(
                f"{self.path / 'bundle.json'}: the standardisation covers {self.standardiser.n_inputs} "
                f"inputs and the layout {self.layout.n_inputs} but the model has {self.n_inputs}. "
                "Train the model again."
            )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Bundle:
        """Read and check the bundle in directory ``path``; raise :class:`BundleError` if unusable."""
        path = Path(path)
        if not path.is_dir():
            raise BundleError(
                f"model bundle {path} does not exist (working directory: {Path.cwd()}); "
                "give the train.output directory of a finished training."
            )
        json_path = path / "bundle.json"
        for name in ("bundle.json", "model.pt"):
            if not (path / name).is_file():
                raise BundleError(
                    f"model bundle {path} has no {name}: it is incomplete. Train the model again "
                    "(or copy the whole directory)."
                )
        try:
            info = json.loads(json_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(
                f"{json_path} is not valid JSON ({exc}); the bundle is corrupt."
            ) from None
        if not isinstance(info, dict) or "format_version" not in info:
            raise BundleError(
                f"{json_path} has no format_version: it is not a cmsmlkit model bundle."
            )
        version = info["format_version"]
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise BundleError(
                f"model bundle {path} was made by a newer cmsmlkit (format {version}; this one reads "
                f"up to {FORMAT_VERSION}); upgrade: pip install -U cmsmlkit"
            )
        expected = (info.get("files") or {}).get("model.pt")
        if expected is not None:
            actual = file_sha256(path / "model.pt")
            if actual != expected:
                raise BundleError(
                    f"{path / 'model.pt'} does not match the sha256 recorded in bundle.json "
                    f"({actual[:12]}... != {expected[:12]}...): the file changed or was corrupted "
                    "after saving. Copy the bundle again or retrain."
                )
        bundle = cls(path, info)
        bundle.model()
        return bundle

    # ------------------------------------------------------------------ properties

    @property
    def padding(self) -> dict[str, Any]:
        """Collection -> ``{max_len, sort_by, pad_value, fields, n_truncated}`` used at conversion."""
        return dict(self.info.get("padding") or {})

    @property
    def skim_config(self) -> dict[str, Any] | None:
        """The skim configuration (selection, kept collections) as plain data, if recorded."""
        return self.info.get("skim")

    @property
    def convert_config(self) -> dict[str, Any] | None:
        """The conversion configuration (padding, scalars) as plain data, if recorded."""
        return self.info.get("convert")

    @property
    def metrics(self) -> dict[str, Any]:
        """The metrics of the training (test AUC, ...)."""
        return dict(self.info.get("metrics") or {})

    @property
    def onnx_path(self) -> Path:
        """The ONNX file: input "features" [batch, D], output "probabilities" [batch, C]."""
        return self.path / "model.onnx"

    @property
    def torchscript_path(self) -> Path:
        """The TorchScript file (``torch.jit.load``; coffea's ``torch_wrapper``): input rows
        [batch, n_inputs] float32 as :meth:`rows` makes them, output probabilities [batch, C]."""
        return self.path / "model.ts"

    @property
    def model_config(self) -> ModelConfig:
        """The architecture as a :class:`~cmsmlkit.config.ModelConfig`."""
        fields = {k: v for k, v in self.info["model"].items() if k in ModelConfig.model_fields}
        return ModelConfig.model_validate(fields)

    # ------------------------------------------------------------------ work

    def model(self) -> nn.Module:
        """The network in eval mode with its weights, on the CPU (built once, then cached)."""
        if self._model is not None:
            return self._model
        weights = self.path / "model.pt"
        try:
            config = self.model_config
        except Exception as exc:
            raise BundleError(
                f"{self.path / 'bundle.json'}: invalid model architecture: {exc}"
            ) from None
        try:
            n_out = self.info["model"].get("n_outputs") or self.n_classes
            if n_out == self.n_classes == 2 and config.type == "mlp":
                # bundles of cmsmlkit <= 0.1 (and two-logit networks): one logit per class
                net: nn.Module = MLP(
                    self.n_inputs,
                    self.n_classes,
                    list(config.hidden),
                    config.dropout,
                    config.activation,
                )
            else:
                net = build_model(config, self.n_inputs, self.n_classes, self.layout)
        except Exception as exc:
            raise BundleError(
                f"{self.path / 'bundle.json'}: cannot build the model ({exc})"
            ) from None
        try:
            state = torch.load(weights, weights_only=True, map_location="cpu")
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BundleError(
                f"{weights} cannot be read as weights ({first}). It must hold a state_dict of "
                "tensors only; anything else is refused for safety. Retrain or restore the file."
            ) from None
        if not isinstance(state, Mapping):
            raise BundleError(f"{weights} holds a {type(state).__name__}, not a state_dict.")
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise BundleError(
                f"the weights in {weights} do not match the architecture in bundle.json "
                f"({config.type.upper()} {list(config.hidden)}, {self.n_inputs} inputs, "
                f"{self.n_classes} classes): {str(exc).splitlines()[0]} Retrain the model."
            ) from None
        self._model = net.eval()
        return self._model

    def rows(self, columns: Mapping[str, Any], rows: slice | None = None) -> np.ndarray:
        """The network's input rows float32 [N, n_inputs] of ``columns`` (all events, or ``rows``):
        the features standardised as in training, then the masks of the layout."""
        X, valid = feature_matrix(columns, self.features, rows=rows)
        check_finite(X, valid, self.features)
        return self.layout.rows(X, valid, self.standardiser)

    def predict_proba(self, columns: Mapping[str, Any], batch_size: int = 65536) -> np.ndarray:
        """Class probabilities float32 [N, C] for the events of ``columns``.

        ``columns`` is a Columns mapping or an open HDF5 file holding the
        bundle's features with the bundle's padding. The rows are
        standardised as in training and passed through the network in batches
        of ``batch_size``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        first = self.features[0].path
        if first not in columns:
            # feature_matrix names the missing feature
            feature_matrix(columns, self.features, rows=slice(0, 0))
        n_events = len(columns[first])
        net = self.model()
        out = np.empty((n_events, self.n_classes), dtype=np.float32)
        with torch.no_grad():
            for start in range(0, n_events, batch_size):
                rows = slice(start, min(start + batch_size, n_events))
                logits = net(torch.from_numpy(self.rows(columns, rows)))
                out[rows] = probabilities(logits, self.n_classes).numpy()
        return out

    def __repr__(self) -> str:
        config = self.info.get("model", {})
        arch = f"{str(config.get('type', 'mlp')).upper()} {config.get('hidden', [])}"
        parts = [
            f"{self.n_classes} classes {self.class_names}",
            f"{len(self.features)} features / {self.n_inputs} inputs",
            arch,
        ]
        metrics = self.metrics
        for key, label in (("test_auc", "test AUC"), ("val_auc", "val AUC")):
            value = metrics.get(key)
            if isinstance(value, (int, float)):
                parts.append(f"{label} {value:.2f}")
                break
        return f"Bundle({self.path.name!r}: {', '.join(parts)})"
