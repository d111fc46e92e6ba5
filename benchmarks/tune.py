"""Benchmark of the Tuner on the demo data: what pruning saves, and what a second worker adds.

In one run, on the demo chain (toy NanoAOD -> skim -> HDF5, written to a temp dir):

1. the same study (same sampler seed, same search space, same number of trials)
   without pruning and with each pruner of ``--pruners`` at its default settings
   (what ``tune.pruner`` gives without further keys): the best validation AUC and
   the epochs trained in all, and for each pruner the line
   ``epochs pruned/unpruned: R (aim <= 0.5); AUC difference: D (aim <= 0.005)``
   (D: the unpruned best minus the pruned best). ``--seeds 42,7,123`` repeats the
   comparison for several sampler seeds and summarises how often the aim is met;
2. ``--throughput-trials`` trials (no pruning) with 1 worker (in this process)
   and with 2 local dask workers: trials per minute, timed from the start of
   the first trial to the end of the last one (``--throughput-trials 0`` skips it).

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


#: The issue's aim for pruning: at most this share of the unpruned study's epochs ...
AIM_EPOCHS = 0.5
#: ... and a best validation AUC at most this much below the unpruned study's best.
AIM_AUC = 0.005


def pruning_line(pruner: str, full, pruned) -> tuple[float, float, bool]:  # noqa: ANN001
    """Print how ``pruned`` compares with ``full`` (no pruning); its epochs ratio, AUC loss, aim."""
    ratio = pruned.total_epochs / full.total_epochs
    delta = full.best_value - pruned.best_value
    met = ratio <= AIM_EPOCHS and delta <= AIM_AUC
    print(
        f"{pruner}: epochs pruned/unpruned: {ratio:.2f} (aim <= {AIM_EPOCHS}); "
        f"AUC difference: {delta:.4f} (aim <= {AIM_AUC}) "
        f"[{pruned.total_epochs} vs {full.total_epochs} epochs, best val AUC "
        f"{pruned.best_value:.4f} vs {full.best_value:.4f}] -> aim {'met' if met else 'MISSED'}"
    )
    return ratio, delta, met


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=4000, help="toy events per process")
    parser.add_argument(
        "--pruners",
        default="asha,median,percentile,hyperband",
        help="pruners (tune.pruner, at their default settings) to compare with no pruning",
    )
    parser.add_argument(
        "--seeds",
        default="42",
        help="sampler seeds (tune.seed), comma-separated: one comparison each",
    )
    parser.add_argument("--trials", type=int, default=30, help="trials per study (pruning)")
    parser.add_argument("--epochs", type=int, default=8, help="epochs per trial at most")
    parser.add_argument("--patience", type=int, default=3, help="early-stopping patience")
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="tune.pruner_warmup_epochs for every pruner (default: the config's default)",
    )
    parser.add_argument(
        "--throughput-trials", type=int, default=8, help="trials per throughput study (0: skip)"
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
        if args.warmup is not None:
            common["pruner_warmup_epochs"] = args.warmup

        # 1. pruning against no pruning: the same sampler seed, space and number of trials
        pruners = args.pruners.split(",")
        seeds = [int(seed) for seed in args.seeds.split(",")]
        outcomes: dict[str, list[tuple[float, float, bool]]] = {p: [] for p in pruners}
        for seed in seeds:
            results = {}
            for pruner in ["none", *pruners]:
                start = time.perf_counter()
                tuner = Tuner(
                    output=str(work / f"prune-{pruner}-{seed}"),
                    train=train,
                    pruner=pruner,
                    seed=seed,
                    **common,
                )
                results[pruner] = result = tuner.run()
                print(
                    f"seed {seed}, pruner={pruner:10s}: best val AUC {result.best_value:.4f}, "
                    f"{result.total_epochs} epochs in {result.n_trials} trials "
                    f"({result.n_pruned} pruned), {time.perf_counter() - start:.0f} s"
                )
            full = results.pop("none")
            for pruner, pruned in results.items():
                outcomes[pruner].append(pruning_line(f"seed {seed}, {pruner}", full, pruned))
        if len(seeds) > 1:
            for pruner, rows in outcomes.items():
                ratios, deltas, met = zip(*rows, strict=True)
                print(
                    f"{pruner} over {len(seeds)} seeds: epochs pruned/unpruned mean "
                    f"{sum(ratios) / len(ratios):.2f}, worst {max(ratios):.2f} (aim <= "
                    f"{AIM_EPOCHS}); AUC difference mean {sum(deltas) / len(deltas):.4f}, worst "
                    f"{max(deltas):.4f} (aim <= {AIM_AUC}); aim met for {sum(met)} of {len(seeds)}"
                )

        # 2. throughput: trials per minute with 1 worker and with 2 local workers
        if args.throughput_trials <= 0:
            return 0
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
