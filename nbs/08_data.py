# %%
#| default_exp data

# %%
#| export
from __future__ import annotations
import json, os, threading, uuid
from pathlib import Path
import numpy as np
import torch
import xarray as xr
from zarr.storage import LocalStore, WrapperStore
from jigsaw_ref.config import MixerConfig, shard_range
from jigsaw_ref.generator import ERA5_SHORT, wb2_name

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail
import tempfile
from jigsaw_ref.config import preset
from jigsaw_ref.generator import default_dataset


# %% [markdown]
# # Data
#
# > A lazy, sharded reader for ERA5 in the WeatherBench2 layout (zarr or netCDF): each rank reads only its longitude block and its channels.

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
# raised when the dataset is built (before any collective) wherever the problem is knowable then.

# %%
#| export
class DataError(ValueError):
    "Bad or missing input data; the message names the file, the variable and the fix."


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
# ## Finding a channel in a file
#
# A short channel name maps to a WB2 variable and level (`generator.wb2_name`); a file may use the
# WB2 long name or the ERA5 short name (`z`, `t`, ... as cfgrib writes them). Dynamic variables must
# have dims `(time, [level,] latitude, longitude)`; statics `(latitude, longitude)` (a leading time
# axis of length one, as some ERA5 downloads have, is dropped).

# %%
#| export
def find_channel(ds: xr.Dataset, ch: str, src: str, static: bool = False) -> tuple[str, int | None]:
    "`(variable, level index)` of channel `ch` in `ds`, or a `DataError` saying what is missing."
    if ch.startswith("pad"): raise DataError(f"{src}: channel name {ch!r} is reserved for padding targets")
    try: wb2, level = wb2_name(ch)
    except KeyError as e: raise DataError(f"{src}: {e.args[0]}") from None
    names = [n for n in (wb2, *ERA5_SHORT.get(wb2, ())) if n in ds.data_vars]
    names = [n for n in names if ("level" in ds[n].dims) == (level is not None)] or names
    role = "cfg.statics" if static else "cfg.variables"
    if not names:
        raise DataError(f"{src}: channel {ch!r} needs variable {wb2!r} (or {ERA5_SHORT.get(wb2, ())}), which the "
                        f"file does not have (it has {sorted(ds.data_vars)}); add it or remove {ch!r} from {role}")
    var = names[0]; dims = ds[var].dims
    want = ("latitude", "longitude") if static else ("time",) + (("level",) if level is not None else ()) + ("latitude", "longitude")
    if static and dims[:1] == ("time",) and len(dims) == 3: dims = dims[1:]
    if tuple(dims) != want:
        raise DataError(f"{src}: variable {var!r} (channel {ch!r}) has dims {tuple(ds[var].dims)}, expected {want}; "
                        f"transpose/rename the file's dimensions to the WB2 layout")
    if level is None: return var, None
    levels = [int(round(float(l))) for l in ds[var].level.values]
    if level not in levels:
        raise DataError(f"{src}: variable {var!r} has no level {level} hPa for channel {ch!r} (levels: {levels}); "
                        f"remove {ch!r} from {role} or use a file with that level")
    return var, levels.index(level)


# %% [markdown]
# ## Normalisation statistics
#
# Per-channel mean and standard deviation over every pixel and time of the training split (not
# area-weighted), in one streaming pass: each time step's mean and sum of squared deviations are merged
# into the running totals with Chan's update
# $M_2 \leftarrow M_2 + M_2^{(b)} + \delta^2 \frac{n\,n_b}{n+n_b}$, $\delta = \bar x_b - \bar x$, in float64.
# Statics are z-scored too (orography, soil type), except the land-sea mask (`NO_NORM`), which stays a
# fraction in [0, 1]. The statistics go to a JSON file beside the data (`<path>.stats.json`).

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
# ## Splits and the time axis
#
# A split is `'train'`, `'val'`, `'test'` or a `(start, stop)` pair of dates or of integer time
# indices (stop exclusive). Named splits come from the store's attributes `split_train` etc. (the
# generator writes them); a store without them is cut 80/10/10 in time.

# %%
#| export
def split_indices(ds: xr.Dataset, split, src: str) -> tuple[int, int]:
    "`(start, stop)` time indices of `split` in `ds`."
    times = ds.time.values; n = len(times)
    if isinstance(split, str):
        if f"split_{split}" in ds.attrs: split = tuple(ds.attrs[f"split_{split}"])
        elif split in ("train", "val", "test"):
            a, b = {"train": (0, .8), "val": (.8, .9), "test": (.9, 1.)}[split]
            return int(round(a * n)), int(round(b * n))
        else: raise DataError(f"{src}: unknown split {split!r}; use 'train', 'val', 'test' or (start, stop)")
    start, stop = split
    if isinstance(start, (int, np.integer)): return int(start), int(stop)
    return (int(np.searchsorted(times, np.datetime64(start, "ns"))),
            int(np.searchsorted(times, np.datetime64(stop, "ns"))))


