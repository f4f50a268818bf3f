# %%
#| default_exp config

# %%
#| export
from __future__ import annotations
import dataclasses, math
from dataclasses import dataclass, field

# %%
#| hide
from fastcore.test import test_eq, test_fail

# %% [markdown]
# # Config
#
# > Frozen model configurations, the channel lists of ERA5 as WeatherBench2 lays it out, and named presets.

# %% [markdown]
# ## Channels
#
# WeatherMixer predicts $V = 69$ channels of ERA5 at 0.25 degrees: four surface fields and five
# atmospheric fields on the 13 WeatherBench2 pressure levels. Three static fields (land-sea mask,
# soil type, orography) are appended to the input only, so the encoder sees $C_\text{in} = 72$ channels.
# Channel names are short: `msl`, `u10`, `v10`, `t2m`, then `z500`, `t850`, ...

# %%
#| export
SURFACE = ("msl", "u10", "v10", "t2m")  # mean sea-level pressure, 10 m winds, 2 m temperature
ATMOS = ("z", "q", "t", "u", "v")  # geopotential, specific humidity, temperature, winds
WB2_LEVELS = (1000, 925, 850, 700, 600, 500, 400, 300, 250, 200, 150, 100, 50)  # hPa
STATICS = ("lsm", "slt", "orography")  # land-sea mask, soil type, orography


def channel_names(
    surface=SURFACE,  # surface variables, in order
    atmos=ATMOS,  # atmospheric variables, each on every level
    levels=WB2_LEVELS,  # pressure levels in hPa
) -> tuple[str, ...]:
    "Names of the predicted channels: surface first, then `atmos` variable-major over `levels`."
    return tuple(surface) + tuple(f"{v}{l}" for v in atmos for l in levels)


ERA5_CHANNELS = channel_names()

# %%
test_eq(len(ERA5_CHANNELS), 69)
test_eq(ERA5_CHANNELS[:6], ("msl", "u10", "v10", "t2m", "z1000", "z925"))

# %% [markdown]
# The CPU presets use a reduced set with the same structure: the same four surface fields and the
# five atmospheric fields on three levels (19 channels, plus the 3 statics). The embedded default
# data (see `data`) provides exactly these.

# %%
#| export
CPU_LEVELS = (850, 500, 250)
CPU_CHANNELS = channel_names(levels=CPU_LEVELS)

# %%
test_eq(len(CPU_CHANNELS), 19)

# %% [markdown]
# ## Channel names and the variables of a store
#
# A WeatherBench2 store has one variable per quantity, the pressure-level ones with a `level` dimension.
# `WB2_NAMES` maps our short prefixes to WB2 long names; `ERA5_SHORT` lists the other names a file may use
# for the same variable (the ERA5 short names cfgrib writes: `z`, `t`, ...). `wb2_name('z500')` reads a
# known short name. This is the one place channel names are parsed: `loss` (weights), `data` (reading) and
# `evaluate` (scores) all use it.

# %%
#| export
WB2_NAMES = {
    "msl": "mean_sea_level_pressure", "u10": "10m_u_component_of_wind", "v10": "10m_v_component_of_wind",
    "t2m": "2m_temperature", "z": "geopotential", "q": "specific_humidity", "t": "temperature",
    "u": "u_component_of_wind", "v": "v_component_of_wind",
    "lsm": "land_sea_mask", "slt": "soil_type", "orography": "geopotential_at_surface",
}
SINGLE_LEVEL = ("msl", "u10", "v10", "t2m", "lsm", "slt", "orography")  # short names without a level
ERA5_SHORT = {  # WB2 name -> other names seen in ERA5 netCDF/GRIB conversions
    "mean_sea_level_pressure": ("msl",), "10m_u_component_of_wind": ("u10", "10u"),
    "10m_v_component_of_wind": ("v10", "10v"), "2m_temperature": ("t2m", "2t"),
    "geopotential": ("z",), "specific_humidity": ("q",), "temperature": ("t",),
    "u_component_of_wind": ("u",), "v_component_of_wind": ("v",), "land_sea_mask": ("lsm",),
    "soil_type": ("slt",), "geopotential_at_surface": ("orography",),
}


_SHORT_OF = {v: k for k, v in WB2_NAMES.items()} | {a: k for k, v in WB2_NAMES.items() for a in ERA5_SHORT.get(v, ())}


