"""Helpers for tests that run as one process by default and under `mpiexec -n N` unchanged.

Ranks never assert alone: `agree` runs the check on every rank, gathers every rank's verdict, and
raises the same error everywhere, so no rank is left waiting in a collective while another fails.

The suites in tests/mpi build every group through `make_group(comm)`, so one suite runs on either backend
and algorithm, chosen by two environment variables (tests/test_mpi.py sets them per mpiexec run):
- `JIGSAW_TEST_BACKEND`: `mpi` (default) gives `comm.Group` on the mpi4py communicator; `torch` gives a
  `comm.TorchGroup` on a torch.distributed (gloo) process group with the same members, in the same rank order.
- `JIGSAW_TEST_ALGO`: `p2p` (default) or `coll`, the algorithm of every group the suite makes.
"""
import os
import traceback

import torch
from mpi4py import MPI

from jigsaw_ref.comm import Group, TorchGroup, init_torch_distributed
from jigsaw_ref.config import shard_range, split_sizes
from jigsaw_ref.grid import Grid, split_comms

COMM = MPI.COMM_WORLD
WORLD = COMM.Get_size()
RANK = COMM.Get_rank()
torch.set_num_threads(1)

BACKEND = os.environ.get("JIGSAW_TEST_BACKEND", "mpi")
ALGO = os.environ.get("JIGSAW_TEST_ALGO", "p2p")
if BACKEND not in ("mpi", "torch"):
    raise ValueError(f"JIGSAW_TEST_BACKEND={BACKEND!r}: choose 'mpi' or 'torch'")
if ALGO not in ("p2p", "coll"):
    raise ValueError(f"JIGSAW_TEST_ALGO={ALGO!r}: choose 'p2p' or 'coll'")

_PGS = {}  # members (world ranks) -> torch.distributed process group, shared by every test of the session


def torch_pg(comm):
    """The torch.distributed process group with the members of the mpi4py communicator `comm` (None: the world).

    Collective over COMM: every rank publishes its communicator's members and every rank creates every group it
    has not made yet, in the same order (what `torch.distributed.new_group` requires of non-members too)."""
    init_torch_distributed(COMM)
    import torch.distributed as dist
    members = tuple(comm.allgather(RANK)) if comm is not None else (RANK,)
    for m in COMM.allgather(members):
        if m not in _PGS:
            _PGS[m] = None if m == tuple(range(WORLD)) else dist.new_group(list(m))
    return _PGS[members]


def make_group(comm, algo=None, backend=None):
    "A group on the ranks of the mpi4py communicator `comm`: `Group(comm)`, or a `TorchGroup` on the same members."
    algo, backend = algo or ALGO, backend or BACKEND
    if backend == "mpi":
        return Group(comm, algo)
    if comm is None or comm.Get_size() == 1 and WORLD == 1:
        return Group(None, algo)  # one process: no torch.distributed to set up, and nothing to send
    return TorchGroup(torch_pg(comm), algo)


def layouts(world=WORLD):
    "(dp, p, q) layouts of `world` ranks exercised by the tests: the paper's and some beyond."
    if world >= 8:  # oversubscribed on small machines: the paper's dp x 4-way and one wider layout
        return [(world // 4, 2, 2), (world // 8, 2, 4)]
    cands = [(world, 1, 1), (world // 2, 1, 2), (world // 2, 2, 1), (world // 4, 2, 2), (world // 4, 1, 4),
             (world // 8, 2, 4), (world // 8, 4, 2)]
    seen = []
    for dp, p, q in cands:
        if dp >= 1 and dp * p * q == world and (dp, p, q) not in seen:
            seen.append((dp, p, q))
    return seen


def lid(l):
    return "dp{}x{}x{}".format(*l)


def agree(fn, *args, **kw):
    "Run `fn` on every rank; if any rank fails, raise on every rank with every rank's message."
    try:
        out = fn(*args, **kw)
        verdict = None
    except Exception:  # noqa: BLE001 -- collected and re-raised on every rank below
        out, verdict = None, f"rank {RANK}: " + traceback.format_exc()
    verdicts = [v for v in COMM.allgather(verdict) if v]
    if verdicts:
        raise AssertionError("\n".join(verdicts))
    return out


def comms_for(layout):
    dp, p, q = layout
    return split_comms(Grid(dp, p, q), COMM)


def rel_err(a, b):
    a, b = a.detach(), b.detach()
    assert a.shape == b.shape, (a.shape, b.shape)
    if b.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))


def block(t, dims_parts_index):
    "Slice `t` along each (dim, parts, index) the way shard_range cuts."
    for dim, n_parts, k in dims_parts_index:
        a, b = shard_range(t.shape[dim], n_parts, k)
        t = t.narrow(dim, a, b - a)
    return t


def _sized(fn, kind):
    "`fn` (a token or channel MLP of jigsaw_ref.pmatmul) as `call(x, w1, b1, w2, b2, tensor, domain, T, H, K)`, K its hidden width (S or G)."
    def call(x, w1, b1, w2, b2, tensor, domain, T, H, K):
        from jigsaw_ref.pmatmul import Layout
        return fn(x, w1, b1, w2, b2, Layout.split(tensor, domain, T, H, K, K))  # K: S over q (token) or G over p (channel)
    return call


def mlp_variants(kind, schedules=("", "_overlap")):
    """name -> uniform caller (see `_sized`) of the `kind` ('token' or 'channel') MLP of each schedule suffix: by default
    the plain and overlapped schedules, which cut their weights the same way ('_summa' cuts them differently)."""
    from jigsaw_ref import pmatmul
    return {f"{kind}_mlp{s}": _sized(getattr(pmatmul, f"{kind}_mlp{s}"), kind) for s in schedules}
