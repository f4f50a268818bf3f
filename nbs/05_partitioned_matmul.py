# %%
#| default_exp pmatmul

# %%
#| export
from __future__ import annotations
import torch
import torch.nn.functional as F
from jigsaw_ref.comm import Group, all_gather, all_reduce, reduce_scatter
from jigsaw_ref.config import shard_range, split_sizes

# %%
#| hide
from fastcore.test import test_eq, test_close
from jigsaw_ref.config import split_sizes

# %% [markdown]
# # Partitioned linear algebra
#
# > Token mixing, channel mixing and LayerNorm on a $p \times q$ grid of ranks: the serial equation, the block equations, a one-process simulation, then the code that runs over MPI.

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
# with its batch axis gathered over the other axis. Both have the same three-step shape:
# gather the batch axis, multiply by a block of the first weight and *sum partial products* over the
# contracted axis, multiply by a block of the second weight and *reduce-scatter* back to the input
# layout.

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
def add_bias_shard(
    y,  # a Partial tensor, about to be summed over `group`
    b,  # this rank's shard of the bias along `dim` (shard `group.rank` of `group.size`, as `shard_range` cuts)
    dim: int, group: Group,
):
    "`y` plus this rank's bias shard at its place along `dim`: after the sum over `group`, plus the whole bias."
    n = y.shape[dim]
    a, e = shard_range(n, group.size, group.rank)
    full = torch.cat([b.new_zeros(a), b, b.new_zeros(n - e)])
    shape = [1] * y.dim(); shape[dim] = n
    return y + full.view(shape)

# %%
_p = [torch.randn(2, 5, 3) for _ in range(3)]  # three ranks' partial products
_b = torch.randn(5)
_sum = sum(add_bias_shard(_p[r], _b[slice(*shard_range(5, 3, r))], 1, type("G", (), {"size": 3, "rank": r})()) for r in range(3))
test_close(_sum, sum(_p) + _b[:, None])

# %% [markdown]
# ## Overlapping the exchange with the GEMM
#
# The paper hides communication behind computation: a rank computes first the part of a partial product that
# a partner needs, starts sending it, and computes the next part (finally its own) while the message is in
# flight. For the token MLP's output, $Y = \mathrm{RS}_{\mathcal H}(W_2 A + c)$, the product is separable along
# the channels $h$, so the block for partner $k$ is $W_2 A[:, \mathcal H_k] + c$: `matmul_reduce_scatter` sends
# each partner's block with a non-blocking send as soon as it is computed. Its backward is the mirror: the
# upstream gradient blocks are exchanged with non-blocking messages while the rank computes the contributions
# of its own block to $\partial A$ and $\partial W_2$, then those of each partner's block as it arrives.

# %%
#| export
def _bias_full(b, n: int, group: Group):
    "This rank's bias shard placed in a length-`n` vector of zeros (see `add_bias_shard`)."
    a, e = shard_range(n, group.size, group.rank)
    return torch.cat([b.new_zeros(a), b, b.new_zeros(n - e)])


class _MatmulReduceScatter(torch.autograd.Function):
    """Forward: `Y = RS_h(einsum('ts,bsh->bth', W, A) + c)` over `group`, each partner's channel block computed and
    sent (non-blocking) before the next. Backward: the gradient blocks are all-gathered with non-blocking messages
    overlapped with the GEMMs of `dA = W^T dY` and `dW = dY A^T`."""
    @staticmethod
    def forward(ctx, w, a, c, group, sizes):
        ctx.save_for_backward(w, a); ctx.group, ctx.sizes = group, sizes
        n, r = group.size, group.rank
        cuts = torch.tensor([0] + sizes).cumsum(0).tolist()
        blk = lambda k: torch.einsum("ts,bsh->bth", w, a[..., cuts[k]:cuts[k + 1]]) + c[:, None]
        bufs = {(r - d) % n: a.new_empty((a.shape[0], w.shape[0], sizes[r])) for d in range(1, n)}
        reqs = []
        for d in range(1, n):  # step d: send partner r+d its block as soon as it exists, receive from r-d
            # the request keeps each sent block alive until `wait`: do not reuse it before then
            reqs += group.start(sends=[(blk((r + d) % n).contiguous(), (r + d) % n)], recvs=[(bufs[(r - d) % n], (r - d) % n)], tag=21)
        out = blk(r)  # my own block while the messages fly
        group.wait(reqs)
        for d in range(1, n): out += bufs[(r - d) % n]  # a fixed order of summation
        return out

    @staticmethod
    def backward(ctx, g):
        w, a = ctx.saved_tensors
        group, sizes = ctx.group, ctx.sizes
        n, r = group.size, group.rank
        cuts = torch.tensor([0] + sizes).cumsum(0).tolist()
        g = g.contiguous()
        bufs = {(r - d) % n: g.new_empty((g.shape[0], g.shape[1], sizes[(r - d) % n])) for d in range(1, n)}
        reqs = []
        for d in range(1, n):
            reqs += group.start(sends=[(g, (r + d) % n)], recvs=[(bufs[(r - d) % n], (r - d) % n)], tag=22)
        da = torch.empty_like(a)
        dw = torch.zeros_like(w)
        dc = g.new_zeros(w.shape[0])
        def use(k, gk):  # contributions of channel block k
            ak = a[..., cuts[k]:cuts[k + 1]]
            da[..., cuts[k]:cuts[k + 1]] = torch.einsum("ts,bth->bsh", w, gk)
            dw.add_(torch.einsum("bth,bsh->ts", gk, ak)); dc.add_(gk.sum((0, 2)))
        use(r, g)  # my own block while the partners' arrive
        group.wait(reqs)
        for d in range(1, n): use((r - d) % n, bufs[(r - d) % n])
        return dw, da, dc, None, None


