# %%
#| default_exp loss

# %%
#| export
from __future__ import annotations
import math
import numpy as np
import torch
from jigsaw_ref.config import MixerConfig, canonical, wb2_name

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

# %% [markdown]
# **Cell edges.** Not every grid is equally spaced: a Gaussian grid's rows sit at the roots of a Legendre
# polynomial, closer to the pole than half a spacing. Edges are the midpoints between neighbouring rows, and
# the outer edges lie half the neighbouring spacing beyond the first and last rows, clipped to $\pm 90°$; on
# an equally spaced grid this is exactly WeatherBench2's rule.

# %%
#| export
def lat_edges(lat) -> torch.Tensor:
    "The `len(lat) + 1` cell edges (degrees, clipped to +-90) of rows `lat` (any order, monotonic): midpoints, outer half spacings."
    lat = torch.tensor(np.asarray(lat, np.float64))
    if len(lat) < 2: return torch.tensor([-90.0, 90.0], dtype=torch.float64)
    mid = (lat[1:] + lat[:-1]) / 2
    return torch.cat([2 * lat[:1] - mid[:1], mid, 2 * lat[-1:] - mid[-1:]]).clamp(-90, 90)

# %% [markdown]
# **Gaussian grids.** There the exact answer is known: the rows are the Gauss-Legendre nodes
# $\mu_k = \sin\phi_k$ and the area each row stands for is its quadrature weight $w_k$ (they sum to 2, the
# integral of $d\mu$). Edges from midpoints are up to 1% off those weights at the polar rows, equal-spacing
# edges 1.8%; so a grid whose rows are Gaussian latitudes (to 1e-3 degrees, as stores round them) gets its
# quadrature weights.

# %%
#| export
def gaussian_weights(lat, tol: float = 1e-3) -> torch.Tensor | None:
    "Gauss-Legendre quadrature weights of rows `lat` (degrees, either order) if they are the Gaussian latitudes, else None."
    lat = np.asarray(lat, np.float64); n = len(lat)
    if n < 2: return None
    mu, w = np.polynomial.legendre.leggauss(n)
    nodes = np.rad2deg(np.arcsin(mu))
    order = np.argsort(lat)
    if np.abs(lat[order] - nodes).max() > tol: return None
    out = np.empty(n); out[order] = w
    return torch.from_numpy(out)

# %%
#| export
def lat_weights_area(lat,
                     edges=None,  # optional cell edges (n + 1, degrees) or bounds (n, 2), e.g. from the store's `lat_bnds`
                    ):
    "Cell-area weights normalised to mean 1 (WeatherBench2): from `edges`, Gaussian quadrature, or edges at midpoints."
    lat = torch.tensor(np.asarray(lat, np.float64))
    if edges is None and (g := gaussian_weights(lat)) is not None: return g / g.mean()
    e = lat_edges(lat) if edges is None else torch.as_tensor(edges, dtype=torch.float64)
    up, lo = (e[:, 0], e[:, 1]) if e.ndim == 2 else (e[1:], e[:-1])
    w = (torch.sin(torch.deg2rad(up.clamp(-90, 90))) - torch.sin(torch.deg2rad(lo.clamp(-90, 90)))).abs()
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
# A Gaussian grid (64 rows, as a T42 model writes them, rounded to 4 decimals) gets its quadrature weights
# exactly; explicit bounds win over everything; an unequal non-Gaussian grid's weights still add up to the sphere.

# %%
_mu, _gw = np.polynomial.legendre.leggauss(64)
_glat = np.round(np.rad2deg(np.arcsin(_mu))[::-1], 4)  # north to south
test_close(lat_weights_area(_glat), torch.from_numpy(_gw[::-1] / _gw.mean()), eps=1e-12)
_s3 = math.degrees(math.asin(1 / 3))  # three bands of equal area: sin(edges) = -1, -1/3, 1/3, 1
test_close(lat_weights_area([-60., 0, 60], edges=[-90, -_s3, _s3, 90]), torch.ones(3), eps=1e-12)
test_eq(lat_edges([-80., -50, -10]).tolist(), [-90.0, -65.0, -30.0, 10.0])  # outer edges: -95 clipped, -10 + 20

# %% [markdown]
# ## Variable weights
#
# The released training recipe weights each variable: MSL 1.5, U10 0.77, V10 0.77, T2M 3.0 (the
# surface weights are all multiplied by 4), Z 3.0, Q 0.6, T 1.5, U 0.9, V 0.9, times a level factor:
# 1 for 1000..500 hPa, then 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3 for 400, 300, 250, 200, 150, 100, 50 hPa.
# Padding channels get weight 0.
#
# **Other channels.** A channel outside the recipe (any variable of your store, e.g. `surface_pressure` or
# `vertical_velocity@500`) gets `DEFAULT_WEIGHT` = 1.0: the weight of a mid-range recipe channel (between T's 1.5
# and the winds' 0.9, far below the surface fields' 3 to 12), so a new channel neither dominates the loss nor
# vanishes from it. Any channel's weight, known or not, can be set in the config:
# `MixerConfig(loss_weights={"surface_pressure": 6.0})`, or `--set loss_weights=surface_pressure=6,z500=2`.

# %%
#| export
VAR_WEIGHTS = {"msl": 1.5, "u10": 0.77, "v10": 0.77, "t2m": 3.0, "z": 3.0, "q": 0.6, "t": 1.5, "u": 0.9, "v": 0.9}
SURFACE_FACTOR = 4.0
LEVEL_FACTOR = {400: 0.9, 300: 0.8, 250: 0.7, 200: 0.6, 150: 0.5, 100: 0.4, 50: 0.3}  # others: 1
DEFAULT_WEIGHT = 1.0  # channels outside the released recipe


def channel_weight(name: str, overrides: dict | None = None) -> float:
    "Loss weight of channel `name`: `overrides`, else the released recipe (any spelling), else `DEFAULT_WEIGHT`."
    if overrides and name in overrides: return float(overrides[name])
    c = canonical(name)
    if c in ("msl", "u10", "v10", "t2m"): return VAR_WEIGHTS[c] * SURFACE_FACTOR
    try: var, level = wb2_name(c)
    except KeyError: return DEFAULT_WEIGHT
    head = c[: len(c) - len(str(level))] if level is not None else c
    return VAR_WEIGHTS[head] * LEVEL_FACTOR.get(level, 1.0) if head in VAR_WEIGHTS else DEFAULT_WEIGHT

# %%
#| export
def variable_weights(cfg: MixerConfig) -> torch.Tensor:
    "Weights of the `cfg.n_out` predicted channels (`cfg.loss_weights` first), padding targets 0."
    over = dict(cfg.loss_weights)
    w = [channel_weight(n, over) for n in cfg.variables] + [0.0] * cfg.out_pad
    return torch.tensor(w, dtype=torch.float64)

# %%
test_eq(channel_weight("t2m"), 12.0)
test_close(channel_weight("z250"), 2.1)
test_close(channel_weight("geopotential@250"), 2.1)  # the same channel, spelt as a store variable
test_eq(channel_weight("t850"), 1.5)
test_eq(channel_weight("surface_pressure"), DEFAULT_WEIGHT)
test_eq(channel_weight("lsm"), DEFAULT_WEIGHT)  # statics are inputs, never weighted in the loss; no recipe entry
_c = MixerConfig(n_lat=4, n_lon=8, patch=4, hidden=4, variables=("z500", "sp"), statics=(), out_pad=1, loss_weights="sp=6")
test_eq(variable_weights(_c).tolist(), [3.0, 6.0, 0.0])

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
