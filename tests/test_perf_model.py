"""The performance model: volumes and FLOPs are the algorithm's, the released code's structure is in it, it moves the right
way, and it predicts the paper's cells it was not calibrated on."""
import math

import pytest
import torch

from jigsaw_ref.comm import make_groups
from jigsaw_ref.config import preset
from jigsaw_ref.grid import Grid
from jigsaw_ref.parallel import JigsawMixer, block_of
from jigsaw_ref.ranks import run_ranks
from jigsaw_ref.mixer import train_step_flops
from jigsaw_ref.pmatmul import block_bytes
from jigsaw_ref import perfmodel as pm

# Held-out cells the model does not bring within 10%, with the bound it reaches (explained in nbs/13_perf_model.py,
# "What the model still misses"): the 2-way data-parallel cost at 16-32 GPUs, and the absolute 1-way PFLOP/s at 256.
KNOWN_MISSES = {"C4 2-way 16 GPUs": 0.14, "C4 2-way 32 GPUs": 0.12,
                "256 GPUs 1-way PFLOP/s": 0.18, "256 GPUs 1-way % of peak": 0.18}


@pytest.fixture(scope="module")
def cal():
    return pm.calibrate()


@pytest.fixture(scope="module")
def rows(cal):
    return pm.comparison(cal)


def test_calibrated_on_four_cells_and_reproduces_them(cal, rows):
    assert len(pm.CALIBRATION_CELLS) == 4
    assert sum(r[4] == "cal" for r in rows) == 4 and len(rows) == 30
    for name, ref, pred, err, role in rows:
        if role == "cal": assert abs(err) < 1e-5, name
    assert 0 < cal.eta_of("tf32") < cal.eta_of("fp32") < 1 and 0 <= cal.window < 1 and cal.io_sample > 0


def test_held_out_cells_within_ten_percent_except_the_named_misses(rows):
    held = [(n, e) for n, _, _, e, k in rows if k == "pred"]
    assert len(held) == 26
    for name, err in held:
        assert abs(err) <= KNOWN_MISSES.get(name, 0.10), (name, err)
    assert sum(abs(e) <= 0.10 for _, e in held) >= len(held) - len(KNOWN_MISSES)


def test_errors_are_computed_not_stored(rows):
    for name, ref, pred, err, _ in rows:
        assert err == pytest.approx(pred / ref - 1)
    assert pm.format_table(rows).count("\n") == len(rows)


def _sent_by_jigsaw_mixer(comm, c, p, q):
    "Bytes this rank's tensor and domain groups count over one forward and backward of the plain-schedule model."
    grid = Grid(1, p, q)
    g = make_groups(grid, comm=comm)
    _, i, j = grid.coords(comm.Get_rank())
    m = JigsawMixer(c, g["tensor"], g["domain"], "exact", torch.float64, schedule="plain")
    torch.manual_seed(0)
    m(block_of(c, torch.randn(1, c.n_in, c.n_lat, c.n_lon, dtype=torch.float64), p, q, i, j)).square().sum().backward()
    return g["tensor"].sent + g["domain"].sent


@pytest.mark.parametrize("p,q", [(1, 2), (2, 1), (2, 2)])
def test_activation_traffic_is_what_the_model_sends(p, q):
    c = preset("tiny", n_lon=64, hidden=64)
    sent = run_ranks(p * q, _sent_by_jigsaw_mixer, c, p, q)
    assert max(sent) == pm.mp_bytes(c, p, q, itemsize=8)
    T, H, S, G = c.tokens, c.hidden, c.token_hidden, c.channel_hidden
    one, two = (pm.mp_bytes(c.replace(blocks=b), p, q) for b in (1, 2))
    assert two - one == 2 * block_bytes(T, H, S, G, p, q)  # forward and backward of each block's collectives


@pytest.mark.parametrize("name,batch", [("c3", 1), ("c4_4way", 1), ("c4_4way", 4), ("h1024", 2)])
def test_block_bytes_of_both_schedules_follow_the_formulas(name, batch):
    c = preset(name)
    T, H, fs, fc = c.tokens, c.hidden, c.f_s, c.f_c
    assert pm.activations_block_bytes(c, batch) == pytest.approx(4 * batch * T * H * (2 + fs + fc), rel=1e-9)
    summa = (batch * T * H * (8 + 6 * fs + 3 * fc) + 3 * fs * T**2 + 6 * fc * H**2)  # x itemsize/4, itemsize 4
    assert pm.summa_block_bytes(c, batch) == pytest.approx(summa, rel=1e-12)


