"""A float64 one-process simulation of the released 4-way (2x2) WeatherMixer of DeifiliaTo/Jigsaw_SC.

Written from a reading of the released research code (see tests/released_4way.md); no code is
copied. Every "rank" r = 0..3 holds token (longitude) half r // 2 and channel half r % 2, its own
parameters under the released names, and computes exactly what the released code computes on that rank;
the point-to-point messages of `Jigsaw/src/distributed_matmul.py` become tensors handed from one
per-rank computation to another, and are recorded (source, destination, element count) in a `Log`.

The three released block products are torch.autograd Functions whose backward runs the same block
products that the released autograd functions in `Jigsaw/src/Linear.py` run, so the backward exchanges
are simulated (and counted) too; `plain=True` replaces them by differentiable forward code and lets torch
derive the backward (the two agree: the released backward is the exact gradient).

Public helpers (all on a `jigsaw_ref.config.MixerConfig`):
- `released_shapes(cfg)`: released name -> per-rank shape (the same on every rank).
- `released_params(cfg, seed_per_rank, init)`: 4 dicts, released name -> float64 tensor.
- `released_forward(cfg, params, x_full, k, log, plain)`: the full output (B, n_out, n_lat, n_lon).
- `to_jigsaw_faithful(cfg, params)`: 4 dicts (rank r = i * 2 + j), jigsaw_ref faithful name -> tensor.
- `block_send_formula(T, H, S, G, batch)`: elements each rank sends per mixer block, forward and backward.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn.functional as F

from jigsaw_ref.config import MixerConfig

RANKS = 4


def coords(r: int) -> tuple[int, int]:
    "(token half i, channel half j) of released rank r: `Jigsaw/src/PatchEmbedding.py` slices lon half r // 2, variables r % 2."
    return r // 2, r % 2


def rank_of(i: int, j: int) -> int:
    return 2 * i + j


# ----------------------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------------------
def released_sizes(cfg: MixerConfig) -> dict:
    """Per-rank sizes of the released 4-way model; raises ValueError where the released code cannot build `cfg`.

    `Jigsaw/src/Model.py` `Model.__init__`: `MixerBlock(n_lat * n_lon // 2, hidden_dim // 2, ...)`, so every rank
    holds T/2 tokens and H/2 channels; `Linear.py` `MixerBlock.__init__`: the token hidden is
    `int(T/2 * f_s)` and the channel hidden `int(H/2 * f_c)` per rank. Every exchange buffer in
    `distributed_matmul.py` has the shape of the receiver's own block (`get_preallocated_buffer(Xij.shape, ...)`),
    so all four blocks of every matrix must be equal: no uneven splits. The released code hard-codes 36
    channels per rank (72 = 69 + 3 statics in, 69 + 3 padding out); here that is `n_in // 2 == n_out // 2`."""
    T, H, P = cfg.tokens, cfg.hidden, cfg.patch
    problems = []
    if cfg.n_lon_patches % 2: problems.append(f"n_lon_patches={cfg.n_lon_patches} must be even (two longitude halves)")
    if H % 2: problems.append(f"hidden={H} must be even")
    if cfg.n_in % 2 or cfg.n_in != cfg.n_out:
        problems.append(f"n_in={cfg.n_in} and n_out={cfg.n_out} must be equal and even (the released 36 + 36; use out_pad)")
    if cfg.res_inputs != "all": problems.append("res_inputs must be 'all' (the residual sees every input channel)")
    if cfg.dec_bias != "pixel": problems.append("dec_bias must be 'pixel' (recovery bias of size P * 36 per rank)")
    S2, G2 = int(T // 2 * cfg.f_s), int(H // 2 * cfg.f_c)
    if 2 * S2 != cfg.token_hidden:
        problems.append(f"int(f_s*T)={cfg.token_hidden} != 2*int(f_s*T/2)={2 * S2}: jigsaw_ref and the released code size S differently")
    if 2 * G2 != cfg.channel_hidden:
        problems.append(f"int(f_c*H)={cfg.channel_hidden} != 2*int(f_c*H/2)={2 * G2}: jigsaw_ref and the released code size G differently")
    if problems: raise ValueError("the released 4-way code cannot build this config: " + "; ".join(problems))
    return dict(T2=T // 2, H2=H // 2, S2=S2, G2=G2, C2=cfg.n_in // 2, P=P, nlp2=cfg.n_lon_patches // 2,
                lat=cfg.n_lat, lonh=cfg.n_lon // 2)


# ----------------------------------------------------------------------------------------------------------
# Parameters: names, shapes, initialisation
# ----------------------------------------------------------------------------------------------------------
def _layers(cfg: MixerConfig) -> list[tuple[str, tuple, tuple | None, float | None]]:
    """(module prefix, weight shape, bias shape, init bound) in the order `Model.__init__` creates them
    (`Jigsaw/src/Model.py`). LayerNorms have bound None (torch.nn.LayerNorm: ones and zeros, no random draw).
    Bounds are those of the constructors in `Jigsaw/src/Linear.py`: weight and bias both uniform(-b, b)."""
    z = released_sizes(cfg)
    T2, H2, S2, G2, C2, P, H = z["T2"], z["H2"], z["S2"], z["G2"], z["C2"], z["P"], cfg.hidden
    conv = lambda n_channels: math.sqrt(6.0) / (8 * 8 * n_channels)  # DistributedXWT_fourway init_method='conv'
    # PatchEmbedding.Distributed1DPatchEmbedding.__init__: DistributedXWT_fourway(P*72//2, H//2, n_channels=72, 'conv')
    out = [("embedding.patch_embed", (H2, P * C2), (H2,), conv(cfg.n_in))]
    for b in range(cfg.blocks):  # Linear.MixerBlock.__init__: token_mixing, channel_mixing, transpose, layer_norm1, layer_norm2
        n = f"blocks.{b}."
        out += [  # DistributedXTWMLP (parallelism 4): linear1 = DistributedXTW_fourway 'linear', linear2 = DistributedXW_fourway
            (n + "token_mixing.linear1", (T2, S2), (S2,), 1 / math.sqrt(T2 * 2)),
            (n + "token_mixing.linear2", (S2, T2), (T2,), 1 / math.sqrt(S2 * T2 * 4)),
            # DistributedMLP (parallelism 4): two DistributedXWT_fourway 'linear', weights stored (out, in)
            (n + "channel_mixing.linear1", (G2, H2), (G2,), 1 / math.sqrt(H2 * 2)),
            (n + "channel_mixing.linear2", (H2, G2), (H2,), 1 / math.sqrt(G2 * 2)),
            (n + "layer_norm1.layer_norm", (H2,), (H2,), None),  # DistributedLayerNorm(H//2): a torch LayerNorm
            (n + "layer_norm2.layer_norm", (H2,), (H2,), None)]
    out += [("layer_norm.layer_norm", (H2,), (H2,), None),  # Model.layer_norm: before the concat with the encoder output
            ("layer_norm2.layer_norm", (C2,), (C2,), None),  # Model.layer_norm2: LN(36) of the prediction
            ("layer_norm3.layer_norm", (2 * C2,), (2 * C2,), None),  # Model.layer_norm3: LN(72) of [prediction, input]
            # Distributed1DPatchRecovery(concat=True, stride=P): DistributedXWT_fourway(H, P*36, n_channels=H, 'conv')
            ("recovery.conv", (P * C2, H), (P * C2,), conv(H)),
            # Model.linearlayer: DistributedXWT_fourway(72, 36) 'linear'
            ("linearlayer", (C2, 2 * C2), (C2,), 1 / math.sqrt(2 * C2 * 2))]
    return out


def _names(prefix):
    if prefix.endswith("layer_norm"): return prefix + ".weight", prefix + ".bias"
    return prefix + ".weights", prefix + ".bias"  # the released Distributed* modules call their matrix `weights`


def released_shapes(cfg: MixerConfig) -> dict[str, tuple]:
    "Released parameter name -> shape on every rank (all four ranks have the same shapes)."
    s = {}
    for prefix, ws, bs, _ in _layers(cfg):
        wn, bn = _names(prefix)
        s[wn], s[bn] = ws, bs
    return s


def released_param_count(cfg: MixerConfig) -> int:
    "What the released script prints: `count_parameters(model) * parallelism` (rank 0's count times 4)."
    return RANKS * sum(math.prod(s) for s in released_shapes(cfg).values())


def released_params(cfg: MixerConfig, seed_per_rank=(1, 2, 3, 4), init: str = "released") -> list[dict]:
    """Four dicts (rank order), released name -> float64 tensor; every rank draws from its own seed.

    init='released': the released scheme. `scripts/equivalent_fourway.py` calls `utils.set_all_seeds(1, rank=r % 4)`
    (seed 1 + r) before `Model.Model(...)`, and every `Distributed*` module draws `torch.zeros(shape).uniform_(-b, b)`
    in float32, weight first, then bias, in construction order; LayerNorms start at ones and zeros. The default
    seeds (1, 2, 3, 4) are the released ones; drawing in float32 from a CPU generator in that order is meant to
    give the released initial values (not checked against a run of the released code).
    init='random': every parameter random, including LayerNorm weights and biases, and biases of order 0.5, so
    that untied per-rank copies differ strongly (what the comparison tests want)."""
    if init not in ("released", "random"): raise ValueError(f"init={init!r}: choose 'released' or 'random'")
    if len(seed_per_rank) != RANKS: raise ValueError(f"seed_per_rank needs {RANKS} seeds, got {len(seed_per_rank)}")
    out = []
    for r in range(RANKS):
        g, d = torch.Generator().manual_seed(int(seed_per_rank[r])), {}
        u = lambda shape, b: torch.zeros(shape, dtype=torch.float32).uniform_(-b, b, generator=g).double()
        for prefix, ws, bs, bound in _layers(cfg):
            wn, bn = _names(prefix)
            if init == "released":
                if bound is None: d[wn], d[bn] = torch.ones(ws, dtype=torch.float64), torch.zeros(bs, dtype=torch.float64)
                else: d[wn], d[bn] = u(ws, bound), u(bs, bound)
            else:
                if bound is None: d[wn], d[bn] = 1 + u(ws, 0.5), u(bs, 0.5)
                else: d[wn], d[bn] = u(ws, bound), u(bs, 0.5)
        out.append(d)
    return out


# ----------------------------------------------------------------------------------------------------------
# Messages and the three released block products
# ----------------------------------------------------------------------------------------------------------
class Log:
    "Point-to-point messages of the simulated ranks: (tag, phase, src, dst, numel)."
    def __init__(self): self.msgs = []

    def send(self, tag, phase, src, dst, t): self.msgs.append((tag, phase, src, dst, t.numel()))

    def sent(self, phase=None, tag_prefix="") -> dict[int, int]:
        "Elements sent per source rank, for messages whose tag starts with `tag_prefix` (and of `phase`)."
        n = defaultdict(int)
        for tag, ph, src, _, k in self.msgs:
            if (phase is None or ph == phase) and tag.startswith(tag_prefix): n[src] += k
        return {r: n[r] for r in range(RANKS)}


def _send(log, tag, phase, src, dst, t):
    if log is not None: log.send(tag, phase, src, dst, t)
    return t


def xw4(A, B, log=None, tag="", phase="fwd"):
    """`distributed_matmul.XW_fourway`: C_ij = sum_k A_ik B_kj (SUMMA). Row partners (r, r^1) swap their A blocks,
    column partners (r, r^2) swap their B blocks; each rank adds its two products in the order the released code does."""
    s = lambda a, b, t: _send(log, tag, phase, a, b, t)
    a01, a10, a23, a32 = s(0, 1, A[0]), s(1, 0, A[1]), s(2, 3, A[2]), s(3, 2, A[3])  # rank r's A block, sent to r^1
    b02, b13, b20, b31 = s(0, 2, B[0]), s(1, 3, B[1]), s(2, 0, B[2]), s(3, 1, B[3])  # rank r's B block, sent to r^2
    return [A[0] @ B[0] + a10 @ b20,  # mod 0: own product, then bufferX @ bufferW
            a01 @ B[1] + A[1] @ b31,  # mod 1: bufferX @ W first, then X @ bufferW
            a32 @ B[2] + A[2] @ b02,  # mod 2: bufferX @ W first, then X @ bufferW
            A[3] @ B[3] + a23 @ b13]  # mod 3: own product, then bufferX @ bufferW


def xwt4(A, B, log=None, tag="", phase="fwd"):
    """`distributed_matmul.XWT_fourway`: C_ij = sum_k A_ik B_jk^T. The off-diagonal ranks 1 and 2 compute the
    partial product their row partner needs (A_r B_r^T) and send it; ranks 0 and 3 send their A block to their
    row partner and their B block to their column partner; ranks 1 and 2 send their B block to each other."""
    s = lambda a, b, t: _send(log, tag, phase, a, b, t)
    a0_1, b0_2 = s(0, 1, A[0]), s(0, 2, B[0])
    b1_2, p1_0 = s(1, 2, B[1]), s(1, 0, A[1] @ B[1].mT)
    b2_1, p2_3 = s(2, 1, B[2]), s(2, 3, A[2] @ B[2].mT)
    a3_2, b3_1 = s(3, 2, A[3]), s(3, 1, B[3])
    return [A[0] @ B[0].mT + p1_0,                  # mod 0: own product + received partial
            A[1] @ b3_1.mT + a0_1 @ b2_1.mT,        # mod 1: X @ bufferW3^T, then bufferX @ bufferW2^T
            A[2] @ b0_2.mT + a3_2 @ b1_2.mT,        # mod 2: X @ bufferW0^T, then bufferX @ bufferW1^T
            A[3] @ B[3].mT + p2_3]                  # mod 3: own product + received partial


def xtw4(A, B, log=None, tag="", phase="fwd"):
    """`distributed_matmul.XTW_fourway`: C_ij = sum_k A_ki^T B_kj. Ranks 1 and 2 send their partial A_r^T B_r to
    their column partner; ranks 0 and 3 send A to the row partner and B to the column partner; ranks 1 and 2
    send their A block to each other."""
    s = lambda a, b, t: _send(log, tag, phase, a, b, t)
    a0_1, b0_2 = s(0, 1, A[0]), s(0, 2, B[0])
    a1_2, p1_3 = s(1, 2, A[1]), s(1, 3, A[1].mT @ B[1])
    a2_1, p2_0 = s(2, 1, A[2]), s(2, 0, A[2].mT @ B[2])
    a3_2, b3_1 = s(3, 2, A[3]), s(3, 1, B[3])
    return [A[0].mT @ B[0] + p2_0,                  # mod 0: own product + received partial
            a0_1.mT @ B[1] + a2_1.mT @ b3_1,        # mod 1: bufferX0^T @ W, then bufferX2^T @ bufferW3
            a3_2.mT @ B[2] + a1_2.mT @ b0_2,        # mod 2: bufferX3^T @ W, then bufferX1^T @ bufferW0
            A[3].mT @ B[3] + p1_3]                  # mod 3: own product + received partial


def transpose4(X, log=None, tag="", phase="fwd"):
    "`distributed_matmul.matrix_transpose`: ranks 1 and 2 swap their blocks, then every rank transposes the last two dims."
    x12, x21 = _send(log, tag, phase, 1, 2, X[1]), _send(log, tag, phase, 2, 1, X[2])
    return [X[0].mT, x21.mT, x12.mT, X[3].mT]


def _sum_to(g, shape):
    "What autograd does with the released backward's batched weight gradients (`grad_weight` of shape (B, ...))."
    while g.dim() > len(shape): g = g.sum(0)
    return g


class _Product(torch.autograd.Function):
    """One released block product over the 4 simulated ranks; backward as the released autograd functions do it:
    `Linear.XW_fourway.backward`:  dA = XWT(dC, B), dB = XTW(A, dC);
    `Linear.XWT_fourway.backward`: dA = XW(dC, B),  dB = XTW(dC, A);
    `Linear.XTW_fourway.backward`: dA = XWT(B, dC), dB = XW(A, dC).
    (Both gradients are always computed and exchanged: the released backward ignores `needs_input_grad`.)"""
    @staticmethod
    def forward(ctx, kind, log, tag, *ts):
        A, B = list(ts[:RANKS]), list(ts[RANKS:])
        ctx.kind, ctx.log, ctx.tag = kind, log, tag
        ctx.save_for_backward(*ts)
        return tuple({"xw": xw4, "xwt": xwt4, "xtw": xtw4}[kind](A, B, log, tag, "fwd"))

    @staticmethod
    def backward(ctx, *g):
        ts = ctx.saved_tensors
        A, B, g = list(ts[:RANKS]), list(ts[RANKS:]), [t.contiguous() for t in g]
        kw = dict(log=ctx.log, tag=ctx.tag, phase="bwd")
        if ctx.kind == "xw": dA, dB = xwt4(g, B, **kw), xtw4(A, g, **kw)
        elif ctx.kind == "xwt": dA, dB = xw4(g, B, **kw), xtw4(g, A, **kw)
        else: dA, dB = xwt4(B, g, **kw), xw4(A, g, **kw)
        return (None, None, None, *[_sum_to(d, a.shape) for d, a in zip(dA, A)], *[_sum_to(d, b.shape) for d, b in zip(dB, B)])


def _product(kind, A, B, log, tag, plain):
    if plain: return {"xw": xw4, "xwt": xwt4, "xtw": xtw4}[kind](A, B, log, tag, "fwd")
    return list(_Product.apply(kind, log, tag, *A, *B))


# ----------------------------------------------------------------------------------------------------------
# The forward pass of `Jigsaw/src/Model.py` `Model.forward`, rank by rank
# ----------------------------------------------------------------------------------------------------------
def _ln(x, p, prefix):
    "`Linear.DistributedLayerNorm.forward`: identity autograd function, then torch LayerNorm over the local features only."
    return F.layer_norm(x, (x.shape[-1],), p[prefix + ".weight"], p[prefix + ".bias"], 1e-5)


def _linear(kind, X, params, prefix, log, plain):
    "`Linear.XW_fourway/XWT_fourway/XTW_fourway.forward`: the block product, then `.add(b)`: each rank adds its own bias to its finished output block."
    W = [params[r][prefix + ".weights"] for r in range(RANKS)]
    C = _product(kind, X, W, log, prefix, plain)
    return [C[r] + params[r][prefix + ".bias"] for r in range(RANKS)]


def _mixer_block(x, params, b, log, plain, training, p_drop):
    "`Linear.MixerBlock.forward` (4-way), on every rank's block x[r] of shape (B, T/2, H/2)."
    n = f"blocks.{b}."
    drop = lambda t: F.dropout(t, p_drop, training)  # the released Dropout(1e-3); masks are drawn per rank
    y = [_ln(x[r], params[r], n + "layer_norm1.layer_norm") for r in range(RANKS)]
    # DistributedXTWMLP.forward: linear1 = XTW: C_ij = sum_k Y_ki^T W1_kj -> (B, H half i, S half j), + bias of rank (i, j)
    y = _linear("xtw", y, params, n + "token_mixing.linear1", log, plain)
    y = [drop(F.gelu(t)) for t in y]
    # linear2 = XW: D_ij = sum_k C_ik W2_kj -> (B, H half i, T half j), + bias of rank (i, j) (T half j)
    y = _linear("xw", y, params, n + "token_mixing.linear2", log, plain)
    y = [drop(t) for t in y]
    # MixerBlock: DistributedTranspose -> matrix_transpose: rank (i, j) receives D_ji and transposes: (B, T half i, H half j)
    y = transpose4(y, log, n + "transpose") if plain else _Transpose.apply(log, n + "transpose", *y)
    x = [x[r] + y[r] for r in range(RANKS)]
    y = [_ln(x[r], params[r], n + "layer_norm2.layer_norm") for r in range(RANKS)]
    # DistributedMLP.forward: linear1 = XWT: C_ij = sum_k Y_ik W1_jk^T -> (B, T half i, G half j), + bias of rank (i, j)
    y = _linear("xwt", y, params, n + "channel_mixing.linear1", log, plain)
    y = [drop(F.gelu(t)) for t in y]
    # linear2 = XWT: D_ij = sum_k C_ik W2_jk^T -> (B, T half i, H half j), + bias of rank (i, j)
    y = _linear("xwt", y, params, n + "channel_mixing.linear2", log, plain)
    return [x[r] + drop(y[r]) for r in range(RANKS)]


class _Transpose(torch.autograd.Function):
    "`Linear.DistributedXT`: forward and backward are both `matrix_transpose` (ranks 1 and 2 swap, then .mT)."
    @staticmethod
    def forward(ctx, log, tag, *X):
        ctx.log, ctx.tag = log, tag
        return tuple(t.contiguous() for t in transpose4(list(X), log, tag, "fwd"))

    @staticmethod
    def backward(ctx, *g):
        return (None, None, *transpose4(list(g), ctx.log, ctx.tag, "bwd"))


def rank_input(cfg: MixerConfig, x_full, r: int):
    """Rank r's input as the released data loader gives it: (B, n_lat, n_lon/2, 36), channels last, its longitude half
    r // 2 and its channel half r % 2 (`Model.forward` comment "x res for each GPU"; `equivalent_fourway.py` buffers)."""
    i, j = coords(r)
    C2, lonh = cfg.n_in // 2, cfg.n_lon // 2
    return x_full[:, j * C2:(j + 1) * C2, :, i * lonh:(i + 1) * lonh].permute(0, 2, 3, 1)


