"""Forecasts in the WeatherBench2 layout: scored by an independent library (`scores`) they give evaluate's numbers; any
checkpoint layout gives the same forecasts; ranks (threads and mpiexec) write the store of one process."""
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from jigsaw_ref.checkpoint import save_checkpoint, save_sharded
from jigsaw_ref.comm import Group, make_groups
from jigsaw_ref.config import preset
from jigsaw_ref.evaluate import evaluate
from jigsaw_ref.forecast import DIMS, forecast, forecast_to_zarr, main
from jigsaw_ref.generator import default_dataset
from jigsaw_ref.grid import Grid
from jigsaw_ref.mixer import WeatherMixer
from jigsaw_ref.parallel import JigsawMixer, scatter_state
from jigsaw_ref.ranks import run_ranks

CFG = preset("tiny")
# channel -> (store variable, level) of the variables scored here: one of each kind of the tiny preset's
CHANNELS = {"z500": ("geopotential", 500), "t850": ("temperature", 850), "q250": ("specific_humidity", 250),
            "u500": ("u_component_of_wind", 500), "t2m": ("2m_temperature", None), "msl": ("mean_sea_level_pressure", None),
            "v10": ("10m_v_component_of_wind", None)}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    "Tiny grid, 4 days train, 1 val, 3 test: 12 test times."
    return default_dataset(tmp_path_factory.mktemp("fc") / "t.zarr", grid="tiny", days=(4, 1, 3), spinup=20, verbose=False)


@pytest.fixture(scope="module")
def ckpt(store, tmp_path_factory):
    m = WeatherMixer(CFG, seed=1)
    p = tmp_path_factory.mktemp("ck") / "m.ckpt"
    save_checkpoint(p, {"format": "jigsaw_ref/1", "config": asdict(CFG), "step": 7,
                        "params": {n: t.detach().clone() for n, t in m.state().items()},
                        "train": {"model": "tiny", "data": str(store)}})
    return p


def cell_area_weights(lat_deg):
    "Cell-area row weights of an equiangular grid of cell-centred latitudes, mean 1 (derived here, not imported)."
    lat = np.deg2rad(np.asarray(lat_deg, np.float64))
    half = np.deg2rad(180 / len(lat)) / 2
    a = np.sin(np.minimum(lat + half, np.pi / 2)) - np.sin(np.maximum(lat - half, -np.pi / 2))
    return a / a.mean()


def rmse_by_scores(fc: xr.Dataset, store) -> dict:
    """WB2 RMSE of every channel of CHANNELS at every lead with the `scores` library: per (initial time, lead) the
    cell-area weighted spatial MSE, then the mean over the initial times whose verifying state exists, then the root."""
    from scores.continuous import mse
    truth = xr.open_zarr(store, consolidated=False).isel(latitude=slice(0, fc.sizes["latitude"]))
    w = xr.DataArray(cell_area_weights(fc.latitude.values), dims="latitude", coords={"latitude": fc.latitude})
    valid = (fc.time + fc.prediction_timedelta).transpose("time", "prediction_timedelta").values  # verifying times
    out = {}
    for ch, (var, lev) in CHANNELS.items():
        f = fc[var] if lev is None else fc[var].sel(level=lev)
        o = truth[var] if lev is None else truth[var].sel(level=lev)
        o = o.reindex(time=valid.ravel()).values.reshape(valid.shape + o.shape[1:])  # NaN past the store's last time
        obs = xr.DataArray(o, dims=("time", "prediction_timedelta", "latitude", "longitude"), coords=f.coords)
        e = mse(f, obs, preserve_dims=["time", "prediction_timedelta"], weights=w)
        r = np.sqrt(e.mean("time", skipna=True))
        for td, v in zip(fc.prediction_timedelta.values, r.values):
            out[ch, int(td / np.timedelta64(1, "h"))] = float(v)
    return out


def evaluates_weights(store):
    "The row weights evaluate uses by default (the dataset's area weights)."
    from jigsaw_ref.data import Era5Dataset
    return Era5Dataset(store, CFG, "test", max_lead=1).area_weights.numpy()


def model_rmse(res) -> dict:
    return {(r["variable"], r["lead_h"]): r["value"] for r in res["rows"] if r["model"] == "model" and r["metric"] == "rmse"}


@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
def test_the_written_store_scored_by_the_scores_library_gives_evaluates_rmse(store, ckpt, tmp_path, dtype, rel):
    """Every test initial time forecast 3 leads ahead, written to zarr, opened with xarray and scored with `scores` (its
    weighted MSE, our cell-area weights given explicitly) equals jigsaw-eval's model RMSE (WB2 convention). In float64
    to 1e-6; in float32 each path batches differently, so a forecast's last bits differ, to 1e-4."""
    forecast_to_zarr(ckpt, tmp_path / "f.zarr", init_times="test", leads=3, chunk=4, dtype=dtype)
    fc = xr.open_zarr(tmp_path / "f.zarr", consolidated=False)
    assert fc.geopotential.dims == DIMS and fc.sizes["time"] == 12 and fc.geopotential.encoding["chunks"][0] == 4
    ours = model_rmse(evaluate(ckpt, tmp_path / "ev", leads=3, dtype=dtype, verbose=False))
    np.testing.assert_allclose(cell_area_weights(fc.latitude.values), evaluates_weights(store), rtol=1e-12)  # the same weights
    theirs = rmse_by_scores(fc, store)
    assert set(theirs) == {(c, l) for c in CHANNELS for l in (6, 12, 18)}
    for k, v in theirs.items():
        assert v == pytest.approx(ours[k], rel=rel), (k, v, ours[k])


