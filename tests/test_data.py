"""Default data generator and sharded ERA5 reader: physics, determinism, exact stitching, bytes read per rank, bad input."""
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from jigsaw_ref.config import CPU_CHANNELS, preset, split_sizes
from jigsaw_ref.data import (BadSampleError, DataError, Era5Dataset, compute_stats, counting_store, denormalize,
                             load_stats, stats_path)
from jigsaw_ref.config import wb2_name
from jigsaw_ref.generator import TwoLayerQG, default_dataset, simulate, step, write_zarr

ERA5_NC = Path(__file__).parent / "data" / "era5-levels-members-2.nc"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    "Tiny grid (16 x 32, sampled from T21), 40 days spin-up (eddies developed), 6 + 2 + 2 days."
    return default_dataset(tmp_path_factory.mktemp("gen") / "tiny.zarr", grid="tiny", days=(6, 2, 2),
                           spinup=40, verbose=False)


@pytest.fixture(scope="module")
def fields(store):
    ds = xr.open_zarr(store, consolidated=False)
    return {c: (ds[wb2_name(c)[0]].sel(level=wb2_name(c)[1]) if wb2_name(c)[1] else ds[wb2_name(c)[0]]).values.astype(np.float64)
            for c in CPU_CHANNELS}


# ---------------------------------------------------------------- generator

def test_generator_is_bitwise_deterministic_for_a_seed():
    a = simulate(16, 32, days=(1, 0, 0), spinup=3, seed=7)
    b = simulate(16, 32, days=(1, 0, 0), spinup=3, seed=7)
    c = simulate(16, 32, days=(1, 0, 0), spinup=3, seed=8)
    for v in a.data_vars:
        assert np.array_equal(a[v].values, b[v].values), v
    assert not np.array_equal(a.geopotential.values, c.geopotential.values)


def test_generator_fields_are_finite_varying_and_physical(fields):
    ranges = {"msl": (9.0e4, 1.1e5), "t2m": (200, 330), "z850": (0.3e4, 2.5e4), "z500": (4.0e4, 6.2e4),
              "z250": (7.5e4, 1.15e5), "t850": (220, 320), "t500": (200, 300), "t250": (180, 280),
              "q850": (0, 0.03), "q500": (0, 0.012), "q250": (0, 0.002)}
    for c, x in fields.items():
        assert np.isfinite(x).all(), c
        assert x.std() > 0, c
        lo, hi = ranges.get(c, (-150, 150))  # winds, m/s
        assert lo <= x.min() and x.max() <= hi, (c, x.min(), x.max())
    assert 4.8e4 < fields["z500"].mean() < 5.9e4 and 1e-3 < fields["q850"].mean() < 1e-2
    assert fields["u250"].mean(axis=(0, 2)).max() > 10  # a westerly jet aloft
    assert fields["z500"].std(axis=0).mean() > 50  # eddies: the field changes in time at each point


def test_persistence_is_not_trivial(fields):
    "The 24 h change has an RMSE that is a meaningful fraction of the field's (space-time) std."
    for c in ("z500", "t850", "u250", "v850", "msl", "q850"):
        x = fields[c]
        rmse24 = np.sqrt(((x[4:] - x[:-4]) ** 2).mean())
        assert rmse24 > 0.05 * x.std(), (c, rmse24 / x.std())


def test_model_speed_per_simulated_day_is_measured():
    m = TwoLayerQG(L=10, nlat=16, nlon=32)
    t = time.perf_counter()
    for _ in range(24): step(m, 3600.0)
    s_day = time.perf_counter() - t
    print(f"T10 model: {s_day:.3f} s per simulated day")
    assert s_day < 10


def test_default_dataset_is_atomic_and_reused(tmp_path, monkeypatch):
    import jigsaw_ref.generator as gen
    def boom(ds, path, **kw):
        Path(path).mkdir(); (Path(path) / "half").write_text("x"); raise RuntimeError("disk full")
    monkeypatch.setattr(gen, "write_zarr", boom)
    p = tmp_path / "d.zarr"
    with pytest.raises(RuntimeError, match="disk full"):
        gen.default_dataset(p, grid="tiny", days=(1, 0, 0), spinup=1, verbose=False)
    assert not p.exists() and list(tmp_path.iterdir()) == []  # no half store, no temp folder left
    monkeypatch.setattr(gen, "write_zarr", write_zarr)
    monkeypatch.setenv("JIGSAW_DATA", str(tmp_path / "cache"))
    q = gen.default_dataset(grid="tiny", days=(1, 0, 0), spinup=1, verbose=False)
    assert q.parent == tmp_path / "cache" and (q / "zarr.json").exists()
    t = (q / "zarr.json").stat().st_mtime_ns
    assert gen.default_dataset(grid="tiny", days=(1, 0, 0), spinup=1, verbose=False) == q
    assert (q / "zarr.json").stat().st_mtime_ns == t


# ---------------------------------------------------------------- reader: exact sharding

