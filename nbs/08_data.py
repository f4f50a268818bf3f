# %%
#| default_exp data

# %%
#| export
from __future__ import annotations
import argparse, hashlib, json, math, os, sys, threading, uuid, zlib
from pathlib import Path
import numpy as np
import torch
import xarray as xr
from fastcore.basics import patch
from tqdm.auto import tqdm
from zarr.storage import LocalStore, WrapperStore
from jigsaw_ref.config import (ERA5_SHORT, MixerConfig, SINGLE_LEVEL, WB2_NAMES, canonical, channel_candidates,
                               preset, shard_range, short_name)
from jigsaw_ref.loss import lat_weights_area

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail
import tempfile
from jigsaw_ref.generator import default_dataset


# %% [markdown]
# # Data
#
# > A lazy, sharded reader for ERA5 in the WeatherBench2 layout (zarr or netCDF): each rank reads only its longitude block and its channels; statistics that know their data; bad data refused with the file, variable and time; and a synthetic source on the paper's 720 x 1440 grid.

# %% [markdown]
# A sample is the state at time $t$ (the $C_\text{in}$ input channels: `cfg.variables` then
# `cfg.statics`) and the target at $t + k\,\Delta t$ (the $V$ variables, then `cfg.out_pad` zero
# padding targets). In Jigsaw a rank of an $n_c \times n_\lambda$ layout holds the channel shard
# `ch_index` of $n_c$ and the longitude shard `lon_index` of $n_\lambda$, cut the way
# `config.shard_range` cuts: longitude in whole patches, channels in contiguous runs. The reader reads
# exactly that block from disk and nothing else, which is what lets the 4-way layout read a quarter of
# every sample per rank.

# %% [markdown]
# ## Errors and opening a file
#
# Every problem with the input is a `DataError` whose message names the file, the variable and the fix,
# raised when the dataset is built (before any collective) wherever the problem is knowable then. A
# problem that belongs to **one sample** (a corrupt or truncated chunk, a NaN, a value outside its physical
# range) is a `BadSampleError`, a `DataError` that also carries the store, variable, time index and file as
# attributes, so a trainer can skip a bounded number of bad samples instead of dying at the same step on
# every requeue.

# %%
#| export
class DataError(ValueError):
    "Bad or missing input data; the message names the file, the variable and the fix."

# %%
#| export
class BadSampleError(DataError):
    "One sample cannot be used; `store`, `variable`, `time_index`, `time` and `file` say where."
    def __init__(self, msg, store=None, variable=None, time_index=None, time=None, file=None):
        super().__init__(msg)
        self.store, self.variable, self.time_index, self.time, self.file = store, variable, time_index, time, file

# %%
_e = BadSampleError("x.zarr: NaN", store="x.zarr", variable="temperature", time_index=3)
test_eq((isinstance(_e, DataError), _e.variable, _e.time_index), (True, "temperature", 3))

# %%
#| export
DIM_ALIASES = {"latitude": ("lat",), "longitude": ("lon",), "level": ("isobaricInhPa", "pressure_level", "plev"),
               "member": ("number", "realization")}


def open_store(path,  # zarr store folder or netCDF file
               store=None,  # optional zarr store object to read through (e.g. a `CountingStore`)
               member: int = 0,  # ensemble member to select when the file has one
              ) -> xr.Dataset:
    "Open `path` lazily with WB2 dimension names (latitude, longitude, level in hPa), one member."
    p = Path(path)
    if store is None and not p.exists():
        raise DataError(f"{p}: no such file or directory; give the path of an ERA5 zarr store or netCDF "
                        f"file, or make the default data with `generator.default_dataset()`")
    try:
        if store is None and p.is_file():
            ds = xr.open_dataset(p, engine="netcdf4", chunks=None, cache=False)
        else:
            ds = xr.open_zarr(store if store is not None else p, consolidated=False, chunks=None)
    except Exception as e:
        raise DataError(f"{p}: cannot be read as a zarr store or netCDF file ({type(e).__name__}: {e}); "
                        f"check the path and that the file is complete") from e
    ren = {a: k for k, al in DIM_ALIASES.items() for a in al if a in ds.dims or a in ds.coords}
    ds = ds.rename(ren)
    if "member" in ds.dims: ds = ds.isel(member=member)
    if "level" in ds.coords and float(ds.level.max()) > 2000: ds = ds.assign_coords(level=ds.level / 100)  # Pa
    return ds


# %%
test_fail(lambda: open_store("/nonexistent/era5.zarr"), contains="/nonexistent/era5.zarr: no such file")


# %% [markdown]
# ## The time axis
#
# The reader needs datetimes, increasing, at one regular step. Each way a time axis can be wrong has its own
# message with the position and the fix: an integer axis (a store written without CF time units), a duplicated
# time, times that go backwards (swapped or descending), and a gap or an extra time (the step changes).

# %%
#| export
def time_step_hours(ds: xr.Dataset, src: str) -> float:
    "The regular step (hours) of the time axis of `ds`, or a `DataError` naming the first position where it is wrong."
    if "time" not in ds.coords: raise DataError(f"{src}: no 'time' coordinate; the reader needs a time axis of datetimes")
    t = ds.time.values
    if t.dtype.kind != "M":
        raise DataError(f"{src}: the time axis holds {t.dtype} numbers, not datetimes (no CF units on 'time'); give it "
                        f"units, e.g. zarr attribute units='hours since 1979-01-01', or convert it with "
                        f"`ds.assign_coords(time=pd.to_datetime(...))` before writing")
    if len(t) < 2: raise DataError(f"{src}: only {len(t)} time step(s); need at least two")
    d = np.diff(t)
    if (d < np.timedelta64(0)).all():
        raise DataError(f"{src}: the time axis is descending ({t[0]} .. {t[-1]}); sort it ascending (`ds.sortby('time')`)")
    for i in np.flatnonzero(d <= np.timedelta64(0))[:1]:
        if d[i] == np.timedelta64(0):
            raise DataError(f"{src}: time {t[i]} appears twice (time indices {i} and {i + 1}); drop the duplicate "
                            f"(`ds.drop_duplicates('time')`)")
        raise DataError(f"{src}: the time axis goes backwards at time index {i + 1} ({t[i]} then {t[i + 1]}): times are "
                        f"swapped or out of order; sort them (`ds.sortby('time')`)")
    h = lambda x: x / np.timedelta64(1, "h")
    for i in np.flatnonzero(d != d[0])[:1]:
        raise DataError(f"{src}: the time step changes at time index {i + 1}: {h(d[0]):g} h before, {h(d[i]):g} h from "
                        f"{t[i]} to {t[i + 1]} (a gap or an extra time); fill the gap or choose a regular range with `split`")
    return float(h(d[0]))

# %%
_t = lambda *h: xr.Dataset(coords=dict(time=np.datetime64("2000-01-01T00", "ns") + np.array(h) * np.timedelta64(1, "h")))
test_eq(time_step_hours(_t(0, 6, 12), "s"), 6.0)
test_fail(lambda: time_step_hours(_t(0, 6, 6, 12), "s"), contains="appears twice (time indices 1 and 2)")
test_fail(lambda: time_step_hours(_t(0, 12, 6, 18), "s"), contains="goes backwards at time index 2")
test_fail(lambda: time_step_hours(_t(12, 6, 0), "s"), contains="descending")
test_fail(lambda: time_step_hours(_t(0, 6, 18), "s"), contains="changes at time index 2: 6 h before, 12 h")
test_fail(lambda: time_step_hours(xr.Dataset(coords=dict(time=np.arange(3))), "s"), contains="not datetimes")


# %% [markdown]
# ## Finding a channel in a file
#
# A channel name is read by `config.channel_candidates`: a known short name (`z500`) maps to a WB2 variable
# and level, and a file may use the WB2 long name or the ERA5 short name (`z`, `t`, ... as cfgrib writes them);
# any other variable of the store is a channel by its own name (`surface_pressure`) or with a level
# (`vertical_velocity@500`, or `w500` for a variable called `w`). Dynamic variables must have dims
# `(time, [level,] latitude, longitude)`; statics `(latitude, longitude)` (a leading time axis of length one,
# as some ERA5 downloads have, is dropped).
#
# `resolve_channel` returns where a channel lives or the reason it cannot be read; the statistics key of a
# channel is its short name when the variable is known (`z500`, whatever the file calls geopotential).

# %%
#| export
def _names_of(var: str) -> tuple:
    "`var` and the other names a file may give it."
    long = next((k for k, v in ERA5_SHORT.items() if var in v), var)
    return tuple(dict.fromkeys((var, long, *ERA5_SHORT.get(long, ()))))

# %%
#| export
def resolve_channel(ds: xr.Dataset, ch: str, static: bool = False) -> tuple[str, int | None, str] | str:
    "`(variable, level index, stats key)` of channel `ch` in `ds`, or a one-phrase reason it cannot be read."
    try: cands = channel_candidates(ch)
    except KeyError as e: return e.args[0]
    for var, level in cands:
        for name in _names_of(var):
            if name not in ds.data_vars: continue
            dims = ds[name].dims
            if static and dims[:1] == ("time",) and len(dims) == 3: dims = dims[1:]
            has_level = "level" in dims
            if (level is not None) != has_level: continue
            want = ("latitude", "longitude") if static else ("time",) + (("level",) if has_level else ()) + ("latitude", "longitude")
            if tuple(dims) != want:
                return (f"variable {name!r} (channel {ch!r}) has dims {tuple(ds[name].dims)}, expected {want}; "
                        f"transpose/rename the file's dimensions to the WB2 layout")
            if level is None: return name, None, short_name(var)
            levels = [int(round(float(l))) for l in ds[name].level.values]
            if level not in levels:
                return f"variable {name!r} has no level {level} hPa for channel {ch!r} (levels: {levels})"
            return name, levels.index(level), short_name(var, level)
    var, level = cands[-1]
    lev = [n for v, _ in cands for n in _names_of(v) if n in ds.data_vars and "level" in ds[n].dims]
    if lev and not any(l is not None for _, l in cands):
        return f"variable {lev[0]!r} (channel {ch!r}) has levels: name one, e.g. '{ch}@{int(ds[lev[0]].level[0])}'"
    return f"channel {ch!r} needs variable {var!r}" + (f" (or {list(_names_of(var)[1:])})" if len(_names_of(var)) > 1 else "")

