# %%
#| default_exp generator

# %%
#| export
from __future__ import annotations
import os, shutil, time, uuid
from dataclasses import dataclass
from pathlib import Path
import numpy as np
import xarray as xr
from tqdm.auto import tqdm
from zarr.codecs import Crc32cCodec, ZstdCodec
from jigsaw_ref.config import CPU_CHANNELS, CPU_LEVELS, STATICS, WB2_NAMES
from jigsaw_ref.data import cache_dir

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail
import json, tempfile

# %% [markdown]
# # Generator
#
# > Embedded default data with real dynamics: a forced two-layer quasi-geostrophic model on the sphere, written out as an ERA5-like WeatherBench2 zarr store.

# %% [markdown]
# Multi-year 0.25 degree ERA5 cannot be downloaded here, so the default data comes from a small
# atmosphere model of our own. It has what makes forecasting non-trivial: baroclinically unstable
# mid-latitude jets that shed travelling eddies (the state changes a lot in 6-24 h), a seasonal cycle
# in the radiative forcing, orography and land-sea contrast that anchor stationary waves, a moisture
# tracer with evaporation and condensation, and a diurnal cycle in the surface fields. It is
# deterministic for a seed and takes about a fifth of a second per simulated day at T21.
#
# The pieces, in order: a spectral transform on the sphere, a synthetic geography, the two-layer model,
# the diagnosis of the 19 ERA5 channels from its state, and the zarr writer with its cache.

# %% [markdown]
# ## Spherical harmonics
#
# A field on the sphere is a sum of spherical harmonics
# $f(\lambda, \varphi) = \sum_{m=0}^{L} \sum_{l=m}^{L} \mathrm{Re}'\, c_{lm} \bar P_l^m(\sin\varphi)\, e^{i m \lambda}$
# (the prime: the $m > 0$ terms count twice, as in a real FFT). The associated Legendre functions
# $\bar P_l^m(\mu)$ are normalised so $\int_{-1}^{1} (\bar P_l^m)^2 d\mu = 1$ and come from the
# recurrences
#
# $$\bar P_m^m = \sqrt{\tfrac{2m+1}{2m}}\cos\varphi\,\bar P_{m-1}^{m-1},\qquad
# \bar P_l^m = \frac{\mu \bar P_{l-1}^m - \epsilon_{l-1}^m \bar P_{l-2}^m}{\epsilon_l^m},\qquad
# \epsilon_l^m = \sqrt{\tfrac{l^2 - m^2}{4l^2-1}},$$
#
# and their latitude derivative from $\cos\varphi\, \partial_\varphi \bar P_l^m = -l\,\epsilon_{l+1}^m \bar P_{l+1}^m + (l+1)\,\epsilon_l^m \bar P_{l-1}^m$.

# %%
#| export
A_EARTH = 6.371e6  # Earth radius, m
OMEGA = 7.292e-5  # rotation rate, 1/s
G = 9.80665  # gravity, m/s^2
R_DRY = 287.05  # gas constant of dry air, J/(kg K)
F0 = 1e-4  # reference Coriolis parameter of the quasi-geostrophic balance, 1/s


def _eps(l, m): return np.sqrt((l * l - m * m) / (4 * l * l - 1)) if l > 0 else 0.0

# %%
#| export
def legendre(L: int,  # triangular truncation: degrees l <= L, orders m <= L
             mu,  # sin(latitude) of the points, shape (K,)
            ) -> tuple[np.ndarray, np.ndarray]:
    "Orthonormal associated Legendre functions `P[m, l, k]` and their latitude derivatives `dP[m, l, k]`."
    mu = np.asarray(mu, float); c = np.sqrt(1 - mu**2)
    P = np.zeros((L + 1, L + 2, len(mu)))
    P[0, 0] = np.sqrt(0.5)
    for m in range(1, L + 1): P[m, m] = np.sqrt((2 * m + 1) / (2 * m)) * c * P[m - 1, m - 1]
    for m in range(L + 1):
        P[m, m + 1] = np.sqrt(2 * m + 3) * mu * P[m, m]
        for l in range(m + 2, L + 2): P[m, l] = (mu * P[m, l - 1] - _eps(l - 1, m) * P[m, l - 2]) / _eps(l, m)
    dP = np.zeros((L + 1, L + 1, len(mu)))
    for m in range(L + 1):
        for l in range(m, L + 1):
            below = P[m, l - 1] if l > m else 0.0
            dP[m, l] = (-l * _eps(l + 1, m) * P[m, l + 1] + (l + 1) * _eps(l, m) * below) / c
    return P[:, :L + 1], dP


# %% [markdown]
# Check orthonormality with Gauss-Legendre quadrature (exact here) and the derivative with central differences:

