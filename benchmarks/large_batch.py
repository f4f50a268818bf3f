"""Issue 6.5: a miniature of the paper's large-batch experiment (the paper, arXiv 2507.05753, experiment C1).

The same model, data, seed and number of epochs on a fixed number of ranks (4); only the layout changes, and
with it the global batch: 1-way x dp 4 (global batch 4), 2-way x dp 2 (2), 4-way x dp 1 (1), all with
`--batch 1` per model group. As in the paper, the smaller global batch takes more optimizer steps for the same
epochs. Every run uses `--mode exact`, so the three layouts compute the same function and differ only in the
batch (and the step count that follows from it).

Two controls (skip them with `--no-controls`) run on ONE rank with global batch 1 (`--way 1 --batch 1`): at
the same seed it should reproduce the 4-way run (same arithmetic up to float32 rounding), and at another seed
it shows how much the batch-1 result moves with the initialisation alone.

Every run's final checkpoint is scored again in one process on the whole validation split (latitude-weighted
RMSE at 6 h, physical units), with persistence on the same samples for scale.

    python benchmarks/large_batch.py --runs /tmp/large_batch   # the three runs + controls
    python benchmarks/large_batch.py --no-controls --epochs 1
    python benchmarks/large_batch.py --show                    # print the table of a saved results file
    python benchmarks/large_batch.py --rescore --runs DIR      # score the run folders of --results again

Time: the saved run took 14 min for the three main runs (18 min with controls) on 2 cores shared with other
jobs; from step times measured on the idle machine, about 7-8 min (10-11 min with controls).

Writes each run to `--runs/<name>/` (metrics.csv, summary.json, final.ckpt) and the table to `--results`.
"""
import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARS = ("z500", "t850", "t2m", "msl", "u250", "q850")  # headline variables reported


def mpiexec() -> str:
    "The venv's mpiexec (MPICH wheel) when there is one, else the one on PATH."
    p = Path(sys.executable).with_name("mpiexec")
    return str(p) if p.exists() else "mpiexec"


def make_data(model: str, days: int) -> Path:
    "The generated default-style store on the preset's grid with `days` training days, and its statistics."
    from jigsaw_ref.config import preset
    from jigsaw_ref.data import compute_stats, load_stats
    from jigsaw_ref.generator import default_dataset
    cfg = preset(model)
    path = default_dataset(grid=(cfg.n_lat, cfg.n_lon), days=(days, 30, 30), verbose=True)
    if load_stats(path) is None: compute_stats(path, cfg)  # once, before any rank needs them
    return path


