"""Default data generator and sharded ERA5 reader: physics, determinism, exact stitching, bytes read per rank, bad input."""
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from jigsaw_ref.config import CPU_CHANNELS, preset, split_sizes
from jigsaw_ref.data import (DataError, Era5Dataset, compute_stats, counting_store, denormalize, load_stats,
                             stats_path)
from jigsaw_ref.generator import (TwoLayerQG, default_dataset, simulate, step, wb2_name, write_zarr)

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
    "Per-rank bytes read per sample, 1/2/4-way (printed with -s; the report quotes these)."
    cfg = preset("tiny")
    stats = Era5Dataset(store, cfg).stats
    for chp, lonp in ((1, 1), (2, 1), (2, 2)):
        print(chp * lonp, "-way", [b for _, b, _ in _bytes_per_sample(store, cfg, chp, lonp, stats)])


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
    with pytest.raises(DataError, match=r"channel 'lsm' needs variable 'land_sea_mask'.*cfg\.statics"):
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
    with pytest.raises(DataError, match=r"bad\.zarr: NaN or inf in \['t500'\].*temperature"):
        d[3]
    with pytest.raises(DataError, match=r"NaN or inf in 't500'"):
        compute_stats(p, preset("tiny"), save=False)


def test_stats_that_lack_a_channel(store):
    with pytest.raises(DataError, match=r"statistics given lack \['msl'"):
        Era5Dataset(store, preset("tiny"), stats={"z500": (5e4, 1e3)})


def test_time_step_mismatch():
    with pytest.raises(DataError, match=r"time step 12.0 h .* cfg.dt_hours=6"):
        Era5Dataset(ERA5_NC, preset("tiny", **{**ERA5_CFG, "dt_hours": 6}), stats=False)
