# %% [markdown]
# # Bringing your own WeatherBench2 ERA5 zarr
#
# > What the reader expects of an ERA5 store, how to choose variables and levels (any variable of the store), computing the normalisation statistics once with `jigsaw-stats`, which block of each sample every rank reads, what the errors look like, and the launch lines of the paper's configurations, worked on a small real ERA5 sample.

# %% [markdown]
# The paper trains on ERA5 at 0.25 degrees as WeatherBench2 (WB2) lays it out. A full store is several
# terabytes; this page works the same steps on the real ERA5 sample shipped with the tests
# (`tests/data/era5-levels-members-2.nc`: geopotential and temperature at 850 and 500 hPa, 4 analysis times
# 12 h apart, two ensemble members, on a 3 degree 61 x 120 grid; see `tests/data/README.md`). Every call below
# is the one you make on the full store; only the sizes change.

# %%
import json, shutil
from pathlib import Path
import numpy as np
import torch
import xarray as xr
import jigsaw_ref.comm
from jigsaw_ref.config import MixerConfig, channel_names, preset, wb2_name, ERA5_CHANNELS, STATICS
from jigsaw_ref.data import (DataError, Era5Dataset, cache_dir, compute_stats, counting_store, load_stats, open_store,
                             shard_block, stats_main, stats_path)
from jigsaw_ref.evaluate import main as jigsaw_eval
from jigsaw_ref.loss import variable_weights
from jigsaw_ref.mixer import param_count
from jigsaw_ref.train import Trainer, TrainConfig

SAMPLE = Path("../tests/data/era5-levels-members-2.nc")
if not SAMPLE.exists(): SAMPLE = Path("tests/data/era5-levels-members-2.nc")  # run from the repository root

# %% [markdown]
# ## The layout the reader expects
#
# One zarr store (or netCDF file) with
#
# - **dynamic variables** with dims `(time, level, latitude, longitude)` (atmospheric) or
#   `(time, latitude, longitude)` (surface), named as WB2 names them (`geopotential`, `temperature`,
#   `specific_humidity`, `u_component_of_wind`, `v_component_of_wind`, `mean_sea_level_pressure`,
#   `10m_u_component_of_wind`, `10m_v_component_of_wind`, `2m_temperature`) or by their ERA5 short names
#   (`z`, `t`, `q`, `u`, `v`, `msl`, `u10`/`10u`, ...);
# - **statics** with dims `(latitude, longitude)` (a leading time axis of length one is dropped):
#   `land_sea_mask`, `soil_type`, `geopotential_at_surface` (our `lsm`, `slt`, `orography`);
# - `level` in hPa (`isobaricInhPa`, `pressure_level` or `plev` are renamed; levels in Pa are divided by 100),
#   an optional ensemble `member`/`number` dimension (one member is selected, `member=0` by default);
# - a regular time axis of datetimes whose step divides `dt_hours` (6 h for the paper; the sample's is 12 h).
#
# A channel is a short name: the variable prefix, then the level for atmospheric ones (`z500`, `t850`); any
# other variable of the store is a channel by its own name (`surface_pressure`) or with a level
# (`vertical_velocity@500`), see *Any variable is a channel* below.

# %%
print({c: wb2_name(c) for c in ("z500", "t850", "msl", "orography")})
ds = open_store(SAMPLE)  # renames isobaricInhPa -> level, selects member 0
print(dict(ds.sizes), "| variables", list(ds.data_vars), "| levels", ds.level.values.tolist())
print("latitude", ds.latitude.values[:2], "...", ds.latitude.values[-2:])

# %% [markdown]
# **721 to 720 rows.** ERA5 at 0.25 degrees has 721 latitudes, both poles included. The released code drops the
# last row so every split of the grid is even, and so does the reader: given `n_lat = 720` and a file with 721
# rows it reads rows `0 .. 719` in the file's order. The sample's 61 rows become 60 the same way.
#
# **Latitude order.** Files come north-to-south (this sample: 90 .. -90) or south-to-north; the reader keeps
# the file's order, so the dropped row is the last one in that order (here the south pole). Latitude weights of
# the loss and the metrics are computed from the latitudes actually read, so the order changes neither.