def _stitch(store, cfg, ch_parts, lon_parts, i=2, k=1):
    parts = {}
    stats = Era5Dataset(store, cfg).stats
    for c in range(ch_parts):
        for l in range(lon_parts):
            d = Era5Dataset(store, cfg, lon_parts=lon_parts, lon_index=l, ch_parts=ch_parts, ch_index=c, stats=stats)
            parts[c, l] = d.get(i, k)
    x = torch.cat([torch.cat([parts[c, l][0] for l in range(lon_parts)], -1) for c in range(ch_parts)], 0)
    y = torch.cat([torch.cat([parts[c, l][1] for l in range(lon_parts)], -1) for c in range(ch_parts)], 0)
    return x, y


@pytest.mark.parametrize("out_pad,ch_parts,lon_parts", [(0, 1, 1), (0, 2, 1), (0, 2, 2), (3, 2, 2), (1, 2, 3), (0, 4, 1)])
def test_sharded_samples_stitch_to_the_one_way_sample(store, out_pad, ch_parts, lon_parts):
    cfg = preset("tiny", out_pad=out_pad, rollout=(1, 2))  # 19 outputs over 2 shards: 10 + 9 (uneven)
    x1, y1 = Era5Dataset(store, cfg).get(2, 2)
    x, y = _stitch(store, cfg, ch_parts, lon_parts, 2, 2)
    assert torch.equal(x, x1) and torch.equal(y, y1)
    assert x1.shape == (cfg.n_in, 16, 32) and y1.shape == (cfg.n_out, 16, 32) and x1.dtype == torch.float32
    if out_pad: assert y1[cfg.n_vars:].abs().max() == 0


def test_blocks_and_names(store):
    cfg = preset("tiny", out_pad=3)
    d = Era5Dataset(store, cfg, lon_parts=2, lon_index=1, ch_parts=2, ch_index=1)
    assert d.in_channels == list((cfg.variables + cfg.statics)[11:])
    assert d.out_channels == list(cfg.variables[11:]) + ["pad0", "pad1", "pad2"]
    assert d.lon.tolist() == (180 + 11.25 * np.arange(16)).tolist()
    assert len(d.lat) == 16 and np.all(np.diff(d.lat) > 0) and len(d.times) == 6 * 4
    assert len(d) == 6 * 4 - 1 and torch.equal(d[0][0], d.get(0, 1)[0])


def test_targets_are_k_steps_later(store):
    cfg = preset("tiny", rollout=(1, 3))
    d = Era5Dataset(store, cfg)
    assert len(d) == 24 - 3
    assert torch.equal(d.get(5, 3)[1], d.get(8, 1)[0][:cfg.n_vars])


def test_normalisation_round_trip_and_stats_file(store):
    cfg = preset("tiny")
    d = Era5Dataset(store, cfg)
    s = load_stats(store)
    assert stats_path(store).exists() and set(cfg.variables + cfg.statics) <= set(s)
    x = torch.stack([d.get(i)[0] for i in range(len(d))])
    assert x[:, :cfg.n_vars].mean((0, 2, 3)).abs().max() < 0.15  # training split z-scored
    assert (x[:, :cfg.n_vars].std((0, 2, 3)) - 1).abs().max() < 0.15
    lsm = x[0, cfg.n_in - 3]
    assert 0 <= lsm.min() and lsm.max() <= 1  # the land-sea mask is not z-scored
    raw = Era5Dataset(store, cfg, stats=False)
    torch.testing.assert_close(d.denormalize(d.get(4)[1]), raw.get(4)[1], rtol=1e-5, atol=1e-3)
    t = compute_stats(store, cfg, save=False)
    np.testing.assert_allclose(t["z500"], s["z500"])


def test_either_latitude_order(store, tmp_path):
    ds = xr.open_zarr(store, consolidated=False)
    p = tmp_path / "flip.zarr"
    ds.isel(latitude=slice(None, None, -1)).to_zarr(p, zarr_format=3, consolidated=False)
    cfg = preset("tiny")
    a, b = Era5Dataset(store, cfg, stats=False), Era5Dataset(p, cfg, stats=False)
    assert np.array_equal(a.lat[::-1], b.lat) and b.lat[0] > 0
    assert torch.equal(a[3][0].flip(-2), b[3][0])


def test_pickles_for_dataloader_workers(store):
    import pickle
    d = Era5Dataset(store, preset("tiny"), lon_parts=2, lon_index=1)
    e = pickle.loads(pickle.dumps(d))
    assert torch.equal(d[2][0], e[2][0])


def test_validation_split_is_disjoint_in_time(store):
    cfg = preset("tiny")
    tr, va, te = (Era5Dataset(store, cfg, split=s) for s in ("train", "val", "test"))
    assert tr.times[-1] < va.times[0] and va.times[-1] < te.times[0] and len(va) == 2 * 4 - 1


# ---------------------------------------------------------------- reader: bytes actually read

