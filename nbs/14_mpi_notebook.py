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
# To run it yourself: `pip install -e .` in a virtual environment whose `bin/` holds `mpiexec` (the MPICH
# wheel installs one), then open this notebook with that environment's kernel.

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
from jigsaw_ref.parallel import JigsawMixer, gather_state, token_sizes
from jigsaw_ref.comm import make_groups
torch.set_num_threads(1)
world = MPI.COMM_WORLD
cfg = preset("tiny", n_lon=40, hidden=30)  # 10 longitude patches, 19 outputs: uneven splits
g = torch.Generator().manual_seed(0)
x = torch.randn(2, cfg.n_in, cfg.n_lat, cfg.n_lon, generator=g, dtype=torch.float64)
ref = WeatherMixer(cfg, dtype=torch.float64)
xr = x.clone().requires_grad_(True)
yr = ref(xr)
yr.square().sum().backward()

# %% [markdown]
# ## 2-way: channel halves, data parallelism over the two pairs
#
# On four ranks the 2-way layout is two model groups of two ($dp = 2$). Each rank takes its sample (its dp
# index), its channel block of the input and computes its channel block of the output.

# %%
def block(t, grid, d, i, j, channels):
    "Rank (d, i, j)'s block of a (B, C, lat, lon) tensor: its sample, channel block and longitudes."
    ts = token_sizes(cfg, grid.domain)
    l0 = sum(ts[:i]) // cfg.n_lat * cfg.patch
    l1 = l0 + ts[i] // cfg.n_lat * cfg.patch
    c0, c1 = shard_range(channels, grid.tensor, j)
    return t[d:d + 1, c0:c1, :, l0:l1]

# %%
# %%px --progress-after -1
#| mpi
def run(way):
    grid = Grid.named(way, world.Get_size())
    groups = make_groups(grid, "mpi", "p2p", world)
    d, i, j = grid.coords(world.Get_rank())
    m = JigsawMixer(cfg, groups["tensor"], groups["domain"], dtype=torch.float64)
    xl = block(x, grid, d, i, j, cfg.n_in).clone().requires_grad_(True)
    y = m(xl)
    y.square().sum().backward()
    out_err = float((y - block(yr, grid, d, i, j, cfg.n_out)).abs().max() / yr.abs().max())
    in_err = float((xl.grad - block(xr.grad, grid, d, i, j, cfg.n_in)).abs().max() / xr.grad.abs().max())
    m.sync_replicated_grads()  # complete the replicated parameters' gradient shares
    grads = gather_state(m, groups["model"], {n: t.grad for n, t in m.state().items()})
    # only sample d contributed on this model group: compare with the reference gradient of that sample
    ref_d = WeatherMixer(cfg, dtype=torch.float64)
    ref_d(x[d:d + 1]).square().sum().backward()
    w_err = max(float((grads[n] - t.grad).abs().max() / max(float(t.grad.abs().max()), 1e-12))
                for n, t in ref_d.state().items() if not n.endswith("tok2.b"))
    return {"rank": world.Get_rank(), "coords": (d, i, j), "output": out_err, "input grad": in_err, "weight grads": w_err}

# %% [markdown]
# The block helper defined in the notebook's own namespace is pushed to the engines first:

# %%
#| mpi
rc[:].push({"block": block}, block=True)

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
cluster.stop_cluster_sync()
