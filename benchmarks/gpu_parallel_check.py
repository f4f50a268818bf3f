"""Multi-rank GPU check of Jigsaw parallelism: the 2- and 4-way JigsawMixer on GPUs against the one-process CPU
float64 WeatherMixer, over host-staged MPI, device MPI and NCCL, and strong-scaling step times of the C3 model.

WRITTEN, NOT VERIFIED ON A GPU. Everything that touches a GPU (ranks sharing cuda:0, one GPU per rank, host staging
of CUDA tensors, NCCL `TorchGroup`s, TF32, CUDA timing) has not run yet; only `--cpu-dry-run`, which runs every
path of this script with CPU tensors (forced staging, gloo in place of NCCL, the tiny preset), has, in
tests/test_devices.py under `mpiexec -n 2`. The JSON says which: `"verified_on_gpu": false` for a dry run.

(a) One GPU: 2 and 4 ranks share cuda:0 (NCCL refuses two ranks on one device), exchanging through MPI `Group`s
    with `staging="always"` (host buffers, allocated once, reused). Layouts: 2-way = 1x2, 4-way = 2x2. Checked,
    then timed (the staging path with the overlapped exchanges, on the scale preset).
(b) k >= 2 GPUs, one per rank (`comm.local_device`): NCCL (`TorchGroup`, p2p algorithm) and MPI (`Group`,
    staging 'auto': device pointers if the MPI is CUDA-aware, else host staging) 2-way, and 4-way when k >= 4,
    checked the same way; then step times (forward, backward, gradient sync, clipping, Adam) of the C3 model
    (preset 'c3') 1-, 2- and 4-way in FP32 and TF32, and the speedups over 1-way. The paper, on A100s:
    1.92x / 2.70x (FP32) and 1.66x / 2.25x (TF32) for 2- / 4-way. Also: the TorchGroup (NCCL point-to-point,
    batched posting, overlapped schedule) step time over the MPI Group's in the same run (issue 24's target: at
    most 1.10), and each layout's step with dropout p = 1e-3 over the step without (target: at most 1.05).
    Skipped, with a note, on fewer than 2 GPUs.
Each check compares the rank's prediction block, its input-gradient block and every full weight gradient
(gathered) with the float64 CPU model, as max |error| / max |reference|, in float64, float32 and TF32.

CLI:
  python benchmarks/gpu_parallel_check.py [--preset tiny] [--scale-preset c3] [--ranks 2,4] [--reps 5]
                                          [--out benchmarks/results] [--timeout 1800]
  python benchmarks/gpu_parallel_check.py --cpu-dry-run [--out DIR]     (CPU, 2 ranks, tiny; for the tests)
Results: OUT/gpu_parallel_<device>.json (device name, torch/CUDA/MPI versions, every number measured).
The parent launches each measurement as `mpiexec -n N python benchmarks/gpu_parallel_check.py --child ...`
(the mpiexec next to this Python) and runs the 1-way timing itself."""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch

from jigsaw_ref.comm import Group, cuda_aware_mpi, init_torch_distributed, local_device, make_groups
from jigsaw_ref.config import preset, shard_range
from jigsaw_ref.grid import Grid, split_comms
from jigsaw_ref.loss import lat_weights_cos, variable_weights, weighted_mse
from jigsaw_ref.mixer import WeatherMixer
from jigsaw_ref.parallel import JigsawMixer, clip_grads, gather_state, loss_share, sync_grads, token_sizes

PRECISIONS = ("float64", "float32", "tf32")
BOUNDS = {"float64": 1e-10, "float32": 1e-4, "tf32": 5e-2}  # max relative error accepted, per precision
PAPER = {"fp32": {"2": 1.92, "4": 2.70}, "tf32": {"2": 1.66, "4": 2.25}}  # strong scaling of C3 on A100s
ROLLOUT = 2  # autoregressive steps in the checked forward
DROPOUT = 1e-3  # the released code's rate, for the dropout timing
UNVERIFIED = ("written, not verified on a GPU: the device paths (shared cuda:0, one GPU per rank, staging of CUDA "
              "tensors, NCCL, TF32, CUDA timing) have not run yet")