def released_forward(cfg: MixerConfig, params: list[dict], x_full, k: int = 1, log: Log | None = None,
                     plain: bool = False, training: bool = False, p_drop: float = 1e-3):
    """`Jigsaw/src/Model.py` `Model.forward(x, rollout_=k)` on the four simulated ranks.

    x_full: (B, n_in, n_lat, n_lon) in jigsaw_ref's layout. Returns (B, n_out, n_lat, n_lon): rank r's output block
    (B, n_lat * n_lon/2, 36) reshaped to its pixels and channel half. `training=False` (the default) disables dropout."""
    z = released_sizes(cfg)
    B, lat, lonh, nlp2, P, C2 = x_full.shape[0], z["lat"], z["lonh"], z["nlp2"], z["P"], z["C2"]
    xs = [rank_input(cfg, x_full, r) for r in range(RANKS)]
    x_res = [x.reshape(B, lat * lonh, C2) for x in xs]  # Model.forward: x_res = x.reshape(B, lat * lon/2, 36)
    # Distributed1DPatchEmbedding.forward: (B, lat, lon/2, 36) -> (B, lat, lon/2 / P, P, 36) -> (B, T/2, P * 36):
    # tokens latitude-major (lat * n_lon_patches/2 + lon patch), features pixel-major (p * 36 + c)
    patches = [x.reshape(B, lat, nlp2, P, C2).flatten(1, 2).flatten(2, 3) for x in xs]
    h = _linear("xwt", patches, params, "embedding.patch_embed", log, plain)  # (B, T half i, H half j), + bias (i, j)
    enc = h  # Model.forward: x_res2 = x
    for _ in range(k):
        for b in range(cfg.blocks): h = _mixer_block(h, params, b, log, plain, training, p_drop)
    # concat=True: LN of the processor output, concatenated with the encoder output (B, T/2, H/2 + H/2)
    u = [torch.cat([_ln(h[r], params[r], "layer_norm.layer_norm"), enc[r]], dim=2) for r in range(RANKS)]
    # Distributed1DPatchRecovery.forward: XWT with weights (P * 36, H) -> (B, T half i, P * 36 of channel half j) + bias
    y = _linear("xwt", u, params, "recovery.conv", log, plain)
    y = [t.reshape(B, lat, nlp2, P, C2).reshape(B, lat * lonh, C2) for t in y]  # .view(B, lat, lon/2, 36); Model: reshape(B, -1, 36)
    # linear_residual: LN(36) of the prediction, concat the rank's raw input block, LN(72), then XWT with weights (36, 72)
    y = [torch.cat([_ln(y[r], params[r], "layer_norm2.layer_norm"), x_res[r]], dim=2) for r in range(RANKS)]
    y = [_ln(y[r], params[r], "layer_norm3.layer_norm") for r in range(RANKS)]
    out = _linear("xwt", y, params, "linearlayer", log, plain)  # (B, lat * lon/2 of half i, 36 of half j)
    blocks = [o.reshape(B, lat, lonh, C2).permute(0, 3, 1, 2) for o in out]
    return torch.cat([torch.cat([blocks[rank_of(i, 0)], blocks[rank_of(i, 1)]], dim=1) for i in range(2)], dim=3)


