# %%
#| default_exp mixer

# %%
#| export
from __future__ import annotations
import math
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from fastcore.basics import patch
from jigsaw_ref.config import MixerConfig, preset

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail

# %% [markdown]
# # WeatherMixer
#
# > The one-process model: 1D patch encoder, pre-LayerNorm MLP-Mixer blocks, latent rollout, and a decoder with a skip connection and a linear residual.

# %% [markdown]
# ## The MLP-Mixer math
#
# Inside the processor one sample is a matrix $X \in \mathbb{R}^{T \times H}$: $T$ tokens (patches of
# the globe) by $H$ features. A mixer block applies two MLPs, each behind a LayerNorm over the
# features and each added back to its input:
#
# $$X \leftarrow X + W_2\,\sigma(W_1\,\mathrm{LN}(X) + b_1) + b_2, \qquad W_1 \in \mathbb{R}^{T_s \times T},\; W_2 \in \mathbb{R}^{T \times T_s}$$
#
# mixes along tokens (the same weights for every feature column; $T_s = f_s T$), and
#
# $$X \leftarrow X + \sigma(\mathrm{LN}(X)\,W_a + b_a)\,W_b + b_b, \qquad W_a \in \mathbb{R}^{H \times H_c},\; W_b \in \mathbb{R}^{H_c \times H}$$
#
# mixes along features (the same weights for every token row; $H_c = f_c H$). $\sigma$ is GELU.
# In index form, with batch $b$, tokens $t, s$ and features $h, g$:
#
# $$\text{token: } Y_{bsh} = \sum_t W_{st} X_{bth} \quad(\texttt{'st,bth->bsh'}), \qquad \text{channel: } Y_{btg} = \sum_h X_{bth} W_{hg} \quad(\texttt{'bth,hg->btg'}).$$
#
# Token mixing is a left product, channel mixing a right product: this is why Jigsaw splits tokens
# and channels across different ranks. Both cost $2 T T_s H$ and $2 T H H_c$ FLOPs per linear, linear in
# the number of tokens for a fixed $f_s T$ hidden width... and quadratic in $T$ when $f_s$ is a fraction,
# which is the price of a global receptive field in one layer.

# %%
#| export
def token_mix(x, w, b=None):
    "Left product along tokens: `x` (B, T, H), `w` (S, T), `b` (S,) -> (B, S, H)."
    y = torch.einsum("st,bth->bsh", w, x)
    return y if b is None else y + b[:, None]

# %%
#| export
def channel_mix(x, w, b=None):
    "Right product along features: `x` (B, T, H), `w` (H, G), `b` (G,) -> (B, T, G)."
    y = torch.einsum("bth,hg->btg", x, w)
    return y if b is None else y + b

# %%
_x, _w = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
test_close(token_mix(_x, _w), torch.stack([_w @ xi for xi in _x]))
_wc = torch.randn(3, 6, dtype=torch.float64)
test_close(channel_mix(_x, _wc), _x @ _wc)

# %% [markdown]
# ## Parameters with explicit shapes
#
# Every weight in this project is stored in the orientation of the math above (token weights as
# $(T_\text{out}, T_\text{in})$, channel weights as $(H_\text{in}, H_\text{out})$), so a parallel layout is
# nothing but a set of slices of these tensors. `param_shapes` is the single source of truth: the
# model allocates exactly these tensors, and the parameter count is computed from it without
# allocating anything, for any size.
#
# The encoder weight is $(C_\text{in}, P, H)$ so a channel shard is a slice of its first axis; the
# decoder weight is $(2H, V_\text{out}, P)$ (a transposed 1D convolution with kernel = stride = $P$,
# one bias per output channel, as in the released 1-way code). The linear residual acts per pixel on the
# layer-normed prediction concatenated with the $V$ dynamic input channels (`res_inputs='all'`: all $C_\text{in}$).

