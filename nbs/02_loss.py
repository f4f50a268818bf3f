# %%
#| default_exp loss

# %%
#| export
from __future__ import annotations
import math, re
import torch
from jigsaw_ref.config import MixerConfig

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail

# %% [markdown]
# # Loss and latitude weights
#
# > The released code's latitude-, variable- and level-weighted MSE, and WeatherBench2's cell-area latitude weights.

# %% [markdown]
# ## Latitude weights
#
# On an equiangular grid a cell near the pole covers far less of the sphere than one at the equator.
# The released Jigsaw code weights each row by $\cos\phi$; WeatherBench2 uses the exact area of the
# cell between its latitude edges, $\propto \sin\phi_{i+1/2} - \sin\phi_{i-1/2}$, with the edges clipped
# to $\pm 90°$ (so a pole row gets the area of its half cell). Both are normalised to mean 1 over the
# **global** grid; a domain shard slices these weights and never renormalises them.

# %%
#| export
def lat_weights_cos(lat):
    "cos(latitude) weights normalised to mean 1; `lat` in degrees, any order."
    w = torch.cos(torch.deg2rad(torch.as_tensor(lat, dtype=torch.float64))).clamp(min=0)
    return w / w.mean()


def lat_weights_area(lat):
    "WeatherBench2 cell-area weights normalised to mean 1; `lat` (degrees) equally spaced, any order."
    lat = torch.as_tensor(lat, dtype=torch.float64)
    d = (lat[1] - lat[0]).abs() if len(lat) > 1 else torch.tensor(180.0, dtype=torch.float64)
    up = torch.deg2rad((lat + d / 2).clamp(-90, 90))
    lo = torch.deg2rad((lat - d / 2).clamp(-90, 90))
    w = (torch.sin(up) - torch.sin(lo)).abs()
    return w / w.mean()

# %% [markdown]
# Brute force: the area of a band is $2\pi R^2 (\sin\phi_2 - \sin\phi_1)$; summing the weighted bands
# must give the whole sphere. On the 0.25° ERA5 grid, which has pole rows, cos gives a pole row exactly
# zero weight while the area weight gives it the small positive area of its half cell.

# %%
_lat = torch.linspace(-90, 90, 721, dtype=torch.float64)
_wa = lat_weights_area(_lat)
test_close(_wa.mean(), 1.0)
_band = lambda a, b: 2 * math.pi * (math.sin(math.radians(b)) - math.sin(math.radians(a)))
_exact = torch.tensor([_band(max(-90, l - .125), min(90, l + .125)) for l in _lat.tolist()], dtype=torch.float64)
test_close(_wa, _exact / _exact.mean(), eps=1e-10)
test_eq(lat_weights_cos(_lat)[0].item() < 1e-12, True)
assert _wa[0] > 0
test_close(lat_weights_area(torch.flip(_lat, [0])), torch.flip(_wa, [0]))

# %% [markdown]
# ## Variable weights
#
# The released training recipe weights each variable: MSL 1.5, U10 0.77, V10 0.77, T2M 3.0 (the
# surface weights are all multiplied by 4), Z 3.0, Q 0.6, T 1.5, U 0.9, V 0.9, times a level factor:
# 1 for 1000..500 hPa, then 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3 for 400, 300, 250, 200, 150, 100, 50 hPa.
# Padding channels get weight 0. Unknown names are an error, not a silent weight.

# %%
#| export
VAR_WEIGHTS = {"msl": 1.5, "u10": 0.77, "v10": 0.77, "t2m": 3.0, "z": 3.0, "q": 0.6, "t": 1.5, "u": 0.9, "v": 0.9}
SURFACE_FACTOR = 4.0
LEVEL_FACTOR = {400: 0.9, 300: 0.8, 250: 0.7, 200: 0.6, 150: 0.5, 100: 0.4, 50: 0.3}  # others: 1


def channel_weight(name: str) -> float:
    "Loss weight of one channel name (`msl`, `z500`, ...) in the released recipe."
    if name in ("msl", "u10", "v10", "t2m"): return VAR_WEIGHTS[name] * SURFACE_FACTOR
    m = re.fullmatch(r"([a-z]+?)(\d+)", name)
    if not m or m[1] not in VAR_WEIGHTS:
        raise ValueError(f"no loss weight for channel {name!r}: expected a surface name "
                         f"(msl, u10, v10, t2m) or one of {sorted(set(VAR_WEIGHTS) - {'msl','u10','v10','t2m'})} with a level")
    return VAR_WEIGHTS[m[1]] * LEVEL_FACTOR.get(int(m[2]), 1.0)


def variable_weights(cfg: MixerConfig) -> torch.Tensor:
    "Weights of the `cfg.n_out` predicted channels, padding targets 0."
    w = [channel_weight(n) for n in cfg.variables] + [0.0] * cfg.out_pad
    return torch.tensor(w, dtype=torch.float64)

# %%
test_eq(channel_weight("t2m"), 12.0)
test_close(channel_weight("z250"), 2.1)
test_eq(channel_weight("t850"), 1.5)
test_fail(lambda: channel_weight("sst"), contains="no loss weight for channel 'sst'")

# %% [markdown]
# ## The weighted MSE
#
# The released code multiplies prediction and target by $w_{c,i} = w^\text{lat}_i\, w^\text{var}_c$ before the
# squared error, so the weights act **squared**:
#
# $$L = \frac{1}{B\,V_\text{out}\,n_\text{lat}\,n_\text{lon}} \sum_{b,c,i,l} \big(w_{c,i}\,(\hat y_{bcil} - y_{bcil})\big)^2 .$$
#
# The mean runs over every output channel, padding included, and over the global grid; a domain or
# channel shard contributes its partial sum divided by the *global* count, so shards add up to $L$.

# %%
#| export
def weighted_mse(pred, target, lat_w, var_w, count: int | None = None):
    "Released-code loss: mean of ((pred - target) * lat_w[i] * var_w[c])^2 over (B, C, lat, lon), divided by `count` if given."
    w = var_w.to(pred)[:, None, None] * lat_w.to(pred)[None, :, None]  # c i 1
    se = ((pred - target) * w).square().sum()
    return se / (count if count is not None else pred.numel())

# %% [markdown]
# Checked against a brute-force loop, and the shard property: partial sums over two longitude halves
# with the global count add up to the whole.

# %%
_p, _t = torch.randn(2, 3, 4, 6, dtype=torch.float64), torch.randn(2, 3, 4, 6, dtype=torch.float64)
_lw, _vw = torch.rand(4, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
_bf = sum(((_p[b, c, i, l] - _t[b, c, i, l]) * _lw[i] * _vw[c]) ** 2
          for b in range(2) for c in range(3) for i in range(4) for l in range(6)) / _p.numel()
test_close(weighted_mse(_p, _t, _lw, _vw), _bf)
_halves = [weighted_mse(_p[..., s], _t[..., s], _lw, _vw, count=_p.numel()) for s in (slice(0, 3), slice(3, 6))]
test_close(sum(_halves), weighted_mse(_p, _t, _lw, _vw))