def _split_level(ch: str) -> tuple[str, int | None]:
    "`('z', 500)` for 'z500' or 'z@500'; `(ch, None)` when there is no level."
    if "@" in ch:
        head, _, lev = ch.rpartition("@")
        if not (head and lev.isdigit()): raise KeyError(f"channel {ch!r}: write a level as NAME@LEVEL, e.g. 'geopotential@500'")
        return head, int(lev)
    head = ch.rstrip("0123456789")
    return (head, int(ch[len(head):])) if head and head != ch else (ch, None)

# %%
#| export
def wb2_name(ch: str) -> tuple[str, int | None]:
    "WB2 variable name and pressure level (None for single-level) of the known short channel name `ch`."
    if ch in SINGLE_LEVEL: return WB2_NAMES[ch], None
    head, level = _split_level(ch) if "@" not in ch else (None, None)
    if head in WB2_NAMES and head not in SINGLE_LEVEL and level is not None: return WB2_NAMES[head], level
    raise KeyError(f"unknown channel name {ch!r}: use one of {sorted(WB2_NAMES)} (atmospheric ones with a level, e.g. 'z500')")

# %%
#| export
def short_name(var: str, level: int | None = None) -> str:
    "Short channel name of WB2 (or ERA5 short) variable `var` at `level`; `var@level` or `var` for other variables."
    k = _SHORT_OF.get(var)
    if k is None or (k in SINGLE_LEVEL) != (level is None): return var if level is None else f"{var}@{int(level)}"
    return k + ("" if level is None else str(int(level)))

# %%
test_eq(wb2_name("z500"), ("geopotential", 500))
test_eq(wb2_name("orography"), ("geopotential_at_surface", None))
test_eq(short_name("10m_u_component_of_wind"), "u10")
test_eq(short_name("t", 850), "t850")
test_eq(short_name("vertical_velocity", 500), "vertical_velocity@500")
test_eq([short_name(*wb2_name(c)) for c in CPU_CHANNELS], list(CPU_CHANNELS))
test_fail(lambda: wb2_name("w500"), contains="unknown channel name 'w500'")

# %% [markdown]
# **Any variable of a store can be a channel.** Besides the short names above, a channel may name a store
# variable directly: `surface_pressure` (a single-level variable), `vertical_velocity@500` (a level of a
# pressure-level variable) or `w500` when the store's variable is called `w`. `channel_candidates` lists the
# readings of a name, most specific first; the reader takes the first one the store has, and `canonical`
# turns any spelling of a known channel into its short name (`geopotential@500` and `z@500` are `z500`).

# %%
#| export
def channel_candidates(ch: str) -> list[tuple[str, int | None]]:
    "`(variable, level)` readings of channel name `ch`, most specific first (the store decides which exists)."
    if ch.startswith("pad"): raise KeyError(f"channel name {ch!r} is reserved for padding targets; rename the channel")
    out = [] if "@" in ch else [(ch, None)]  # first: a store variable of exactly that name
    head, level = _split_level(ch)
    if ch in SINGLE_LEVEL: out.append((WB2_NAMES[ch], None))
    elif level is not None: out.append((WB2_NAMES.get(head, head) if head not in SINGLE_LEVEL else head, level))
    return list(dict.fromkeys(out))

# %%
#| export
def canonical(ch: str) -> str:
    "The short name of a known channel in any spelling ('geopotential@500' -> 'z500'); other names unchanged."
    var, level = channel_candidates(ch)[-1]
    k = _SHORT_OF.get(var)
    if k is None or (k in SINGLE_LEVEL) != (level is None): return ch
    return k + ("" if level is None else str(level))

# %%
test_eq(channel_candidates("z500"), [("z500", None), ("geopotential", 500)])
test_eq(channel_candidates("surface_pressure"), [("surface_pressure", None)])
test_eq(channel_candidates("vertical_velocity@500"), [("vertical_velocity", 500)])
test_eq(channel_candidates("w500")[-1], ("w", 500))
test_eq(channel_candidates("u10"), [("u10", None), ("10m_u_component_of_wind", None)])  # u10 is the 10 m wind, not u at 10 hPa
test_eq([canonical(c) for c in ("geopotential@500", "z@500", "t2m", "surface_pressure")], ["z500", "z500", "t2m", "surface_pressure"])

