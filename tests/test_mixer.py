"""The one-process WeatherMixer: shapes, exact gradients, determinism, and that it can learn."""
import math

import pytest
import torch
from torch.func import functional_call

from jigsaw_ref.config import ConfigError, MixerConfig, preset
from jigsaw_ref.loss import lat_weights_cos, variable_weights, weighted_mse
from jigsaw_ref.mixer import WeatherMixer, forward_flops, param_count, param_shapes

RELEASED_1WAY = {  # (H, f_s, f_c): parameter count printed by the released code
    (4896, 0.5, 1): 1_101_500_346, (4320, 0.5, 1): 1_062_380_154, (2832, 0.5, 1): 979_747_050,
    (2192, 0.25, 1): 504_466_890, (1600, 0.125, 1): 259_570_794, (1024, 0.125, 0.25): 238_511_658,
    (512, 0.125, 1): 232_052_010, (368, 0.03125, 1): 61_507_806, (256, 0.125, 0.125): 227_296_650}


@pytest.mark.parametrize("key", list(RELEASED_1WAY))
def test_param_count_equals_released_1way(key):
    H, fs, fc = key
    assert param_count(MixerConfig(hidden=H, f_s=fs, f_c=fc)) == RELEASED_1WAY[key]


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_param_count_equals_built_model(name):
    cfg = preset(name)
    m = WeatherMixer(cfg)
    assert sum(p.numel() for p in m.parameters()) == param_count(cfg)


def test_output_shape_and_padding():
    cfg = preset("tiny", out_pad=1)
    x = torch.randn(3, cfg.n_in, cfg.n_lat, cfg.n_lon)
    y = WeatherMixer(cfg)(x, k=2)
    assert y.shape == (3, cfg.n_out, cfg.n_lat, cfg.n_lon)
    assert y[:, cfg.n_vars:].abs().max() == 0


def _tiny64(**kw):
    cfg = preset("tiny", n_lat=4, n_lon=8, patch=4, hidden=6, f_s=1.0, f_c=1.0, blocks=1,
                 variables=("msl", "t2m", "z500"), statics=("lsm",), **kw)
    return cfg, WeatherMixer(cfg, dtype=torch.float64)


def test_gradcheck_input_float64():
    cfg, m = _tiny64()
    x = torch.randn(1, cfg.n_in, cfg.n_lat, cfg.n_lon, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: m(x, k=2), (x,), eps=1e-6, atol=1e-6)


def test_gradcheck_weights_float64():
    cfg, m = _tiny64()
    x = torch.randn(1, cfg.n_in, cfg.n_lat, cfg.n_lon, dtype=torch.float64)
    names = ["enc.w", "blocks.0.tok1.w", "blocks.0.ch2.w", "dec.w", "res.w", "blocks.0.ln1.w"]
    st = m.state()
    for n in names:
        leaf = st[n].detach().clone().requires_grad_(True)

        def g(w, n=n):  # the model as a function of one weight, all others fixed
            return functional_call(m, {"params." + n.replace(".", "/"): w}, (x,))
        assert torch.autograd.gradcheck(g, (leaf,), eps=1e-6, atol=1e-6), n


def test_seeded_determinism():
    cfg = preset("tiny")
    x = torch.randn(2, cfg.n_in, cfg.n_lat, cfg.n_lon)
    a, b = WeatherMixer(cfg, seed=7), WeatherMixer(cfg, seed=7)
    assert torch.equal(a(x), b(x))
    assert not torch.equal(a(x), WeatherMixer(cfg, seed=8)(x))


def test_dropout_only_in_training():
    cfg = preset("tiny", dropout=0.5)
    m = WeatherMixer(cfg)
    x = torch.randn(1, cfg.n_in, cfg.n_lat, cfg.n_lon)
    m.eval()
    assert torch.equal(m(x), m(x))
    m.train()
    a = m(x, key=0)
    assert not torch.equal(a, m(x, key=1))  # another step's key: other masks
    assert torch.equal(a, m(x, key=0))  # masks are a function of the key alone, not of torch's random state
    assert not torch.equal(a, m.eval()(x))


def test_overfits_one_batch():
    cfg = preset("tiny")
    torch.manual_seed(0)
    m = WeatherMixer(cfg)
    x = torch.randn(2, cfg.n_in, cfg.n_lat, cfg.n_lon)
    y = torch.randn(2, cfg.n_out, cfg.n_lat, cfg.n_lon)
    lw = lat_weights_cos(torch.linspace(-84.375, 84.375, cfg.n_lat))
    vw = variable_weights(cfg)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        opt.zero_grad()
        loss = weighted_mse(m(x), y, lw, vw)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_flops_scale_with_batch_and_rollout():
    cfg = preset("small")
    assert forward_flops(cfg, batch=2) == 2 * forward_flops(cfg)
    assert forward_flops(cfg, k=2) > forward_flops(cfg)