def test_summa_break_even_batch_separates_fewer_from_more_bytes():
    assert pm.summa_break_even_batch(preset("c4_4way")) == math.inf  # f_c <= 2 f_s: never fewer bytes
    c = preset("c3", hidden=1600, f_s=0.125)
    b = pm.summa_break_even_batch(c)
    assert pm.summa_block_bytes(c, math.ceil(b)) < pm.activations_block_bytes(c, math.ceil(b))
    assert pm.summa_block_bytes(c, math.floor(b)) > pm.activations_block_bytes(c, math.floor(b))


def test_summa_products_do_the_block_flops_and_gemm_calls_split_the_step():
    c = preset("c3")
    assert sum(2 * m * n * k for _, m, n, k in pm.summa_products(c)) == 3 * 4 * c.tokens * c.hidden * (c.token_hidden + c.channel_hidden)
    for p, q, s in ((1, 1, "activations"), (1, 2, "activations"), (2, 2, "activations"), (2, 2, "summa"), (2, 2, "released")):
        total = sum(2 * m * n * k for m, n, k in pm.gemm_calls(c, p, q, s))
        assert total == pytest.approx(train_step_flops(c) / (p * q), rel=2e-3)


def test_released_four_way_imbalance_is_four_thirds_and_only_there(cal):
    assert pm.imbalance(2, 2, "released") == pytest.approx(4 / 3)
    assert pm.imbalance(2, 2, "summa") == pm.imbalance(1, 2, "released") == pm.imbalance(2, 2, "activations") == 1.0
    c = preset("c3")
    ratio = pm.gemm_time(c, 2, 2, "fp32", cal, schedule="released") / pm.gemm_time(c, 2, 2, "fp32", cal, schedule="summa")
    assert ratio == pytest.approx(4 / 3)


def test_tile_efficiency_is_a_fraction_and_penalizes_partial_waves():
    t = (256, 128)
    assert pm.tile_efficiency(256 * 12, 128 * 9, t, 108) == 1.0
    assert pm.tile_efficiency(256 * 12, 128 * 9 + 1, t, 108) < 0.6
    assert pm.tile_efficiency(141, 69, t, 108) == pytest.approx(141 * 69 / (256 * 128))  # split-K fills the wave
    assert pm.tile_efficiency(10, 10, t, 0) == 1.0
    for m, n in ((8640, 2448), (17280, 4896), (4896, 8640)):
        assert 0 < pm.tile_efficiency(m, n, t, 108) <= 1
    c = preset("c3")
    assert pm.wave_factor(c, 2, 2, "tf32", schedule="summa") > pm.wave_factor(c, 1, 1, "tf32") >= 1


def test_all_reduce_goes_through_two_adapters_and_pays_nccl_ring_latency():
    c, hw = preset("c4_4way"), pm.A100_NODE
    shard = 4 * pm.rank_params(c, 2, 2)
    lat = math.ceil(shard / hw.bucket) * (hw.lat[0] + 2 * hw.lat[1])  # d = 2: two ring steps, both over the network
    assert pm.dp_time(c, 2, 2, 8) == pytest.approx(4 * shard / 50e9 + lat)
    assert pm.dp_time(c, 2, 2, 4) == 0
    t = [pm.dp_time(c, 2, 2, n) for n in pm.C4_GPUS]
    assert all(a < b for a, b in zip(t, t[1:]))
    assert pm.dp_time(c, 2, 2, 256, pm.Machine(lat=(0, 0, 0))) < pm.dp_time(c, 2, 2, 256)


def test_loading_is_overlapped_and_shared_by_the_node(cal):
    c = preset("c1_1way")
    one, eight = (pm.step_time(c, 1, 1, n, "tf32", True, cal) for n in (1, 8))
    assert one["io_wait"] == 0 and eight["io_wait"] > 0  # four ranks per node wait for the node's reads
    c4 = preset("c4_4way")
    assert pm.step_time(c4, 2, 2, 64, "tf32", True, cal)["io_wait"] == 0  # one sample per node: hidden
    io = [pm.io_time(c, p, q, 64, cal) for p, q in ((1, 1), (1, 2), (2, 2))]
    assert io[0] == pytest.approx(2 * io[1]) and io[1] == pytest.approx(2 * io[2])
    assert pm.h2d_time(c, 2, 2) == pytest.approx(pm.h2d_time(c, 1, 1) / 4)


