# %%
#| default_exp pmatmul

# %%
#| export
from __future__ import annotations
from dataclasses import dataclass, field
from typing import Callable, NamedTuple
import functools, math
import torch
import torch.nn.functional as F
from fastcore.basics import patch
from jigsaw_ref.comm import Group, all_gather, all_reduce, expected_bytes, reduce_scatter
from jigsaw_ref.config import shard_range, split_sizes
from jigsaw_ref.probe import saved_bytes  # re-exported for callers that import it from here (bench); new code: jigsaw_ref.probe

# %%
#| hide
import inspect, re
import jigsaw_ref.pmatmul as _pm  # the exported module: its source for the tag check
from fastcore.test import test_eq, test_close, test_fail
from jigsaw_ref.comm import make_groups
from jigsaw_ref.grid import Grid
from jigsaw_ref.probe import message_table, plot_messages, traced
from jigsaw_ref.ranks import run_ranks


# %% [markdown]
# # Partitioned linear algebra
#
# > Token mixing, channel mixing and LayerNorm on a p × q grid of ranks: the serial MLP, the 2-way sums, the general form, the 2x2 exchanges traced, the backward, then the overlapped and faithful variants, all run here on thread ranks.

# %% [markdown]
# ## The layout
#
# Rank $(i, j)$ of a model group holds the activation block $X_{ij} = X[\mathcal T_i, \mathcal H_j]$: token
# block $i$ (a band of longitudes, $p$ of them) and channel block $j$ ($q$ of them). Blocks are cut with
# `split_sizes`, so sizes need not divide. Every large weight is cut into $p \times q$ blocks and each rank
# keeps exactly one: nothing large is replicated.
#
# The key observation: for **channel mixing** the token index is a batch index, and for **token mixing**
# the channel index is. So each MLP is a one-dimensional tensor-parallel MLP over one axis of the grid,
# with its batch axis gathered over the other axis.
#
# A `Layout` is that arrangement as one rank sees it: its two groups, the $q$ ranks that share its tokens
# (`tensor`, a row of the grid, where it is rank $j$) and the $p$ ranks that share its channels (`domain`, a
# column, where it is rank $i$), and the block sizes of every extent the MLPs cut: tokens $T$ and hidden
# channels $G$ over the domain axis, channels $H$ and hidden tokens $S$ over the tensor axis. The parallel model
# builds it once; every MLP of this module takes it.

# %%
#| export
def _off(sizes, k): return sum(sizes[:k])  # where block k of `sizes` starts


# %%
#| export
@dataclass(frozen=True)
class Layout:
    "The groups and block sizes of one model group as rank (i, j) sees them: what every MLP of this module takes."
    tensor: Group  # the q ranks that share my tokens (a row of the grid); I am its rank j
    domain: Group  # the p ranks that share my channels (a column); I am its rank i
    t_sizes: tuple[int, ...]  # tokens T, one block per domain rank
    h_sizes: tuple[int, ...]  # channels H, one block per tensor rank
    s_sizes: tuple[int, ...]  # hidden tokens S of the token MLP, one block per tensor rank
    g_sizes: tuple[int, ...]  # hidden channels G of the channel MLP, one block per domain rank
    p: int = field(init=False)  # the rest is derived: p token blocks (domain ranks), q channel blocks (tensor ranks),
    q: int = field(init=False)
    i: int = field(init=False)  # my token block and my channel block
    j: int = field(init=False)
    full: tuple[int, int] = field(init=False)  # (T, H): the whole activation
    starts: tuple[int, int] = field(init=False)  # where my block X[T_i, H_j] starts in it

    def __post_init__(self):
        for f, g in (("t_sizes", self.domain), ("h_sizes", self.tensor), ("s_sizes", self.tensor), ("g_sizes", self.domain)):
            sizes = tuple(int(n) for n in getattr(self, f))
            if len(sizes) != g.size: raise ValueError(f"Layout: {f}={sizes} is not one block per rank of a group of {g.size}")
            object.__setattr__(self, f, sizes)
        p, q, i, j = self.domain.size, self.tensor.size, self.domain.rank, self.tensor.rank
        derived = dict(p=p, q=q, i=i, j=j, full=(sum(self.t_sizes), sum(self.h_sizes)),
                       starts=(_off(self.t_sizes, i), _off(self.h_sizes, j)))
        for k, v in derived.items(): object.__setattr__(self, k, v)

    @classmethod
    def split(cls, tensor: Group, domain: Group, T: int, H: int, S: int, G: int) -> Layout:
        "Every extent cut as evenly as it goes (`split_sizes`): T and G over the domain ranks, H and S over the tensor ranks."
        p, q = domain.size, tensor.size
        return cls(tensor, domain, split_sizes(T, p), split_sizes(H, q), split_sizes(S, q), split_sizes(G, p))


# %% [markdown]
# On one process every group has one rank; on a 2x3 grid rank (1, 2) holds the second token block and the third
# channel block (faked groups of the right size and rank here; thread ranks below):

# %%
_G2 = lambda size, rank: type("G", (), {"size": size, "rank": rank})()
_lay = Layout.split(_G2(3, 2), _G2(2, 1), T=10, H=7, S=5, G=9)
test_eq((_lay.p, _lay.q, _lay.i, _lay.j, _lay.t_sizes, _lay.h_sizes, _lay.s_sizes, _lay.g_sizes),
        (2, 3, 1, 2, (5, 5), (3, 2, 2), (2, 2, 1), (5, 4)))
test_eq((_lay.starts, _lay.full, sum(_lay.s_sizes), sum(_lay.g_sizes)), ((5, 5), (10, 7), 5, 9))
test_fail(lambda: Layout(_G2(2, 0), _G2(1, 0), [10], [7], [5], [9]), contains="one block per rank")


# %% [markdown]
# ## The serial MLP
#
# One sample is $X \in \mathbb R^{T\times H}$. The token MLP mixes along tokens,
#
# $$Y = W_2\,\sigma(W_1 X + b_1) + b_2, \qquad W_1 \in \mathbb R^{S\times T},\; W_2 \in \mathbb R^{T\times S},$$
#
# a **left** product ($\texttt{'st,bth->bsh'}$) in which every channel column is an independent sample; the
# channel MLP $Y = \sigma(X W_a + b_a) W_b + b_b$ is the **right** product ($\texttt{'bth,hg->btg'}$) in which every
# token row is. A `Product` names the forward and the two gradients of each, and the dimension along which the
# product can be cut into independent blocks (channels for a left product, tokens for a right one), which is
# the dimension every exchange below cuts.

# %%
#| export
class Product(NamedTuple):
    "A product `fwd(w, a)` separable along `dim` of `a` and of the result, with its two gradients."
    fwd: Callable  # (w, a) -> y
    da: Callable  # (w, dy) -> da
    dw: Callable  # (dy, a) -> dw
    dim: int  # the free dimension of `a` that the result keeps: the one that can be cut and exchanged
    bias_dim: int  # the dimension of the result that the bias runs along


LEFT = Product(lambda w, a: torch.einsum("st,bth->bsh", w, a), lambda w, g: torch.einsum("st,bsh->bth", w, g),
               lambda g, a: torch.einsum("bsh,bth->st", g, a), dim=2, bias_dim=1)  # token mixing W A
RIGHT = Product(lambda w, a: a @ w, lambda w, g: g @ w.mT,
                lambda g, a: torch.einsum("bth,btg->hg", a, g), dim=1, bias_dim=2)  # channel mixing A W

# %% [markdown]
# The gradients are the usual ones, and a block of the result needs only the same block of `a`:

# %%
_w, _a = torch.randn(5, 6, dtype=torch.float64, requires_grad=True), torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)
_g = torch.randn(2, 5, 4, dtype=torch.float64)
(LEFT.fwd(_w, _a) * _g).sum().backward()
test_close(LEFT.da(_w, _g), _a.grad); test_close(LEFT.dw(_g, _a), _w.grad)
test_close(LEFT.fwd(_w, _a[..., 1:3]), LEFT.fwd(_w, _a)[..., 1:3])
_w2 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
(RIGHT.fwd(_w2, _a.detach()[:, :5]) * torch.ones(2, 5, 3)).sum().backward()
test_close(RIGHT.dw(torch.ones(2, 5, 3, dtype=torch.float64), _a.detach()[:, :5]), _w2.grad)


# %% [markdown]
# ## Biases on partial sums
#
# A bias added right after a sum over a group need not be stored by every member: each rank adds **its
# shard** of the bias to its partial product (zeros elsewhere) *before* the reduction, and the sum then
# carries every bias element exactly once. The backward of the reduction hands every rank the full
# upstream gradient, so each shard's gradient comes out complete: sharded biases need no gradient
# synchronisation, which is how the biases of all four MLP linears are stored below.

# %%
#| export
def bias_full(b, n: int, group: Group):
    "This rank's bias shard `b` placed in a length-`n` vector of zeros, at shard `group.rank` of `group.size`."
    a, e = shard_range(n, group.size, group.rank)
    return torch.cat([b.new_zeros(a), b, b.new_zeros(n - e)])


# %%
#| export
def add_bias_shard(
    y,  # a Partial tensor, about to be summed over `group`
    b,  # this rank's shard of the bias along `dim` (shard `group.rank` of `group.size`, as `shard_range` cuts)
    dim: int, group: Group,
):
    "`y` plus this rank's bias shard at its place along `dim`: after the sum over `group`, plus the whole bias."
    shape = [1] * y.dim(); shape[dim] = y.shape[dim]
    return y + bias_full(b, y.shape[dim], group).view(shape)


# %%
_p = [torch.randn(2, 5, 3) for _ in range(3)]  # three ranks' partial products
_b = torch.randn(5)
_sum = sum(add_bias_shard(_p[r], _b[slice(*shard_range(5, 3, r))], 1, type("G", (), {"size": 3, "rank": r})()) for r in range(3))
test_close(_sum, sum(_p) + _b[:, None])

# %% [markdown]
# ## The harness: thread ranks
#
# Every check in this notebook runs the exported functions on **thread ranks** (`ranks.run_ranks`): each rank is a
# thread with its own `comm.Group`s, exchanging real messages through the same code that runs over MPI, and the
# results are compared in float64 with the one-process MLP. `on_grid(p, q, fn)` runs `fn(layout)` on the $pq$
# thread ranks of a $p \times q$ model group, with the uneven sizes below, and returns the results in rank order
# $r = iq + j$; `cut` takes rank $(i,j)$'s block of a full tensor, `close` compares to a relative tolerance, and
# `serial_token_mlp` is the one-process MLP.

# %%
_B, _T, _H, _S, _G = 2, 10, 7, 5, 9  # uneven everywhere: batch 2, T = 10 tokens, H = 7 channels, S = 5 and G = 9 hidden


def on_grid(p, q, fn, *args, sizes=(_T, _H, _S, _G)):
    def rank(comm):
        g = make_groups(Grid(1, p, q), comm=comm)
        return fn(Layout.split(g["tensor"], g["domain"], *sizes), *args)
    return run_ranks(p * q, rank)


def cut(t, *dims_parts_index):
    "The block of `t`: for each (dim, parts, index), shard `index` of `parts` along `dim`."
    for d, n, k in dims_parts_index:
        a, e = shard_range(t.shape[d], n, k); t = t.narrow(d, a, e - a)
    return t.detach().clone().requires_grad_(True)


def close(a, b, eps=1e-12):
    "`a` equals `b` to a relative `eps` (of the largest element of `b`)."
    test_close(a, b, eps=eps * max(1.0, float(b.detach().abs().max())))


def serial_token_mlp(x, w1, b1, w2, b2): return LEFT.fwd(w2, F.gelu(LEFT.fwd(w1, x) + b1[:, None])) + b2[:, None]


# %%
_gen = torch.Generator().manual_seed(0)
_r = lambda *s: torch.randn(*s, generator=_gen, dtype=torch.float64)
_X, _W1, _b1, _W2, _b2 = _r(_B, _T, _H), _r(_S, _T), _r(_S), _r(_T, _S), _r(_T)
_dY = _r(_B, _T, _H)  # the upstream gradient
_full = [t.clone().requires_grad_(True) for t in (_X, _W1, _b1, _W2, _b2)]
_Y = serial_token_mlp(*_full); (_Y * _dY).sum().backward()