def mpiexec():
    "The mpiexec next to this Python (the MPI wheel's), not whatever is first on PATH."
    exe = Path(sys.executable).with_name("mpiexec")
    return str(exe) if exe.exists() else "mpiexec"


def slug(name: str) -> str:
    "'NVIDIA H200' -> 'h200'; 'cpu' -> 'cpu'."
    s = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")
    return s or "device"


def set_precision(prec: str):
    "TF32 on or off for CUDA matmuls and convolutions (no effect on CPU tensors)."
    torch.backends.cuda.matmul.allow_tf32 = prec == "tf32"
    torch.backends.cudnn.allow_tf32 = prec == "tf32"


def sync(device):
    if device.type == "cuda": torch.cuda.synchronize(device)


# ------------------------------------------------------------------ the rank's blocks and the comparison

def local(t, cfg, grid, coords, channels, B):
    "This rank's block of a (B, C, lat, lon) tensor: its samples, its channel block, its longitudes."
    d, i, j = coords
    ts = token_sizes(cfg, grid.domain)
    l0 = sum(ts[:i]) // cfg.n_lat * cfg.patch
    l1 = l0 + ts[i] // cfg.n_lat * cfg.patch
    b0, b1 = shard_range(B, grid.dp, d)
    c0, c1 = shard_range(channels, grid.tensor, j)
    return t[b0:b1, c0:c1, :, l0:l1]


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300)) if b.numel() else 0.0


def weight_err(got, want):
    """Max over parameters of max |error| / max |reference|, floored at 1e-6 of the largest gradient. The token MLP's
    output bias `tok2.b` has an exactly-zero gradient in exact arithmetic (a LayerNorm removes it): it is compared on
    the largest gradient's scale (as tests/mpi/test_model_mpi.py does)."""
    top = max(float(t.abs().max()) for t in want.values())
    errs = {}
    for n, w in want.items():
        floor = top if n.endswith("tok2.b") else 1e-6 * top
        errs[n] = float((got[n].double() - w).abs().max()) / max(float(w.abs().max()), floor)
    worst = max(errs, key=errs.get)
    return errs[worst], worst


def reference(cfg, B):
    "The one-process float64 CPU model: inputs, targets, prediction, input gradient and weight gradients."
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, cfg.n_in, cfg.n_lat, cfg.n_lon, generator=g, dtype=torch.float64)
    y = torch.randn(B, cfg.n_out, cfg.n_lat, cfg.n_lon, generator=g, dtype=torch.float64)
    lw = lat_weights_cos(torch.linspace(-80, 80, cfg.n_lat, dtype=torch.float64))
    vw = variable_weights(cfg)
    m = WeatherMixer(cfg, dtype=torch.float64, seed=3)
    xr = x.clone().requires_grad_(True)
    pred = m(xr, k=ROLLOUT)
    weighted_mse(pred, y, lw, vw).backward()
    return dict(x=x, y=y, lw=lw, vw=vw, pred=pred.detach(), xgrad=xr.grad, grads={n: t.grad.clone() for n, t in m.state().items()})


