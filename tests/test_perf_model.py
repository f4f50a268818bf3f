"""The performance model: its volumes and FLOPs are the algorithm's, it moves the right way, and it prints every paper cell."""
import pytest

from jigsaw_ref.comm import expected_bytes
from jigsaw_ref.config import preset
from jigsaw_ref.mixer import train_step_flops
from jigsaw_ref.pmatmul import block_bytes
from jigsaw_ref import perfmodel as pm


@pytest.fixture(scope="module")
def cal():
    return pm.calibrate()


@pytest.fixture(scope="module")
def rows(cal):
    return pm.comparison(cal)


@pytest.mark.parametrize("p,q", [(1, 2), (2, 1), (2, 2), (1, 4)])
def test_mixer_block_traffic_is_block_bytes_times_blocks_forward_and_backward(p, q):
    c = preset("tiny", n_lon=64, hidden=64)  # no encoder/decoder traffic for this check: compare the block part
    T, H, S, G = c.tokens, c.hidden, c.token_hidden, c.channel_hidden
    e = lambda kind, n, numel: expected_bytes(kind, n, numel, 4)
    Ti, pix_i, Vo, P = T // p, c.n_lat * c.n_lon // p, c.n_out, c.patch
    enc_dec = (e("all_gather", p, c.n_in * P * H) + e("reduce_scatter", q, Ti * H) + e("all_gather", p, 2 * H * Vo * P)
               + e("reduce_scatter", q, Ti * Vo * P) + 2 * e("all_reduce", q, Ti) + e("all_gather", p, (Vo + c.n_res_in) * Vo)
               + e("reduce_scatter", q, pix_i * Vo) + 4 * e("all_reduce", q, pix_i))
    assert pm.mp_bytes(c, p, q) == 2 * (c.blocks * block_bytes(T, H, S, G, p, q) + enc_dec)


@pytest.mark.parametrize("p,q", [(1, 2), (2, 2)])
def test_paper_sizes_block_volume_equals_block_bytes(p, q):
    c = preset("c3")
    blocks_only = pm.mp_bytes(c.replace(blocks=2), p, q) - pm.mp_bytes(c.replace(blocks=1), p, q)
    assert blocks_only == 2 * block_bytes(c.tokens, c.hidden, c.token_hidden, c.channel_hidden, p, q)


def test_one_way_sends_nothing():
    assert pm.mp_bytes(preset("c3"), 1, 1) == 0
    assert pm.dp_time(preset("c3"), 1, 1, 1) == 0


@pytest.mark.parametrize("name", ["c3", "c1_1way", "c4_2way", "c4_4way"])
@pytest.mark.parametrize("p,q", [(1, 1), (1, 2), (2, 2)])
def test_gemm_time_is_train_step_flops_over_rate(name, p, q, cal):
    c = preset(name)
    for pr in ("fp32", "tf32"):
        rate = cal.eta_of(pr) * pm.A100_NODE.peak_of(pr)
        assert pm.gemm_time(c, p, q, pr, cal) == pytest.approx(train_step_flops(c) / (p * q) / rate, rel=1e-12)


def test_headline_flops_use_train_step_flops(cal):
    c = preset("c4_2way")
    t = pm.step_time(c, 1, 2, 256, "tf32", True, cal)["step"]
    assert pm.pflops(c, 1, 2, 256, "tf32", cal)[0] == pytest.approx(128 * train_step_flops(c) / t / 1e15, rel=1e-12)


def test_calibration_cells_are_reproduced(cal):
    assert pm.step_time(pm.c3_model(1), 1, 1, 1, "fp32", False, cal)["step"] == pytest.approx(3.03, rel=1e-9)
    assert pm.step_time(pm.c3_model(1), 1, 1, 1, "tf32", False, cal)["step"] == pytest.approx(0.712, rel=1e-9)
    assert pm.weak_efficiency(pm.C4_MODELS[4], 2, 2, 8, "tf32", cal) == pytest.approx(0.94, rel=1e-6)
    assert pm.weak_efficiency(pm.C4_MODELS[1], 1, 1, 8, "tf32", cal) == pytest.approx(0.66, rel=1e-6)
    assert 0 < cal.eta_of("tf32") < cal.eta_of("fp32") < 1 and 0 <= cal.overlap <= 1 and cal.io_node > 0


def test_monotone_in_hardware_and_size(cal):
    c = preset("c3")
    base = pm.step_time(c, 2, 2, 64, "tf32", True, cal)["step"]
    for hw in (pm.Machine(nvlink_pair=50e9), pm.Machine(net_node=50e9), pm.Machine(hbm=1e12)):
        assert pm.step_time(c, 2, 2, 64, "tf32", True, cal, hw)["step"] > base
    assert pm.step_time(c, 2, 2, 64, "tf32", True, pm.Calib(cal.eta, cal.overlap, cal.io_node / 2))["step"] > base
    assert pm.step_time(c, 2, 2, 64, "fp32", True, cal)["step"] > base
    assert pm.step_time(preset("c3", hidden=8192), 2, 2, 64, "tf32", True, cal)["step"] > base
    assert pm.step_time(c, 2, 2, 64, "tf32", False, cal)["step"] < base


def test_more_ways_less_per_rank_and_weak_efficiency_falls(cal):
    c = preset("c3")
    t = [pm.step_time(c, p, q, p * q, "fp32", False, cal)["step"] for p, q in ((1, 1), (1, 2), (2, 2))]
    assert t[0] > t[1] > t[2]
    for way, (p, q) in pm.LAYOUTS.items():
        e = [pm.weak_efficiency(pm.C4_MODELS[way], p, q, n, "tf32", cal) for n in pm.C4_GPUS]
        assert all(a >= b for a, b in zip(e, e[1:])) and e[0] <= 1


def test_io_relief_from_domain_parallelism(cal):
    # per node, 1-way at scale reads 4 samples per step, 2-way 2, 4-way 1
    c = preset("c3")
    io = [pm.io_time(c, p, q, 64, cal) for p, q in ((1, 1), (1, 2), (2, 2))]
    assert io[0] == pytest.approx(2 * io[1]) and io[1] == pytest.approx(2 * io[2])


def test_table_has_every_paper_cell(rows):
    names = [r[0] for r in rows]
    for pr in ("fp32", "tf32"):
        assert f"C3 {pr} 1 GPU s/step" in names
        for way in (2, 4): assert f"C3 {pr} {way}-way speedup" in names
    for way, effs in pm.PAPER["c4"].items():
        for n, e in zip(pm.C4_GPUS, effs):
            row = next(r for r in rows if r[0] == f"C4 {way}-way {n} GPUs")
            assert row[1] == e
    for way in (1, 2, 4):
        assert f"256 GPUs {way}-way PFLOP/s" in names and f"256 GPUs {way}-way % of peak" in names
    assert len(rows) == 30 and sum(r[4] == "cal" for r in rows) == len(pm.CALIBRATION_CELLS)
    table = pm.format_table(rows)
    assert all(n in table for n in names)


def test_errors_are_computed_not_stored(rows):
    for name, ref, pred, err, _ in rows:
        assert err == pytest.approx(pred / ref - 1)
