# %% [markdown]
# # Reliability
#
# > What happens when something goes wrong: a failure on one rank ends the whole job, checkpoints are atomic and checksummed, a non-finite loss stops (or skips) cleanly, every bad input we tried is refused with a message that names the fix, and a run survives what a cluster does to it (preemption, a stalled node, a shared folder, changed settings on resume, bad data), as the reliability table at the end shows.

# %%
#| hide
import contextlib, hashlib, io, os, re, shutil, signal, subprocess, sys, tempfile, time
from dataclasses import asdict
from pathlib import Path
import numpy as np
import pandas as pd
import torch
import xarray as xr
from fastcore.test import test_eq, test_fail
from IPython.display import display
from jigsaw_ref.checkpoint import MAGIC, CheckpointError, fault_point, load_checkpoint, save_checkpoint
from jigsaw_ref.comm import Group, make_groups
from jigsaw_ref.config import ConfigError, preset
from jigsaw_ref.data import DataError, Era5Dataset
from jigsaw_ref.generator import default_dataset
from jigsaw_ref.grid import Grid
from jigsaw_ref.ranks import run_ranks
from jigsaw_ref.train import NonFiniteError, Trainer, TrainConfig
from jigsaw_ref.settings import check_settings
from jigsaw_ref.runfolder import read_lock
from jigsaw_ref.cli import install_abort_hook, parse_args

torch.set_num_threads(1)
ONE = lambda: {k: Group() for k in ("world", "model", "tensor", "domain", "dp")}  # the groups of a one-rank job
work = Path(tempfile.mkdtemp(prefix="jigsaw-reliability-"))


# %% [markdown]
# This notebook exports nothing: it documents, and checks, the failure behaviour that `train` and `checkpoint`
# build in. The multi-rank evidence (every fault point on 2 and 4 ranks, `kill -9` of a writer in the middle of a
# checkpoint, a full disk, the time from a fault to the end of the job) is in `tests/test_reliability.py`, which
# launches `jigsaw-train` under `mpiexec` with faults injected; the cheap checks run here, in one process or on
# in-process thread ranks. The last section, the reliability table, runs the failures of a real cluster as
# launched jobs, one row each; each row has its test in `tests/test_reliability.py`, `tests/test_train.py` or
# `tests/test_data.py`.

# %% [markdown]
# ## A failure on one rank ends the whole job
#
# Every rank of a Jigsaw job takes part in the same collectives, step after step. A rank that raises and simply
# exits leaves its partners blocked forever in their next all-reduce: the classic MPI hang, which on a cluster
# burns the whole allocation and says nothing. Three layers keep that from happening:
#
# 1. **Settings are checked before any collective**, from the settings alone (`check_settings`), so every rank
#    raises the same `ConfigError` at the same point.
# 2. **Checks that need a file** (the data, a checkpoint) run on every rank through `train.agree`: each rank
#    runs the check, the ranks exchange verdicts, and if any rank failed every rank raises.
# 3. **Anything else** (a bug, a full disk, an out-of-memory on one rank, an injected fault) reaches
#    `install_abort_hook`: the hook prints `[jigsaw_ref rank R] Type: message` and the traceback, flushes, and
#    calls `MPI_Abort`, which makes `mpiexec` end every rank with a non-zero status.
#
# The hook, with a stand-in for `MPI.COMM_WORLD` that records the abort instead of ending this notebook, and the
# fault injection of `fault_point` (`JIGSAW_FAULT="forward@1:3"`: rank 1, step 3, forward pass):

# %%
class FakeWorld:
    "Rank 1 of a 2-rank `MPI.COMM_WORLD` that records `Abort` instead of ending this process."
    aborted = None
    def Get_rank(self): return 1
    def Get_size(self): return 2
    def Abort(self, code): self.aborted = code


world, saved, err = FakeWorld(), sys.excepthook, io.StringIO()
os.environ["JIGSAW_FAULT"] = "forward@1:3"
try:
    sys.excepthook = sys.__excepthook__  # the plain interpreter's hook underneath, as in a script (not IPython's)
    install_abort_hook(world)
    fault_point("forward", 0, 3); fault_point("forward", 1, 2)  # another rank, another step: nothing happens
    try: fault_point("forward", 1, 3)
    except RuntimeError as e:
        with contextlib.redirect_stderr(err): sys.excepthook(type(e), e, None)
finally:
    sys.excepthook = saved; del os.environ["JIGSAW_FAULT"]
print(err.getvalue().strip().splitlines()[0])
test_eq(world.aborted, 1)
assert err.getvalue().strip().startswith("[jigsaw_ref rank 1] RuntimeError: injected fault at forward on rank 1, step 3")


# %% [markdown]
# The real thing: 2 ranks of the `tiny` model, rank 1 failing in its forward pass at step 2. Rank 0 is waiting
# for rank 1 in a collective when rank 1 aborts; the job ends at once, the error and its rank are on stderr,
# and the checkpoints of steps 1 and 2 (written before the fault) load and verify.

