"""Scale run: the paper's 720 x 1440 grid with its 72 ERA5 channels and the released H=1024 configuration
(preset `h1024`: f_s=0.125, f_c=0.25, P=60; 238,511,658 parameters 1-way) on this machine's CPU cores, with the lazily
computed `synthetic:720x1440` data source. Trains a few steps 4-way on 4 ranks, writes a sharded checkpoint, resumes
it 2-way on 2 ranks and 1-way on 1 rank (a step each), and prints for every rank and phase (build, step, save, load)
the peak resident memory beside the analytic share, and the checkpoint's write and read time and bytes per rank.

Usage:  python benchmarks/scale_run.py [--steps 2] [--work DIR] [--out benchmarks/results/scale_run.txt] [--default-malloc]

Memory is read from /proc/self/status: before each phase the peak is reset (`echo 5 > /proc/self/clear_refs`), after
it VmHWM is the phase's peak resident set. The analytic share of a rank in a phase is what it must hold then:
  build: its parameters (+ the largest full initial tensor, float64: `JigsawMixer` slices its blocks out of the one-process
         initial weights, one tensor at a time);
  step:  parameters, gradients, both Adam moments (the state share) + the 1-way run's saved activations / n + its sample block;
  save:  the state share + the writer's buffers (one chunk at a time: about 3 x checkpoint.CHUNK_BYTES);
  load:  parameters + both Adam moments (allocated by the load) + the reader's buffers.
Everything is above the process's fixed overhead (Python, torch, mpi4py, zarr and torch._dynamo, which the optimizer
imports, loaded; measured before the build).
The `planned` column is `jigsaw_ref.plan`'s peak of the phase for the rank (base + its terms): the build (parameters
and the float64 initialisation of the largest block) and the steady training step (state, batch, saved activations,
receive buffers, workspace); a first step (no gradients or moments before it) stays below it. Save and load are not
planned ('-'). Each rank fixes glibc's mmap threshold (`plan.tame_allocator`) so freed tensors are given back, as the
plan assumes; `--default-malloc` leaves glibc's dynamic threshold alone (then blocks under 32 MiB stay in the heap).
This is a benchmark, not a test: run it once on a quiet machine and read the table.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def mem_mib() -> dict:
    "VmRSS and VmHWM of this process in MiB."
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")): out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


def reset_peak():
    "Make VmHWM equal to the current RSS (Linux >= 4.0)."
    with open("/proc/self/clear_refs", "w") as f: f.write("5")


class Phases:
    "Per-phase memory and timing records of this rank."
    def __init__(self, rank: int):
        self.rank, self.rows, self.base = rank, [], mem_mib()["VmRSS"]

    def run(self, name, fn, **extra):
        reset_peak(); m0, t0 = mem_mib()["VmRSS"], time.perf_counter()
        out = fn()
        dt, m1 = time.perf_counter() - t0, mem_mib()
        self.rows.append(dict(phase=name, rank=self.rank, rss0=m0, peak=m1["VmHWM"], rss1=m1["VmRSS"], seconds=dt, **extra))
        return out


def share_mib(t) -> dict:
    "This rank's parameter bytes, its largest full initial tensor (float64) and its sample block (input + target), MiB."
    import math
    from jigsaw_ref.mixer import param_shapes
    p = sum(x.numel() * x.element_size() for x in t.model.state().values()) / 2**20
    big = max(math.prod(s) for s in param_shapes(t.cfg).values()) * 8 / 2**20
    ds = t.train_ds
    sample = (len(ds.in_channels) + len(ds.out_channels)) * len(ds.lat) * len(ds.lon) * 4 / 2**20
    return dict(params=p, init_full=big, sample=sample)


def rank_main(a) -> int:
    "One rank of one launch: build, then (write) steps and a save, or (resume) a load and a step."
    os.environ.setdefault("MPIR_CVAR_ENABLE_HEAVY_YIELD", "1"); os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    from mpi4py import MPI
    from jigsaw_ref.plan import tame_allocator
    if not a.default_malloc: tame_allocator()
    import torch._dynamo  # noqa: F401 (the optimizer imports it in the build; part of the fixed overhead)
    from jigsaw_ref import checkpoint
    from jigsaw_ref.pmatmul import saved_bytes
    from jigsaw_ref.train import Trainer, TrainConfig
    from jigsaw_ref.cli import install_abort_hook
    comm = MPI.COMM_WORLD
    install_abort_hook(comm)
    torch.set_num_threads(int(os.environ.get("JIGSAW_THREADS", "1")))
    ph = Phases(comm.Get_rank())
    work = Path(a.work)
    tc = TrainConfig(model="h1024", data="synthetic:720x1440", way=a.way, max_steps=100, warmup_steps=0, lr=1e-4,
                     val_batches=1, progress=False, out=str(work))
    t = ph.run("build", lambda: Trainer(tc, comm=comm))
    sh = share_mib(t)
    ckpt = work / "scale.ckpt"
    if a.phase == "resume":
        ph.run("load", lambda: t.load(ckpt))
        ph.rows[-1] |= dict(io_bytes=t.last_load["chunk_bytes"], io_seconds=t.last_load["seconds"])
    for s in range(a.steps):
        k = 1
        def step():
            with saved_bytes() as sb: rec = t.train_step(t.next_indices(), k)
            return sb.bytes, rec["loss"]
        nbytes, loss = ph.run(f"step {t.step + 1}", step)
        ph.rows[-1] |= dict(saved_act=nbytes / 2**20, loss=loss)
    if a.phase == "write":
        ph.run("save", lambda: t.save("scale.ckpt"))
        ph.rows[-1] |= dict(io_bytes=t.last_save["bytes"], io_seconds=t.last_save["seconds"])
    comm.Barrier()
    rows = comm.gather([r | dict(base=ph.base, **sh) for r in ph.rows], root=0)
    if comm.Get_rank() == 0:
        (work / f"rows_{a.phase}_{a.way}.json").write_text(json.dumps([r for rr in rows for r in rr]))
    return 0


def launch(n: int, phase: str, way: str, steps: int, work: Path, default_malloc: bool = False):
    exe = Path(sys.executable).with_name("mpiexec")
    env = dict(os.environ, MPIR_CVAR_ENABLE_HEAVY_YIELD="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [str(exe), "-n", str(n), sys.executable, __file__, "--rank-phase", phase, "--way", way, "--steps", str(steps),
           "--work", str(work)] + (["--default-malloc"] if default_malloc else [])
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)


def analytic(r: dict, prev: str, act1: float, n: int, chunk_mib: float) -> tuple[float, float]:
    "(what the phase adds, what the rank must hold above its base at the phase's peak), MiB, for row `r` after phase `prev`."
    P, state, step_need = r["params"], 4 * r["params"], act1 / n + r["sample"]
    ph = r["phase"]
    if ph == "build": return P + r["init_full"], P + r["init_full"]
    if ph == "save": return chunk_mib, state + chunk_mib
    if ph == "load": return 2 * P + chunk_mib, 3 * P + chunk_mib  # the moments it allocates; no gradients yet
    first = {"build": 3 * P, "load": P}.get(prev, 0.0)  # gradients and moments (or only gradients) appear in the first step
    return first + step_need, state + step_need


def planned_mib(r: dict) -> float:
    "`jigsaw_ref.plan`'s peak (MiB) of row `r`'s phase on its rank, above the measured base (nan for save and load)."
    from jigsaw_ref.config import preset
    from jigsaw_ref.grid import Grid
    from jigsaw_ref.plan import Setup, rank_memory
    ph = r["phase"].split()[0]
    if ph not in ("build", "step"): return float("nan")
    grid = Grid.named(r["way"], int(r["way"]))
    _, i, j = grid.coords(r["rank"])
    m = rank_memory(preset("h1024"), grid.domain, grid.tensor, i, j, Setup(), r["base"] * 2**20)
    return m["phases"]["build"] / 2**20 if ph == "build" else m["peak"] / 2**20


def table(rows: list, act1: float, chunk_mib: float) -> str:
    "The per-rank, per-phase table (MiB): the measured peak beside the analytic share and the plan."
    head = (f"{'run':>5} {'phase':>7} {'rank':>4} {'base':>5} {'rss0':>6} {'peak':>6} {'planned':>7} {'pl/peak':>7} {'added':>6} {'ana+':>6} "
            f"{'peak-base':>9} {'analytic':>8} {'ratio':>5} {'state':>6} {'act':>6} {'act1/n':>6} {'io MiB':>7} "
            f"{'io s':>5} {'secs':>6}")
    lines, prev = [head], {}
    for r in rows:
        n = int(r["way"])
        add, total = analytic(r, prev.get((r["way"], r["rank"]), ""), act1, n, chunk_mib)
        prev[(r["way"], r["rank"])] = r["phase"].split()[0]
        use = r["peak"] - r["base"]
        pl = planned_mib(r)
        lines.append(f"{r['way'] + '-way':>5} {r['phase']:>7} {r['rank']:>4} {r['base']:5.0f} {r['rss0']:6.0f} "
                     f"{r['peak']:6.0f} {pl:7.0f} {pl / r['peak']:7.2f} {r['peak'] - r['rss0']:6.0f} {add:6.0f} {use:9.0f} {total:8.0f} {use / total:5.2f} "
                     f"{4 * r['params']:6.0f} {r.get('saved_act', float('nan')):6.0f} {act1 / n:6.0f} "
                     f"{r.get('io_bytes', 0) / 2**20:7.0f} {r.get('io_seconds', float('nan')):5.1f} {r['seconds']:6.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2, help="training steps of the 4-way run (the resumes take one each)")
    ap.add_argument("--work", default=None, help="folder for the run and its checkpoint (default: a temporary one, removed)")
    ap.add_argument("--out", default=str(HERE / "results" / "scale_run.txt"), help="where the table is written")
    ap.add_argument("--from-work", action="store_true", help="only rebuild the table from the records in --work")
    ap.add_argument("--default-malloc", action="store_true", help="leave glibc's dynamic mmap threshold alone")
    ap.add_argument("--rank-phase", dest="phase", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--way", default="4", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.phase: return rank_main(a)
    import shutil, tempfile
    from jigsaw_ref.checkpoint import CHUNK_BYTES
    from jigsaw_ref.config import preset
    from jigsaw_ref.mixer import param_count
    work = Path(a.work or tempfile.mkdtemp(prefix="jigsaw-scale-"))
    t0 = time.perf_counter()
    runs = (("write", "4", a.steps), ("resume", "2", 1), ("resume", "1", 1))
    for ph, w, k in runs if not a.from_work else ():
        launch(int(w), ph, w, k, work, a.default_malloc)
    rows = [r | dict(way=w) for ph, w, _ in runs for r in json.loads((work / f"rows_{ph}_{w}.json").read_text())]
    took = json.loads((work / "seconds.json").read_text()) if a.from_work else time.perf_counter() - t0
    (work / "seconds.json").write_text(json.dumps(took))
    act1 = next(r["saved_act"] for r in rows if r["way"] == "1" and r["phase"].startswith("step"))
    cfg = preset("h1024")
    store = sum(p.stat().st_size for p in (work / "scale.ckpt").rglob("*") if p.is_file())
    chunk_mib = 3 * CHUNK_BYTES / 2**20  # one chunk at a time: the chunk, its encoded copy, a device/host copy
    losses = {f"{r['way']}-way {r['phase']}": r["loss"] for r in rows if "loss" in r and r["rank"] == 0}
    text = "\n".join([
        f"scale run: preset h1024 ({param_count(cfg):,} parameters 1-way; grid {cfg.n_lat}x{cfg.n_lon}, {cfg.n_in} input "
        f"channels, H={cfg.hidden}, f_s={cfg.f_s}, f_c={cfg.f_c}, P={cfg.patch}), data synthetic:720x1440, float32, CPU "
        f"({os.cpu_count()} cores), 4-way {a.steps} steps -> checkpoint -> 2-way and 1-way resume, 1 step each; "
        f"{took:.0f} s in all",
        f"checkpoint store: {store / 2**20:.0f} MiB on disk; losses: {losses} (the 2-way and 1-way resumes continue the "
        f"4-way run from its checkpoint: the same step {a.steps + 1})",
        f"allocator: {'glibc default' if a.default_malloc else 'mmap threshold fixed at 128 KiB (plan.tame_allocator)'}",
        "MiB per rank: base = RSS before the build (the fixed overhead: Python, torch, MPI, zarr, torch._dynamo); rss0 = RSS at the "
        "phase's start; peak = VmHWM in the phase (reset before it); planned = jigsaw_ref.plan's peak of the phase "
        "(build; steady training step, which a first step stays below; '-' for save and load), pl/peak = planned / peak; "
        "added = peak - rss0; ana+ = what the phase must add "
        "(build: params + the largest full float64 initial tensor; step: gradients and moments the first time + the "
        "1-way saved activations / n + the sample block; save: chunk buffers; load: the two moments + chunk buffers); "
        "analytic = what the rank must hold above base at the phase's peak (state/n + activations/n + buffers); "
        "ratio = (peak - base) / analytic; state = params + grads + 2 Adam moments of this rank; act = saved "
        "activations measured in the step; act1/n = the 1-way run's / n; io = checkpoint bytes written (save) or chunk "
        "bytes read (load) by this rank, and its seconds. After a step the allocator keeps the freed activations, so "
        "rss0 of a save includes them: the save's own cost is `added`.",
        table(rows, act1, chunk_mib)])
    print(text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text + "\n")
    if a.work is None: shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