# %% [markdown]
# ## A store in the WB2 layout
#
# We write the sample as a small WB2-style zarr store: WB2 variable and dimension names, float32, one member,
# the named splits as store attributes, and chunks of one time, one level and a quarter of the longitudes. It goes
# to a fixed place, `era5_sample.zarr` in the data cache (`~/.cache/jigsaw_ref`, or `$JIGSAW_DATA`), so the shell
# commands further down find it as `$STORE`:
#
# **Splits.** `'train'`, `'val'`, `'test'` come from the attributes `split_train` etc. (`[start, stop)` dates);
# a store without them is cut 80/10/10 in time. For the paper (training 1980-2016, validation 2018) add
# `split_train = ["1980-01-01", "2017-01-01"]` and `split_val = ["2018-01-01", "2019-01-01"]` to your copy's
# attributes (`zarr.open_group(path, mode="r+").attrs.update(...)`).
#
# **Chunks.** A rank reads whole chunks, so a chunk should not span more than one rank's block: one time step,
# and no more than a quarter of the longitudes (one level per chunk also lets a 2-way rank skip the levels of
# its partner).

# %%
store = cache_dir() / "era5_sample.zarr"
shutil.rmtree(store, ignore_errors=True)  # a fresh copy each time this page runs
for f in (stats_path(store), Path(f"{store}.clim.npz")): f.unlink(missing_ok=True)
wb2 = (ds.drop_vars([v for v in ("valid_time", "step", "number") if v in ds.coords])
         .rename({"z": "geopotential", "t": "temperature"}).astype("float32"))
t = [str(x)[:19] for x in wb2.time.values]
wb2.attrs = {"split_train": [t[0], t[2]], "split_val": [t[2], "2017-01-03T00:00:00"]}
enc = {v: {"chunks": (1, 1, 61, 30)} for v in wb2.data_vars}
wb2.to_zarr(store, mode="w", zarr_format=3, consolidated=False, encoding=enc)
print(f"export STORE={store}")
print(xr.open_zarr(store, consolidated=False))

# %% [markdown]
# ## Choosing variables and levels
#
# The channels a model predicts are `MixerConfig.variables` and its static inputs `MixerConfig.statics`; the
# presets of the paper (`c1_1way`, `c3`, ...) use the 69 channels of SPEC section 1 and the three statics:

# %%
c3 = preset("c3")
print(len(c3.variables), c3.variables[:6], "...", c3.variables[-2:], "| statics", c3.statics, "| C_in", c3.n_in)

# %% [markdown]
# A preset with your own channels is one `replace` (or `--set variables=... --set statics=...` on the command
# line). `channel_names` builds the list from surface fields, atmospheric fields and levels; the parameter count
# follows (only the encoder, decoder and residual depend on the channels):

# %%
mine = preset("c1_1way", variables=channel_names(surface=("msl", "t2m"), levels=(850, 500, 250)), statics=("lsm", "orography"))
print(mine.n_vars, "variables +", len(mine.statics), "statics;",
      f"{param_count(mine):,} parameters vs {param_count(preset('c1_1way')):,} for the 69 + 3 channels")

# %% [markdown]
# For the sample: the four channels it has, no statics, 60 x 120 (the south pole row dropped), patches of 6
# longitudes (20 per row), 12-hourly steps.

# %%
cfg = MixerConfig(n_lat=60, n_lon=120, variables=("z500", "z850", "t500", "t850"), statics=(), patch=6,
                  hidden=32, f_s=0.25, f_c=1.0, blocks=2, dropout=0.0, dt_hours=12)
print(f"tokens {cfg.tokens}, parameters {param_count(cfg):,}")