# %%
_mu, _w = np.polynomial.legendre.leggauss(16)
_P, _dP = legendre(7, _mu)
_tri = np.arange(8)[None, :] >= np.arange(8)[:, None]  # l >= m
_gram = np.einsum('mlk,mjk,k->mlj', _P, _P, _w)
test_close(_gram[3][3:, 3:], np.eye(5), eps=1e-12)
_h = 1e-6; _phi = np.arcsin(_mu)
_num = (legendre(7, np.sin(_phi + _h))[0] - legendre(7, np.sin(_phi - _h))[0]) / (2 * _h)
test_close(_num[_tri], _dP[_tri], eps=1e-6)


# %% [markdown]
# `Sphere` holds the transform between spectral coefficients `c[..., m, l]` and a grid
# `g[..., lat, lon]`: synthesis is a Legendre sum then an inverse real FFT; analysis is an FFT then
# Gaussian quadrature $c_{lm} = \sum_k w_k F_m(\mu_k) \bar P_l^m(\mu_k)$. With $K$ Gauss latitudes and
# $L \le (2K-1)/3$ the product of two fields is analysed without aliasing. The gradient uses
# $\frac{1}{a\cos\varphi}\partial_\lambda \to \frac{i m}{a\cos\varphi}$ and the $\partial_\varphi \bar P$ table.
# `at(lat)` evaluates the same expansion at any other latitudes (how the output grid is made: no interpolation).

# %%
#| export
class Sphere:
    "Spectral transform with triangular truncation `L` on a Gaussian grid of `nlat` x `nlon`."
    def __init__(self, L: int, nlat: int, nlon: int):
        self.L, self.nlon = L, nlon
        mu, self.w = np.polynomial.legendre.leggauss(nlat)
        self.lat, self.lon = np.arcsin(mu), 2 * np.pi * np.arange(nlon) / nlon
        self.P, self.dP = legendre(L, mu)
        self.m = np.arange(L + 1)[:, None]
        l = np.arange(L + 1)[None, :]
        self.mask = (l >= self.m).astype(float)  # the triangle l >= m
        self.lap = -l * (l + 1) / A_EARTH**2 * self.mask  # eigenvalues of the Laplacian
        self.cos = np.cos(self.lat)

    def synth(self, c, P=None):
        "Grid values `[..., lat, lon]` of coefficients `c[..., m, l]` (with table `P`, default `self.P`)."
        F = np.einsum('...ml,mlk->...km', c, self.P if P is None else P)
        return np.fft.irfft(F, n=self.nlon, axis=-1) * self.nlon

    def anal(self, g):
        "Coefficients `[..., m, l]` of grid values `g[..., lat, lon]`."
        F = np.fft.rfft(g, axis=-1)[..., :self.L + 1] / self.nlon
        return np.einsum('...km,mlk,k->...ml', F, self.P, self.w) * self.mask

    def grad(self, c, P=None, dP=None, cos=None):
        "Eastward and northward gradient `(f_x, f_y)` on the grid (or on the latitudes of `P, dP, cos`)."
        P, dP, cos = (self.P, self.dP, self.cos) if P is None else (P, dP, cos)
        return self.synth(1j * self.m * c, P) / (A_EARTH * cos[:, None]), self.synth(c, dP) / A_EARTH

    def at(self, lat_deg):
        "Tables `(P, dP, cos)` to synthesise at latitudes `lat_deg` (degrees) instead of the Gauss grid."
        lat = np.deg2rad(np.asarray(lat_deg, float))
        return (*legendre(self.L, np.sin(lat)), np.cos(lat))


# %%
_s = Sphere(10, 16, 32)
_g = np.random.default_rng(0).standard_normal((16, 32))
_c = _s.anal(_g)
test_close(_s.anal(_s.synth(_c)), _c, eps=1e-12)  # synthesis then analysis is the identity on the truncation
_lat = _s.lat[:, None] + 0 * _s.lon
_fx, _fy = _s.grad(_s.anal(np.cos(_lat) * np.cos(_s.lon)))  # f = cos(phi) cos(lambda)
test_close(_fx * A_EARTH, -np.sin(_s.lon) + 0 * _lat, eps=1e-10)
test_close(_fy * A_EARTH, -np.sin(_lat) * np.cos(_s.lon), eps=1e-10)


# %% [markdown]
# ## Geography
#
# A smooth synthetic land mask (continent-shaped bumps through a logistic step, fractional like ERA5's),
# orography (Tibet, Rockies, Andes, Antarctica, Greenland, East Africa) and a soil type that is 0 over
# sea and a class 1..7 over land (ERA5's convention). Fixed for every seed: only the weather changes.