def check(cfg, groups, grid, coords, device, ref, comm, precisions):
    "Errors of this layout against `ref` per precision, the maximum over the ranks."
    from mpi4py import MPI
    B, j, out = ref["x"].shape[0], coords[2], {}
    for prec in precisions:
        dtype = torch.float64 if prec == "float64" else torch.float32
        set_precision(prec)
        par = JigsawMixer(cfg, groups["tensor"], groups["domain"], mode="exact", dtype=dtype, device=device, seed=3)
        xl = local(ref["x"], cfg, grid, coords, cfg.n_in, B).to(device, dtype).requires_grad_(True)
        pred = par(xl, k=ROLLOUT)
        yl = local(ref["y"], cfg, grid, coords, cfg.n_out, B).to(device, dtype)
        vw = ref["vw"][slice(*shard_range(cfg.n_out, grid.tensor, j))].to(device, dtype)
        loss_share(pred, yl, ref["lw"].to(device, dtype), vw, ref["y"].numel()).backward()
        sync_grads(par, groups["dp"])
        grads = gather_state(par, groups["model"], {n: t.grad for n, t in par.state().items()})  # full, on CPU
        e = {"output": rel(pred, local(ref["pred"], cfg, grid, coords, cfg.n_out, B)),
             "input_grad": rel(xl.grad, local(ref["xgrad"], cfg, grid, coords, cfg.n_in, B))}
        e["weight_grads"], worst = weight_err(grads, ref["grads"])
        e = {k: comm.allreduce(v, op=MPI.MAX) for k, v in e.items()}
        e["worst_weight_on_rank0"], e["bound"] = worst, BOUNDS[prec]
        e["pass"] = all(e[k] < BOUNDS[prec] for k in ("output", "input_grad", "weight_grads"))
        out[prec] = e
    set_precision("float32")
    return out


# ------------------------------------------------------------------ step times

def step_time(cfg, groups, grid, coords, device, reps, prec, comm=None, dropout=0.0):
    """Seconds per training step (forward, loss, backward, gradient sync, clipping, Adam) in FP32 or TF32, batch 1 per model
    group; `dropout`: the layout-independent dropout at that rate (a new key every step, as in training)."""
    set_precision(prec)
    cfg = cfg.replace(dropout=dropout)
    par = JigsawMixer(cfg, groups["tensor"], groups["domain"], mode="exact", dtype=torch.float32, device=device, seed=0)
    opt = torch.optim.Adam(par.parameters(), lr=1e-4, weight_decay=3e-6)
    g = torch.Generator().manual_seed(1)
    B = grid.dp
    x = local(torch.randn(B, cfg.n_in, cfg.n_lat, cfg.n_lon, generator=g), cfg, grid, coords, cfg.n_in, B).to(device)
    y = local(torch.randn(B, cfg.n_out, cfg.n_lat, cfg.n_lon, generator=g), cfg, grid, coords, cfg.n_out, B).to(device)
    lw = lat_weights_cos(torch.linspace(-89.875, 89.875, cfg.n_lat)).to(device)
    vw = variable_weights(cfg)[slice(*shard_range(cfg.n_out, grid.tensor, coords[2]))].to(device)
    count = B * cfg.n_out * cfg.n_lat * cfg.n_lon

    keys = iter(range(10**9))

    def step():
        opt.zero_grad(set_to_none=False)
        loss_share(par(x, key=next(keys)), y, lw, vw, count).backward()
        sync_grads(par, groups["dp"])
        clip_grads(par, groups["model"], 1.0)
        opt.step()

    barrier = comm.Barrier if comm is not None else (lambda: None)
    for _ in range(2): step()  # warm-up: allocations, NCCL communicators, staging buffers
    sync(device); barrier()
    t0 = time.perf_counter()
    for _ in range(reps): step()
    sync(device); barrier()
    t = (time.perf_counter() - t0) / reps
    del par, opt
    if device.type == "cuda": torch.cuda.empty_cache()
    set_precision("float32")
    return t if comm is None else comm.allreduce(t, op=__import__("mpi4py").MPI.MAX)


# ------------------------------------------------------------------ one launch: the ranks

