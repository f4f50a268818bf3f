# %%
#| default_exp comm

# %%
#| export
from __future__ import annotations
import torch
from jigsaw_ref.config import split_sizes

# %%
#| hide
from fastcore.test import test_eq, test_close

# %% [markdown]
# # Communication
#
# > Collectives on torch tensors over mpi4py (zero-copy) or torch.distributed, each wrapped in one small autograd function with its forward/backward contract, and counted in bytes.

# %% [markdown]
# ## Three layers
#
# 1. A `Group` wraps one communicator (an mpi4py `Comm`, or a `torch.distributed` process group for
#    NCCL/gloo) and offers three collectives on a tensor cut along one dimension, with the cut given by
#    `split_sizes` so uneven sizes work: `all_gather`, `reduce_scatter`, `all_reduce`. Each comes in two
#    algorithms: `"p2p"`, the paper's point-to-point exchange (each rank sends every partner exactly the block
#    that partner needs, with non-blocking sends), and `"coll"`, the library's own collective. A group of
#    one returns at once. Every call adds the bytes this rank sends to `group.sent`.
# 2. One `torch.autograd.Function` per pattern, named for its forward.
# 3. Lower-case wrappers (`all_gather`, ...) whose docstring is the contract.
#
# Layouts use PyTorch's words: `Shard(d)` (each rank holds a distinct block along $d$), `Replicate` (each
# holds the whole), `Partial` (each holds a summand of the whole).
#
# **The gradient convention.** Each rank back-propagates its own share $L_r$ of the global loss
# $L = \sum_r L_r$. The gradient a rank holds for a `Shard` tensor is then complete, but for a `Replicate`
# tensor it is only that rank's share, $\partial L_r / \partial Y$: the full gradient is the sum over the
# group. Hence the backward of each pattern:
#
# | forward | layouts | backward |
# |---|---|---|
# | all-gather | Shard(d) -> Replicate | reduce-scatter: sum the shares, keep my block |
# | reduce-scatter | Partial -> Shard(d) | all-gather |
# | all-reduce | Partial -> Replicate | all-reduce: sum the shares |

