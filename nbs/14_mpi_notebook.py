# %% [markdown]
# # Jigsaw on an MPI cluster, interactively
#
# > Start four MPI engines with ipyparallel, run a 2-way and a 4-way forward and backward pass in `%%px` cells, and compare each with the one-process model.

# %% [markdown]
# Everything in the other notebooks runs in one process, where every group has one rank. Here the same code
# runs on four MPI ranks driven from this notebook: each `%%px` cell executes on all four engines at once.
# The cells that need the cluster carry the `mpi` flag, so plain `nbdev_test` skips them; the test suite runs
# this notebook with `nbdev_test --flags mpi` inside a timeout (`tests/test_mpi_notebook.py`), and stops the
# cluster even when a cell fails.
#
# To run it yourself: `pip install -e ".[dev]"` in a virtual environment whose `bin/` holds `mpiexec` (the MPICH
# wheel installs one), then open this notebook with that environment's kernel (`jupyter lab`, installed by the
# dev extra). The cluster can also be started and stopped by hand, outside the notebook, and connected to with
# `ipp.Client()`:
#
# ```sh
# ipcluster start --engines=mpi -n 4 --daemonize   # controller + 4 MPI engines (mpiexec from this venv)
# ipcluster stop                                   # stop them
# ipcluster stop --all                             # stop every cluster of this IPYTHONDIR, e.g. after a kernel crash
# ```
#
# **If the kernel crashes** with a cluster running, the controller and engines outlive it (they are separate
# processes). Restart the kernel, then either reconnect (`ipp.Client()` finds the running cluster) or clean up
# with `ipcluster stop --all`; `pkill -f ipengine` is the last resort.
#
# **GPUs.** Each engine takes the GPU `comm.local_device` gives it: one GPU per engine, by the launcher's local
# rank (or an MPI shared-memory split), and the CPU when there is none; the cells below are the same either
# way. Messages between engines go through MPI; with an MPI that is not CUDA-aware (the PyPI wheels are not)
# `comm.Group` stages them through pinned host buffers.

# %%
#| mpi
import os, sys
from pathlib import Path
import ipyparallel as ipp

# %% [markdown]
# Ranks that share cores should yield while they wait (MPICH's heavy yield), and the engines must find the
# `mpiexec` of this environment:

# %%
#| mpi
os.environ.setdefault("MPIR_CVAR_ENABLE_HEAVY_YIELD", "1")
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]
cluster = ipp.Cluster(engines="mpi", n=4)
rc = cluster.start_and_connect_sync(activate=True)
rc.wait_for_engines(4, timeout=120)
len(rc.ids)

# %% [markdown]
# ## The same model on every engine
#
# Each engine builds the one-process model in float64 and one input batch from the same seed: the reference.

# %%
# %%px --progress-after -1
#| mpi
import torch
from mpi4py import MPI
from jigsaw_ref.config import preset, shard_range
from jigsaw_ref.grid import Grid
from jigsaw_ref.mixer import WeatherMixer
from jigsaw_ref.parallel import JigsawMixer, block_of, complete_grads, gather_state
from jigsaw_ref.comm import local_device, make_groups
torch.set_num_threads(1)
world = MPI.COMM_WORLD
dev = local_device("auto", world)  # this engine's GPU, or the CPU
cfg = preset("tiny", n_lon=40, hidden=30)  # 10 longitude patches, 19 outputs: uneven splits
g = torch.Generator().manual_seed(0)
x = torch.randn(2, cfg.n_in, cfg.n_lat, cfg.n_lon, generator=g, dtype=torch.float64)
ref = WeatherMixer(cfg, dtype=torch.float64)
xr = x.clone().requires_grad_(True)
yr = ref(xr)
yr.square().sum().backward()
yr = yr.detach()
print(f"engine {world.Get_rank()} of {world.Get_size()}: {dev}, reference output {tuple(yr.shape)}")

# %% [markdown]
# ## 2-way: channel halves, data parallelism over the two pairs
#
# On four ranks the 2-way layout is two model groups of two ($dp = 2$). Each rank takes its sample (its dp
# index) and `parallel.block_of` its channel block of the input, and computes its channel block of the output
# on its device; the errors are measured against the CPU reference.

# %%
# %%px --progress-after -1
#| mpi
def run(way):
    grid = Grid.named(way, world.Get_size())
    groups = make_groups(grid, "mpi", "p2p", world)
    d, i, j = grid.coords(world.Get_rank())
    p, q = grid.domain, grid.tensor
    m = JigsawMixer(cfg, groups["tensor"], groups["domain"], dtype=torch.float64, device=dev)
    xl = block_of(cfg, x[d:d + 1], p, q, i, j).to(dev).requires_grad_(True)
    y = m(xl)
    y.square().sum().backward()
    y = y.detach()
    out_err = float((y.cpu() - block_of(cfg, yr[d:d + 1], p, q, i, j)).abs().max() / yr.abs().max())
    in_err = float((xl.grad.cpu() - block_of(cfg, xr.grad[d:d + 1], p, q, i, j)).abs().max() / xr.grad.abs().max())
    m.sync_replicated_grads()  # complete the replicated parameters' gradient shares (no dp sum: one sample per group)
    grads = gather_state(m, groups["model"], {n: t.grad for n, t in m.state().items()})
    # only sample d contributed on this model group: compare with the reference gradient of that sample
    ref_d = WeatherMixer(cfg, dtype=torch.float64)
    ref_d(x[d:d + 1]).square().sum().backward()
    w_err = max(float((grads[n] - t.grad).abs().max() / max(float(t.grad.abs().max()), 1e-12))
                for n, t in ref_d.state().items() if not n.endswith("tok2.b"))
    return {"rank": world.Get_rank(), "device": str(dev), "coords": (d, i, j), "output": out_err, "input grad": in_err,
            "weight grads": w_err}

# %%
# %%px --progress-after -1
#| mpi
two_way = run(2)
four_way = run(4)

# %% [markdown]
# Every rank's largest relative error against the one-process model (float64):

# %%
#| mpi
import pandas as pd
res = pd.DataFrame([{"layout": w, **r} for w in ("two_way", "four_way") for r in rc[:].pull(w, block=True)])
print(res.to_string(index=False))
assert (res[["output", "input grad", "weight grads"]] < 1e-10).all().all()

# %% [markdown]
# ## Stopping the cluster
#
# Always stop the engines and the controller; the test suite also runs `ipcluster stop --all` afterwards in
# case a cell failed before reaching this one.

# %%
#| mpi
import logging
cluster.log.setLevel(logging.ERROR)  # not the engines' whole logs
cluster.stop_cluster_sync()
print("cluster stopped")