# %% [markdown]
# ## The 2-way case: two terms
#
# The paper's 2-way layout is $p = 1$, $q = 2$: each rank of the pair holds every token and half the channels,
# $X = [\,X_0 \mid X_1\,]$ with $X_j = X[:, \mathcal H_j]$, the row half $W_1[\mathcal S_j, :]$ and the column half
# $W_2[:, \mathcal S_j]$. Written as block matrices,
#
# $$W_1 X = \begin{bmatrix} W_1[\mathcal S_0, :] \\ W_1[\mathcal S_1, :] \end{bmatrix} \begin{bmatrix} X_0 & X_1 \end{bmatrix},
# \qquad
# Y = W_2\, A = W_2[:, \mathcal S_0]\, A_0 + W_2[:, \mathcal S_1]\, A_1 .$$
#
# 1. **Swap the halves** (all-gather over the pair): rank $j$ sends $X_j$ and receives $X_{1-j}$; it now has
#    all of $X$ and computes its hidden rows $A_j = \sigma(W_1[\mathcal S_j,:]\,X + b_1[\mathcal S_j])$ completely:
#    the sum over tokens runs inside one rank, since no rank splits the tokens.
# 2. **Two terms, one per rank.** $Y$ is the sum of the two terms $P_j = W_2[:, \mathcal S_j] A_j$, each a full
#    $T \times H$ matrix computed by rank $j$. Rank $j$ owns the channels $\mathcal H_j$ of the result:
#
#    $$Y[:, \mathcal H_0] = P_0[:, \mathcal H_0] + P_1[:, \mathcal H_0], \qquad Y[:, \mathcal H_1] = P_0[:, \mathcal H_1] + P_1[:, \mathcal H_1],$$
#
#    so rank $j$ **sends its partner the half it owns**, $P_j[:, \mathcal H_{1-j}]$, receives $P_{1-j}[:, \mathcal H_j]$
#    and adds (a reduce-scatter in two messages). The output bias $b_2$ is added once: each rank adds its half of
#    it (`add_bias_shard`) to its term before the exchange.
#
# The channel MLP is the mirror image: $X W_a = X_0\, W_a[\mathcal H_0, :] + X_1\, W_a[\mathcal H_1, :]$, two terms
# whose sum every rank needs (the pair swaps them: an all-reduce), then rank $j$ multiplies by its column half
# $W_b[:, \mathcal H_j]$ and is done.
#
# The two messages, written out with the pair's `start` and `wait` (forward only), on two thread ranks:

# %%
def two_way_token_mlp(x, w1, b1, w2, b2, lay):
    "The token MLP on a pair (p = 1, q = 2) as its two messages: X_j (B, T, H_j), W1[S_j, :], b1[S_j], W2[:, S_j], b2's half j."
    pair, j, k = lay.tensor, lay.j, 1 - lay.j
    theirs = x.new_empty(x.shape[0], x.shape[1], lay.h_sizes[k])
    pair.wait(pair.start(sends=[(x, k)], recvs=[(theirs, k)]))  # 1. swap the halves
    X = torch.cat([x, theirs] if j == 0 else [theirs, x], dim=2)  # all of X, (B, T, H)
    A_j = F.gelu(LEFT.fwd(w1, X) + b1[:, None])  # my hidden rows, complete
    P_j = add_bias_shard(LEFT.fwd(w2, A_j), b2, 1, pair).split(lay.h_sizes, dim=2)  # 2. my term, cut at the halves
    got = P_j[j].new_empty(P_j[j].shape)  # (a new tensor: `empty_like` of a view may keep its strides)
    pair.wait(pair.start(sends=[(P_j[k].contiguous(), k)], recvs=[(got, k)]))  # the half my partner owns, for its half of mine
    return P_j[j] + got


def _two_way(lay):
    j = lay.j
    return two_way_token_mlp(cut(_X, (2, 2, j)), cut(_W1, (0, 2, j)), cut(_b1, (0, 2, j)), cut(_W2, (1, 2, j)),
                             cut(_b2, (0, 2, j)), lay).detach()

for _j, _y in enumerate(on_grid(1, 2, _two_way)): close(_y, cut(_Y, (2, 2, _j)))


# %% [markdown]
# ## Token mixing on a $p \times q$ grid: the equation line by line
#
# Nothing in the 2-way sums needed $p = 1$ or $q = 2$. On any grid, with $W_1$ cut into blocks
# $W_1[\mathcal S_j, \mathcal T_i]$ (hidden tokens over the $q$ axis, input tokens over the $p$ axis) and
# $W_2[\mathcal T_i, \mathcal S_j]$:
#
# $$A[\mathcal S_j, :] = \sigma\Big(\sum_{i'} W_1[\mathcal S_j, \mathcal T_{i'}]\; X[\mathcal T_{i'}, :] + b_1[\mathcal S_j]\Big),
# \qquad
# Y[\mathcal T_i, \mathcal H_j] = \Big[\sum_{j'} W_2[\mathcal T_i, \mathcal S_{j'}]\, A[\mathcal S_{j'}, :]\Big]_{:, \mathcal H_j} + b_2[\mathcal T_i].$$
#
# Rank $(i,j)$ all-gathers $X[\mathcal T_i, :]$ from its tensor partners (all channels of its tokens: step 1 of the
# 2-way case, now for its own token block), forms the partial product $W_1[\mathcal S_j,\mathcal T_i] X[\mathcal T_i,:]$
# and sums it over its domain partners (all-reduce over $i$: with $p > 1$ the tokens are split, so the sum over
# tokens needs the column); then its term $W_2[\mathcal T_i, \mathcal S_j] A[\mathcal S_j, :]$ is summed over the tensor
# partners and cut along channels (reduce-scatter over $j$: step 2). Each line below is one factor of the
# equation. `drop(t, which, starts, full)` applies the model's dropout to a block at `starts` of a full tensor
# of extents `full` (identity when not given).

# %%
#| export
def _nodrop(t, which, starts, full): return t


# %%
#| export
def token_mlp(
    x,  # (B, T_i, H_j): this rank's activation block
    w1, b1,  # W1[S_j, T_i] (S_j, T_i); b1: shard i (of p) of b1[S_j]
    w2, b2,  # W2[T_i, S_j] (T_i, S_j); b2: shard j (of q) of b2[T_i]
    lay: Layout,  # my groups and the block sizes
    drop=_nodrop,  # drop(t, which, starts, full): the model's dropout of a block
):
    "Token-mixing MLP on a p x q grid, the plain path: (B, T_i, H_j) -> (B, T_i, H_j)."
    tensor, domain, (T, H), S = lay.tensor, lay.domain, lay.full, sum(lay.s_sizes)
    xg = all_gather(x, tensor, 2, lay.h_sizes)  # X[T_i, :]  (B, T_i, H)
    a = all_reduce(add_bias_shard(LEFT.fwd(w1, xg), b1, 1, domain), domain)  # sum_i W1[S_j,T_i] X[T_i,:] + b1  (B, S_j, H)
    a = drop(F.gelu(a), 0, (_off(lay.s_sizes, lay.j), 0), (S, H))
    y = reduce_scatter(add_bias_shard(LEFT.fwd(w2, a), b2, 1, tensor), tensor, 2, lay.h_sizes)  # sum_j W2[T_i,S_j] A[S_j,H_j] + b2
    return drop(y, 1, lay.starts, lay.full)  # (B, T_i, H_j)


# %% [markdown]
# On the pair it is the two-message version above; then on 2x2, 3x2 and 2x3 grids with the uneven sizes (for
# 2x2: tokens 5 + 5, channels 4 + 3, hidden tokens 3 + 2), the forward, the input gradient, both weights and both
# biases:

# %%
def _run_token(lay, fn=token_mlp):
    p, q, i, j = lay.p, lay.q, lay.i, lay.j
    x = cut(_X, (1, p, i), (2, q, j))
    w1, b1 = cut(_W1, (0, q, j), (1, p, i)), cut(_b1, (0, q, j), (0, p, i))  # bias shards: see above
    w2, b2 = cut(_W2, (0, p, i), (1, q, j)), cut(_b2, (0, p, i), (0, q, j))
    y = fn(x, w1, b1, w2, b2, lay)
    (y * cut(_dY, (1, p, i), (2, q, j))).sum().backward()
    return y.detach(), x.grad, w1.grad, b1.grad, w2.grad, b2.grad


def _check_token(p, q, fn=token_mlp):
    for r, (y, dx, dw1, db1, dw2, db2) in enumerate(on_grid(p, q, _run_token, fn)):
        i, j = divmod(r, q)
        test_close(y, _Y.detach()[:, slice(*shard_range(_T, p, i)), slice(*shard_range(_H, q, j))], eps=1e-12)
        test_close(dx, cut(_full[0].grad, (1, p, i), (2, q, j)), eps=1e-12)
        test_close(dw1, cut(_full[1].grad, (0, q, j), (1, p, i)), eps=1e-12)
        test_close(dw2, cut(_full[3].grad, (0, p, i), (1, q, j)), eps=1e-12)
        test_close(db1, cut(_full[2].grad, (0, q, j), (0, p, i)), eps=1e-12)
        test_close(db2, cut(_full[4].grad, (0, p, i), (0, q, j)), eps=1e-12)

for _y, _z in zip(on_grid(1, 2, _two_way), on_grid(1, 2, _run_token)): close(_z[0], _y)
for _pq in ((1, 2), (2, 2), (3, 2), (2, 3)): _check_token(*_pq)


# %% [markdown]
# ## Channel mixing: $Y = \sigma(X W_a + b_a) W_b + b_b$
#
# The mirror image: $W_a[\mathcal H_j, \mathcal G_i]$ and $W_b[\mathcal G_i, \mathcal H_j]$, with the hidden channels
# over the $p$ axis. Rank $(i,j)$ all-gathers its channel block over all tokens from its domain partners,
#
# $$A[:, \mathcal G_i] = \sigma\Big(\sum_{j'} X[:, \mathcal H_{j'}]\, W_a[\mathcal H_{j'}, \mathcal G_i] + b_a[\mathcal G_i]\Big) \quad\text{(all-reduce over } j'),$$
#
# $$Y[\mathcal T_i, \mathcal H_j] = \Big[\sum_{i'} A[:, \mathcal G_{i'}]\, W_b[\mathcal G_{i'}, \mathcal H_j]\Big]_{\mathcal T_i, :} + b_b[\mathcal H_j] \quad\text{(reduce-scatter over } i' \text{ along tokens)}.$$

# %%
#| export
def channel_mlp(
    x,  # (B, T_i, H_j)
    wa, ba,  # Wa[H_j, G_i] (H_j, G_i); ba: shard j (of q) of ba[G_i]
    wb, bb,  # Wb[G_i, H_j] (G_i, H_j); bb: shard i (of p) of bb[H_j]
    lay: Layout,  # my groups and the block sizes
    drop=_nodrop,  # drop(t, which, starts, full): the model's dropout of a block
):
    "Channel-mixing MLP on a p x q grid, the plain path: (B, T_i, H_j) -> (B, T_i, H_j)."
    tensor, domain, T, G = lay.tensor, lay.domain, lay.full[0], sum(lay.g_sizes)
    xg = all_gather(x, domain, 1, lay.t_sizes)  # X[:, H_j]  (B, T, H_j)
    a = all_reduce(add_bias_shard(RIGHT.fwd(wa, xg), ba, 2, tensor), tensor)  # sum_j X[:,H_j] Wa[H_j,G_i] + ba  (B, T, G_i)
    a = drop(F.gelu(a), 2, (0, _off(lay.g_sizes, lay.i)), (T, G))
    y = reduce_scatter(add_bias_shard(RIGHT.fwd(wb, a), bb, 2, domain), domain, 1, lay.t_sizes)  # sum_i A[T_i,G_i] Wb[G_i,H_j] + bb
    return drop(y, 3, lay.starts, lay.full)  # (B, T_i, H_j)


# %% [markdown]
# Checked like the token MLP, on 1x2, 2x1, 2x2 and 3x2 thread grids (hidden channels $G = 9$: 5 + 4 over $p = 2$):

# %%
_Wa, _ba, _Wb, _bb = _r(_H, _G), _r(_G), _r(_G, _H), _r(_H)
_cfull = [t.clone().requires_grad_(True) for t in (_X, _Wa, _ba, _Wb, _bb)]
_Yc = RIGHT.fwd(_cfull[3], F.gelu(RIGHT.fwd(_cfull[1], _cfull[0]) + _cfull[2])) + _cfull[4]
(_Yc * _dY).sum().backward()


def _run_channel(lay, fn=channel_mlp):
    p, q, i, j = lay.p, lay.q, lay.i, lay.j
    x = cut(_X, (1, p, i), (2, q, j))
    wa, ba = cut(_Wa, (0, q, j), (1, p, i)), cut(_ba, (0, p, i), (0, q, j))
    wb, bb = cut(_Wb, (0, p, i), (1, q, j)), cut(_bb, (0, q, j), (0, p, i))
    y = fn(x, wa, ba, wb, bb, lay)
    (y * cut(_dY, (1, p, i), (2, q, j))).sum().backward()
    return y.detach(), x.grad, wa.grad, ba.grad, wb.grad, bb.grad


def _check_channel(p, q, fn=channel_mlp):
    for r, (y, dx, dwa, dba, dwb, dbb) in enumerate(on_grid(p, q, _run_channel, fn)):
        i, j = divmod(r, q)
        test_close(y, _Yc.detach()[:, slice(*shard_range(_T, p, i)), slice(*shard_range(_H, q, j))], eps=1e-12)
        test_close(dx, cut(_cfull[0].grad, (1, p, i), (2, q, j)), eps=1e-12)
        test_close(dwa, cut(_cfull[1].grad, (0, q, j), (1, p, i)), eps=1e-12)
        test_close(dwb, cut(_cfull[3].grad, (0, p, i), (1, q, j)), eps=1e-12)
        test_close(dba, cut(_cfull[2].grad, (0, p, i), (0, q, j)), eps=1e-12)
        test_close(dbb, cut(_cfull[4].grad, (0, q, j), (0, p, i)), eps=1e-12)

for _pq in ((1, 2), (2, 1), (2, 2), (3, 2)): _check_channel(*_pq)