# %% [markdown]
# ## Any variable is a channel
#
# The channels are not limited to the 69 of the paper. Any variable of the store with the WB2 dims is a channel
# under its own name, a level of a pressure-level variable as `NAME@LEVEL` (or `NAME` followed by the level when
# that is unambiguous). Here we add a derived single-level field to the store, the 500-850 hPa thickness, and
# use it beside two known channels:

# %%
thick = (wb2.geopotential.sel(level=500) - wb2.geopotential.sel(level=850)).reset_coords(drop=True)
xr.Dataset({"thickness_500_850": thick}, attrs=wb2.attrs).to_zarr(store, mode="a", consolidated=False,  # attrs: keep the splits
                                                 encoding={"thickness_500_850": {"chunks": (1, 61, 30)}})
mine = MixerConfig(n_lat=60, n_lon=120, variables=("z500", "t850", "thickness_500_850"), statics=(), patch=6, hidden=8,
                   dt_hours=12, dropout=0.0)
x, _ = Era5Dataset(store, mine, split="train", stats=False).get(0, 1)
print("thickness range (m^2/s^2):", float(x[2].min()), float(x[2].max()))
assert 3e4 < float(x[2].mean()) < 5e4

# %% [markdown]
# **Loss weights.** A channel outside the released recipe gets the default weight `loss.DEFAULT_WEIGHT` = 1.0;
# `loss_weights` sets any channel's weight (`--set loss_weights=thickness_500_850=2.5` on the command line):

# %%
print(variable_weights(mine).tolist(), variable_weights(mine.replace(loss_weights={"thickness_500_850": 2.5})).tolist())

# %% [markdown]
# **Missing channels** are reported all at once, with the setting that removes them and what the store has:

# %%
try: Era5Dataset(store, mine.replace(variables=("z500", "q850", "surface_pressure"), statics=("lsm",)), stats=False)
except DataError as e: print(str(e).replace(str(store), "$STORE"))

# %% [markdown]
# **Latitude weights on other grids.** The loss and the scores weight rows by cell area. On an equally spaced grid
# that is WeatherBench2's formula; on a Gaussian grid (rows at Gauss-Legendre latitudes, as spectral models write
# them) the reader uses the exact quadrature weights; a store that carries its own weights (a 1-D variable `gw`,
# `latitude_weights`, `gaussian_weights` or `area_weights` over latitude) or CF cell bounds (`lat_bnds`) has
# those used instead. `Era5Dataset.area_weights` holds what was chosen.

# %% [markdown]
# ## Normalisation statistics, once
#
# Every channel is z-scored with a global mean and standard deviation over the training split (the land-sea
# mask stays in [0, 1]). The statistics live in `<store>.stats.json` beside the store (or under
# `$JIGSAW_DATA/stats/` when the data folder is read-only), each entry with a fingerprint of the data it came
# from (shapes, times, file sizes and modification times): data that changed are noticed and their statistics
# recomputed. Compute them **once, in one process, before launching** a parallel job: a reader that finds none
# computes them itself, and a thousand ranks each streaming 37 years of ERA5 is not what you want.
#
# ```sh
# jigsaw-stats $STORE                                   # every channel the store has
# jigsaw-stats $STORE --channels z500,z850,t500,t850 --statics ''   # or just these
# ```
#
# streams the training split once, with a progress bar (`compute_stats` is the same in Python). Here it is,
# called in this process:

# %%
assert stats_main([str(store)]) == 0
stats = load_stats(store)
print(stats_path(store).name, {c: tuple(round(v, 1) for v in ms) for c, ms in stats.items()})
assert 5.0e4 < stats["z500"][0] < 5.8e4 and 230 < stats["t850"][0] < 290

# %% [markdown]
# ## What each rank reads
#
# A rank of a $P \times Q$ layout (`--way 1` is 1x1, `2` is 1x2, `4` is 2x2) reads longitude band
# $i$ of $P$ (in whole patches) and channel block $j$ of $Q$ of every sample, and nothing else. For the paper's
# 69 + 3 channels the 2-way split lands where the released code puts it: rank 0 gets the surface fields, Z, Q and
# T from 1000 to 500 hPa (36 channels), rank 1 the rest of T, U, V and the statics (36):

