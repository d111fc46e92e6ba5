"""Benchmark of the Tuner on the demo data: what pruning saves, and what a second worker adds.

In one run, on the demo chain (toy NanoAOD -> skim -> HDF5, written to a temp dir):

1. the same study (same seed, same search space) with ``--trials`` trials
   without pruning and with each pruner of ``--pruners`` (median, hyperband):
   the best validation AUC and the epochs trained in all, and their differences
   (aim: within 0.005 AUC with at most half the epochs);
2. ``--throughput-trials`` trials (no pruning) with 1 worker (in this process)
   and with 2 local dask workers: trials per minute, timed from the start of
   the first trial to the end of the last one.

Run: ``.venv/bin/python benchmarks/tune.py [--events N] [--trials 30] [--epochs 8]``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

from cmsmlkit.data.toy import DEMO_PADDING as PADDING
from cmsmlkit.data.toy import DEMO_SKIM as SELECTION

SPACE = {
    "depth": {"low": 1, "high": 3},
    "width": {"low": 8, "high": 128, "log": True},
    "learning_rate": {"low": 1.0e-5, "high": 3.0e-2, "log": True},
    "model.dropout": {"low": 0.0, "high": 0.5},
    "model.activation": ["relu", "gelu", "tanh"],
}


def demo_h5(directory: Path, n_events: int) -> Path:
    """The demo chain: toy NanoAOD, skimmed, padded into one HDF5 file."""
    from cmsmlkit import HDF5Writer, NanoAODSource, Skimmer
    from cmsmlkit.data import toy

    files = toy.make_demo(directory / "nanoaod", n_events=n_events, seed=7)
    labels = {"ttbar": "signal", "wjets": "background", "dy": "background"}
    source = NanoAODSource(
        datasets={
            name: {"files": [str(p) for p in files[name]], "label": label}
            for name, label in labels.items()
        }
    )
    skimmer = Skimmer(SELECTION)
    skim = skimmer.run(source.fileset())
    writer = HDF5Writer(output=str(directory / "demo.h5"), collections=PADDING)
    return Path(writer.write(skim, skim_config=skimmer.config))


def steady_rate(result, workers: int) -> float:  # noqa: ANN001
    """Trials per minute once every worker has finished its first trial (imports, warm-up).

    Counted from the ``workers``-th trial's end to the last one's, from the study's records.
    """
    import optuna

    storage = f"sqlite:///{Path(result.summary_path).parent / 'study.db'}"
    study = optuna.load_study(study_name="cmsmlkit", storage=storage)
    ends = sorted(t.datetime_complete for t in study.trials if t.datetime_complete)
    minutes = (ends[-1] - ends[workers - 1]).total_seconds() / 60
    return (len(ends) - workers) / minutes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=4000, help="toy events per process")
    parser.add_argument(
        "--pruners", default="median,hyperband", help="pruners to compare with no pruning"
    )
    parser.add_argument("--trials", type=int, default=30, help="trials per study (pruning)")
    parser.add_argument("--epochs", type=int, default=8, help="epochs per trial at most")
    parser.add_argument("--patience", type=int, default=3, help="early-stopping patience")
    parser.add_argument(
        "--warmup", type=int, default=1, help="median pruner: epochs before a trial can be pruned"
    )
    parser.add_argument(
        "--throughput-trials", type=int, default=8, help="trials per throughput study"
    )
    parser.add_argument("--workdir", help="keep the outputs here instead of a temp dir")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    from cmsmlkit import Tuner
    from cmsmlkit.config import ClusterConfig

    with tempfile.TemporaryDirectory(prefix="cmsml-bench-tune-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        h5 = demo_h5(work, args.events)
        import h5py

        with h5py.File(h5) as f:
            n = len(f["label"])
        print(f"demo data: {n} events after selection ({time.perf_counter() - t0:.1f} s)")
        train = {
            "inputs": [str(h5)],
            "batch_size": 256,
            "patience": args.patience,
            "accelerator": "cpu",
            "tracking": {"enabled": False},
        }
        common = {
            "n_trials": args.trials,
            "max_epochs": args.epochs,
            "space": SPACE,
            "figures": False,
            "threads_per_trial": 1,
        }

        # 1. pruning against no pruning, the same sampler seed and space
        results = {}
        for pruner in ["none", *args.pruners.split(",")]:
            start = time.perf_counter()
            tuner = Tuner(
                output=str(work / f"prune-{pruner}"),
                train=train,
                pruner=pruner,
                pruner_warmup_epochs=args.warmup,
                **common,
            )
            results[pruner] = result = tuner.run()
            print(
                f"pruner={pruner:6s}: best val AUC {result.best_value:.4f}, "
                f"{result.total_epochs} epochs in {result.n_trials} trials "
                f"({result.n_pruned} pruned), {time.perf_counter() - start:.0f} s"
            )
        full = results.pop("none")
        for pruner, pruned in results.items():
            delta = full.best_value - pruned.best_value
            ratio = pruned.total_epochs / full.total_epochs
            print(
                f"{pruner} pruning vs none: best val AUC {pruned.best_value:.4f} vs "
                f"{full.best_value:.4f} (lower by {delta:+.4f}; aim <= 0.005), epochs "
                f"{pruned.total_epochs} vs {full.total_epochs} (ratio {ratio:.2f}; aim <= 0.50)"
            )

        # 2. throughput: trials per minute with 1 worker and with 2 local workers
        rates = {}
        for workers in (1, 2):
            start = time.perf_counter()
            tuner = Tuner(
                output=str(work / f"workers-{workers}"),
                train=train,
                cluster=ClusterConfig(workers=workers),
                pruner="none",
                **{**common, "n_trials": args.throughput_trials},
            )
            result = tuner.run()
            seconds = time.perf_counter() - start
            rates[workers] = steady_rate(result, workers)
            print(
                f"{workers} worker(s): {rates[workers]:.2f} trials/minute after warm-up; "
                f"{result.n_trials} trials in {seconds:.0f} s end to end "
                f"({60 * result.n_trials / seconds:.2f} trials/minute, cluster start included)"
            )
        print(f"2 workers / 1 worker (after warm-up): {rates[2] / rates[1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
