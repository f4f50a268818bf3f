"""Evaluation: WB2 metrics against brute force, baselines' known values, and a trained checkpoint scored end to end."""
import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from jigsaw_ref.comm import Group
from jigsaw_ref.config import preset
from jigsaw_ref.data import Era5Dataset, denormalize, open_store
from jigsaw_ref.evaluate import (EvalError, FieldWindow, Scores, acc, bias, cached_climatology, channel_attrs, climatology, evaluate,
                                 initial_times, lat_weights, lead_counts, load_model, main, plot_lead, plot_map, read_fields,
                                 reference_scores, rmse, rollout, score_forecasts, spatial_acc, units_label)
import jigsaw_ref.evaluate as ev
from jigsaw_ref.ranks import run_ranks
from jigsaw_ref.generator import default_dataset
from jigsaw_ref.checkpoint import save_checkpoint
from jigsaw_ref.mixer import WeatherMixer
from jigsaw_ref.train import TrainConfig, Trainer

LAT = torch.tensor([-78.75, -56.25, -33.75, -11.25, 11.25, 33.75, 56.25, 78.75], dtype=torch.float64)


def fields(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(3)]


# ---------------------------------------------------------------- metrics

@pytest.mark.parametrize("kind", ["area", "cos"])
def test_metrics_equal_brute_force_loops(kind):
    f, o, c = fields(4, 3, 8, 5)
    c = c[0]
    w = lat_weights(LAT, kind)
    T, V, I, J = f.shape
    ft, wt = (f, o, c, w), w
    f, o, c, w = (a.numpy() for a in ft)  # numpy float64 scalars in the loops
    for v in range(V):
        mse_t = [sum(w[i] * (f[t, v, i, j] - o[t, v, i, j]) ** 2 for i in range(I) for j in range(J)) / (I * J) for t in range(T)]
        b_t = [sum(w[i] * (f[t, v, i, j] - o[t, v, i, j]) for i in range(I) for j in range(J)) / (I * J) for t in range(T)]
        acc_t = []
        for t in range(T):
            num = sum(w[i] * (f[t, v, i, j] - c[v, i, j]) * (o[t, v, i, j] - c[v, i, j]) for i in range(I) for j in range(J))
            ff = sum(w[i] * (f[t, v, i, j] - c[v, i, j]) ** 2 for i in range(I) for j in range(J))
            oo = sum(w[i] * (o[t, v, i, j] - c[v, i, j]) ** 2 for i in range(I) for j in range(J))
            acc_t.append(num / math.sqrt(ff * oo))
        f_, o_, c_ = ft[:3]
        assert rmse(f_, o_, wt)[v].item() == pytest.approx(math.sqrt(sum(mse_t) / T), rel=1e-12)
        assert bias(f_, o_, wt)[v].item() == pytest.approx(sum(b_t) / T, rel=1e-12, abs=1e-14)
        assert acc(f_, o_, c_, wt)[v].item() == pytest.approx(sum(acc_t) / T, rel=1e-12)


def test_rmse_takes_the_square_root_after_the_time_mean():
    o = torch.zeros(2, 1, 8, 4, dtype=torch.float64)
    f = o.clone(); f[0] = 1; f[1] = 7  # per-time MSE 1 and 49: sqrt(25) = 5, not (1 + 7) / 2 = 4
    assert rmse(f, o, lat_weights(LAT))[0].item() == pytest.approx(5.0)


def test_latitude_weights_make_polar_rows_count_less():
    o = torch.zeros(1, 1, 8, 4, dtype=torch.float64)
    polar, tropical = o.clone(), o.clone()
    polar[..., 0, :] = 1; tropical[..., 4, :] = 1
    w = lat_weights(LAT)
    assert rmse(polar, o, w) < rmse(tropical, o, w)
    assert rmse(tropical, o, torch.ones(8, dtype=torch.float64)) == rmse(polar, o, torch.ones(8, dtype=torch.float64))