# %%
def launch(n, args, fault=None):
    "Run `jigsaw-train ARGS` on `n` ranks; (exit status, stderr, seconds from the first error line to the end)."
    mpiexec = Path(sys.executable).with_name("mpiexec")
    env = dict(os.environ, MPIR_CVAR_ENABLE_HEAVY_YIELD="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               **({"JIGSAW_FAULT": fault} if fault else {}))
    p = subprocess.Popen([str(mpiexec), "-n", str(n), sys.executable, "-m", "jigsaw_ref.cli", *map(str, args)],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines, t_err = [], None
    for line in p.stderr:  # stream: note when the first rank reports its error
        if t_err is None and "[jigsaw_ref rank" in line: t_err = time.perf_counter()
        lines.append(line)
    rc = p.wait(120)
    return rc, "".join(lines), time.perf_counter() - (t_err or time.perf_counter())


out = work / "fault"
rc, err, after = launch(2, ["--model", "tiny", "--way", "2", "--max-steps", "4", "--ckpt-every", "1",
                            "--progress", "false", "--out", out], fault="forward@1:2")
print("\n".join(l for l in err.splitlines() if l.startswith(("[jigsaw_ref", "Abort"))))
print(f"exit status {rc}; the job ended {after:.1f} s after the error was printed; checkpoints: "
      f"{sorted(p.name for p in out.glob('*.ckpt'))}")
assert rc != 0 and "[jigsaw_ref rank 1] RuntimeError: injected fault at forward on rank 1, step 2" in err and after < 30
test_eq([load_checkpoint(p)["step"] for p in sorted(out.glob("step*.ckpt"))], [1, 2])

# %% [markdown]
# The fault points, and what `tests/test_reliability.py` checks for each, on 2 ranks (2-way) and 4 ranks (4-way):
#
# | `JIGSAW_FAULT` | where | checked |
# |---|---|---|
# | `data@R:S` | reading rank R's block of a sample | non-zero exit within 30 s of the error line, `[jigsaw_ref rank R]` and the message on stderr, every checkpoint of the steps done present and verified, no temp file |
# | `forward@R:S` | after the forward pass | same |
# | `backward@R:S` | after the backward pass, before the gradient all-reduces | same |
# | `checkpoint@R:S` | rank R, halfway through writing its share of `stepS.ckpt` (raises) | same, the earlier checkpoints intact, the temporary folder removed |
# | `enospc-checkpoint@R:S` | rank R, halfway through its share: `OSError(ENOSPC)`, as a full disk | every rank raises `CheckpointError` naming the checkpoint ("not written", the rank, "No space left on device", "the previous checkpoint is intact"); `--resume auto` continues |
# | `kill-checkpoint@R:S` | rank R, halfway through its share, `SIGKILL` (no hook runs) | `mpiexec` ends the job (exit 9); `stepS-1` loads and verifies; the half-written temporary folder has no manifest, is not a `*.ckpt` and is refused as "not a committed checkpoint"; `--resume auto` continues from `stepS-1` and the stale folder is removed when `stepS` is written again |
#
# The injected faults are `RuntimeError`s that nothing catches, like a real bug. `SIGKILL` is what the
# out-of-memory killer or a scheduler's time limit sends: no Python code runs, and `mpiexec` notices the dead
# process and ends the others.

# %% [markdown]
# ## Atomic, checksummed checkpoints
#
# A checkpoint is a store folder of the `checkpoint` module: every rank writes its blocks into a temporary folder
# `.NAME.tmp-XXXXXXXX` beside the target, each chunk followed by its CRC32C; the ranks agree that every write
# succeeded; rank 0 writes `manifest.json` (the replicated state, every block's place, the SHA-256 of the manifest
# itself), fsyncs, and renames the folder to `NAME` (swapping atomically with an old `NAME`). A reader sees the
# old checkpoint or the new one, never half of one. Here, two in-process ranks of a 2-way job write step 1, then
# rank 1 finds the disk full halfway through step 2:

# %%
ck = work / "ck"
ONE_TINY = dict(model="tiny", max_steps=3, progress=False, val_batches=1, out=str(ck))

def two_way(comm, fault=None):
    "A 2-way trainer on thread ranks: save step 1, then try step 2 (with `fault` injected); what step 2 raised."
    t = Trainer(TrainConfig(**ONE_TINY, way="2"), groups=make_groups(Grid(1, 1, 2), comm=comm))
    t.train_step(t.next_indices(), 1); t.save()
    t.train_step(t.next_indices(), 1)
    if comm.Get_rank() == 0 and fault: os.environ["JIGSAW_FAULT"] = fault
    comm.Barrier()
    try: t.save(); return None
    except Exception as e: return f"{type(e).__name__}: {e}"
    finally: comm.Barrier(); os.environ.pop("JIGSAW_FAULT", None)

errs = run_ranks(2, two_way, "enospc-checkpoint@1:2")
for r, e in enumerate(errs): print(f"rank {r}: {e.replace(str(work), '$WORK')}")
print(sorted(p.name for p in ck.iterdir()))
assert all(e and "checkpoint not written" in e and "the previous checkpoint is intact" in e for e in errs)
test_eq(sorted(p.name for p in ck.glob("*.ckpt")), ["step0000001.ckpt"])
test_eq([p.name for p in ck.iterdir() if ".tmp-" in p.name], [])
test_eq(load_checkpoint(ck / "step0000001.ckpt")["step"], 1)

# %% [markdown]
# Damage to a committed store is named, down to the tensor, its block and the chunk: one flipped byte in a
# chunk file, for example, is refused before any of it reaches a model:

# %%
bad = work / "flipped.ckpt"; shutil.copytree(ck / "step0000001.ckpt", bad)
chunk = sorted(p for p in (bad / "params/blocks.0.tok1.w/i0j1/c").rglob("*") if p.is_file())[0]
raw = bytearray(chunk.read_bytes()); raw[100] ^= 0x08; chunk.write_bytes(raw)
test_fail(lambda: load_checkpoint(bad), contains="params of 'blocks.0.tok1.w', block i0j1, chunk (0, 0): checksum mismatch")

# %% [markdown]
# Checkpoints of the first format (one file: an 8-byte magic, the SHA-256 of the payload in hex, then the
# `torch.save` payload of the full model) still load, and are written the same careful way by
# `checkpoint.save_checkpoint`: temp file, fsync, rename, the folder fsynced. A write that fails halfway leaves
# the previous file untouched, and the half-written temp file, when one is left, is no `*.ckpt` and would not
# match its checksum anyway:

# %%
old = work / "old"
save_checkpoint(old / "step0000001.ckpt", {"step": 1, "w": torch.arange(4.0)})
raw = (old / "step0000001.ckpt").read_bytes()
test_eq(hashlib.sha256(raw[72:]).hexdigest(), raw[8:72].decode())
os.environ["JIGSAW_FAULT"] = "checkpoint@0:2"
try: test_fail(lambda: save_checkpoint(old / "step0000002.ckpt", {"step": 2, "w": torch.zeros(10_000)}), contains="injected fault")
finally: del os.environ["JIGSAW_FAULT"]
test_eq([p.name for p in old.glob("*.ckpt")], ["step0000001.ckpt"])
for tmp in old.glob(".*.tmp-*"): test_fail(lambda: load_checkpoint(tmp), contains="checksum mismatch")

# %% [markdown]
# ## Non-finite losses
#
# After the backward pass every rank knows whether its loss and gradients are finite; the ranks all-reduce that
# flag, so all of them take the same branch (one rank stepping while another does not would desynchronise the
# model for good). With `--nonfinite stop` (the default) every rank raises `NonFiniteError`, naming the step and
# the rank, before the optimizer touches the weights, so the last checkpoint is the last good state. A learning
# rate of $10^6$ without clipping makes the loss overflow at the second step:

# %%
diverge = dict(model="tiny", lr=1e6, lr_encdec=1e6, clip=0.0, warmup_steps=0, max_steps=3, ckpt_every=1,
               progress=False, val_batches=1)
t = Trainer(TrainConfig(**diverge, out=str(work / "nan")), groups=ONE())
try: t.fit()
except NonFiniteError as e: msg = str(e)
print(msg)
assert msg.startswith("non-finite loss or gradient at step 1") and "on rank 0" in msg
test_eq([p.name for p in (work / "nan").glob("*.ckpt")], ["step0000001.ckpt"])
assert all(torch.isfinite(v).all() for v in load_checkpoint(work / "nan" / "step0000001.ckpt")["params"].values())

# %% [markdown]
# With `--nonfinite skip` the step is dropped (gradients zeroed, no optimizer step) and training goes on; the
# `skipped` column of `metrics.csv` records it. A run that skips more than `--max-skip-fraction` of its steps
# (default 0.1) stops with the same error instead of exiting 0 with a model that barely trained; here every
# skip is allowed (`max_skip_fraction=1`), then the default bound (a tenth of 3 steps: none) stops the run at its
# first skip:

# %%
t = Trainer(TrainConfig(**diverge, nonfinite="skip", max_skip_fraction=1.0, out=str(work / "skip")), groups=ONE())
t.fit()
print((work / "skip" / "metrics.csv").read_text().split()[0])
test_eq([h["skipped"] for h in t.history], [0, 1, 1])
t = Trainer(TrainConfig(**diverge, nonfinite="skip", out=str(work / "skip-bound")), groups=ONE())
test_fail(t.fit, contains="1 of the run's 3 steps skipped, more than --max-skip-fraction 0.1")

# %% [markdown]
# ## Every bad input we tried
#
# Each row below is produced by triggering the error (nothing is typed in): settings through `TrainConfig` and
# `check_settings` (what `--set`, `--way` and the other flags reach), the command line through `parse_args`,
# checkpoints through `Trainer.load`, data through `Era5Dataset` and `Trainer`. Under `mpiexec` each of these is
# raised on every rank before any collective (settings) or through `agree` (files).
#
# A row marked **gap** would be one refused with a raw Python error, or not refused at all; the table's last
# cell counts them, and `tests/test_reliability.py` tests every row's message.

# %%
rows = []

def tried(category, what, fn, want=None):
    "Run `fn`, record the error it raises (type and exact message); `want`: a fragment the message must contain."
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr): fn()
        kind, message = "accepted", "(no error)"
    except SystemExit as e:  # argparse: the usage error is its last stderr line
        kind, message = f"usage error (exit {e.code})", stderr.getvalue().strip().splitlines()[-1]
    except Exception as e:
        kind, message = type(e).__name__, str(e)
        if isinstance(e, (ConfigError, DataError, CheckpointError)): kind = f"{kind} (clear)"
    clear = kind.endswith("(clear)") or kind.startswith("usage error")
    kind = kind.removesuffix(" (clear)")
    rows.append(dict(category=category, input=what, error=kind if clear else f"gap: {kind}", message=message))
    if want is not None: assert clear and want in message, (what, kind, message)


# %% [markdown]
# Settings (`--set FIELD=VALUE` overrides of the preset, and the run's own flags), and the layout against the
# world size:

# %%
def settings(world=1, **kw): return lambda: check_settings(TrainConfig(**{"model": "tiny", **kw}), world)

for s, want in [("patch=7", "not divisible by patch=7"), ("rollout=[2,1]", "rollout=(2, 1)"), ("dropout=1.5", "dropout=1.5"),
                ("hidden=0", "hidden=0"), ("hidden=abc", "hidden = 'abc' (from --set hidden=abc): expected int"), ("widht=3", "no field 'widht'"),
                ("hidden", "expected FIELD=VALUE"), ("variables=msl,msl", "listed twice"), ("res_inputs=foo", "res_inputs='foo'"),
                ("f_c=0", "f_c=0.0"), ("out_pad=-1", "out_pad=-1"), ("f_s=abc", None), ("dt_hours=0", None)]:
    tried("settings", f"--set {s}", settings(model_overrides=(s,)), want)
for kw, want in [(dict(model="huge"), "unknown preset 'huge'"), (dict(algo="ring"), "algo='ring'"),
                 (dict(nonfinite="ignore"), "nonfinite='ignore'"), (dict(batch=0), "batch=0"), (dict(epochs=0), "epochs=0"),
                 (dict(dtype="float16"), "dtype='float16'"), (dict(precision="bf16"), "is for GPUs"),
                 (dict(max_steps=-1), None), (dict(clip=-1.0), None), (dict(lr=-1e-3), None), (dict(ckpt_every=-1), None)]:
    tried("settings", " ".join(f"--{k.replace('_', '-')} {v}" for k, v in kw.items()), settings(**kw), want)
for way, world, want in [("3", 3, "way='3'"), ("4", 2, "world size 2 is not a multiple"), ("4", 6, "world size 6 is not a multiple"),
                         ("2x1", 3, "model group size 2x1=2"), ("16x1", 16, "8 longitude patches cannot be split over 16"),
                         ("1x32", 32, "22 input channels cannot be split 32 ways"), ("0x2", 2, "way='0x2'"),
                         ("2x", 2, None), ("2x0", 2, None), ("2x2x2", 8, None), ("-1", 1, None)]:
    tried("layout", f"--way {way} on {world} rank(s)", settings(world, way=way), want)

# %% [markdown]
# The command line and config files:

# %%
for argv, want in [(["--bogus", "1"], "unrecognized arguments: --bogus"), (["--lr", "abc"], "invalid float value: 'abc'"),
                   (["--max-steps", "1.5"], "invalid int value: '1.5'"), (["--way"], "expected one argument"),
                   (["--config", "/nonexistent.toml"], "no such file")]:
    tried("command line", " ".join(argv), lambda: parse_args(argv), want)
for name, text, want in [("unknown.toml", "learning_rate = 2\n", "unknown settings ['learning_rate']"),
                         ("broken.toml", "lr = = 1\n", "cannot parse"), ("broken.json", '{"lr": 1e-3,}', "cannot parse")]:
    (work / name).write_text(text)
    tried("command line", f"--config {name}: {text.strip()}", lambda: parse_args(["--config", str(work / name)]), want)

# %% [markdown]
# Checkpoints: one good checkpoint of the `tiny` model, in the first format (one file) and as a store, then
# damaged or foreign copies of it, each given to a trainer's `load` (what `--resume PATH` calls, on every rank):

# %%
t = Trainer(TrainConfig(model="tiny", max_steps=1, progress=False, out=str(work / "good")), groups=ONE())
store = t.save("good.ckpt")
first = {k: v for k, v in load_checkpoint(store).items() if k in ("config", "params", "adam", "scheduler", "step", "lrs", "history", "train")}
save_checkpoint(work / "good" / "first.ckpt", {**first, "format": "jigsaw_ref/1"})
good = (work / "good" / "first.ckpt").read_bytes()  # the first format: one file

def sealed(payload) -> bytes:
    "A file with a valid header and checksum around `payload` (torch.save'd, or raw bytes)."
    if not isinstance(payload, bytes): buf = io.BytesIO(); torch.save(payload, buf); payload = buf.getvalue()
    return MAGIC + hashlib.sha256(payload).hexdigest().encode() + payload

def flip(raw, i): raw = bytearray(raw); raw[i] ^= 0x40; return bytes(raw)

body = torch.load(io.BytesIO(good[72:]), weights_only=False)
for what, data, want in [
        ("one payload byte flipped", flip(good, len(good) // 2), "checksum mismatch"),
        ("one checksum byte flipped", flip(good, 20), "checksum mismatch"),
        ("one magic byte flipped", flip(good, 0), "bad header"),
        ("truncated to half", good[: len(good) // 2], "checksum mismatch"),
        ("truncated to 50 bytes", good[:50], "bad header"),
        ("empty file", b"", "bad header"),
        ("4 KiB of random bytes", np.random.default_rng(0).bytes(4096), "bad header"),
        ("a plain torch.save file", good[72:], "bad header"),
        ("written for the small preset", sealed({**body, "config": asdict(preset("small"))}), "written for another model"),
        ("written with --set hidden=16", sealed({**body, "config": asdict(preset("tiny", hidden=16))}), "'hidden': (16, 32)"),
        ("format version jigsaw_ref/0", sealed({**body, "format": "jigsaw_ref/0"}), "format 'jigsaw_ref/0'"),
        ("valid checksum, payload not a torch file", sealed(b"junk"), None),
        ("valid checksum, payload a list", sealed([1, 2]), None),
        ("valid checksum, payload lacks keys", sealed({"format": "jigsaw_ref/1"}), None)]:
    f = work / "bad.ckpt"; f.write_bytes(data)
    tried("checkpoint", what, lambda: t.load(f), want)
tried("checkpoint", "no such file", lambda: t.load(work / "nope.ckpt"), "no such checkpoint file")
tried("checkpoint", "a folder that is no checkpoint", lambda: t.load(work), "not a committed checkpoint")

def damaged(name, how):
    "A copy of the good store with one thing wrong."
    f = work / f"{name}.ckpt"; shutil.rmtree(f, ignore_errors=True); shutil.copytree(store, f)
    c = sorted(p for p in (f / "exp_avg/dec.w/i0j0/c").rglob("*") if p.is_file())[0]
    if how == "flip": r = bytearray(c.read_bytes()); r[len(r) // 3] ^= 0x40; c.write_bytes(r)
    if how == "truncate": c.write_bytes(c.read_bytes()[:-100])
    if how == "delete": c.unlink()
    if how == "manifest": (f / "manifest.json").write_text((f / "manifest.json").read_text().replace('"exact"', '"Exact"'))
    if how == "uncommitted": (f / "manifest.json").unlink()
    if how == "metadata": (f / "exp_avg/dec.w/i0j0/zarr.json").write_text("{")
    return f

for what, how, want in [("store: one chunk byte flipped", "flip", "exp_avg of 'dec.w', block i0j0, chunk (0, 0, 0): checksum mismatch"),
                        ("store: a chunk truncated", "truncate", "checksum mismatch"),
                        ("store: a chunk deleted", "delete", "chunk (0, 0, 0): missing"),
                        ("store: manifest edited", "manifest", "the manifest is corrupted"),
                        ("store: no manifest (a write interrupted)", "uncommitted", "not a committed checkpoint"),
                        ("store: an array's metadata broken", "metadata", "its array cannot be opened")]:
    f = damaged(how, how)
    tried("checkpoint", what, lambda: t.load(f), want)
def only_damaged():
    "A run folder whose one checkpoint is damaged, resumed with --resume auto."
    f = work / "one-damaged"; f.mkdir(exist_ok=True)
    shutil.rmtree(f / "step0000001.ckpt", ignore_errors=True); shutil.copytree(damaged("flip1", "flip"), f / "step0000001.ckpt")
    Trainer(TrainConfig(model="tiny", max_steps=1, progress=False, out=str(f), resume="auto"), groups=ONE())

tried("checkpoint", "--resume auto, the only checkpoint in --out damaged", only_damaged, "--resume auto: none of the 1 checkpoints")

# %% [markdown]
# Data: stores cut from the default `tiny` data (40 time steps) with one thing wrong each, read by
# `Era5Dataset` as each rank's trainer does, and one given to the trainer itself:

# %%
src = xr.open_zarr(default_dataset(grid=(16, 32), verbose=False), consolidated=False).isel(time=slice(0, 40)).load()
src.attrs = {}

def store(name, ds):
    "Write `ds` as a zarr store `name` in the work folder."
    ds = ds.copy()
    for v in ds.variables: ds[v].encoding = {}
    ds.to_zarr(work / name, mode="w", consolidated=False)
    return work / name

nan = src.copy(deep=True); nan["temperature"][3, 1, 2, 5] = np.nan
msl = src["mean_sea_level_pressure"].transpose("time", "longitude", "latitude")
(work / "notes.txt").write_text("not data")
cfg = preset("tiny")
for what, path, want in [
        ("a path that does not exist", work / "nope.zarr", "no such file or directory"),
        ("a text file", work / "notes.txt", "cannot be read as a zarr store or netCDF file"),
        ("no 'temperature' variable", store("no_t.zarr", src.drop_vars("temperature")), "needs variable 'temperature'"),
        ("no 250 hPa level", store("no_250.zarr", src.sel(level=[500, 850])), "has no level 250 hPa"),
        ("no land-sea mask", store("no_lsm.zarr", src.drop_vars("land_sea_mask")), "channel 'lsm' needs variable 'land_sea_mask'"),
        ("8 latitude rows", store("lat8.zarr", src.isel(latitude=slice(0, 8))), "8 latitude rows but cfg.n_lat=16"),
        ("16 longitudes", store("lon16.zarr", src.isel(longitude=slice(0, 16))), "16 longitudes but cfg.n_lon=32"),
        ("msl stored (time, lon, lat)", store("transposed.zarr", src.assign(mean_sea_level_pressure=msl)), "expected ('time', 'latitude', 'longitude')"),
        ("a NaN in temperature", store("nan.zarr", nan), "NaN or inf in 't500'"),
        ("one time step", store("one.zarr", src.isel(time=[0])), "only 1 time step(s)"),
        ("12-hourly steps, dt_hours=6", store("12h.zarr", src.isel(time=slice(0, 40, 2))), "does not divide cfg.dt_hours=6")]:
    tried("data", what, lambda: Era5Dataset(path, cfg), want)
tried("data", "trainer --data with no 'temperature'",
      lambda: Trainer(TrainConfig(model="tiny", progress=False, data=str(work / "no_t.zarr"), out=str(work / "o")), groups=ONE()),
      "needs variable 'temperature'")

# %% [markdown]
# All of them, with the exact message each produces (`$WORK` stands for this run's temporary folder):

# %%
table = pd.DataFrame(rows)
table["message"] = table.message.str.replace(str(work), "$WORK", regex=False)  # this run's temporary folder
gaps = table[table.error.str.startswith("gap") | (table.error == "accepted")]
print(f"{len(table)} bad inputs tried: {len(table) - len(gaps)} refused with a clear message, {len(gaps)} gaps")
with pd.option_context("display.max_colwidth", None, "display.max_rows", None):
    display(table.style.set_properties(**{"text-align": "left"}).hide(axis="index"))

# %% [markdown]
# Fourteen of these were gaps when this table was first made, each fixed since and kept here as a row: a
# `--way` that is not `N` or `PxQ` (`2x`, `2x0`, `2x2x2`, `-1`) used to reach `int()` or a modulo by zero;
# `--set f_s=abc` reached `float()`; `--set dt_hours=0` was accepted (a time stride of 0: the model would learn
# the identity); `--max-steps -1` trained nothing; `--clip -1` scaled the gradients by a negative factor
# (gradient ascent); a negative `--lr` was refused only later by `torch.optim.Adam`; `--ckpt-every -1`
# checkpointed every step; and a checksum-valid file whose payload is not a checkpoint gave a raw unpickling,
# attribute or key error. The count printed above says whether any gap is left.

# %% [markdown]
# ## Reliability table: the failures of a real cluster, each one run
#
# Everything above is about a job that *fails*. On a cluster a job is also stopped by its scheduler, stalls
# on a node, shares a folder with another job, is resumed with other settings, and reads data that has gone
# bad. Each row below is one such scenario, run as an operator would meet it: `jigsaw-train` launched as a
# process (under `mpiexec` for 2 ranks), the fault made by the environment (`JIGSAW_FAULT`, see
# `checkpoint.fault_point`: a signal or SIGSTOP that the rank sends itself in a chosen step, a pause, a full
# disk) or by damaging files, and every launch bounded in time. The columns:
#
# - **exit code**: the launch's exit status (75: stopped at a signal with a checkpoint, `--requeue-exit-code 75`;
#   124: the watchdog; see the exit-status table in `09_train`);
# - **time to exit (s)**: from the launch to the end of every process, start-up (about 3 s per Python on this
#   machine) included;
# - **hang**: whether the launch had to be killed at its time limit (150 s);
# - **checkpoints kept / lost**: the committed checkpoints in the run folder afterwards that load and verify,
#   and those that were committed before the scenario and are gone or damaged now (retention and `--overwrite`
#   deleting what they were asked to delete do not count as lost);
# - **message**: the first line the trainer printed about the scenario (its start-up banner left out);
# - **silent rc-0**: a misconfiguration or bad input that exited 0 (a scenario that must be refused), or a
#   scenario that must be reported (a fresh start, a time-limit stop, a skipped sample, `--reschedule`,
#   `--overwrite`) that exited 0 without a word;
# - **as expected**: the scenario's own checks (the exit status, the checkpoints, and where it says so the run
#   bit for bit equal to an uninterrupted one, the samples consumed, the learning rate).

# %%
ROOT_DIR = Path("..") if Path("../benchmarks").exists() else Path(".")  # the repository, from nbs/ or from its root
mpiexec = Path(sys.executable).with_name("mpiexec")
TINY = ["--model", "tiny", "--progress", "false", "--val-batches", "1", "--warmup-steps", "1"]
REQUEUE = 75  # what the batch script requeues on
R2 = [*TINY, "--way", "2", "--max-steps", "5", "--requeue-exit-code", str(REQUEUE)]  # a 2-way run of 5 steps
DIVERGE = ["--lr", "1e9", "--lr-encdec", "1e9", "--clip", "0", "--warmup-steps", "0"]  # non-finite from the 2nd step on

def job(n, args, fault=None, env=None, timeout=150, wait=True):
    "Launch `jigsaw-train ARGS` on `n` ranks (mpiexec for n > 1): exit status, output, seconds, hung (`wait=False`: the process)."
    cmd = ([str(mpiexec), "-n", str(n)] if n > 1 else []) + [sys.executable, "-m", "jigsaw_ref.cli", *map(str, args)]
    e = {k: v for k, v in os.environ.items() if k != "JIGSAW_FAULT"}
    e.update(MPIR_CVAR_ENABLE_HEAVY_YIELD="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    if fault: e["JIGSAW_FAULT"] = fault
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    if not wait: return p
    try: text, hung = p.communicate(timeout=timeout)[0], False
    except subprocess.TimeoutExpired: os.killpg(p.pid, signal.SIGKILL); text, hung = p.communicate()[0], True
    return dict(rc=p.returncode, text=text, wall=time.perf_counter() - t0, hung=hung)


# %% [markdown]
# What a row records, and the checks the scenarios share:

# %%
def good_ckpts(folder) -> set:
    "The checkpoints in `folder` that load and verify."
    ok = set()
    for p in sorted(Path(folder).glob("*.ckpt")) if folder and Path(folder).is_dir() else []:
        try: load_checkpoint(p); ok.add(p.name)
        except CheckpointError: pass
    return ok

def first_line(text: str, pick: str | None = None) -> str:
    "The first line matching `pick` (a regex), else the first `[jigsaw_ref rank R]` or `jigsaw-train:` line after the banner."
    lines = [l.strip() for l in text.splitlines()]
    hit = next((l for l in lines if re.search(pick, l)), "") if pick else next(
        (l for l in lines if l.startswith(("[jigsaw_ref rank", "jigsaw-train:")) and not re.match(r"jigsaw-train: \S+ world=", l)), "")
    return hit.replace(str(work), "$WORK")[:220]

def short(names) -> str:
    return ", ".join(n.removesuffix(".ckpt").replace("step000000", "step").replace("step00000", "step") for n in sorted(names)) or "none"

def same_run(a, b) -> bool:
    "Two checkpoints hold the same run: weights, both Adam moments and every step's loss, bit for bit."
    A, B = load_checkpoint(a), load_checkpoint(b)
    return (all(torch.equal(A["params"][n], B["params"][n]) for n in B["params"])
            and all(torch.equal(A["adam"][k][n], B["adam"][k][n]) for k in ("exp_avg", "exp_avg_sq") for n in B["params"])
            and [h["loss"] for h in A["history"]] == [h["loss"] for h in B["history"]])

def metrics_steps(out) -> list:
    f = Path(out) / "metrics.csv"
    return [int(l.split(",")[0]) for l in f.read_text().splitlines()[1:]] if f.exists() else []

table_rows = []

def record(scenario, r, out=None, before=(), removed=(), kind="ok", pick=None, check=True, note=""):
    "One row for launch `r` on run folder `out`; `kind`: 'refuse' (must exit non-zero), 'report' (must say so) or 'ok'."
    kept = good_ckpts(out)
    lost = sorted(set(before) - kept - set(removed))
    msg = first_line(r["text"], pick)
    silent = r["rc"] == 0 and (kind == "refuse" or (kind == "report" and not msg))
    table_rows.append({"scenario": scenario, "exit code": r["rc"], "time to exit (s)": round(r["wall"], 1),
                       "hang": "yes" if r["hung"] else "no", "checkpoints kept / lost": f"{short(kept)} / {len(lost)}" + (f" ({short(lost)})" if lost else ""),
                       "message (first line)": msg + note, "silent rc-0": "yes" if silent else "no",
                       "as expected": "yes" if check and not r["hung"] else "NO"})


# %% [markdown]
# ### Preemption and requeue
#
# A stop signal reaches rank 1 in the forward pass of step 3 (`term-forward@1:2`; steps count from 0 there):
# both ranks finish step 3, agree at its boundary, write `step0000003.ckpt` and the metrics, and exit 75. The
# requeue is the same command with `--resume auto`; it must end bit for bit where an uninterrupted run ends. A
# second signal, here while rank 1 writes the signal's checkpoint, aborts at once: the checkpoint is never
# committed and the earlier ones stay intact. `--resume auto` on an empty folder starts fresh and says so; with
# the newest checkpoints damaged it takes the newest one that verifies and names the ones it skipped; a
# `--max-minutes` stop leaves `final.ckpt` only, and the requeue continues from it.

# %%
def sc_signals(w):
    "SIGTERM, SIGINT, SIGUSR1 on one rank, each requeued; a second signal."
    r = job(2, [*R2, "--out", w / "whole"]); assert r["rc"] == 0, r["text"][-2000:]
    for sig in ("TERM", "INT", "USR1"):
        out = w / f"sig{sig}"
        r = job(2, [*R2, "--out", out], fault=f"{sig.lower()}-forward@1:2")
        ok = r["rc"] == REQUEUE and good_ckpts(out) == {"step0000003.ckpt"} and metrics_steps(out) == [1, 2, 3]
        record(f"SIG{sig} on rank 1 in step 3", r, out, kind="report", pick="stopped by", check=ok)
        before = good_ckpts(out)
        r = job(2, [*R2, "--out", out, "--resume", "auto"])
        same = r["rc"] == 0 and same_run(out / "final.ckpt", w / "whole" / "final.ckpt")
        record(f"... requeued: --resume auto", r, out, before, kind="report", pick="resumed from", check=same,
               note=" (= the uninterrupted run, bit for bit)" if same else " (NOT the uninterrupted run)")
    out = w / "twice"
    r = job(2, [*R2, "--ckpt-every", "1", "--out", out], fault="term-forward@1:2,term-checkpoint@1:3")
    two = {"step0000001.ckpt", "step0000002.ckpt"}
    record("SIGTERM again while step 3's checkpoint is written", r, out, two, kind="refuse", pick="again: aborting",
           check=r["rc"] not in (0, REQUEUE) and good_ckpts(out) == two)

def sc_resume_auto(w):
    "A fresh start, the fall-back past damaged checkpoints, and a time-limit stop's final.ckpt."
    base = w / "base"
    r = job(1, [*TINY, "--max-steps", "4", "--ckpt-every", "1", "--out", base, "--resume", "auto"])
    record("--resume auto on an empty --out", r, base, kind="report", pick="starting fresh", check=r["rc"] == 0)
    fb = w / "fallback"; shutil.copytree(base, fb)
    (fb / "final.ckpt" / "manifest.json").write_text((fb / "final.ckpt" / "manifest.json").read_text().replace('"exact"', '"Exact"'))
    c = sorted(p for p in (fb / "step0000004.ckpt" / "params/blocks.0.tok1.w/i0j0/c").rglob("*") if p.is_file())[0]
    raw = bytearray(c.read_bytes()); raw[9] ^= 0x40; c.write_bytes(bytes(raw))
    before = good_ckpts(fb)
    r = job(1, [*TINY, "--max-steps", "4", "--ckpt-every", "1", "--out", fb, "--resume", "auto"])
    ok = r["rc"] == 0 and "skipped" in first_line(r["text"], "resumed from") and same_run(fb / "final.ckpt", base / "final.ckpt")
    record("--resume auto, final.ckpt and step 4 damaged", r, fb, before, kind="report", pick="resumed from", check=ok)
    tl = w / "timelimit"
    r = job(1, [*TINY, "--max-steps", "4", "--max-minutes", "1e-5", "--out", tl])
    record("--max-minutes reached after step 1", r, tl, kind="report", pick="--max-minutes", check=r["rc"] == 0 and good_ckpts(tl) == {"final.ckpt"})
    before = good_ckpts(tl)
    r = job(1, [*TINY, "--max-steps", "4", "--out", tl, "--resume", "auto"])
    same = r["rc"] == 0 and same_run(tl / "final.ckpt", base / "final.ckpt")
    record("... requeued: --resume auto", r, tl, before, kind="report", pick="resumed from", check=same,
           note=" (= the uninterrupted run, bit for bit)" if same else "")
    kl = w / "keep"
    r = job(1, [*TINY, "--max-steps", "5", "--ckpt-every", "1", "--keep-last", "2", "--out", kl])
    record("--keep-last 2, a checkpoint every step", r, kl, pick="^checkpoint:",
           check=r["rc"] == 0 and good_ckpts(kl) == {"step0000004.ckpt", "step0000005.ckpt", "final.ckpt"})
    return base


# %% [markdown]
# ### A stalled rank
#
# SIGSTOP on rank 1 in step 3 (what a stalled node or file system looks like to its partners) with
# `--step-timeout 3`: rank 0's watchdog reports after 3 s without progress, naming the step and the rank it is
# waiting for, and ends the job; the launcher then ends the stopped rank. On both backends: mpi4py and
# `torch.distributed` (gloo), each launched by `mpiexec`.

# %%
def sc_stall(w):
    two = {"step0000001.ckpt", "step0000002.ckpt"}
    for backend, name in (("mpi", "MPI"), ("torch", "gloo")):
        out = w / f"stall-{backend}"
        r = job(2, [*R2, "--backend", backend, "--step-timeout", "3", "--ckpt-every", "1", "--out", out], fault="stop-forward@1:2", timeout=120)
        ok = r["rc"] == 124 and re.search(r"after step 3\b.*waiting for rank 1", r["text"]) is not None and good_ckpts(out) == two
        record(f"SIGSTOP on rank 1 in step 3, --step-timeout 3 ({name})", r, out, two, kind="refuse", pick="no progress for", check=ok)


# %% [markdown]
# ### One run per folder
#
# A second job started on the folder of a running one (held for a few seconds by a pause injected in its
# step 2) is refused, naming the job that holds it; the first finishes undisturbed. A new run into a folder that
# holds another run's checkpoints is refused, and with `--overwrite` replaces them. A launcher that MPI does not
# connect (`torchrun` without `--backend torch`: each process an MPI world of 1, all writing one `--out`) is
# refused; here one process with torchrun's variables stands for the four.

# %%
def sc_two_jobs(w):
    out = w / "shared"
    a = job(1, [*TINY, "--max-steps", "3", "--out", out], fault="sleep6-data@0:1", wait=False)
    t0 = time.monotonic()
    while not (read_lock(out)[0] or {}).get("run_id") and time.monotonic() - t0 < 60 and a.poll() is None: time.sleep(0.05)
    r = job(1, [*TINY, "--max-steps", "3", "--out", out])
    a.communicate(timeout=150)
    ok = r["rc"] == 1 and a.returncode == 0 and metrics_steps(out) == [1, 2, 3] and good_ckpts(out) == {"final.ckpt"}
    record("a second job on the --out of a running one", r, out, kind="refuse", pick="in use by", check=ok,
           note=f" (the first job: exit {a.returncode}, steps {metrics_steps(out)})")

def sc_foreign(w):
    out = w / "foreign"
    job(1, [*TINY, "--max-steps", "1", "--out", out])
    before = good_ckpts(out)
    r = job(1, [*TINY, "--max-steps", "1", "--out", out])
    record("a new run into a folder holding another run's checkpoints", r, out, before, kind="refuse",
           pick="holds what another run wrote", check=r["rc"] == 1)
    r = job(1, [*TINY, "--max-steps", "1", "--out", out, "--overwrite"])
    record("... with --overwrite", r, out, before, removed=before, kind="report", pick="--overwrite: deleted", check=r["rc"] == 0)

def sc_launcher(w):
    r = job(1, [*TINY, "--max-steps", "1", "--out", w / "torchrun"], env=dict(WORLD_SIZE="4", RANK="0", LOCAL_RANK="0"))
    record("torchrun's WORLD_SIZE=4 on an MPI world of 1 (no --backend torch)", r, w / "torchrun", kind="refuse",
           pick="ConfigError", check=r["rc"] == 1 and not (w / "torchrun").exists())


# %% [markdown]
# ### Resuming with other settings
#
# From the 1-way run's step-2 checkpoint (`base` above, 4 steps, warm-up 1): 2 data-parallel ranks (the global
# batch 1 -> 2), a longer bound, another learning rate are each refused as changes of the run; with `--reschedule`
# the run continues deliberately from the samples consumed, on a schedule re-derived at the checkpoint's step
# (the learning rate decays to 0 at the new bound and never climbs back). A faithful 2x1 checkpoint resumed in
# its layout continues bit for bit; resumed by an exact run it is refused.

# %%
def sc_resume_changes(w, base):
    ck = base / "step0000002.ckpt"
    r = job(2, [*TINY, "--way", "1", "--max-steps", "4", "--out", w / "dp2", "--resume", ck])
    record("dp 1 -> 2 on resume (global batch 1 -> 2)", r, None, kind="refuse", pick="ResumeError", check=r["rc"] != 0 and "'global_batch': (1, 2)" in r["text"])
    r = job(2, [*TINY, "--way", "1", "--max-steps", "4", "--out", w / "dp2", "--resume", ck, "--reschedule"])
    n = load_checkpoint(w / "dp2" / "final.ckpt")["data"]["samples"] if r["rc"] == 0 else None
    record("... with --reschedule", r, w / "dp2", kind="report", pick="--reschedule at", check=n == 2 + 2 * 2,
           note=f" (samples consumed: 2 at the checkpoint, {n} after 2 steps of 2)")
    r = job(1, [*TINY, "--max-steps", "8", "--out", w / "longer", "--resume", ck])
    record("--max-steps 4 -> 8 on resume", r, None, kind="refuse", pick="ResumeError", check=r["rc"] == 1)
    r = job(1, [*TINY, "--max-steps", "8", "--out", w / "longer", "--resume", ck, "--reschedule"])
    lrs = [h["lr"] for h in load_checkpoint(w / "longer" / "final.ckpt")["history"]] if r["rc"] == 0 else [1.0]
    down = all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] < 1e-12
    record("... with --reschedule", r, w / "longer", kind="report", pick="--reschedule at", check=down,
           note=" (lr from step 3 on: non-increasing, 0 at step 8)" if down else " (lr climbs)")
    r = job(1, [*TINY, "--max-steps", "4", "--lr", "3e-4", "--out", w / "lr", "--resume", ck])
    record("--lr 1e-4 -> 3e-4 on resume", r, None, kind="refuse", pick="ResumeError", check=r["rc"] == 1)
    FA = [*TINY, "--way", "2x1", "--mode", "faithful", "--max-steps", "4"]
    job(2, [*FA, "--ckpt-every", "2", "--out", w / "faithful"])
    r = job(2, [*FA, "--out", w / "faithful-resumed", "--resume", w / "faithful" / "step0000002.ckpt"])
    same = r["rc"] == 0 and same_run(w / "faithful-resumed" / "final.ckpt", w / "faithful" / "final.ckpt")
    record("faithful 2x1 checkpoint resumed on 2x1", r, w / "faithful-resumed", kind="report", pick="resumed from", check=same,
           note=" (= the uninterrupted run, bit for bit)" if same else " (NOT the uninterrupted run)")
    r = job(1, [*TINY, "--max-steps", "4", "--out", w / "exact", "--resume", w / "faithful" / "step0000002.ckpt"])
    record("faithful checkpoint resumed with --mode exact", r, None, kind="refuse", pick="ResumeError", check=r["rc"] == 1)


# %% [markdown]
# ### Data that lies
#
# Small stores cut from the default data (40 times; 31 training samples, validation from time 32) with one
# thing wrong each, and a copy of the generated default store in which one byte of a temperature chunk is
# flipped after its statistics were computed, keeping the file's size and modification time (bit rot): the
# statistics' fingerprint cannot see it, the chunk's CRC32C does, when a step reads that sample. With
# `--bad-samples skip` that step is skipped on every rank and counted (and stops past `--max-bad-samples`), so
# a requeued run does not die at the same sample again. The read-only folder is a read-only bind mount (root
# only; the row says so where it cannot be made).

# %%
def small(name, ds, enc=None, folder=None):
    "Write `ds` (no encodings) as the zarr store `name` in `folder` (default: the work folder)."
    ds, f = ds.copy(), Path(folder or work)
    for v in ds.variables: ds[v].encoding = {}
    f.mkdir(parents=True, exist_ok=True)
    ds.to_zarr(f / name, mode="w", consolidated=False, encoding=enc)
    return f / name

def poke(ds, var, idx, value):
    "A copy of `ds` with `ds[var][idx] = value`."
    ds = ds.copy(deep=True); ds[var][idx] = value
    return ds

def tiny_src():
    "The first 40 times of the default tiny data, loaded, without attributes."
    src = xr.open_zarr(default_dataset(grid=(16, 32), verbose=False), consolidated=False).isel(time=slice(0, 40)).load()
    src.attrs = {}
    return src

D = [*TINY, "--max-steps", "2"]

def sc_small_stores(w):
    "Stale statistics, bad values and bad time axes, each in a small store; a NaN in a validation sample, skipped."
    src = tiny_src()
    ok = small("fine.zarr", src)
    job(1, [*D, "--data", ok, "--out", w / "fine"])  # its statistics
    (src[["temperature"]] + 30.0).to_zarr(ok, mode="a", consolidated=False)  # new data under the same path
    r = job(1, [*D, "--data", ok, "--out", w / "stale"])
    loss = load_checkpoint(w / "stale" / "final.ckpt")["history"][0]["loss"] if r["rc"] == 0 else float("nan")
    record("stale statistics beside changed data", r, w / "stale", kind="report", pick="computed from other data",
           check=r["rc"] == 0 and loss < 100, note=f" (first loss {loss:.1f})")
    cases = [("a NaN in a training sample", small("nan.zarr", poke(src, "temperature", (3, 1, 2, 5), np.nan)), []),
             ("a value 3e38 (finite, absurd)", small("big.zarr", poke(src, "geopotential", (9, 1, 0, 0), 3e38)), []),
             ("a temperature of 400 K, --data-check range", small("hot.zarr", poke(src, "temperature", (6, 2, 3, 4), 400.0)), ["--data-check", "range"]),
             ("an integer time axis", small("int.zarr", src.assign_coords(time=np.arange(40)), {"time": {"dtype": "int64"}}), []),
             ("a descending time axis", small("desc.zarr", src.isel(time=slice(None, None, -1))), []),
             ("a duplicated time", small("dup.zarr", src.isel(time=[0, 1, 2, 2, *range(3, 39)])), []),
             ("two times swapped", small("swap.zarr", src.isel(time=[0, 1, 3, 2, *range(4, 40)])), [])]
    for what, path, extra in cases:
        r = job(1, [*D, *extra, "--data", path, "--out", w / path.stem])
        record(what, r, w / path.stem, kind="refuse", pick=r"\[jigsaw_ref rank 0\]", check=r["rc"] == 1)
    nv = small("nan_val.zarr", src.assign(temperature=src.temperature.where(src.time != src.time[32])))  # the first validation time
    for extra, kind, rc in ((["--bad-samples", "skip"], "report", 0), (["--bad-samples", "skip", "--max-bad-samples", "0"], "refuse", 1)):
        r = job(1, [*D, *extra, "--data", nv, "--out", w / f"nan_val{rc}"])
        record(f"a NaN in a validation sample, {' '.join(extra)}", r, w / f"nan_val{rc}", kind=kind,
               pick="skipped a bad sample" if rc == 0 else r"\[jigsaw_ref rank 0\]", check=r["rc"] == rc)


# %%
def sc_bitrot(w):
    "One byte flipped in a copy of the default store after its statistics: stop, skip, and skip past the bound (2-way)."
    from jigsaw_ref.data import stats_path
    from jigsaw_ref.train import epoch_order
    q, src = w / "rot.zarr", default_dataset(grid=(16, 32), verbose=False)
    shutil.copytree(src, q); shutil.copy2(stats_path(src), stats_path(q))
    order = epoch_order(len(Era5Dataset(q, cfg, "train", stats=False)), 0, 0)
    s = next(s for s, i in enumerate(order) if i % 4 == 0)  # the first step whose sample is the first time of a shard file
    f = q / "temperature" / "c" / str(int(order[s]) // 4) / "0" / "0" / "0"
    st, raw = f.stat(), bytearray(f.read_bytes()); raw[40] ^= 0x10
    f.write_bytes(bytes(raw)); os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same time: the fingerprint matches
    R = [*TINY, "--way", "2", "--max-steps", str(s + 2), "--ckpt-every", "1", "--data", q]
    for extra, kind, rc in (([], "refuse", 1), (["--bad-samples", "skip"], "report", 0), (["--bad-samples", "skip", "--max-bad-samples", "0"], "refuse", 1)):
        out = w / f"rot{len(extra)}"
        r = job(2, [*R, *extra, "--out", out])
        record(f"one flipped byte in a zarr chunk (bit rot){', ' + ' '.join(extra) if extra else ''}", r, out, kind=kind,
               pick="skipped a bad sample" if rc == 0 else r"\[jigsaw_ref rank \d\]", check=r["rc"] == rc)


# %%
def sc_readonly(w):
    "A store without statistics in a read-only bind mount: they go to the cache folder, with a note."
    ro, data = w / "ro", small("ro.zarr", tiny_src(), folder=w / "ro_src")
    ro.mkdir()
    try:
        for cmd in (["mount", "--bind", str(data.parent), str(ro)], ["mount", "-o", "remount,bind,ro", str(ro)]):
            subprocess.run(cmd, check=True, capture_output=True)
    except (subprocess.CalledProcessError, FileNotFoundError):
        table_rows.append({"scenario": "a read-only data folder (statistics)", "message (first line)": "not run: a read-only bind mount needs root"})
        return
    try:
        r = job(1, [*D, "--data", ro / data.name, "--out", w / "ro_run"], env={"JIGSAW_DATA": str(w / "cache")})
        record("a read-only data folder (statistics)", r, w / "ro_run", kind="report", pick="not writable", check=r["rc"] == 0)
    finally: subprocess.run(["umount", str(ro)], capture_output=True)


# %% [markdown]
# ### Steps that cannot count, and a full disk

# %%
def sc_steps(w):
    out = w / "nonfinite"
    r = job(1, [*TINY, "--max-steps", "10", "--ckpt-every", "1", "--out", out, "--nonfinite", "skip", *DIVERGE])
    record("--nonfinite skip, most steps non-finite", r, out, {"step0000001.ckpt"}, kind="refuse", pick="NonFiniteError", check=r["rc"] == 1)
    out = w / "full"
    r = job(1, [*TINY, "--max-steps", "3", "--ckpt-every", "1", "--out", out], fault="enospc-metrics@0:2")
    record("disk full at the metrics write of step 2", r, out, {"step0000001.ckpt"}, kind="refuse", pick="RunFolderError",
           check=r["rc"] == 1 and metrics_steps(out) == [1])
    out = w / "polled"
    p = job(1, [*TINY, "--max-steps", "40", "--out", out, "--metrics-every", "0"], wait=False)  # rewritten every step
    t0, reads, bad = time.perf_counter(), 0, 0
    while p.poll() is None:
        try: text = (out / "metrics.csv").read_text()
        except FileNotFoundError: continue
        reads += 1; bad += not text.endswith("\n") or text.count("\n") < 2
    text = p.communicate()[0]
    record("metrics.csv read in a loop while a run rewrites it", dict(rc=p.returncode, text=text, wall=time.perf_counter() - t0, hung=False),
           out, pick="^checkpoint:", check=p.returncode == 0 and bad == 0 and reads > 100, note=f" ({reads} reads, {bad} empty or partial)")


# %% [markdown]
# The table as a markdown file, and its summary:

# %%
COLUMNS = ["scenario", "exit code", "time to exit (s)", "hang", "checkpoints kept / lost", "message (first line)", "silent rc-0", "as expected"]

def markdown(rows) -> str:
    "The rows as a markdown table."
    cell = lambda v: str("" if v is None or (isinstance(v, float) and np.isnan(v)) else v).replace("|", "\\|")
    return "\n".join(["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
                     + ["| " + " | ".join(cell(r.get(c)) for c in COLUMNS) + " |" for r in rows]) + "\n"

def summary(rows) -> dict:
    "Counts of what must be zero."
    return dict(rows=len(rows), hangs=sum(r.get("hang") == "yes" for r in rows),
                lost=sum(int(str(r.get("checkpoints kept / lost", "/ 0")).split("/ ")[-1].split()[0]) for r in rows if "checkpoints kept / lost" in r),
                silent=sum(r.get("silent rc-0") == "yes" for r in rows), unexpected=sum(r.get("as expected") == "NO" for r in rows),
                not_run=sum("exit code" not in r for r in rows))


# %% [markdown]
# The cheap part runs every time this notebook runs (seven one-process launches, about half a minute): a
# launcher that MPI does not connect, a run into another run's folder (refused, then `--overwrite`),
# `--nonfinite skip` past its bound, a full disk at a metrics write, and the metrics polled while a run
# rewrites them.

# %%
table_rows.clear()
cheap = work / "cheap"; cheap.mkdir()
sc_launcher(cheap); sc_foreign(cheap); sc_steps(cheap)
with pd.option_context("display.max_colwidth", None):
    display(pd.DataFrame(table_rows, columns=COLUMNS).style.hide(axis="index"))
test_eq({k: v for k, v in summary(table_rows).items() if k != "rows"}, dict(hangs=0, lost=0, silent=0, unexpected=0, not_run=0))

# %% [markdown]
# The whole sweep takes about five minutes on this 2-core machine (some 50 launches), so it does not run with
# the notebook's tests: `JIGSAW_RELIABILITY_SWEEP=1 python nbs/11_reliability.py` runs it and writes
# `benchmarks/results/reliability_table.md`, shown below as last written.

# %%
#| eval: false
if os.environ.get("JIGSAW_RELIABILITY_SWEEP") == "1":
    table_rows.clear()
    sweep = work / "sweep"; sweep.mkdir()
    t_sweep = time.perf_counter()
    sc_signals(sweep); sc_stall(sweep); sc_two_jobs(sweep); sc_foreign(sweep); sc_launcher(sweep)
    base = sc_resume_auto(sweep); sc_resume_changes(sweep, base)
    sc_small_stores(sweep); sc_bitrot(sweep); sc_readonly(sweep); sc_steps(sweep)
    s = summary(table_rows)
    head = (f"# Reliability table (nbs/11_reliability), {time.strftime('%Y-%m-%d %H:%M %Z')}, {os.uname().nodename} "
            f"({os.cpu_count()} CPUs), {time.perf_counter() - t_sweep:.0f} s\n\n"
            f"{s['rows']} scenarios: {s['hangs']} hangs, {s['lost']} checkpoints lost, {s['silent']} silent rc-0, "
            f"{s['unexpected']} not as expected, {s['not_run']} not run\n\n")
    (ROOT_DIR / "benchmarks/results/reliability_table.md").write_text(head + markdown(table_rows))

# %%
saved = (ROOT_DIR / "benchmarks/results/reliability_table.md").read_text()
print(saved)
counts = saved.splitlines()[2]
assert " 0 hangs, 0 checkpoints lost, 0 silent rc-0, 0 not as expected" in counts, counts

# %%
#| hide
import shutil; shutil.rmtree(work, ignore_errors=True)