# %%
#| export
def geography(lat, lon) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    "Land-sea mask in [0, 1], orography height in m and soil type (0 sea, 1..7 land) at `lat, lon` (radians, broadcastable)."
    lat, lon = np.broadcast_arrays(np.asarray(lat, float), np.asarray(lon, float))
    def bump(la, lo, rla, rlo, amp=1.0):  # Gaussian bump centred at (la, lo) degrees, radii in degrees
        dlo = np.angle(np.exp(1j * (lon - np.deg2rad(lo))))
        return amp * np.exp(-((lat - np.deg2rad(la)) / np.deg2rad(rla))**2
                            - (dlo * np.cos(np.deg2rad(la)) / np.deg2rad(rlo))**2)
    land = (bump(52, 90, 22, 45) + bump(32, 80, 12, 22) + bump(30, 20, 15, 20) + bump(5, 20, 22, 18) + bump(48, 260, 18, 28)
            + bump(-15, 300, 22, 12) + bump(-25, 135, 10, 14) + bump(72, 318, 10, 9) + bump(-90, 0, 22, 360))
    lsm = 1 / (1 + np.exp(-(land - 0.5) / 0.07))
    h = lsm * (bump(33, 88, 6, 14, 4500) + bump(45, 250, 12, 4, 2500) + bump(-20, 291, 20, 3, 3500)
               + bump(-85, 0, 12, 360, 2800) + bump(74, 318, 6, 6, 2200) + bump(0, 35, 12, 5, 1200))
    slt = np.where(lsm > 0.5, 1 + np.floor(3.5 * (1 + np.sin(3 * lon) * np.cos(2 * lat))).clip(0, 6), 0.0)
    return lsm, h, slt


# %%
_lsm, _h, _slt = geography(np.deg2rad([-89., 0, 33, 50]), np.deg2rad([0., 200, 88, 90]))
test_eq((_lsm > 0.5).tolist(), [True, False, True, True])  # Antarctica, mid-Pacific, Tibet, Siberia
assert _h[2] > 3000 and _h[1] < 1 and _slt[1] == 0 and 1 <= _slt[3] <= 7


# %% [markdown]
# ## Standard atmosphere and saturation
#
# The dynamics give anomalies; the mean vertical structure comes from the ICAO standard atmosphere
# $T(p) = \max(T_0 (p/p_0)^{R\Gamma/g}, 216.65)$, $Z(p) = \frac{g T_0}{\Gamma}(1 - (p/p_0)^{R\Gamma/g})$,
# and saturation specific humidity from Bolton's vapour pressure
# $e_s = 611.2\, e^{17.67 (T - 273.15)/(T - 29.65)}$, $q_s = 0.622 e_s / (p - 0.378 e_s)$.

# %%
#| export
def t_std(p):
    "Standard-atmosphere temperature (K) at pressure `p` (hPa)."
    return np.maximum(288.15 * (np.asarray(p, float) / 1013.25) ** 0.190263, 216.65)

# %%
#| export
def z_std(p):
    "Standard-atmosphere geopotential (m^2/s^2) at pressure `p` (hPa), troposphere formula."
    return G * 288.15 / 0.0065 * (1 - (np.asarray(p, float) / 1013.25) ** 0.190263)

# %%
#| export
def qsat(T, p):
    "Saturation specific humidity (kg/kg) at temperature `T` (K) and pressure `p` (hPa)."
    es = 611.2 * np.exp(17.67 * (T - 273.15) / (T - 29.65))
    return 0.622 * es / (p * 100 - 0.378 * es)


# %%
test_close(z_std(500) / G, 5574, eps=5)  # 500 hPa is near 5.6 km
test_close(t_std(850), 278.7, eps=0.1)  # 1457 m at 6.5 K/km
test_close(qsat(293.15, 1000.) * 1e3, 14.7, eps=0.3)  # about 15 g/kg at 20 C