# %%
#| export
def param_shapes(c: MixerConfig) -> dict[str, tuple[int, ...]]:
    "Name -> shape of every parameter of the one-process WeatherMixer for config `c`."
    H, T, S, G = c.hidden, c.tokens, c.token_hidden, c.channel_hidden
    V, Vo, Cin, P = c.n_res_in, c.n_out, c.n_in, c.patch
    s = {"enc.w": (Cin, P, H), "enc.b": (H,)}
    for i in range(c.blocks):
        s |= {f"blocks.{i}.ln1.w": (H,), f"blocks.{i}.ln1.b": (H,),
              f"blocks.{i}.tok1.w": (S, T), f"blocks.{i}.tok1.b": (S,),
              f"blocks.{i}.tok2.w": (T, S), f"blocks.{i}.tok2.b": (T,),
              f"blocks.{i}.ln2.w": (H,), f"blocks.{i}.ln2.b": (H,),
              f"blocks.{i}.ch1.w": (H, G), f"blocks.{i}.ch1.b": (G,),
              f"blocks.{i}.ch2.w": (G, H), f"blocks.{i}.ch2.b": (H,)}
    s |= {"dec.ln.w": (H,), "dec.ln.b": (H,), "dec.w": (2 * H, Vo, P), "dec.b": (Vo,) if c.dec_bias == "channel" else (Vo, P),
          "res.ln1.w": (Vo,), "res.ln1.b": (Vo,), "res.ln2.w": (Vo + V,), "res.ln2.b": (Vo + V,),
          "res.w": (Vo + V, Vo), "res.b": (Vo,)}
    return s

# %%
#| export
def param_count(c: MixerConfig) -> int:
    "Number of parameters of the one-process WeatherMixer, without allocating it."
    return sum(math.prod(s) for s in param_shapes(c).values())

# %% [markdown]
# The released code prints these counts for its 1-way models (720x1440 grid, $P = 60$, 3 blocks,
# 72 input channels, 69 predicted); ours agree to the parameter:

# %%
_released_1way = {  # (H, f_s, f_c): count printed by the released code (the released training scripts' logs, DeifiliaTo/Jigsaw_SC cases/C1-C4)
    (4896, 0.5, 1): 1_101_500_346, (4320, 0.5, 1): 1_062_380_154, (2832, 0.5, 1): 979_747_050,
    (2192, 0.25, 1): 504_466_890, (1600, 0.125, 1): 259_570_794, (1024, 0.125, 0.25): 238_511_658,
    (512, 0.125, 1): 232_052_010, (368, 0.03125, 1): 61_507_806, (256, 0.125, 0.125): 227_296_650}
for (H, fs, fc), n in _released_1way.items():
    test_eq(param_count(MixerConfig(hidden=H, f_s=fs, f_c=fc)), n)

# %% [markdown]
# The released 2-way code predicts 72 channels (3 zero-weight padding targets), gives the residual all 72
# inputs and the decoder a per-pixel bias. With those switches, and with nothing replicated in our 2-way
# layout (`parallel.layout_param_count`), its printed 2-way counts are reproduced too:

# %%
_released_2way = {(4896, 0.5, 1): 1_103_268_024, (2832, 0.5, 1): 980_771_688, (2192, 0.25, 1): 505_261_128,
                  (1600, 0.125, 1): 260_151_912, (1024, 0.125, 0.25): 238_885_416, (512, 0.125, 1): 232_241_448,
                  (368, 0.03125, 1): 61_645_404, (256, 0.125, 0.125): 227_393_928, (8192, 0.5, 1): 1_404_881_688,
                  (6064, 1, 1): 2_091_058_632}
_par = dict(out_pad=3, res_inputs="all", dec_bias="pixel")
for (H, fs, fc), n in _released_2way.items():
    test_eq(param_count(MixerConfig(hidden=H, f_s=fs, f_c=fc, **_par)), n)

# %% [markdown]
# ## FLOPs
#
# The paper counts one training step as three times the forward GEMM FLOPs (backward costs two
# forwards). Per sample and rollout step $k$: the encoder $2 T (C_\text{in} P) H$, each block
# $2 \cdot 2 T T_s H + 2 \cdot 2 T H H_c$, the decoder $2 T (2H)(V_\text{out} P)$ and the residual
# $2 N_\text{pix} (V_\text{out}+V) V_\text{out}$.

# %%
#| export
def forward_flops(c: MixerConfig, batch: int = 1, k: int = 1) -> int:
    "GEMM FLOPs of one forward pass of `batch` samples with `k` latent rollout steps."
    H, T, S, G, P = c.hidden, c.tokens, c.token_hidden, c.channel_hidden, c.patch
    enc = 2 * T * c.n_in * P * H
    blk = 4 * T * S * H + 4 * T * H * G
    dec = 2 * T * 2 * H * c.n_out * P
    res = 2 * c.n_lat * c.n_lon * (c.n_out + c.n_res_in) * c.n_out
    return batch * (enc + k * c.blocks * blk + dec + res)

# %%
#| export
def train_step_flops(c: MixerConfig, batch: int = 1, k: int = 1) -> int:
    "FLOPs of one training step by the paper's convention: 3x the forward GEMM FLOPs."
    return 3 * forward_flops(c, batch, k)

