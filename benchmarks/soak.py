"""Soak test: Jigsaw training of the `small` preset for N minutes (4-way on 4 ranks by default), sampling every rank's
resident memory between steps; prints RSS over time per rank and its growth, and exits 1 if any rank grew more than
`--limit` percent (a leak: memory that a long run keeps adding, step after step).

Usage:  mpiexec -n 4 python benchmarks/soak.py [--minutes 30] [--way 4] [--model small] [--limit 5]
        python benchmarks/soak.py --ranks 4 [...]      (launches itself under the venv's mpiexec)

The Trainer runs in this process, unchanged: a subclass records `VmRSS` (from /proc/self/status) after each
`train_step`, so checkpoints (every `--ckpt-every` steps) and validation stay in the loop being measured. The
warm-up ends at the latest of: `--warmup` minutes, the step after the second checkpoint, and the first step by which
every rollout length k has been drawn (activation memory grows with k, so RSS rises until the largest k has run once).
The baseline is the median RSS over the first tenth of the samples after the warm-up, the end the median over the last
tenth; growth = end / baseline - 1.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def rss_mib() -> float:
    "This process's resident set size in MiB, from /proc/self/status (VmRSS)."
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"): return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status: the soak test needs Linux")


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="training time")
    ap.add_argument("--model", default="small")
    ap.add_argument("--way", default="4")
    ap.add_argument("--ranks", type=int, default=0, help="launch this many ranks under mpiexec (when not already under one)")
    ap.add_argument("--limit", type=float, default=5.0, help="largest RSS growth in percent that passes")
    ap.add_argument("--warmup", type=float, default=None, help="minutes before the baseline (default: a tenth of the run, at most 2)")
    ap.add_argument("--ckpt-every", type=int, default=25, help="steps between checkpoints (they are part of the soak)")
    ap.add_argument("--rows", type=int, default=12, help="rows of the RSS-over-time table")
    ap.add_argument("--out", default=None, help="run folder (default: a temporary one, removed afterwards)")
    return ap.parse_args(argv)


def relaunch(a) -> int:
    "Run this script under `mpiexec -n a.ranks` (the one next to this Python) and return its exit status."
    exe = Path(sys.executable).with_name("mpiexec")
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items() if k != "ranks" and v is not None]
    env = dict(os.environ, MPIR_CVAR_ENABLE_HEAVY_YIELD="1", OMP_NUM_THREADS="1")
    return subprocess.run([str(exe) if exe.exists() else "mpiexec", "-n", str(a.ranks), sys.executable, __file__, *argv],
                          env=env).returncode


def growth(samples, warmup_s, warmup_step):
    "(baseline MiB, end MiB, growth %) of `samples` [(t, step, rss)] after the warm-up."
    after = [s for s in samples if s[0] >= warmup_s and s[1] > warmup_step] or samples[-2:]
    n = max(1, len(after) // 10)
    base, end = statistics.median(s[2] for s in after[:n]), statistics.median(s[2] for s in after[-n:])
    return base, end, 100 * (end / base - 1)


def table(per_rank, rows):
    "RSS (MiB) of every rank at `rows` evenly spaced steps."
    n = min(len(s) for s in per_rank)
    picks = sorted({round(i * (n - 1) / max(1, rows - 1)) for i in range(rows)})
    head = f"{'min':>6} {'step':>6} " + " ".join(f"{'rank ' + str(r):>9}" for r in range(len(per_rank)))
    lines = [head] + [f"{per_rank[0][i][0] / 60:6.2f} {per_rank[0][i][1]:6d} " +
                      " ".join(f"{s[i][2]:9.1f}" for s in per_rank) for i in picks]
    return "\n".join(lines)


def main(argv=None) -> int:
    a = parse(argv)
    os.environ.setdefault("MPIR_CVAR_ENABLE_HEAVY_YIELD", "1"); os.environ.setdefault("OMP_NUM_THREADS", "1")
    from jigsaw_ref.comm import launcher
    from jigsaw_ref.train import Trainer, TrainConfig
    from jigsaw_ref.cli import install_abort_hook
    if a.ranks > 1 and launcher() == "single": return relaunch(a)
    import torch
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    install_abort_hook(comm)  # a failure on any rank ends the soak, with the rank in the message
    torch.set_num_threads(1)
    tmp = None
    if a.out is None:
        tmp = comm.bcast(tempfile.mkdtemp(prefix="jigsaw-soak-") if rank == 0 else None)
    out = a.out or tmp

    class SoakTrainer(Trainer):
        "A Trainer that records (seconds, step, RSS MiB) after every training step."
        rss_samples: list

        def train_step(self, idx, k):
            rec = super().train_step(idx, k)
            self.rss_samples.append((time.perf_counter() - self.t0, self.step, rss_mib()))
            return rec

    tc = TrainConfig(model=a.model, way=a.way, epochs=10_000, max_minutes=a.minutes, ckpt_every=a.ckpt_every,
                     lr=1e-3, lr_encdec=1e-3, warmup_steps=50, val_batches=2, progress=False, out=out)
    rss0 = rss_mib()
    t = SoakTrainer(tc, comm=comm)
    t.rss_samples, t.t0 = [], time.perf_counter()
    if rank == 0:
        print(f"soak: {a.minutes:g} min of {a.model} on {world} ranks (dp={t.grid.dp} x domain={t.grid.domain} x "
              f"tensor={t.grid.tensor}), checkpoint every {a.ckpt_every} steps, RSS at start {rss0:.0f} MiB "
              f"(rank 0), out={out}", flush=True)
    t.fit()
    per_rank = comm.gather(t.rss_samples, root=0)
    code = 0
    if rank == 0:
        warm = 60 * (min(2.0, a.minutes / 10) if a.warmup is None else a.warmup)
        kmin, kmax = t.cfg.rollout
        seen, all_k = set(), None
        for h in t.history:
            seen.add(h["k"])
            if all_k is None and len(seen) == kmax - kmin + 1: all_k = h["step"]
        warm_step = max(2 * a.ckpt_every + 1, all_k if all_k is not None else t.step)
        steps, secs = per_rank[0][-1][1], per_rank[0][-1][0]
        print(f"\n{steps} steps in {secs / 60:.1f} min ({secs / max(1, steps):.2f} s/step); RSS in MiB after each step:")
        print(table(per_rank, a.rows))
        print(f"\nwarm-up: {warm:.0f} s and {warm_step} steps (two checkpoints; every k in {kmin}..{kmax} drawn by step "
              f"{all_k}); growth from the baseline (median just after it) to the end (median of the last tenth):")
        worst = 0.0
        for r, s in enumerate(per_rank):
            base, end, g = growth(s, warm, warm_step)
            peak = max(x[2] for x in s)
            worst = max(worst, g)
            print(f"rank {r}: baseline {base:8.1f}  end {end:8.1f}  peak {peak:8.1f}  growth {g:+6.2f}%")
        code = int(worst > a.limit)
        if all(x[1] <= warm_step for x in per_rank[0]): print("the run ended inside the warm-up: run longer"); code = 2
        print(f"{'FAIL' if code else 'PASS'}: largest growth {worst:+.2f}% (limit {a.limit:g}%)", flush=True)
        if tmp: __import__("shutil").rmtree(tmp, ignore_errors=True)
    return comm.bcast(code)


if __name__ == "__main__":
    sys.exit(main())