# ----------------------------------------------------------------------------------------------------------
# Released per-rank parameters -> jigsaw_ref faithful 2x2 per-rank parameters
# ----------------------------------------------------------------------------------------------------------
def token_perm(cfg: MixerConfig) -> torch.Tensor:
    """perm[t] = released local token index of jigsaw_ref local token t (same longitude half).

    jigsaw_ref (`mixer.patchify`) orders tokens longitude-patch-major (lp * n_lat + lat); the released embedding
    latitude-major (lat * n_lon_patches/2 + lp)."""
    z = released_sizes(cfg)
    lp, la = torch.meshgrid(torch.arange(z["nlp2"]), torch.arange(z["lat"]), indexing="ij")
    return (la * z["nlp2"] + lp).reshape(-1)


def mapping(cfg: MixerConfig) -> list[tuple[str, str, str, str]]:
    """(jigsaw name, released name, source rank of jigsaw rank (i, j): 'ij' same rank or 'ji' transposed rank, transform)."""
    m = [("enc.w", "embedding.patch_embed.weights", "ji", "(H/2, P*C/2) -> view (H/2, P, C/2) -> permute(2, 1, 0)"),
         ("enc.b", "embedding.patch_embed.bias", "ij", "as is")]
    for b in range(cfg.blocks):
        n, r = f"blocks.{b}.", f"blocks.{b}."
        m += [(n + "ln1.w", r + "layer_norm1.layer_norm.weight", "ij", "as is"),
              (n + "ln1.b", r + "layer_norm1.layer_norm.bias", "ij", "as is"),
              (n + "tok1.w", r + "token_mixing.linear1.weights", "ij", "(T/2, S/2): rows permuted by token_perm, transposed"),
              (n + "tok1.b", r + "token_mixing.linear1.bias", "ij", "as is (placement differs: see notes)"),
              (n + "tok2.w", r + "token_mixing.linear2.weights", "ji", "(S/2, T/2): columns permuted by token_perm, transposed"),
              (n + "tok2.b", r + "token_mixing.linear2.bias", "ji", "permuted by token_perm"),
              (n + "ln2.w", r + "layer_norm2.layer_norm.weight", "ij", "as is"),
              (n + "ln2.b", r + "layer_norm2.layer_norm.bias", "ij", "as is"),
              (n + "ch1.w", r + "channel_mixing.linear1.weights", "ij", "(G/2, H/2) transposed"),
              (n + "ch1.b", r + "channel_mixing.linear1.bias", "ji", "as is (placement differs: see notes)"),
              (n + "ch2.w", r + "channel_mixing.linear2.weights", "ji", "(H/2, G/2) transposed"),
              (n + "ch2.b", r + "channel_mixing.linear2.bias", "ij", "as is")]
    m += [("dec.ln.w", "layer_norm.layer_norm.weight", "ij", "as is"), ("dec.ln.b", "layer_norm.layer_norm.bias", "ij", "as is"),
          ("dec.w", "recovery.conv.weights", "ij", "(P*C/2, H) -> view (P, C/2, H) -> permute(2, 1, 0)"),
          ("dec.b", "recovery.conv.bias", "ij", "(P*C/2,) -> view (P, C/2) -> transpose"),
          ("res.ln1.w", "layer_norm2.layer_norm.weight", "ij", "as is"), ("res.ln1.b", "layer_norm2.layer_norm.bias", "ij", "as is"),
          ("res.ln2.w", "layer_norm3.layer_norm.weight", "ij", "as is"), ("res.ln2.b", "layer_norm3.layer_norm.bias", "ij", "as is"),
          ("res.w", "linearlayer.weights", "ij", "(C/2, C) transposed"), ("res.b", "linearlayer.bias", "ij", "as is")]
    return m