# %%
for j in range(2):
    b = shard_block(c3, ch_parts=2, ch_index=j)
    print(f"2-way rank {j}: {len(b['inp'])} inputs {b['inp'][:2]} .. {b['inp'][-2:]}, longitudes {b['lon']}")
for r in range(4):
    b = shard_block(c3, lon_parts=2, lon_index=r // 2, ch_parts=2, ch_index=r % 2)
    print(f"4-way rank {r}: longitude pixels {b['lon']} ({b['lon'][0] / 4:.0f}-{b['lon'][1] / 4:.0f} E), "
          f"inputs {b['inp'][0]} .. {b['inp'][-1]}")

# %% [markdown]
# Per sample that is the input block plus the target block, in float32:

# %%
def mb_per_rank(c, P, Q):
    b = shard_block(c, lon_parts=P, lon_index=0, ch_parts=Q, ch_index=0)
    return (len(b["inp"]) + len(b["out"])) * c.n_lat * (b["lon"][1] - b["lon"][0]) * 4 / 1e6
for P, Q in ((1, 1), (1, 2), (2, 2)):
    print(f"{P * Q}-way: {mb_per_rank(c3, P, Q):6.1f} MB per sample per rank")

# %% [markdown]
# On the sample store the blocks can be read and counted: `counting_store` wraps the store and counts the
# bytes that pass through, and the four 4-way blocks stitch back into the 1-way sample exactly.

# %%
full = Era5Dataset(store, cfg, split="train")
x1, y1 = full.get(0, 1)
cs = counting_store(store)
blocks, nbytes = {}, {}
for r in range(4):
    d = Era5Dataset(store, cfg, split="train", lon_parts=2, lon_index=r // 2, ch_parts=2, ch_index=r % 2, stats=stats, store=cs)
    cs.reset(); blocks[r] = d.get(0, 1); nbytes[r] = cs.nbytes
d1 = Era5Dataset(store, cfg, split="train", stats=stats, store=cs)
cs.reset(); d1.get(0, 1); n1 = cs.nbytes
stitch = lambda k: torch.cat([torch.cat([blocks[0][k], blocks[1][k]]), torch.cat([blocks[2][k], blocks[3][k]])], -1)
assert torch.equal(stitch(0), x1) and torch.equal(stitch(1), y1)
print("x", tuple(x1.shape), "| bytes read for one sample: 1-way", n1, "| 4-way per rank", list(nbytes.values()))
assert max(nbytes.values()) < 0.3 * n1  # a quarter, up to compression

# %% [markdown]
# ## Training on it
#
# `jigsaw-train --data PATH` reads any such store; `--set` overrides the preset's fields, including the channel
# lists (`--set statics=[]` for none). Two steps in one process on the sample, to see it run end to end (the
# real ERA5 fields, normalised with the statistics above):

# %%
over = ("n_lat=60", "n_lon=120", "patch=6", "hidden=32", "f_s=0.25", "blocks=2", "dt_hours=12",
        "variables=z500,z850,t500,t850", "statics=[]")
run = cache_dir() / "era5_sample_run"
shutil.rmtree(run, ignore_errors=True)
tc = TrainConfig(model="tiny", model_overrides=over, data=str(store), epochs=2, lr=1e-3, val_batches=0,
                 out=str(run), progress=False)
ONE = {k: jigsaw_ref.comm.Group() for k in ("world", "model", "tensor", "domain", "dp")}
tr = Trainer(tc, groups=ONE)
hist = tr.fit()
assert tr.cfg == cfg and len(hist) == 2
print(f"run folder {run}:", [round(h["loss"], 3) for h in hist], {k: round(v, 1) for k, v in hist[-1].items() if k.startswith("rmse")})

# %% [markdown]
# The same under MPI, 4-way on 4 ranks, from a shell (`STORE` as printed above; its statistics are already
# beside it):
#
# ```sh
# export STORE=~/.cache/jigsaw_ref/era5_sample.zarr      # the path printed when the store was written
# mpiexec -n 4 jigsaw-train --way 4 --model tiny --data $STORE --set n_lat=60 --set n_lon=120 \
#     --set patch=6 --set dt_hours=12 --set variables=z500,z850,t500,t850 --set statics=[] --epochs 2 --out runs/era5
# jigsaw-eval runs/era5/final.ckpt --split val --leads 1
# ```
#
# (Run as written while making this page, on a 2-core AMD EPYC shared with other jobs: 44 s for the training
# line, most of it starting 4 ranks, and 23 s for the evaluation.)
#
# **Evaluating on a short store.** The sample has 4 times and no `split_test` attribute, so `jigsaw-eval`'s
# default test split (the last 10% of the times) is empty; that, and a lead longer than a split holds, is one
# line and exit status 2, naming the split and the fix. `--split val --leads 1` is what this store allows (the
# validation split's two times, 12 h apart):

# %%
ck = run / "final.ckpt"
assert jigsaw_eval([str(ck), "--out", str(run / "eval")]) == 2  # the message went to stderr: the test split is empty
assert jigsaw_eval([str(ck), "--out", str(run / "eval"), "--split", "val", "--leads", "3"]) == 2  # room for 1 lead only
assert jigsaw_eval([str(ck), "--out", str(run / "eval"), "--split", "val", "--leads", "1"]) == 0

# %% [markdown]
# ## The paper's configurations
#
# With a WB2 0.25 degree store prepared as above (`split_*` attributes, statistics computed), the paper's runs
# are these launch lines (Slurm, one rank per GPU, nodes of 4 GPUs; see *Running on a GPU cluster* for the
# launchers and NCCL). `--mode exact` is the default; add `--mode faithful` to reproduce the released code's
# local LayerNorm, per-rank biases and per-rank clipping, and `--set out_pad=3 --set res_inputs=all --set
# dec_bias=pixel` for its 2-/4-way architecture (the `c4_*` presets already have these).
#
# ```sh
# DATA=/data/era5_wb2_0.25deg.zarr
# COMMON="--data $DATA --backend torch --device cuda --precision tf32 --batch 1 --lr 1e-4 --lr-encdec 2e-5"
# # C1 (large batch): the 1.06 B model on 8 GPUs, global batch 8 / 4 / 2
# srun -N 2 --ntasks-per-node 4 --gpus-per-task 1 jigsaw-train --model c1_1way --way 1 $COMMON
# srun -N 2 --ntasks-per-node 4 --gpus-per-task 1 jigsaw-train --model c1_1way --way 2 $COMMON
# srun -N 2 --ntasks-per-node 4 --gpus-per-task 1 jigsaw-train --model c1_1way --way 4 $COMMON
# # C3 (strong scaling of the 1.10 B model): 1, 2 and 4 GPUs of one node
# srun -n 1 --gpus-per-task 1 jigsaw-train --model c3 --way 1 $COMMON
# srun -n 4 --gpus-per-task 1 jigsaw-train --model c3 --way 4 $COMMON
# # C4 (weak scaling): 2-way 1.40 B and 4-way 2.57 B models, e.g. on 64 nodes
# srun -N 64 --ntasks-per-node 4 --gpus-per-task 1 jigsaw-train --model c4_2way --way 2 $COMMON
# srun -N 64 --ntasks-per-node 4 --gpus-per-task 1 jigsaw-train --model c4_4way --way 4 $COMMON
# ```
#
# A preset's grid is 720 x 1440 with `patch=60`; the store's 721 rows are cut to 720 as above.
# `--set rollout=[1,3]` adds the paper's randomized latent rollout (every shipped config used k = 1).