# %% [markdown]
# ## The two-layer model
#
# Two layers of equal depth centred at $p_1 = 250$ and $p_2 = 750$ hPa with streamfunctions
# $\psi_1, \psi_2$ (winds $u = -\partial_y\psi$, $v = \partial_x \psi$) carry quasi-geostrophic
# potential vorticity
#
# $$q_1 = \nabla^2\psi_1 + f - F(\psi_1 - \psi_2),\qquad q_2 = \nabla^2\psi_2 + f + F(\psi_1 - \psi_2) + f_0 h / H_2,$$
#
# with $F = 1/L_d^2$ (deformation radius $L_d$ = 700 km) and orography $h$. Each is advected by its own
# layer and forced:
#
# $$\partial_t q_1 = -\mathbf{v}_1\!\cdot\!\nabla q_1 + F\frac{\tau - \tau_e}{t_r} - \nu\nabla^8 q_1,\qquad
# \partial_t q_2 = -\mathbf{v}_2\!\cdot\!\nabla q_2 - F\frac{\tau - \tau_e}{t_r} - \frac{\nabla^2\psi_2}{t_f} - \nu\nabla^8 q_2,$$
#
# where $\tau = \psi_1 - \psi_2$ is the thickness (by hydrostatic balance the mean temperature
# $T' = f_0 \tau / (R \ln(p_2/p_1))$) relaxed in $t_r$ = 15 days toward a radiative equilibrium
# $T_e = -\Delta T(\sin^2\varphi - \tfrac13) + \epsilon\, s(t) \sin\varphi + 8\,\mathrm{K}\, s(t)\, \mathrm{lsm} \sin\varphi$
# with a seasonal phase $s(t) = \cos(2\pi(\mathrm{doy} - 200)/365.25)$, and the lower layer feels
# Rayleigh (Ekman) drag in $t_f$ = 4 days. The inversion is diagonal in spectral space: with
# $\lambda_l = -l(l+1)/a^2$, the barotropic part $\frac{\psi_1+\psi_2}2 = \frac{\tilde q_1 + \tilde q_2}{2\lambda_l}$
# and the baroclinic part $\frac{\psi_1-\psi_2}2 = \frac{\tilde q_1 - \tilde q_2}{2(\lambda_l - 2F)}$
# ($\tilde q$: $q$ without $f$ and $h$, which is what the state stores).
#
# Moisture: specific humidity at 500 and 850 hPa (in g/kg) is advected by the wind at that level,
# evaporates toward 80% of saturation (less over land) at 850 hPa in 2 days, is mixed up to 500 hPa in
# 2 days, and condenses in 3 h when supersaturated. Time stepping: three-stage SSP Runge-Kutta with the
# hyperdiffusion integrated exactly; $\nu$ damps the shortest wave in 6 h.

# %%
#| export
P1, P2 = 250.0, 750.0  # layer pressures, hPa
LN_P = np.log(P2 / P1)


def level_weight(p):
    "Baroclinic profile `s(p)`: `psi(p) = psi_bt + s(p) * psi_bc`, +1 at `P1`, -1 at and below `P2`, linear in log p."
    pm = np.sqrt(P1 * P2)
    return np.clip(np.log(pm / np.asarray(p, float)) / np.log(pm / P1), -1, 1)

# %%
#| export
@dataclass(frozen=True)
class QGParams:
    "Physical parameters of the two-layer model."
    Ld: float = 7e5  # deformation radius, m
    tau_rad: float = 15.0  # thermal relaxation time, days
    tau_drag: float = 4.0  # lower-layer drag time, days
    tau_hyper: float = 0.25  # e-folding time of the shortest wave under hyperdiffusion, days
    dT: float = 50.0  # equator-to-pole radiative-equilibrium temperature difference, K
    eps: float = 12.0  # seasonal hemispheric asymmetry, K
    H2: float = 8e3  # lower-layer depth for the orographic term, m


# %%
#| export
class TwoLayerQG:
    "Forced two-layer quasi-geostrophic model with moisture at truncation `L` on an `nlat` x `nlon` Gaussian grid."
    def __init__(self, L=21, nlat=32, nlon=64, params=QGParams(), seed=0, t0=0.0):
        self.s = s = Sphere(L, nlat, nlon); self.p = p = params
        self.F = 1 / p.Ld**2
        self.hyper = (s.lap * A_EARTH**2 / (L * (L + 1)))**4 / (p.tau_hyper * 86400)
        lat, lon = np.meshgrid(s.lat, s.lon, indexing='ij')
        self.lsm, h, _ = geography(lat, lon)
        self.sinlat = np.sin(lat)
        self.f = s.anal(2 * OMEGA * self.sinlat)
        self.topo = s.anal(F0 * h / p.H2)
        self.sl = {q: level_weight(q) for q in (500.0, 850.0)}
        noise = s.anal(np.random.default_rng(seed).standard_normal((2,) + lat.shape)) * 1e-6
        moist = s.anal(np.stack([1.0 + 0 * lat, 5.0 + 0 * lat]))
        self.state = np.concatenate([noise, moist])  # [q1~, q2~, q500 (g/kg), q850 (g/kg)], each [m, l]
        self.t = t0  # seconds since 2000-01-01 00 UTC

    def psi(self, y):
        "Streamfunctions `[..., 2, m, l]` of the state `y[..., 4, m, l]` (the PV inversion)."
        lap = self.s.lap; q1, q2 = y[..., 0, :, :], y[..., 1, :, :]
        bt = (q1 + q2) / 2 / np.where(lap != 0, lap, np.inf)  # l = 0: no mean streamfunction
        bc = (q1 - q2) / 2 / (lap - 2 * self.F) * self.s.mask
        return np.stack([bt + bc, bt - bc], axis=-3)

    def tau_eq(self, t):
        "Radiative-equilibrium thickness (spectral) at time `t` (s)."
        season = np.cos(2 * np.pi * ((t / 86400) % 365.25 - 200) / 365.25)
        T = (-self.p.dT * (self.sinlat**2 - 1 / 3) + self.p.eps * season * self.sinlat
             + 8 * season * self.sinlat * self.lsm)
        return self.s.anal(T * R_DRY * LN_P / F0)