def _bytes_per_sample(store, cfg, ch_parts, lon_parts, stats, i=5):
    out = []
    for c in range(ch_parts):
        for l in range(lon_parts):
            cs = counting_store(store)
            d = Era5Dataset(store, cfg, lon_parts=lon_parts, lon_index=l, ch_parts=ch_parts, ch_index=c,
                            stats=stats, store=cs)
            cs.reset(); d[i]
            out.append((l * ch_parts + c, cs.nbytes, cs.nreads))
    return out


def test_each_rank_reads_only_its_share(store):
    cfg = preset("tiny")
    stats = Era5Dataset(store, cfg).stats
    (_, one, n1), = _bytes_per_sample(store, cfg, 1, 1, stats)
    for chp, lonp in ((2, 1), (2, 2)):
        ranks = _bytes_per_sample(store, cfg, chp, lonp, stats)
        for r, b, n in ranks:
            print(f"{chp * lonp}-way rank {r}: {b} bytes in {n} reads (1-way: {one} bytes in {n1} reads)")
            # a rank reads about 1/(ch*lon) of the sample, never the whole of it
            assert b < one * (1.0 / lonp) * 0.85, (chp, lonp, r, b, one)
        assert sum(b for _, b, _ in ranks) < 1.6 * one  # no rank reads another's block


