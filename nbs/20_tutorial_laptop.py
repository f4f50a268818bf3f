# %% [markdown]
# # Training 4-way on a laptop
#
# > From a fresh checkout to a 4-way Jigsaw model trained on four CPU ranks and scored against persistence: the default data, the one-line demo, the `jigsaw-train` flags that matter, and how to read what a run leaves behind.

# %% [markdown]
# Everything here runs on CPU cores with the MPI that comes with the virtual environment (the MPICH wheel
# behind `mpi4py`); no GPU and no system MPI are needed. Commands that start several MPI ranks are shown as
# shell lines; the cells of this page run in one process, on the `tiny` preset: once the default store exists,
# about 25 s of CPU time (80 s wall, measured on a 2-core AMD EPYC shared with other jobs at load average 8).

# %%
import json, tempfile
from pathlib import Path
import numpy as np
import pandas as pd
import xarray as xr
import matplotlib.pyplot as plt
import jigsaw_ref.comm
from jigsaw_ref.config import preset
from jigsaw_ref.generator import default_dataset
from jigsaw_ref.grid import Grid, group_table
from jigsaw_ref.train import Trainer, TrainConfig

# %% [markdown]
# ## The default data
#
# Multi-year ERA5 does not fit on a laptop, so `--data default` (the default) is a store that `jigsaw_ref`
# writes itself on first use: a forced two-layer quasi-geostrophic atmosphere on the sphere (see `generator`),
# with travelling mid-latitude eddies, a seasonal and a diurnal cycle, orography and a moisture tracer. It is
# written in the WeatherBench2 layout, so the reader that reads it is the one that reads real ERA5 (see the
# ERA5 tutorial):
#
# - the 19 channels of the CPU presets: `msl`, `u10`, `v10`, `t2m` and `z`, `q`, `t`, `u`, `v` on 850, 500
#   and 250 hPa, plus the statics `lsm`, `slt`, `orography`;
# - 6-hourly, 240 days of training, 30 of validation, 30 of test (after 90 days of spin-up), on the preset's
#   grid (16x32 for `tiny`, 32x64 for `demo` and `small`);
# - generated once, atomically, into `~/.cache/jigsaw_ref` (or `$JIGSAW_DATA`; the cell below prints the path),
#   with its normalisation statistics beside it, every chunk checksummed. Later calls find the store.
#
# **How long the first call takes.** A progress bar counts the simulated days (390: spin-up and the three
# periods). Measured while writing this page on an AMD EPYC with 2 cores shared with other jobs (load average
# 8 to 9): 7 to 7.5 minutes for either grid (0.9 s per simulated day), about 2 minutes of it CPU time; the
# statistics then take another 1 to 2 minutes under the same load. `python -c "from jigsaw_ref.generator import
# default_dataset; default_dataset(grid='tiny')"` makes the `tiny` store ahead of time.

# %%
path = default_dataset(grid="tiny", verbose=False)
ds = xr.open_zarr(path, consolidated=False)
print(path)
print({v: ds[v].dims for v in list(ds.data_vars)[:4]}, "...")
print("levels", ds.level.values.tolist(), "| times", ds.sizes["time"],
      "| splits", {s: ds.attrs[f"split_{s}"][0][:10] for s in ("train", "val", "test")})

# %%
assert set(ds.level.values.tolist()) == {250, 500, 850} and ds.sizes["latitude"] == 16 and ds.sizes["longitude"] == 32

# %% [markdown]
# ## The one-line demo
#
# ```sh
# jigsaw-demo
# ```
#
# runs `mpiexec -n 4 python -m jigsaw_ref.cli --model demo --way 4 --epochs 50 --max-steps 950 --seed 0
# --lr 1e-3 --lr-encdec 1e-3 --warmup-steps 50 --batch 1 --out runs/demo` (4-way Jigsaw on 4 ranks, a fixed
# number of steps from a fixed seed, so the same scorecard on any machine) and then scores `runs/demo/final.ckpt`
# with `jigsaw-eval` into `runs/demo/eval/` (both folders relative to where you run it). `--steps`, `--seed`,
# `--ranks`, `--way`, `--model` and `--out` change those settings (`jigsaw-demo --help`). On first use it makes
# the 32x64 default store first (see above).