def test_baselines_have_their_known_scores():
    _, o, c = fields(6, 2, 8, 5)
    c = c[0]
    w = lat_weights(LAT)
    # persistence at lead 0 is the truth itself
    assert torch.equal(rmse(o, o, w), torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(acc(o, o, c, w), torch.ones(2, dtype=torch.float64))
    assert torch.equal(bias(o, o, w), torch.zeros(2, dtype=torch.float64))
    # climatology: no anomaly, ACC 0 by convention (not NaN); its RMSE is the RMS anomaly of the truth
    clim = c.expand_as(o)
    assert torch.equal(acc(clim, o, c, w), torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(rmse(clim, o, w), ((o - c).square() * w[:, None]).mean((0, 2, 3)).sqrt())


def test_acc_ignores_anomaly_amplitude_and_is_near_zero_for_unrelated_anomalies():
    a, b, c = fields(400, 1, 8, 16, seed=3)
    c = c[0]
    f, o = c + a, c + b  # independent anomalies about c
    w = lat_weights(LAT)
    assert torch.allclose(acc(c + 3 * (f - c), o, c, w), acc(f, o, c, w))
    assert torch.allclose(acc(c - (o - c), o, c, w), -torch.ones(1, dtype=torch.float64))
    assert abs(acc(f, o, c, w).item()) < 0.03  # 400 independent per-time ACCs of 128 points: std ~ 0.09 / 20
    assert torch.isfinite(spatial_acc(c.expand_as(o), o, c, w)).all()


def test_scores_accumulated_in_batches_equal_the_whole_array_metrics():
    f, o, c = fields(7, 2, 8, 5, seed=1)
    c = c[0]
    w = lat_weights(LAT, "cos")
    s = Scores(["a", "b"], w)
    for sl in (slice(0, 3), slice(3, 4), slice(4, 7)):
        s.add("m", 12, f[sl], o[sl], c)
    got = {(r["metric"], r["variable"]): r["value"] for r in s.rows()}
    for name, ref in (("rmse", rmse(f, o, w)), ("bias", bias(f, o, w)), ("acc", acc(f, o, c, w))):
        assert [got[name, "a"], got[name, "b"]] == pytest.approx(ref.tolist(), rel=1e-12, abs=1e-15)


# ---------------------------------------------------------------- forecasts on data

@pytest.fixture(scope="module")
def store(tmp_path_factory):
    "Tiny grid, 4 days train, 1 val, 3 test: 12 test times."
    return default_dataset(tmp_path_factory.mktemp("ev") / "t.zarr", grid="tiny", days=(4, 1, 3), spinup=20, verbose=False)


def test_scored_forecasts_equal_a_rollout_built_from_dataset_samples(store):
    "score_forecasts (batched reads, one-shot normalisation) against samples from Era5Dataset.get and a plain loop."
    cfg = preset("tiny")
    ds = Era5Dataset(store, cfg, "test", max_lead=3)
    m = WeatherMixer(cfg, seed=1).eval()
    src = open_store(store)
    clim = climatology(src, cfg, "train", store)
    w = lat_weights(ds.lat)
    idx = [0, 2, 5]
    sc, kept = score_forecasts(m, ds, src, clim, idx, 3, w, batch=2, latent=True)
    got = {(r["model"], r["metric"], r["lead_h"], r["variable"]): r["value"] for r in sc.rows()}
    V = cfg.n_vars
    x = torch.stack([ds.get(i, 1)[0] for i in idx])
    x0 = denormalize(x[:, :V].double(), cfg.variables, ds.stats)
    preds = list(rollout(m, x, 3))
    for k in (1, 2, 3):
        o = torch.stack([denormalize(ds.get(i, k)[1].double(), cfg.variables, ds.stats) for i in idx])
        f = denormalize(preds[k - 1].double(), cfg.variables, ds.stats)
        for model, fc in (("model", f), ("persistence", x0), ("climatology", clim.expand_as(o))):
            for name, ref in (("rmse", rmse(fc, o, w)), ("acc", acc(fc, o, clim, w)), ("bias", bias(fc, o, w))):
                for c, v in enumerate(cfg.variables):  # the reference went through float32 z-scores: ~1e-7 of the field
                    tol = 1e-4 if name == "acc" else 2e-7 * o[:, c].abs().max().item()
                    assert got[model, name, 6 * k, v] == pytest.approx(ref[c].item(), rel=1e-4, abs=tol), (model, name, k, v)
    # latent rollout with k = 1 is the same call as the first autoregressive step; later leads differ
    assert got["latent", "rmse", 6, "z500"] == pytest.approx(got["model", "rmse", 6, "z500"], rel=1e-6)
    assert got["latent", "rmse", 18, "z500"] != pytest.approx(got["model", "rmse", 18, "z500"], rel=1e-6)
    assert sorted(kept) == [6, 12, 18] and kept[6][0].shape == (V, 16, 32)


def test_climatology_is_the_training_mean(store):
    cfg = preset("tiny")
    ds = Era5Dataset(store, cfg, "train", max_lead=1)
    full = torch.stack([denormalize(ds.get(i, 1)[0][:cfg.n_vars].double(), cfg.variables, ds.stats) for i in range(len(ds))]
                       + [denormalize(ds.get(len(ds) - 1, 1)[1].double(), cfg.variables, ds.stats)])
    assert torch.allclose(climatology(open_store(store), cfg, "train", store, chunk=3), full.mean(0), rtol=1e-5)

    # the cache beside the data: a file with another key (or garbage) is recomputed, never trusted
    f = Path(str(store) + ".clim.npz")
    np.savez(f, clim=np.zeros((cfg.n_vars, 16, 32)), key=np.array("another key"))
    assert torch.allclose(cached_climatology(open_store(store), cfg, store), full.mean(0), rtol=1e-5)
    f.write_bytes(b"garbage")
    assert torch.allclose(cached_climatology(open_store(store), cfg, store), full.mean(0), rtol=1e-5)


def test_a_checkpoint_for_another_grid_or_no_checkpoint_gives_a_clear_error(store, tmp_path, capsys):
    cfg = preset("tiny", n_lat=8)
    m = WeatherMixer(cfg)
    ck = tmp_path / "m.ckpt"
    save_checkpoint(ck, {"format": "jigsaw_ref/1", "config": asdict(cfg), "params": {n: t.detach() for n, t in m.state().items()},
                         "train": asdict(TrainConfig(model="tiny", data=str(store)))})
    with pytest.raises(EvalError, match="16 latitude rows but cfg.n_lat=8"):
        evaluate(ck, tmp_path / "ev", verbose=False)
    assert main([str(ck), "--out", str(tmp_path / "ev")]) == 2
    assert "jigsaw-eval: error:" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.ckpt")]) == 2
    assert "no such checkpoint file" in capsys.readouterr().err
    bad = tmp_path / "bad.ckpt"
    save_checkpoint(bad, {"config": asdict(preset("tiny")), "params": {"enc.w": torch.zeros(1)}})
    with pytest.raises(EvalError, match="parameters do not match its config"):
        load_model(bad)


# ---------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    "The `tiny` preset trained for a few steps in this process on the default data (1-way, groups of one)."
    out = tmp_path_factory.mktemp("run")
    tc = TrainConfig(model="tiny", max_steps=6, out=str(out), progress=False, lr=1e-3, lr_encdec=1e-3, warmup_steps=0,
                     val_batches=1)
    t = Trainer(tc, groups={k: Group() for k in ("world", "model", "tensor", "domain", "dp")})
    t.fit()
    return out / "final.ckpt", t


def test_a_trained_checkpoint_is_evaluated_end_to_end(trained, tmp_path, capsys):
    ck, t = trained
    model, payload = load_model(ck)
    for n, p in t.model.state().items():  # the one-process model holds exactly the trained parameters
        assert torch.equal(model.state()[n].detach(), p.detach().cpu().float()), n
    out = tmp_path / "eval"
    assert main([str(ck), "--out", str(out), "--samples", "4", "--leads", "20", "--lat-weights", "cos"]) == 0
    printed = capsys.readouterr().out
    assert "120 h" in printed and "72 h" in printed and "z500" in printed and "model better than persistence" in printed
    assert "+ better than climatology" in printed
    names = {p.name for p in out.iterdir()}
    assert {"scores.csv", "scores.json", "scorecard.txt", "rmse_vs_lead.png", "acc_vs_lead.png", "map_z500_24h.png"} <= names
    lines = (out / "scores.csv").read_text().splitlines()
    assert lines[0] == "variable,lead_h,metric,model,value"
    cfg = model.cfg
    assert len(lines) - 1 == 3 * 20 * 3 * cfg.n_vars  # systems x leads x metrics x variables
    res = json.loads((out / "scores.json").read_text())
    assert res["meta"]["samples"] == 4 and res["meta"]["leads"] == 20 and res["meta"]["lat_weights"] == "cos"
    vals = [float(l.rsplit(",", 1)[1]) for l in lines[1:]]
    assert all(math.isfinite(v) for v in vals)
    r = res["scores"]["rmse"]
    pz = r["persistence"]["z500"]
    assert 0 < pz["6"] < pz["48"] and pz["6"] < r["climatology"]["z500"]["6"]
    assert all(-1 <= v <= 1 for d in res["scores"]["acc"].values() for x in d.values() for v in x.values())
    assert set(res["scores"]["acc"]["climatology"]["t850"].values()) == {0.0}



# ---------------------------------------------------------------- splits, leads, flags, progress

def _ckpt(tmp_path, data, cfg=None, name="m.ckpt"):
    cfg = cfg or preset("tiny")
    m = WeatherMixer(cfg, seed=0)
    save_checkpoint(tmp_path / name, {"format": "jigsaw_ref/1", "config": asdict(cfg), "step": 0,
                                      "params": {n: t.detach().clone() for n, t in m.state().items()},
                                      "train": {"model": "tiny", "data": str(data)}})
    return tmp_path / name


@pytest.fixture(scope="module")
def four_times(store, tmp_path_factory):
    "The ERA5 tutorial's case: 4 times, a training split of 2, no test split."
    import xarray as xr
    ds = xr.open_zarr(store, consolidated=False).isel(time=slice(0, 4)).load()
    for v in ds.variables: ds[v].encoding = {}
    t = [str(x)[:19] for x in ds.time.values]
    ds.attrs = {"split_train": [t[0], t[2]], "split_val": [t[2], "2000-01-02T00:00:00"]}
    p = tmp_path_factory.mktemp("four") / "four.zarr"
    ds.to_zarr(p, consolidated=False)
    return p


def test_a_short_store_is_a_one_line_error_with_exit_2_not_a_traceback(four_times, tmp_path, capsys):
    ck = _ckpt(tmp_path, four_times)
    assert main([str(ck), "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"jigsaw-eval: error: {four_times}: split 'test' (the store has no "
                                                   "attribute split_test, so 'test' is the default last 10% of its 4 times) is empty")
    assert "--split" in err  # the fix
    # the split exists but is too short for the leads asked for: the most it allows is named
    assert main([str(ck), "--out", str(tmp_path / "ev"), "--split", "val", "--leads", "3"]) == 2
    err = capsys.readouterr().err
    assert "split 'val' (store attribute split_val=" in err and "has 2 time(s)" in err and "room for 1 lead(s) of 6 h, not 3; pass --leads 1" in err
    assert main([str(ck), "--out", str(tmp_path / "ev"), "--split", "val", "--leads", "1"]) == 0  # what it says works
    assert (tmp_path / "ev" / "scores.json").exists()


def test_leads_default_to_what_the_split_holds_and_synthetic_data_are_refused(store, tmp_path, capsys):
    ck = _ckpt(tmp_path, store)
    assert main([str(ck), "--out", str(tmp_path / "ev"), "--split", "val", "--samples", "1"]) == 0
    out = capsys.readouterr().out
    assert "split 'val' allows 3 leads of 6 h, not 20" in out  # 1 day of validation: 4 times
    assert main([str(ck), "--data", "synthetic:16x32"]) == 2
    assert "a synthetic source has no stored truth" in capsys.readouterr().err


def test_scorecard_leads_are_configurable_and_both_marks_are_explained(store, tmp_path, capsys):
    ck = _ckpt(tmp_path, store)
    Path(str(store) + ".clim.npz").unlink(missing_ok=True)  # so the climatology is computed (with its progress bar)
    assert main([str(ck), "--out", str(tmp_path / "ev"), "--samples", "2", "--leads", "4", "--scorecard-leads", "6,24"]) == 0
    card = (tmp_path / "ev" / "scorecard.txt").read_text().splitlines()
    assert card[0].split() == ["variable", "6", "h", "24", "h"]
    assert "* model better than persistence:" in card[-1] and "+ better than climatology:" in card[-1] and "both:" in card[-1]
    res = json.loads((tmp_path / "ev" / "scores.json").read_text())["scores"]["rmse"]
    for line in card[1:-1]:  # each '+' is exactly a cell where the model beats climatology
        v = line.split()[0]
        for j, lead in enumerate((6, 24)):
            cell = line[11 + 24 * j: 11 + 24 * j + 23][-2:]  # the two marks end each 23-character cell
            assert ("+" in cell) == (res["model"][v][str(lead)] < res["climatology"][v][str(lead)]), (v, lead, cell)
            assert ("*" in cell) == (res["model"][v][str(lead)] < res["persistence"][v][str(lead)]), (v, lead, cell)
    err = capsys.readouterr().err
    assert "forecasts (initial times x leads)" in err and "climatology [train]" in err  # progress on the long waits
    with pytest.raises(SystemExit):
        main([str(ck), "--scorecard-leads", "6,x"])


def test_every_jigsaw_eval_flag_has_a_help_line(capsys):
    import re
    with pytest.raises(SystemExit):
        main(["--help"])
    lines = capsys.readouterr().out.splitlines()
    flags = ["--out", "--leads", "--samples", "--lat-weights", "--data", "--split", "--batch", "--latent", "--map-lead",
             "--scorecard-leads", "--device", "--common-starts", "--float64"]
    for f in flags:
        i = next(i for i, l in enumerate(lines) if re.match(rf"\s+{f}\b", l))
        same_line = re.match(rf"\s+{f}( \S+)?\s{{2,}}\S", lines[i])
        next_line = i + 1 < len(lines) and re.match(r"\s{10,}\S", lines[i + 1])
        assert same_line or next_line, f"{f} has no help line"
    text = "\n".join(lines)
    assert "dt_hours" in text and "6-h steps" not in text  # --leads says what a step is, whatever dt_hours is
    flat = " ".join(text.split())
    assert "default (WeatherBench2's) each lead is scored on every initial time" in flat  # both lead conventions
    assert "(--common-starts) scores every lead on the same initial times, those with room for the longest lead" in flat


# ---------------------------------------------------------------- lead conventions, batching, ranks, units

def _rows(res):
    return {(r["model"], r["metric"], r["lead_h"], r["variable"]): r["value"] for r in res["rows"]}


def _close(a: dict, b: dict, rel=1e-6, keys=None):
    "Every key of `a` (or `keys`) equal in `b` to `rel` (ACC and bias near 0: to rel of the largest value of that metric)."
    for k in keys or a:
        scale = max(abs(v) for kk, v in a.items() if kk[1] == k[1] and kk[3] == k[3])
        assert math.isclose(a[k], b[k], rel_tol=rel, abs_tol=rel * scale * 1e-3), (k, a[k], b[k])


def test_wb2_convention_a_multi_lead_call_equals_one_call_per_lead(store, tmp_path):
    "Default (WeatherBench2): lead k is scored on every initial time whose truth is in the split, whatever the longest lead."
    ck = _ckpt(tmp_path, store)
    full = evaluate(ck, tmp_path / "e4", leads=4, verbose=False)
    assert full["meta"]["starts"] == "all" and full["meta"]["initial_times_per_lead"] == {"6": 11, "12": 10, "18": 9, "24": 8}
    allk = _rows(full)
    for k in (1, 2, 3):
        one = _rows(evaluate(ck, tmp_path / f"e{k}", leads=k, verbose=False))
        _close(one, allk, keys=[key for key in one if key[2] == 6 * k])
    # the common convention's short leads do depend on the longest lead: that is what the default removes
    c4, c1 = _rows(evaluate(ck, tmp_path / "c4", leads=4, starts="common", verbose=False)), _rows(evaluate(ck, tmp_path / "c1", leads=1, starts="common", verbose=False))
    assert c4["model", "rmse", 6, "z500"] != pytest.approx(c1["model", "rmse", 6, "z500"], rel=1e-6)
    assert c4["model", "rmse", 24, "z500"] == pytest.approx(allk["model", "rmse", 24, "z500"], rel=1e-6)  # same 8 times


def test_common_starts_score_every_lead_on_the_old_samples(store, tmp_path, capsys):
    "--common-starts is the old behaviour: the samples of Era5Dataset(max_lead=L), every lead on all of them (float64 brute force)."
    ck = _ckpt(tmp_path, store)
    got = _rows(evaluate(ck, tmp_path / "ev", leads=3, starts="common", dtype=torch.float64, verbose=False))
    assert main([str(ck), "--out", str(tmp_path / "cli"), "--leads", "3", "--common-starts", "--float64"]) == 0
    res = json.loads((tmp_path / "cli" / "scores.json").read_text())
    assert res["meta"]["starts"] == "common" and res["meta"]["initial_times_per_lead"] == {"6": 9, "12": 9, "18": 9}
    cfg, V = preset("tiny"), preset("tiny").n_vars
    ds = Era5Dataset(store, cfg, "test", max_lead=3)  # 12 test times: 9 samples with room for 3 leads
    m, _ = load_model(ck, dtype=torch.float64)
    src = open_store(store)
    clim, w = cached_climatology(src, cfg, store), ds.area_weights
    x = torch.stack([torch.cat([ev.normalize(read_fields(src, cfg, ds.i0 + i, ds.i0 + i + 1)[0], cfg.variables, ds.stats),
                                ds.get(i, 1)[0][V:].double()]) for i in range(len(ds))])
    x0 = read_fields(src, cfg, ds.i0, ds.i0 + len(ds))
    ref = {}
    for k, y in enumerate(rollout(m, x, 3), 1):
        o = read_fields(src, cfg, ds.i0 + k, ds.i0 + k + len(ds))
        f = denormalize(y, cfg.variables, ds.stats)
        for model, fc in (("model", f), ("persistence", x0), ("climatology", clim.expand_as(o))):
            for name, val in (("rmse", rmse(fc, o, w)), ("acc", acc(fc, o, clim, w)), ("bias", bias(fc, o, w))):
                for c, v in enumerate(cfg.variables): ref[model, name, 6 * k, v] = val[c].item()
    _close(ref, got)
    _close(ref, {(m_, me, int(l), v): x for me, d in res["scores"].items() for m_, dd in d.items() for v, ls in dd.items() for l, x in ls.items()})


@pytest.mark.parametrize("samples, batch", [(0, 4), (5, 2), (0, 64)])
def test_batched_scores_equal_the_per_initial_time_reference(store, samples, batch):
    "score_forecasts (batches, shrinking rollouts, the field window, climatology reuse) against reference_scores, in float64."
    cfg = preset("tiny")
    ds = Era5Dataset(store, cfg, "test", max_lead=1)
    m = WeatherMixer(cfg, torch.float64, seed=2).eval()
    src = open_store(store)
    clim, w = climatology(src, cfg, "train", store), lat_weights(ds.lat)
    idx = initial_times(ds.i1 - ds.i0, ds.stride, 5, samples)
    got, kept = score_forecasts(m, ds, src, clim, idx, 5, w, batch=batch, latent=True)
    ref = reference_scores(m, ds, src, clim, idx, 5, w, latent=True)
    assert got.counts() == ref.counts() == dict(zip((6, 12, 18, 24, 30), lead_counts(idx, 12, 1, 5)))
    a, b = ([r["value"] for r in s.rows()] for s in (got, ref))
    assert np.allclose(a, b, rtol=1e-9, atol=1e-12)
    assert sorted(kept) == [6, 12, 18, 24, 30]


def test_the_field_window_reads_each_time_once_and_returns_what_the_reader_returns(store):
    cfg, src = preset("tiny"), open_store(store)
    win = FieldWindow(src, cfg)
    rng = np.random.default_rng(0)
    lo, asked = 0, set()
    n = src.sizes["time"]  # 32
    for _ in range(12):  # increasing requests, overlapping, nested or with gaps
        lo += int(rng.integers(0, 4)); hi = min(n, lo + int(rng.integers(1, 8)))
        if lo >= n: break
        assert torch.equal(win.get(lo, hi), read_fields(src, cfg, lo, hi))
        asked |= set(range(lo, hi))
    assert win.read == len(asked)  # every time asked for was read exactly once


@pytest.mark.parametrize("ranks", [2, 3])
def test_ranks_sharing_the_initial_times_give_the_scores_of_one_process(store, tmp_path, ranks):
    ck = _ckpt(tmp_path, store)
    one = _rows(evaluate(ck, tmp_path / "one", leads=4, samples=7, dtype=torch.float64, verbose=False))
    many = run_ranks(ranks, lambda comm: evaluate(ck, tmp_path / "many", leads=4, samples=7, dtype=torch.float64, verbose=False,
                                                  group=ev.Group(comm)))
    assert all(r["rows"] == many[0]["rows"] for r in many)
    _close(one, _rows(many[0]), rel=1e-9)
    assert json.loads((tmp_path / "many" / "scores.json").read_text())["meta"]["ranks"] == ranks


def test_plots_carry_the_units_of_each_variable(store, tmp_path, monkeypatch):
    "The RMSE axes and the map colour bars that evaluate draws name the units (from the store, else WB2's)."
    figs = {}
    for name in ("plot_lead", "plot_map"):
        orig = getattr(ev, name)
        monkeypatch.setattr(ev, name, lambda *a, _o=orig, _n=name, **kw: figs.setdefault(_n, []).append(_o(*a, **kw)) or figs[_n][-1])
    evaluate(_ckpt(tmp_path, store), tmp_path / "ev", leads=2, samples=2, verbose=False)
    rmse_fig, acc_fig = figs["plot_lead"]
    labels = [a.get_ylabel() for a in rmse_fig.axes]
    assert labels[:3] == ["RMSE ($\\mathrm{m^{2}\\,s^{-2}}$)", "RMSE ($\\mathrm{K}$)", "RMSE ($\\mathrm{K}$)"], labels  # z500, t850, t2m
    assert labels[3:] == ["RMSE ($\\mathrm{m\\,s^{-1}}$)"] * 2 + ["RMSE ($\\mathrm{Pa}$)"]  # u10, v10, msl
    assert [a.get_ylabel() for a in acc_fig.axes] == ["ACC"] * 6
    (mp,) = figs["plot_map"]
    assert [a.get_ylabel() for a in mp.axes[3:]] == [units_label("m**2 s**-2")] * 3
    # a store's own units attribute wins over the table
    import xarray as xr
    ds = xr.open_zarr(store, consolidated=False)
    ds["temperature"].attrs["units"] = "degC"
    assert channel_attrs(ds, ["t850", "z500"])["t850"]["units"] == "degC"
    assert channel_attrs(ds, ["t850", "z500"])["z500"] == {"units": "m**2 s**-2", "long_name": "Geopotential"}