# %% [markdown]
# The tendency, then the step:

# %%
#| export
def _rhs(m: TwoLayerQG, y, teq):
    "Tendency of the state `y` given the radiative-equilibrium thickness `teq`."
    s = m.s; psi = m.psi(y)
    px, py = s.grad(psi); u, v = -py, px  # layer winds
    qfull = y[:2] + m.f + np.stack([0 * m.topo, m.topo])
    gx, gy = s.grad(np.concatenate([qfull, y[2:]]))
    ub, uc, vb, vc = (u[0] + u[1]) / 2, (u[0] - u[1]) / 2, (v[0] + v[1]) / 2, (v[0] - v[1]) / 2
    U = np.stack([u[0], u[1], ub + m.sl[500.0] * uc, ub + m.sl[850.0] * uc])
    V = np.stack([v[0], v[1], vb + m.sl[500.0] * vc, vb + m.sl[850.0] * vc])
    adv = s.anal(U * gx + V * gy)
    tau = psi[0] - psi[1]
    heat = m.F * (tau - teq) / (m.p.tau_rad * 86400)
    dq = -adv[:2] + np.stack([heat, -heat - s.lap * psi[1] / (m.p.tau_drag * 86400)])
    g = s.synth(np.concatenate([y[2:], tau[None]]))
    Tp = g[2] * F0 / (R_DRY * LN_P)  # temperature anomaly, K
    qs5, qs8 = qsat(t_std(500.0) + Tp, 500.0) * 1e3, qsat(t_std(850.0) + Tp, 850.0) * 1e3
    s8 = (0.8 * (1 - 0.45 * m.lsm) * qs8 - g[1]) / (2 * 86400) - np.maximum(g[1] - qs8, 0) / (3 * 3600)
    s5 = (0.25 * g[1] - g[0]) / (2 * 86400) - np.maximum(g[0] - qs5, 0) / (3 * 3600)
    return np.concatenate([dq, -adv[2:] + s.anal(np.stack([s5, s8]))])

# %%
#| export
def step(m: TwoLayerQG, dt: float):
    "Advance `m` by `dt` seconds (SSP-RK3, exact hyperdiffusion)."
    y = m.state; teq = m.tau_eq(m.t + dt / 2)
    y1 = y + dt * _rhs(m, y, teq)
    y2 = 0.75 * y + 0.25 * (y1 + dt * _rhs(m, y1, teq))
    m.state = (y / 3 + 2 / 3 * (y2 + dt * _rhs(m, y2, teq))) * np.exp(-m.hyper * dt)
    m.t += dt


# %% [markdown]
# Inverting the PV of known streamfunctions gives them back, and a 20-day run from rest on the tiny
# grid stays finite and starts to move:

# %%
_m = TwoLayerQG(L=10, nlat=16, nlon=32)
_psi = _m.s.anal(np.random.default_rng(1).standard_normal((2, 16, 32))) * 1e7 * (_m.s.lap != 0)
_lapq = _m.s.lap * _psi + _m.F * np.stack([_psi[1] - _psi[0], _psi[0] - _psi[1]])
test_close(_m.psi(np.concatenate([_lapq, _lapq]))[..., :, :, :], _psi, eps=1e-3)
for _ in range(20 * 4): step(_m, 6 * 3600 / 4)
_u = -_m.s.grad(_m.psi(_m.state))[1]
assert np.isfinite(_u).all() and 1 < np.abs(_u).max() < 100


# %% [markdown]
# ## From the model state to ERA5 channels
#
# On the output latitudes (cell-centred, equiangular, no pole rows) we synthesise $\psi_{1,2}$ and the
# moisture and build each channel:
#
# - pressure levels: $\psi(p) = \psi_\text{bt} + s(p)\,\psi_\text{bc}$ (linear in $\ln p$ between the layers,
#   the lower layer's value below 750 hPa);
#   $z = Z_\text{std}(p) + f_0\psi(p)$, $T = T_\text{std}(p) + T'$ (half of $T'$ at 250 hPa, near the tropopause), $u, v$ from $\psi(p)$;
#   $q_{850}, q_{500}$ from the tracers (clipped to $[10^{-6}, q_s]$),
#   $q_{250}$ at 80% of the relative humidity at 500 hPa;
# - the barotropic global mean (free in the model) is chosen so $\psi(1000)$ has global mean 0 (mass conservation);
# - `msl` $= 101325 + \rho_0 f_0 \psi(1000)$ with $\rho_0 = 1.2$, plus the 1 hPa semidiurnal tide;
# - `u10, v10`: the 1000 hPa wind reduced (75% sea, 55% land) and turned toward low pressure
#   (15 to 30 degrees), with a diurnal gustiness over land;
# - `t2m` $= T_\text{std}(1000) + 0.8\,T' - 6.5\,\mathrm{K/km}\cdot h$ plus a diurnal cycle over land
#   peaking at 15 local time.