def matmul_reduce_scatter(w, a, c, group: Group, sizes: list[int]):
    "`reduce_scatter(einsum('ts,bsh->bth', w, a) + c[:, None], group, 2, sizes)`, overlapped (MPI p2p groups)."
    return _MatmulReduceScatter.apply(w, a, c, group, sizes)

# %% [markdown]
# ## Token mixing: $Y = W_2\, \sigma(W_1 X + b_1) + b_2$
#
# With $W_1 \in \mathbb R^{S\times T}$ cut into blocks $W_1[\mathcal S_j, \mathcal T_i]$ (hidden tokens over the
# $q$ axis, input tokens over the $p$ axis) and $W_2[\mathcal T_i, \mathcal S_j]$:
#
# $$A[\mathcal S_j, :] = \sigma\Big(\sum_{i'} W_1[\mathcal S_j, \mathcal T_{i'}]\; X[\mathcal T_{i'}, :] + b_1[\mathcal S_j]\Big)$$
#
# Rank $(i,j)$ first all-gathers $X[\mathcal T_i, :]$ from its tensor partners (all channels of its tokens),
# forms the partial product $W_1[\mathcal S_j,\mathcal T_i] X[\mathcal T_i,:]$ and sums it over its domain partners
# (all-reduce over $i$). Then
#
# $$Y[\mathcal T_i, \mathcal H_j] = \Big[\sum_{j'} W_2[\mathcal T_i, \mathcal S_{j'}]\, A[\mathcal S_{j'}, :]\Big]_{:, \mathcal H_j} + b_2[\mathcal T_i]$$
#
# is a partial product over $j'$ reduce-scattered over the tensor partners along channels. For the paper's
# 2-way layout ($p = 1$) the all-reduce vanishes: the pair swaps its channel halves, applies its row block
# of $W_1$ and column block of $W_2$, and sends its partner the half it owns: the paper's exchange.

# %%
#| export
def token_mlp(
    x,  # (B, T_i, H_j): this rank's activation block
    w1, b1,  # W1[S_j, T_i] (S_j, T_i); b1: shard i (of p) of b1[S_j]
    w2, b2,  # W2[T_i, S_j] (T_i, S_j); b2: shard j (of q) of b2[T_i]
    tensor: Group, domain: Group,  # the q ranks sharing my tokens; the p ranks sharing my channels
    h_sizes: list[int],  # channel block sizes over the tensor axis
    dropout: float = 0.0, training: bool = False,
    bias_after: bool = False,  # biases are whole output blocks added after each sum (faithful 4-way), not shards
):
    "Token-mixing MLP on a p x q grid: (B, T_i, H_j) -> (B, T_i, H_j)."
    xg = all_gather(x, tensor, 2, h_sizes)  # (B, T_i, H): my tokens, every channel
    a = torch.einsum("st,bth->bsh", w1, xg)  # (B, S_j, H), partial over i
    if bias_after: a = all_reduce(a, domain) + b1[:, None]
    else: a = all_reduce(add_bias_shard(a, b1, 1, domain), domain)  # summed over input-token blocks
    a = F.dropout(F.gelu(a), dropout, training)
    if bias_after:
        y = reduce_scatter(torch.einsum("ts,bsh->bth", w2, a), tensor, 2, h_sizes) + b2[:, None]
    elif tensor.can_overlap:  # the paper's overlapped exchange (p2p groups of any backend)
        y = matmul_reduce_scatter(w2, a, _bias_full(b2, w2.shape[0], tensor), tensor, h_sizes)
    else:
        y = add_bias_shard(torch.einsum("ts,bsh->bth", w2, a), b2, 1, tensor)  # (B, T_i, H), partial over j
        y = reduce_scatter(y, tensor, 2, h_sizes)
    return F.dropout(y, dropout, training)  # (B, T_i, H_j)

