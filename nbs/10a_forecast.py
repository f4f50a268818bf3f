# %%
#| default_exp forecast

# %%
#| export
from __future__ import annotations
import argparse, sys, time, types
from pathlib import Path
import numpy as np
import torch
import xarray as xr
import zarr
from tqdm.auto import tqdm
from jigsaw_ref.config import MixerConfig
from jigsaw_ref.comm import Group
from jigsaw_ref.data import DataError, Era5Dataset, denormalize, normalize, open_store, resolve_channels, time_step_hours, split_indices
from jigsaw_ref.checkpoint import CheckpointError
from jigsaw_ref.evaluate import (EvalError, channel_attrs, data_path, default_group, known_attrs, load_model, on_rank0_first,
                                 read_fields, rollout)

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail
import tempfile
import jigsaw_ref, jigsaw_ref.forecast
from dataclasses import asdict
from jigsaw_ref.config import preset
from jigsaw_ref.generator import default_dataset
from jigsaw_ref.checkpoint import save_checkpoint
from jigsaw_ref.mixer import WeatherMixer
from jigsaw_ref.ranks import run_ranks


# %% [markdown]
# # Forecasts
#
# > `jigsaw_ref.forecast` and `jigsaw-forecast`: a checkpoint's forecasts from chosen initial times as an `xarray.Dataset` in the WeatherBench2 layout, in physical units, in memory or written to zarr by several ranks.

# %% [markdown]
# `evaluate` scores forecasts it never keeps. This notebook gives them out, laid out as WeatherBench2 stores
# forecasts, so any verification code (WB2's own, `scores`, `xskillscore`) can read them:
#
# - dimensions `time` (the initial time), `prediction_timedelta` (the lead), `level` (hPa), `latitude`, `longitude`;
# - one variable per variable of the data store, **named as the store names it** (`geopotential`,
#   `temperature`, `2m_temperature`, ... for WB2 stores; `z`, `t` for a store with ERA5 short names), pressure-level
#   variables with the `level` dimension;
# - physical units (the model's z-scores denormalised with the store's statistics), with CF attributes `units`
#   and `long_name` (the store variable's own, else ERA5's as WB2 writes them, `evaluate.CF_ATTRS`).
#
# A checkpoint holds the full one-process model whatever layout trained it (`checkpoint.load_full`), so the
# forecasts come from `evaluate.load_model`, and from the same batched `evaluate.rollout` that scores them.

# %% [markdown]
# ## Initial times and leads
#
# Initial times are named by a split (`'test'`, `'val'`, `'train'`, or a `slice(start, stop)` of dates, stop
# excluded), or listed (dates, each a time of the store). Leads are a number of model steps $N$ (leads $1..N$ of
# `dt_hours`), or a list of lead times in hours, each a multiple of `dt_hours`.

# %%
#| export
def init_indices(src, init_times, path="") -> np.ndarray:
    "Store time indices of `init_times`: a split name or `slice(start, stop)` (every time in it), or a list of times of the store."
    t = src.time.values
    if init_times is None: init_times = "test"
    if isinstance(init_times, slice): init_times = (init_times.start, init_times.stop)
    if isinstance(init_times, str) and init_times in ("train", "val", "test") or isinstance(init_times, tuple):
        i0, i1 = split_indices(src, init_times, str(path))
        return np.arange(i0, i1)
    want = np.array([np.datetime64(str(x), "ns") for x in ([init_times] if isinstance(init_times, str) else init_times)])
    if len(want) == 0: raise EvalError(f"{path}: no initial times given")
    i = np.clip(np.searchsorted(t, want), 0, len(t) - 1)
    bad = [str(x) for x, j in zip(want, i) if t[j] != x]
    if bad:
        raise EvalError(f"{path}: initial time(s) {bad[:3]} are not times of the store ({t[0]} .. {t[-1]}, every "
                        f"{time_step_hours(src, str(path)):g} h); give times on its axis, or a split ('test')")
    return np.unique(i)


