"""Training input speed: the HDF5 block loader against in-memory tensors, in one run.

Writes a cmsmlkit HDF5 file (the DESIGN.md contract, lzf, chunks of
``CHUNK_ROWS`` rows as HDF5Writer writes them) of N toy events with h5py,
then prints:

- samples/s of the loader alone (one pass over the training split), for the
  block loader (0 and 1 worker) and the in-memory loader;
- the wall time of one training epoch of the default MLP (batch 512, no
  validation) fed from the HDF5 file by the block loader, and the same epoch
  fed from in-memory tensors, and their ratio (the aim is <= 1.25).

Run: ``python benchmarks/train.py [--events 1000000] [--workers 1]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import warnings
from pathlib import Path

import h5py
import lightning.pytorch as pl
import numpy as np
import torch

from cmsmlkit.config import TrainConfig
from cmsmlkit.data.hdf5 import CHUNK_ROWS
from cmsmlkit.ml.dataset import HDF5DataModule
from cmsmlkit.ml.module import ClassifierModule

MAX_LEN = 6


def write_file(path: Path, n: int, seed: int = 1) -> None:
    """N toy events in the HDF5 contract: 3 scalars, GoodJet (pt, eta, btag) padded to 6."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    y = labels.astype(np.float32)
    n_jets = rng.integers(2, MAX_LEN + 1, n)
    mask = np.arange(MAX_LEN)[None, :] < n_jets[:, None]
    chunk = dict(compression="lzf", shuffle=True)

    def create(f: h5py.File, key: str, data: np.ndarray) -> h5py.Dataset:
        return f.create_dataset(
            key, data=data, chunks=(min(CHUNK_ROWS, n), *data.shape[1:]), **chunk
        )

    with h5py.File(path, "w") as f:
        create(f, "scalars/ht", (150 + 60 * y + rng.normal(0, 40, n)).astype(np.float32))
        create(f, "scalars/met", (40 + 20 * y + rng.normal(0, 20, n)).astype(np.float32))
        create(f, "scalars/n_bjets", rng.poisson(1 + y).astype(np.float32))
        jets = {
            "pt": np.where(mask, 30 + 15 * y[:, None] + rng.exponential(30, (n, MAX_LEN)), 0),
            "eta": np.where(mask, rng.normal(0, 1.2 - 0.3 * y[:, None], (n, MAX_LEN)), 0),
            "btagDeepFlavB": np.where(mask, rng.beta(1 + y[:, None], 3, (n, MAX_LEN)), 0),
        }
        for name, values in jets.items():
            create(f, f"objects/GoodJet/{name}", values.astype(np.float32))
        create(f, "objects/GoodJet/mask", mask)
        names = ["signal", "background"]
        create(f, "label", labels.astype(np.int64)).attrs["class_names"] = json.dumps(names)
        create(f, "weight", np.ones(n, np.float32))
        ids = np.stack([np.ones(n), np.ones(n), np.arange(n)], 1).astype(np.int64)
        create(f, "event_id", ids)
        f.attrs["cmsmlkit_version"] = "bench"
        f.attrs["config"] = "output: bench.h5\n"
        f.attrs["skim_config"] = ""
        f.attrs["padding"] = json.dumps({"GoodJet": {"max_len": MAX_LEN, "sort_by": "pt"}})
        f.attrs["class_names"] = json.dumps(names)
        for key in ("datasets", "cutflow", "input_files", "sumw"):
            f.attrs[key] = json.dumps([] if key in ("datasets", "input_files") else {})
        f.attrs["n_events"] = n


def loader_rate(dm: HDF5DataModule) -> float:
    dm.set_epoch(0)
    start = time.perf_counter()
    n = sum(len(y) for _, y, _ in dm.train_dataloader())
    return n / (time.perf_counter() - start)


def epoch_seconds(dm: HDF5DataModule, config: TrainConfig) -> float:
    """One training epoch of the default MLP, no validation, no logging, no checkpoints."""
    pl.seed_everything(config.seed, verbose=False)
    module = ClassifierModule(
        config.model.to_dict(), n_inputs=dm.layout.n_inputs, n_classes=2, learning_rate=1e-3
    )
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=dm.train_dataloader())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=1, help="block loader workers")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the file")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "bench.h5"
        t0 = time.perf_counter()
        write_file(path, args.events)
        size = path.stat().st_size / 1e6
        print(
            f"wrote {args.events:,} events ({size:.0f} MB, lzf, {CHUNK_ROWS}-row chunks) "
            f"in {time.perf_counter() - t0:.1f} s"
        )
        config = TrainConfig(inputs=[str(path)])
        common = dict(features=["*"], batch_size=config.batch_size, seed=config.seed)

        t0 = time.perf_counter()
        memory = HDF5DataModule([path], loader="memory", **common)
        memory.setup()
        load_s = time.perf_counter() - t0
        blocks = {}
        for workers in sorted({0, args.workers}):
            dm = HDF5DataModule([path], loader="blocks", num_workers=workers, **common)
            t0 = time.perf_counter()
            dm.setup()
            scan_s = time.perf_counter() - t0
            blocks[workers] = dm
        print(
            f"setup: memory (read + standardise all) {load_s:.2f} s; "
            f"blocks (one streaming pass for the statistics) {scan_s:.2f} s"
        )
        n_train = memory.n_events["train"]
        print(f"training split: {n_train:,} events, {memory.layout.n_inputs} inputs")

        print("\nloader alone (one pass over the training split, batches of 512):")
        mem_rate = loader_rate(memory)
        print(f"  memory                     {mem_rate:12,.0f} samples/s")
        for workers, dm in blocks.items():
            rate = loader_rate(dm)
            print(f"  HDF5 blocks, {workers} worker(s)   {rate:12,.0f} samples/s")

        print("\none epoch of the default MLP (64, 64), batch 512, CPU:")
        mem_s = epoch_seconds(memory, config)
        print(f"  from in-memory tensors     {mem_s:8.2f} s  ({n_train / mem_s:,.0f} samples/s)")
        for workers, dm in blocks.items():
            s = epoch_seconds(dm, config)
            print(
                f"  from HDF5, {workers} worker(s)     {s:8.2f} s  ({n_train / s:,.0f} samples/s)"
                f"  ratio HDF5 / memory = {s / mem_s:.2f}"
            )


if __name__ == "__main__":
    main()