@pytest.mark.parametrize("kw,msg", [
    (dict(n_lon=100, patch=60), "not divisible by patch=60"),
    (dict(hidden=0), "hidden=0"),
    (dict(rollout=(0, 2)), "rollout=(0, 2)"),
    (dict(dropout=1.5), "dropout=1.5"),
    (dict(f_c=-1.0), "f_c=-1.0"),
    (dict(variables=("msl", "msl")), "listed twice"),
])
def test_bad_configs_name_the_field(kw, msg):
    with pytest.raises(ConfigError, match=__import__("re").escape(msg)):
        MixerConfig(**kw)


# ---------------------------------------------------------------- the layout-independent dropout mask

from jigsaw_ref import mixer  # noqa: E402
from jigsaw_ref.mixer import dropout, drop_index, keep_mask  # noqa: E402


@pytest.mark.parametrize("p", [1e-3, 0.05, 0.5])
def test_dropout_rate_over_keys_is_p(p):
    "Over 20 keys and 4M elements the drop rate is p within 4 standard deviations (the thresholds are floor((1-p)^k 2^32))."
    n = 0
    for key in range(20):
        n += int((~keep_mask((2, 200, 1000), p, key, (0, 0, 0), (2, 200, 1000))).sum())
    N = 20 * 2 * 200 * 1000
    assert abs(n / N - p) < 4 * math.sqrt(p * (1 - p) / N), (n / N, p)


def test_dropout_gaps_are_geometric_and_rows_independent():
    "Runs of kept elements along a row follow P(g >= k) = (1-p)^k; drop counts of neighbouring rows are uncorrelated."
    p = 0.1
    long = ~keep_mask((1, 20, 20000), p, 3, (0, 0, 0), (1, 20, 20000))[0]  # long rows: gaps cut by a row's end are rare
    cols = [torch.nonzero(row).flatten() for row in long]
    gaps = torch.cat([torch.diff(torch.cat([torch.tensor([-1]), c])) - 1 for c in cols]).double()
    for k in (1, 2, 5, 10, 20):
        want = (1 - p) ** k
        assert abs((gaps >= k).double().mean() - want) < 4 * math.sqrt(want * (1 - want) / gaps.numel()), k
    counts = (~keep_mask((1, 2000, 500), p, 3, (0, 0, 0), (1, 2000, 500))[0]).sum(1).double()
    r = torch.corrcoef(torch.stack([counts[:-1], counts[1:]]))[0, 1]
    assert abs(r) < 4 / math.sqrt(counts.numel()), r


def test_dropout_block_is_the_full_masks_block_for_random_blocks():
    "Any block (random offsets and sizes, 1 to 4 dims) has exactly the full tensor's drops there."
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        nd = 1 + trial % 4
        full = [int(torch.randint(1, 9, (), generator=g)) for _ in range(nd)]
        p = [0.001, 0.2, 0.6][trial % 3]
        whole = keep_mask(full, p, trial, (0,) * nd, full)
        a = [int(torch.randint(0, f, (), generator=g)) for f in full]
        b = [int(torch.randint(lo + 1, f + 1, (), generator=g)) for lo, f in zip(a, full)]
        part = keep_mask([hi - lo for lo, hi in zip(a, b)], p, trial, a, full)
        assert torch.equal(part, whole[tuple(slice(lo, hi) for lo, hi in zip(a, b))]), (full, a, b, p)


def test_dropout_more_draws_give_the_same_drops(monkeypatch):
    "Rows that need more gaps than one draw gives (forced with one gap per draw) get the same drops."
    want = drop_index((3, 7, 300), 0.2, 5, (0, 2, 100), (0, 9, 400))
    monkeypatch.setattr(mixer, "_gaps_per_draw", lambda end, p: 1)
    assert torch.equal(drop_index((3, 7, 300), 0.2, 5, (0, 2, 100), (0, 9, 400)), want) and want.numel() > 100


def test_dropout_rows_past_2_32_differ_and_keys_differ():
    "Row numbers beyond 2^32 have their own streams (the row's high word enters the hash); other keys, other drops."
    lo = keep_mask((1, 3, 64), 0.3, 1, (0, 5, 0), (1, 2**33, 64))
    hi = keep_mask((1, 3, 64), 0.3, 1, (0, 2**32 + 5, 0), (1, 2**33, 64))
    assert not torch.equal(lo, hi)
    assert not torch.equal(lo, keep_mask((1, 3, 64), 0.3, 2, (0, 5, 0), (1, 2**33, 64)))


def test_dropout_saves_only_the_dropped_positions():
    "The backward uses the saved dropped positions (about p of the elements), not a mask or the input."
    x = torch.randn(4, 256, 512, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = dropout(x, 1e-3, True, key=3)
    assert sum(t.numel() * t.element_size() for t in saved) < 0.02 * x.numel() * x.element_size()
    g = torch.randn_like(y)
    y.backward(g)
    m = keep_mask(x.shape, 1e-3, 3, (0, 0, 0), x.shape)
    assert torch.equal(x.grad, g * m / (1 - 1e-3)) and torch.equal(y.detach(), x.detach() * m / (1 - 1e-3))