def test_the_dataset_has_the_wb2_layout_units_and_the_store_names(store, ckpt):
    fc = forecast(ckpt, init_times=slice("2000-01-06T00", "2000-01-06T12"), leads=[12, 6])
    assert dict(fc.sizes) == dict(time=2, prediction_timedelta=2, level=3, latitude=16, longitude=32)
    assert set(fc.data_vars) == set(xr.open_zarr(store, consolidated=False).data_vars) - {"land_sea_mask", "soil_type",
                                                                                          "geopotential_at_surface"}
    assert fc.level.values.tolist() == [250, 500, 850] and fc.level.attrs["units"] == "hPa"
    assert [v.attrs["units"] for v in (fc.geopotential, fc.temperature, fc.specific_humidity, fc["10m_u_component_of_wind"],
                                       fc.mean_sea_level_pressure)] == ["m**2 s**-2", "K", "kg kg**-1", "m s**-1", "Pa"]
    assert fc["2m_temperature"].attrs == {"units": "K", "long_name": "2 metre temperature"}
    assert fc.time.attrs["standard_name"] == "forecast_reference_time" and fc.attrs["step"] == 7
    td = fc.prediction_timedelta.values
    assert td.dtype.kind == "m" and td.astype("timedelta64[h]").astype(int).tolist() == [6, 12]  # sorted
    assert fc.geopotential.dtype == np.float32 and 4e4 < float(fc.geopotential.sel(level=500).mean()) < 7e4  # physical units


def _write_2x2(comm, path, full):
    g = make_groups(Grid(1, 2, 2), comm=comm)
    m = JigsawMixer(CFG, g["tensor"], g["domain"], "exact", torch.float32)
    with torch.no_grad(): scatter_state(m, full)
    save_sharded(path, m, None, {"step": 7}, g["world"], 0)


def test_a_checkpoint_of_any_layout_gives_the_same_forecasts(store, ckpt, tmp_path):
    "A 2x2 Jigsaw run's sharded checkpoint store holds the same full model: the forecasts are identical."
    full = {n: t.detach().clone() for n, t in WeatherMixer(CFG, seed=1).state().items()}
    run_ranks(4, _write_2x2, tmp_path / "sharded.ckpt", full)
    a = forecast(tmp_path / "sharded.ckpt", data=str(store), init_times="test", leads=2)
    b = forecast(ckpt, init_times="test", leads=2)
    xr.testing.assert_equal(a, b)


def test_thread_ranks_write_the_store_of_one_process(store, ckpt, tmp_path):
    one = forecast(ckpt, init_times="test", leads=2, dtype=torch.float64)
    run_ranks(3, lambda comm: forecast_to_zarr(ckpt, tmp_path / "r.zarr", init_times="test", leads=2, chunk=2, batch=3,
                                               dtype=torch.float64, group=Group(comm)))
    xr.testing.assert_allclose(xr.open_zarr(tmp_path / "r.zarr", consolidated=False).load(), one, rtol=1e-12)


def test_bad_initial_times_and_leads_are_one_line_errors(ckpt, tmp_path, capsys):
    assert main([str(ckpt), "--out", str(tmp_path / "x.zarr"), "--init", "2000-01-06T03"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "initial time(s) ['2000-01-06T03:00:00.000000000'] are not times of the store" in err
    assert main([str(ckpt), "--out", str(tmp_path / "x.zarr"), "--leads", "9h"]) == 2
    assert "multiple of the model's step dt_hours=6 h" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(ckpt), "--out", str(tmp_path / "x.zarr"), "--leads", "six"])


@pytest.mark.slow  # 80-100 s on the shared 2-core machine; the thread-rank tests run the same paths by default
def test_under_mpiexec_two_ranks_score_and_write_what_one_process_does(store, ckpt, tmp_path):
    """`mpiexec -n 2`: jigsaw-eval's ranks share the initial times, jigsaw-forecast's write their chunks (float64, so
    only the order of the sums differs); both equal the one-process results."""
    exe = Path(sys.executable).with_name("mpiexec")
    code = ("import sys; from jigsaw_ref.evaluate import main as ev; from jigsaw_ref.forecast import main as fc; "
            f"sys.exit(ev([{str(ckpt)!r}, '--out', {str(tmp_path / 'ev2')!r}, '--leads', '3', '--float64']) or "
            f"fc([{str(ckpt)!r}, '--out', {str(tmp_path / 'f2.zarr')!r}, '--leads', '3', '--chunk', '5', '--float64']))")
    env = dict(os.environ, MPIR_CVAR_ENABLE_HEAVY_YIELD="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    r = subprocess.run([str(exe) if exe.exists() else "mpiexec", "-n", "2", sys.executable, "-c", code], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = json.loads((tmp_path / "ev2" / "scores.json").read_text())
    assert got["meta"]["ranks"] == 2
    one = evaluate(ckpt, tmp_path / "ev1", leads=3, dtype=torch.float64, verbose=False)
    for row in one["rows"]:
        v = got["scores"][row["metric"]][row["model"]][row["variable"]][str(row["lead_h"])]
        assert math.isclose(v, row["value"], rel_tol=1e-9, abs_tol=1e-12), (row, v)
    ref = forecast(ckpt, init_times="test", leads=3, dtype=torch.float64)
    xr.testing.assert_allclose(xr.open_zarr(tmp_path / "f2.zarr", consolidated=False).load(), ref, rtol=1e-12)


def test_the_package_name_forecast_is_callable_even_after_the_module_is_imported(ckpt):
    import jigsaw_ref
    import jigsaw_ref.forecast as mod  # binds the module on the package
    assert jigsaw_ref.forecast is mod and callable(mod)
    xr.testing.assert_equal(mod(ckpt, init_times=["2000-01-06T00"], leads=1), forecast(ckpt, init_times=["2000-01-06T00"], leads=1))
