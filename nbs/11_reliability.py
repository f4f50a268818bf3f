# %% [markdown]
# # Reliability
#
# > What happens when something goes wrong: a failure on one rank ends the whole job, checkpoints are atomic and checksummed, a non-finite loss stops (or skips) cleanly, and every bad input we tried is refused with a message that names the fix.

# %%
#| hide
import contextlib, hashlib, io, os, shutil, subprocess, sys, tempfile, time
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
from jigsaw_ref.train import NonFiniteError, Trainer, TrainConfig, check_settings, install_abort_hook, parse_args

torch.set_num_threads(1)
ONE = lambda: {k: Group() for k in ("world", "model", "tensor", "domain", "dp")}  # the groups of a one-rank job
work = Path(tempfile.mkdtemp(prefix="jigsaw-reliability-"))

# %% [markdown]
# This notebook exports nothing: it documents, and checks, the failure behaviour that `train` and `checkpoint`
# build in. The multi-rank evidence (every fault point on 2 and 4 ranks, `kill -9` of a writer in the middle of a
# checkpoint, a full disk, the time from a fault to the end of the job) is in `tests/test_reliability.py`, which
# launches `jigsaw-train` under `mpiexec` with faults injected; the cheap checks run here, in one process or on
# in-process thread ranks.

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
    p = subprocess.Popen([str(mpiexec), "-n", str(n), sys.executable, "-m", "jigsaw_ref.train", *map(str, args)],
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
# `skipped` column of `metrics.csv` records it:

# %%
t = Trainer(TrainConfig(**diverge, nonfinite="skip", out=str(work / "skip")), groups=ONE())
t.fit()
print((work / "skip" / "metrics.csv").read_text().split()[0])
test_eq([h["skipped"] for h in t.history], [0, 1, 1])

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
                ("hidden=0", "hidden=0"), ("hidden=abc", "hidden='abc'"), ("widht=3", "no field 'widht'"),
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
tried("checkpoint", "--resume auto, no checkpoint in --out",
      lambda: Trainer(TrainConfig(model="tiny", progress=False, out=str(work / "empty"), resume="auto"), groups=ONE()),
      "--resume auto: no step*.ckpt")

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

# %%
#| hide
import shutil; shutil.rmtree(work, ignore_errors=True)