# %% [markdown]
# ## The model configuration
#
# One frozen dataclass holds everything that fixes the parameter shapes and the forward pass.
# Tokens come from *1D patching*: each latitude row is cut along longitude into patches of `patch`
# pixels, so $T = n_\text{lat} \cdot n_\text{lon} / P$. The processor has `blocks` pre-LayerNorm
# mixer blocks; the token MLP widens $T \to f_s T \to T$ and the channel MLP $H \to f_c H \to H$.
#
# `out_pad` appends zero-weight padding targets to the prediction (the parallel layouts of the
# released code predict 72 channels so the halves are equal). `rollout` is the inclusive range of
# latent rollout steps $k$ that training draws from.
#
# Two switches reproduce the released 2- and 4-way architectures, which differ slightly from its 1-way
# model: there the linear residual sees all input channels (statics included, `res_inputs='all'`) and the
# decoder has a bias per output channel *and* pixel of the patch (`dec_bias='pixel'`).

# %%
#| export
class ConfigError(ValueError):
    "A configuration that cannot be built; the message names the field and the fix."

# %%
#| export
@dataclass(frozen=True)
class MixerConfig:
    "Shapes and hyper-parameters of one WeatherMixer."
    n_lat: int = 720  # latitude rows of the grid
    n_lon: int = 1440  # longitude columns of the grid
    variables: tuple = ERA5_CHANNELS  # predicted (dynamic) channel names, V of them
    statics: tuple = STATICS  # static input channel names, appended after the variables
    patch: int = 60  # P: pixels per 1D patch along longitude
    hidden: int = 4320  # H: token embedding width
    f_s: float = 0.5  # spatial (token) MLP hidden fraction: T -> f_s*T -> T
    f_c: float = 1.0  # feature (channel) MLP hidden fraction: H -> f_c*H -> H
    blocks: int = 3  # mixer blocks in the processor
    dropout: float = 0.001  # dropout after each GELU and each MLP output
    out_pad: int = 0  # zero-weight padding targets appended to the prediction
    rollout: tuple = (1, 1)  # inclusive range of latent rollout steps k
    dt_hours: int = 6  # time step of one rollout step
    res_inputs: str = "dynamic"  # input channels the linear residual sees: 'dynamic' (1-way code) or 'all' (2/4-way code)
    dec_bias: str = "channel"  # decoder bias: one per output 'channel' (1-way code) or per channel and 'pixel' of a patch
    loss_weights: tuple = ()  # (channel, weight) pairs overriding `loss.channel_weight` ('name=w' strings or a dict work too)

    def __post_init__(self):
        object.__setattr__(self, "variables", tuple(self.variables))
        object.__setattr__(self, "statics", tuple(self.statics))
        object.__setattr__(self, "loss_weights", _weight_pairs(self.loss_weights))
        object.__setattr__(self, "rollout", tuple(int(k) for k in self.rollout))
        validate(self)

    @property
    def n_vars(self): return len(self.variables)  # V
    @property
    def n_in(self): return len(self.variables) + len(self.statics)  # C_in
    @property
    def n_out(self): return len(self.variables) + self.out_pad  # V_out
    @property
    def n_res_in(self): return self.n_vars if self.res_inputs == "dynamic" else self.n_in  # inputs of the residual
    @property
    def n_lon_patches(self): return self.n_lon // self.patch
    @property
    def tokens(self): return self.n_lat * self.n_lon_patches  # T
    @property
    def token_hidden(self): return int(self.f_s * self.tokens)  # f_s * T
    @property
    def channel_hidden(self): return int(self.f_c * self.hidden)  # f_c * H

    def replace(self, **kw) -> MixerConfig:
        "A copy with the fields in `kw` changed (validated again)."
        return dataclasses.replace(self, **kw)

# %% [markdown]
# `loss_weights` arrives from many places (a TOML table, `--set loss_weights=sp=1.5,w500=0.5`, a checkpoint's
# JSON lists), so it is brought to one form, sorted `(name, weight)` pairs:

