"""Helpers for tests that run as one process by default and under `mpiexec -n N` unchanged.

Ranks never assert alone: `agree` runs the check on every rank, gathers every rank's verdict, and
raises the same error everywhere, so no rank is left waiting in a collective while another fails.
"""
import os
import traceback

import torch
from mpi4py import MPI

from jigsaw_ref.config import shard_range
from jigsaw_ref.grid import Grid, split_comms

COMM = MPI.COMM_WORLD
WORLD = COMM.Get_size()
RANK = COMM.Get_rank()
torch.set_num_threads(1)


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