# %% [markdown]
# ## Step by step
#
# A run like it, spelled out with the flags that matter:
#
# ```sh
# export MPIR_CVAR_ENABLE_HEAVY_YIELD=1   # ranks yield instead of spinning when they share cores
# mpiexec -n 4 jigsaw-train --way 4 --model demo --mode exact --batch 1 \
#     --epochs 2 --lr 1e-3 --lr-encdec 1e-3 --warmup-steps -1 --rollout random --set rollout=[1,2] \
#     --ckpt-every 200 --out runs/w4
# ```
#
# `demo` is the preset sized for this (32x64 grid, H = 256, a few hundredths of a second per step); `small`
# (H = 1024, about 1 s per step on one core) and `medium` are the larger CPU presets.
#
# **Layout.** `--way` takes `1`, `2`, `4` or `PxQ` (`P` longitude bands times `Q` channel blocks; `4` is
# `2x2`). The model group has `P*Q` consecutive ranks and data parallelism fills the rest of the world:
# `mpiexec -n 8 ... --way 4` is two 4-way replicas, each taking `--batch` samples per step, so the global
# batch is `batch * dp`. Every rank can print its groups:

# %%
print(group_table(Grid.named(4, world=8)))

# %% [markdown]
# **Exact or faithful.** `--mode exact` (the default) computes the one-process model on any layout: LayerNorm
# statistics over all channels, biases shared by the partners that share an output block, and gradient
# clipping by the global norm. `--mode faithful` reproduces the released code instead: LayerNorm over the
# local channel half only, per-rank bias copies added where the released code adds them, per-rank clipping, and
# the released 4-way script's averaging of the LayerNorm gradients. A faithful 4-way model is therefore a slightly
# different function from the 1-way model; its checkpoint keeps every per-rank copy, so it resumes exactly in its
# own layout, but evaluating or resuming it in another layout changes the function (a note says so).
#
# **Rollout.** `--set rollout=[1,3]` lets training run the processor $k \in \{1,2,3\}$ times before one decode;
# `--rollout random` draws $k$ per step (the same draw on every rank, a function of the seed and the step),
# `--rollout cyclic` cycles 1, 2, 3, 1, ... The target is then $6k$ hours ahead.
#
# **Learning rates.** Adam with two groups: the processor (`--lr`, the released recipe's 1e-4) and the
# encoder, decoder and residual (`--lr-encdec`, 2e-5); weight decay `--weight-decay`, linear warm-up for
# `--warmup-steps` (`-1`: one epoch) then cosine decay to zero at the last step, clipping at `--clip`. The
# demo and the runs on this site use 1e-3 for both on the CPU presets.
#
# **How long.** `--epochs`, or `--max-steps`, or `--max-minutes` (whichever comes first; the schedule is laid
# out for `--epochs`/`--max-steps`, so a run stopped by the clock ends before its learning rate reaches zero).
#
# **Checkpoints.** `--ckpt-every N` writes `out/step000000N.ckpt` every N steps and the run always ends with
# `out/final.ckpt`. A checkpoint is a sharded store (`checkpoint`: a zarr folder with one array per tensor block and
# a checksum on every chunk, committed atomically): each rank writes only its own blocks of the weights and both
# Adam moments, whatever the layout, and a reader of any layout reads only the slices it needs. `--resume auto`
# continues from the newest checkpoint in `--out`; `--resume PATH` from a given one; `jigsaw-ckpt info PATH`
# describes one, `jigsaw-ckpt convert OLD NEW` converts the older single-file format.
#
# **Resuming in another layout.** Because the store is layout-independent, any layout can resume it: the
# weights and Adam moments are read for the new layout (exact mode), the position in the data is kept as samples
# consumed, and the dropout and rollout draws are functions of the seed and the step. Keep the model (`--model`,
# `--set`). Weights, Adam moments and the schedule carry over exactly (the tests check that a 4-way run resumed
# 2-way or 1-way follows the uninterrupted losses to 1e-10 in float64), so a 4-way run on 4 ranks can go on as a
# 2-way run on 2 ranks or a 1-way run on one, computing the same function up to float rounding:
#
# ```sh
# mpiexec -n 2 jigsaw-train --way 2 --model demo --epochs 2 --lr 1e-3 --lr-encdec 1e-3 \
#     --set rollout=[1,2] --resume runs/w4/step0000200.ckpt --out runs/w4
# ```
#
# (Tried while writing this page, with `--max-steps 8 --ckpt-every 4` added: the 2-way run resumed from the 4-way
# run's step-4 checkpoint ended step 8 with the same loss, 4.58636, and the same validation RMSE to 8 digits.)
#
# Settings can also live in a file: `jigsaw-train --config run.toml` with any of the flags as keys
# (`way = "4"`, `lr = 1e-3`, ...); flags given on the command line win.