# %%
#| export
def _weight_pairs(w) -> tuple:
    "`loss_weights` in any accepted spelling as sorted `(name, float)` pairs."
    if isinstance(w, str): w = [x for x in w.split(",") if x.strip()]
    items = w.items() if isinstance(w, dict) else w
    out = {}
    for it in items:
        if isinstance(it, str):
            if "=" not in it: raise ConfigError(f"loss_weights item {it!r}: expected NAME=WEIGHT, e.g. 'z500=3.0'")
            it = it.split("=", 1)
        try: name, val = it; out[str(name).strip()] = float(val)
        except (TypeError, ValueError): raise ConfigError(f"loss_weights item {it!r}: expected NAME=WEIGHT with a number") from None
    return tuple(sorted(out.items()))

# %% [markdown]
# Validation names the field at fault and what would fix it:

# %%
#| export
def validate(c: MixerConfig):
    "Raise `ConfigError` naming the field and the fix if `c` cannot be built."
    def need(ok, msg):
        if not ok: raise ConfigError(msg)
    for f in ("n_lat", "n_lon", "patch", "hidden", "blocks"):
        v = getattr(c, f)
        need(isinstance(v, int) and v > 0, f"{f}={v!r}: must be a positive integer")
    need(c.n_lon % c.patch == 0,
         f"n_lon={c.n_lon} is not divisible by patch={c.patch}: choose a patch size that divides "
         f"n_lon (divisors <= 64: {[d for d in range(1, 65) if c.n_lon % d == 0]})")
    need(len(c.variables) > 0, "variables is empty: list at least one predicted channel")
    need(len(set(c.variables + c.statics)) == c.n_in,
         "variables and statics must be unique names (a channel is listed twice)")
    need(0 < c.f_s and c.token_hidden >= 1,
         f"f_s={c.f_s}: f_s * tokens ({c.tokens}) must be at least 1")
    need(0 < c.f_c and c.channel_hidden >= 1,
         f"f_c={c.f_c}: f_c * hidden ({c.hidden}) must be at least 1")
    need(0 <= c.dropout < 1, f"dropout={c.dropout}: must be in [0, 1)")
    need(isinstance(c.out_pad, int) and c.out_pad >= 0, f"out_pad={c.out_pad}: must be >= 0")
    need(c.res_inputs in ("dynamic", "all"), f"res_inputs={c.res_inputs!r}: choose 'dynamic' or 'all'")
    need(c.dec_bias in ("channel", "pixel"), f"dec_bias={c.dec_bias!r}: choose 'channel' or 'pixel'")
    need(isinstance(c.dt_hours, int) and c.dt_hours > 0, f"dt_hours={c.dt_hours!r}: must be a positive whole number of hours")
    need(len(c.rollout) == 2 and 1 <= c.rollout[0] <= c.rollout[1],
         f"rollout={c.rollout}: must be (k_min, k_max) with 1 <= k_min <= k_max")
    bad = [n for n in c.variables + c.statics if n.startswith("pad")]
    need(not bad, f"channel names {bad} are reserved for padding targets (out_pad); rename them")
    unknown = [n for n, _ in c.loss_weights if n not in c.variables]
    need(not unknown, f"loss_weights names {unknown}, which are not predicted variables {list(c.variables)[:6]}...; "
                      f"name a channel of `variables`")
    need(all(math.isfinite(w) and w >= 0 for _, w in c.loss_weights), f"loss_weights={c.loss_weights}: weights must be finite and >= 0")

# %%
test_fail(lambda: MixerConfig(n_lon=1440, patch=7), contains="not divisible by patch=7")
test_fail(lambda: MixerConfig(rollout=(2, 1)), contains="rollout=(2, 1)")
test_fail(lambda: MixerConfig(f_s=0.0), contains="f_s=0.0")
test_eq(MixerConfig(loss_weights="z500=2,msl=1").loss_weights, (("msl", 1.0), ("z500", 2.0)))
test_eq(MixerConfig(loss_weights={"z500": 2}).loss_weights, MixerConfig(loss_weights=[["z500", 2.0]]).loss_weights)
test_fail(lambda: MixerConfig(loss_weights="sp=1"), contains="loss_weights names ['sp']")