# %% [markdown]
# `store_channels` lists every channel a store offers, which is what the messages suggest and what
# `jigsaw-stats` computes by default:

# %%
#| export
def store_channels(ds: xr.Dataset) -> tuple[list[str], list[str]]:
    "`(dynamic, static)` channel names of every variable of `ds` in the WB2 layout (short names where known)."
    dyn, sta = [], []
    for name, a in ds.data_vars.items():
        dims = a.dims[1:] if a.dims[:1] == ("time",) and a.sizes["time"] == 1 and len(a.dims) == 3 else a.dims
        if tuple(dims) == ("latitude", "longitude"): sta.append(short_name(name))
        elif tuple(dims) == ("time", "latitude", "longitude"): dyn.append(short_name(name))
        elif tuple(dims) == ("time", "level", "latitude", "longitude"):
            dyn += [short_name(name, int(round(float(l)))) for l in a.level.values]
    return dyn, sta

# %% [markdown]
# All channels of a config are resolved at once, so **every** missing channel is in one message, with the
# setting that removes them (`--set variables=...` for `jigsaw-train`, `MixerConfig.variables` in Python) and
# the channels the store does have:

# %%
#| export
def resolve_channels(ds: xr.Dataset, variables, statics, src: str) -> dict:
    "`{channel: (variable, level index, stats key)}` of all `variables` and `statics`, or one `DataError` listing every problem."
    out, bad = {}, {}
    for chans, static in ((variables, False), (statics, True)):
        for ch in chans:
            r = resolve_channel(ds, ch, static)
            (bad if isinstance(r, str) else out)[ch] = r
    if not bad: return out
    fix = []
    for chans, field in ((variables, "variables"), (statics, "statics")):
        gone = [c for c in chans if c in bad]
        if gone: fix.append(f"remove {', '.join(repr(c) for c in gone)} from cfg.{field} (--set {field}="
                            f"{','.join(c for c in chans if c not in bad) or '[]'})")
    dyn, sta = store_channels(ds)
    raise DataError(f"{src}: {'; '.join(bad.values())} ({len(bad)} channel(s) cannot be read). Fix: {' and '.join(fix)}, "
                    f"or add them to the store (it has {dyn[:24]}{' ...' if len(dyn) > 24 else ''} and statics {sta})")

# %%
#| export
def find_channel(ds: xr.Dataset, ch: str, src: str, static: bool = False) -> tuple[str, int | None]:
    "`(variable, level index)` of channel `ch` in `ds`, or a `DataError` saying what is missing."
    v, li, _ = resolve_channels(ds, () if static else (ch,), (ch,) if static else (), src)[ch]
    return v, li

# %% [markdown]
# A store with a non-standard variable (`surface_pressure`) and a pressure-level variable unknown to the
# project (`w`): both are channels by name, and two missing channels come in one message.

# %%
_g = xr.Dataset({"surface_pressure": (("time", "latitude", "longitude"), np.zeros((2, 3, 4))),
                 "w": (("time", "level", "latitude", "longitude"), np.zeros((2, 2, 3, 4))),
                 "z": (("time", "level", "latitude", "longitude"), np.zeros((2, 2, 3, 4)))},
                coords=dict(level=[500, 850]))
test_eq(resolve_channel(_g, "surface_pressure"), ("surface_pressure", None, "surface_pressure"))
test_eq(resolve_channel(_g, "w850"), ("w", 1, "w@850"))
test_eq(resolve_channel(_g, "z500"), ("z", 0, "z500"))  # ERA5 short name of geopotential
test_eq(store_channels(_g), (["surface_pressure", "w@500", "w@850", "z500", "z850"], []))
test_fail(lambda: resolve_channels(_g, ("z500", "q850", "t2m"), ("lsm",), "g.zarr"),
          contains="g.zarr: channel 'q850' needs variable 'specific_humidity' (or ['q']); channel 't2m' needs variable '2m_temperature'")
test_fail(lambda: resolve_channels(_g, ("z500", "q850"), ("lsm",), "g.zarr"),
          contains="remove 'q850' from cfg.variables (--set variables=z500) and remove 'lsm' from cfg.statics (--set statics=[])")


# %% [markdown]
# ## Physical ranges
#
# Every value read is checked to be finite and not absurd ($|x| < 10^{30}$: a flipped exponent bit in a float32
# gives numbers like $3\cdot10^{38}$ that are finite and train silently). With `check='range'` each channel of
# a known variable must also lie in a loose physical range that no real field leaves (units of ERA5/WB2); a
# value outside it means a corrupt chunk or wrong units.

# %%
#| export
PHYSICAL_RANGES = {  # known variable prefix -> (min, max), loose bounds no real field leaves
    "msl": (8.0e4, 1.1e5), "u10": (-100, 100), "v10": (-100, 100), "t2m": (170, 350),  # Pa, m/s, K
    "z": (-1.0e4, 3.5e5), "q": (-1e-3, 0.06), "t": (150, 350), "u": (-250, 250), "v": (-250, 250),  # m^2/s^2, kg/kg, K, m/s
    "lsm": (0, 1), "slt": (0, 20), "orography": (-5e3, 6e4)}  # fraction, class, m^2/s^2
ABSURD = 1e30  # |x| above this is refused whatever the check


def physical_range(ch: str) -> tuple[float, float] | None:
    "`PHYSICAL_RANGES` entry of channel `ch` (any spelling of a known channel), else None."
    c = canonical(ch)
    head = c if c in SINGLE_LEVEL else c.rstrip("0123456789")
    return PHYSICAL_RANGES.get(head)

# %%
test_eq(physical_range("t850"), (150, 350)); test_eq(physical_range("geopotential@500"), (-1.0e4, 3.5e5))
test_eq(physical_range("surface_pressure"), None)

# %%
#| export
def check_values(x: np.ndarray, names, src: str, t=None, when="", check="finite", where=None) -> None:
    "Raise `BadSampleError` if channels `names` of `x[C, ...]` are NaN/inf, absurd, or (check='range') outside their range."
    if check not in ("finite", "range"): raise DataError(f"check={check!r}: choose 'finite' or 'range'")
    for c, a in zip(names, x):
        lo, hi = float(a.min()), float(a.max())  # NaN propagates through min/max, inf shows as +-inf
        finite = math.isfinite(lo) and math.isfinite(hi)
        rng = physical_range(c) if check == "range" else None
        if finite and max(-lo, hi) <= ABSURD and not (rng and (lo < rng[0] or hi > rng[1])): continue
        v, f = where(c) if where else (None, None)  # only now: naming the file may cost a metadata read
        at = (f" (variable {v!r})" if v else "") + (f" at time index {t} ({when})" if t is not None else "")
        kw = dict(store=src, variable=v, time_index=t, time=when, file=f)
        if not finite:
            raise BadSampleError(f"{src}: NaN or inf in {c!r}{at}{f' in {f}' if f else ''}; fill the gap or exclude that "
                                 f"time with `split`", **kw)
        lim = f"its physical range [{rng[0]:g}, {rng[1]:g}]" if rng and max(-lo, hi) <= ABSURD else f"+-{ABSURD:g}"
        raise BadSampleError(f"{src}: {c!r}{at} has values in [{lo:.4g}, {hi:.4g}], outside {lim}{f' (file {f})' if f else ''}: "
                             f"a corrupt chunk or wrong units; fix the store or exclude that time with `split`", **kw)

# %%
_x = np.array([[[280.0, 290.0]], [[5e4, 5.5e4]]])
check_values(_x, ["t850", "z500"], "s", check="range")
_x[0, 0, 1] = 3e38
test_fail(lambda: check_values(_x, ["t850", "z500"], "s", t=3), contains="'t850' at time index 3 () has values in [280, 3e+38], outside +-1e+30")
_x[0, 0, 1] = 400.0
check_values(_x, ["t850", "z500"], "s")  # 400 K is finite and not absurd: only the range check refuses it
test_fail(lambda: check_values(_x, ["t850", "z500"], "s", check="range"), contains="outside its physical range [150, 350]")


# %% [markdown]
# ## Splits
#
# A split is `'train'`, `'val'`, `'test'` or a `(start, stop)` pair of dates or of integer time
# indices (stop exclusive). Named splits come from the store's attributes `split_train` etc. (the
# generator writes them); a store without them is cut 80/10/10 in time. An empty split is an error that
# says where the split came from and how to set it.

# %%
#| export
def _split_origin(ds, split) -> str:
    if not isinstance(split, str): return f"split {tuple(split)!r}"
    if f"split_{split}" in ds.attrs: return f"split {split!r} (store attribute split_{split}={list(ds.attrs[f'split_{split}'])})"
    return (f"split {split!r} (the store has no attribute split_{split}, so {split!r} is the default "
            f"{ {'train': 'first 80%', 'val': 'next 10%', 'test': 'last 10%'}.get(split, '')} of its {ds.sizes['time']} times)")