# %% [markdown]
# So each MLP, on any grid, is
#
# $$\text{gather the batch axis} \;\to\; \text{partial product} \;\to\; \textstyle\sum \text{over the contracted axis} \;\to\; \sigma \;\to\; \text{partial product} \;\to\; \text{reduce-scatter back},$$
#
# with the token MLP gathering over the tensor axis and summing over the domain axis, the channel MLP the other
# way round. Every GEMM is cut $pq$ ways with no redundant FLOP.

# %% [markdown]
# ## The 2x2 case, traced
#
# The paper's 4-way layout is $p = q = 2$: rank $r$ holds token half $r \div 2$ and channel half $r \bmod 2$.
# Here are its messages as the code sends them: both MLPs run on four thread ranks, forward and backward, while
# a `probe.Trace` records every message the tensor and domain groups post (sender, receiver, shape, bytes, tag).
# Even sizes this time, so that every message of an exchange has one shape: batch 2, $T = 8$, $H = 4$, $S = 4$,
# $G = 8$. The point-to-point collectives of `comm` post tags 11 (all-gather), 12 (reduce-scatter) and 13 (the
# pair's all-reduce, a swap).

# %%
_EVEN = (8, 4, 4, 8)  # T, H, S, G
_TAGS = {11: "all-gather", 12: "reduce-scatter", 13: "all-reduce (a swap)"}


