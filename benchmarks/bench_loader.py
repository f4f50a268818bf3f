"""Loader benchmark: samples/s and bytes read per sample, per rank, for 1-, 2- and 4-way reading.

Usage: python benchmarks/bench_loader.py [--grid small] [--samples 200] [--path STORE]

Each rank of a layout is simulated in this one process in turn (the reading is independent per
rank). Bytes are counted through `data.CountingStore`; the default data is generated on first use.
"""
import argparse
import time

from jigsaw_ref.config import preset
from jigsaw_ref.data import Era5Dataset, counting_store
from jigsaw_ref.generator import default_dataset

LAYOUTS = {"1-way": (1, 1), "2-way": (2, 1), "4-way": (2, 2)}  # name: (ch_parts, lon_parts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default="small", choices=["tiny", "small", "medium"])
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--path", default=None, help="zarr store (default: the generated default data)")
    a = ap.parse_args()
    path = a.path or default_dataset(grid=a.grid)
    cfg = preset(a.grid)
    stats = Era5Dataset(path, cfg).stats
    print(f"{path}\n{'layout':8s} {'rank':>4s} {'ch':>3s} {'lon':>3s} {'in_ch':>5s} {'out_ch':>6s} {'n_lon':>5s} "
          f"{'samples/s':>10s} {'bytes/sample':>12s} {'reads/sample':>12s}")
    for name, (chp, lonp) in LAYOUTS.items():
        for r in range(chp * lonp):
            li, ci = divmod(r, chp)  # rank r: longitude shard r // ch_parts, channel shard r % ch_parts
            cs = counting_store(path)
            d = Era5Dataset(path, cfg, lon_parts=lonp, lon_index=li, ch_parts=chp, ch_index=ci, stats=stats, store=cs)
            n = min(a.samples, len(d))
            cs.reset(); t = time.perf_counter()
            for i in range(n): d[i]
            dt = time.perf_counter() - t
            print(f"{name:8s} {r:4d} {ci:3d} {li:3d} {len(d.in_channels):5d} {len(d.out_channels):6d} {len(d.lon):5d} "
                  f"{n / dt:10.1f} {cs.nbytes / n:12.0f} {cs.nreads / n:12.1f}")


if __name__ == "__main__":
    main()