# %%
#| export
def split_indices(ds: xr.Dataset, split, src: str) -> tuple[int, int]:
    "`(start, stop)` time indices of `split` in `ds`; a `DataError` if it is unknown or empty."
    times = ds.time.values; n = len(times); spec = split
    if isinstance(split, str):
        if f"split_{split}" in ds.attrs: split = tuple(ds.attrs[f"split_{split}"])
        elif split in ("train", "val", "test"):
            a, b = {"train": (0, .8), "val": (.8, .9), "test": (.9, 1.)}[split]
            split = (int(round(a * n)), int(round(b * n)))
        else: raise DataError(f"{src}: unknown split {split!r}; use 'train', 'val', 'test' or (start, stop)")
    start, stop = split
    if isinstance(start, (int, np.integer)) and isinstance(stop, (int, np.integer)): i0, i1 = max(0, int(start)), min(n, int(stop))
    else: i0, i1 = (int(np.searchsorted(times, np.datetime64(str(x), "ns"))) for x in (start, stop))
    if i1 <= i0:
        raise DataError(f"{src}: {_split_origin(ds, spec)} is empty: no time of the store ({times[0]} .. {times[-1]}, "
                        f"{n} times) falls in it; set the store attribute split_{spec if isinstance(spec, str) else '<name>'} = "
                        f"[start, stop] or pass another split (split=(start, stop), jigsaw-eval --split)")
    return i0, i1

# %%
#| export
def _grid_rows(ds, n_lat, src):
    "Latitude rows used: all, or all but the last when the file has one more (721 -> 720)."
    nl = ds.sizes["latitude"]
    if nl not in (n_lat, n_lat + 1):
        raise DataError(f"{src}: {nl} latitude rows but cfg.n_lat={n_lat}; set n_lat={nl} (or {nl - 1}, dropping "
                        f"the last row) in the config, or regrid the file")
    return slice(0, n_lat)

# %%
_s4 = _t(0, 12, 24, 36).assign_attrs(split_train=["2000-01-01T00", "2000-01-02T00"])
test_eq(split_indices(_s4, "train", "s"), (0, 2)); test_eq(split_indices(_s4, (1, 9), "s"), (1, 4))
test_fail(lambda: split_indices(_s4, "test", "s4.zarr"), contains="s4.zarr: split 'test' (the store has no attribute split_test, so 'test' is the default last 10% of its 4 times) is empty")


# %% [markdown]
# ## Latitude weights of a store
#
# The loss and the metrics weight rows by cell area (`loss.lat_weights_area`), computed on the store's
# **whole** latitude axis and then cut to the rows read (normalised to mean 1 over those rows). A store may
# say what its weights are: a 1-D variable over latitude named `gw`, `latitude_weights`, `gaussian_weights`
# or `area_weights` (quadrature weights, as Gaussian-grid models write them) is used as is; CF cell bounds
# (the variable named by the latitude's `bounds` attribute, or `latitude_bnds`/`lat_bnds`) give the edges.
# Otherwise the edges come from the latitudes, and a Gaussian grid gets its exact quadrature weights.

# %%
#| export
LAT_WEIGHT_VARS = ("gw", "latitude_weights", "gaussian_weights", "area_weights")


def store_lat_weights(ds: xr.Dataset, rows=slice(None)) -> torch.Tensor:
    "Area weights (float64, mean 1 over `rows`) of the latitude rows `rows` of `ds`, from the store's own weights or bounds if it has them."
    names = [n for n in (*LAT_WEIGHT_VARS, *(v for v in ds.variables if v.lower() in LAT_WEIGHT_VARS))
             if n in ds.variables and ds[n].dims == ("latitude",)]
    bnd = [n for n in (ds.latitude.attrs.get("bounds"), "latitude_bnds", "lat_bnds") if n and n in ds.variables]
    if names: w = torch.as_tensor(np.asarray(ds[names[0]].values, np.float64))
    elif bnd: w = lat_weights_area(ds.latitude.values, edges=np.asarray(ds[bnd[0]].values, np.float64))
    else: w = lat_weights_area(ds.latitude.values)
    w = w[rows]
    return w / w.mean()

# %%
_mu, _gw = np.polynomial.legendre.leggauss(8)
_gs = xr.Dataset({"gw": ("latitude", _gw * 3)}, coords=dict(latitude=np.rad2deg(np.arcsin(_mu))[::-1] + 0.3))  # not Gaussian latitudes
test_close(store_lat_weights(_gs), torch.from_numpy(_gw / _gw.mean()), eps=1e-12)  # the store's weights win
_b = xr.Dataset({"lat_bnds": (("latitude", "nb"), [[-90, -30], [-30, 30], [30, 90]])}, coords=dict(latitude=[-60., 0, 60]))
test_close(store_lat_weights(_b), torch.tensor([0.75, 1.5, 0.75], dtype=torch.float64), eps=1e-12)


# %% [markdown]
# ## Normalisation statistics that know their data
#
# Per-channel mean and standard deviation over every pixel and time of the training split (not
# area-weighted, over all latitude rows of the store), in one streaming pass: each time step's mean and sum
# of squared deviations are merged into the running totals with Chan's update
# $M_2 \leftarrow M_2 + M_2^{(b)} + \delta^2 \frac{n\,n_b}{n+n_b}$, $\delta = \bar x_b - \bar x$, in float64.
# Statics are z-scored too (orography, soil type), except the land-sea mask (`NO_NORM`), which stays a
# fraction in [0, 1].

# %%
#| export
NO_NORM = ("lsm",)  # channels that are not z-scored


class Welford:
    "Streaming mean and variance of batches of values (Chan's parallel update, float64)."
    def __init__(self): self.n, self.mean, self.m2 = 0, 0.0, 0.0
    def add(self, x):
        x = np.asarray(x, np.float64).ravel(); nb, mb = x.size, x.mean()
        d, n = mb - self.mean, self.n + nb
        self.m2 += ((x - mb) ** 2).sum() + d * d * self.n * nb / n
        self.mean += d * nb / n; self.n = n
    @property
    def std(self): return float(np.sqrt(self.m2 / self.n))


# %%
_x = np.random.default_rng(0).standard_normal(1000) * 3 + 7
_w = Welford()
for _b in np.split(_x, [10, 300, 301]): _w.add(_b)
test_close(_w.mean, _x.mean(), eps=1e-12); test_close(_w.std, _x.std(), eps=1e-12)


# %% [markdown]
# **Fingerprints.** Statistics computed from other data are worse than none: they train silently on wrongly
# scaled inputs. So every entry of the statistics file records a fingerprint of the variable it came from: its
# dims, shape and dtype, the times of the split it was computed over, and the size and modification time of
# every file of that variable (the chunk files of a zarr store; the file itself for netCDF; for a variable of more
# than `FINGERPRINT_FILES` files, as a multi-decade ERA5 store has, its metadata and the chunk files of 64 times
# spread over the axis, so that every rank's check stays a few dozen `stat` calls). Loading checks the
# fingerprint against the data as they are now; an entry that does not match is dropped and recomputed, with a
# line that says what changed. (Copying a store without keeping modification times therefore costs one
# recomputation.)

# %%
#| export
FINGERPRINT_FILES = 20000  # a variable with more files is fingerprinted from a sample of its chunk files