def _traced_mlps(comm, mlps):
    "One rank of a 2x2 group: the token and the channel MLP (`mlps`), forward and backward, with every message recorded."
    grid = Grid(1, 2, 2)
    g = make_groups(grid, comm=comm)
    trace, lay = traced(g, grid, comm.Get_rank()), Layout.split(g["tensor"], g["domain"], *_EVEN)
    gen = torch.Generator().manual_seed(comm.Get_rank())
    R = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True)
    Ti, Hj, Sj, Gi = lay.t_sizes[lay.i], lay.h_sizes[lay.j], lay.s_sizes[lay.j], lay.g_sizes[lay.i]
    x = R(2, Ti, Hj)
    weights = {"token": (R(Sj, Ti), R(Sj // 2), R(Ti, Sj), R(Ti // 2)), "channel": (R(Hj, Gi), R(Gi // 2), R(Gi, Hj), R(Hj // 2))}
    for name, mlp in zip(weights, mlps):
        trace.label = f"{name} fwd"; y = mlp(x, *weights[name], lay)
        trace.label = f"{name} bwd"; y.square().sum().backward()
    return trace.messages, lay.tensor.sent + lay.domain.sent

_plain = run_ranks(4, _traced_mlps, (token_mlp, channel_mlp))
_plain_msgs = [m for ms, _ in _plain for m in ms]
print(message_table(_plain_msgs, _TAGS))

# %% [markdown]
# Each rank sent exactly the bytes its groups counted, and every exchange of the forward moves what the
# equation says: each message is one rank's share of the collective over a pair (`comm.expected_bytes` of the full
# extent, in float64): the token MLP's gather and output carry $X[\mathcal T_i, :]$ (2 x 4 x 4 elements), its hidden
# sum $A[\mathcal S_j, :]$ (2 x 2 x 4); the channel MLP's gather and output $X[:, \mathcal H_j]$ (2 x 8 x 2), its hidden
# sum $A[:, \mathcal G_i]$ (2 x 8 x 4). (The shapes in the table are those on the wire: `comm`'s collectives send a
# block with the dimension they cut first, so a block (2, 4, 2) of $X$ cut along channels travels as (2, 2, 4).)

# %%
test_eq([sum(m.nbytes for m in ms) for ms, _ in _plain], [sent for _, sent in _plain])
_want = [("all_gather", 32), ("all_reduce", 16), ("reduce_scatter", 32), ("all_gather", 32), ("all_reduce", 64), ("reduce_scatter", 32)]
_fwd = [m for m in _plain_msgs if m.label.endswith("fwd")]
for _s in range(4):
    test_eq([m.nbytes for m in _fwd if m.sender == _s], [expected_bytes(k, 2, n, 8) for k, n in _want])

# %% [markdown]
# The forward drawn from the same trace: one panel per exchange, the ranks at their place in the grid (rows:
# token blocks $i$, columns: channel blocks $j$), an arrow per message in its sender's colour. The token MLP
# talks along rows (tensor partners) for its gather and output, and down columns (domain partners) for its hidden
# sum; the channel MLP the other way round.

# %%
#| fig-alt: The plain 2x2 forward traced: six panels, one per exchange of the token and channel MLPs, ranks as coloured blocks, an arrow per recorded message.
plot_messages(_fwd, 2, 2, _TAGS, title="The plain schedule on a 2x2 model group, forward: every message the groups sent", cols=3);


# %% [markdown]
# ## The backward, derived
#
# Each rank back-propagates its own share of the loss (see `comm`), so for every exchange the backward is the
# exchange's adjoint, found by writing the forward as a linear map and transposing it:
#
# - **all-gather** $x_j \mapsto [x_0, \dots, x_{q-1}]$ is the stacking map $E$, $E(x)_k = x_k$. Its transpose sends
#   the gradient $g$ of the stacked tensor, one share $g^{(r)}$ per rank, to $\sum_r g^{(r)}_j$ on rank $j$: the
#   shares are summed and each rank keeps its block, a **reduce-scatter**.
# - **reduce-scatter** $\{y^{(r)}\} \mapsto (\sum_r y^{(r)})_j$ is the transpose of that: each rank's summand
#   $y^{(r)}$ receives the whole upstream gradient, whose blocks are spread over the ranks: an **all-gather**.
# - **all-reduce** $\{y^{(r)}\} \mapsto \sum_r y^{(r)}$ on every rank: the summand $y^{(r)}$ influences every
#   rank's copy, so its gradient is $\sum_{r'} g^{(r')}$, the sum of every rank's *share* of the upstream
#   gradient: again an **all-reduce**.
#
# Megatron-LM pairs them differently: its `f` is the identity forward and an all-reduce backward, its `g`
# an all-reduce forward and the identity backward. The difference is the convention, not the mathematics:
# Megatron replicates the loss on every rank of its tensor group, so the gradient arriving at a replicated
# tensor is already the full gradient on every rank and summing it again would count it $q$ times; here each
# rank holds only its share $L_r$, the gradient at a replicated tensor is a `Partial`, and making it whole
# is a sum. Applied to the token MLP (plain path), the backward runs the forward's exchanges in reverse:
#
# | forward | backward |
# |---|---|
# | $\tilde X = \mathrm{AG}_{\text{tensor}}(X_{ij})$ | $\partial X_{ij} = \mathrm{RS}_{\text{tensor}}\big(W_1[\mathcal S_j, \mathcal T_i]^\top\, \partial \tilde A\big)$ |
# | $\tilde A = \mathrm{AR}_{\text{domain}}(W_1 \tilde X + b_1)$ | $\partial \tilde A = \mathrm{AR}_{\text{domain}}(\sigma' \odot \partial A)$, $\partial W_1 = \partial \tilde A\, \tilde X^\top$ (complete: no sync) |
# | $Y = \mathrm{RS}_{\text{tensor}}(W_2 A + b_2)$ | $\partial P = \mathrm{AG}_{\text{tensor}}(\partial Y)$, $\partial W_2 = \partial P\, A^\top$, $\partial A = W_2^\top \partial P$ |
#
# Every weight gradient is complete where it is computed: the backward's exchanges already summed over
# every rank that uses the weight, which is why Jigsaw needs no all-reduce of tensor-parallel weights. The
# checks above compared exactly these gradients with the one-process model.

# %% [markdown]
# ## LayerNorm over sharded channels
#
# LayerNorm normalises each token's feature vector, but a rank holds only $\mathcal H_j$ of its features.
# **Exact** statistics combine each rank's local count $n_j$, mean $\mu_j$ and centred sum of squares
# $M_j = \sum_{h \in \mathcal H_j} (x_h - \mu_j)^2$ with Chan's parallel form of Welford's update, which is as
# stable as the two-pass formula and needs a single exchange (an all-gather of two numbers per token):
#
# $$\mu = \frac{1}{H}\sum_{j} n_j \mu_j, \qquad \sigma^2 = \frac1H \sum_{j} \big(M_j + n_j (\mu_j - \mu)^2\big).$$
#
# **Faithful** mode is what the released code does: statistics over the local block only,
# $\mu_j = \frac{1}{|\mathcal H_j|}\sum_{h \in \mathcal H_j} x_h$: a different function from the 1-way model
# whenever $q > 1$.

# %% [markdown]
# Autograd would keep several full-size intermediates of that formula (the centred input, its square, the
# normalised block). `_LayerNorm` keeps only what `torch.nn.functional.layer_norm` keeps, the input and the
# per-token mean and $1/\sigma$, and writes the backward out: with $\hat x = (x-\mu)/\sigma$ and $g = \partial y \odot w$,
#
# $$\partial x = \frac{1}{\sigma}\Big(g - \frac1F \sum_h g_h - \hat x\, \frac1F \sum_h g_h \hat x_h\Big),$$
#
# where the two sums run over all $F$ features: each rank sums over its own and the tensor partners all-reduce
# the two numbers per token. $\partial w = \sum_{t} \partial y\, \hat x$ and $\partial b = \sum_t \partial y$ are this rank's
# share for its features (the data of the other domain blocks add theirs: see `parallel.sync_replicated_grads`).

# %%
#| export
class _LayerNorm(torch.autograd.Function):
    """Forward: LayerNorm of `x` over features split across `tensor`, with exact statistics (one all-gather of two
    numbers per token). Backward: the analytic gradient, one all-reduce of two numbers per token; saves x, mu, 1/sigma."""
    @staticmethod
    def forward(ctx, x, w, b, tensor, n_features, eps, sizes):
        x = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in float32 at least (as autocast's layer_norm)
        mu_j = x.mean(-1, keepdim=True) if x.shape[-1] else torch.zeros_like(x[..., :1])
        m_j = (x - mu_j).square().sum(-1, keepdim=True)
        n = torch.tensor(sizes, dtype=x.dtype, device=x.device).view(-1, *[1] * x.dim())
        st = tensor.all_gather(torch.cat([mu_j, m_j], -1).unsqueeze(0), 0, [1] * tensor.size)  # (q, ..., 2): every (mean, M)
        mu = (n * st[..., :1]).sum(0) / n_features
        rstd = torch.rsqrt((st[..., 1:] + n * (st[..., :1] - mu).square()).sum(0) / n_features + eps)
        ctx.save_for_backward(x, mu, rstd, w); ctx.tensor, ctx.n = tensor, n_features
        return (x - mu) * rstd * w.to(x.dtype) + b.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, mu, rstd, w = ctx.saved_tensors
        xhat = (x - mu) * rstd
        dy = dy.to(x.dtype)
        g = dy * w.to(x.dtype)
        s = ctx.tensor.all_reduce(torch.cat([g.sum(-1, keepdim=True), (g * xhat).sum(-1, keepdim=True)], -1))
        dx = rstd * (g - s[..., :1] / ctx.n - xhat * s[..., 1:] / ctx.n)
        red = tuple(range(dy.dim() - 1))
        return dx, (dy * xhat).sum(red), dy.sum(red), None, None, None, None


# %%
#| export
def layer_norm(
    x,  # (..., F_j): this rank's block of the feature dimension
    w, b,  # (F_j,): LayerNorm weight and bias for my features
    tensor: Group,  # the ranks holding the other feature blocks
    n_features: int,  # F: total features over the group
    exact: bool = True,  # False: the released code's local statistics
    eps: float = 1e-5,
    sizes: list[int] | None = None,  # every rank's feature count (default: `split_sizes(n_features, q)`)
):
    "LayerNorm over a feature dimension split across `tensor`: exact (global statistics) or faithful (local)."
    if not exact or tensor.size == 1:
        return F.layer_norm(x, (x.shape[-1],), w, b, eps)
    return _LayerNorm.apply(x, w, b, tensor, n_features, eps, list(sizes or split_sizes(n_features, tensor.size)))


# %% [markdown]
# On three thread ranks holding 3 + 2 + 2 of 7 features, with the gradients of the input, the weight and the bias;
# in faithful mode a different function:

# %%
_lw, _lb = 1 + _r(_H).abs(), _r(_H)  # LayerNorm weight and bias
_xl = _X.clone().requires_grad_(True)
_lwr, _lbr = _lw.clone().requires_grad_(True), _lb.clone().requires_grad_(True)
_yl = F.layer_norm(_xl, (_H,), _lwr, _lbr); (_yl * _dY).sum().backward()


def _ln3(lay, exact):
    k = lay.j
    x, w, b = cut(_X, (2, 3, k)), cut(_lw, (0, 3, k)), cut(_lb, (0, 3, k))
    y = layer_norm(x, w, b, lay.tensor, _H, exact)
    (y * cut(_dY, (2, 3, k))).sum().backward()
    return y.detach(), x.grad, w.grad, b.grad

for _k, (_y, _dx, _dw, _db) in enumerate(on_grid(1, 3, _ln3, True)):
    close(_y, cut(_yl, (2, 3, _k))); close(_dx, cut(_xl.grad, (2, 3, _k)))
    close(_dw, cut(_lwr.grad, (0, 3, _k))); close(_db, cut(_lbr.grad, (0, 3, _k)))
assert (on_grid(1, 3, _ln3, False)[0][0] - cut(_yl, (2, 3, 0))).abs().max() > 1e-3  # local statistics: another function


# %% [markdown]
#

# %% [markdown]
# ## Refinement 1: overlap every exchange with its GEMM, and keep only 1/n of the activations
#
# The plain path has two costs the paper avoids. Its exchanges **wait**: a rank sends its block and sits idle
# until the partners' arrive. And autograd **keeps the gathered blocks**: the all-gathered $\tilde X$ (all
# channels of my tokens) and the all-reduced hidden block are saved for the backward, $q$ and $p$ times larger
# than a rank's share.
#
# Both are fixed by cutting each product along its separable dimension (`Product.dim`) into the blocks the
# exchange moves:
#
# - **gather, then multiply** (`gather_matmul`): $Y = f(\mathrm{AG}(x))$ with $f$ separable, so
#   $Y[\mathcal B_k] = f(x_k)$. A rank posts its block to every partner, multiplies its own block while the
#   messages fly, then each partner's block as it arrives. Only its own block $x_r$ is saved; the backward
#   gathers the blocks again (as sequence parallelism does), overlapping that with the GEMMs of its own block,
#   and sends each partner the input gradient of that partner's block as soon as it is computed
#   (the reduce-scatter that is the all-gather's adjoint).
# - **multiply, then reduce-scatter** (`matmul_reduce_scatter`): $Y_r = \sum_{r'} f_{r'}(a)[\mathcal B_r]$. A rank
#   computes first the block a partner needs, sends it, and computes the next, its own last; the backward
#   all-gathers the upstream gradient blocks while it computes the contributions of its own.
#
# The hidden sums become a reduce-scatter (along the batch-like axis) followed by a gather: the same bytes as
# the all-reduce, and the hidden block is stored once, cut $pq$ ways. A group that cannot post non-blocking
# messages (`algo="coll"`) runs the same functions with the library's collectives: the same memory, no overlap.

# %% [markdown]
# ### One primitive: the ring
#
# Every overlapped exchange of this module, forward and backward, is the same four moves: **post** a message to
# every partner and a receive from each, **compute** my own block while they fly, **wait** for each partner's
# block, and **fold** it in, in a fixed order. `Ring` makes those moves once. Its messages go in rounds: in round
# $d$ rank $r$ sends to $r + d$ and receives from $r - d$ (mod $n$), so every pair's messages match in the same
# round on every backend, NCCL's grouped point-to-point included.

# %%
#| export
def _rounds(n: int, r: int):
    "Round d = 1..n-1: (partner I send to, partner I receive from)."
    return [((r + d) % n, (r - d) % n) for d in range(1, n)]


# %%
#| export
def _with(t, dim: int, n: int):
    "The shape of `t` with extent `n` along `dim`."
    s = list(t.shape); s[dim] = n
    return s


# %% [markdown]
# `send(to)` is computed when its round is posted, so a ring of partial products computes and sends each
# partner's block before it computes the next (the messages of a reduce-scatter, `Ring.scatter`); a ring that
# sends one tensor to everyone carries the messages of an all-gather (`Ring.gather`).

# %%
#| export
class Ring:
    "Point-to-point messages over `group`, one per partner in rounds, all posted at once; their blocks folded in a fixed order."
    def __init__(self, group: Group,
                 send: Callable,  # send(to): the block for partner `to`, computed when its round is posted
                 recv: Callable,  # recv(fr, sent): a new buffer for partner `fr`'s block (`sent`: what this round sends)
                 tag: int):  # names the exchange (`EXCHANGES`) and keeps it apart from the others in flight
        self.group, self.sent, self.got, self.reqs = group, [], {}, {}
        for to, fr in _rounds(group.size, group.rank):
            s = send(to).contiguous()
            self.sent.append(s)  # a block must live until its send completes: the ring keeps it
            self.got[fr] = recv(fr, s)
            self.reqs[fr] = group.start(sends=[(s, to)], recvs=[(self.got[fr], fr)], tag=tag)

    @classmethod
    def gather(cls, group: Group, x, dim: int, sizes, tag: int):
        "An all-gather's messages: my `x` to every partner; partner k's block has extent `sizes[k]` along `dim`."
        return cls(group, lambda to: x, lambda fr, s: s.new_empty(_with(s, dim, sizes[fr])), tag)

    @classmethod
    def scatter(cls, group: Group, block: Callable, dim: int, n: int, tag: int):
        "A reduce-scatter's messages: `block(to)` for each partner, computed as it is posted; the blocks received have extent `n` along `dim`."
        return cls(group, block, lambda fr, s: s.new_empty(_with(s, dim, n)), tag)


# %% [markdown]
# While it computes, a rank may `poke` the ring's messages along (an MPI without a progress thread moves a large
# message only inside MPI calls); `take(k)` waits for partner $k$'s block alone, when a computation needs that one
# next; iterating waits for the others in the rounds' order, and `fold` adds them up in that order, whichever
# message arrived first, so every result is the same bits on every run.

# %%
#| export
@patch(as_prop=True)
def requests(self: Ring) -> list:
    "The requests of the messages still in flight."
    return [q for rq in self.reqs.values() for q in rq]


@patch
def poke(self: Ring): self.group.poke(self.requests)


@patch
def take(self: Ring, k: int):
    "Partner `k`'s block, once it is there."
    if k in self.reqs: self.group.wait(self.reqs.pop(k))
    return self.got[k]


@patch
def __iter__(self: Ring):
    "(partner, block) of every partner, in the rounds' order, each waited for."
    for fr in list(self.got): yield fr, self.take(fr)


@patch
def fold(self: Ring, acc, f: Callable = lambda fr, b: b):
    "`acc` plus `f(partner, block)` of every partner's block, added in the rounds' order."
    for fr, b in self: acc = acc + f(fr, b)
    return acc


# %% [markdown]
# A ring against the group's own collectives, on 2, 3 and 4 thread ranks with uneven blocks (3 + 2 + 2 rows of 7 for
# three ranks): gathered, the blocks are the all-gather; folded from each partner's block of its summand, they are
# the reduce-scatter; the blocks arrive in the rounds' order; and the bytes are those of the collectives.

# %%
def _ring_check(comm):
    g = Group(comm); n, r = g.size, g.rank
    sizes, x = split_sizes(7, n), torch.arange(21.).view(7, 3) * (r + 1)  # rank r's summand
    ring = Ring.gather(g, x.split(sizes)[r], 0, sizes, tag=1)
    order = [fr for fr, _ in ring]
    gathered = torch.cat([x.split(sizes)[r] if k == r else ring.got[k] for k in range(n)])
    summed = Ring.scatter(g, lambda to: x.split(sizes)[to], 0, sizes[r], tag=2).fold(x.split(sizes)[r])
    return order, gathered, summed, g.sent, g.all_gather(x.split(sizes)[r], 0, sizes), g.reduce_scatter(x, 0, sizes), g.sent

for _n in (2, 3, 4):
    for _k, (_order, _ga, _su, _sent, _ag, _rs, _both) in enumerate(run_ranks(_n, _ring_check)):
        test_eq(_order, [(_k - d) % _n for d in range(1, _n)])
        test_eq(_ga, _ag); test_eq(_su, _rs); test_eq(_sent, _both - _sent)


# %% [markdown]
# Every overlapped function below keeps the autocast state of its forward (torch runs a custom backward without
# it) and re-enters it in the backward, where `_with_saved` hands the backward what its forward kept (`ctx.args`,
# then the saved tensors) as arguments; `chunked` computes a rank's own block in pieces with a `poke` between them
# (`group.progress_chunks`, see `comm.Group.poke`); `_blk` is block $k$ of a tensor along a dimension.

# %%
#| export
def _amp(t) -> tuple:
    "The autocast state of `t`'s device; torch runs a custom backward without autocast, so the backward re-enters it."
    dev = t.device.type
    return dev, torch.get_autocast_dtype(dev), torch.is_autocast_enabled(dev)


def _with_saved(backward):
    "A custom backward called as `backward(ctx, grad, *ctx.args, *ctx.saved_tensors)`, in the autocast state its forward recorded."
    @functools.wraps(backward)
    def run(ctx, g):
        with torch.autocast(*ctx.amp): return backward(ctx, g, *ctx.args, *ctx.saved_tensors)
    return run


# %%
#| export
def chunked(prod, w, a, group, reqs):
    """`prod.fwd(w, a)`, computed in `group.progress_chunks` pieces along the weight's output rows with `group.poke(reqs)`
    between them: an MPI without a progress thread moves a large message only inside MPI calls."""
    k = getattr(group, "progress_chunks", 1)
    if k <= 1 or not reqs: return prod.fwd(w, a)
    parts = []
    for wc in w.tensor_split(k, dim=0 if prod is LEFT else 1):
        parts.append(prod.fwd(wc, a)); group.poke(reqs)
    return torch.cat(parts, dim=prod.bias_dim)


# %%
#| export
def _blk(t, dim: int, sizes, k: int):
    "Block `k` of `t` along `dim`, cut by `sizes`."
    return t.narrow(dim, _off(sizes, k), sizes[k])


def _sum_but(t, dim: int):
    "`t` summed over every dimension but `dim` (a bias's gradient)."
    return t.sum([k for k in range(t.dim()) if k != dim % t.dim()])


def _along(c, ndim: int, dim: int):
    "The vector `c` as a tensor of `ndim` dimensions that runs along `dim`."
    shape = [1] * ndim; shape[dim] = -1
    return c.view(shape)


def _whole(mine, ring: Ring, dim: int, sizes, f: Callable = lambda b: b):
    "The whole tensor along `dim`: `mine` as my block, then `f(block)` of each partner's, placed as it arrives."
    out = mine.new_empty(_with(mine, dim, sum(sizes)))
    _blk(out, dim, sizes, ring.group.rank).copy_(mine)
    for fr, b in ring: _blk(out, dim, sizes, fr).copy_(f(b))
    return out


# %% [markdown]
# `gather_matmul`: forward and backward, as one autograd function. Each is its algebra: the forward is one ring of
# the input blocks; the backward two rings, the input blocks again and the input gradient's blocks.

# %%
#| export
class _GatherMatmul(torch.autograd.Function):
    """Forward: `prod.fwd(w, AG(x))` over `group` along `prod.dim`, each partner's block multiplied as it arrives. Backward: the
    input blocks gathered again (only `x` was saved); `dx = RS(prod.da(w, dy))`, each partner's block sent once computed."""
    @staticmethod
    def forward(ctx, w, x, prod, group, sizes):
        ctx.save_for_backward(w, x); ctx.args, ctx.amp = (prod, group, sizes), _amp(x)
        if not group.can_overlap: return prod.fwd(w, group.all_gather(x, prod.dim, sizes))
        xs = x.contiguous(); ring = Ring.gather(group, xs, prod.dim, sizes, tag=31)
        mine = chunked(prod, w, xs, group, ring.requests)  # my own block while the partners' arrive
        return _whole(mine, ring, prod.dim, sizes, lambda b: prod.fwd(w, b))

    @staticmethod
    @_with_saved
    def backward(ctx, g, prod, group, sizes, w, x):
        d, r, xs, gk = prod.dim, group.rank, x.contiguous(), lambda k: _blk(g, prod.dim, sizes, k)
        if not group.can_overlap:
            return prod.dw(g, group.all_gather(x, d, sizes)), group.reduce_scatter(prod.da(w, g), d, sizes), None, None, None
        xring = Ring.gather(group, xs, d, sizes, tag=32)  # the input blocks, again
        dxring = Ring.scatter(group, lambda to: prod.da(w, gk(to)).to(x.dtype), d, sizes[r], tag=33)  # theirs, as computed
        dx = prod.da(w, gk(r)); group.poke(xring.requests + dxring.requests)  # mine while the messages fly
        dw = xring.fold(prod.dw(gk(r), xs), lambda fr, b: prod.dw(gk(fr), b))
        return dw, dxring.fold(dx), None, None, None


# %%
#| export
def gather_matmul(prod: Product, w, x, group: Group, sizes: list[int]):
    "`prod.fwd(w, all_gather(x, group, prod.dim, sizes))`, overlapped, saving only `x`."
    return prod.fwd(w, x) if group.size == 1 else _GatherMatmul.apply(w, x, prod, group, list(sizes))


# %% [markdown]
# `matmul_reduce_scatter`, its mirror: the forward is one ring of partial products, the backward one ring of the
# upstream gradient's blocks.

# %%
#| export
class _MatmulReduceScatter(torch.autograd.Function):
    """Forward: `RS(prod.fwd(w, a) + c)` over `group` along `prod.dim`, each partner's block computed and sent before the next,
    mine last. Backward: the upstream gradient's blocks all-gathered while my own block's `da` and `dw` are computed."""
    @staticmethod
    def forward(ctx, w, a, c, prod, group, sizes):
        ctx.save_for_backward(w, a); ctx.args, ctx.amp = (prod, group, sizes), _amp(a)
        d, r, cv = prod.dim, group.rank, _along(c, a.dim(), prod.bias_dim)
        if not group.can_overlap: return group.reduce_scatter(prod.fwd(w, a) + cv, d, sizes)
        ring = Ring.scatter(group, lambda to: prod.fwd(w, _blk(a, d, sizes, to)) + cv, d, sizes[r], tag=21)
        return ring.fold(chunked(prod, w, _blk(a, d, sizes, r), group, ring.requests) + cv)  # mine while they fly

    @staticmethod
    @_with_saved
    def backward(ctx, g, prod, group, sizes, w, a):
        d, bd, da = prod.dim, prod.bias_dim, torch.empty_like(a)
        if not group.can_overlap:
            gg = group.all_gather(g, d, sizes)
            return prod.dw(gg, a), prod.da(w, gg), _sum_but(gg, bd), None, None, None
        ring = Ring.gather(group, g.contiguous(), d, sizes, tag=22)
        def use(k, gk):  # block k's contributions: da's block k (in a's dtype), and its shares of dw and dc
            _blk(da, d, sizes, k).copy_(prod.da(w, gk))
            return prod.dw(gk, _blk(a, d, sizes, k)), _sum_but(gk, bd)
        dw, dc = use(group.rank, g); ring.poke()  # my own block while the partners' arrive
        for fr, gk in ring: gw, gc = use(fr, gk); dw, dc = dw + gw, dc + gc
        return dw, da, dc, None, None, None


# %%
#| export
def matmul_reduce_scatter(prod: Product, w, a, c, group: Group, sizes: list[int]):
    "`reduce_scatter(prod.fwd(w, a) + c, group, prod.dim, sizes)` (`c` along `prod.bias_dim`), overlapped."
    return _MatmulReduceScatter.apply(w, a, c, prod, group, list(sizes))


# %% [markdown]
# Both against their plain compositions, on three thread ranks with uneven blocks (3 + 2 + 2 channels, 4 + 3 + 3 tokens), forward
# and backward:

# %%
def _leaf(t): return t.detach().clone().requires_grad_(True)


def _fused(lay, prod, w_full, a_full, c_full):
    "Outputs and gradients of (gather_matmul, its plain form, matmul_reduce_scatter, its plain form) on this rank."
    tensor, k, n = lay.tensor, lay.j, lay.q
    sz = split_sizes(a_full.shape[prod.dim], n)
    shape = [1] * a_full.dim(); shape[prod.bias_dim] = -1
    runs = {"gather_matmul": lambda w, a, c: gather_matmul(prod, w, a, tensor, sz),
            "plain gather": lambda w, a, c: prod.fwd(w, all_gather(a, tensor, prod.dim, sz)),
            "matmul_reduce_scatter": lambda w, a, c: matmul_reduce_scatter(prod, w, a, c, tensor, sz),
            "plain scatter": lambda w, a, c: reduce_scatter(prod.fwd(w, a) + c.view(shape), tensor, prod.dim, sz)}
    out = {}
    for name, f in runs.items():
        w, c = _leaf(w_full), _leaf(c_full)
        a = cut(a_full, (prod.dim, n, k)) if "gather" in name else _leaf(a_full * (k + 1))  # a block, or a summand
        y = f(w, a, c)
        (y * (k + 1)).square().sum().backward()  # each rank its own upstream gradient
        out[name] = (y.detach(), w.grad, a.grad, c.grad)
    return out

for _prod, _wf, _af, _cf in ((LEFT, _W1, _X, _b1), (RIGHT, _Wa, _X, _ba)):
    for _res in on_grid(1, 3, _fused, _prod, _wf, _af, _cf):
        for _u, _v in zip(_res["gather_matmul"][:3], _res["plain gather"][:3]): close(_u, _v)
        for _u, _v in zip(_res["matmul_reduce_scatter"], _res["plain scatter"]): close(_u, _v)
        assert all(t is not None for t in _res["gather_matmul"][1:3] + _res["matmul_reduce_scatter"][1:])


# %% [markdown]
# When a stage both gathers (over one group) and reduce-scatters (over the other) along the same dimension, as
# every stage of a 2x2 grid does, `gather_matmul_reduce_scatter` overlaps both: the output is computed block by
# block of the *scatter*, each block as soon as the gathered input blocks it needs have arrived (partners' blocks
# first, so they can be sent at once), and summed in a fixed order. The backward gathers the upstream
# gradient and the input again and sends each gather partner its input gradient as soon as it is computed.
# It moves the same bytes as `gather_matmul` followed by `reduce_scatter` and saves only `x`.

# %%
#| export
def _ranges_needed(c_from, c_to, m):
    "Indices k of the blocks of partition `c_from` that overlap block m of partition `c_to` (both as cuts)."
    a, e = c_to[m], c_to[m + 1]
    return [k for k in range(len(c_from) - 1) if c_from[k] < e and c_from[k + 1] > a]


def _cuts(sizes): return [sum(sizes[:k]) for k in range(len(sizes) + 1)]


@patch
def span(self: Ring, mine, dim: int, sizes, start: int, n: int):
    "Extent `n` from `start` along `dim` of the gathered tensor (blocks `sizes`, mine `mine`): from the blocks it overlaps, each waited for."
    ks = _ranges_needed(_cuts(sizes), [start, start + n], 0)
    if not ks: return mine.narrow(dim, 0, 0)
    parts = [mine if k == self.group.rank else self.take(k) for k in ks]
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim)).narrow(dim, start - _off(sizes, ks[0]), n)


# %% [markdown]
# Its forward is two rings: the gathered input's, and the scatter's, whose block for partner $m$ waits only for the
# gathered blocks that block spans (`Ring.span`, which `take`s each).

# %%
#| export
class _GatherMatmulReduceScatter(torch.autograd.Function):
    """Forward: `RS_scatter(prod.fwd(w, AG_gather(x)) + c)` along `prod.dim`, each scatter partner's block computed once the
    gathered blocks it spans are in, and sent. Backward: gradient and input gathered again; input gradients sent once computed."""
    @staticmethod
    def forward(ctx, w, x, c, prod, gather, g_sizes, scatter, s_sizes):
        ctx.save_for_backward(w, x); ctx.args, ctx.amp = (prod, gather, g_sizes, scatter, s_sizes), _amp(x)
        d, xs, cv = prod.dim, x.contiguous(), _along(c, x.dim(), prod.bias_dim)
        xring = Ring.gather(gather, xs, d, g_sizes, tag=51)
        blk = lambda m: prod.fwd(w, xring.span(xs, d, g_sizes, _off(s_sizes, m), s_sizes[m])) + cv  # scatter block m
        yring = Ring.scatter(scatter, blk, d, s_sizes[scatter.rank], tag=52)  # the partners' blocks first
        mine = blk(scatter.rank); list(xring)  # mine; my own sends to the gather partners complete too
        return yring.fold(mine)

    @staticmethod
    @_with_saved
    def backward(ctx, g, prod, gather, g_sizes, scatter, s_sizes, w, x):
        d, r, g, xs = prod.dim, gather.rank, g.contiguous(), x.contiguous()
        gring, xring = Ring.gather(scatter, g, d, s_sizes, tag=53), Ring.gather(gather, xs, d, g_sizes, tag=54)
        gfull = _whole(g, gring, d, s_sizes)  # the whole upstream gradient, placed in the rounds' order
        gk = lambda k: _blk(gfull, d, g_sizes, k)
        dxring = Ring.scatter(gather, lambda to: prod.da(w, gk(to)).to(x.dtype), d, g_sizes[r], tag=55)  # theirs, as computed
        dx = prod.da(w, gk(r))  # mine while the messages fly
        dw = xring.fold(prod.dw(gk(r), xs), lambda fr, b: prod.dw(gk(fr), b))
        return dw, dxring.fold(dx), _sum_but(gfull, prod.bias_dim), None, None, None, None, None


# %%
#| export
def gather_matmul_reduce_scatter(prod: Product, w, x, c, gather: Group, g_sizes, scatter: Group, s_sizes):
    "`reduce_scatter(prod.fwd(w, all_gather(x, gather, prod.dim, g_sizes)) + c, scatter, prod.dim, s_sizes)`, overlapped."
    return _GatherMatmulReduceScatter.apply(w, x, c, prod, gather, list(g_sizes), scatter, list(s_sizes))


# %% [markdown]
# Each MLP is then two *stages*, $Y = \mathrm{RS}_{\text{scatter}}\big(f(w, \mathrm{AG}_{\text{gather}}(x)) + b\big)$, one per
# linear: a fused `matmul_reduce_scatter` when there is nothing to gather, a fused
# `gather_matmul_reduce_scatter` when there is both a gather and a scatter, and `gather_matmul` when there is
# nothing to scatter. Every exchange of the MLPs is overlapped with a GEMM, on every grid.

# %%
#| export
def mm_stage(prod: Product, w, x, b, gather: Group, g_sizes: list[int], scatter: Group, s_sizes: list[int]):
    "`RS_scatter(prod.fwd(w, AG_gather(x)) + b)` along `prod.dim`, `b` this rank's bias shard over `scatter` (or None), overlapped."
    n = w.shape[0] if prod is LEFT else w.shape[1]  # the length of the output's bias dimension
    c = lambda: bias_full(b, n, scatter) if b is not None else w.new_zeros(n)
    if gather.size == 1 and scatter.size > 1:
        return matmul_reduce_scatter(prod, w, x, c(), scatter, s_sizes)
    if gather.can_overlap and scatter.can_overlap:
        return gather_matmul_reduce_scatter(prod, w, x, c(), gather, g_sizes, scatter, s_sizes)
    y = gather_matmul(prod, w, x, gather, g_sizes)
    if b is not None: y = add_bias_shard(y, b, prod.bias_dim, scatter)
    return reduce_scatter(y, scatter, prod.dim, s_sizes)


# %% [markdown]
# The overlapped token MLP: the hidden block $A[\mathcal S_j, \mathcal H'_i]$ is cut along channels over the domain
# axis ($\mathcal H'_i$: block $i$ of $p$ of all channels), and gathered again by the second stage:
#
# $$A[\mathcal S_j, \mathcal H'_i] = \sigma\Big(\mathrm{RS}_{\text{domain}}\big(W_1[\mathcal S_j, \mathcal T_i]\,\mathrm{AG}_{\text{tensor}}(X_{ij})\big) + b_1\Big),
# \qquad Y_{ij} = \mathrm{RS}_{\text{tensor}}\big(W_2[\mathcal T_i, \mathcal S_j]\, \mathrm{AG}_{\text{domain}}(A[\mathcal S_j, \mathcal H'_i])\big) + b_2 .$$

# %%
#| export
def token_mlp_overlap(x, w1, b1, w2, b2, lay: Layout, drop=_nodrop,
                      faithful: bool = False):  # True: b1, b2 are the released code's per-rank copies, added to my blocks
    "The token MLP with every exchange overlapped and 1/n of its activations saved (arguments as `token_mlp`)."
    H, S = lay.full[1], sum(lay.s_sizes)
    hd = split_sizes(H, lay.p)  # the hidden block's channels, cut over the domain axis
    a = mm_stage(LEFT, w1, x, None if faithful else b1, lay.tensor, lay.h_sizes, lay.domain, hd)  # A[S_j, H'_i]  (B, S_j, H'_i)
    if faithful: a = a + b1[:, None]
    a = drop(F.gelu(a), 0, (_off(lay.s_sizes, lay.j), _off(hd, lay.i)), (S, H))
    y = mm_stage(LEFT, w2, a, None if faithful else b2, lay.domain, hd, lay.tensor, lay.h_sizes)  # Y[T_i, H_j]
    if faithful: y = y + b2[:, None]
    return drop(y, 1, lay.starts, lay.full)


# %% [markdown]
# The overlapped channel MLP, its hidden block $A[\mathcal T'_j, \mathcal G_i]$ cut along tokens over the tensor axis:

# %%
#| export
def channel_mlp_overlap(x, wa, ba, wb, bb, lay: Layout, drop=_nodrop,
                        faithful: bool = False):  # True: ba, bb are the released code's per-rank copies, added to my blocks
    "The channel MLP with every exchange overlapped and 1/n of its activations saved (arguments as `channel_mlp`)."
    T, G = lay.full[0], sum(lay.g_sizes)
    tt = split_sizes(T, lay.q)  # the hidden block's tokens, cut over the tensor axis
    a = mm_stage(RIGHT, wa, x, None if faithful else ba, lay.domain, lay.t_sizes, lay.tensor, tt)  # A[T'_j, G_i]  (B, T'_j, G_i)
    if faithful: a = a + ba
    a = drop(F.gelu(a), 2, (_off(tt, lay.j), _off(lay.g_sizes, lay.i)), (T, G))
    y = mm_stage(RIGHT, wb, a, None if faithful else bb, lay.tensor, tt, lay.domain, lay.t_sizes)  # Y[T_i, H_j]
    if faithful: y = y + bb
    return drop(y, 3, lay.starts, lay.full)


# %% [markdown]
# The same checks as the plain path, on 1x2, 2x1, 2x2 and 3x2 thread grids with uneven sizes:

# %%
for _pq in ((1, 2), (2, 1), (2, 2), (3, 2)):
    _check_token(*_pq, fn=token_mlp_overlap); _check_channel(*_pq, fn=channel_mlp_overlap)


# %% [markdown]
# ### The encoder's and the decoder's exchanges
#
# Outside the mixer blocks the tensor axis cuts channels that a GEMM *contracts* or *produces*, not a dimension of
# the activations. The encoder all-gathers its input channels and contracts them,
# $Z = X W_{enc} = \sum_k X_{[C_k]} W_{enc}[C_k]$; the decoder and the residual map each rank's channel block to all
# output channels, a partial sum that is reduce-scattered, $Y_{[V_k]} = \sum_j U_{[j]} W[j][:, V_k]$. Both overlap
# like the MLPs' exchanges, with the blocks cut on the *weight*: the encoder multiplies its own channel block while
# the partners' arrive and adds each one as it comes; the decoder computes and sends partner $k$'s output block
# $U W[:, V_k]$ first and its own last. `contraction(k)` is the product of the two: the last `k` dimensions of the
# activation contracted with the first `k` of the weight (`k = 2` for the encoder's (channel, pixel) patches, `k = 1`
# for the decoder's and the residual's features).

# %%
#| export
def contraction(k: int) -> Product:
    "`tensordot(a, w, k)`: the last `k` dimensions of `a` contracted with the first `k` of `w`, with its two gradients."
    mat = lambda w: w.reshape(math.prod(w.shape[:k]), -1)  # (K, R): one GEMM, which autocast casts like any matmul
    lead = lambda t, n: t.reshape(math.prod(t.shape[:n]), -1)  # the first n dimensions as rows
    return Product(lambda w, a: (a.flatten(a.dim() - k) @ mat(w)).unflatten(-1, w.shape[k:]),
                   lambda w, g: (g.flatten(g.dim() - w.dim() + k) @ mat(w).mT).unflatten(-1, w.shape[:k]),
                   lambda g, a: (lead(a, a.dim() - k).mT @ lead(g, a.dim() - k)).reshape(a.shape[a.dim() - k:] + g.shape[a.dim() - k:]),
                   dim=0, bias_dim=-1)  # separable along the batch; no bias of its own


PATCHES, FEATURES = contraction(2), contraction(1)

# %%
test_eq(PATCHES.fwd(torch.ones(3, 2, 5), torch.ones(4, 7, 3, 2)).shape, (4, 7, 5))
test_eq(FEATURES.da(torch.ones(3, 2, 5), torch.ones(4, 7, 2, 5)).shape, (4, 7, 3))
test_eq(FEATURES.dw(torch.ones(4, 7, 2, 5), torch.ones(4, 7, 3)).shape, (3, 2, 5))
_a, _w = torch.randn(4, 7, 3, 2, dtype=torch.float64), torch.randn(3, 2, 5, dtype=torch.float64)
test_close(PATCHES.fwd(_w, _a), torch.einsum("btcp,cph->bth", _a, _w), eps=1e-12)


# %%
#| export
class _GatherContract(torch.autograd.Function):
    """Forward: `prod.fwd(w, AG(x))` over `group`, dimension `xd` of `x` contracted with `wd` of `w`: `sum_k prod.fwd(w_k, x_k)`,
    mine first while the partners' blocks arrive. Backward: `dw_k = prod.dw(g, x_k)` from the kept blocks; if `x` needs a
    gradient, `dx = RS(da)`, partner k's `prod.da(w_k, g)` sent as soon as it is computed."""
    @staticmethod
    def forward(ctx, w, x, prod, group, sizes, xd, wd):
        wk, xs = lambda k: _blk(w, wd, sizes, k), x.contiguous()
        ring = Ring.gather(group, xs, xd, sizes, tag=61)
        y = prod.fwd(wk(group.rank), xs); ring.poke()  # my block while the partners' arrive
        y = ring.fold(y, lambda fr, b: prod.fwd(wk(fr), b))
        blocks = {**ring.got, group.rank: xs}
        ctx.save_for_backward(w, *[blocks[k] for k in range(group.size)])
        ctx.args, ctx.amp = (prod, group, sizes, xd, wd), _amp(x)
        return y

    @staticmethod
    @_with_saved
    def backward(ctx, g, prod, group, sizes, xd, wd, w, *xb):
        r, wk, ring = group.rank, lambda k: _blk(w, wd, sizes, k), None
        if ctx.needs_input_grad[1]:  # every rank agrees: the same graph on every rank
            ring = Ring.scatter(group, lambda to: prod.da(wk(to), g).to(xb[r].dtype), xd, sizes[r], tag=62)
            dx = prod.da(wk(r), g); ring.poke()
        dw = torch.cat([prod.dw(g, b) for b in xb], dim=wd)  # while the messages fly
        return dw, None if ring is None else ring.fold(dx), None, None, None, None, None


# %%
#| export
def gather_contract(prod: Product, w, x, group: Group, sizes: list[int], xd: int, wd: int, overlap: bool = True):
    "`prod.fwd(w, all_gather(x, group, xd, sizes))`, dimension `xd` of `x` meeting dimension `wd` of `w`; overlapped."
    if group.size == 1: return prod.fwd(w, x)
    if not (overlap and group.can_overlap): return prod.fwd(w, all_gather(x, group, xd, sizes))
    return _GatherContract.apply(w, x, prod, group, list(sizes), xd, wd)


# %%
#| export
class _MatmulReduceScatterOut(torch.autograd.Function):
    """Forward: `RS(prod.fwd(w, a))` over `group` along the result's dimension `od`, the one that dimension `wd` of `w`
    makes: partner k's block `prod.fwd(w_k, a)` computed and sent before the next, mine last, the received blocks
    added in the rounds' order. Backward: the upstream gradient blocks are all-gathered while my own block's `da`
    and `dw` are computed; `da = sum_k prod.da(w_k, g_k)`, `dw_k = prod.dw(g_k, a)`."""
    @staticmethod
    def forward(ctx, w, a, prod, group, sizes, wd, od):
        ctx.save_for_backward(w, a); ctx.args, ctx.amp = (prod, group, sizes, wd, od), _amp(a)
        wk = lambda k: _blk(w, wd, sizes, k)
        ring = Ring.scatter(group, lambda to: prod.fwd(wk(to), a), od, sizes[group.rank], tag=63)
        return ring.fold(prod.fwd(wk(group.rank), a))  # mine while the messages fly

    @staticmethod
    @_with_saved
    def backward(ctx, g, prod, group, sizes, wd, od, w, a):
        r, wk, g = group.rank, lambda k: _blk(w, wd, sizes, k), g.contiguous()
        ring = Ring.gather(group, g, od, sizes, tag=64)
        da, dw = prod.da(wk(r), g), {r: prod.dw(g, a)}; ring.poke()  # my own block while the partners' arrive
        for fr, gb in ring: da = da + prod.da(wk(fr), gb); dw[fr] = prod.dw(gb, a)
        return torch.cat([dw[k] for k in range(group.size)], dim=wd), da.to(a.dtype), None, None, None, None, None


# %%
#| export
def matmul_reduce_scatter_out(prod: Product, w, a, group: Group, sizes: list[int], wd: int, od: int, overlap: bool = True):
    "`reduce_scatter(prod.fwd(w, a), group, od, sizes)`, dimension `od` of the result made by dimension `wd` of `w`; overlapped."
    if group.size == 1: return prod.fwd(w, a)
    if not (overlap and group.can_overlap): return reduce_scatter(prod.fwd(w, a), group, od, sizes)
    return _MatmulReduceScatterOut.apply(w, a, prod, group, list(sizes), wd, od)


# %% [markdown]
# Both against their plain compositions on three thread ranks with uneven channel blocks (3 + 2 + 2), forward and
# both gradients, in float64: the encoder's shape (patches (B, T, C, P) contracted with $W$ (C, P, H), `x` needing a
# gradient or not) and the decoder's (features (B, T, G) times $W$ (G, V, P), the output's `V` reduce-scattered):

# %%
def _ends(lay, xg, we, ud, wdec):
    "Outputs and gradients of the overlapped and the plain encoder/decoder exchanges on this rank."
    tensor, k, n, out = lay.tensor, lay.j, lay.q, {}
    sz = split_sizes(xg.shape[2], n)
    for ov in (True, False):
        for x_grad in (True, False):
            w, x = _leaf(we), cut(xg, (2, n, k)).requires_grad_(x_grad)
            y = gather_contract(PATCHES, w, x, tensor, sz, xd=2, wd=0, overlap=ov)
            (y * (k + 1)).square().sum().backward()
            out["enc", ov, x_grad] = (y.detach(), w.grad, x.grad)
        w, a = _leaf(wdec), _leaf(ud * (k + 1))  # each rank a summand
        y = matmul_reduce_scatter_out(FEATURES, w, a, tensor, split_sizes(wdec.shape[1], n), wd=1, od=2, overlap=ov)
        (y * (k + 1)).square().sum().backward()
        out["dec", ov] = (y.detach(), w.grad, a.grad)
    return out

_g = torch.Generator().manual_seed(5)
_xe, _we = torch.randn(2, 6, 7, 3, dtype=torch.float64, generator=_g), torch.randn(7, 3, 5, dtype=torch.float64, generator=_g)
_ud, _wd = torch.randn(2, 6, 4, dtype=torch.float64, generator=_g), torch.randn(4, 7, 3, dtype=torch.float64, generator=_g)
for _res in on_grid(1, 3, _ends, _xe, _we, _ud, _wd):
    for _u, _v in zip(_res["enc", True, True], _res["enc", False, True]): close(_u, _v)
    for _u, _v in zip(_res["enc", True, False][:2], _res["enc", False, True][:2]): close(_u, _v)
    assert _res["enc", True, False][2] is None
    for _u, _v in zip(_res["dec", True], _res["dec", False]): close(_u, _v)


# %% [markdown]
# And the memory: `probe.saved_bytes` counts the distinct storages autograd keeps for the backward. Per rank, the
# plain path keeps the gathered blocks; the overlapped one stays at $1/n$ of the one-process MLP (plus the
# weights, which are $1/n$ too):

# %%
def _memory(lay, fn, B=2):
    (T, H), S, i, j = lay.full, sum(lay.s_sizes), lay.i, lay.j
    R = lambda *s: torch.randn(*s, dtype=torch.float64, requires_grad=True)
    x, w1, w2 = R(B, lay.t_sizes[i], lay.h_sizes[j]), R(lay.s_sizes[j], lay.t_sizes[i]), R(lay.t_sizes[i], lay.s_sizes[j])
    b1 = R(split_sizes(lay.s_sizes[j], lay.p)[i])  # shard i of b1[S_j]
    b2 = R(split_sizes(lay.t_sizes[i], lay.q)[j])  # shard j of b2[T_i]
    with saved_bytes() as m: fn(x, w1, b1, w2, b2, lay)
    return m.bytes

_sizes = dict(sizes=(24, 16, 12, 12))  # T, H, S, G
_one = _memory(Layout.split(Group(), Group(), *_sizes["sizes"]), token_mlp)  # the one-process MLP's saved bytes
for _pq in ((1, 2), (2, 2)):
    _plain_b, _lean = max(on_grid(*_pq, _memory, token_mlp, **_sizes)), max(on_grid(*_pq, _memory, token_mlp_overlap, **_sizes))
    print(f"{_pq}: plain {_plain_b / (_one / (_pq[0] * _pq[1])):.2f} x 1/n of one process, overlapped {_lean / (_one / (_pq[0] * _pq[1])):.2f} x")
    assert _lean <= 1.15 * _one / (_pq[0] * _pq[1]) < _plain_b


# %% [markdown]
# ## Communication volume
#
# Per mixer block and sample, with $b$ bytes per element, rank $(i,j)$ sends in the forward:
#
# | step | plain | overlapped | group | elements (full size) |
# |---|---|---|---|---|
# | token MLP gather | all-gather | gather-matmul | tensor ($q$) | $\lvert\mathcal T_i\rvert H$ |
# | token MLP hidden | all-reduce | reduce-scatter + gather-matmul | domain ($p$) | $\lvert\mathcal S_j\rvert H$ |
# | token MLP output | reduce-scatter | matmul-reduce-scatter | tensor | $\lvert\mathcal T_i\rvert H$ |
# | channel MLP gather | all-gather | gather-matmul | domain | $T \lvert\mathcal H_j\rvert$ |
# | channel MLP hidden | all-reduce | reduce-scatter + gather-matmul | tensor | $T \lvert\mathcal G_i\rvert$ |
# | channel MLP output | reduce-scatter | matmul-reduce-scatter | domain | $T \lvert\mathcal H_j\rvert$ |
# | 2 exact LayerNorms | all-gather | all-gather | tensor | $2 \cdot 2 q \lvert\mathcal T_i\rvert$ (2 numbers per token and rank) |
#
# with the per-rank bytes of `comm.expected_bytes` for each. The backward of the plain path sends the same
# amounts again (each exchange's adjoint moves as many bytes); the overlapped path's backward also gathers
# again every block it did not keep (one more all-gather per `gather_matmul`): the price of storing $1/n$.

# %%
#| export
def block_bytes(T: int, H: int, S: int, G: int, p: int, q: int, itemsize: int = 4, batch: int = 1, exact: bool = True,
                schedule: str = "plain", backward: bool = False) -> int:
    "Analytic bytes one rank sends in one mixer block, forward (or forward + `backward`), for even splits."
    e, b = expected_bytes, itemsize
    Ti, Sj, Gi, Hj = T // p, S // q, G // p, H // q
    ln = 2 * e("all_gather", q, 2 * q * Ti, b) if exact else 0  # LayerNorm statistics: 2 numbers per token and rank
    ln_bwd = 2 * e("all_reduce", q, 2 * Ti, b) if exact else 0  # LayerNorm backward: an all-reduce of 2 per token
    if schedule == "summa":  # every rank sends its A block along the row and its B block down the column
        n, blk = p, lambda r, c: (r // p) * (c // p) * b
        mlp = (n - 1) * (batch * (2 * blk(T, H) + blk(S, H) + blk(T, G)) + blk(S, T) + blk(T, S) + blk(H, G) + blk(G, H))
        return batch * ln + mlp + ((2 * mlp + batch * ln_bwd) if backward else 0)  # backward: blocks again, then partials
    fwd = (e("all_gather", q, Ti * H, b) + e("all_reduce", p, Sj * H, b) + e("reduce_scatter", q, Ti * H, b)
           + e("all_gather", p, T * Hj, b) + e("all_reduce", q, T * Gi, b) + e("reduce_scatter", p, T * Hj, b))
    regather = (e("all_gather", q, Ti * H, b) + e("all_gather", p, Sj * H, b) + e("all_gather", p, T * Hj, b)
                + e("all_gather", q, T * Gi, b)) if schedule == "overlap" else 0
    return batch * (fwd + ln + ((fwd + regather + ln_bwd) if backward else 0))


# %% [markdown]
# Checked against the bytes the groups count, on thread ranks with even sizes, for both paths, forward and
# forward + backward (a token MLP, a channel MLP and two exact LayerNorms make a block):

# %%
def _block_sent(lay, schedule, backward, B=2, T=8, H=4, S=4, G=8):
    p, q, tensor, domain = lay.p, lay.q, lay.tensor, lay.domain
    lay = Layout(tensor, domain, [T // p] * p, [H // q] * q, [S // q] * q, [G // p] * p)
    tok, ch = {"plain": (token_mlp, channel_mlp), "overlap": (token_mlp_overlap, channel_mlp_overlap)}.get(
        schedule, (token_mlp_summa, channel_mlp_summa) if schedule == "summa" else None)
    R = lambda *s: torch.randn(*s, dtype=torch.float64, requires_grad=True)
    whole = schedule == "summa"  # SUMMA's biases are whole blocks; the others' are shards of the summing group
    b1, b2 = (R(S // p), R(T // p)) if whole else (R(S // q // p), R(T // p // q))
    ba, bb = (R(G // q), R(H // q)) if whole else (R(G // p // q), R(H // q // p))
    x = R(B, T // p, H // q)
    y = x + tok(layer_norm(x, R(H // q), R(H // q), tensor, H), R(S // q, T // p), b1, R(T // p, S // q), b2, lay)
    y = y + ch(layer_norm(y, R(H // q), R(H // q), tensor, H), R(H // q, G // p), ba, R(G // p, H // q), bb, lay)
    if backward: y.sum().backward()
    return tensor.sent + domain.sent

for _pq in ((1, 2), (2, 2)):
    for _sched in ("plain", "overlap"):
        for _bw in (False, True):
            test_eq(set(on_grid(*_pq, _block_sent, _sched, _bw)), {block_bytes(8, 4, 4, 8, *_pq, itemsize=8, batch=2, schedule=_sched, backward=_bw)})
test_eq(block_bytes(8, 4, 4, 4, 1, 1), 0)  # one rank sends nothing
test_eq(block_bytes(8, 4, 4, 4, 1, 2), 4 * (8 * 2) * 4 + 2 * (2 * 2 * 8) * 4 // 2)  # 2-way: 4 half-blocks of 8 x 2, 2 LN stats

# %% [markdown]
# ## Which exchange is which
#
# Every posted exchange carries a tag, and `group.waited` adds up the seconds a rank waited for each one
# (`jigsaw-bench` prints them per step). The names, by tag:

# %%
#| export
EXCHANGES = {
    "tag 21": "MLP output reduce-scatter (forward)", "tag 22": "MLP output gradient all-gather (backward)",
    "tag 31": "MLP input all-gather (forward)", "tag 32": "MLP input re-gather (backward)",
    "tag 33": "MLP input-gradient reduce-scatter (backward)",
    "tag 41": "SUMMA A blocks (forward)", "tag 42": "SUMMA B blocks (forward)", "tag 43": "SUMMA B blocks (backward)",
    "tag 44": "SUMMA A blocks (backward)", "tag 45": "SUMMA dA partials (backward)", "tag 46": "SUMMA dB partials (backward)",
    "tag 51": "2x2 stage input all-gather (forward)", "tag 52": "2x2 stage output reduce-scatter (forward)",
    "tag 53": "2x2 stage gradient all-gather (backward)", "tag 54": "2x2 stage input re-gather (backward)",
    "tag 55": "2x2 stage input-gradient reduce-scatter (backward)",
    "tag 61": "encoder input all-gather (forward)", "tag 62": "encoder input-gradient reduce-scatter (backward)",
    "tag 63": "decoder/residual reduce-scatter (forward)", "tag 64": "decoder/residual gradient all-gather (backward)",
    "all_gather": "collective all-gather", "reduce_scatter": "collective reduce-scatter", "all_reduce": "collective all-reduce"}

# %% [markdown]
# Every tag this module posts has its name (read from this module's own source):

# %%
test_eq({f"tag {t}" for t in re.findall(r"tag=(\d+)", inspect.getsource(_pm))}, {k for k in EXCHANGES if k.startswith("tag")})

# %% [markdown]
# ## The overlapped 2x2, traced
#
# The same four thread ranks as the plain trace above, running the overlapped MLPs, which the model uses by
# default. Every stage of a 2x2 grid both gathers over one group and reduce-scatters over the other, so each
# stage is two rings (`gather_matmul_reduce_scatter`): the forward has two exchanges per linear where the plain
# path has an all-reduce between two; the backward gathers again the blocks the forward did not keep.

# %%
_NAMES = _TAGS | {int(k[4:]): v.split(" (")[0].replace("2x2 stage", "stage") for k, v in EXCHANGES.items() if k.startswith("tag")}
_over = run_ranks(4, _traced_mlps, (token_mlp_overlap, channel_mlp_overlap))
_over_msgs = [m for ms, _ in _over for m in ms]
print(message_table(_over_msgs, _NAMES))

# %% [markdown]
# Both traces against `block_bytes` (without the LayerNorms: `exact=False`), per rank, forward and forward +
# backward: the plain schedule's all-reduces become a reduce-scatter and a gather of the same bytes, and the
# overlapped backward's re-gathers are the price of keeping $1/n$ of the activations:

# %%
for _sched, _res in (("plain", _plain), ("overlap", _over)):
    _fb = [sum(m.nbytes for m in ms) for ms, _ in _res]
    _f = [sum(m.nbytes for m in ms if m.label.endswith("fwd")) for ms, _ in _res]
    test_eq(_fb, [sent for _, sent in _res])
    _want_b = lambda bw: block_bytes(*_EVEN, 2, 2, itemsize=8, batch=2, exact=False, schedule=_sched, backward=bw)
    test_eq(set(_f), {_want_b(False)}); test_eq(set(_fb), {_want_b(True)})
    print(f"{_sched:<8} per rank: forward {_f[0]:,} B, forward + backward {_fb[0]:,} B  (block_bytes: {_want_b(False):,}, {_want_b(True):,})")

# %% [markdown]
# The overlapped forward, drawn from its trace: in each stage the gather partners swap their input blocks (one
# panel) and the scatter partners swap the blocks of each other's output (the next).

# %%
#| fig-alt: The overlapped 2x2 forward traced: eight panels, a gather and a reduce-scatter for each of the four linears, an arrow per recorded message.
plot_messages([m for m in _over_msgs if m.label.endswith("fwd")], 2, 2, _NAMES,
              title="The overlapped schedule on a 2x2 model group, forward: every message the groups sent");


# %% [markdown]
# ## Faithful mode: the released code's biases, as a diff from exact
#
# The released research code does not tie the bias copies of ranks that share an output block. On a grid with
# domain shards ($p > 1$) each rank keeps a whole bias vector for an output block and adds it, on its own, to
# the block **it computes itself**, never summed or synchronised with its partners' (`Linear.py`,
# `XTW_fourway.forward` and friends: `product.add(b)` on every rank, after that product's exchanges). Read in
# jigsaw_ref's arrangement:
#
# | bias | rank $(i,j)$ keeps | the released code adds it to | exact mode instead |
# |---|---|---|---|
# | $b_1$ (token hidden) | a copy of $b_1[\mathcal S_j]$ | the hidden block $A[\mathcal S_j, \mathcal H'_i]$ (channels cut over the domain axis) | a shard, before the domain sum |
# | $b_2$ (token output) | a copy of $b_2[\mathcal T_i]$ | the output block $Y[\mathcal T_i, \mathcal H_j]$ | a shard, before the tensor sum |
# | $b_a$ (channel hidden) | a copy of $b_a[\mathcal G_i]$ | the hidden block $A[\mathcal T'_j, \mathcal G_i]$ (tokens cut over the tensor axis) | a shard, before the tensor sum |
# | $b_b$ (channel output) | a copy of $b_b[\mathcal H_j]$ | the output block $Y[\mathcal T_i, \mathcal H_j]$ | a shard, before the domain sum |
#
# So the released model's hidden biases are in effect **matrices**, one independent copy per hidden block.
# In the overlapped schedule those blocks are exactly what each rank holds after its reduce-scatter, so
# faithful mode adds each copy there; the plain path adds it to the matching columns (token MLP) or rows
# (channel MLP) of its partial product before the sum, which lands it on the same block. With $p = 1$ the
# released 2-way code's biases are unique halves, as ours are, and the faithful MLPs are the exact ones. The
# LayerNorms differ too (local statistics, `layer_norm(exact=False)`), and training averages every LayerNorm
# gradient over the domain partners (see `parallel.complete_grads`).

# %%
#| export
def _on_block(y, b, dim: int, bdim: int, sizes, k):
    "`y` plus the bias copy `b` (along `bdim`) on block `k` of `sizes` along `dim`, zeros elsewhere."
    shape = [1] * y.dim(); shape[bdim] = -1
    mask = torch.zeros(y.shape[dim], dtype=y.dtype, device=y.device); mask[_off(sizes, k): _off(sizes, k + 1)] = 1
    mshape = [1] * y.dim(); mshape[dim] = -1
    return y + b.view(shape) * mask.view(mshape)


# %%
#| export
def token_mlp_faithful(x, w1, b1, w2, b2, lay: Layout, drop=_nodrop):
    "The released code's token MLP: per-rank bias copies `b1` (S_j,) on hidden block (S_j, H'_i), `b2` (T_i,) on Y_ij."
    tensor, domain, (T, H), S = lay.tensor, lay.domain, lay.full, sum(lay.s_sizes)
    xg = all_gather(x, tensor, 2, lay.h_sizes)
    a = all_reduce(_on_block(LEFT.fwd(w1, xg), b1, 2, 1, split_sizes(H, lay.p), lay.i), domain)  # exact: add_bias_shard
    a = drop(F.gelu(a), 0, (_off(lay.s_sizes, lay.j), 0), (S, H))
    y = reduce_scatter(LEFT.fwd(w2, a), tensor, 2, lay.h_sizes) + b2[:, None]  # exact: add_bias_shard before the sum
    return drop(y, 1, lay.starts, lay.full)


# %%
#| export
def channel_mlp_faithful(x, wa, ba, wb, bb, lay: Layout, drop=_nodrop):
    "The released code's channel MLP: per-rank bias copies `ba` (G_i,) on hidden block (T'_j, G_i), `bb` (H_j,) on Y_ij."
    tensor, domain, T, G = lay.tensor, lay.domain, lay.full[0], sum(lay.g_sizes)
    xg = all_gather(x, domain, 1, lay.t_sizes)
    a = all_reduce(_on_block(RIGHT.fwd(wa, xg), ba, 1, 2, split_sizes(T, lay.q), lay.j), tensor)  # exact: add_bias_shard
    a = drop(F.gelu(a), 2, (0, _off(lay.g_sizes, lay.i)), (T, G))
    y = reduce_scatter(RIGHT.fwd(wb, a), domain, 1, lay.t_sizes) + bb  # exact: add_bias_shard before the sum
    return drop(y, 3, lay.starts, lay.full)


# %% [markdown]
# The overlapped MLPs take the same copies with `faithful=True`: each stage runs without a bias (`b=None`), and
# the rank adds its copy to the block the stage leaves it.

# %%
def _faithful_check(p, q, overlap):
    "Faithful MLPs with every copy equal to the one-process bias are the exact ones (tied copies)."
    def run(lay):
        i, j = lay.i, lay.j
        x = cut(_X, (1, p, i), (2, q, j))
        w1, w2 = cut(_W1, (0, q, j), (1, p, i)), cut(_W2, (0, p, i), (1, q, j))
        b1, b2 = cut(_b1, (0, q, j)), cut(_b2, (0, p, i))  # whole blocks: every copy the one-process bias
        f = (lambda *a: token_mlp_overlap(*a, faithful=True)) if overlap else token_mlp_faithful
        return f(x, w1, b1, w2, b2, lay).detach()
    for r, y in enumerate(on_grid(p, q, run)):
        close(y, _Y.detach()[:, slice(*shard_range(_T, p, r // q)), slice(*shard_range(_H, q, r % q))])

for _ov in (False, True): _faithful_check(2, 2, _ov); _faithful_check(3, 2, _ov)


# %% [markdown]
# ## Refinement 2: the paper's schedule, SUMMA on a square grid
#
# The paper's 4-way products move **weights** as well as activations. On an $n \times n$ grid where every rank
# holds one block of each operand, SUMMA computes
#
# $$C[i, j] = \sum_k A[i, k]\, B[k, j]:$$
#
# rank $(i, j)$ receives the blocks $A[i, k]$ from its row (its tensor partners) and $B[k, j]$ from its column (its
# domain partners) and adds the $n$ products, each as soon as its two blocks are there. In jigsaw_ref's
# orientation the whole block is four such products with no transposes, if $W_1$ and $W_a$ are cut the other way
# round from the activation-moving schedules ($W_1[\mathcal S_i, \mathcal T_j]$, $W_a[\mathcal H_i, \mathcal G_j]$):
#
# | product | $A$ (sent along the row) | $B$ (sent down the column) | result on $(i,j)$ |
# |---|---|---|---|
# | token 1 | $W_1[\mathcal S_i, \mathcal T_k]$, a weight block | $X[\mathcal T_k, \mathcal H_j]$, activations | hidden $A[\mathcal S_i, \mathcal H_j]$ |
# | token 2 | $W_2[\mathcal T_i, \mathcal S_k]$, a weight block | hidden $A[\mathcal S_k, \mathcal H_j]$ | $Y[\mathcal T_i, \mathcal H_j]$ |
# | channel 1 | $X[\mathcal T_i, \mathcal H_k]$, activations | $W_a[\mathcal H_k, \mathcal G_j]$, a weight block | hidden $A[\mathcal T_i, \mathcal G_j]$ |
# | channel 2 | hidden $A[\mathcal T_i, \mathcal G_k]$ | $W_b[\mathcal G_k, \mathcal H_j]$, a weight block | $Y[\mathcal T_i, \mathcal H_j]$ |
#
# Every result is complete where it is computed, so nothing is summed over ranks afterwards and every hidden
# block is held once. For 2x2: rank 0 $=(0,0)$ sends its $A$ block to rank 1 and its $B$ block to rank 2, and
# computes $A_{00}B_{00}$ at once (both local), then $A_{01}B_{10}$ when the two blocks arrive; the off-diagonal
# ranks have no product with only local operands, so they wait for the first block. The biases act on complete
# blocks and are kept whole for their block on the ranks that need them (replicated over a row or a column;
# exact mode sums their gradient shares).
#
# The backward of $C = AB$ is two products of the same kind, each *partial*:
# $\partial A[i, k] = \sum_m \partial C[i, m]\, B[k, m]^\top$ is summed along row $i$, and
# $\partial B[k, m] = \sum_i A[i, k]^\top\, \partial C[i, m]$ down column $m$. Rank $(i, j)$ gathers its column of $B$
# and its row of $A$ again (only its own blocks were saved), computes the partial for each partner and sends it as
# soon as it is ready: the "transposed products send partial products" of the paper.

# %%
#| export
def _mm_grad(x, like):
    "`x` summed over the leading batch dimensions it has and `like` lacks (a weight's gradient from batched products)."
    return x.sum(tuple(range(x.dim() - like.dim()))) if x.dim() > like.dim() else x


# %%
#| export
class _Summa(torch.autograd.Function):
    """Forward: `C[i,j] = sum_k A[i,k] @ B[k,j]` on an n x n grid: A blocks travel along the row (`row` group, my index j),
    B blocks down the column (`col`, my index i), each product taken as its blocks arrive, in a fixed order. Backward:
    the blocks are gathered again; the partials of dA are reduce-scattered along the row, those of dB down the column."""
    @staticmethod
    def forward(ctx, a, b, row, col, ks):
        ctx.save_for_backward(a, b); ctx.args, ctx.amp = (row, col, ks), _amp(a)
        n, i, j, a, b = row.size, col.rank, row.rank, a.contiguous(), b.contiguous()
        ar, br = Ring.gather(row, a, -1, ks, tag=41), Ring.gather(col, b, -2, ks, tag=42)  # A[i, k] and B[k, j]
        A, B = lambda k: a if k == j else ar.take(k), lambda k: b if k == i else br.take(k)
        order = [(i + d) % n for d in range(n)]  # a fixed order: the diagonal term first
        return sum((A(k) @ B(k) for k in order[1:]), A(i) @ B(i))

    @staticmethod
    @_with_saved
    def backward(ctx, dc, row, col, ks, a, b):
        i, j, dc, a, b = col.rank, row.rank, dc.contiguous(), a.contiguous(), b.contiguous()
        br, ar = Ring.gather(col, b, -2, ks, tag=43), Ring.gather(row, a, -1, ks, tag=44)  # my column of B, my row of A, again
        B, A = lambda k: b if k == i else br.take(k), lambda k: a if k == j else ar.take(k)
        pa = lambda t: _mm_grad(dc @ B(t).mT, a).to(a.dtype)  # my partial of dA[i, t], in A's dtype
        pb = lambda t: _mm_grad(A(t).mT @ dc, b).to(b.dtype)  # my partial of dB[t, j]
        dar, dbr = Ring.scatter(row, pa, -1, ks[j], tag=45), Ring.scatter(col, pb, -2, ks[i], tag=46)  # each sent when ready
        da, db = pa(j), pb(i)  # my own partials while the partners' arrive
        return dar.fold(da), dbr.fold(db), None, None, None


# %%
#| export
def summa(a, b, row: Group, col: Group, ks: list[int]):
    "`C[i,j] = sum_k A[i,k] @ B[k,j]` on a square grid (`row`: my tensor partners, `col`: my domain partners); `ks`: the contraction blocks."
    if row.size != col.size: raise ValueError(f"SUMMA needs a square grid, not {col.size} x {row.size}: use p == q")
    return a @ b if row.size == 1 else _Summa.apply(a, b, row, col, list(ks))


# %% [markdown]
# `summa` against the one-process product on 2x2 and 3x3 thread grids with uneven blocks, a weight on the left and
# activations on the right (as in the token MLP) and the other way round (the channel MLP), forward and backward:

# %%
def _summa_check(n, left):
    M, K, N = 7, 8, 5
    A, Bm = (_r(M, K), _r(_B, K, N)) if left else (_r(_B, M, K), _r(K, N))
    dC = _r(_B, M, N)
    Af, Bf = A.clone().requires_grad_(True), Bm.clone().requires_grad_(True)
    ((Af @ Bf) * dC).sum().backward()
    ad, bd = A.dim(), Bm.dim()
    def run(lay):
        i, j = lay.i, lay.j
        a, b = cut(A, (ad - 2, n, i), (ad - 1, n, j)), cut(Bm, (bd - 2, n, i), (bd - 1, n, j))
        c = summa(a, b, lay.tensor, lay.domain, split_sizes(K, n))
        (c * cut(dC, (1, n, i), (2, n, j))).sum().backward()
        return c.detach(), a.grad, b.grad
    for r, (c, da, db) in enumerate(on_grid(n, n, run)):
        i, j = divmod(r, n)
        close(c, cut(Af @ Bf, (1, n, i), (2, n, j))); close(da, cut(Af.grad, (ad - 2, n, i), (ad - 1, n, j)))
        close(db, cut(Bf.grad, (bd - 2, n, i), (bd - 1, n, j)))

for _n in (2, 3):
    for _left in (True, False): _summa_check(_n, _left)
test_fail(lambda: summa(_W1, _X, type("G", (), {"size": 2})(), type("G", (), {"size": 1})(), [5, 5]), contains="square grid")


# %% [markdown]
# The two MLPs with SUMMA products. The weights $W_1[\mathcal S_i, \mathcal T_j]$ and $W_a[\mathcal H_i, \mathcal G_j]$ are
# cut as the table says; $W_2$, $W_b$ as before; the biases are whole blocks: $b_1[\mathcal S_i]$, $b_2[\mathcal T_i]$ (kept
# by the row), $b_a[\mathcal G_j]$, $b_b[\mathcal H_j]$ (kept by the column). In faithful mode they are the per-rank copies.

# %%
#| export
def token_mlp_summa(x, w1, b1, w2, b2, lay: Layout, drop=_nodrop, faithful=False):
    "The token MLP as two SUMMA products: W1[S_i, T_j] (S_i, T_j), b1 (S_i,), W2[T_i, S_j], b2 (T_i,); square grids."
    row, col, H, S = lay.tensor, lay.domain, lay.full[1], sum(lay.s_sizes)
    a = summa(w1, x, row, col, lay.t_sizes) + b1[:, None]  # A[S_i, H_j] = sum_k W1[S_i, T_k] X[T_k, H_j] + b1
    a = drop(F.gelu(a), 0, (_off(lay.s_sizes, lay.i), lay.starts[1]), (S, H))
    y = summa(w2, a, row, col, lay.s_sizes) + b2[:, None]  # Y[T_i, H_j] = sum_k W2[T_i, S_k] A[S_k, H_j] + b2
    return drop(y, 1, lay.starts, lay.full)


# %%
#| export
def channel_mlp_summa(x, wa, ba, wb, bb, lay: Layout, drop=_nodrop, faithful=False):
    "The channel MLP as two SUMMA products: Wa[H_i, G_j] (H_i, G_j), ba (G_j,), Wb[G_i, H_j], bb (H_j,); square grids."
    row, col, T, G = lay.tensor, lay.domain, lay.full[0], sum(lay.g_sizes)
    a = summa(x, wa, row, col, lay.h_sizes) + ba  # A[T_i, G_j] = sum_k X[T_i, H_k] Wa[H_k, G_j] + ba
    a = drop(F.gelu(a), 2, (lay.starts[0], _off(lay.g_sizes, lay.j)), (T, G))
    y = summa(a, wb, row, col, lay.g_sizes) + bb  # Y[T_i, H_j] = sum_k A[T_i, G_k] Wb[G_k, H_j] + bb
    return drop(y, 3, lay.starts, lay.full)


# %% [markdown]
# On 2x2 and 3x3 thread grids with uneven sizes, with the weights and biases cut as the table says, against the
# one-process MLPs (the harness `_run_token`/`_run_channel` cuts them the activation-moving way, so these checks cut
# their own):

# %%
def _summa_mlps(lay):
    n, i, j = lay.q, lay.i, lay.j
    x = cut(_X, (1, n, i), (2, n, j))
    w1, b1, w2, b2 = cut(_W1, (0, n, i), (1, n, j)), cut(_b1, (0, n, i)), cut(_W2, (0, n, i), (1, n, j)), cut(_b2, (0, n, i))
    wa, ba, wb, bb = cut(_Wa, (0, n, i), (1, n, j)), cut(_ba, (0, n, j)), cut(_Wb, (0, n, i), (1, n, j)), cut(_bb, (0, n, j))
    yt = token_mlp_summa(x, w1, b1, w2, b2, lay)
    yc = channel_mlp_summa(x, wa, ba, wb, bb, lay)
    ((yt + yc) * cut(_dY, (1, n, i), (2, n, j))).sum().backward()
    return yt.detach(), yc.detach(), x.grad, w1.grad, w2.grad, wa.grad, wb.grad, b1.grad, ba.grad


_tfull = [t.clone().requires_grad_(True) for t in (_X, _W1, _b1, _W2, _b2, _Wa, _ba, _Wb, _bb)]
_yt = serial_token_mlp(*_tfull[:5])
_yc = RIGHT.fwd(_tfull[7], F.gelu(RIGHT.fwd(_tfull[5], _tfull[0]) + _tfull[6])) + _tfull[8]
((_yt + _yc) * _dY).sum().backward()
for _n in (2, 3):
    _res = on_grid(_n, _n, _summa_mlps)
    for _r_, (_a, _c, _dx, _d1, _d2, _da, _db, _db1, _dba) in enumerate(_res):
        _i, _j = divmod(_r_, _n)
        close(_a, cut(_yt, (1, _n, _i), (2, _n, _j))); close(_c, cut(_yc, (1, _n, _i), (2, _n, _j)))
        close(_dx, cut(_tfull[0].grad, (1, _n, _i), (2, _n, _j)))
        for _got, _k in ((_d1, 1), (_d2, 3), (_da, 5), (_db, 7)): close(_got, cut(_tfull[_k].grad, (0, _n, _i), (1, _n, _j)))
    for _k in range(_n):  # a replicated bias gets its share from its own block: the row (b1) or the column (ba) sums to it
        close(sum(_res[_k * _n + _j][7] for _j in range(_n)), cut(_tfull[2].grad, (0, _n, _k)))
        close(sum(_res[_i * _n + _k][8] for _i in range(_n)), cut(_tfull[6].grad, (0, _n, _k)))

# %% [markdown]
# SUMMA's bytes against `block_bytes`, counted on 2x2 and 3x3 thread grids, forward and forward + backward:

# %%
for _n in (2, 3):
    for _bw in (False, True):
        _got = on_grid(_n, _n, _block_sent, "summa", _bw, 2, 6 * _n, 2 * _n, 3 * _n, 4 * _n)
        test_eq(set(_got), {block_bytes(6 * _n, 2 * _n, 3 * _n, 4 * _n, _n, _n, itemsize=8, batch=2, schedule="summa", backward=_bw)})