# %%
#| export
def diagnose(m: TwoLayerQG,
             states,  # model states [time, 4, m, l]
             times,  # datetime64 of each state, [time]
             lat_deg,  # output latitudes, degrees
             n_lon=None,  # output longitudes (a divisor of the model's; default: the model's)
            ) -> dict[str, np.ndarray]:
    "The channels of `CPU_CHANNELS` (physical units, float32 `[time, lat, lon]`) diagnosed from `states`."
    s = m.s; P, dP, cos = s.at(lat_deg)
    lat, lon = np.meshgrid(np.deg2rad(lat_deg), s.lon, indexing='ij')
    lsm, h, _ = geography(lat, lon)
    psi = m.psi(states)
    bc00 = (psi[:, 0, 0, 0] - psi[:, 1, 0, 0]) / 2  # global-mean thickness; pick the free barotropic mean
    psi[:, :, 0, 0] = bc00[:, None] * (np.array([1.0, -1.0]) - level_weight(1000.0))  # so psi(1000) has mean 0
    (px, py), moist = s.grad(psi, P, dP, cos), s.synth(states[:, 2:], P)
    bt, bc = lambda a: (a[:, 0] + a[:, 1]) / 2, lambda a: (a[:, 0] - a[:, 1]) / 2
    Tp = s.synth(psi[:, 0] - psi[:, 1], P) * F0 / (R_DRY * LN_P)
    out, psig = {}, s.synth(psi, P)
    def lev(a, p): return bt(a) + level_weight(p) * bc(a)
    for p in CPU_LEVELS:
        out[f"z{p}"] = z_std(p) + F0 * lev(psig, p)
        out[f"t{p}"] = t_std(p) + (0.5 if p < 400 else 1.0) * Tp  # weaker near the tropopause
        out[f"u{p}"], out[f"v{p}"] = -lev(py, p), lev(px, p)
    q5 = np.clip(moist[:, 0] * 1e-3, 1e-6, qsat(out["t500"], 500.0))
    out["q850"] = np.clip(moist[:, 1] * 1e-3, 1e-6, qsat(out["t850"], 850.0))
    out["q500"] = q5
    out["q250"] = 0.8 * q5 / qsat(out["t500"], 500.0) * qsat(out["t250"], 250.0)
    hours = (times - times.astype("datetime64[D]")) / np.timedelta64(1, "h")
    local = (hours[:, None, None] + np.rad2deg(lon)[None] / 15) % 24  # local solar time, h
    out["msl"] = 101325 + 1.2 * F0 * lev(psig, 1000.0) + 100 * np.cos(lat)**3 * np.cos(2 * np.pi * (local - 10) / 12)
    u0, v0 = -lev(py, 1000.0), lev(px, 1000.0)
    turn = np.deg2rad(15 + 15 * lsm) * np.tanh(np.rad2deg(lat) / 10)
    gain = (0.75 - 0.2 * lsm) * (1 + 0.25 * lsm * np.cos(2 * np.pi * (local - 14) / 24))
    out["u10"] = gain * (u0 * np.cos(turn) - v0 * np.sin(turn))
    out["v10"] = gain * (u0 * np.sin(turn) + v0 * np.cos(turn))
    out["t2m"] = (t_std(1000.0) + 0.8 * Tp - 0.0065 * h
                  + 6 * lsm * np.cos(lat) * np.cos(2 * np.pi * (local - 15) / 24))
    every = s.nlon // (n_lon or s.nlon)
    return {k: np.asarray(out[k][..., ::every], np.float32) for k in CPU_CHANNELS}


# %% [markdown]
# ## Names
#
# The store uses WeatherBench2's variable names, pressure-level variables with a `level` dimension; the map
# from our short channel names (`z500`) to them lives in `config` (`WB2_NAMES`, `wb2_name`), where the
# reader, the loss and the evaluation find it too.

# %% [markdown]
# ## Simulate and write
#
# `simulate` spins the model up from rest (the seed sets the initial noise) then records a state every
# 6 hours and returns an `xarray.Dataset` in the WB2 layout. The truncation follows the grid
# (T21 for 32x64, T42 for 64x128: $L = n_\text{lon}/3$, at least T21, below which the deformation
# radius is not resolved and the eddies die; the 16x32 grid samples a T21 run) with the Gaussian
# latitudes the transform needs; the output grid is the equiangular one. The split of the time axis into
# training, validation and test periods is stored in the attributes.