def test_monotone_in_hardware_and_size(cal):
    c = preset("c3", **pm._REL)
    base = pm.step_time(c, 2, 2, 64, "tf32", True, cal)["step"]
    for hw in (pm.Machine(nvlink_pair=25e9), pm.Machine(net_node=25e9), pm.Machine(hbm=1e12), pm.Machine(pcie=5e9)):
        assert pm.step_time(c, 2, 2, 64, "tf32", True, cal, hw)["step"] > base
    assert pm.step_time(c, 2, 2, 64, "fp32", True, cal)["step"] > base
    assert pm.step_time(preset("c3", hidden=8192, **pm._REL), 2, 2, 64, "tf32", True, cal)["step"] > base
    assert pm.step_time(c, 2, 2, 64, "tf32", False, cal)["step"] < base
    assert pm.step_time(c, 2, 2, 64, "tf32", True, cal, overlap=0.0)["step"] >= base


def test_more_ways_less_per_rank_and_weak_efficiency_falls(cal):
    c = preset("c3")
    t = [pm.step_time(c, p, q, p * q, "fp32", False, cal)["step"] for p, q in ((1, 1), (1, 2), (2, 2))]
    assert t[0] > t[1] > t[2]
    for way, (p, q) in pm.LAYOUTS.items():
        e = [pm.weak_efficiency(pm.C4_MODELS[way], p, q, n, "tf32", cal) for n in pm.C4_GPUS]
        assert all(a >= b for a, b in zip(e, e[1:])) and e[0] <= 1


def test_exchanges_hide_behind_gemms_when_overlapped(cal):
    c = preset("c3")
    for s in ("activations", "summa", "released"):
        exposed, hidden = (pm.mp_time(c, 2, 2, "tf32", cal, schedule=s, overlap=o) for o in (0.0, 1.0))
        assert exposed >= hidden >= 0
    assert pm.mp_time(c, 2, 2, "tf32", cal, schedule="released") > pm.mp_time(c, 2, 2, "tf32", cal, schedule="summa")
    assert pm.link_bw(2, 2, pm.Machine(gpus_per_node=2)) == 50e9 / 2  # a 4-way group across nodes of 2 GPUs


def test_schedule_verdict_for_c4_four_way(cal):
    v = pm.schedule_verdict(preset("c4_4way"), pm.A100_NODE, cal)
    assert v["summa"]["block_bytes"] / v["activations"]["block_bytes"] == pytest.approx(13.74 / 8.59, rel=2e-3)
    for o in (0, 1):
        winner, margin = v[f"winner_overlap_{o}"]
        a, s = v["activations"]["step"][float(o)], v["summa"]["step"][float(o)]
        assert winner == ("activations" if a <= s else "summa") and margin == pytest.approx(abs(a - s) / max(a, s))
        assert margin < 0.1
    assert v["activations"]["exposed"][0.0] > v["activations"]["exposed"][1.0]


def test_predict_local_uses_only_its_inputs():
    c = preset("medium")
    a = pm.predict_local(c, gemm_gflops=100.0, bw_bytes_s=5e9, latency_s=5e-6)
    b = pm.predict_local(c, gemm_gflops=200.0, bw_bytes_s=5e9, latency_s=5e-6)
    assert set(a) == {1, 2, 4}
    assert a[1]["step"] == pytest.approx(train_step_flops(c) / 100e9) and a[1]["comm"] == 0
    for w in (2, 4):
        assert b[w]["gemm"] == pytest.approx(a[w]["gemm"] / 2)
        assert a[w]["comm"] == pytest.approx(a[w]["bytes"] / 5e9 + a[w]["messages"] * 5e-6)
        assert a[w]["bytes"] == pm.mp_bytes(c, *pm.LAYOUTS[w]) > 0
    slow = pm.predict_local(c, 100.0, 1e9, 5e-6, ways=(2,))
    assert set(slow) == {2} and slow[2]["comm"] > a[2]["comm"]
    assert pm.predict_local(c, 100.0, 5e9, 5e-6, mem_bytes_s=10e9)[2]["mem"] > 0 == a[2]["mem"]