# %%
# C3 (H=4896): ~6.9 TFLOP per forward; the paper's 3.03 s/step on one A100 in FP32 is 81% of 19.5 TF/s
test_close(train_step_flops(preset("c3")) / 3.03 / 19.5e12, 0.81, eps=0.02)

# %% [markdown]
# ## The model
#
# **Encoder ("1D patching").** Each latitude row is cut along longitude into patches of $P$ pixels.
# Tokens are ordered *longitude-patch-major* ($t = j \cdot n_\text{lat} + i$ for latitude row $i$ and
# longitude patch $j$), so a band of longitudes is a contiguous block of tokens: that is what makes a
# domain shard a plain slice in the parallel layouts. The token order is a convention only: the token
# MLPs are dense, so any order gives the same model up to a permutation of their weights.
#
# $$Z_{t h} = \sum_{c, p} x_{c,\, i,\, jP + p}\, W^e_{c p h} + b^e_h$$

# %%
#| export
def patchify(x, P: int):
    "Pixels (B, C, n_lat, n_lon) -> patches (B, T, C, P), tokens longitude-patch-major."
    B, C, n_lat, n_lon = x.shape
    x = x.reshape(B, C, n_lat, n_lon // P, P)  # b c i j p
    return x.permute(0, 3, 2, 1, 4).reshape(B, (n_lon // P) * n_lat, C, P)

# %%
#| export
def unpatchify(y, n_lat: int):
    "Patches (B, T, C, P) -> pixels (B, C, n_lat, n_lon); inverse of `patchify`."
    B, T, C, P = y.shape
    y = y.reshape(B, T // n_lat, n_lat, C, P)  # b j i c p
    return y.permute(0, 3, 2, 1, 4).reshape(B, C, n_lat, (T // n_lat) * P)

# %%
_img = torch.arange(2 * 3 * 4 * 8.).reshape(2, 3, 4, 8)
test_eq(unpatchify(patchify(_img, 4), 4), _img)
test_eq(patchify(_img, 4)[0, 5, 1], _img[0, 1, 1, 4:8])  # token 5 = lon patch 1, lat row 1

# %% [markdown]
# **Decoder.** The processor output is layer-normed and concatenated with the encoder output (a skip
# connection, $2H$ features), then a transposed patching maps each token back to its $P$ pixels of
# every output channel:
# $y_{c,\, i,\, jP+p} = \sum_{g} [\mathrm{LN}(X), Z]_{t g}\, W^d_{g c p} + b^d_c$.
#
# **Linear residual.** Per pixel, the layer-normed prediction is concatenated with the $V$ dynamic input
# channels, layer-normed again and mapped linearly to the output:
# $\hat y = W^r\, \mathrm{LN}([\mathrm{LN}(y),\, x_{1..V}]) + b^r$.

# %% [markdown]
# ## Dropout that does not depend on the layout
#
# `torch.nn.functional.dropout` draws its mask from the process's random stream, so a model cut over four
# ranks would drop different elements than the same model in one process, and a run resumed on another
# layout would continue differently. Here which elements are dropped is a pure function of the step's key,
# the dropout site and the element's **global** index, and a rank finds those of its block from the block's
# offsets alone, with no communication.
#
# First, the integer hash the whole construction rests on (it also draws the initial weights, below):
# $h$ is a 32-bit integer mixer (lowbias32-style; products split so they fit in int64), exact on every device.

# %%
#| export
_M32 = 0xFFFFFFFF


def _mul32(x, c: int):
    "`(x * c) mod 2^32` for int64 tensors `x` in [0, 2^32) without int64 overflow."
    return ((x * (c & 0xFFFF)) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32

# %%
#| export
def _hash32(x):
    "A 32-bit integer mixer applied elementwise to int64 values in [0, 2^32)."
    x = x ^ (x >> 16); x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15); x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)

# %%
#| export
def dropout_key(seed: int, step: int, site: int = 0) -> int:
    "The key of dropout `site` at optimizer `step` of a run seeded `seed`: the same on every rank."
    k = torch.tensor([(seed * 0x9E3779B1 + step) & _M32], dtype=torch.int64)
    return int(_hash32(_hash32(k) ^ (site & _M32))[0])

# %%
test_eq(dropout_key(0, 3), dropout_key(0, 3))
assert len({dropout_key(0, s) for s in range(100)} | {dropout_key(1, s) for s in range(100)}) == 200

# %% [markdown]
# **Drops as gaps along each row.** Hashing every element (a dozen integer passes over each hidden tensor, in
# the forward and again in the backward) cost up to 70% of a training step. At the rates used ($p = 10^{-3}$)
# almost nothing is dropped, so the drops are drawn *directly*: along each row of the full tensor (all indices
# but the last fixed; $R$ its global row number) the numbers of kept elements between consecutive drops are
# independent geometric variables, $P(g \ge k) = (1-p)^k$, which is exactly a sequence of independent
# Bernoulli($p$) drops. Row $R$ has the stream $s_R = h(h(R \bmod 2^{32} \oplus h(\lfloor R/2^{32} \rfloor)) \oplus k_s)$
# (the key mixed in after $R$ is hashed, so sites whose keys differ in a few bits do not share rows' streams), and
# gap $m$ of the row comes from the uniform 32-bit integer $u_{R,m} = h(s_R \oplus m)$ by an exact integer
# comparison with the thresholds $\lfloor (1-p)^k\, 2^{32} \rfloor$ (computed by repeated multiplication in
# Python floats: the same bits on every machine):
# $$g_{R,m} = \#\{k \ge 1 : u_{R,m} < \lfloor (1-p)^k 2^{32} \rfloor\}, \qquad c_{R,m} = c_{R,m-1} + g_{R,m} + 1,\ c_{R,0} = -1,$$
# and the drops of row $R$ are its columns $c_{R,1}, c_{R,2}, \dots$. A rank holding columns $[c_0, c_0+n)$ of a
# row walks the row's gaps from column 0 (about $p\,(c_0+n)$ of them, a few per row) and keeps the drops that
# land in its columns. So the work is $O(p \cdot \text{row length})$ per row, not $O(1)$ per element, and the
# drops of a block are exactly the full tensor's drops there on every layout.
#
# These few numbers per row are computed with numpy in unsigned 32-bit arithmetic (`_h32`, the same mixer as
# `_hash32`: numpy's uint32 products wrap modulo $2^{32}$ by definition), where a small array costs a
# microsecond per operation instead of torch's several; on a GPU only the resulting indices are copied to the
# device, so drawing the mask never waits for the GPU.

# %%
#| export
def _h32(x: np.ndarray) -> np.ndarray:
    "`_hash32` on a numpy uint32 array (in place; products wrap modulo 2^32)."
    x ^= x >> np.uint32(16); x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15); x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x

# %%
_v = torch.randint(0, 2**32, (1000,), generator=torch.Generator().manual_seed(1))
test_eq(torch.from_numpy(_h32(_v.numpy().astype(np.uint32)).astype(np.int64)), _hash32(_v))  # the same mixer, bit for bit

# %% [markdown]
# `_gap_table` holds the thresholds, descending, with $2^{32}$ at $k = 0$ and a 0 after the last (gaps past the
# row's end need no entry). `_gaps` finds $g$ for many $u$ at once: a floating-point estimate
# $\lfloor \ln(u / 2^{32}) / \ln(1-p) \rfloor$, then corrected by exact integer comparisons with the thresholds
# on both sides, so the result is the integer definition above on any machine (a binary search over the
# table gives the same numbers several times slower).

# %%
#| export
_GAPS: dict = {}


def _gap_table(p: float, longest: int) -> np.ndarray:
    "int64 thresholds floor((1-p)^k 2^32) for k = 0, 1, ... while not 0 and k <= longest + 1, then one 0."
    if (p, longest) not in _GAPS:
        thr, t = [2**32], 1.0
        for _ in range(longest + 1):
            t *= 1 - p
            if int(t * 2**32) == 0: break
            thr.append(int(t * 2**32))
        _GAPS[(p, longest)] = np.array(thr + [0], dtype=np.int64)
    return _GAPS[(p, longest)]

# %%
#| export
def _gaps(u: np.ndarray, p: float, table: np.ndarray) -> np.ndarray:
    "g = #{k >= 1 : u < table[k]} for uniforms `u` (int64, in [0, 2^32); table from `_gap_table`)."
    K = len(table) - 2  # the last k with a threshold
    g = np.zeros_like(u) if p >= 1 else np.clip(np.floor(np.log((u + 0.5) / 2**32) / math.log1p(-p)), 0, K).astype(np.int64)
    while True:  # settle the estimate exactly (it is off by one near a threshold, more where thresholds repeat)
        step = (u < table[g + 1]).astype(np.int64) - ((u >= table[g]) & (g > 0))  # below the next one: up; not below this one: down
        if not step.any(): return g
        g += step

# %%
_t = _gap_table(0.3, 50)
_u = np.random.default_rng(0).integers(0, 2**32, 10000)
test_eq(_gaps(_u, 0.3, _t), (_u[:, None] < _t[None, 1:]).sum(1))  # the count, by brute force
test_eq(_gaps(_t[1:-1].copy(), 0.3, _t), np.arange(len(_t) - 2))  # exactly at a threshold: not below it
_t = _gap_table(1e-3, 30000)  # the tail, where consecutive thresholds repeat (u of a few units)
_u = np.concatenate([np.arange(0, 3000, 7), _u[:1000]])
test_eq(_gaps(_u, 1e-3, _t), (_u[:, None] < _t[None, 1:]).sum(1))

# %% [markdown]
# `drop_index` gives the dropped elements of a block from its offsets: `starts[d]` is where the block begins
# along dim $d$ of the full tensor and `full[d]` the full extent (dim 0, the batch, needs no extent). Each row
# draws its gaps `M` at a time (enough for all of them with high probability); a row that has not yet passed
# its last column draws `M` more.

# %%
#| export
def _gaps_per_draw(end: int, p: float) -> int:
    "Gaps drawn per row at a time: the mean number of drops up to column `end` plus 3 standard deviations and 2."
    return int(end * p + 3 * math.sqrt(end * p + 1) + 2)

# %%
#| export
def drop_index(shape, p: float, key: int, starts, full, device=None) -> torch.Tensor:
    "Flat indices (row-major, into the block `shape` at `starts` of a tensor with extents `full`) of the dropped elements."
    *lead, n = shape
    c0, end = starts[-1], starts[-1] + n  # my columns [c0, end); gaps are walked from column 0
    if n == 0 or math.prod(lead) == 0: return torch.zeros(0, dtype=torch.int64, device=device)
    R = np.zeros(1, dtype=np.int64)
    for d, m in enumerate(lead):  # global row numbers of my rows, row-major (ascending)
        R = (R[:, None] * (full[d] if d else 1) + np.arange(starts[d], starts[d] + m, dtype=np.int64)).ravel()
    lo = (R & _M32).astype(np.uint32)
    if R[-1] >> 32: lo ^= _h32((R >> 32).astype(np.uint32))  # rows past 2^32: the high word enters (h(0) = 0)
    stream = _h32(_h32(lo) ^ np.uint32(key & _M32))  # one stream per row
    table, M = _gap_table(p, end), _gaps_per_draw(end, p)
    rows, last, m0, out = np.arange(len(R)), np.full(len(R), -1, dtype=np.int64), 0, []
    while rows.size:
        u = _h32(stream[rows, None] ^ np.arange(m0, m0 + M, dtype=np.uint32)).astype(np.int64)  # (rows, M)
        c = last[rows, None] + np.cumsum(_gaps(u, p, table) + 1, axis=1)  # the drops' columns
        r_i, m_i = np.nonzero((c >= c0) & (c < end))
        out.append(rows[r_i] * n + c[r_i, m_i] - c0)
        last[rows] = c[:, -1]
        rows, m0 = rows[c[:, -1] < end - 1], m0 + M
    idx = np.concatenate(out)
    if len(out) > 1: idx.sort()  # ascending, however many draws the rows took (one draw: already so)
    return torch.from_numpy(idx).to(device)

# %%
#| export
def keep_mask(shape, p: float, key: int, starts, full, device=None) -> torch.Tensor:
    "Keep-mask (bool) of the block `shape` at `starts` of a full tensor with extents `full`: the same bits on any layout."
    m = torch.ones(math.prod(shape), dtype=torch.bool, device=device)
    m[drop_index(shape, p, key, starts, full, device)] = False
    return m.view(tuple(shape))

# %%
_full = keep_mask((3, 6, 5), 0.3, 7, (0, 0, 0), (3, 6, 5))
test_eq(keep_mask((2, 4, 2), 0.3, 7, (1, 2, 3), (3, 6, 5)), _full[1:3, 2:6, 3:5])  # a block has the full mask's bits
test_close(keep_mask((64, 64, 64), 0.3, 7, (0, 0, 0), (64, 64, 64)).double().mean(), 0.7, eps=0.01)
_big = ~keep_mask((8, 256, 512), 0.01, 9, (0, 0, 0), (8, 256, 512))  # 1M elements, about 10,000 drops
test_close(_big.double().mean(), 0.01, eps=4 * math.sqrt(0.01 / _big.numel()))  # the rate, within 4 sigma
test_close((_big[..., 1:] & _big[..., :-1]).double().mean(), 1e-4, eps=4e-5)  # neighbours dropped together: p^2
test_close((_big[:, 1:] & _big[:, :-1]).double().mean(), 1e-4, eps=4e-5)  # across rows too

# %% [markdown]
# The autograd function: forward $y = x \odot m / (1-p)$, backward $\partial x = \partial y \odot m / (1-p)$. The
# dropped positions (about $p$ of the elements, as int64) are saved for the backward instead of being drawn
# again: at $p = 10^{-3}$ that is 0.8% of the bytes of the tensor they mask. Both directions are one division
# pass and a scatter of zeros, the cost of `torch.nn.functional.dropout`'s own multiply.

# %%
#| export
def _scaled(x, p: float) -> torch.Tensor:
    "`x / (1 - p)` written row-major whatever the strides of `x` (one pass, so the drops' flat indices apply)."
    return torch.div(x, 1 - p, out=torch.empty(x.shape, dtype=x.dtype, device=x.device))


class _Dropout(torch.autograd.Function):
    "Forward: `x * mask / (1 - p)` with the layout-independent mask; backward: the same mask, from the saved dropped positions."
    @staticmethod
    def forward(ctx, x, p, key, starts, full):
        idx = drop_index(x.shape, p, key, starts, full, x.device)
        ctx.save_for_backward(idx); ctx.p = p
        return _scaled(x, p).view(-1).index_fill_(0, idx, 0).view(x.shape)

    @staticmethod
    def backward(ctx, g):
        idx, = ctx.saved_tensors
        return _scaled(g, ctx.p).view(-1).index_fill_(0, idx, 0).view(g.shape), None, None, None, None

# %%
#| export
def dropout(x, p: float, training: bool, key: int, starts=None, full=None):
    "Dropout with a mask that depends only on (`key`, the element's global index): `starts`/`full` place `x` in its full tensor."
    if not training or p == 0: return x
    starts = tuple(starts) if starts is not None else (0,) * x.dim()
    return _Dropout.apply(x, p, key, starts, tuple(full) if full is not None else tuple(x.shape))

# %%
_x = torch.randn(2, 6, 5, dtype=torch.float64, requires_grad=True)
_y = dropout(_x, 0.5, True, key=11)
_y.sum().backward()
test_eq((_y == 0), (_x.grad == 0))  # dropped in the forward, zero gradient in the backward
test_close(_y[_y != 0], 2 * _x[_y != 0])
test_eq(_y.detach(), _x.detach() * keep_mask(_x.shape, 0.5, 11, (0, 0, 0), _x.shape) / 0.5)  # x * m / (1 - p), bit for bit
assert dropout(_x, 0.5, False, key=11) is _x  # evaluation: the identity
test_eq(dropout(_x[:, 2:4].detach(), 0.5, True, key=11, starts=(0, 2, 0), full=(2, 6, 5)), _y[:, 2:4].detach())  # a block, alone
test_eq(dropout(_x.detach().transpose(1, 2), 0.5, True, key=11), _x.detach().transpose(1, 2) * keep_mask((2, 5, 6), 0.5, 11, (0, 0, 0), (2, 5, 6)) / 0.5)  # any strides

# %% [markdown]
# Sites: every dropout of a forward pass has its own number, `site = ((rollout step * blocks + block) * 4 + which)`,
# `which` = 0 after the token GELU, 1 after the token MLP, 2 after the channel GELU, 3 after the channel MLP.
# The key of a site is `dropout_key(seed, step, site)`; the batch offset `sample0` is the position of this
# rank's first sample in the global batch, so data-parallel replicas drop what the one-process model drops
# for the same samples.

# %%
#| export
def site_key(key: int, rollout: int, block: int, which: int, blocks: int) -> int:
    "The key of one dropout site of a forward pass whose key is `key`."
    return int(_h32(np.array([(key ^ (((rollout * blocks + block) * 4 + which) * 0x9E3779B1 & _M32)) & _M32], dtype=np.uint32))[0])

# %%
test_eq(site_key(12345, 1, 2, 3, 3), int(_hash32(torch.tensor([12345 ^ ((1 * 3 + 2) * 4 + 3) * 0x9E3779B1 & _M32]))[0]))

# %%
#| export
def _ln(x, w, b, eps=1e-5):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)

# %%
#| export
class WeatherMixer(nn.Module):
    "The one-process WeatherMixer: encoder, `blocks` mixer blocks run `k` times, decoder, linear residual."
    def __init__(self, cfg: MixerConfig, dtype=torch.float32, device=None, seed: int | None = 0):
        super().__init__()
        self.cfg = cfg
        self._names = list(param_shapes(cfg))
        self.params = nn.ParameterDict({n.replace(".", "/"): nn.Parameter(torch.empty(s, dtype=dtype, device=device))
                                        for n, s in param_shapes(cfg).items()})
        init_params(self.state(), cfg, seed)

    def state(self) -> dict[str, torch.Tensor]:
        "Parameters by their dotted names (views, not copies)."
        return {n: self.params[n.replace(".", "/")] for n in self._names}

# %% [markdown]
# The encoder: one linear map from the $C_\text{in} P$ values of a patch to $H$ features.

# %%
#| export
@patch
def encode(self: WeatherMixer, x):
    "Pixels (B, C_in, n_lat, n_lon) -> tokens (B, T, H)."
    p = self.state()
    return torch.einsum("btcp,cph->bth", patchify(x, self.cfg.patch), p["enc.w"]) + p["enc.b"]

# %% [markdown]
# A mixer block, with each dropout placed by `dropout`'s key and offsets:

# %%
#| export
@patch
def block(self: WeatherMixer, x, i: int, key: int = 0, sample0: int = 0, rollout: int = 0):
    "Mixer block `i` on tokens (B, T, H); `key`, `sample0`, `rollout` place its dropout masks (see `dropout`)."
    p, c = self.state(), self.cfg
    pre = f"blocks.{i}."
    def drop(t, which):
        return dropout(t, c.dropout, self.training, site_key(key, rollout, i, which, c.blocks), (sample0, 0, 0), t.shape)
    u = _ln(x, p[pre + "ln1.w"], p[pre + "ln1.b"])
    u = drop(F.gelu(token_mix(u, p[pre + "tok1.w"], p[pre + "tok1.b"])), 0)
    x = x + drop(token_mix(u, p[pre + "tok2.w"], p[pre + "tok2.b"]), 1)
    u = _ln(x, p[pre + "ln2.w"], p[pre + "ln2.b"])
    u = drop(F.gelu(channel_mix(u, p[pre + "ch1.w"], p[pre + "ch1.b"])), 2)
    return x + drop(channel_mix(u, p[pre + "ch2.w"], p[pre + "ch2.b"]), 3)

# %% [markdown]
# The decoder with its skip connection, then the per-pixel linear residual:

# %%
#| export
@patch
def decode(self: WeatherMixer, x, z, inp):
    "Processor output `x` and encoder output `z` (B, T, H), input pixels -> prediction (B, V_out, n_lat, n_lon)."
    p, c = self.state(), self.cfg
    u = torch.cat([_ln(x, p["dec.ln.w"], p["dec.ln.b"]), z], dim=-1)  # b t 2H
    y = torch.einsum("btg,gcp->btcp", u, p["dec.w"]) + (p["dec.b"][:, None] if c.dec_bias == "channel" else p["dec.b"])
    y = unpatchify(y, c.n_lat)
    y = y.permute(0, 2, 3, 1)  # b i l c: channels last for the per-pixel residual
    r = torch.cat([_ln(y, p["res.ln1.w"], p["res.ln1.b"]), inp[:, : c.n_res_in].permute(0, 2, 3, 1)], -1)
    r = _ln(r, p["res.ln2.w"], p["res.ln2.b"]) @ p["res.w"] + p["res.b"]
    return r.permute(0, 3, 1, 2)

# %% [markdown]
# The forward pass: encode, run the processor `k` times with tied weights, decode.

# %%
#| export
@patch
def forward(self: WeatherMixer, x, k: int = 1, key: int = 0, sample0: int = 0):
    "Input pixels (B, C_in, n_lat, n_lon) -> the state `k` steps ahead; `key`/`sample0` fix the dropout masks."
    z = h = self.encode(x)
    for r in range(k):
        for i in range(self.cfg.blocks): h = self.block(h, i, key, sample0, r)
    return self.decode(h, z, x)

# %% [markdown]
# ## Initialisation
#
# Weights are uniform in $\pm 1/\sqrt{\text{fan-in}}$ like `torch.nn.Linear`; LayerNorm weights start at one and
# all biases at zero. Padding outputs get zero weights so they predict exactly zero. The value of every element
# is a pure function of (seed, parameter, the element's global index), drawn with the same counter-based hash as
# the dropout masks, so a rank computes **only its own block** of each initial weight, from the block's index
# lists, and gets exactly the values the one-process model has there: every layout starts from the same model,
# and no rank ever builds a full weight it does not hold.

# %%
#| export
def _fan_in(name, shape):
    if name == "enc.w": return shape[0] * shape[1]  # C_in * P
    if name.endswith("tok1.w") or name.endswith("tok2.w"): return shape[1]
    return shape[0]  # (in, out) orientation: dec.w (2H, V_out, P), res.w, ch*.w

# %%
#| export
def _uniform(index: list, shape, key: int):
    "Uniform [0, 1) values at the index lists `index` of a tensor of `shape`, a function of `key` and the global indices."
    idx = torch.zeros((), dtype=torch.int64)
    for d, ix in enumerate(index):
        idx = idx * shape[d] + torch.as_tensor(ix, dtype=torch.int64).view([len(ix)] + [1] * (len(index) - d - 1))
    return _hash32(_hash32((idx & _M32) ^ key) ^ (idx >> 32)).double() / 2**32

# %%
#| export
def init_block(cfg: MixerConfig, name: str, index: list | None = None, seed: int = 0, dtype=torch.float64):
    "The initial values of parameter `name` at the index lists `index` (one per dim; None: the whole tensor)."
    shapes = param_shapes(cfg); shape = shapes[name]
    index = [list(range(n)) for n in shape] if index is None else [list(ix) for ix in index]
    size = [len(ix) for ix in index]
    if name.endswith(".b"): v = torch.zeros(size, dtype=torch.float64)
    elif ".ln" in name or name.startswith("dec.ln"): v = torch.ones(size, dtype=torch.float64)
    else:
        key = dropout_key(seed, list(shapes).index(name), site=0x1A17)  # one stream per parameter
        v = (_uniform(index, shape, key) * 2 - 1) / math.sqrt(_fan_in(name, shape))
    if name in ("dec.w", "dec.b", "res.w", "res.b") and cfg.out_pad:  # padding targets: zero weights
        ax = 1 if name == "dec.w" else v.dim() - 1 if name.startswith("res") else 0  # the output-channel axis
        keep = (torch.as_tensor(index[ax]) < cfg.n_vars).to(v.dtype)
        v = v * keep.view([-1 if k == ax else 1 for k in range(v.dim())])
    return v.to(dtype)

# %%
#| export
def full_params(cfg: MixerConfig, seed: int = 0, dtype=torch.float64):
    "Yield `(name, tensor)` for every initial parameter of `cfg`, one at a time, from `seed`."
    for name in param_shapes(cfg): yield name, init_block(cfg, name, None, seed, dtype)

# %% [markdown]
# A block computed alone has exactly the full tensor's values there, non-contiguous index lists included:

# %%
_c = preset("tiny", out_pad=2)
_full = dict(full_params(_c, seed=3))
_ix = [[1, 5, 6], list(range(2)), list(range(10, 20))]
test_eq(init_block(_c, "enc.w", _ix, seed=3), _full["enc.w"][[1, 5, 6]][:, :2, 10:20])
test_eq(init_block(_c, "res.w", [list(range(5)), [0, 18, 19, 20]], seed=3)[:, 2:].abs().sum(), 0)  # padding outputs: zero
assert not torch.equal(dict(full_params(_c, seed=4))["enc.w"], _full["enc.w"])
test_close(_full["blocks.0.tok1.w"].abs().max(), 1 / math.sqrt(_c.tokens), eps=1e-3)

# %%
#| export
@torch.no_grad()
def init_params(params: dict, cfg: MixerConfig, seed: int | None = 0):
    "Initialise `params` (name -> tensor, the shapes of `param_shapes(cfg)`) in place from `seed`."
    for name, v in full_params(cfg, seed): params[name].copy_(v)

# %%
_tiny = preset("tiny")
_m = WeatherMixer(_tiny)
test_eq(sum(p.numel() for p in _m.parameters()), param_count(_tiny))
test_eq({n: tuple(t.shape) for n, t in _m.state().items()}, param_shapes(_tiny))
_x = torch.randn(2, _tiny.n_in, _tiny.n_lat, _tiny.n_lon)
test_eq(_m(_x).shape, (2, _tiny.n_out, _tiny.n_lat, _tiny.n_lon))
test_close(WeatherMixer(_tiny)(_x), _m(_x))  # same seed, same model

# %% [markdown]
# The padded variant predicts zeros in its padding channels, so its loss on the real channels is the
# unpadded model's:

# %%
_mp = WeatherMixer(_tiny.replace(out_pad=3))
test_eq(_mp(_x)[:, _tiny.n_vars:].abs().max().item(), 0.0)

# %% [markdown]
# Latent rollout runs the processor $k$ times before one decode (tied weights), predicting $k \cdot 6$ h ahead:

# %%
test_eq(_m(_x, k=2).shape, _m(_x).shape)
assert not torch.allclose(_m(_x, k=2), _m(_x, k=1))