def _reads(store, cfg, chp, lonp, stats, i=5):
    "Per rank: the set of (file, byte range) data reads and the shard-index reads of sample `i`."
    out = []
    for r in range(chp * lonp):
        cs = counting_store(store)
        d = Era5Dataset(store, cfg, lon_parts=lonp, lon_index=r // chp, ch_parts=chp, ch_index=r % chp, stats=stats, store=cs)
        cs.reset(); d[i]
        out.append(set(cs.keys))
    return out


@pytest.mark.parametrize("chp,lonp", [(2, 1), (2, 2), (1, 2)])
def test_ranks_read_disjoint_chunks_whose_union_is_the_one_way_read(store, chp, lonp):
    cfg = preset("tiny")
    stats = Era5Dataset(store, cfg).stats
    (one,) = _reads(store, cfg, 1, 1, stats)
    ranks = _reads(store, cfg, chp, lonp, stats)
    index = lambda ks: {k for k in ks if "Suffix" in k[1]}  # shard indexes: every rank reads those of its files
    data = [ks - index(ks) for ks in ranks]
    assert set().union(*data) == one - index(one)  # together the ranks read exactly the 1-way chunks
    # a chunk holds all levels of a variable, so a channel cut inside a variable (t850 | t500) makes
    # both channel neighbours read that chunk; any other chunk is read by one rank only
    blocks = [Era5Dataset(store, cfg, ch_parts=chp, ch_index=c, stats=stats) for c in range(chp)]
    var = lambda chans: {wb2_name(c)[0] for c in chans if c not in cfg.statics}
    cut = set()
    for a in range(chp):
        for b in range(a + 1, chp):
            cut |= (var(blocks[a].in_channels) & var(blocks[b].in_channels)) | (var(blocks[a].out_channels) & var(blocks[b].out_channels))
    for a in range(len(data)):
        for b in range(a + 1, len(data)):
            shared = {k[0].split("/")[0] for k in data[a] & data[b]}
            assert shared <= cut, (a, b, shared, cut)
            if lonp > 1 and a // chp != b // chp: assert not shared  # longitude neighbours share nothing


def test_default_layout_bytes_report(store):
    "Per-rank bytes read per sample, 1/2/4-way (printed with -s): each rank reads about its share, the ranks together about the 1-way read."
    cfg = preset("tiny")
    stats = Era5Dataset(store, cfg).stats
    got = {}
    for chp, lonp in ((1, 1), (2, 1), (2, 2)):
        got[chp * lonp] = [b for _, b, _ in _bytes_per_sample(store, cfg, chp, lonp, stats)]
        print(chp * lonp, "-way", got[chp * lonp])
    (one,) = got[1]
    assert one > 0 and len(got[2]) == 2 and len(got[4]) == 4
    # a chunk holds every level of a variable, so a channel cut inside one variable is read by both halves:
    # each 2-way rank reads well under the whole sample, and the 4-way ranks about a quarter each
    assert all(0 < b < 0.75 * one for b in got[2]), got
    assert all(0 < b < 0.4 * one for b in got[4]), got
    assert sum(got[4]) < 1.6 * one and sum(got[2]) < 1.6 * one, got  # nothing is read twice but the cut variable


# ---------------------------------------------------------------- real ERA5 (cfgrib sample)

ERA5_CFG = dict(n_lat=60, n_lon=120, patch=6, hidden=8, variables=("z500", "z850", "t500", "t850"), statics=(),
                dt_hours=12)


def test_real_era5_netcdf_sample():
    cfg = preset("tiny", **ERA5_CFG)
    d = Era5Dataset(ERA5_NC, cfg, split=(0, 4), stats=False)
    assert len(d) == 3 and d.lat[0] == 90 and d.lat[-1] == -87  # file order kept, -90 row dropped (61 -> 60)
    x, y = d[0]
    assert x.shape == (4, 60, 120)
    z500, z850, t500, t850 = x
    assert 4.6e4 < z500.min() and z500.max() < 6.0e4 and 0.5e4 < z850.min() and z850.max() < 1.7e4
    assert 200 < t500.min() and t500.max() < 280 and 220 < t850.min() and t850.max() < 310
    assert z500[30].mean() > z500[5].mean()  # higher near the equator than at 75N
    ref = xr.open_dataset(ERA5_NC).isel(number=1, time=1).z.sel(isobaricInhPa=500).values[:60, :60]
    d1 = Era5Dataset(ERA5_NC, cfg, split=(0, 4), stats=False, member=1, lon_parts=2, lon_index=0)
    np.testing.assert_array_equal(d1.get(0, 1)[1][0].numpy(), ref.astype(np.float32))


def test_real_era5_normalised():
    cfg = preset("tiny", **ERA5_CFG)
    d = Era5Dataset(ERA5_NC, cfg, split=(0, 4), stats=compute_stats(ERA5_NC, cfg, split=(0, 4), save=False))
    x, _ = d[1]
    assert x.mean().abs() < 0.5 and 0.5 < x.std() < 1.5


# ---------------------------------------------------------------- bad input

def _write(ds, tmp_path, name="bad.zarr"):
    p = tmp_path / name
    ds.to_zarr(p, zarr_format=3, consolidated=False)
    return p


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.zarr: no such file.*default_dataset"):
        Era5Dataset(tmp_path / "nope.zarr", preset("tiny"))


def test_unreadable_file(tmp_path):
    p = tmp_path / "junk.nc"; p.write_bytes(b"not a netcdf file at all")
    with pytest.raises(DataError, match=r"junk\.nc: cannot be read"):
        Era5Dataset(p, preset("tiny"))


def test_missing_variable_and_level(store, tmp_path):
    ds = xr.open_zarr(store, consolidated=False)
    p = _write(ds.drop_vars("specific_humidity"), tmp_path)
    with pytest.raises(DataError, match=r"bad\.zarr: channel 'q850' needs variable 'specific_humidity'.*remove 'q850'"):
        Era5Dataset(p, preset("tiny"), stats=False)
    cfg = preset("tiny", variables=CPU_CHANNELS[:4] + ("z700",))
    with pytest.raises(DataError, match=r"'geopotential' has no level 700 hPa for channel 'z700'"):
        Era5Dataset(store, cfg, stats=False)
    with pytest.raises(DataError, match=r"channel 'lsm' needs variable 'land_sea_mask'.*cfg\.statics \(--set statics=slt,orography\)"):
        Era5Dataset(_write(ds.drop_vars("land_sea_mask"), tmp_path, "b2.zarr"), preset("tiny"), stats=False)


def test_wrong_dims_and_grid(store, tmp_path):
    ds = xr.open_zarr(store, consolidated=False)
    p = _write(ds.transpose("time", "level", "longitude", "latitude"), tmp_path)
    with pytest.raises(DataError, match=r"'mean_sea_level_pressure' \(channel 'msl'\) has dims \('time', 'longitude', 'latitude'\).*transpose"):
        Era5Dataset(p, preset("tiny"), stats=False)
    with pytest.raises(DataError, match=r"16 latitude rows but cfg.n_lat=32"):
        Era5Dataset(store, preset("small"), stats=False)
    with pytest.raises(DataError, match=r"32 longitudes but cfg.n_lon=64"):
        Era5Dataset(store, preset("tiny", n_lon=64), stats=False)


def test_layout_that_cannot_divide_the_grid(store):
    with pytest.raises(DataError, match=r"lon_parts=16 cannot divide 8 longitude patches"):
        Era5Dataset(store, preset("tiny"), lon_parts=16)
    with pytest.raises(DataError, match=r"ch_index=2 is not in \[0, 2\)"):
        Era5Dataset(store, preset("tiny"), ch_parts=2, ch_index=2)


def test_nan_in_a_sample(store, tmp_path):
    ds = xr.open_zarr(store, consolidated=False).load()
    ds["temperature"][3, 1, 4, 5] = np.nan  # time 3, level 500
    p = _write(ds, tmp_path)
    d = Era5Dataset(p, preset("tiny"), stats=Era5Dataset(store, preset("tiny")).stats)
    d[0]  # fine
    with pytest.raises(BadSampleError, match=r"bad\.zarr: NaN or inf in 't500' \(variable 'temperature'\) at time index 3 ") as e:
        d[3]
    assert (e.value.variable, e.value.time_index, e.value.store) == ("temperature", 3, str(p))
    with pytest.raises(DataError, match=r"NaN or inf in 't500'"):
        compute_stats(p, preset("tiny"), save=False)


def test_stats_that_lack_a_channel(store):
    with pytest.raises(DataError, match=r"statistics given lack \['msl'"):
        Era5Dataset(store, preset("tiny"), stats={"z500": (5e4, 1e3)})


def test_time_step_mismatch():
    with pytest.raises(DataError, match=r"time step 12 h does not divide cfg.dt_hours=6; set dt_hours to a multiple of 12 h \(--set dt_hours=12\)"):
        Era5Dataset(ERA5_NC, preset("tiny", **{**ERA5_CFG, "dt_hours": 6}), stats=False)



# ---------------------------------------------------------------- your own data: any variable, one message, weights

def _small(store, t=slice(0, 16)):
    "A loaded copy of the first times of the tiny store, without split attributes or encodings."
    ds = xr.open_zarr(store, consolidated=False).isel(time=t).load()
    ds.attrs = {}
    for v in ds.variables: ds[v].encoding = {}
    return ds


def test_any_store_variable_is_a_channel_with_a_default_weight(store, tmp_path):
    from jigsaw_ref.loss import DEFAULT_WEIGHT, variable_weights
    ds = _small(store)
    ds["surface_pressure"] = ds["mean_sea_level_pressure"] * 0.98  # a WB2 variable the project does not know
    ds["vertical_velocity"] = ds["u_component_of_wind"] * 0.01  # a pressure-level one
    p = _write(ds, tmp_path)
    cfg = preset("tiny", variables=CPU_CHANNELS + ("surface_pressure", "vertical_velocity@500"))
    d = Era5Dataset(p, cfg)
    x, y = d.get(2)
    assert x.shape == (cfg.n_in, 16, 32) and torch.isfinite(x).all()
    raw = Era5Dataset(p, cfg, stats=False)
    i = cfg.variables.index("vertical_velocity@500")
    u500 = raw.get(2)[0][cfg.variables.index("u500")]
    torch.testing.assert_close(raw.get(2)[0][i], u500 * 0.01)  # the right level of the right variable
    assert {"surface_pressure", "vertical_velocity@500"} <= set(load_stats(p))
    w = variable_weights(cfg)
    assert w[-2] == DEFAULT_WEIGHT == w[-1] == 1.0  # documented default for channels outside the recipe
    assert variable_weights(cfg.replace(loss_weights="surface_pressure=6"))[-2] == 6.0  # overridable


def test_every_missing_channel_is_in_one_message_with_the_settings_that_fix_it(store, tmp_path):
    p = _write(_small(store).drop_vars(["temperature", "land_sea_mask"]), tmp_path)
    with pytest.raises(DataError) as e:
        Era5Dataset(p, preset("tiny"))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{p}: channel 't850' needs variable 'temperature'")
    for c in ("'t850'", "'t500'", "'t250'", "'lsm'"):
        assert c in msg
    assert "(4 channel(s) cannot be read)" in msg
    assert "--set variables=msl,u10,v10,t2m,z850,z500,z250,q850,q500,q250,u850,u500,u250,v850,v500,v250" in msg
    assert "--set statics=slt,orography" in msg


def _gaussian_store(store, tmp_path, n=16, **extra):
    "The tiny store's fields relabelled onto the n Gaussian latitudes (north to south, rounded as files store them)."
    ds = _small(store, slice(0, 8))
    mu, _ = np.polynomial.legendre.leggauss(n)
    ds = ds.assign_coords(latitude=np.round(np.rad2deg(np.arcsin(mu))[::-1], 4))
    return _write(ds.assign(**extra), tmp_path, "gauss.zarr")


def test_latitude_weights_of_a_gaussian_grid_are_its_quadrature_weights(store, tmp_path):
    from jigsaw_ref.loss import lat_weights_area
    _, w = np.polynomial.legendre.leggauss(16)
    d = Era5Dataset(_gaussian_store(store, tmp_path), preset("tiny"), split=(0, 8), stats=False)
    np.testing.assert_allclose(d.area_weights.numpy(), w[::-1] / w.mean(), rtol=1e-10)
    # equal-spacing edges would be 1.8% off at the polar rows
    lat = d.lat
    d_eq = abs(lat[1] - lat[0])
    eq = np.sin(np.deg2rad(np.clip(lat + d_eq / 2, -90, 90))) - np.sin(np.deg2rad(np.clip(lat - d_eq / 2, -90, 90)))
    assert abs(eq[0] / eq.mean() / (w[-1] / w.mean()) - 1) > 0.015
    assert torch.allclose(lat_weights_area(lat), d.area_weights)  # what the trainer computes from `lat`


def test_latitude_weights_the_store_carries_win(store, tmp_path):
    gw = np.linspace(1, 2, 16)
    p = _gaussian_store(store, tmp_path, gw=("latitude", gw))
    d = Era5Dataset(p, preset("tiny"), split=(0, 8), stats=False)
    np.testing.assert_allclose(d.area_weights.numpy(), gw / gw.mean(), rtol=1e-12)


# ---------------------------------------------------------------- splits: one line, on every rank

@pytest.fixture(scope="module")
def four_times(store, tmp_path_factory):
    "A 4-time store with only a training split, like the ERA5 tutorial's."
    ds = _small(store, slice(0, 4))
    ds.attrs = {"split_train": [str(ds.time.values[0])[:19], str(ds.time.values[2])[:19]]}
    p = tmp_path_factory.mktemp("short") / "four.zarr"
    ds.to_zarr(p, consolidated=False)
    return p


@pytest.mark.parametrize("split,lead,msg", [
    ("test", 1, r"split 'test' \(the store has no attribute split_test, so 'test' is the default last 10% of its 4 times\) is empty"),
    ("train", 2, r"split 'train' \(store attribute split_train=.*\) has 2 time step\(s\).*too few for a lead of 2 x 6 h "
                 r"\(a sample needs 3 consecutive times\); choose a longer split .* or fewer leads \(at most 1 here\)"),
    ((5, 9), 1, r"split \(5, 9\).* is empty"),
    (("2001-01-01", "2001-02-01"), 1, r"is empty: no time of the store \(2000-01-01T00:00:00.000000000 .. "),
])
def test_short_and_empty_splits_are_one_line_errors_on_every_rank(four_times, split, lead, msg):
    from jigsaw_ref.ranks import run_ranks
    cfg = preset("tiny", rollout=(1, lead))

    def rank(comm):
        r = comm.Get_rank()
        try: Era5Dataset(four_times, cfg, split, lon_parts=2, lon_index=r // 2, ch_parts=2, ch_index=r % 2, stats=False)
        except DataError as e: return str(e)
        return None

    got = run_ranks(4, rank)
    assert all(m is not None for m in got), got  # every rank refuses, none waits
    assert len(set(got)) == 1 and "\n" not in got[0] and got[0].startswith(f"{four_times}: ")
    assert __import__("re").search(msg, got[0]), got[0]


# ---------------------------------------------------------------- statistics that know their data

def test_stale_statistics_are_recomputed_with_a_message(store, tmp_path, capsys):
    ds = _small(store)
    p = _write(ds, tmp_path)
    cfg = preset("tiny")
    s1 = Era5Dataset(p, cfg).stats
    assert load_stats(p)["t850"] == pytest.approx(s1["t850"])
    ds["temperature"] = ds["temperature"] + 30.0  # new data under the same path
    ds[["temperature"]].to_zarr(p, mode="a", consolidated=False)
    capsys.readouterr()
    s2 = Era5Dataset(p, cfg).stats
    err = capsys.readouterr().err
    assert s2["t850"][0] == pytest.approx(s1["t850"][0] + 30, rel=1e-5)  # not the stale mean
    assert s2["z500"] == pytest.approx(s1["z500"])
    assert "were computed from other data (temperature: file sizes or modification times)" in err and "t850" in err
    # an old statistics file without fingerprints is never trusted
    stats_path(p).write_text(json.dumps({"channels": {"t850": [0.0, 1.0]}, "split": [0, 12]}))
    assert load_stats(p) == {} and Era5Dataset(p, cfg).stats["t850"] == pytest.approx(s2["t850"])


def test_a_read_only_data_folder_sends_the_statistics_to_the_cache(store, tmp_path, monkeypatch, capsys):
    import errno
    import jigsaw_ref.data as data
    p = _write(_small(store), tmp_path)
    monkeypatch.setenv("JIGSAW_DATA", str(tmp_path / "cache"))
    real = data._write_json
    def ro(f, obj):
        if Path(f).parent == tmp_path: raise OSError(errno.EROFS, "Read-only file system", str(f))
        return real(f, obj)
    monkeypatch.setattr(data, "_write_json", ro)
    s = Era5Dataset(p, preset("tiny")).stats
    f = data.stats_fallback_path(p)
    assert f.exists() and f.parent == tmp_path / "cache" / "stats" and not stats_path(p).exists()
    assert f"{tmp_path} is not writable (Read-only file system); statistics written to {f}" in capsys.readouterr().err
    assert load_stats(p)["z500"] == pytest.approx(s["z500"])  # found there next time
    monkeypatch.setattr(data, "_write_json", lambda f, obj: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system")))
    with pytest.raises(DataError, match=rf"{p}: cannot write the statistics file {stats_path(p)} \(Read-only file system\) "
                                        rf"nor {f} \(Read-only file system\); set JIGSAW_DATA to a writable folder"):
        data.save_stats(p, {})


# ---------------------------------------------------------------- time axis

@pytest.mark.parametrize("fix,msg", [
    (lambda ds: ds.assign_coords(time=np.arange(ds.sizes["time"])), r"holds int64 numbers, not datetimes"),
    (lambda ds: ds.isel(time=[0, 1, 3, 2, 4, 5, 6, 7]), r"goes backwards at time index 3 \(.*T18.* then .*T12.*\).*sort them"),
    (lambda ds: ds.isel(time=[0, 1, 2, 2, 3, 4, 5, 6]), r"appears twice \(time indices 2 and 3\).*drop_duplicates"),
    (lambda ds: ds.isel(time=slice(None, None, -1)), r"the time axis is descending.*sortby"),
    (lambda ds: ds.isel(time=[0, 1, 2, 4, 5, 6, 7]), r"the time step changes at time index 3: 6 h before, 12 h"),
])
def test_a_bad_time_axis_names_the_position_and_the_fix(store, tmp_path, fix, msg):
    ds = fix(_small(store, slice(0, 8)))
    p = tmp_path / "t.zarr"
    ds.to_zarr(p, consolidated=False, encoding={"time": {"dtype": "int64"}} if ds.time.dtype.kind == "i" else None)
    with pytest.raises(DataError, match=msg) as e:
        Era5Dataset(p, preset("tiny"), split=(0, 8), stats=False)
    assert "dt_hours" not in str(e.value)  # never the wrong fix


# ---------------------------------------------------------------- corrupt chunks, physical ranges

def _copy(store, tmp_path):
    import shutil
    q = tmp_path / "copy.zarr"
    shutil.copytree(store, q)
    return q


def test_generated_chunks_carry_checksums_and_a_flipped_byte_is_a_bad_sample(store, tmp_path):
    meta = json.loads((store / "temperature" / "zarr.json").read_text())["codecs"][0]["configuration"]
    assert [c["name"] for c in meta["codecs"]] == ["bytes", "zstd", "crc32c"]
    q = _copy(store, tmp_path)
    cfg = preset("tiny")
    d = Era5Dataset(q, cfg, stats=Era5Dataset(store, cfg).stats)
    shard = q / "temperature" / "c" / "1" / "0" / "0" / "0"  # one file per day: times 4..7; its first chunk: time 4, lon 0-90
    b = bytearray(shard.read_bytes()); b[40] ^= 0x10; shard.write_bytes(bytes(b))
    d[0]  # other days are fine
    with pytest.raises(BadSampleError, match=rf"cannot read variable 'temperature' at time index 4 \(.*\): {shard} is corrupt "
                                             r"or truncated \(its checksum does not match\); restore") as e:
        d[4]
    assert (e.value.variable, e.value.time_index, e.value.file) == ("temperature", 4, str(shard))
    assert Era5Dataset(q, cfg, stats=d.stats, lon_parts=2, lon_index=1).get(4)[0].shape == (22, 16, 16)  # other chunks of that file are fine


def test_a_truncated_chunk_is_one_line_with_file_variable_and_time(store, tmp_path):
    q = _copy(store, tmp_path)
    cfg = preset("tiny")
    d = Era5Dataset(q, cfg, stats=Era5Dataset(store, cfg).stats, lon_parts=2, lon_index=1)
    shard = q / "geopotential" / "c" / "2" / "0" / "0" / "0"  # times 8..11
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(BadSampleError) as e:
        d.get(8)
    assert str(shard) in str(e.value) and "'geopotential' at time index 8" in str(e.value) and "\n" not in str(e.value)


def test_values_outside_physical_ranges_are_refused_with_the_range_check(store, tmp_path):
    ds = _small(store)
    ds["temperature"][6, 2, 3, 4] = 400.0  # time 6, level 850: finite but not a temperature
    ds["geopotential"][9, 1, 0, 0] = 3e38  # a flipped exponent: finite, absurd
    p = _write(ds, tmp_path)
    cfg = preset("tiny")
    stats = Era5Dataset(store, cfg).stats
    d = Era5Dataset(p, cfg, split=(0, 16), stats=stats)  # default check: finite and not absurd
    d.get(6)
    with pytest.raises(BadSampleError, match=r"'z500' \(variable 'geopotential'\) at time index 9 .* outside \+-1e\+30"):
        d.get(9)
    r = Era5Dataset(p, cfg, split=(0, 16), stats=stats, check="range")
    r.get(4)
    with pytest.raises(BadSampleError, match=r"bad\.zarr: 't850' \(variable 'temperature'\) at time index 6 .* has values in "
                                             r"\[.*, 400\], outside its physical range \[150, 350\] \(file .*temperature/c/") as e:
        r.get(6)
    assert e.value.time_index == 6 and e.value.variable == "temperature"


# ---------------------------------------------------------------- progress, jigsaw-stats

def test_statistics_and_generation_show_progress(store, tmp_path, capsys):
    p = _write(_small(store), tmp_path)
    compute_stats(p, preset("tiny"), split=(0, 16), save=False, progress=True)
    assert "statistics of bad.zarr [(0, 16)]" in capsys.readouterr().err
    simulate(16, 32, days=(1, 0, 0), spinup=1, verbose=True)
    assert "simulated days" in capsys.readouterr().err


def test_jigsaw_stats_precomputes_every_channel_of_a_store(store, tmp_path, capsys):
    from jigsaw_ref.data import stats_main
    p = _write(_small(store), tmp_path)
    p_attrs = xr.open_zarr(p, consolidated=False)
    assert stats_main([str(p), "--split", "(0, 16)"]) == 2  # not a split name: one line, exit 2
    assert "unknown split '(0, 16)'" in capsys.readouterr().err
    assert stats_main([str(p)]) == 0
    out = capsys.readouterr().out
    assert f"jigsaw-stats: 22 channels of {p} [train] -> {stats_path(p)}" in out
    s = load_stats(p)
    assert set(s) == set(CPU_CHANNELS) | {"lsm", "slt", "orography"}
    capsys.readouterr()
    Era5Dataset(p, preset("tiny"))
    assert "statistics of" not in capsys.readouterr().err  # nothing recomputed by the reader
    assert stats_main([str(p), "--channels", "z500,sp", "--statics", ""]) == 2
    assert "channel 'sp' needs variable 'sp'" in capsys.readouterr().err


def test_jigsaw_stats_flags_all_have_help():
    import argparse, jigsaw_ref.data as data
    seen = {}
    real = argparse.ArgumentParser.parse_args
    def grab(self, *a, **k):
        seen["p"] = self
        raise SystemExit(0)
    argparse.ArgumentParser.parse_args = grab
    try:
        with pytest.raises(SystemExit): data.stats_main([])
    finally:
        argparse.ArgumentParser.parse_args = real
    acts = [a for a in seen["p"]._actions if a.dest != "help"]
    assert len(acts) >= 6 and all(a.help for a in acts), [a.dest for a in acts if not a.help]


# ---------------------------------------------------------------- the paper's grid, lazily

def test_h1024_preset_is_the_released_238M_configuration():
    from jigsaw_ref.mixer import param_count
    cfg = preset("h1024")
    assert (cfg.n_lat, cfg.n_lon, cfg.patch, cfg.hidden, cfg.f_s, cfg.f_c, cfg.n_in) == (720, 1440, 60, 1024, 0.125, 0.25, 72)
    assert param_count(cfg) == 238_511_658


def test_synthetic_720x1440_computes_only_the_block_a_rank_asks_for(monkeypatch):
    import jigsaw_ref.data as data
    cfg = preset("h1024")
    calls = []
    real = data.synthetic_field
    monkeypatch.setattr(data, "synthetic_field", lambda ch, h, lat, lon, *a: calls.append((ch, len(lat), len(lon))) or real(ch, h, lat, lon, *a))
    d = Era5Dataset("synthetic:720x1440:days=2,1,1", cfg, "train", lon_parts=2, lon_index=1, ch_parts=2, ch_index=1)
    assert isinstance(d, data.SyntheticEra5) and len(d) == 8 - 1
    x, y = d.get(3, 1)
    assert x.shape == (36, 720, 720) and y.shape == (34, 720, 720) and x.dtype == torch.float32
    assert torch.isfinite(x).all() and torch.isfinite(y).all()
    assert {n for _, n, _ in calls} == {720} and {m for _, _, m in calls} == {720}  # its longitudes only
    assert sorted({c for c, _, _ in calls}) == sorted(set(d.in_channels[:-3]) | set(d.out_channels))  # its channels only
    assert d.lat[0] == 90.0 and d.lat[-1] == -89.75 and d.lon[0] == 180.0
    assert abs(x[:-3].mean()) < 0.5 and 0.3 < x[:-3].std() < 2.0  # z-scored with the closed-form statistics
    phys = d.denormalize(y)
    assert 200 < phys[d.out_channels.index("t400")].mean() < 280


def test_synthetic_blocks_stitch_bitwise_and_the_trainer_interface_holds():
    cfg = preset("tiny", n_lat=32, n_lon=64, out_pad=3, rollout=(1, 2))
    path = "synthetic:32x64:days=3,1,1:seed=2"
    one = Era5Dataset(path, cfg)
    x1, y1 = one.get(4, 2)
    for chp, lonp in ((2, 1), (2, 2), (1, 4)):
        parts = {(c, l): Era5Dataset(path, cfg, lon_parts=lonp, lon_index=l, ch_parts=chp, ch_index=c).get(4, 2)
                 for c in range(chp) for l in range(lonp)}
        for k, ref in ((0, x1), (1, y1)):
            got = torch.cat([torch.cat([parts[c, l][k] for l in range(lonp)], -1) for c in range(chp)], 0)
            assert torch.equal(got, ref), (chp, lonp, k)
    assert torch.equal(one.get(3, 2)[1][:cfg.n_vars], one.get(5, 1)[0][:cfg.n_vars])  # targets are k steps later
    val = Era5Dataset(path, cfg, "val", max_lead=1)
    assert val.times[0] == np.datetime64("2000-01-04T00") and len(val) == 3
    assert not torch.equal(Era5Dataset("synthetic:32x64:days=3,1,1:seed=3", cfg).get(4, 2)[0], x1)
    with pytest.raises(DataError, match=r"a 32x64 grid but the model's is 16x32; use --data synthetic:16x32"):
        Era5Dataset("synthetic:32x64", preset("tiny"))