def child(a):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    n, rank = comm.Get_size(), comm.Get_rank()
    if a.placement == "cpu":
        torch.set_num_threads(1)
        device = torch.device("cpu")
    else:  # GPU: written, not verified on a GPU
        torch.set_num_threads(max(1, (os.cpu_count() or n) // n))
        device = torch.device("cuda", 0) if a.placement == "shared" else local_device("cuda", comm)
        torch.cuda.set_device(device)
    grid = Grid.named(n, n)  # 2 ranks: 1x2; 4 ranks: 2x2
    coords = grid.coords(rank)
    cfg = preset(a.preset)
    ref = reference(cfg, 2 * grid.dp) if "check" in a.jobs else None
    part = {"mpi_library": MPI.Get_library_version().splitlines()[0].strip(), "cuda_aware_mpi": cuda_aware_mpi(),
            "devices": comm.allgather(str(device)), "runs": []}
    for backend in a.backends.split(","):
        if backend == "mpi":
            c = split_comms(grid, comm)
            groups = {k: Group(getattr(c, k), "p2p", staging=a.staging) for k in ("world", "model", "tensor", "domain", "dp")}
            probe = torch.empty(1, device=device)
            how = "host-staged" if groups["tensor"]._stage(probe) else ("device pointers" if device.type == "cuda" else "host memory")
        else:  # 'nccl' (GPU, written, not verified on a GPU) or 'gloo' (the CPU dry run's stand-in)
            init_torch_distributed(comm, backend)
            groups = make_groups(grid, "torch", "p2p", comm)
            how = backend
        rec = {"ranks": n, "layout": f"{grid.domain}x{grid.tensor}", "backend": backend, "algo": "p2p",
               "staging": a.staging if backend == "mpi" else None, "transfers": how, "placement": a.placement}
        t0 = time.perf_counter()
        if "check" in a.jobs:
            rec["errors"] = check(cfg, groups, grid, coords, device, ref, comm, a.precisions.split(","))
        rec["sent_bytes"] = sum(groups[k].sent for k in ("tensor", "domain", "dp", "model"))  # rank 0's, in the checks
        if "time" in a.jobs:
            scfg = preset(a.scale_preset)
            rec["scale_preset"] = a.scale_preset
            rec["s_per_step"] = {p: step_time(scfg, groups, grid, coords, device, a.reps, p, comm) for p in ("fp32", "tf32")}
        if "drop" in a.jobs:  # the same step with dropout p = 1e-3 (target: at most 1.05 x the step without)
            scfg = preset(a.scale_preset)
            rec["s_per_step_dropout"] = {"fp32": step_time(scfg, groups, grid, coords, device, a.reps, "fp32", comm, DROPOUT)}
        rec["wall_s"] = time.perf_counter() - t0
        part["runs"].append(rec)
        if rank == 0: print(json.dumps(rec), flush=True)
    if rank == 0:
        Path(a.part_out).write_text(json.dumps(part, indent=1))


def launch(n, a, timeout, **child_args):
    "Run the ranks of one measurement under `mpiexec -n n`; their rank 0's JSON, or a record of the failure."
    with tempfile.TemporaryDirectory() as d:
        part = Path(d) / "part.json"
        cmd = [mpiexec(), "-n", str(n), sys.executable, str(Path(__file__).resolve()), "--child", "--part-out", str(part),
               "--preset", a.preset, "--scale-preset", a.scale_preset, "--reps", str(a.reps), "--precisions", a.precisions]
        for k, v in child_args.items(): cmd += [f"--{k.replace('_', '-')}", v]
        env = dict(os.environ, MPIR_CVAR_ENABLE_HEAVY_YIELD="1", PYTHONUNBUFFERED="1")
        print("$", " ".join(cmd[3:]), flush=True)
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
            tail, rc = (r.stdout + r.stderr)[-4000:], r.returncode
        except subprocess.TimeoutExpired as e:
            tail, rc = f"timed out after {timeout} s\n" + str(e.stdout or "")[-3000:], "timeout"
        print(tail[-1500:], flush=True)
        if rc == 0 and part.exists(): return json.loads(part.read_text())
        return {"runs": [{"ranks": n, "failed": rc, "output_tail": tail, **child_args}]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-dry-run", action="store_true", help="every path on CPU: 2 ranks, tiny preset, staging forced, gloo for NCCL")
    ap.add_argument("--preset", default="tiny", help="model checked against the CPU float64 model")
    ap.add_argument("--scale-preset", default="c3", help="model timed for strong scaling (dry run: tiny)")
    ap.add_argument("--ranks", default="2,4", help="ways to run (dry run: 2)")
    ap.add_argument("--reps", type=int, default=5, help="timed steps per measurement (dry run: 2)")
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per mpiexec launch")
    # one launch's ranks (set by the parent)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--placement", choices=("shared", "local", "cpu"), help=argparse.SUPPRESS)
    ap.add_argument("--backends", default="mpi", help=argparse.SUPPRESS)
    ap.add_argument("--staging", default="auto", choices=("auto", "always", "never"), help=argparse.SUPPRESS)
    ap.add_argument("--jobs", default="check", help=argparse.SUPPRESS)
    ap.add_argument("--part-out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child: return child(a)
    dry = a.cpu_dry_run
    if dry: a.scale_preset, a.ranks, a.reps = "tiny", "2", min(a.reps, 2)
    gpus = 0 if dry else torch.cuda.device_count()
    if not dry and gpus == 0:
        sys.exit("gpu_parallel_check: torch sees no GPU. Run it on a GPU machine, or with --cpu-dry-run to exercise it on CPU.")
    ways = [int(w) for w in a.ranks.split(",")]
    t0 = time.time()
    res = {"device": "cpu" if dry else torch.cuda.get_device_name(0), "gpus": gpus, "torch": torch.__version__,
           "cuda": torch.version.cuda, "dry_run": dry, "verified_on_gpu": not dry,
           "note": ("CPU dry run: CPU tensors, staging forced, gloo in place of NCCL, tiny preset; " + UNVERIFIED) if dry else
                   ("a GPU run: the paths recorded below ran on this device (the script was written before any GPU "
                    "run; see all_pass and each run's errors)"),
           "mpiexec": mpiexec(), "check_preset": a.preset, "rollout": ROLLOUT, "bounds": BOUNDS}

    # (a) ranks sharing one GPU through host-staged MPI -- written, not verified on a GPU
    shared = {"what": "2 and 4 ranks on one device, MPI Groups, staging='always'", "runs": []}
    for n in ways:
        part = launch(n, a, a.timeout, placement="cpu" if dry else "shared", backends="mpi", staging="always", jobs="check,time")
        shared["runs"] += part["runs"]
        res.setdefault("mpi_library", part.get("mpi_library")); res.setdefault("cuda_aware_mpi", part.get("cuda_aware_mpi"))
    res["shared_gpu"] = shared

    # (b) one GPU per rank: NCCL and MPI, then strong scaling -- written, not verified on a GPU
    if dry or gpus >= 2:
        tb = "gloo" if dry else "nccl"
        multi = {"what": f"one device per rank, {tb} TorchGroups and MPI Groups (staging {'always' if dry else 'auto'})", "runs": []}
        usable = [n for n in ways if dry or n <= gpus]
        if len(usable) < len(ways): multi["note"] = f"{sorted(set(ways) - set(usable))}-way skipped: {gpus} GPUs"
        for n in usable:
            part = launch(n, a, a.timeout, placement="cpu" if dry else "local", backends=f"mpi,{tb}",
                          staging="always" if dry else "auto", jobs="check,time,drop")
            multi["runs"] += part["runs"]
        # 1-way, in this process
        device = torch.device("cpu") if dry else torch.device("cuda", 0)
        if dry: torch.set_num_threads(1)
        one = {k: Group() for k in ("world", "model", "tensor", "domain", "dp")}
        scfg, grid1 = preset(a.scale_preset), Grid()
        times = {"1": {p: step_time(scfg, one, grid1, (0, 0, 0), device, a.reps, p) for p in ("fp32", "tf32")}}
        drop = {"1": step_time(scfg, one, grid1, (0, 0, 0), device, a.reps, "fp32", dropout=DROPOUT) / times["1"]["fp32"]}
        for r in multi["runs"]:
            if "s_per_step" in r: times[f"{r['ranks']}-{r['backend']}"] = r["s_per_step"]
        multi["scaling"] = {"preset": a.scale_preset, "batch_per_model_group": 1, "reps": a.reps, "s_per_step": times,
                            "speedup": {k: {p: times["1"][p] / v[p] for p in v} for k, v in times.items() if k != "1"},
                            "paper_speedup_a100": PAPER}
        for r in multi["runs"]:
            if "s_per_step_dropout" in r: drop[f"{r['ranks']}-{r['backend']}"] = r["s_per_step_dropout"]["fp32"] / r["s_per_step"]["fp32"]
        multi["dropout"] = {"p": DROPOUT, "precision": "fp32", "step_with_over_without": drop, "target": 1.05}
        multi["torch_over_mpi"] = {  # TorchGroup (NCCL; gloo in the dry run) over the MPI Group, same layout and run
            str(n): {p: times[f"{n}-{tb}"][p] / times[f"{n}-mpi"][p] for p in ("fp32", "tf32")}
            for n in usable if f"{n}-{tb}" in times and f"{n}-mpi" in times}
        res["multi_gpu"] = multi
    else:
        res["multi_gpu"] = {"skipped": f"needs >= 2 GPUs, this machine has {gpus}: NCCL and one-GPU-per-rank not run"}

    runs = res["shared_gpu"]["runs"] + res["multi_gpu"].get("runs", [])
    res["all_pass"] = bool(runs) and all("errors" in r and all(e["pass"] for e in r["errors"].values()) for r in runs)
    res["wall_s"] = time.time() - t0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu_parallel_{slug(res['device'])}.json"
    path.write_text(json.dumps(res, indent=1))
    print(f"\n{'run':<28} {'precision':<8} {'output':>9} {'input grad':>11} {'weight grads':>13}")
    for r in runs:
        name = f"{r['ranks']}-way {r.get('backend')} {r.get('transfers', r.get('failed'))}"
        for p, e in r.get("errors", {}).items():
            print(f"{name:<28} {p:<8} {e['output']:>9.2e} {e['input_grad']:>11.2e} {e['weight_grads']:>13.2e}{'' if e['pass'] else '  FAIL'}")
    if "scaling" in res["multi_gpu"]:
        sc = res["multi_gpu"]["scaling"]
        for k, v in sc["speedup"].items():
            w = k.split("-")[0]
            print(f"{a.scale_preset} {k}: " + ", ".join(f"{p} {v[p]:.2f}x (paper {PAPER[p].get(w, '-')}x)" for p in v))
        for n, v in res["multi_gpu"]["torch_over_mpi"].items():
            print(f"{a.scale_preset} {n}-way TorchGroup / MPI Group step time: " + ", ".join(f"{p} {v[p]:.2f}" for p in v) + " (target <= 1.10)")
        for k, v in res["multi_gpu"]["dropout"]["step_with_over_without"].items():
            print(f"{a.scale_preset} {k} with dropout p = {DROPOUT:g} / without: {v:.3f} (target <= 1.05)")
    for r in res["shared_gpu"]["runs"]:
        if "s_per_step" in r:
            print(f"{a.scale_preset} {r['ranks']} ranks sharing one device, MPI {r.get('transfers')}: "
                  + ", ".join(f"{p} {t:.3f} s/step" for p, t in r["s_per_step"].items()))
    print(f"wrote {path}  all_pass={res['all_pass']}  verified_on_gpu={res['verified_on_gpu']}")
    return 0 if res["all_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
