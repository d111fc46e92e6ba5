"""Benchmark of the Predictor: end to end on NanoAOD against plain uproot, and the model alone.

In one run, on one generated NanoAOD file (``--events``, 1M by default):

* plain ``uproot.iterate`` over the branches the Predictor reads (recorded from
  uproot while it scores a small file), in chunks of the skim's chunk size
  (the baseline);
* the Predictor end to end (skim with the bundle's selection, pad, standardise,
  score, align with the input, write the friend tree), events/s and its ratio
  to the baseline (aim: at least 0.5);
* the model alone on ready input rows: torch and ONNX Runtime, events/s.

A small bundle is trained first on small toy data (a few epochs).

Each figure is the best of ``--repeat`` runs (3 by default).

Run: ``python benchmarks/predict.py [--events N] [--data DIR] [--repeat N]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from common import branches_read

from cmsmlkit.data.toy import DEMO_PADDING as PADDING
from cmsmlkit.data.toy import DEMO_SKIM as SKIM


def _train(work: Path) -> Path:
    from cmsmlkit import HDF5Writer, NanoAODSource, Skimmer, Trainer
    from cmsmlkit.data import toy

    files = toy.make_demo(work / "train", n_events=4000, seed=3)
    source = NanoAODSource(
        datasets={
            name: {"files": [str(p) for p in files[name]], "label": label}
            for name, label in (("ttbar", "signal"), ("wjets", "background"), ("dy", "background"))
        }
    )
    skimmer = Skimmer(SKIM)
    skim = skimmer.run(source.fileset())
    h5 = HDF5Writer(output=str(work / "train.h5"), collections=PADDING).write(
        skim, skim_config=skimmer.config
    )
    result = Trainer(
        inputs=[str(h5)],
        output=str(work / "model"),
        max_epochs=3,
        batch_size=512,
        tracking={"enabled": False},
    ).fit()
    return Path(result.bundle_path)


def _timed(function, repeat: int = 1):  # type: ignore[no-untyped-def]
    """``function()`` and its wall time: the fastest of ``repeat`` runs (the machine is shared)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        out = function()
        best = min(best, time.perf_counter() - start)
    return out, best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events in the NanoAOD file")
    parser.add_argument("--data", help="directory for the generated files (default: a temp dir)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (the best is kept)")
    args = parser.parse_args(argv)
    os.environ.setdefault("CMSMLKIT_PROGRESS", "0")

    import torch
    import uproot

    from cmsmlkit import Predictor
    from cmsmlkit.data import toy

    torch.set_num_threads(1)  # like the single-threaded uproot baseline
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.data or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if (work / "model" / "bundle.json").is_file():  # --data DIR of an earlier run
            bundle = work / "model"
        else:
            bundle, t_train = _timed(lambda: _train(work))
            print(f"trained a small bundle in {t_train:.1f} s: {bundle}")
        nano = work / f"new_{args.events}.root"
        if not nano.exists():
            _, t_gen = _timed(lambda: toy.write_nanoaod(nano, "new", args.events, seed=11))
            print(f"generated {args.events} events in {t_gen:.1f} s: {nano}")
        n = args.events

        predictor = Predictor.from_bundle(bundle, formats=["friend"], rerun=True)
        small = work / "new_1000.root"
        if not small.exists():
            toy.write_nanoaod(small, "new", 1000, seed=12)
        # the branches it reads (and coffea imported, as uproot is for the baseline)
        branches = branches_read(lambda: predictor.predict_files([str(small)], work / "small"))
        chunk = predictor.skimmer.config.chunksize

        def plain() -> int:
            n_read = 0
            for arrays in uproot.iterate({str(nano): "Events"}, branches, step_size=chunk):
                n_read += len(arrays)
            return n_read

        plain()  # warm the page cache, so both read from memory
        _, t_plain = _timed(plain, args.repeat)
        report, t_pred = _timed(
            lambda: predictor.predict_files([str(nano)], work / "scores"), args.repeat
        )
        assert len(report.scored) == 1
        with_onnx = Predictor.from_bundle(bundle, formats=["friend"], rerun=True, backend="onnx")
        _, t_pred_onnx = _timed(
            lambda: with_onnx.predict_files([str(nano)], work / "scores"), args.repeat
        )

        b = predictor.bundle
        from cmsmlkit.ml.dataset import feature_matrix

        events = predictor.skimmer.run({"x": {"files": {str(nano): "Events"}}}).arrays["x"]
        m = len(events)
        sample = predictor.columns(events)
        X, valid = feature_matrix(sample, b.features)
        Z = b.standardiser.transform(X, valid)
        net = b.model()
        with torch.no_grad():
            net(torch.from_numpy(Z[:1024]))

            def run_torch() -> None:
                for s in range(0, len(Z), 65536):
                    torch.softmax(net(torch.from_numpy(Z[s : s + 65536])), dim=1)

            _, t_torch = _timed(run_torch, args.repeat)
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        session = onnxruntime.InferenceSession(
            str(b.onnx_path), options, providers=["CPUExecutionProvider"]
        )

        def run_onnx() -> None:
            for s in range(0, len(Z), 65536):
                session.run(["probabilities"], {"features": Z[s : s + 65536]})

        run_onnx()
        _, t_onnx = _timed(run_onnx, args.repeat)

        rate_plain = n / t_plain
        rate_pred = n / t_pred
        print(f"\nNanoAOD file: {n} events, {m} pass the bundle's selection")
        print(f"branches the Predictor reads ({len(branches)}): {' '.join(branches)}")
        print(f"chunk size (predict.chunksize, also the baseline's step): {chunk:,} events")
        print(f"plain uproot.iterate, same branches    : {rate_plain:12,.0f} events/s")
        print(f"Predictor end to end (friend tree)     : {rate_pred:12,.0f} events/s")
        print(
            f"ratio Predictor / plain read           : {rate_pred / rate_plain:12.2f}  (aim >= 0.5)"
        )
        print(f"Predictor end to end, ONNX Runtime     : {n / t_pred_onnx:12,.0f} events/s")
        print(f"ratio Predictor (ONNX) / plain read    : {t_plain / t_pred_onnx:12.2f}")
        print(f"model alone, torch (1 thread)          : {len(Z) / t_torch:12,.0f} events/s")
        print(f"model alone, ONNX Runtime (1 thread)   : {len(Z) / t_onnx:12,.0f} events/s")
        print(f"ratio ONNX Runtime / torch             : {t_torch / t_onnx:12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