# %% [markdown]
# ## Channel mixing: $Y = \sigma(X W_a + b_a) W_b + b_b$
#
# The mirror image: $W_a[\mathcal H_j, \mathcal G_i]$ and $W_b[\mathcal G_i, \mathcal H_j]$, with the hidden channels
# over the $p$ axis. Rank $(i,j)$ all-gathers its channel block over all tokens from its domain partners,
#
# $$A[:, \mathcal G_i] = \sigma\Big(\sum_{j'} X[:, \mathcal H_{j'}]\, W_a[\mathcal H_{j'}, \mathcal G_i] + b_a[\mathcal G_i]\Big) \quad\text{(all-reduce over } j'),$$
#
# $$Y[\mathcal T_i, \mathcal H_j] = \Big[\sum_{i'} A[:, \mathcal G_{i'}]\, W_b[\mathcal G_{i'}, \mathcal H_j]\Big]_{\mathcal T_i, :} + b_b[\mathcal H_j] \quad\text{(reduce-scatter over } i' \text{ along tokens)}.$$
#
# Every GEMM is cut $pq$ ways with no redundant FLOP; the only redundant work is the GELU on the
# replicated hidden block.

# %%
#| export
def channel_mlp(
    x,  # (B, T_i, H_j)
    wa, ba,  # Wa[H_j, G_i] (H_j, G_i); ba: shard j (of q) of ba[G_i]
    wb, bb,  # Wb[G_i, H_j] (G_i, H_j); bb: shard i (of p) of bb[H_j]
    tensor: Group, domain: Group,
    t_sizes: list[int],  # token block sizes over the domain axis
    dropout: float = 0.0, training: bool = False,
    bias_after: bool = False,  # biases are whole output blocks added after each sum (faithful 4-way), not shards
):
    "Channel-mixing MLP on a p x q grid: (B, T_i, H_j) -> (B, T_i, H_j)."
    xg = all_gather(x, domain, 1, t_sizes)  # (B, T, H_j): every token, my channels
    if bias_after: a = all_reduce(xg @ wa, tensor) + ba
    else: a = all_reduce(add_bias_shard(xg @ wa, ba, 2, tensor), tensor)  # (B, T, G_i): summed over input-channel blocks
    a = F.dropout(F.gelu(a), dropout, training)
    if bias_after: y = reduce_scatter(a @ wb, domain, 1, t_sizes) + bb
    else: y = reduce_scatter(add_bias_shard(a @ wb, bb, 2, domain), domain, 1, t_sizes)  # (B, T_i, H_j)
    return F.dropout(y, dropout, training)

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
# **Faithful** mode is what the
# released code does: statistics over the local block only, $\mu_j = \frac{1}{|\mathcal H_j|}\sum_{h \in \mathcal H_j} x_h$:
# a different function from the 1-way model whenever $q > 1$.

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
    mu_j = x.mean(-1, keepdim=True) if x.shape[-1] else torch.zeros_like(x[..., :1])
    m_j = (x - mu_j).square().sum(-1, keepdim=True)
    n = torch.tensor(sizes or split_sizes(n_features, tensor.size), dtype=x.dtype).view(-1, *[1] * x.dim())
    st = all_gather(torch.cat([mu_j, m_j], -1).unsqueeze(0), tensor, 0)  # (q, ..., 2): every rank's (mean, M)
    mu = (n * st[..., :1]).sum(0) / n_features
    var = (st[..., 1:] + n * (st[..., :1] - mu).square()).sum(0) / n_features
    return (x - mu) * torch.rsqrt(var + eps) * w + b

# %% [markdown]
# ## One-process simulation
#
# Before any MPI, the block equations are checked in float64 by looping over the ranks of a $2\times2$ grid
# with uneven blocks: each "rank" computes its partial products from its blocks, and the sums play the part of
# the collectives.