def _grid_rows(ds, n_lat, src):
    "Latitude rows used: all, or all but the last when the file has one more (721 -> 720)."
    nl = ds.sizes["latitude"]
    if nl not in (n_lat, n_lat + 1):
        raise DataError(f"{src}: {nl} latitude rows but cfg.n_lat={n_lat}; set n_lat={nl} (or {nl - 1}, dropping "
                        f"the last row) in the config, or regrid the file")
    return slice(0, n_lat)


# %%
#| export
def stats_path(path) -> Path:
    "Where the normalisation statistics of the data at `path` live."
    return Path(str(Path(path)) + ".stats.json")


def compute_stats(path, cfg: MixerConfig, split="train", member=0, save=True, store=None) -> dict:
    "Per-channel `{name: (mean, std)}` of `cfg.variables + cfg.statics` over `split`, in one streaming pass."
    src = str(path); ds = open_store(path, store, member)
    rows = _grid_rows(ds, cfg.n_lat, src)
    chans = {c: find_channel(ds, c, src) for c in cfg.variables}
    i0, i1 = split_indices(ds, split, src)
    acc = {c: Welford() for c in cfg.variables}
    byvar = {}
    for c, (v, li) in chans.items(): byvar.setdefault(v, []).append((c, li))
    for t in range(i0, i1):
        for v, cl in byvar.items():
            a = ds[v].isel(time=t, latitude=rows).values
            for c, li in cl:
                x = a if li is None else a[li]
                if not np.isfinite(x).all():
                    raise DataError(f"{src}: NaN or inf in {c!r} (variable {v!r}) at {ds.time.values[t]}; fill or drop that time")
                acc[c].add(x)
    out = {c: (w.mean, w.std) for c, w in acc.items()}
    for c in cfg.statics:
        v, _ = find_channel(ds, c, src, static=True)
        x = ds[v].values.reshape(-1, ds.sizes["latitude"], ds.sizes["longitude"])[0][rows]
        out[c] = (float(x.mean()), float(x.std()))
    if save and store is None: save_stats(path, out, (i0, i1))
    return out


def save_stats(path, stats: dict, split=None):
    "Merge `stats` into the JSON file beside `path` (atomic replace)."
    f = stats_path(path); old = load_stats(path) or {}
    old.update(stats)
    tmp = f.with_name(f".{f.name}.{os.getpid()}-{uuid.uuid4().hex[:6]}")
    tmp.write_text(json.dumps({"channels": {k: list(map(float, v)) for k, v in old.items()},
                               "split": None if split is None else list(split)}, indent=1))
    os.replace(tmp, f)


def load_stats(path) -> dict | None:
    "Statistics saved beside `path`, or None."
    f = stats_path(path)
    return {k: tuple(v) for k, v in json.loads(f.read_text())["channels"].items()} if f.exists() else None


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


def normalize(x: torch.Tensor, names, stats) -> torch.Tensor:
    "Z-score channels `names` of `x[..., C, lat, lon]` in physical units."
    m, s = _affine(names, stats, x.dtype); return (x - m) / s


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


# %%
#| export
class Era5Dataset(torch.utils.data.Dataset):
    "One rank's block of ERA5-like samples `(x, y)` from a WB2 zarr store or netCDF file, z-scored."
    def __init__(self, path, cfg: MixerConfig,
                 split="train",  # 'train' | 'val' | 'test' | (start, stop) dates or time indices
                 lon_parts=1, lon_index=0,  # longitude shards and this rank's one
                 ch_parts=1, ch_index=0,  # channel shards and this rank's one
                 max_lead=None,  # largest k that `get` will be asked for (default `cfg.rollout[1]`)
                 stats=None,  # {name: (mean, std)}; None: load beside the data or compute; False: raw units
                 member=0,  # ensemble member, for files that have one
                 store=None):  # zarr store object to read `path` through (e.g. to count bytes)
        self.path, self.cfg, self.src = path, cfg, str(path)
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
        self._dyn = {c: find_channel(ds, c, self.src) for c in cfg.variables
                     if c in self.in_channels or c in self.out_channels}
        self.stride, self.max_lead = self._stride(ds), cfg.rollout[1] if max_lead is None else max_lead
        self.i0, self.i1 = split_indices(ds, split, self.src)
        self.times = ds.time.values[self.i0:self.i1]
        if len(self) <= 0:
            raise DataError(f"{self.src}: split {split!r} has {self.i1 - self.i0} time steps, too few for a lead of "
                            f"{self.max_lead} x {cfg.dt_hours} h; choose a longer split or a smaller max_lead")
        need = list(dict.fromkeys(self.in_channels + [c for c in self.out_channels if not c.startswith("pad")]))
        if stats is None:
            stats = load_stats(path) if store is None else None
            if stats is None or any(c not in stats for c in need):
                stats = compute_stats(path, cfg, member=member, save=store is None, store=store)
        if stats and any(c not in stats for c in need if c not in NO_NORM):
            raise DataError(f"{self.src}: the statistics given lack {[c for c in need if c not in stats]}; "
                            f"pass stats=None to load or compute them with `compute_stats`")
        self.stats = stats
        self._statics = self._read_statics(ds)
        self._lock = threading.Lock()

    def _stride(self, ds):
        t = ds.time.values
        if len(t) < 2: raise DataError(f"{self.src}: only {len(t)} time step(s); need at least two")
        dt = (t[1] - t[0]) / np.timedelta64(1, "h")
        k = self.cfg.dt_hours / dt
        if dt <= 0 or k != int(k) or not np.all(np.diff(t) == t[1] - t[0]):
            raise DataError(f"{self.src}: time step {dt} h (or irregular) does not divide cfg.dt_hours="
                            f"{self.cfg.dt_hours}; set dt_hours to a multiple of the file's step")
        return int(k)

    def __len__(self): return self.i1 - self.i0 - self.max_lead * self.stride
    def __getstate__(self): return {k: v for k, v in self.__dict__.items() if k != "_lock"}  # for DataLoader workers
    def __setstate__(self, d): self.__dict__.update(d); self._lock = threading.Lock()


