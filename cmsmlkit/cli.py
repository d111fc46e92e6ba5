"""The ``cmsml`` command: the same stages as the Python API, driven by YAML.

Examples
--------
    cmsml demo --out demo              # toy NanoAOD -> HDF5 -> model -> predictions
    cmsml run pipeline.yaml            # every stage configured in the file
    cmsml train pipeline.yaml          # one stage
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from . import __version__
from .errors import CmsmlError

__all__ = ["main", "build_parser"]

_STAGE_HELP = {
    "skim": (
        "apply the selection to the source datasets",
        "Run the Skimmer: read the `source:` datasets, apply the `skim:` selection "
        "(objects, cuts, variables) and write skimmed ROOT files to skim.output.",
    ),
    "convert": (
        "write the padded HDF5 training file",
        "Run the HDF5Writer: skim the `source:` datasets with the `skim:` selection "
        "(if present) and write convert.output, with jagged collections padded to fixed length.",
    ),
    "train": (
        "train a classifier and save the model bundle",
        "Run the Trainer on train.inputs (default: convert.output) and write the model "
        "bundle (bundle.json, model.pt, model.onnx, figures/, metrics.json) to train.output.",
    ),
    "tune": (
        "search architectures and hyperparameters with Optuna",
        "Run the Tuner: an Optuna study of tune.n_trials models built from the `train:` "
        "section; the best becomes the bundle in tune.output/best.",
    ),
    "predict": (
        "score new NanoAOD or HDF5 files with a bundle",
        "Run the Predictor: apply the bundle's selection, padding and standardisation to "
        "predict.inputs and write one score file per input to predict.output.",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``cmsml`` (exposed for the docs and the tests)."""
    parser = argparse.ArgumentParser(
        prog="cmsml",
        description=(
            "cmsmlkit: from CMS NanoAOD to a trained, tuned and deployed classifier. "
            "Every stage reads a pipeline YAML (see `cmsml demo` for a complete one)."
        ),
        epilog="Start with `cmsml demo --out demo`, then read demo/pipeline.yaml.",
    )
    parser.add_argument("--version", action="version", version=f"cmsmlkit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each stage does")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser(
        "demo",
        help="run the whole chain on generated demo data",
        description=(
            "Generate toy NanoAOD files (ttbar signal, W+jets and Drell-Yan backgrounds), "
            "write the demo pipeline YAML next to them and run every stage: skim, convert "
            "to HDF5, train, tune and predict. Prints where each output went and the test AUC."
        ),
    )
    demo.add_argument(
        "--out", default="cmsml-demo", help="directory for everything (default: %(default)s)"
    )
    demo.add_argument(
        "--events",
        type=int,
        default=20_000,
        help="events generated per process (default: %(default)s)",
    )
    demo.add_argument(
        "--force", action="store_true", help="rerun stages even if their outputs exist"
    )

    run = sub.add_parser(
        "run",
        help="run every stage of a pipeline YAML",
        description=(
            "Run the stages configured in PIPELINE (skim, convert, train, tune, predict) in order. "
            "A stage whose outputs exist for the same configuration is skipped."
        ),
    )
    run.add_argument("pipeline", metavar="PIPELINE", help="pipeline YAML file")
    run.add_argument("--stages", help="comma-separated subset of stages to run, e.g. train,predict")
    run.add_argument(
        "--force", action="store_true", help="rerun stages even if their outputs exist"
    )

    for stage, (short, long) in _STAGE_HELP.items():
        p = sub.add_parser(stage, help=short, description=long)
        p.add_argument(
            "config", metavar="CONFIG", help="pipeline YAML holding the sections this stage needs"
        )
        p.add_argument("--force", action="store_true", help="rerun even if the outputs exist")

    from .submit import add_parsers as add_submit_parsers

    add_submit_parsers(sub)  # `cmsml submit`, `cmsml jobs`
    _add_doctor_and_init(sub)  # `cmsml doctor`, `cmsml init`
    return parser