def run(name, ranks, way, a, data, seed, out_root) -> dict:
    "One `jigsaw-train` job, then `collect` of its folder."
    out = out_root / name
    cmd = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "jigsaw_ref.cli", "--model", a.model, "--way", str(way),
           "--batch", "1", "--epochs", str(a.epochs), "--data", str(data), "--mode", "exact", "--lr", str(a.lr),
           "--lr-encdec", str(a.lr_encdec), "--warmup-steps", "-1", "--val-batches", "0", "--seed", str(seed),
           "--out", str(out), "--progress", "false"]
    env = dict(os.environ, MPIR_CVAR_ENABLE_HEAVY_YIELD="1", OMP_NUM_THREADS="1",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    print("$", " ".join(cmd[:3] + ["python -m jigsaw_ref.cli"] + cmd[6:]), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return collect(name, ranks, way, out, data, seed, time.perf_counter() - t0)


def collect(name, ranks, way, out, data, seed, wall) -> dict:
    "What the table needs from a run folder: its summary.json, metrics.csv, and its final model re-scored."
    summ = json.loads((Path(out) / "summary.json").read_text())
    rows = list(csv.DictReader(open(Path(out) / "metrics.csv")))
    last, lay = summ["last_validation"], summ["layout"]
    epochs = int(summ["train"]["epochs"])
    per_epoch = summ["steps"] // epochs
    bins = 10 * epochs  # training loss: mean over each tenth of an epoch
    curve = [sum(float(r["loss"]) for r in rows[b * per_epoch // 10:(b + 1) * per_epoch // 10]) / max(1, per_epoch // 10)
             for b in range(bins)]
    return {"name": name, "ranks": ranks, "way": str(way), "dp": lay["dp"], "domain": lay["domain"],
            "tensor": lay["tensor"], "global_batch": lay["dp"] * int(summ["train"]["batch"]), "seed": seed,
            "optimizer_steps": summ["steps"], "rmse": val_rmse(Path(out) / "final.ckpt", data),
            "rmse_reported_by_trainer": {v: last[f"rmse_{v}"] for v in VARS if f"rmse_{v}" in last},
            "val_loss_reported_by_trainer": last["val_loss"],
            "train_loss_per_tenth_epoch": curve, "wall_s": round(wall, 1)}


def persistence_rmse(data, model: str) -> dict:
    "Latitude-weighted (cos) RMSE at 6 h of persistence on the whole validation split, as `Trainer.validate` scores."
    import torch
    from jigsaw_ref.config import preset
    from jigsaw_ref.data import Era5Dataset
    from jigsaw_ref.loss import lat_weights_cos
    cfg = preset(model)
    ds = Era5Dataset(data, cfg, "val", max_lead=1, stats=False)  # physical units
    w = lat_weights_cos(torch.as_tensor(ds.lat))[:, None]
    se = torch.zeros(cfg.n_vars, dtype=torch.float64)
    for i in range(len(ds)):
        x, y = ds.get(i, 1)
        se += ((x[:cfg.n_vars] - y[:cfg.n_vars]).double().square() * w).sum((1, 2))
    rmse = (se / (len(ds) * cfg.n_lat * cfg.n_lon)).sqrt()
    return {v: float(r) for v, r in zip(cfg.variables, rmse) if v in VARS}


def val_rmse(ckpt, data) -> dict:
    """Latitude-weighted (cos) RMSE at 6 h of a run's final model on the whole validation split, recomputed in one
    process from its checkpoint (every run scored by the same code on the same samples)."""
    import torch
    from jigsaw_ref.config import MixerConfig
    from jigsaw_ref.data import Era5Dataset
    from jigsaw_ref.loss import lat_weights_cos
    from jigsaw_ref.mixer import WeatherMixer
    from jigsaw_ref.checkpoint import load_checkpoint
    ck = load_checkpoint(ckpt)
    cfg = MixerConfig(**ck["config"])
    m = WeatherMixer(cfg, torch.float32, "cpu", seed=0)
    with torch.no_grad():
        for n, t in m.state().items(): t.copy_(ck["params"][n])
    m.eval()
    ds = Era5Dataset(data, cfg, "val", max_lead=1)
    w = lat_weights_cos(torch.as_tensor(ds.lat))[:, None]
    se = torch.zeros(cfg.n_vars, dtype=torch.float64)
    with torch.no_grad():
        for i in range(len(ds)):
            x, y = ds.get(i, 1)
            err = (ds.denormalize(m(x[None], k=1)[0]) - ds.denormalize(y))[:cfg.n_vars].double()
            se += (err.square() * w).sum((1, 2))
    rmse = (se / (len(ds) * cfg.n_lat * cfg.n_lon)).sqrt()
    return {v: float(r) for v, r in zip(cfg.variables, rmse) if v in VARS}


def table(res: dict) -> str:
    "The results as a fixed-width table; RMSE change relative to the global-batch-4 run."
    runs = res["runs"]
    base = next(r for r in runs if r["name"] == "way1_dp4")
    vs = [v for v in VARS if v in base["rmse"]]
    head = f"{'run':<18}{'ranks':>5}{'layout':>9}{'batch':>6}{'steps':>6}" + "".join(f"{v:>19}" for v in vs)
    lines = [head, "-" * len(head)]
    if "persistence_rmse" in res:
        p = res["persistence_rmse"]
        lines.append(f"{'persistence':<18}{'':>5}{'':>9}{'':>6}{'':>6}" + "".join(f"{p[v]:>19.4g}" for v in vs))
    for r in runs:
        cells = []
        for v in vs:
            d = 100 * (r["rmse"][v] / base["rmse"][v] - 1)
            cells.append(f"{r['rmse'][v]:.4g}" + (f" ({d:+.1f}%)" if r is not base else ""))
        lay = f"{r['way']}w x{r['dp']}"
        lines.append(f"{r['name']:<18}{r['ranks']:>5}{lay:>9}{r['global_batch']:>6}{r['optimizer_steps']:>6}"
                     + "".join(f"{c:>19}" for c in cells))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="preset (default tiny)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs for every run (the first is warm-up)")
    ap.add_argument("--days", type=int, default=120, help="training days of the generated store (4 samples a day)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lr-encdec", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--no-controls", action="store_true", help="skip the two one-rank control runs")
    ap.add_argument("--runs", default="runs/large_batch", help="folder for the run folders")
    ap.add_argument("--results", default=str(ROOT / "benchmarks/results/large_batch.json"))
    ap.add_argument("--show", action="store_true", help="only print the table of --results")
    ap.add_argument("--rescore", action="store_true",
                    help="no training: re-read the run folders under --runs named in --results and score them again")
    a = ap.parse_args(argv)
    if a.show or a.rescore:
        res = json.loads(Path(a.results).read_text())
        if a.rescore:
            res["runs"] = [collect(r["name"], r["ranks"], r["way"], Path(a.runs) / r["name"], res["data"], r["seed"],
                                   r["wall_s"]) for r in res["runs"]]
            res["persistence_rmse"] = persistence_rmse(res["data"], res["model"])
            Path(a.results).write_text(json.dumps(res, indent=1))
        print(table(res)); return 0
    data = make_data(a.model, a.days)
    out_root = Path(a.runs)
    t0 = time.perf_counter()
    runs = [run(f"way{w}_dp{a.ranks // w}", a.ranks, w, a, data, a.seed, out_root) for w in (1, 2, 4)]
    if not a.no_controls:
        runs += [run(f"control_1rank_s{s}", 1, 1, a, data, s, out_root) for s in (a.seed, a.seed + 1)]
    import torch
    res = {"what": "large-batch miniature (the paper's C1): same model/data/epochs on a fixed number of ranks, global batch "
                   "via the layout; validation = latitude-weighted (cos) RMSE at 6 h on the whole val split, physical units",
           "model": a.model, "data": str(data), "train_days": a.days, "epochs": a.epochs, "lr": a.lr,
           "lr_encdec": a.lr_encdec, "warmup": "one epoch, then cosine to zero", "mode": "exact", "seed": a.seed,
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                       "note": "4 ranks share the CPUs; wall times are not performance measurements"},
           "total_wall_s": round(time.perf_counter() - t0, 1), "runs": runs,
           "persistence_rmse": persistence_rmse(data, a.model)}
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    Path(a.results).write_text(json.dumps(res, indent=1))
    print(table(res))
    print(f"saved {a.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