# %% [markdown]
# Reading: statics once, dynamic channels per sample, both only in this rank's block.

# %%
#| export
def _read_statics(self: Era5Dataset, ds):
    "Z-scored statics of this block, `[n_static_local, n_lat, n_lon_local]`, read once."
    chans = [c for c in self.in_channels if c in self.cfg.statics]
    out = []
    for c in chans:
        v, _ = find_channel(ds, c, self.src, static=True)
        a = ds[v]
        if a.dims[0] == "time": a = a.isel(time=0)
        x = a.isel(**self.sel).values.astype(np.float32)
        if not np.isfinite(x).all(): raise DataError(f"{self.src}: NaN or inf in static {c!r} (variable {v!r}); fill it")
        out.append(x)
    x = torch.from_numpy(np.stack(out)) if out else torch.zeros(0, self.cfg.n_lat, len(self.lon))
    return normalize(x, chans, self.stats) if self.stats else x


def _read(self: Era5Dataset, t: int, names: list) -> torch.Tensor:
    "Channels `names` (dynamic only) of this block at store time index `t`, physical units."
    byvar = {}
    for c in names:
        v, li = self._dyn[c]; byvar.setdefault(v, []).append((c, li))
    got = {}
    for v, cl in byvar.items():  # one read per file variable: levels sharing a chunk come once
        lis = [li for _, li in cl]
        a = self.ds[v].isel(time=t, **self.sel, **({} if lis[0] is None else {"level": lis})).values
        for j, (c, li) in enumerate(cl): got[c] = a if li is None else a[j]
    x = np.stack([got[c] for c in names]).astype(np.float32) if names else np.zeros((0, self.cfg.n_lat, len(self.lon)), np.float32)
    if not np.isfinite(x).all():
        bad = [c for c, a in zip(names, x) if not np.isfinite(a).all()]
        raise DataError(f"{self.src}: NaN or inf in {bad} (variables {[self._dyn[c][0] for c in bad]}) at "
                        f"{self.ds.time.values[t]}; fill the gap or exclude that time with `split`")
    return torch.from_numpy(x)


def get(self: Era5Dataset, i: int, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    "Input at split time index `i` and target `k` steps later: `x[C_in_local, lat, lon_local]`, `y[V_out_local, lat, lon_local]`."
    if not 0 <= i < len(self) or not 1 <= k <= self.max_lead:
        raise IndexError(f"sample {i} (of {len(self)}), lead {k} (1..{self.max_lead})")
    t = self.i0 + i
    dyn_in = [c for c in self.in_channels if c not in self.cfg.statics]
    real_out = [c for c in self.out_channels if not c.startswith("pad")]
    with self._lock:  # xarray's lazy arrays are not thread-safe to index concurrently
        xd, yd = _read(self, t, dyn_in), _read(self, t + k * self.stride, real_out)
    if self.stats: xd, yd = normalize(xd, dyn_in, self.stats), normalize(yd, real_out, self.stats)
    y = torch.zeros(len(self.out_channels), *yd.shape[1:]); y[:len(real_out)] = yd  # padding targets are 0
    return torch.cat([xd, self._statics]), y


Era5Dataset._read_statics = _read_statics
Era5Dataset.get = get
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


def counting_store(path) -> CountingStore:
    "A `CountingStore` over the local zarr store at `path` (read-only)."
    return CountingStore(LocalStore(str(path), read_only=True))


# %%
_cs = counting_store(_p)
_d = [Era5Dataset(_p, _cfg, ch_parts=2, ch_index=r, lon_parts=2, lon_index=0, stats=_one.stats, store=_cs) for r in range(2)]
_cs.reset(); _d[0][5]; _b0 = _cs.nbytes
_cs.reset(); _one_c = Era5Dataset(_p, _cfg, stats=_one.stats, store=_cs); _cs.reset(); _one_c[5]; _b1 = _cs.nbytes
assert 0 < _b0 < 0.5 * _b1, (_b0, _b1)

# %%
_tmp.cleanup()