def to_jigsaw_faithful(cfg: MixerConfig, params: list[dict]) -> list[dict]:
    "Per-rank jigsaw_ref faithful 2x2 tensors (rank r = i * 2 + j), jigsaw name -> tensor, from the released per-rank dicts."
    z, perm = released_sizes(cfg), token_perm(cfg)
    H2, C2, P = z["H2"], z["C2"], z["P"]

    def conv(jname, t):
        if jname == "enc.w": return t.reshape(H2, P, C2).permute(2, 1, 0)
        if jname.endswith("tok1.w"): return t[perm].T
        if jname.endswith("tok2.w"): return t[:, perm].T
        if jname.endswith("tok2.b"): return t[perm]
        if jname.endswith(("ch1.w", "ch2.w")) or jname == "res.w": return t.T
        if jname == "dec.w": return t.reshape(P, C2, cfg.hidden).permute(2, 1, 0)
        if jname == "dec.b": return t.reshape(P, C2).T
        return t

    out = []
    for r in range(RANKS):
        i, j = coords(r)
        out.append({jn: conv(jn, params[rank_of(i, j) if src == "ij" else rank_of(j, i)][rn]).contiguous()
                    for jn, rn, src, _ in mapping(cfg)})
    return out


# ----------------------------------------------------------------------------------------------------------
# Analytic exchange counts of one mixer block (batch 1), in elements (times the item size for bytes)
# ----------------------------------------------------------------------------------------------------------
def block_send_formula(T: int, H: int, S: int, G: int, batch: int = 1) -> dict[str, dict[int, float]]:
    """Elements each rank sends in one released 4-way mixer block (global T, H, S = f_s T, G = f_c H); bytes = x 4 (fp32).

    Weight blocks are sent once; activation blocks and partial products (including the batched partial weight
    gradients of the released backward) scale with the batch B:
    forward  ranks 0, 3: (2TS + 2GH)/4 + B (2TH + HS + TG)/4
             ranks 1, 2: (TS + 2GH)/4  + B (3TH + 2HS + TG)/4
    backward ranks 0, 3: (2TS + 2GH)/4 + B (6TH + 3HS + 3TG)/4
             ranks 1, 2: (TS + 2GH)/4  + B (5TH + TS + 4HS + 2TG + 2GH)/4"""
    B = batch
    f03 = (2 * T * S + 2 * G * H) / 4 + B * (2 * T * H + H * S + T * G) / 4
    f12 = (T * S + 2 * G * H) / 4 + B * (3 * T * H + 2 * H * S + T * G) / 4
    b03 = (2 * T * S + 2 * G * H) / 4 + B * (6 * T * H + 3 * H * S + 3 * T * G) / 4
    b12 = (T * S + 2 * G * H) / 4 + B * (5 * T * H + T * S + 4 * H * S + 2 * T * G + 2 * G * H) / 4
    return {"fwd": {0: f03, 1: f12, 2: f12, 3: f03}, "bwd": {0: b03, 1: b12, 2: b12, 3: b03}}
