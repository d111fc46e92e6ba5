"""Skim benchmark: cmsmlkit's Skimmer against plain uproot, and 1 against 2 local workers.

Run ``python benchmarks/skim.py [--events N]``. A toy ttbar NanoAOD file of
``N`` events (1M by default) is written once and cached (``--data-dir``, by
default ``$TMPDIR/cmsmlkit-bench``). In one run it prints events/s of

* plain uproot reading exactly the branches the Skimmer reads (recorded from
  the Skimmer itself), in chunks of the same size (the baseline);
* the Skimmer with the demo selection (``cmsmlkit/resources/demo.yaml``) in
  this process (``ClusterConfig(workers=1)``), and their ratio (aim >= 0.5);
* plain uproot in 2 processes, half of the file each: how far 2 cores of this
  machine speed up work that needs no coordination (the ceiling for the next);
* the Skimmer on a LocalCluster of one worker process (the dask path, warm);
* the Skimmer on the 2-worker LocalCluster of ``ClusterConfig(workers=2)``,
  warm (started, and its workers through one small skim, before the clock
  starts), and its ratio to one worker (aim >= 1.6); then the same cold, as
  one ``Skimmer.run`` that starts and stops its cluster (what a single
  ``cmsml skim`` of this file sees: process start-up and imports included).

Each figure is the best of ``--repeat`` runs. ``--profile`` also prints where
the Skimmer spends its time (cProfile, in process).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from common import branches_read

os.environ.setdefault("CMSMLKIT_PROGRESS", "0")  # no progress bar in the figures


def make_file(data_dir: Path, n_events: int) -> Path:
    from cmsmlkit.data import toy

    path = data_dir / f"ttbar_{n_events}.root"
    if not path.exists():
        start = time.perf_counter()
        toy.write_nanoaod(path, "ttbar", n_events, seed=1)
        print(f"wrote {path} ({n_events:,} events) in {time.perf_counter() - start:.1f} s")
    return path


def skimmed_branches(skim, path: Path) -> list[str]:  # type: ignore[no-untyped-def]
    """The branches the Skimmer reads, recorded from uproot while it skims 1000 events."""
    from cmsmlkit import Skimmer
    from cmsmlkit.data import toy

    small = path.with_name("ttbar_1000.root")
    if not small.exists():
        toy.write_nanoaod(small, "ttbar", 1000, seed=1)
    return branches_read(lambda: Skimmer(skim).run({"ttbar": {"files": {str(small): "Events"}}}))


def run_uproot(path: Path, branches: list[str], chunksize: int) -> int:
    import uproot

    n = 0
    for chunk in uproot.iterate({str(path): "Events"}, branches, step_size=chunksize, library="ak"):
        n += len(chunk)
    return n


def read_range(path: Path, branches: list[str], chunksize: int, start: int, stop: int) -> int:
    """Plain uproot over entries [start, stop) in chunks (one process's share of the file)."""
    import uproot

    n = 0
    with uproot.open(path) as file:
        tree = file["Events"]
        for first in range(start, stop, chunksize):
            last = min(first + chunksize, stop)
            n += len(tree.arrays(branches, entry_start=first, entry_stop=last))
    return n


def run_uproot_processes(pool, path: Path, branches: list[str], chunksize: int, n: int) -> int:  # type: ignore[no-untyped-def]
    """Plain uproot in the 2 processes of ``pool``, half of the file each: the machine's ceiling."""
    half = (n // 2 // chunksize) * chunksize or n // 2
    shares = [(0, half), (half, n)]
    futures = [pool.submit(read_range, path, branches, chunksize, a, b) for a, b in shares]
    return sum(f.result() for f in futures)


def run_skimmer(skim, path: Path, cluster) -> int:  # type: ignore[no-untyped-def]
    from cmsmlkit import Skimmer

    result = Skimmer(skim, cluster=cluster).run({"ttbar": {"files": {str(path): "Events"}}})
    return result.cutflow["ttbar"]["all"]["events"]


def warm_rate(skim, path: Path, cluster, args) -> float:  # type: ignore[no-untyped-def]
    """Events/s of the Skimmer on the LocalCluster of ``cluster``, started and warmed up first."""
    from cmsmlkit.cluster import dask_client
    from cmsmlkit.config import ClusterConfig

    workers = cluster.workers
    with dask_client(cluster) as client:
        client.wait_for_workers(workers)
        warm = ClusterConfig(type="address", address=client.scheduler.address)
        run_skimmer(skim, path.with_name("ttbar_1000.root"), warm)  # imports on the workers
        label = "1 local dask worker" if workers == 1 else f"{workers} local workers"
        return best_rate(
            f"Skimmer, {label} (warm)",
            args.repeat,
            args.events,
            lambda: run_skimmer(skim, path, warm),
            cpu=lambda: time.process_time() + sum(client.run(time.process_time).values()),
        )


def best_rate(
    label: str,
    repeat: int,
    n_events: int,
    work: Callable[[], int],
    cpu: Callable[[], float] | None = time.process_time,
) -> float:
    """Events/s of the fastest of ``repeat`` runs, printed with the CPU seconds it took.

    ``cpu()`` gives the CPU time used so far by every process doing the work;
    a busy machine does not inflate it the way it inflates wall time.
    """
    best = (float("inf"), 0.0)
    for _ in range(repeat):
        start, cpu_start = time.perf_counter(), cpu() if cpu else 0.0
        done = work()
        best = min(best, (time.perf_counter() - start, (cpu() if cpu else 0.0) - cpu_start))
        if done != n_events:
            sys.exit(f"{label}: processed {done} events, expected {n_events}")
    rate = n_events / best[0]
    used = f", {best[1]:.2f} s CPU" if cpu is not None else ""
    print(f"{label:<44} {rate:>10,.0f} events/s   (best of {repeat}: {best[0]:.2f} s wall{used})")
    CPU[label] = best[1]
    return rate


#: CPU seconds per figure, filled by best_rate
CPU: dict[str, float] = {}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events in the toy file")
    parser.add_argument("--repeat", type=int, default=2, help="runs per figure (best is kept)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "cmsmlkit-bench",
        help="where the generated file is cached",
    )
    parser.add_argument("--profile", action="store_true", help="profile the in-process Skimmer")
    args = parser.parse_args(argv)

    from cmsmlkit.config import SkimConfig

    demo = resources.files("cmsmlkit") / "resources" / "demo.yaml"
    with resources.as_file(demo) as demo_path:
        skim = SkimConfig.from_yaml(demo_path, section="skim")
    path = make_file(args.data_dir, args.events)
    branches = skimmed_branches(skim, path)
    print(f"file: {path}, {args.events:,} events, chunksize {skim.chunksize:,}")
    print(f"branches the Skimmer reads ({len(branches)}): {' '.join(branches)}")
    load = os.getloadavg()[0]
    print(
        f"CPUs: {os.cpu_count()}, load average at start: {load:.1f} (figures are only fair near 0)"
    )

    from cmsmlkit.config import ClusterConfig

    n = args.events
    base = best_rate(
        "uproot.iterate (same branches and chunks)",
        args.repeat,
        n,
        lambda: run_uproot(path, branches, skim.chunksize),
    )
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2) as pool:
        run_uproot_processes(pool, path, branches, skim.chunksize, 2 * skim.chunksize)  # imports
        base_two = best_rate(
            "uproot, 2 processes (half of the file each)",
            args.repeat,
            n,
            lambda: run_uproot_processes(pool, path, branches, skim.chunksize, n),
            cpu=None,
        )
    one = best_rate(
        "Skimmer, 1 worker (in-process)", args.repeat, n, lambda: run_skimmer(skim, path, None)
    )
    # a LocalCluster of one worker process (the same dask path as two), then of two
    one_dask = warm_rate(skim, path, ClusterConfig(workers=1, adapt_min=1, adapt_max=1), args)
    two = warm_rate(skim, path, ClusterConfig(workers=2), args)
    cold = best_rate(
        "Skimmer, 2 local workers (cold: start-up in)",
        1,
        n,
        lambda: run_skimmer(skim, path, ClusterConfig(workers=2)),
        cpu=None,  # its workers are gone before they can be asked
    )
    print(f"Skimmer / uproot:             {one / base:.2f}   (aim >= 0.5)")
    print(f"2 workers / 1 worker (warm):  {two / one:.2f}   (aim >= 1.6)")
    print(f"2 workers / 1 worker (cold):  {cold / one:.2f}")
    print(
        f"2 dask workers / 1 dask worker (warm): {two / one_dask:.2f}   (the same path with one "
        "worker more; 1 dask worker / in-process: "
        f"{one_dask / one:.2f})"
    )
    print(
        f"plain uproot, 2 processes / 1:  {base_two / base:.2f}   (what 2 cores of this machine "
        "give work that needs no coordination: the ceiling for the ratio above)"
    )
    cpu_one = CPU["Skimmer, 1 worker (in-process)"]
    cpu_two = CPU["Skimmer, 2 local workers (warm)"]
    print(
        f"CPU of 2 workers (and this client) / CPU in-process: {cpu_two / cpu_one:.2f}; "
        f"on 2 idle cores that bounds 2 workers / 1 worker by {2 * cpu_one / cpu_two:.2f}"
    )
    print(f"load average at end: {os.getloadavg()[0]:.1f}")

    if args.profile:
        profile = cProfile.Profile()
        profile.enable()
        run_skimmer(skim, path, None)
        profile.disable()
        stats = pstats.Stats(profile).sort_stats("cumulative")
        stats.print_stats(35)
        stats.sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