# %%
#| export
def lead_steps(leads, dt_hours: int) -> list[int]:
    "Model steps of `leads`: an int N (steps 1..N) or a list of lead times in hours (or timedeltas), each a multiple of `dt_hours`."
    if isinstance(leads, (int, np.integer)):
        if leads < 1: raise EvalError(f"leads={leads}: need at least one step")
        return list(range(1, int(leads) + 1))
    hours = [float(np.timedelta64(h, "ns") / np.timedelta64(1, "h")) if isinstance(h, np.timedelta64) else
             (h.total_seconds() / 3600 if hasattr(h, "total_seconds") else float(h)) for h in leads]
    bad = [h for h in hours if h <= 0 or h % dt_hours]
    if bad or not hours:
        raise EvalError(f"lead times {bad or hours} h: each must be a positive multiple of the model's step dt_hours={dt_hours} h")
    return sorted({int(h // dt_hours) for h in hours})


# %% [markdown]
# ## The layout of a forecast
#
# `data.resolve_channels` says where each channel of the model lives in the store: the store variable and its level
# index. Grouping the channels by variable gives the forecast's variables; the levels are those any channel uses
# (ascending, as WB2 stores them). A pressure-level variable with fewer channels than levels is NaN on the others.

# %%
#| export
def forecast_layout(src, cfg: MixerConfig, path="") -> tuple[dict, list[int]]:
    "`{store variable: [(channel index, level position or None), ...]}` of `cfg.variables`, and the levels (hPa, ascending)."
    chans = resolve_channels(src, cfg.variables, (), str(path))
    lev = lambda v, li: int(round(float(src[v].level.values[li])))
    levels = sorted({lev(v, li) for v, li, _ in chans.values() if li is not None})
    out = {}
    for c, ch in enumerate(cfg.variables):
        v, li, _ = chans[ch]
        out.setdefault(v, []).append((c, None if li is None else levels.index(lev(v, li))))
    return out, levels


# %% [markdown]
# On a small generated store with the `tiny` preset's 19 channels (4 surface ones, 5 variables on 3 levels):

# %%
_tmp = tempfile.TemporaryDirectory(); _d = Path(_tmp.name)
_path = default_dataset(_d / "t.zarr", grid="tiny", days=(4, 1, 2), spinup=20, verbose=False)
_src, _cfg = open_store(_path), preset("tiny")
_lay, _levels = forecast_layout(_src, _cfg)
test_eq(_levels, [250, 500, 850]); test_eq(len(_lay), 9)
test_eq(sorted(_lay["geopotential"], key=lambda x: x[1]), [(_cfg.variables.index(f"z{l}"), i) for i, l in enumerate(_levels)])
test_eq(_lay["2m_temperature"], [(_cfg.variables.index("t2m"), None)])
test_eq(init_indices(_src, "test").tolist(), list(range(20, 28)))  # the store starts 2000-01-01T00, every 6 h
test_eq(init_indices(_src, ["2000-01-07T06", "2000-01-06T00"]).tolist(), [20, 25])
test_fail(lambda: init_indices(_src, ["2000-01-07T05"]), contains="initial time(s) ['2000-01-07T05:00:00.000000000'] are not times")
test_eq(lead_steps(3, 6), [1, 2, 3]); test_eq(lead_steps([18, 6], 6), [1, 3]); test_eq(lead_steps([np.timedelta64(12, "h")], 6), [2])
test_fail(lambda: lead_steps([9], 6), contains="multiple of the model's step dt_hours=6 h")


# %% [markdown]
# ## Forecasting a batch
#
# The initial states of a batch are read in runs of consecutive times (one read each, `evaluate.read_fields`),
# z-scored, joined to the statics and rolled out to the longest lead in one batched forward pass per lead; the
# leads asked for are kept and denormalised. `forecast_batches` yields them batch by batch, so nothing holds more
# than one batch: `(B, leads, V, lat, lon)` in float64.

# %%
#| export
def read_times(src, cfg: MixerConfig, times, path="") -> torch.Tensor:
    "Physical fields at the increasing store time indices `times`: (len(times), V, lat, lon), one read per run of consecutive times."
    times = np.asarray(times); cut = np.flatnonzero(np.diff(times) != 1) + 1
    return torch.cat([read_fields(src, cfg, int(r[0]), int(r[-1]) + 1, path) for r in np.split(times, cut)])


# %%
#| export
@torch.no_grad()
def forecast_batches(model, ds: Era5Dataset, src, times, ksteps, batch: int = 16, device="cpu"):
    "Yield `(positions, fields)`: for each batch of the store time indices `times`, the forecasts (B, len(ksteps), V, lat, lon) in physical units, float64."
    cfg = model.cfg; V, names = cfg.n_vars, list(cfg.variables)
    dt = next(iter(model.state().values())).dtype
    statics = ds.get(0, 1)[0][V:].to(device, dt)
    keep = {k: j for j, k in enumerate(ksteps)}
    for b in range(0, len(times), batch):
        tt = times[b: b + batch]
        x0 = read_times(src, cfg, tt, ds.src)
        x = torch.cat([normalize(x0.to(dt), names, ds.stats).to(device), statics.expand(len(tt), -1, -1, -1)], 1)
        out = torch.empty(len(tt), len(ksteps), V, *x.shape[2:], dtype=torch.float64)
        for k, y in enumerate(rollout(model, x, max(ksteps)), 1):
            if k in keep: out[:, keep[k]] = denormalize(y.double().cpu(), names, ds.stats)
        yield np.arange(b, b + len(tt)), out


# %% [markdown]
# ## The dataset
#
# `to_dataset` puts a block of forecasts into the WB2 layout; its coordinates carry CF attributes too (the
# initial time is CF's `forecast_reference_time`, the lead its `forecast_period`).

# %%
#| export
DIMS = ("time", "prediction_timedelta", "level", "latitude", "longitude")
COORD_ATTRS = {"time": dict(standard_name="forecast_reference_time", long_name="initial time"),
               "prediction_timedelta": dict(standard_name="forecast_period", long_name="lead time"),
               "level": dict(units="hPa", long_name="pressure level"),
               "latitude": dict(units="degrees_north", long_name="latitude"),
               "longitude": dict(units="degrees_east", long_name="longitude")}


def variable_attrs(src, cfg: MixerConfig, layout: dict, path="") -> dict:
    "`{store variable: {'units', 'long_name'}}`: the store variable's own attributes, else those of its channels' WB2 variable."
    ca = channel_attrs(src, cfg.variables, path)
    return {v: ca[cfg.variables[cl[0][0]]] for v, cl in layout.items()}


def to_dataset(f, init, leads_h, layout: dict, levels, lat, lon, attrs: dict, dtype=np.float32) -> xr.Dataset:
    "Forecasts `f` (B, L, V, lat, lon) from initial times `init` (B,) at leads `leads_h` (hours, L) as a WB2-layout dataset."
    f = np.asarray(f, dtype); data = {}
    for v, cl in layout.items():
        if cl[0][1] is None: data[v] = (DIMS[:2] + DIMS[3:], f[:, :, cl[0][0]], attrs.get(v, {}))
        else:
            a = np.full(f.shape[:2] + (len(levels),) + f.shape[3:], np.nan, dtype)
            for c, li in cl: a[:, :, li] = f[:, :, c]
            data[v] = (DIMS, a, attrs.get(v, {}))
    coords = dict(time=np.asarray(init, "datetime64[ns]"),
                  prediction_timedelta=(np.asarray(leads_h, np.int64) * np.timedelta64(1, "h")).astype("timedelta64[ns]"),
                  level=np.asarray(levels, np.int64), latitude=np.asarray(lat, np.float64), longitude=np.asarray(lon, np.float64))
    return xr.Dataset(data, coords={k: (k, v, COORD_ATTRS[k]) for k, v in coords.items()})


# %% [markdown]
# ## `forecast`
#
# In memory, in one process: open everything, then fill the dataset batch by batch.

# %%
#| export
def _setup(checkpoint, data, init_times, leads, device, dtype):
    "Model, its metadata, the data path, opened store, dataset (statistics, statics), initial time indices, model steps."
    model, ck = load_model(checkpoint, device, dtype)
    cfg = model.cfg
    path = data_path(ck, data)
    if str(path).startswith("synthetic:"):
        raise EvalError(f"{path}: a synthetic source has no stored initial states; forecast from a zarr store or netCDF file")
    src = open_store(path)
    try: ds = Era5Dataset(path, cfg, (0, src.sizes["time"]), max_lead=1)
    except DataError as e:
        raise EvalError(f"data {path} do not fit the model of checkpoint {checkpoint} ({cfg.n_lat}x{cfg.n_lon} grid, "
                        f"variables {list(cfg.variables)[:4]}...): {e}") from e
    return model, ck, path, src, ds, init_indices(src, init_times, path), lead_steps(leads, cfg.dt_hours)


def _attrs(ck, checkpoint, path, cfg) -> dict:
    "Global attributes of a forecast dataset."
    a = dict(source="jigsaw_ref WeatherMixer forecast", checkpoint=str(checkpoint), step=ck.get("step"), data=str(path),
             dt_hours=cfg.dt_hours)
    return {k: v for k, v in a.items() if v is not None}


# %%
#| export
def forecast(checkpoint,  # a checkpoint of any layout (sharded store folder or single file)
             data=None,  # data store with the initial states (default: the checkpoint's training data)
             init_times="test",  # a split name or slice(start, stop) (every time in it), or a list of times of the store
             leads=20,  # model steps N (leads 1..N of dt_hours), or a list of lead times in hours
             batch: int = 16,  # initial times per forward pass
             device="cpu",
             dtype=torch.float32,  # precision of the model, and of the returned fields
             progress: bool = False) -> xr.Dataset:
    "Forecasts of checkpoint `checkpoint` from `init_times` at `leads`: an `xarray.Dataset` in the WeatherBench2 layout, physical units."
    model, ck, path, src, ds, times, ks = _setup(checkpoint, data, init_times, leads, device, dtype)
    cfg = model.cfg
    layout, levels = forecast_layout(src, cfg, path)
    np_dt = np.float64 if dtype == torch.float64 else np.float32
    f = np.empty((len(times), len(ks), cfg.n_vars, cfg.n_lat, len(ds.lon)), np_dt)
    for pos, fb in tqdm(forecast_batches(model, ds, src, times, ks, batch, device), total=-(-len(times) // batch),
                        desc="forecast batches", disable=not progress): f[pos] = fb.numpy()
    out = to_dataset(f, src.time.values[times], [k * cfg.dt_hours for k in ks], layout, levels, ds.lat, ds.lon,
                     variable_attrs(src, cfg, layout, path), np_dt)
    return out.assign_attrs(_attrs(ck, checkpoint, path, cfg))


# %% [markdown]
# `jigsaw_ref.forecast` is also the name of this module, which Python binds on the package as soon as the module is
# imported (by `jigsaw-forecast`, say); so the module itself is callable as `forecast`, and
# `jigsaw_ref.forecast(checkpoint, ...)` works whichever of the two the name holds.

# %%
#| export
class _CallableModule(types.ModuleType):
    "This module, callable as `forecast`."
    def __call__(self, *args, **kw): return forecast(*args, **kw)


if __name__ != "__main__": sys.modules[__name__].__class__ = _CallableModule  # (not in the notebook's kernel)

# %% [markdown]
# Checked against the plainest rollout, in float64: the model applied to a sample of `data.Era5Dataset` (z-scored
# input and statics), fed back, denormalised with the dataset's statistics, placed by hand.

# %%
_m = WeatherMixer(_cfg, seed=1)
save_checkpoint(_d / "m.ckpt", {"format": "jigsaw_ref/1", "config": asdict(_cfg), "step": 3,
                                "params": {n: t.detach().clone() for n, t in _m.state().items()},
                                "train": {"model": "tiny", "data": str(_path)}})
_fc = forecast(_d / "m.ckpt", init_times=["2000-01-06T00", "2000-01-06T06", "2000-01-07T00"], leads=[6, 18], batch=2,
               dtype=torch.float64)
test_eq(dict(_fc.sizes), dict(time=3, prediction_timedelta=2, level=3, latitude=16, longitude=32))
test_eq(sorted(_fc.data_vars), sorted(["geopotential", "specific_humidity", "temperature", "u_component_of_wind",
                                       "v_component_of_wind", "mean_sea_level_pressure", "10m_u_component_of_wind",
                                       "10m_v_component_of_wind", "2m_temperature"]))
test_eq(_fc.geopotential.dims, DIMS); test_eq(_fc["2m_temperature"].dims, ("time", "prediction_timedelta", "latitude", "longitude"))
test_eq(_fc.geopotential.attrs, {"units": "m**2 s**-2", "long_name": "Geopotential"})
test_eq(_fc.prediction_timedelta.values.astype("timedelta64[h]").astype(int).tolist(), [6, 18])

_ds = Era5Dataset(_path, _cfg, (0, _src.sizes["time"]), max_lead=1)
_m64 = WeatherMixer(_cfg, torch.float64).eval()
with torch.no_grad():  # the checkpoint's (float32) parameters in float64; 2000-01-07T00 is time index 24; its fields in float64, the statics of the dataset's sample
    for _n, _t in _m64.state().items(): _t.copy_(_m.state()[_n])
    _x = torch.cat([normalize(read_fields(_src, _cfg, 24, 25), _cfg.variables, _ds.stats), _ds.get(24, 1)[0][None, 19:].double()], 1)
    for _k in range(3): _y = _m64(_x)[:, :19]; _x = torch.cat([_y, _x[:, 19:]], 1)
_z = denormalize(_y[0], _cfg.variables, _ds.stats)
_c = _cfg.variables.index("z500")
test_close(_fc.geopotential.sel(time="2000-01-07T00", level=500).isel(prediction_timedelta=1).values, _z[_c].numpy(), eps=1e-6)
test_close(_fc["2m_temperature"].isel(time=2, prediction_timedelta=1).values, _z[_cfg.variables.index("t2m")].numpy(), eps=1e-9)


# %% [markdown]
# ## Writing to zarr, rank by rank
#
# `forecast_to_zarr` writes the same dataset to a zarr store chunked by initial time (`chunk` initial times per
# chunk, every lead, level and grid point in it). Rank 0 creates the store: the coordinates through xarray (which
# encodes the times CF's way) and each variable as an empty zarr array of the whole shape, NaN where nothing is
# written yet. Then each rank forecasts its share of the chunks (contiguous runs of them) and writes each chunk
# as an xarray region write. Regions are whole chunks, so no two ranks ever write the same file.

# %%
#| export
def create_store(out, block: xr.Dataset, init, chunk: int):
    "An empty zarr store at `out` shaped like `block` (a forecast from one initial time) for initial times `init`, chunked by `chunk` of them."
    coords = {k: c for k, c in block.coords.items() if k != "time"} | {"time": ("time", np.asarray(init, "datetime64[ns]"),
                                                                               COORD_ATTRS["time"])}
    xr.Dataset(coords=coords, attrs=block.attrs).to_zarr(out, mode="w", zarr_format=3, consolidated=False)
    g = zarr.open_group(str(out), mode="r+")
    for v, a in block.data_vars.items():  # empty arrays (no chunk written): NaN until a rank writes its region
        g.create_array(v, shape=(len(init),) + a.shape[1:], chunks=(chunk,) + a.shape[1:], dtype=a.dtype, fill_value=np.nan,
                       dimension_names=a.dims, attributes=dict(a.attrs))


# %%
#| export
def forecast_to_zarr(checkpoint, out,  # the zarr store to write (replaced if it exists)
                     data=None, init_times="test", leads=20,
                     chunk: int = 1,  # initial times per zarr chunk (and per region write)
                     batch: int = 16,  # initial times per forward pass (rounded to whole chunks)
                     device="cpu", dtype=torch.float32,
                     group: Group | None = None,  # ranks sharing the chunks (default: the MPI world under mpiexec)
                     progress: bool = False) -> Path:
    "Write `forecast(...)` to the zarr store `out`, chunked by initial time; under several ranks each writes the chunks it computed."
    g = group or default_group()
    model, ck, path, src, ds, times, ks = _setup(checkpoint, data, init_times, leads, device, dtype)
    cfg = model.cfg
    layout, levels = forecast_layout(src, cfg, path)
    np_dt = np.float64 if dtype == torch.float64 else np.float32
    leads_h, attrs = [k * cfg.dt_hours for k in ks], variable_attrs(src, cfg, layout, path)
    block = lambda f, pos: to_dataset(f, src.time.values[times[pos]], leads_h, layout, levels, ds.lat, ds.lon, attrs, np_dt)

    one = block(np.zeros((1, len(ks), cfg.n_vars, cfg.n_lat, len(ds.lon))), [0]).assign_attrs(_attrs(ck, checkpoint, path, cfg))
    on_rank0_first(g, lambda: create_store(out, one, src.time.values[times], chunk) if g.rank == 0 else None)
    chunks = np.array_split(np.arange(-(-len(times) // chunk)), g.size)[g.rank]
    mine = np.concatenate([np.arange(c * chunk, min((c + 1) * chunk, len(times))) for c in chunks]) if len(chunks) else np.zeros(0, int)
    per = max(1, batch // chunk) * chunk
    for pos, fb in tqdm(forecast_batches(model, ds, src, times[mine], ks, per, device), total=-(-len(mine) // per),
                        desc="forecast batches", disable=not (progress and g.rank == 0)):
        at = mine[pos]
        for c0 in range(0, len(at), chunk):  # one region write per chunk of initial times
            p = at[c0: c0 + chunk]
            blk = block(fb[c0: c0 + chunk].numpy(), p)
            blk.drop_vars(list(blk.coords)).to_zarr(out, region={"time": slice(int(p[0]), int(p[-1]) + 1)}, zarr_format=3,
                                                   consolidated=False)
    g.barrier()
    return Path(out)


# %% [markdown]
# Written with chunks of 2 initial times by one process, and with chunks of 3 by two thread ranks (3 chunks: 2 for
# rank 0, 1 for rank 1, the last one short), the store reads back as the forecast in memory:

# %%
_ref = forecast(_d / "m.ckpt", init_times="test", leads=3, dtype=torch.float64)
forecast_to_zarr(_d / "m.ckpt", _d / "f1.zarr", init_times="test", leads=3, chunk=2, batch=3, dtype=torch.float64)
_f1 = xr.open_zarr(_d / "f1.zarr", consolidated=False).load()
xr.testing.assert_allclose(_f1, _ref, rtol=1e-12)
test_eq(_f1.geopotential.encoding["chunks"], (2, 3, 3, 16, 32)); test_eq(_f1.attrs["step"], 3)
test_eq(_f1.temperature.attrs["units"], "K")
run_ranks(2, lambda comm: forecast_to_zarr(_d / "m.ckpt", _d / "f2.zarr", init_times="test", leads=3, chunk=3,
                                           dtype=torch.float64, group=Group(comm)))
xr.testing.assert_allclose(xr.open_zarr(_d / "f2.zarr", consolidated=False).load(), _ref, rtol=1e-12)


# %% [markdown]
# ## The command line
#
# `jigsaw-forecast CHECKPOINT --init test --leads 20 --out forecast.zarr` (under `mpiexec -n R` the ranks share
# the initial times). `--init` takes a split name, a comma-separated list of times, or `START..STOP` (every store
# time from START to STOP, both included); `--leads` a number of steps or a comma-separated list of lead hours
# with an `h` (`6h,24h,120h`). Errors print one line and exit with status 2.

# %%
#| export
def parse_init(s: str):
    "`--init`: a split name, 'START..STOP' (both included) or comma-separated times."
    if s in ("train", "val", "test"): return s
    if ".." in s:
        a, b = s.split("..", 1)
        return slice(a, str(np.datetime64(b, "ns") + np.timedelta64(1, "ns")))
    return [x.strip() for x in s.split(",") if x.strip()]


def parse_leads(s: str):
    "`--leads`: a number of steps ('20') or lead hours ('6h,24h')."
    try: return int(s) if "h" not in s else [int(x.strip().rstrip("h")) for x in s.split(",") if x.strip()]
    except ValueError: raise argparse.ArgumentTypeError(f"expected a number of steps (20) or lead hours (6h,24h,120h); got {s!r}") from None


# %%
#| export
def main(argv=None) -> int:
    "Entry point of `jigsaw-forecast`."
    ap = argparse.ArgumentParser("jigsaw-forecast", description="Forecasts of a jigsaw_ref checkpoint (any layout) from "
                                 "chosen initial times, written to a zarr store in the WeatherBench2 layout (dims time, "
                                 "prediction_timedelta, level, latitude, longitude; the data store's variable names; "
                                 "physical units). Under mpiexec -n R the ranks share the initial times.")
    ap.add_argument("checkpoint", help="a checkpoint written by jigsaw-train (e.g. runs/latest/final.ckpt)")
    ap.add_argument("--out", required=True, help="zarr store to write (replaced if it exists)")
    ap.add_argument("--init", type=parse_init, default="test", help="initial times: a split ('test', default), "
                    "START..STOP (every store time in between, both included) or comma-separated times")
    ap.add_argument("--leads", type=parse_leads, default=20, help="a number of model steps N (leads 1..N of the "
                    "checkpoint's dt_hours; default 20) or lead hours, e.g. 6h,24h,120h")
    ap.add_argument("--data", default=None, help="data store with the initial states (default: the checkpoint's training data)")
    ap.add_argument("--chunk", type=int, default=1, help="initial times per zarr chunk (default 1)")
    ap.add_argument("--batch", type=int, default=16, help="initial times per forward pass (default 16)")
    ap.add_argument("--device", default="cpu", help="'cpu' (default) or 'cuda'")
    ap.add_argument("--float64", action="store_true", help="run the model and write the fields in float64")
    a = ap.parse_args(argv)
    if a.chunk < 1 or a.batch < 1: ap.error("--chunk and --batch must be >= 1")
    try:
        t0 = time.perf_counter()
        out = forecast_to_zarr(a.checkpoint, a.out, a.data, a.init, a.leads, a.chunk, a.batch, a.device,
                               torch.float64 if a.float64 else torch.float32, progress=True)
        if default_group().rank == 0:
            ds = xr.open_zarr(out, consolidated=False)
            print(f"jigsaw-forecast: wrote {out}: {ds.sizes['time']} initial times x {ds.sizes['prediction_timedelta']} leads, "
                  f"variables {list(ds.data_vars)}, {time.perf_counter() - t0:.1f} s")
    except (EvalError, CheckpointError, DataError) as e:
        print(f"jigsaw-forecast: error: {e}", file=sys.stderr)
        return 2
    return 0


# %%
test_eq(main([str(_d / "m.ckpt"), "--out", str(_d / "f3.zarr"), "--init", "2000-01-06T00..2000-01-06T18", "--leads", "6h,12h"]), 0)
_f3 = xr.open_zarr(_d / "f3.zarr", consolidated=False)
test_eq(_f3.sizes["time"], 4); test_eq(_f3.sizes["prediction_timedelta"], 2)
test_eq(main([str(_d / "m.ckpt"), "--out", str(_d / "f4.zarr"), "--init", "2000-01-06T01"]), 2)

# %%
test_eq(jigsaw_ref.forecast(_d / "m.ckpt", init_times=["2000-01-06T00"], leads=1).sizes["time"], 1)  # the package's name works

# %%
_tmp.cleanup()