def _sampled_files(p: Path, var: str, n: int = 64) -> list[tuple[str, int, int]]:
    "(relative path, size, mtime_ns) of `zarr.json` and the first chunk file of `n` time chunks spread over zarr variable `var`."
    import zarr
    a = zarr.open_array(str(p / var), mode="r")
    outer, names = a.metadata.chunk_grid.chunk_shape, list(a.metadata.dimension_names or ())
    ti = names.index("time") if "time" in names else 0
    nt = -(-a.shape[ti] // outer[ti])
    keys = ["zarr.json"] + [a.metadata.encode_chunk_key(tuple(int(c) if d == ti else 0 for d in range(len(outer))))
                            for c in np.unique(np.linspace(0, nt - 1, n).round())]
    out = []
    for k in keys:
        try: st = os.stat(p / var / k); out.append((f"{var}/{k}", st.st_size, st.st_mtime_ns))
        except OSError: out.append((f"{var}/{k}", -1, -1))
    return out

# %%
#| export
def _var_files(path, var, limit: int = FINGERPRINT_FILES) -> list[tuple[str, int, int]]:
    "(relative path, size, mtime_ns) of the files holding variable `var` (all of them up to `limit`, else a sample)."
    p = Path(path)
    if p.is_file(): st = p.stat(); return [(p.name, st.st_size, st.st_mtime_ns)]
    out = []
    for root, _, files in os.walk(p / var):
        for f in files:
            st = os.stat(os.path.join(root, f))
            out.append((os.path.relpath(os.path.join(root, f), p), st.st_size, st.st_mtime_ns))
        if len(out) > limit: return _sampled_files(p, var)  # a full ERA5 variable: ~100k chunk files per rank is too many
    return sorted(out)

# %%
#| export
def fingerprint(ds: xr.Dataset, var: str, path, i0: int, i1: int) -> dict:
    "What the statistics of variable `var` over time indices [i0, i1) depend on: layout, times and files."
    files = _var_files(path, var)
    h = hashlib.sha256("".join(f"{n}:{s}:{m};" for n, s, m in files).encode()).hexdigest()[:16]
    t = ds.time.values
    return dict(dims=list(ds[var].dims), shape=list(ds[var].shape), dtype=str(ds[var].dtype),
                times=[str(t[i0]), str(t[i1 - 1]), i1 - i0], files=len(files), files_sha=h,
                newest=max((m for _, _, m in files), default=0))

# %%
#| export
def fingerprint_diff(old: dict, new: dict) -> str | None:
    "A phrase naming the first thing that differs between two fingerprints, or None."
    for k, what in (("dims", "dims"), ("shape", "shape"), ("dtype", "dtype"), ("times", "times of the split"),
                    ("files", "number of files"), ("files_sha", "file sizes or modification times")):
        if old.get(k) != new.get(k): return f"{what} {old.get(k)} -> {new.get(k)}" if k != "files_sha" else what
    return None

# %%
_fp = default_dataset(Path(tempfile.mkdtemp()) / "f.zarr", grid="tiny", days=(2, 0, 0), spinup=1, verbose=False)
test_eq(len(_var_files(_fp, "temperature")), 2 + 1)  # two daily shards and zarr.json
test_eq([f for f, _, _ in _var_files(_fp, "temperature", limit=1)], ["temperature/zarr.json", "temperature/c/0/0/0/0", "temperature/c/1/0/0/0"])

# %% [markdown]
# **Where the file goes.** `<store>.stats.json` beside the data. A data folder that cannot be written (a
# read-only file system, a shared archive) is not an error: the file goes to `$JIGSAW_DATA/stats/` (default
# `~/.cache/jigsaw_ref/stats/`) under a name made from the store's path, with a line saying so, and loading looks
# in both places. Only if neither can be written is it an error, naming both files and the fix.

# %%
#| export
def cache_dir() -> Path:
    "Folder of generated stores and fallback statistics: `$JIGSAW_DATA` or `~/.cache/jigsaw_ref`."
    return Path(os.environ.get("JIGSAW_DATA") or Path.home() / ".cache" / "jigsaw_ref")

# %%
#| export
def stats_path(path) -> Path:
    "Where the normalisation statistics of the data at `path` live (beside the data)."
    return Path(str(Path(path)) + ".stats.json")

# %%
#| export
def stats_fallback_path(path) -> Path:
    "Where they go when the data folder cannot be written: `cache_dir()/stats/<name>-<hash of the path>.stats.json`."
    p = Path(path).resolve()
    return cache_dir() / "stats" / f"{p.name}-{hashlib.sha256(str(p).encode()).hexdigest()[:10]}.stats.json"

# %%
#| export
def _write_json(f: Path, obj):
    "Write `obj` as JSON to `f` atomically (temp file in the same folder, then rename)."
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_name(f".{f.name}.{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        tmp.write_text(json.dumps(obj, indent=1)); os.replace(tmp, f)
    finally: tmp.unlink(missing_ok=True)

# %% [markdown]
# The file holds one entry per channel: `[mean, std]`, the statistics key (the short name, e.g. `z500`), and
# the fingerprint of its variable.

# %%
#| export
STATS_FORMAT = "jigsaw_ref-stats/2"


def _read_stats_file(path) -> tuple[dict, Path | None]:
    "The raw entries `{key: {...}}` of the statistics file of `path` (beside it, else the fallback), and that file."
    for f in (stats_path(path), stats_fallback_path(path)):
        try: d = json.loads(f.read_text())
        except (OSError, ValueError): continue
        if d.get("format") == STATS_FORMAT: return d.get("entries", {}), f
        return {}, f  # an old file without fingerprints: nothing in it can be trusted
    return {}, None

# %%
#| export
def save_stats(path, entries: dict, verbose: bool = True) -> Path:
    "Merge `entries` (`{key: {mean, std, var, fingerprint}}`) into the statistics file of `path`; return the file written."
    old, _ = _read_stats_file(path)
    obj = {"format": STATS_FORMAT, "data": str(Path(path).resolve()), "entries": {**old, **entries}}
    f, alt = stats_path(path), stats_fallback_path(path)
    try: _write_json(f, obj); return f
    except OSError as e: first = e
    try: _write_json(alt, obj)
    except OSError as e:
        raise DataError(f"{path}: cannot write the statistics file {f} ({first.strerror}) nor {alt} ({e.strerror}); set "
                        f"JIGSAW_DATA to a writable folder (the statistics go to $JIGSAW_DATA/stats/)") from e
    if verbose: print(f"jigsaw_ref.data: {f.parent} is not writable ({first.strerror}); statistics written to {alt}", file=sys.stderr)
    return alt

# %% [markdown]
# `load_stats` returns `{key: (mean, std)}` of the entries that still match their data (all of them with
# `verify=False`), or None when there is no file.

# %%
#| export
def load_stats(path, verify: bool = True, verbose: bool = True, ds: xr.Dataset | None = None) -> dict | None:
    "Statistics saved for `path` whose fingerprints match the data now, as `{key: (mean, std)}`; None if there is no file."
    entries, f = _read_stats_file(path)
    if f is None: return None
    if verify and entries:
        ds = open_store(path) if ds is None else ds
        fps, stale = {}, {}
        for k, e in entries.items():
            v = e.get("var")
            if v not in ds.data_vars: stale[k] = f"variable {v!r} is gone"; continue
            t = ds.time.values if "time" in ds.dims else None
            old = e.get("fingerprint", {})
            if v not in fps:
                i0 = int(np.searchsorted(t, np.datetime64(old["times"][0], "ns"))) if t is not None and old.get("times") else 0
                n = old.get("times", [0, 0, 1])[2]
                fps[v] = fingerprint(ds, v, path, i0, min(i0 + n, len(t))) if t is not None and i0 < len(t) else {}
            why = fingerprint_diff(old, fps[v]) if fps[v] else "its times are gone"
            if why: stale[k] = f"{v}: {why}"
        if stale and verbose:
            print(f"jigsaw_ref.data: statistics in {f} were computed from other data ({'; '.join(sorted(set(stale.values())))}); "
                  f"recomputing {sorted(stale)}", file=sys.stderr)
        entries = {k: e for k, e in entries.items() if k not in stale}
    return {k: (float(e["mean"]), float(e["std"])) for k, e in entries.items()}

# %% [markdown]
# `compute_stats` streams through the split once, one time step at a time, with a progress bar when the
# split is long (more than 100 times: a few seconds or more), and saves the result. It returns
# `{channel: (mean, std)}` under the config's channel names.

# %%
#| export
def compute_stats(path, cfg: MixerConfig, split="train", member=0, save=True, store=None,
                  progress: bool | None = None,  # progress bar; None: when the split has more than 100 times
                  check: str = "finite",  # 'finite' or 'range' (see `check_values`)
                  verbose: bool = True) -> dict:
    "Per-channel `{name: (mean, std)}` of `cfg.variables + cfg.statics` over `split`, in one streaming pass."
    src = str(path); ds = open_store(path, store, member)
    time_step_hours(ds, src)
    chans = resolve_channels(ds, cfg.variables, cfg.statics, src)
    i0, i1 = split_indices(ds, split, src)
    acc = {c: Welford() for c in cfg.variables}
    byvar = {}
    for c in cfg.variables: byvar.setdefault(chans[c][0], []).append(c)
    t_ = ds.time.values
    for t in tqdm(range(i0, i1), desc=f"statistics of {Path(src).name} [{split}]", unit="time", mininterval=1,
                  disable=not (progress if progress is not None else i1 - i0 > 100)):
        for v, cl in byvar.items():
            a = _values(ds[v].isel(time=t), src, v, t, t_[t], path if store is None else None)
            x = np.stack([a if chans[c][1] is None else a[chans[c][1]] for c in cl])
            check_values(x, cl, src, t, str(t_[t]), check, where=lambda c: (chans[c][0], None))
            for c, xc in zip(cl, x): acc[c].add(xc)
    out = {c: (w.mean, w.std) for c, w in acc.items()}
    for c in cfg.statics:
        v = chans[c][0]; a = ds[v]
        x = _values(a.isel(time=0) if a.dims[0] == "time" else a, src, v, 0, "static", path if store is None else None)
        check_values(x[None], [c], src, check=check, where=lambda c: (v, None))
        out[c] = (float(x.mean()), float(x.std()))
    if save and store is None:
        fps = {v: fingerprint(ds, v, path, i0, i1) for v in {chans[c][0] for c in out}}
        save_stats(path, {chans[c][2]: dict(mean=m, std=s, var=chans[c][0], fingerprint=fps[chans[c][0]], split=[i0, i1])
                          for c, (m, s) in out.items()}, verbose)
    return out

# %% [markdown]
# `ensure_stats` is what a launcher calls once, on one rank, before the others build their datasets: it loads
# the statistics when every channel of the config has a fresh entry and computes (and saves) them otherwise.

# %%
#| export
def ensure_stats(path, cfg: MixerConfig, member=0, check: str = "finite", progress: bool | None = None) -> dict:
    "`{channel: (mean, std)}` of every channel of `cfg`: loaded if all are saved and fresh, else computed and saved."
    if str(path).startswith("synthetic:"): return {}  # a synthetic source knows its statistics in closed form
    ds = open_store(path, member=member)
    chans = resolve_channels(ds, cfg.variables, cfg.statics, str(path))
    got = load_stats(path, ds=ds) or {}
    if all(chans[c][2] in got for c in cfg.variables + cfg.statics):
        return {c: got[chans[c][2]] for c in cfg.variables + cfg.statics}
    return compute_stats(path, cfg, member=member, check=check, progress=progress)

# %% [markdown]
# Reading one variable at one time is where a corrupt or truncated chunk shows: zarr's checksum or decoder
# raises. `_values` turns that into a `BadSampleError` naming the chunk file (located by probing the chunks
# of that time), the variable and the time.

# %%
#| export
def _bad_chunk_file(path, var: str, t: int) -> str | None:
    "The file of zarr variable `var` at time index `t` that fails to decode (by probing its chunks), or None."
    import zarr
    try:
        a = zarr.open_array(str(Path(path) / var), mode="r")
        outer = a.metadata.chunk_grid.chunk_shape  # shard shape if sharded
        ti = list(a.metadata.dimension_names or ()).index("time") if a.metadata.dimension_names else 0
        grid = [range(-(-n // c)) for n, c in zip(a.shape, outer)]
        grid[ti] = [t // outer[ti]]
        for coords in np.ndindex(*[len(g) for g in grid]):
            cc = tuple(g[i] for g, i in zip(grid, coords))
            sl = tuple(slice(c * o, min((c + 1) * o, n)) if d != ti else slice(t, t + 1)
                       for d, (c, o, n) in enumerate(zip(cc, outer, a.shape)))
            try: a[sl]
            except Exception: return str(Path(path) / var / a.metadata.encode_chunk_key(cc))
    except Exception: return None
    return None

# %%
#| export
def _values(a: xr.DataArray, src: str, var: str, t: int, when, path=None) -> np.ndarray:
    "`a.values` (one variable at time index `t`), or a `BadSampleError` naming the file, variable and time."
    try: return a.values
    except (DataError, KeyboardInterrupt): raise
    except Exception as e:
        f = (_bad_chunk_file(path, var, t) if path is not None and Path(path).is_dir() else str(path or src)) or f"{src}/{var}"
        why = "its checksum does not match" if "checksum" in str(e).lower() else f"{type(e).__name__}: {str(e).split('. ')[0][:80]}"
        raise BadSampleError(f"{src}: cannot read variable {var!r} at time index {t} ({when}): {f} is corrupt or truncated "
                             f"({why}); restore that file from a copy (or regenerate the store), "
                             f"or exclude that time with `split`", store=src, variable=var, time_index=t, time=str(when), file=f) from e


# %% [markdown]
# `normalize`/`denormalize` apply the statistics to a tensor whose channel axis is `-3`;
# padding channels (`pad0`, ...) and `NO_NORM` channels pass through (padding comes back as zeros).

# %%
#| export
def _affine(names, stats, dtype=torch.float32):
    m = [0.0 if n.startswith("pad") or n in NO_NORM else stats[n][0] for n in names]
    s = [1.0 if n.startswith("pad") or n in NO_NORM or stats[n][1] == 0 else stats[n][1] for n in names]
    sh = (len(names), 1, 1)
    return torch.tensor(m, dtype=dtype).view(sh), torch.tensor(s, dtype=dtype).view(sh)

# %%
#| export
def normalize(x: torch.Tensor, names, stats) -> torch.Tensor:
    "Z-score channels `names` of `x[..., C, lat, lon]` in physical units."
    m, s = _affine(names, stats, x.dtype); return (x - m) / s

# %%
#| export
def denormalize(y: torch.Tensor, names, stats) -> torch.Tensor:
    "Physical units of z-scored `y[..., C, lat, lon]` with channels `names`; padding channels become 0."
    m, s = _affine(names, stats, y.dtype)
    pad = torch.tensor([n.startswith("pad") for n in names]).view(len(names), 1, 1)
    return torch.where(pad, torch.zeros((), dtype=y.dtype), y * s + m)


# %%
_st = {"z500": (5.4e4, 3e3), "lsm": (0.3, 0.4)}
_y = torch.tensor([5.7e4, 0.5, 0.0]).view(3, 1, 1)
test_close(normalize(_y, ["z500", "lsm", "pad0"], _st).flatten(), torch.tensor([1.0, 0.5, 0.0]))
test_close(denormalize(normalize(_y, ["z500", "lsm", "pad0"], _st), ["z500", "lsm", "pad0"], _st), _y)


# %% [markdown]
# ## The sharded dataset
#
# For rank coordinates `(ch_index, lon_index)` the block is
#
# - longitude pixels `shard_range(n_lon // patch, lon_parts, lon_index)` times `patch` (whole patches, so
#   the tokens of a rank are exactly its patches);
# - input channels `shard_range(n_in, ch_parts, ch_index)` of `variables + statics`;
# - target channels `shard_range(n_out, ch_parts, ch_index)` of `variables + [pad0, ...]`.
#
# The variables of a shard are read grouped by file variable, so the levels that share a chunk are
# fetched once. Statics are read once, at construction. `get(i, k)` returns the input at time
# index `i` of the split and the target `k` model steps ($k \cdot$ `cfg.dt_hours`) later; the dataset has
# as many samples as leave room for `max_lead` steps inside the split.

# %%
#| export
def shard_block(cfg: MixerConfig, lon_parts=1, lon_index=0, ch_parts=1, ch_index=0, src="") -> dict:
    "Longitude pixel range, input and output channel names of one rank's block (checks the layout)."
    npatch = cfg.n_lon // cfg.patch
    for name, parts, idx, n in (("lon", lon_parts, lon_index, npatch), ("ch", ch_parts, ch_index, min(cfg.n_in, cfg.n_out))):
        if not (isinstance(parts, int) and 1 <= parts <= n):
            unit = "longitude patches (n_lon // patch)" if name == "lon" else "channels (min of n_in, n_out)"
            raise DataError(f"{src}: {name}_parts={parts} cannot divide {n} {unit}; use at most {n} {name} shards "
                            f"or a smaller patch / more channels")
        if not 0 <= idx < parts: raise DataError(f"{src}: {name}_index={idx} is not in [0, {parts})")
    p0, p1 = shard_range(npatch, lon_parts, lon_index)
    a, b = shard_range(cfg.n_in, ch_parts, ch_index); c, d = shard_range(cfg.n_out, ch_parts, ch_index)
    outs = list(cfg.variables) + [f"pad{i}" for i in range(cfg.out_pad)]
    return dict(lon=(p0 * cfg.patch, p1 * cfg.patch), inp=list((cfg.variables + cfg.statics)[a:b]), out=outs[c:d])


# %%
test_eq(shard_block(preset("small"), 2, 1, 2, 0)["lon"], (32, 64))
test_eq(shard_block(preset("small", out_pad=1), 1, 0, 2, 1)["out"][-2:], ["v250", "pad0"])
test_fail(lambda: shard_block(preset("tiny"), lon_parts=16), contains="lon_parts=16 cannot divide 8")


# %% [markdown]
# `Era5Dataset` checks everything it can at construction, in this order, so a bad store fails on every rank
# with the same message before any collective: the layout, the file, the grid, the time axis, **all** channels,
# the split and its length, the statistics, the statics. A data path of the form `synthetic:NLATxNLON` builds the
# synthetic source of the last section instead (same interface), which is how `jigsaw-train --data
# synthetic:720x1440` works.

# %%
#| export
class Era5Dataset(torch.utils.data.Dataset):
    "One rank's block of ERA5-like samples `(x, y)` from a WB2 zarr store or netCDF file, z-scored."
    def __new__(cls, path=None, *a, **kw):
        if cls is Era5Dataset and isinstance(path, str) and path.startswith("synthetic:"): cls = SyntheticEra5
        return super().__new__(cls)

    def __init__(self, path, cfg: MixerConfig,
                 split="train",  # 'train' | 'val' | 'test' | (start, stop) dates or time indices
                 lon_parts=1, lon_index=0,  # longitude shards and this rank's one
                 ch_parts=1, ch_index=0,  # channel shards and this rank's one
                 max_lead=None,  # largest k that `get` will be asked for (default `cfg.rollout[1]`)
                 stats=None,  # {name: (mean, std)}; None: load beside the data (recomputed if stale); False: raw units
                 member=0,  # ensemble member, for files that have one
                 store=None,  # zarr store object to read `path` through (e.g. to count bytes)
                 check="finite"):  # value check of every read: 'finite' (NaN, inf, |x| > 1e30) or 'range' (also physical ranges)
        self.path, self.cfg, self.src, self.check = path, cfg, str(path), check
        b = shard_block(cfg, lon_parts, lon_index, ch_parts, ch_index, self.src)
        self.in_channels, self.out_channels, (c0, c1) = b["inp"], b["out"], b["lon"]
        ds = self.ds = open_store(path, store, member)
        rows = _grid_rows(ds, cfg.n_lat, self.src)
        if ds.sizes.get("longitude") != cfg.n_lon:
            raise DataError(f"{self.src}: {ds.sizes.get('longitude')} longitudes but cfg.n_lon={cfg.n_lon}; set n_lon "
                            f"to the file's grid or regrid the file")
        self.sel = dict(latitude=rows, longitude=slice(c0, c1))
        self.lat = ds.latitude.values[rows].astype(np.float64)
        self.lon = ds.longitude.values[c0:c1].astype(np.float64)
        self.area_weights = store_lat_weights(ds, rows)  # (n_lat,) mean 1, from the store's weights/bounds if it has them
        self.stride = self._stride(ds)
        self.chans = resolve_channels(ds, cfg.variables, cfg.statics, self.src)
        self._dyn = {c: self.chans[c][:2] for c in cfg.variables}
        self.max_lead = cfg.rollout[1] if max_lead is None else max_lead
        self._set_split(ds, split)
        self.stats = self._stats(stats, member, store)
        self._statics = self._read_statics(ds)
        self._lock = threading.Lock()

    def __len__(self): return self.n_samples
    def __getstate__(self): return {k: v for k, v in self.__dict__.items() if k != "_lock"}  # for DataLoader workers
    def __setstate__(self, d): self.__dict__.update(d); self._lock = threading.Lock()

# %% [markdown]
# The time stride, the split and its length:

# %%
#| export
@patch
def _stride(self: Era5Dataset, ds) -> int:
    "Store time steps per model step `cfg.dt_hours` (a `DataError` if the axis is wrong or the step does not divide it)."
    dt = time_step_hours(ds, self.src)
    k = self.cfg.dt_hours / dt
    if k != int(k):
        raise DataError(f"{self.src}: time step {dt:g} h does not divide cfg.dt_hours={self.cfg.dt_hours}; set dt_hours to "
                        f"a multiple of {dt:g} h (--set dt_hours={int(math.ceil(self.cfg.dt_hours / dt) * dt)}) or use a store "
                        f"with a finer step")
    return int(k)

# %%
#| export
@patch
def _set_split(self: Era5Dataset, ds, split):
    "Time range `[i0, i1)` of `split` and the number of samples it holds; a `DataError` if too short for `max_lead`."
    self.i0, self.i1 = split_indices(ds, split, self.src)
    self.times = ds.time.values[self.i0:self.i1]
    n, need = self.i1 - self.i0, self.max_lead * self.stride + 1
    self.n_samples = max(0, n - need + 1)
    if self.n_samples < 1:
        raise DataError(f"{self.src}: {_split_origin(ds, split)} has {n} time step(s) ({self.times[0]} .. {self.times[-1]}), "
                        f"too few for a lead of {self.max_lead} x {self.cfg.dt_hours} h (a sample needs {need} consecutive "
                        f"times); choose a longer split (store attribute split_<name>, or split=(start, stop)) or fewer "
                        f"leads (at most {(n - 1) // self.stride} here)")

# %% [markdown]
# The statistics: given, loaded (stale entries recomputed), or computed; every channel of the block must have them.

# %%
#| export
@patch
def _stats(self: Era5Dataset, stats, member, store):
    "`{channel: (mean, std)}` for the channels of this block, or False for raw units."
    if stats is False: return False
    need = list(dict.fromkeys(self.in_channels + [c for c in self.out_channels if not c.startswith("pad")]))
    if stats is None:
        key = lambda c: self.chans[c][2]
        got = (load_stats(self.path, ds=self.ds) if store is None else None) or {}
        if any(key(c) not in got for c in need if c not in NO_NORM):
            got = {key(c): v for c, v in compute_stats(self.path, self.cfg, member=member, save=store is None, store=store,
                                                       check=self.check).items()}
        stats = {c: got[key(c)] for c in need if key(c) in got}
    if any(c not in stats for c in need if c not in NO_NORM):
        raise DataError(f"{self.src}: the statistics given lack {[c for c in need if c not in stats]}; "
                        f"pass stats=None to load or compute them with `compute_stats` (or `jigsaw-stats`)")
    return stats

# %% [markdown]
# Reading: statics once, dynamic channels per sample, both only in this rank's block, each checked.

# %%
#| export
@patch
def _read_statics(self: Era5Dataset, ds):
    "Z-scored statics of this block, `[n_static_local, n_lat, n_lon_local]`, read once."
    chans = [c for c in self.in_channels if c in self.cfg.statics]
    out = []
    for c in chans:
        v = self.chans[c][0]; a = ds[v]
        if a.dims[0] == "time": a = a.isel(time=0)
        x = _values(a.isel(**self.sel), self.src, v, 0, "static", self.path).astype(np.float32)
        check_values(x[None], [c], self.src, check=self.check, where=lambda c: (v, None))
        out.append(x)
    x = torch.from_numpy(np.stack(out)) if out else torch.zeros(0, self.cfg.n_lat, len(self.lon))
    return normalize(x, chans, self.stats) if self.stats else x

# %%
#| export
@patch
def _read(self: Era5Dataset, t: int, names: list) -> torch.Tensor:
    "Channels `names` (dynamic only) of this block at store time index `t`, physical units."
    byvar, got, when = {}, {}, self.ds.time.values[t]
    for c in names:
        v, li = self._dyn[c]; byvar.setdefault(v, []).append((c, li))
    for v, cl in byvar.items():  # one read per file variable: levels sharing a chunk come once
        lis = [li for _, li in cl]
        a = _values(self.ds[v].isel(time=t, **self.sel, **({} if lis[0] is None else {"level": lis})), self.src, v, t, when,
                    self.path)
        for j, (c, li) in enumerate(cl): got[c] = a if li is None else a[j]
    x = np.stack([got[c] for c in names]).astype(np.float32) if names else np.zeros((0, self.cfg.n_lat, len(self.lon)), np.float32)
    check_values(x, names, self.src, t, str(when), self.check, where=lambda c: (self._dyn[c][0], self._chunk_file(c, t)))
    return torch.from_numpy(x)

# %% [markdown]
# A bad value names the chunk file it came from (computed from the zarr metadata: no probing needed, since
# the file decoded):

# %%
#| export
@patch
def _chunk_file(self: Era5Dataset, c: str, t: int) -> str | None:
    "The zarr file (shard or chunk) holding channel `c` at time index `t` in this block, if the store is a local zarr folder."
    p = Path(self.src)
    if not p.is_dir(): return str(p) if p.is_file() else None
    try:
        import zarr
        v, li = self._dyn[c]; a = zarr.open_array(str(p / v), mode="r")
        outer, dims = a.metadata.chunk_grid.chunk_shape, list(self.ds[v].dims)
        at = {"time": t, "level": li or 0, "latitude": 0, "longitude": self.sel["longitude"].start}
        return str(p / v / a.metadata.encode_chunk_key(tuple(at[d] // o for d, o in zip(dims, outer))))
    except Exception: return None

# %%
#| export
@patch
def get(self: Era5Dataset, i: int, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    "Input at split time index `i` and target `k` steps later: `x[C_in_local, lat, lon_local]`, `y[V_out_local, lat, lon_local]`."
    if not 0 <= i < len(self) or not 1 <= k <= self.max_lead:
        raise IndexError(f"sample {i} (of {len(self)}), lead {k} (1..{self.max_lead})")
    t = self.i0 + i
    dyn_in = [c for c in self.in_channels if c not in self.cfg.statics]
    real_out = [c for c in self.out_channels if not c.startswith("pad")]
    with self._lock:  # xarray's lazy arrays are not thread-safe to index concurrently
        xd, yd = self._read(t, dyn_in), self._read(t + k * self.stride, real_out)
    if self.stats: xd, yd = normalize(xd, dyn_in, self.stats), normalize(yd, real_out, self.stats)
    y = torch.zeros(len(self.out_channels), *yd.shape[1:]); y[:len(real_out)] = yd  # padding targets are 0
    return torch.cat([xd, self._statics]), y


Era5Dataset.__getitem__ = lambda self, i: self.get(i, 1)
Era5Dataset.denormalize = lambda self, y: denormalize(y, self.out_channels, self.stats)  # y[..., V_out_local, lat, lon]

# %% [markdown]
# Note the padding channels sit after all the variables, so they belong to the last channel shard.
# A 2-way and a 2x2 layout on a tiny generated store; the blocks stitched back together are the 1-way sample:

# %%
_tmp = tempfile.TemporaryDirectory()
_p = default_dataset(Path(_tmp.name) / "t.zarr", grid="tiny", days=(4, 1, 1), spinup=20, verbose=False)
_cfg = preset("tiny", out_pad=1)
_one = Era5Dataset(_p, _cfg)
_x, _y = _one[3]
test_eq(_x.shape, (22, 16, 32)); test_eq(_y.shape, (20, 16, 32))
test_eq(_y[-1].abs().max().item(), 0.0)  # the padding target
_q = [Era5Dataset(_p, _cfg, lon_parts=2, lon_index=r // 2, ch_parts=2, ch_index=r % 2) for r in range(4)]
_xs = [d[3][0] for d in _q]
test_eq(torch.cat([torch.cat([_xs[0], _xs[1]]), torch.cat([_xs[2], _xs[3]])], dim=-1), _x)
test_eq(_q[3].in_channels[-3:], ["lsm", "slt", "orography"]); test_eq(_q[3].lon[0], 180.0)

# %% [markdown]
# The training set is z-scored with its own statistics (mean near 0, std near 1 over the split), and
# `denormalize` brings predictions back to physical units:

# %%
_all = torch.stack([_one.get(i)[0] for i in range(len(_one))])
test_close(_all[:, :19].mean((0, 2, 3)), torch.zeros(19), eps=0.1)
test_close(_one.denormalize(_y)[_one.out_channels.index("z500")].mean().item(), 5.5e4, eps=3e3)

# %% [markdown]
# A split too short for the lead is one line naming the store, the split and the fix (here the validation day
# holds 4 times, and a lead of 4 steps needs 5):

# %%
test_fail(lambda: Era5Dataset(_p, _cfg, "val", max_lead=4), contains="split 'val' (store attribute split_val=")
test_fail(lambda: Era5Dataset(_p, _cfg, "val", max_lead=4), contains="too few for a lead of 4 x 6 h (a sample needs 5")


# %% [markdown]
# ## Counting what a rank reads
#
# `CountingStore` wraps a zarr store and counts the bytes and the reads that pass through it, so a test
# can prove that a rank reads only its block.

# %%
#| export
class CountingStore(WrapperStore):
    "A zarr store wrapper that counts bytes and requests read (`nbytes`, `nreads`, `keys`: (key, byte range) pairs)."
    def __init__(self, store):
        super().__init__(store); self.reset()
    def reset(self): self.nbytes, self.nreads, self.keys = 0, 0, []
    def _count(self, key, rng, buf):
        if buf is not None: self.nbytes += len(buf); self.nreads += 1; self.keys.append((key, str(rng)))
        return buf
    async def get(self, key, prototype, byte_range=None):
        return self._count(key, byte_range, await self._store.get(key, prototype, byte_range))
    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        bufs = await self._store.get_partial_values(prototype, key_ranges)
        return [self._count(k, r, b) for (k, r), b in zip(key_ranges, bufs)]

# %%
#| export
def counting_store(path) -> CountingStore:
    "A `CountingStore` over the local zarr store at `path` (read-only)."
    return CountingStore(LocalStore(str(path), read_only=True))


# %%
_cs = counting_store(_p)
_d = [Era5Dataset(_p, _cfg, ch_parts=2, ch_index=r, lon_parts=2, lon_index=0, stats=_one.stats, store=_cs) for r in range(2)]
_cs.reset(); _d[0][5]; _b0 = _cs.nbytes
_cs.reset(); _one_c = Era5Dataset(_p, _cfg, stats=_one.stats, store=_cs); _cs.reset(); _one_c[5]; _b1 = _cs.nbytes
assert 0 < _b0 < 0.5 * _b1, (_b0, _b1)


# %% [markdown]
# ## A synthetic source on the paper's grid
#
# Scale runs (memory, time, checkpoints of the released 238 M to 2.6 B models) need the paper's 720 x 1440 grid
# with the 72 ERA5 channels, but never the data: a year of it is 100 GB. `SyntheticEra5` computes each sample
# on request, **only the block a rank asks for** (its longitudes, its channels), from a closed form:
#
# $$x_c(t, \varphi, \lambda) = \mu_c(\varphi) + \sigma_c \sum_{k=1}^{K} a_{ck}\, P_k(\varphi)\cos(m_k \lambda - \omega_k t + \theta_{ck}),$$
#
# $K = 6$ travelling waves of zonal wavenumbers $m_k$ drifting eastward at about 8 degrees of longitude a
# day, with mid-latitude envelopes $P_k$ (storm tracks at $\pm 45°$ and a tropical band), coefficients
# $a_{ck}, \theta_{ck}$ fixed by the channel's name and the seed (normalised so the wave part has variance
# $\sigma_c^2$). $\mu_c(\varphi)$ and $\sigma_c$ are realistic per channel: geopotential and temperature from the
# standard atmosphere with an equator-to-pole contrast, humidity from 60% of saturation, a westerly jet in $u$,
# 1013 hPa sea-level pressure. It is **not** weather: there is no nonlinearity to learn, only realistic shapes,
# magnitudes and statistics, so memory, bandwidth and time behave as on ERA5. Unknown channel names get
# $\mu = 0$, $\sigma = 1$. The value at a point depends only on the point, the time, the channel and the seed,
# so blocks computed on different ranks stitch to the 1-way sample bit for bit.
#
# The grid is ERA5's 0.25° one cropped like the released code (`lat = 90 - 180 i / n_lat`, 90 .. -89.75 for
# 720 rows), 6-hourly from 2000-01-01, split into `days` of training, validation and test (default 365, 30, 30).
# The path is `synthetic:NLATxNLON`, optionally `:days=TRAIN,VAL,TEST` and `:seed=S`.

# %%
#| export
def parse_synthetic(path: str) -> dict:
    "Grid, days and seed of a `synthetic:NLATxNLON[:days=a,b,c][:seed=s]` data path."
    parts = path.split(":")
    try:
        n_lat, n_lon = (int(x) for x in parts[1].lower().split("x"))
        kw = dict(p.split("=", 1) for p in parts[2:])
        days = tuple(int(x) for x in kw.pop("days", "365,30,30").split(","))
        seed = int(kw.pop("seed", 0))
        if kw or len(days) != 3 or min(days) < 0: raise ValueError
    except (ValueError, IndexError):
        raise DataError(f"{path}: a synthetic data path is 'synthetic:NLATxNLON' with optional ':days=TRAIN,VAL,TEST' and "
                        f"':seed=S', e.g. 'synthetic:720x1440' or 'synthetic:32x64:days=10,2,2:seed=1'") from None
    return dict(n_lat=n_lat, n_lon=n_lon, days=days, seed=seed)

# %%
test_eq(parse_synthetic("synthetic:720x1440"), dict(n_lat=720, n_lon=1440, days=(365, 30, 30), seed=0))
test_eq(parse_synthetic("synthetic:32x64:days=4,1,1:seed=3")["days"], (4, 1, 1))
test_fail(lambda: parse_synthetic("synthetic:720"), contains="'synthetic:NLATxNLON'")

# %% [markdown]
# The climatological profile $\mu_c(\varphi)$ and the spread $\sigma_c$ of a channel, in its physical units:

# %%
#| export
def _std_atm(p):
    "Standard-atmosphere temperature (K) and geopotential (m^2/s^2) at pressure `p` (hPa)."
    x = (p / 1013.25) ** 0.190263
    return max(288.15 * x, 216.65), 9.80665 * 288.15 / 0.0065 * (1 - x)

# %%
#| export
def synthetic_climate(ch: str, lat) -> tuple[np.ndarray, float]:
    "Mean profile `mu(lat)` (lat in degrees) and wave amplitude sigma of channel `ch`, physical units."
    c = canonical(ch); s2 = np.sin(np.deg2rad(lat)) ** 2; cos = np.cos(np.deg2rad(lat))
    head = c if c in SINGLE_LEVEL else c.rstrip("0123456789"); p = float(c[len(head):] or 1000)
    T, Z = _std_atm(p); dT = 40 * min(1.0, p / 500) - 10 * (p < 200)  # equator-to-pole contrast, reversed aloft
    t_mean = T + dT * (1 / 3 - s2)
    es = 611.2 * np.exp(17.67 * (t_mean - 273.15) / (t_mean - 29.65))
    q = 0.6 * 0.622 * es / (p * 100 - 0.378 * es)
    jet = 25 * np.exp(-((np.abs(lat) - 40) / 15) ** 2) * np.exp(-((np.log(p / 250)) ** 2))
    table = {"t": (t_mean, 3.0), "z": (Z + 287.05 * dT * (1 / 3 - s2) * np.log(1013.25 / p), 300 * (1 + (1000 - p) / 500)),
             "q": (q, 0.0), "u": (jet + 3 * cos, 8.0), "v": (0 * lat, 6.0), "msl": (101325 + 0 * lat, 1000.0),
             "t2m": (288 + 45 * (1 / 3 - s2), 4.0), "u10": (3 * cos, 4.0), "v10": (0 * lat, 4.0),
             "lsm": (0 * lat, 0.0), "slt": (0 * lat, 0.0), "orography": (0 * lat, 0.0)}
    mu, sig = table.get(head, (0 * lat, 1.0))
    return np.asarray(mu, np.float64), (float(0.3 * np.average(q, weights=cos)) if head == "q" else sig)

# %%
assert 5.0e4 < synthetic_climate("z500", np.array([45.0]))[0][0] < 5.8e4
test_close(synthetic_climate("t850", np.array([0.0]))[0], 294, eps=3)

# %% [markdown]
# The statics are fixed fields of the grid: a smooth land-sea mask in [0, 1] (continents as bumps), a soil
# type 0 over sea and 1..7 over land, and orography (surface geopotential) over land.

# %%
#| export
def synthetic_static(ch: str, lat, lon) -> np.ndarray:
    "Static channel `ch` ('lsm', 'slt', 'orography'; others 0) at `lat` x `lon` (degrees), float64 (lat, lon)."
    la, lo = np.deg2rad(lat)[:, None], np.deg2rad(lon)[None, :]
    land = 0.5 + 0.5 * np.tanh(4 * (np.sin(2 * lo + 1) * np.cos(la) ** 2 + 0.6 * np.sin(3 * la) - 0.1))
    c = canonical(ch)
    if c == "lsm": return land
    if c == "slt": return np.where(land > 0.5, 1 + np.floor(3.5 * (1 + np.sin(3 * lo) * np.cos(2 * la))).clip(0, 6), 0.0)
    if c == "orography": return 9.80665 * 3000 * land * np.exp(-((la - 0.6) / 0.3) ** 2) * (1 + np.cos(lo - 1.5)) / 2
    return 0 * land

# %% [markdown]
# The waves: the latitude envelopes and wave numbers are shared by every channel; the coefficients come from a
# generator seeded by the channel's name (CRC-32, so they do not depend on Python's hash seed) and the seed.

# %%
#| export
WAVE_M = (1, 3, 4, 5, 6, 8)  # zonal wavenumbers
WAVE_LAT = (45.0, -45.0, 45.0, -45.0, 0.0, 50.0)  # envelope centres, degrees
WAVE_DEG_PER_DAY = 8.0  # eastward drift of every wave


def _envelopes(lat) -> np.ndarray:
    "Wave envelopes `P[k, lat]` (lat in degrees)."
    return np.stack([np.exp(-((np.asarray(lat) - c) / 20) ** 2) for c in WAVE_LAT])

# %%
#| export
def _coefficients(ch: str, seed: int, lat_global) -> tuple[np.ndarray, np.ndarray]:
    "Amplitudes `a[k]` (wave part of unit variance on the global grid) and phases `theta[k]` of channel `ch`."
    g = np.random.default_rng([zlib.crc32(canonical(ch).encode()), seed])
    a, theta = g.standard_normal(len(WAVE_M)), g.uniform(0, 2 * np.pi, len(WAVE_M))
    w = np.cos(np.deg2rad(lat_global)); P = _envelopes(lat_global)
    var = float((np.average(P**2, axis=1, weights=w) * a**2).sum() / 2)  # a cosine's mean square is 1/2
    return a / math.sqrt(var), theta

# %% [markdown]
# `synthetic_field` evaluates the closed form on a block, in float64, with one multiply and one add per wave and
# pixel (no fused or blocked arithmetic, so every pixel's value is the same whichever block computes it):

# %%
#| export
def synthetic_field(ch: str, hours: float, lat, lon, lat_global, seed: int = 0) -> np.ndarray:
    "Channel `ch` at `hours` since the start on the block `lat` x `lon` (degrees), physical units, float64 (lat, lon)."
    mu, sig = synthetic_climate(ch, np.asarray(lat))
    if sig == 0: return mu[:, None] + 0 * np.asarray(lon)[None, :]
    a, theta = _coefficients(ch, seed, lat_global)
    P, lam = _envelopes(lat), np.deg2rad(np.asarray(lon, np.float64))
    out = np.zeros((len(lat), len(lon)))
    for k, m in enumerate(WAVE_M):
        phase = m * (lam - np.deg2rad(WAVE_DEG_PER_DAY) * hours / 24) + theta[k]
        out += P[k][:, None] * (sig * a[k] * np.cos(phase))[None, :]
    return mu[:, None] + out

# %%
_lg = 90 - 180 * np.arange(32) / 32
_f = synthetic_field("t850", 6.0, _lg, np.arange(64) * 5.625, _lg)
test_eq(synthetic_field("t850", 6.0, _lg[3:9], np.arange(10, 20) * 5.625, _lg), _f[3:9, 10:20])  # a block is the same numbers
assert 230 < _f.min() and _f.max() < 320
_wave = np.stack([synthetic_field("t850", h, _lg, np.arange(64) * 5.625, _lg) - synthetic_climate("t850", _lg)[0][:, None]
                  for h in range(0, 24 * 90, 36)])  # the wave part over 90 days
test_close(np.sqrt(np.average((_wave ** 2).mean((0, 2)), weights=np.cos(np.deg2rad(_lg)))), 3.0, eps=0.3)  # sigma of t850

# %% [markdown]
# The dataset: the interface of `Era5Dataset` (`get(i, k)`, `len`, `lat`, `lon`, `times`, `stats`,
# `denormalize`, `in_channels`, `out_channels`, `area_weights`), with statistics known in closed form (the area
# mean of $\mu_c$ and the spread of $\mu_c$ and the waves together), so nothing is ever computed over the data.

# %%
#| export
class SyntheticEra5(Era5Dataset):
    "One rank's block of a synthetic ERA5-like source `synthetic:NLATxNLON`, computed on request (same interface as `Era5Dataset`)."
    def __init__(self, path, cfg: MixerConfig, split="train", lon_parts=1, lon_index=0, ch_parts=1, ch_index=0,
                 max_lead=None, stats=None, member=0, store=None, check="finite"):
        spec = parse_synthetic(path)
        self.path, self.cfg, self.src, self.check, self.seed = path, cfg, str(path), check, spec["seed"]
        if (spec["n_lat"], spec["n_lon"]) != (cfg.n_lat, cfg.n_lon):
            raise DataError(f"{path}: a {spec['n_lat']}x{spec['n_lon']} grid but the model's is {cfg.n_lat}x{cfg.n_lon}; "
                            f"use --data synthetic:{cfg.n_lat}x{cfg.n_lon}")
        if cfg.dt_hours % 6: raise DataError(f"{path}: 6-hourly data, cfg.dt_hours={cfg.dt_hours}; use a multiple of 6")
        b = shard_block(cfg, lon_parts, lon_index, ch_parts, ch_index, self.src)
        self.in_channels, self.out_channels, (c0, c1) = b["inp"], b["out"], b["lon"]
        self.lat_global = 90 - 180 * np.arange(cfg.n_lat) / cfg.n_lat
        self.lat, self.lon = self.lat_global, 360 * np.arange(c0, c1) / cfg.n_lon
        self.area_weights = lat_weights_area(self.lat)
        self.stride, self.max_lead = cfg.dt_hours // 6, cfg.rollout[1] if max_lead is None else max_lead
        self._set_split(self._time_axis(spec["days"]), split)
        self.stats = self._closed_form_stats() if stats is None else stats
        self._statics = self._read_statics(None)
        self._lock = threading.Lock()

# %% [markdown]
# Its time axis (a coordinate-only dataset, so the splits work as for a store) and its statistics:

# %%
#| export
@patch
def _time_axis(self: SyntheticEra5, days) -> xr.Dataset:
    "A coordinate-only dataset with the 6-hourly time axis and the split attributes of `days`."
    t0 = np.datetime64("2000-01-01T00", "ns"); e = np.cumsum([0, *days])
    at = lambda d: str(t0 + np.timedelta64(int(d), "D"))
    self.time_all = t0 + np.timedelta64(6, "h") * np.arange(4 * e[-1])
    return xr.Dataset(coords=dict(time=self.time_all), attrs={f"split_{s}": [at(a), at(b)]
                      for s, a, b in zip(("train", "val", "test"), e[:-1], e[1:])})

# %%
#| export
@patch
def _closed_form_stats(self: SyntheticEra5) -> dict:
    "`{channel: (mean, std)}` of the source: area mean of mu, and the spread of mu and the waves (unit variance times sigma^2)."
    w = np.cos(np.deg2rad(self.lat_global)); out = {}
    for c in self.cfg.variables + self.cfg.statics:
        if c in self.cfg.statics:
            x = synthetic_static(c, self.lat_global, 360 * np.arange(self.cfg.n_lon) / self.cfg.n_lon)
            out[c] = (float(x.mean()), float(x.std())); continue
        mu, sig = synthetic_climate(c, self.lat_global)
        m = float(np.average(mu, weights=w))
        out[c] = (m, math.sqrt(float(np.average((mu - m) ** 2, weights=w)) + sig**2))
    return out

# %% [markdown]
# Reading a block: the statics once, the dynamic channels per sample, and the same value checks as a store.

# %%
#| export
@patch
def _read_statics(self: SyntheticEra5, ds):
    "Z-scored statics of this block, `[n_static_local, n_lat, n_lon_local]`."
    chans = [c for c in self.in_channels if c in self.cfg.statics]
    x = torch.from_numpy(np.stack([synthetic_static(c, self.lat, self.lon) for c in chans]).astype(np.float32)) if chans \
        else torch.zeros(0, self.cfg.n_lat, len(self.lon))
    return normalize(x, chans, self.stats) if self.stats else x

# %%
#| export
@patch
def _read(self: SyntheticEra5, t: int, names: list) -> torch.Tensor:
    "Channels `names` of this block at time index `t`, physical units (computed, not read)."
    x = np.stack([synthetic_field(c, 6.0 * t, self.lat, self.lon, self.lat_global, self.seed) for c in names]).astype(np.float32) \
        if names else np.zeros((0, self.cfg.n_lat, len(self.lon)), np.float32)
    check_values(x, names, self.src, t, str(self.time_all[t]), self.check)
    return torch.from_numpy(x)

# %% [markdown]
# A 2x2 layout on `synthetic:32x64` stitches to the 1-way sample exactly, the normalised inputs are near zero
# mean and unit spread, and `Era5Dataset` given a synthetic path builds this class (how the trainer gets it):

# %%
_sc = preset("tiny", n_lat=32, n_lon=64, out_pad=3)
_s1 = Era5Dataset("synthetic:32x64:days=4,1,1", _sc)
test_eq(type(_s1).__name__, "SyntheticEra5"); test_eq(len(_s1), 4 * 4 - 1)
_sx, _sy = _s1.get(5, 1)
_sq = [Era5Dataset("synthetic:32x64:days=4,1,1", _sc, lon_parts=2, lon_index=r // 2, ch_parts=2, ch_index=r % 2) for r in range(4)]
_b = [d.get(5, 1) for d in _sq]
test_eq(torch.cat([torch.cat([_b[0][0], _b[1][0]]), torch.cat([_b[2][0], _b[3][0]])], -1), _sx)
test_eq(torch.cat([torch.cat([_b[0][1], _b[1][1]]), torch.cat([_b[2][1], _b[3][1]])], -1), _sy)
_xs = torch.stack([_s1.get(i)[0][:19] for i in range(len(_s1))])
assert _xs.mean().abs() < 0.3 and 0.5 < _xs.std() < 1.5, (_xs.mean(), _xs.std())
test_close(_s1.denormalize(_sy)[_s1.out_channels.index("z500")].mean().item(), 5.4e4, eps=2e3)


# %% [markdown]
# ## `jigsaw-stats`: statistics once, before a parallel launch
#
# A reader that finds no statistics computes them itself, on every rank; for a large store compute them once,
# in one process, before launching: `jigsaw-stats STORE` streams the training split once (with a progress bar)
# and writes `<STORE>.stats.json` for **every channel the store has** (or `--channels`/`--statics`, or the
# channels of a preset with `--model`), which any later selection of channels reuses.

# %%
#| export
def stats_main(argv=None) -> int:
    "Entry point of `jigsaw-stats`: compute and save the normalisation statistics of a store."
    ap = argparse.ArgumentParser("jigsaw-stats", description="Compute the per-channel normalisation statistics (mean, std over "
                                 "the training split) of a WeatherBench2-layout store once, before training; saved as "
                                 "<STORE>.stats.json (or under $JIGSAW_DATA/stats/ when the data folder is read-only).")
    ap.add_argument("store", help="zarr store folder or netCDF file")
    ap.add_argument("--channels", default=None, help="comma-separated dynamic channels (e.g. z500,t850,surface_pressure); "
                    "default: every channel the store has, or those of --model")
    ap.add_argument("--statics", default=None, help="comma-separated static channels ('' for none); default: every "
                    "(latitude, longitude) variable of the store, or those of --model")
    ap.add_argument("--model", default=None, help="take the channels of this preset (config.PRESETS, e.g. c3)")
    ap.add_argument("--split", default="train", help="split to compute over: 'train' (default), 'val', 'test'")
    ap.add_argument("--member", type=int, default=0, help="ensemble member, for files that have one (default 0)")
    ap.add_argument("--check", choices=("finite", "range"), default="finite",
                    help="value check: 'finite' (NaN, inf, |x| > 1e30; default) or 'range' (also physical ranges)")
    a = ap.parse_args(argv)
    try:
        ds = open_store(a.store, member=a.member)
        dyn, sta = store_channels(ds)
        if a.model: dyn, sta = list(preset(a.model).variables), list(preset(a.model).statics)
        if a.channels is not None: dyn = [c.strip() for c in a.channels.split(",") if c.strip()]
        if a.statics is not None: sta = [c.strip() for c in a.statics.split(",") if c.strip()]
        if not dyn: raise DataError(f"{a.store}: no dynamic channel to compute; give --channels")
        cfg = MixerConfig(n_lat=ds.sizes["latitude"], n_lon=ds.sizes["longitude"], patch=1, hidden=1, variables=dyn, statics=sta)
        st = compute_stats(a.store, cfg, a.split, a.member, progress=True, check=a.check)
    except Exception as e:
        if not isinstance(e, (DataError, ValueError)): raise
        print(f"jigsaw-stats: error: {e}", file=sys.stderr); return 2
    _, f = _read_stats_file(a.store)
    print(f"jigsaw-stats: {len(st)} channels of {a.store} [{a.split}] -> {f}")
    for c, (m, s) in list(st.items())[:8]: print(f"  {c:>24} mean {m:12.6g}  std {s:12.6g}")
    if len(st) > 8: print(f"  ... and {len(st) - 8} more")
    return 0

# %% [markdown]
# On the tiny store: every channel of the store, then a second run reuses nothing stale; a channel the store
# lacks is an error with exit status 2.

# %%
test_eq(stats_main([str(_p)]), 0)
_ent = json.loads(stats_path(_p).read_text())["entries"]
test_eq(sorted(_ent) == sorted(set(preset("tiny").variables + preset("tiny").statics)), True)
test_eq(_ent["z500"]["fingerprint"]["times"][2], 4 * 4)
test_eq(stats_main([str(_p), "--channels", "z500,w500"]), 2)
test_eq(ensure_stats(_p, preset("tiny"))["z500"], load_stats(_p)["z500"])  # all there: loaded, nothing computed

# %%
_tmp.cleanup()