# %% [markdown]
# ## Presets
#
# The paper's models (SPEC section 2, released configs) and CPU presets of our own:
#
# | preset | grid | P | H | f_s | f_c | use |
# |---|---|---|---|---|---|---|
# | `c1_1way` | 720x1440 | 60 | 4320 | 0.5 | 1 | C1/C4 1-way, 1.06 B |
# | `c3` | 720x1440 | 60 | 4896 | 0.5 | 1 | C2/C3 strong scaling, 1.10 B |
# | `c4_2way` | 720x1440 | 60 | 8192 | 0.5 | 1 | C4 2-way, 1.40 B (padded to 72 outputs) |
# | `c4_4way` | 720x1440 | 60 | 10352 | 1 | 1 | C4 4-way, 2.57 B (padded to 72 outputs) |
# | `tiny` | 16x32 | 4 | 32 | 0.5 | 1 | unit tests, milliseconds |
# | `small` | 32x64 | 2 | 1024 | 0.25 | 1 | about 1 s per training step on one core (49 GFLOP) |
# | `medium` | 64x128 | 2 | 1536 | 0.25 | 1 | about 10 s per training step on one core (584 GFLOP) |
# | `h1024` | 720x1440 | 60 | 1024 | 0.125 | 0.25 | the released H=1024 configuration, 238.5 M (the 720x1440 scale runs on `synthetic:720x1440` data) |
# | `demo` | 32x64 | 4 | 256 | 0.25 | 1 | the README's 4-minute job: ~0.03 s per step, so it sees thousands of samples |
#
# The 720x1440 presets predict the 69 ERA5 channels from 72 inputs (with the 3 statics).

# %%
#| export
_CPU = dict(variables=CPU_CHANNELS, statics=STATICS, dropout=0.0)
PRESETS = {
    "c1_1way": MixerConfig(hidden=4320, f_s=0.5, f_c=1.0),
    "c3": MixerConfig(hidden=4896, f_s=0.5, f_c=1.0),
    "c4_2way": MixerConfig(hidden=8192, f_s=0.5, f_c=1.0, out_pad=3, res_inputs="all", dec_bias="pixel"),
    "c4_4way": MixerConfig(hidden=10352, f_s=1.0, f_c=1.0, out_pad=3, res_inputs="all", dec_bias="pixel"),
    "h1024": MixerConfig(hidden=1024, f_s=0.125, f_c=0.25),
    "tiny": MixerConfig(n_lat=16, n_lon=32, patch=4, hidden=32, f_s=0.5, f_c=1.0, **_CPU),
    "small": MixerConfig(n_lat=32, n_lon=64, patch=2, hidden=1024, f_s=0.25, f_c=1.0, **_CPU),
    "medium": MixerConfig(n_lat=64, n_lon=128, patch=2, hidden=1536, f_s=0.25, f_c=1.0, **_CPU),
    "demo": MixerConfig(n_lat=32, n_lon=64, patch=4, hidden=256, f_s=0.25, f_c=1.0, **_CPU),
}


def preset(name: str, **overrides) -> MixerConfig:
    "The named preset, with `overrides` applied."
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]

# %%
test_eq(preset("c3").tokens, 17280)
test_eq((preset("h1024").n_in, preset("h1024").n_vars, preset("h1024").channel_hidden), (72, 69, 256))
test_eq(preset("tiny", hidden=16).hidden, 16)
test_fail(lambda: preset("huge"), contains="unknown preset 'huge'")

# %% [markdown]
# ## Splitting a dimension into shards
#
# Every parallel layout in this project cuts a dimension of size $n$ into `parts` contiguous
# shards the way `torch.tensor_split` does: the first $n \bmod$ `parts` shards are one longer.
# Data readers, layers and checkpoints all use these two functions, so they agree on who owns what.

# %%
#| export
def split_sizes(n: int, parts: int) -> list[int]:
    "Sizes of `parts` contiguous shards of `n` items, as `torch.tensor_split` cuts them."
    if parts < 1: raise ConfigError(f"parts={parts}: must be >= 1")
    q, r = divmod(n, parts)
    return [q + (i < r) for i in range(parts)]

# %%
#| export
def shard_range(n: int, parts: int, index: int) -> tuple[int, int]:
    "`(start, stop)` of shard `index` of `n` items cut into `parts`."
    sizes = split_sizes(n, parts)
    start = sum(sizes[:index])
    return start, start + sizes[index]

# %%
test_eq(split_sizes(19, 2), [10, 9])
test_eq(shard_range(19, 2, 1), (10, 19))
test_eq(shard_range(72, 2, 0), (0, 36))
