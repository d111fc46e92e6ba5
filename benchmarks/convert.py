"""Benchmark of ROOT -> HDF5 conversion (cmsmlkit issue 4).

Generates a NanoAOD-like file (toy ttbar events: Jet, Muon, Electron and about
20 scalar branches, ZLIB-compressed as uproot writes it), then prints, in one run:

* events/s of plain ``uproot.iterate`` over the same branches and step (the floor),
* events/s of ``HDF5Writer.convert`` with default settings, and their ratio
  (best of ``--repeat`` runs each, interleaved, with the load average: the ratio
  drops when other processes compete for the cores),
* peak RSS of a conversion of N and of 4N events (each in a fresh subprocess),
  the part of it that the imports take, and whether anything heavy (torch,
  coffea, dask) was imported,
* output size and speed per codec.

Run::

    .venv/bin/python benchmarks/convert.py [--events N] [--data-dir DIR]

Input files are cached in ``--data-dir`` (default: a directory in the system temp dir).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

#: Scalars added to the toy's (run, luminosityBlock, event, genWeight, MET_pt, MET_phi).
EXTRA_SCALARS = {
    "PV_npvs": np.int32,
    "PV_npvsGood": np.int32,
    "fixedGridRhoFastjetAll": np.float32,
    "PuppiMET_pt": np.float32,
    "PuppiMET_phi": np.float32,
    "MET_sumEt": np.float32,
    "MET_significance": np.float32,
    "Pileup_nTrueInt": np.float32,
    "LHE_HT": np.float32,
    "HLT_IsoMu24": np.bool_,
    "HLT_Ele32_WPTight_Gsf": np.bool_,
    "Flag_goodVertices": np.bool_,
    "Flag_METFilters": np.bool_,
    "L1PreFiringWeight_Nom": np.float32,
}


def generate(path: Path, n_events: int, seed: int = 1, chunk: int = 100_000) -> Path:
    """The toy ttbar events plus EXTRA_SCALARS, written like toy.write_nanoaod (ZLIB)."""
    import uproot

    from cmsmlkit.data import toy

    if path.is_file():
        return path
    rng = np.random.default_rng(seed)
    tmp = path.with_name(path.name + ".tmp")
    with uproot.recreate(tmp) as f:
        tree = None
        first = 0
        while first < n_events:
            n = min(chunk, n_events - first)
            events = toy._with_event_id(toy.generate("ttbar", n, rng), first)
            for name, dtype in EXTRA_SCALARS.items():
                if dtype is np.bool_:
                    events[name] = rng.random(n) < 0.9
                elif dtype is np.int32:
                    events[name] = rng.poisson(30, n).astype(np.int32)
                else:
                    events[name] = rng.gamma(2.0, 20.0, n).astype(np.float32)
            if tree is None:
                tree = f.mktree("Events", toy._branch_types(events))
            tree.extend(events)
            first += n
    os.replace(tmp, path)
    return path


CHILD = r"""
import json, resource, sys, time
mode, path, out, compression = sys.argv[1:5]
if mode == "floor":
    import uproot
    from cmsmlkit.data.hdf5 import HDF5Writer, _plan_branches, _plan_max_lens, _scan_file
    scan = _scan_file((path, "Events"))
    writer = HDF5Writer()
    plan = writer._plan(path, "Events", scan)
    branches = _plan_branches(plan)
    t0 = time.perf_counter()
    n = 0
    for chunk in uproot.iterate({path: "Events"}, branches, step_size=writer.config.step_size,
                                library="ak", how=dict):
        n += len(chunk["event"])
    seconds = time.perf_counter() - t0
    extra = {"branches": len(branches)}
else:
    import os
    import awkward, hdf5plugin, uproot, cmsmlkit.cluster  # imported before the clock, as above
    from cmsmlkit.data.hdf5 import HDF5Writer
    imports_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    kwargs = {} if compression == "default" else {"compression": compression}
    writer = HDF5Writer(output=out, **kwargs)
    t0 = time.perf_counter()
    result = writer.convert([path])
    seconds = time.perf_counter() - t0
    n = result.n_events
    extra = {"size": os.path.getsize(out), "compression": writer.config.compression,
             "imports_rss": imports_rss, "step_size": writer.config.step_size}
    heavy = [m for m in ("torch", "lightning", "coffea", "dask", "distributed", "optuna")
             if m in sys.modules]
    extra["heavy"] = heavy
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
cpu = time.process_time()
print(json.dumps({"n": n, "seconds": seconds, "rss": rss, "cpu": cpu, **extra}))
"""


def child(mode: str, path: Path, out: Path, compression: str = "default") -> dict:
    if out.exists():
        out.unlink()
    env = dict(os.environ, TQDM_DISABLE="1")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(path), str(out), compression],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events of the main file")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many timings")
    parser.add_argument(
        "--data-dir", default=str(Path(tempfile.gettempdir()) / "cmsmlkit-bench-convert")
    )
    parser.add_argument("--no-big", action="store_true", help="skip the 4N-event RSS run")
    args = parser.parse_args()
    data = Path(args.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    n = args.events
    t0 = time.perf_counter()
    small = generate(data / f"ttbar_{n}.root", n)
    big = None if args.no_big else generate(data / f"ttbar_{4 * n}.root", 4 * n, seed=2)
    print(
        f"input: {small} ({small.stat().st_size / 1e6:.1f} MB, generated/cached in "
        f"{time.perf_counter() - t0:.0f} s)"
    )
    out = data / "out.h5"

    floors, convs = [], []
    for _ in range(args.repeat):  # interleaved, so that both see the same machine load
        floors.append(child("floor", small, out))
        convs.append(child("convert", small, out))
    floor = min(floors, key=lambda r: r["seconds"])
    conv = min(convs, key=lambda r: r["seconds"])
    floor_rate, conv_rate = n / floor["seconds"], n / conv["seconds"]
    print(
        f"branches read: {floor['branches']}  step_size: {conv['step_size']}  events: {n}  "
        f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    print(
        f"plain uproot.iterate (floor):   {floor_rate:12,.0f} events/s  "
        f"(peak RSS {floor['rss'] / 1e6:.0f} MB)"
    )
    print(f"HDF5Writer.convert (default {conv['compression']}): {conv_rate:12,.0f} events/s")
    print(f"ratio convert / floor:          {conv_rate / floor_rate:12.2f}")
    print(
        f"CPU seconds: floor {floor['cpu']:.2f}, convert {conv['cpu']:.2f} "
        f"(ratio {floor['cpu'] / conv['cpu']:.2f})"
    )
    print(f"peak RSS, convert {n:>9,} events: {conv['rss'] / 1e6:8.0f} MB")
    print(
        f"  of which imports (numpy, uproot, awkward, h5py, hdf5plugin, cmsmlkit): "
        f"{conv['imports_rss'] / 1e6:.0f} MB; heavy modules imported: {conv['heavy'] or 'none'}"
    )
    if big is not None:
        big_run = child("convert", big, out)
        print(
            f"peak RSS, convert {4 * n:>9,} events: {big_run['rss'] / 1e6:8.0f} MB "
            f"({4 * n / big_run['seconds']:,.0f} events/s)"
        )

    print("\ncodec          size (MB)   bytes/event   convert events/s   ratio to floor")
    for codec in ("none", "lzf", "gzip", "blosc2-lz4", "blosc2-zstd"):
        run = child("convert", small, out, codec)
        print(
            f"{codec:<12} {run['size'] / 1e6:11.1f} {run['size'] / n:13.0f} "
            f"{n / run['seconds']:18,.0f} {n / run['seconds'] / floor_rate:16.2f}"
        )
    out.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