# %%
#| export
class Group:
    "A communicator of `size` ranks with collectives on CPU tensors (mpi4py), counting bytes sent and seconds spent."
    def __init__(self, comm=None, algo: str = "p2p"):
        self.comm, self.algo, self.sent, self.seconds = comm, algo, 0, 0.0
        self.size = 1 if comm is None else comm.Get_size()
        self.rank = 0 if comm is None else comm.Get_rank()

    def _count(self, nbytes): self.sent += int(nbytes)

    def all_gather(self, x, dim: int, sizes: list[int] | None = None):
        "Shard(dim) -> Replicate. `sizes`: every rank's extent along `dim` (default: as `split_sizes` cuts)."
        if self.size == 1: return x
        from mpi4py import MPI
        xs = x.movedim(dim, 0).contiguous()  # block rows: the cut dimension first
        rest = xs.shape[1:]
        sizes = sizes or [xs.shape[0]] * self.size
        row = xs[0].numel() if xs.shape[0] else int(torch.tensor(rest).prod())
        out = torch.empty((sum(sizes),) + tuple(rest), dtype=x.dtype)
        outs = list(out.split(sizes))
        if self.algo == "coll":
            counts = [s * row for s in sizes]
            self.comm.Allgatherv(xs.numpy(), [out.numpy(), counts])
            self._count(xs.numel() * xs.element_size() * (self.size - 1))
        else:
            outs[self.rank].copy_(xs)
            reqs = []
            for k in range(self.size):
                if k == self.rank: continue
                reqs.append(self.comm.Irecv(outs[k].numpy(), source=k, tag=11))
                reqs.append(self.comm.Isend(xs.numpy(), dest=k, tag=11))
                self._count(xs.numel() * xs.element_size())
            MPI.Request.Waitall(reqs)
        return out.movedim(0, dim)

    def reduce_scatter(self, x, dim: int, sizes: list[int] | None = None):
        "Partial -> Shard(dim): sum over the group, keep block `rank` of `sizes` (default `split_sizes`)."
        if self.size == 1: return x
        from mpi4py import MPI
        xs = x.movedim(dim, 0).contiguous()
        sizes = sizes or split_sizes(xs.shape[0], self.size)
        blocks = [b.contiguous() for b in xs.split(sizes)]
        mine = blocks[self.rank]
        if self.algo == "coll":
            out = torch.empty_like(mine)
            self.comm.Reduce_scatter(xs.numpy(), out.numpy(), [s * (xs[0].numel()) for s in sizes], op=MPI.SUM)
            self._count(sum(b.numel() * b.element_size() for k, b in enumerate(blocks) if k != self.rank))
        else:
            bufs, reqs = [], []
            for k in range(self.size):
                if k == self.rank: continue
                buf = torch.empty_like(mine)
                bufs.append(buf)
                reqs.append(self.comm.Irecv(buf.numpy(), source=k, tag=12))
                reqs.append(self.comm.Isend(blocks[k].numpy(), dest=k, tag=12))
                self._count(blocks[k].numel() * blocks[k].element_size())
            MPI.Request.Waitall(reqs)
            out = mine.clone()
            for b in bufs: out += b  # sum in a fixed order: rank order of the partners
        return out.movedim(0, dim)

    def allgather_obj(self, obj) -> list:
        "Every rank's picklable `obj`, in rank order (for small metadata and whole-model assembly)."
        return [obj] if self.size == 1 else self.comm.allgather(obj)

    def barrier(self):
        if self.size > 1: self.comm.Barrier()

    def all_reduce(self, x):
        "Partial -> Replicate: the sum over the group on every rank."
        if self.size == 1: return x
        if self.algo == "coll":
            from mpi4py import MPI
            xs = x.contiguous()
            out = torch.empty_like(xs)
            self.comm.Allreduce(xs.numpy(), out.numpy(), op=MPI.SUM)
            self._count(2 * xs.numel() * xs.element_size() * (self.size - 1) // self.size)
            return out
        if self.size == 2:  # a pair swaps its whole partial sums: one round, the same bytes as RS + AG
            from mpi4py import MPI
            xs = x.contiguous()
            other = torch.empty_like(xs)
            MPI.Request.Waitall([self.comm.Irecv(other.numpy(), source=1 - self.rank, tag=13),
                                 self.comm.Isend(xs.numpy(), dest=1 - self.rank, tag=13)])
            self._count(xs.numel() * xs.element_size())
            return xs + other if self.rank == 0 else other + xs  # the same order of addition on both ranks
        flat = x.reshape(-1)  # p2p: reduce-scatter then all-gather, each rank owning one block
        sizes = split_sizes(flat.numel(), self.size)
        return self.all_gather(self.reduce_scatter(flat, 0, sizes), 0, sizes).reshape(x.shape)

# %% [markdown]
# A group of one is the identity, so every layer below runs unchanged in one process:

# %%
_g = Group()
_t = torch.randn(3, 4)
test_eq(_g.all_gather(_t, 1), _t)
test_eq(_g.reduce_scatter(_t, 0), _t)
test_eq(_g.all_reduce(_t), _t)

# %% [markdown]
# ## The same interface over torch.distributed
#
# GPU clusters use NCCL through `torch.distributed`; `TorchGroup` offers the same three collectives on a
# process group (NCCL for CUDA tensors, gloo on CPU). Uneven blocks are padded to the largest block, since
# `all_gather_into_tensor` wants equal sizes.

# %%
#| export
class TorchGroup(Group):
    "A `Group` over a `torch.distributed` process group (NCCL on GPU, gloo on CPU)."
    def __init__(self, pg=None, algo: str = "coll"):
        import torch.distributed as dist
        self.dist, self.pg, self.algo, self.sent, self.seconds = dist, pg, algo, 0, 0.0
        self.size, self.rank = dist.get_world_size(pg), dist.get_rank(pg)
        self.comm = pg

    def all_gather(self, x, dim: int, sizes=None):
        if self.size == 1: return x
        xs = x.movedim(dim, 0).contiguous()
        sizes = sizes or [xs.shape[0]] * self.size
        m = max(sizes)
        pad = torch.zeros((m,) + xs.shape[1:], dtype=xs.dtype, device=xs.device)
        pad[: xs.shape[0]] = xs
        parts = [torch.empty_like(pad) for _ in range(self.size)]
        self.dist.all_gather(parts, pad, group=self.pg)
        self._count(pad.numel() * pad.element_size() * (self.size - 1))
        return torch.cat([p[:s] for p, s in zip(parts, sizes)]).movedim(0, dim)

    def reduce_scatter(self, x, dim: int, sizes=None):
        if self.size == 1: return x
        xs = x.movedim(dim, 0).contiguous()
        sizes = sizes or split_sizes(xs.shape[0], self.size)
        m = max(sizes)
        blocks = []
        for b in xs.split(sizes):
            pb = torch.zeros((m,) + xs.shape[1:], dtype=xs.dtype, device=xs.device)
            pb[: b.shape[0]] = b
            blocks.append(pb)
        out = torch.empty_like(blocks[0])
        if xs.device.type == "cpu":  # gloo has no reduce_scatter: all-reduce, keep my block
            full = torch.stack(blocks)
            self.dist.all_reduce(full, group=self.pg)
            out = full[self.rank]
        else:
            self.dist.reduce_scatter(out, blocks, group=self.pg)
        self._count(sum(b.numel() * b.element_size() for k, b in enumerate(blocks) if k != self.rank))
        return out[: sizes[self.rank]].movedim(0, dim)

    def allgather_obj(self, obj) -> list:
        if self.size == 1: return [obj]
        out = [None] * self.size
        self.dist.all_gather_object(out, obj, group=self.pg)
        return out

    def barrier(self):
        if self.size > 1: self.dist.barrier(group=self.pg)

    def all_reduce(self, x):
        if self.size == 1: return x
        out = x.clone()
        self.dist.all_reduce(out, group=self.pg)
        self._count(2 * out.numel() * out.element_size() * (self.size - 1) // self.size)
        return out

# %%
#| export
def _timed(fn):
    "Add the seconds spent in a collective to `self.seconds` (groups of one cost nothing)."
    import functools, time
    @functools.wraps(fn)
    def wrapper(self, *a, **kw):
        if self.size == 1 or getattr(self, "_timing", False): return fn(self, *a, **kw)  # nested: counted once
        self._timing, t = True, time.perf_counter()
        try: return fn(self, *a, **kw)
        finally: self.seconds += time.perf_counter() - t; self._timing = False
    return wrapper


for _cls in (Group, TorchGroup):
    for _m in ("all_gather", "reduce_scatter", "all_reduce"):
        if _m in _cls.__dict__: setattr(_cls, _m, _timed(_cls.__dict__[_m]))

# %% [markdown]
# ## Autograd functions
#
# Each pattern is one `Function` whose backward is the pattern of the table above.

# %%
#| export
class _AllGather(torch.autograd.Function):
    "Forward: all-gather along `dim` (Shard -> Replicate). Backward: reduce-scatter of the gradient shares."
    @staticmethod
    def forward(ctx, x, group, dim, sizes):
        ctx.group, ctx.dim, ctx.sizes = group, dim, sizes
        return group.all_gather(x, dim, sizes)

    @staticmethod
    def backward(ctx, g):
        return ctx.group.reduce_scatter(g, ctx.dim, ctx.sizes), None, None, None


class _ReduceScatter(torch.autograd.Function):
    "Forward: sum over the group and keep my block along `dim` (Partial -> Shard). Backward: all-gather."
    @staticmethod
    def forward(ctx, x, group, dim, sizes):
        ctx.group, ctx.dim, ctx.sizes = group, dim, sizes
        return group.reduce_scatter(x, dim, sizes)

    @staticmethod
    def backward(ctx, g):
        return ctx.group.all_gather(g, ctx.dim, ctx.sizes), None, None, None


class _AllReduce(torch.autograd.Function):
    "Forward: sum over the group (Partial -> Replicate). Backward: sum the gradient shares over the group."
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return group.all_reduce(x)

    @staticmethod
    def backward(ctx, g):
        return ctx.group.all_reduce(g), None

# %%
#| export
def all_gather(x, group: Group, dim: int, sizes: list[int] | None = None):
    "Shard(dim) -> Replicate; gradient: reduce-scatter. `sizes`: all ranks' extents along `dim`."
    return x if group.size == 1 else _AllGather.apply(x, group, dim, sizes)


def reduce_scatter(x, group: Group, dim: int, sizes: list[int] | None = None):
    "Partial -> Shard(dim) with blocks `sizes` (default `split_sizes`); gradient: all-gather."
    return x if group.size == 1 else _ReduceScatter.apply(x, group, dim, sizes)


def all_reduce(x, group: Group):
    "Partial -> Replicate; gradient: all-reduce of the shares."
    return x if group.size == 1 else _AllReduce.apply(x, group)

# %% [markdown]
# These run over MPI in `tests/mpi/test_comm.py` (2, 4 and 8 ranks, both algorithms, even and uneven
# blocks, forward and `gradcheck`-style backward against the one-process result in float64). The
# interactive notebook `12_mpi_notebook` runs them on an ipyparallel cluster.
#
# ## Byte accounting
#
# For a group of $n$ ranks and a tensor of $N$ elements of $b$ bytes (the full, gathered size):
#
# | pattern | bytes one rank sends, `p2p` |
# |---|---|
# | all-gather | $(n-1)\, N b / n$ |
# | reduce-scatter | $(n-1)\, N b / n$ |
# | all-reduce | $2 (n-1)\, N b / n$ |
#
# (`coll` is counted with the same formulas, the cost of the bandwidth-optimal algorithms, since the
# library hides what it actually sends.) `expected_bytes` is the analytic side of the test that compares
# these with `group.sent`.

# %%
#| export
def expected_bytes(kind: str, n: int, numel: int, itemsize: int) -> int:
    "Analytic bytes one rank sends for `kind` in a group of `n` ranks on a tensor of `numel` full elements (even split)."
    if n == 1: return 0
    f = {"all_gather": 1, "reduce_scatter": 1, "all_reduce": 2}[kind]
    return f * (n - 1) * numel * itemsize // n

# %%
test_eq(expected_bytes("all_reduce", 2, 1000, 4), 4000)
test_eq(expected_bytes("all_gather", 1, 1000, 4), 0)