# %%
def _sim_token_mlp(X, W1, b1, W2, b2, p, q):
    T, H = X.shape; S = W1.shape[0]
    Ts, Hs, Ss = (torch.tensor([0] + split_sizes(n, k)).cumsum(0) for n, k in ((T, p), (H, q), (S, q)))
    rng = lambda c, k: slice(int(c[k]), int(c[k + 1]))
    Y = torch.zeros_like(X)
    for j in range(q):  # A[S_j, :] = sum_i W1[S_j, T_i] X[T_i, :]  (all-reduce over domain partners)
        A = F.gelu(sum(W1[rng(Ss, j), rng(Ts, i)] @ X[rng(Ts, i)] for i in range(p)) + b1[rng(Ss, j), None])
        for i in range(p):  # rank (i, j)'s partial product, reduce-scattered over j along channels
            Y[rng(Ts, i)] += W2[rng(Ts, i), rng(Ss, j)] @ A
    return Y + b2[:, None]

_X = torch.randn(10, 7, dtype=torch.float64)
_W1, _b1, _W2, _b2 = (torch.randn(*s, dtype=torch.float64) for s in ((5, 10), (5,), (10, 5), (10,)))
_serial = _W2 @ F.gelu(_W1 @ _X + _b1[:, None]) + _b2[:, None]
test_close(_sim_token_mlp(_X, _W1, _b1, _W2, _b2, p=2, q=2), _serial, eps=1e-12)
test_close(_sim_token_mlp(_X, _W1, _b1, _W2, _b2, p=3, q=2), _serial, eps=1e-12)

# %% [markdown]
# In one process (groups of one) the exported functions reduce to the serial MLPs:

# %%
_one = Group()
_x = torch.randn(2, 10, 7, dtype=torch.float64)
test_close(token_mlp(_x, _W1, _b1, _W2, _b2, _one, _one, [7]),
           torch.stack([_W2 @ F.gelu(_W1 @ xb + _b1[:, None]) + _b2[:, None] for xb in _x]), eps=1e-12)
_wa, _ba, _wb, _bb = (torch.randn(*s, dtype=torch.float64) for s in ((7, 9), (9,), (9, 7), (7,)))
test_close(channel_mlp(_x, _wa, _ba, _wb, _bb, _one, _one, [10]), F.gelu(_x @ _wa + _ba) @ _wb + _bb, eps=1e-12)
test_close(layer_norm(_x, torch.ones(7, dtype=torch.float64), torch.zeros(7, dtype=torch.float64), _one, 7), F.layer_norm(_x, (7,)), eps=1e-12)

# %% [markdown]
# The same functions on 2, 4 and 8 MPI ranks, against these serial results with gradients, are in
# `tests/mpi/test_layers.py`; the notebook `12_mpi_notebook` runs them interactively.
#
# ## Communication volume
#
# Per mixer block and sample, with $b$ bytes per element, rank $(i,j)$ sends (forward; the backward sends the
# same amounts again, each collective's adjoint being the other):
#
# | step | collective | group | elements (full size) |
# |---|---|---|---|
# | token MLP gather | all-gather | tensor ($q$) | $\lvert\mathcal T_i\rvert H$ |
# | token MLP hidden | all-reduce | domain ($p$) | $\lvert\mathcal S_j\rvert H$ |
# | token MLP output | reduce-scatter | tensor | $\lvert\mathcal T_i\rvert H$ |
# | channel MLP gather | all-gather | domain | $T \lvert\mathcal H_j\rvert$ |
# | channel MLP hidden | all-reduce | tensor | $T \lvert\mathcal G_i\rvert$ |
# | channel MLP output | reduce-scatter | domain | $T \lvert\mathcal H_j\rvert$ |
# | 2 exact LayerNorms | 1 all-gather each | tensor | $2 \cdot 2 q \lvert\mathcal T_i\rvert$ (2 numbers per token and rank) |
#
# with the per-rank bytes of `comm.expected_bytes` for each. `block_bytes` adds them up; the MPI test checks
# it against the bytes the `Group`s counted.

# %%
#| export
def block_bytes(T: int, H: int, S: int, G: int, p: int, q: int, itemsize: int = 4, batch: int = 1, exact: bool = True) -> int:
    "Analytic bytes one rank sends in one mixer block forward (even splits)."
    from jigsaw_ref.comm import expected_bytes as e
    Ti, Sj, Gi = T // p, S // q, G // p
    n = (e("all_gather", q, Ti * H, itemsize) + e("all_reduce", p, Sj * H, itemsize) + e("reduce_scatter", q, Ti * H, itemsize)
         + e("all_gather", p, T * (H // q), itemsize) + e("all_reduce", q, T * Gi, itemsize) + e("reduce_scatter", p, T * (H // q), itemsize))
    if exact: n += 2 * e("all_gather", q, 2 * q * Ti, itemsize)
    return batch * n

# %%
test_eq(block_bytes(8, 4, 4, 4, 1, 1), 0)