def _add_doctor_and_init(sub: Any) -> None:
    doctor = sub.add_parser(
        "doctor",
        help="check the environment and say how to fix what is missing",
        description=(
            "Check this environment for cmsmlkit: package versions, the GRID proxy and its time "
            "left, an XRootD redirector, dasgoclient, a GPU, and the HTCondor/SLURM tools. Prints "
            "OK/WARN/MISSING with the fix for each; exits 1 only if something required is missing."
        ),
    )
    doctor.add_argument(
        "--redirector",
        default="root://cms-xrd-global.cern.ch/",
        help="XRootD redirector to ping (default: %(default)s)",
    )
    doctor.add_argument("--offline", action="store_true", help="skip the XRootD ping")
    doctor.add_argument(
        "--timeout", type=float, default=5.0, help="seconds for the ping (default: %(default)s)"
    )
    init = sub.add_parser(
        "init",
        help="write a commented starter pipeline YAML for your datasets",
        description=(
            "Write a commented starter pipeline YAML (source, skim, convert, train; tune and "
            "predict commented out) for your datasets, each given as NAME=LABEL:FILES, e.g. "
            "--dataset ttbar=signal:/eos/user/j/jdoe/ttbar/*.root. An existing file is kept "
            "unless --force."
        ),
    )
    init.add_argument(
        "path", metavar="PIPELINE", nargs="?", default="pipeline.yaml", help="file to write"
    )
    init.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="NAME=LABEL:FILES",
        help="a dataset, its class and its files (comma-separated); repeat for each dataset",
    )
    init.add_argument(
        "--cluster",
        choices=["local", "htcondor", "slurm"],
        default="local",
        help="where the stages run (default: %(default)s)",
    )
    init.add_argument("--force", action="store_true", help="overwrite an existing file")


def _doctor(args: argparse.Namespace) -> int:
    from . import doctor

    checks = doctor.run_checks(
        redirector=args.redirector, network=not args.offline, timeout=args.timeout
    )
    print(doctor.format_table(checks))
    return doctor.exit_status(checks)


def _init(args: argparse.Namespace) -> int:
    from .starter import write_starter

    path = write_starter(args.path, args.dataset, cluster=args.cluster, force=args.force)
    print(f"wrote {path}: edit it, then run `cmsml run {path}`")
    return 0


def _report(result: Any) -> None:
    for stage, paths in result.outputs.items():
        state = " (already done, skipped)" if stage in result.skipped else ""
        for path in paths:
            print(f"{stage:>8}: {path}{state}")
    auc = result.test_auc
    if auc is not None:
        print(f"AUC = {auc:.3f}")


def _demo(args: argparse.Namespace) -> Any:
    from .data import toy
    from .pipeline import Pipeline

    out = Path(args.out).resolve()
    data = out / "data"
    pipeline_yaml = out / "pipeline.yaml"
    if args.force or not (data / "new.root").is_file():
        print(f"writing demo NanoAOD ({args.events} events per process) to {data}")
        toy.make_demo(data, n_events=args.events)
    if args.force or not pipeline_yaml.is_file():
        with resources.as_file(resources.files("cmsmlkit") / "resources" / "demo.yaml") as src:
            shutil.copyfile(src, pipeline_yaml)
    print(f"pipeline: {pipeline_yaml}")
    return Pipeline(pipeline_yaml).run(force=args.force)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``cmsml``; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command in ("submit", "jobs"):
            from .submit import run_command

            return run_command(args)
        if args.command in ("doctor", "init"):
            return _doctor(args) if args.command == "doctor" else _init(args)
        if args.command == "demo":
            result = _demo(args)
        else:
            from .pipeline import Pipeline

            path = args.pipeline if args.command == "run" else args.config
            pipeline = Pipeline(path)
            if args.command == "run":
                stages = [s.strip() for s in args.stages.split(",")] if args.stages else None
            else:
                stages = [args.command]
            result = pipeline.run(stages, force=args.force)
    except CmsmlError as exc:
        print(f"cmsml: error: {exc}", file=sys.stderr)
        return 2
    _report(result)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