# %%
#| export
START = np.datetime64("2000-01-01T00", "ns")
DT_OUT = np.timedelta64(6, "h")


def grid_lat(n_lat: int) -> np.ndarray:
    "Cell-centred equiangular latitudes (degrees, south to north, no pole rows)."
    return -90 + 180 * (np.arange(n_lat) + 0.5) / n_lat

# %%
#| export
def simulate(n_lat=32,  # output latitudes
             n_lon=64,  # output longitudes
             days=(240, 30, 30),  # days of the (train, val, test) periods
             spinup=90,  # days of spin-up before `START`, discarded
             seed=0,  # seed of the initial noise
             params=QGParams(),
             verbose=False) -> xr.Dataset:
    "Run the two-layer model and return 6-hourly ERA5-like fields in the WB2 layout."
    L = max(21, n_lon // 3); sub = int(np.ceil(12 * L / 21))  # truncation; time steps per 6 h
    m = TwoLayerQG(L, max(32, n_lat), max(64, n_lon), params, seed, t0=-spinup * 86400.0)
    if m.s.nlon % n_lon: raise ValueError(f"n_lon={n_lon} must divide {m.s.nlon}")
    t0 = time.perf_counter()
    n = 4 * sum(days); states = np.empty((n,) + m.state.shape, complex)
    with tqdm(total=spinup + sum(days), desc=f"simulating T{L} ({n_lat}x{n_lon})", unit="day", disable=not verbose, mininterval=1,
              bar_format="{l_bar}{bar}| {n:.0f}/{total} simulated days [{elapsed}<{remaining}]") as bar:
        for _ in range(spinup * 4):
            for _ in range(sub): step(m, 6 * 3600 / sub)
            bar.update(0.25)
        for i in range(n):
            states[i] = m.state
            for _ in range(sub): step(m, 6 * 3600 / sub)
            bar.update(0.25)
    sec = time.perf_counter() - t0
    if verbose: print(f"T{L} model: {sec / (spinup + sum(days)):.3f} s per simulated day")
    times = START + DT_OUT * np.arange(n)
    lat, lon = grid_lat(n_lat), 360 * np.arange(n_lon) / n_lon
    return to_wb2(diagnose(m, states, times, lat, n_lon), times, lat, lon, days, seed, sec / (spinup + sum(days)))


# %% [markdown]
# `to_wb2` stacks the short-name channels into WB2 variables and adds the statics:

# %%
#| export
def to_wb2(ch: dict, times, lat, lon, days, seed, s_per_day) -> xr.Dataset:
    "WB2-layout dataset from short-name channels `ch[name] -> [time, lat, lon]`."
    la, lo = np.meshgrid(np.deg2rad(lat), np.deg2rad(lon), indexing='ij')
    lsm, h, slt = geography(la, lo)
    dims3, dims4 = ("time", "latitude", "longitude"), ("time", "level", "latitude", "longitude")
    levels = sorted(CPU_LEVELS)  # WB2 stores levels ascending
    dv = {WB2_NAMES[c]: (dims3, ch[c]) for c in ("msl", "u10", "v10", "t2m")}
    for a in ("z", "q", "t", "u", "v"):
        dv[WB2_NAMES[a]] = (dims4, np.stack([ch[f"{a}{p}"] for p in levels], 1))
    for name, val in (("lsm", lsm), ("slt", slt), ("orography", G * h)):
        dv[WB2_NAMES[name]] = (("latitude", "longitude"), val.astype(np.float32))
    edges = np.cumsum([0, *days])
    split = {k: [str(START + np.timedelta64(int(a), "D")), str(START + np.timedelta64(int(b), "D"))]
             for k, a, b in zip(("train", "val", "test"), edges[:-1], edges[1:])}
    attrs = dict(source="jigsaw_ref two-layer quasi-geostrophic model (synthetic, not ERA5)", seed=seed,
                 seconds_per_simulated_day=round(float(s_per_day), 4), **{f"split_{k}": v for k, v in split.items()})
    return xr.Dataset(dv, coords=dict(time=times, level=np.array(levels, np.int64),
                                      latitude=lat, longitude=lon), attrs=attrs)


# %% [markdown]
# The zarr store: chunks of one time step, all levels and latitudes, and a quarter of the longitudes,
# so a rank that reads a longitude shard touches only its chunks. Chunks that small would be tens of
# thousands of files, so they are grouped into zarr v3 *shards* of one day (four time steps; one file
# per variable and day). A reader fetches single chunks from inside a shard by byte range, after
# reading the shard's small index (16 bytes per chunk), which every rank reads alike.
#
# Every chunk carries a CRC-32C checksum (zarr's `crc32c` codec after the zstd compressor; the shard index
# has its own): a flipped or truncated byte is an error on read, which the reader reports with the file,
# variable and time (see `data`), never garbage that trains silently.

# %%
#| export
def write_zarr(ds: xr.Dataset, path, lon_chunks: int = 4, time_shard: int = 4):
    "Write `ds` to a zarr v3 store at `path` chunked (1, all levels, all lat, n_lon/lon_chunks)."
    nlon = ds.sizes["longitude"]; cl = max(1, nlon // lon_chunks); nt = min(time_shard, ds.sizes["time"])
    enc = {}
    for k, v in ds.data_vars.items():
        chunks = tuple({"time": 1, "longitude": cl}.get(d, ds.sizes[d]) for d in v.dims)
        shards = tuple({"time": nt}.get(d, ds.sizes[d]) for d in v.dims)
        enc[k] = dict(chunks=chunks, compressors=[ZstdCodec(), Crc32cCodec()])
        if "time" in v.dims: enc[k]["shards"] = shards
    ds.to_zarr(path, mode="w", zarr_format=3, consolidated=False, encoding=enc)


# %% [markdown]
# `default_dataset` caches the store under `$JIGSAW_DATA` (default `~/.cache/jigsaw_ref`; `data.cache_dir`). It
# writes into a temporary folder beside the target and renames it into place only when complete, so
# a crashed or concurrent writer never leaves a half-written store where a reader would use it.

# %%
#| export
GRIDS = {"tiny": (16, 32), "small": (32, 64), "medium": (64, 128)}
VERSION = 2  # bump when the generator's output changes (2: chunk checksums)


def default_dataset(path=None,  # store path; default: a name in `cache_dir()` made from the arguments
                    grid="small",  # 'tiny', 'small', 'medium' or (n_lat, n_lon)
                    days=(240, 30, 30),  # days of train, val, test
                    spinup=90, seed=0, verbose=True) -> Path:
    "Path of the default zarr store, generating it (once, atomically) if it does not exist yet."
    n_lat, n_lon = GRIDS[grid] if isinstance(grid, str) else grid
    if path is None:
        path = cache_dir() / f"qg_v{VERSION}_{n_lat}x{n_lon}_{'-'.join(map(str, days))}d_spin{spinup}_seed{seed}.zarr"
    path = Path(path)
    if (path / "zarr.json").exists(): return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    if verbose: print(f"generating the default data (first use of this grid): {path}", flush=True)
    try:
        write_zarr(simulate(n_lat, n_lon, days, spinup, seed, verbose=verbose), tmp)
        try: os.rename(tmp, path)
        except OSError:  # another process finished first: keep theirs
            if not (path / "zarr.json").exists(): raise
    finally: shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        mb = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6
        print(f"generated {path} in {time.perf_counter() - t0:.1f} s ({mb:.1f} MB)")
    return path


# %% [markdown]
# A short run on the tiny grid: the WB2 layout, physical magnitudes and a second call that reuses the store.

# %%
with tempfile.TemporaryDirectory() as d:
    p = default_dataset(Path(d) / "t.zarr", grid="tiny", days=(4, 1, 1), spinup=30, verbose=False)
    ds = xr.open_zarr(p, consolidated=False)
    test_eq(ds.geopotential.dims, ("time", "level", "latitude", "longitude"))
    test_eq(ds.sizes["time"], 24)
    test_eq(ds.level.values.tolist(), [250, 500, 850])
    test_eq([c["name"] for c in json.loads((p / "temperature" / "zarr.json").read_text())["codecs"][0]["configuration"]["codecs"]],
            ["bytes", "zstd", "crc32c"])  # every chunk checksummed
    test_close(float(ds.geopotential.sel(level=500).mean()), 5.5e4, eps=3e3)
    test_close(float(ds.mean_sea_level_pressure.weighted(np.cos(np.deg2rad(ds.latitude))).mean()), 101325, eps=300)
    assert 230 < float(ds["2m_temperature"].mean()) < 300
    test_eq(ds.attrs["split_val"], ["2000-01-05T00:00:00.000000000", "2000-01-06T00:00:00.000000000"])
    mtime = (p / "zarr.json").stat().st_mtime_ns
    test_eq(default_dataset(p, grid="tiny", verbose=False), p)
    test_eq((p / "zarr.json").stat().st_mtime_ns, mtime)  # reused, not rewritten

# %% [markdown]
# The default store (32 x 64, 240 + 30 + 30 days after 90 days of spin-up; cached after the first call):

# %%
#| slow
p = default_dataset()