# %% [markdown]
# ## A run you can watch: one process, `tiny`
#
# `Trainer` is what each rank of `jigsaw-train` runs. Given groups of one rank it trains the 1-way model in
# this process, which is the function every exact layout computes. Sixty steps of the `tiny` preset on its
# default data (the store above):

# %%
ONE = {k: jigsaw_ref.comm.Group() for k in ("world", "model", "tensor", "domain", "dp")}
out = Path(tempfile.mkdtemp()) / "tiny"
tc = TrainConfig(model="tiny", max_steps=60, lr=1e-3, lr_encdec=1e-3, warmup_steps=10, val_batches=4,
                 ckpt_every=30, out=str(out), progress=False)
trainer = Trainer(tc, groups=ONE)
hist = trainer.fit()
print(f"run folder {out}: {trainer.total_steps} steps of {trainer.steps_per_epoch} per epoch; files:",
      sorted(p.name for p in out.iterdir()))

# %% [markdown]
# ## Reading `metrics.csv` and `summary.json`
#
# Rank 0 rewrites both after every step. `metrics.csv` has a row per optimizer step: `step`, the rollout `k`,
# the training `loss` (latitude- and variable-weighted MSE of the normalised fields, averaged over the global
# batch), `grad_norm` (before clipping), `skipped` (1 if a non-finite step was skipped with `--nonfinite
# skip`), `epoch`, `lr` (processor group), `step_time` (s), `samples_per_s`, `gflops`; the rows that end an
# epoch or the run also carry `val_loss` and `rmse_<channel>` for every variable, the latitude-weighted RMSE at
# 6 h on the validation split in physical units (m^2/s^2 for `z`, K for `t`, Pa for `msl`, ...).

# %%
m = pd.read_csv(out / "metrics.csv")
print(m[["step", "k", "loss", "grad_norm", "lr", "step_time"]].iloc[[0, 9, 29, 59]].to_string(index=False))

# %%
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(m.step, m.loss, lw=1, label="training loss")
ax.plot(m.step, m.loss.rolling(10, min_periods=1).mean(), lw=2, label="10-step mean")
ax.set_xlabel("optimizer step"); ax.set_ylabel("weighted MSE (normalised)"); ax.set_yscale("log"); ax.legend()
plt.show()

# %%
assert m.loss.iloc[-10:].mean() < m.loss.iloc[:10].mean()  # it learns

# %% [markdown]
# `summary.json` is the run at a glance: the layout, the last step's record and the last validation.

# %%
s = json.loads((out / "summary.json").read_text())
print(s["steps"], s["layout"], s["mode"])
print({k: round(v, 3) for k, v in s["last_validation"].items() if k in ("val_loss", "rmse_z500", "rmse_t850", "rmse_t2m")})

# %% [markdown]
# ## Scoring a checkpoint: `jigsaw-eval`
#
# ```sh
# jigsaw-eval runs/w4/final.ckpt --leads 20 --out runs/w4/eval
# ```
#
# loads the full model from any checkpoint into one process, rolls it forward autoregressively from initial
# times of the test split and writes WeatherBench2 scores (area-weighted RMSE, ACC, bias) of the model,
# persistence and climatology per variable and lead (`scores.csv`, `scores.json`, a `scorecard.txt` and
# plots). The same function, called here on the 60-step model for four leads (24 h):

# %%
from jigsaw_ref.evaluate import main as jigsaw_eval
rc = jigsaw_eval([str(out / "final.ckpt"), "--out", str(out / "eval"), "--leads", "4", "--samples", "4"])
assert rc == 0 and (out / "eval" / "scores.json").exists()

# %% [markdown]
# The scorecard prints the model's RMSE before persistence's at 6, 12, 24, 48, 72 and 120 h (the leads that
# the forecast reached; `--scorecard-leads` chooses others), marks with `*` the cells where the model beats
# persistence and with `+` those where it beats climatology, and counts both in its last line. Sixty steps of a 65-thousand-parameter model do not beat persistence at 6 h. Longer runs do better: in the
# *Large batches* page, two epochs of the same preset on 4 ranks beat persistence for msl and t2m (not yet for
# z500 or t850), and the smaller the global batch the lower the error.
