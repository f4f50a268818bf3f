# %% [markdown]
# # Tutorial: your own training loop
#
# > Train WeatherMixer 2-way and 4-way with `torch.optim.Adam` in a dozen lines of your own, using only the names `import jigsaw_ref` exports, and check every step against the one-process model.

# %% [markdown]
# `jigsaw-train` is one training loop; yours may differ (another optimizer, another loss, curriculum, logging).
# What any loop must do on top of a plain PyTorch loop is small, and the package exports exactly that:
#
# 1. **groups**: `make_groups(Grid.named(way, world), comm=...)` on every rank, with the communicator you pass;
# 2. **the model**: `JigsawMixer(cfg, groups["tensor"], groups["domain"])`, this rank's share of the weights;
# 3. **data**: this rank's block of every input and target, `block_of(cfg, full, p, q, i, j)` (or an
#    `Era5Dataset` that reads only that block from disk);
# 4. **the loss share**: `loss_share(pred, target, lat_w, var_w, loss_count(model, batch, dp))`: each rank's
#    share of the global loss, whose sum over ranks is the one-process loss;
# 5. **complete the gradients** after `backward()`: `complete_grads(model, groups, clip)` sums the shares of
#    replicated parameters and over data-parallel replicas, and clips by the global norm. Forgetting it is
#    silent in some layouts and wrong in others, so `model.guard(optimizer)` makes `step()` refuse.
#
# Here the ranks are threads of this notebook (`run_ranks`), so the cells run anywhere; the same function runs
# under `mpiexec` with `MPI.COMM_WORLD` (last section).

# %%
import torch
import jigsaw_ref as jr

# %% [markdown]
# A small configuration with uneven splits, and a stream of random batches (the same on every rank, so each
# rank can take its block; with real data each rank reads only its block):

# %%
cfg = jr.preset("tiny", n_lon=48, hidden=30, dropout=0.05)
B, STEPS = 2, 4
gen = torch.Generator().manual_seed(0)
batches = [(torch.randn(B, cfg.n_in, cfg.n_lat, cfg.n_lon, generator=gen, dtype=torch.float64),
            torch.randn(B, cfg.n_out, cfg.n_lat, cfg.n_lon, generator=gen, dtype=torch.float64)) for _ in range(STEPS)]
lat_w, var_w = jr.lat_weights_cos(torch.linspace(-85, 85, cfg.n_lat)), jr.variable_weights(cfg)

# %% [markdown]
# ## The loop
#
# Everything that is specific to Jigsaw is in the first four lines and in `complete_grads`; the rest is the
# PyTorch loop you know. `key=step` fixes the dropout masks, so every layout drops the same elements.

# %%
def train(comm, way: str):
    grid = jr.Grid.named(way, comm.Get_size()); g = jr.make_groups(grid, comm=comm)
    d, i, j = grid.coords(comm.Get_rank()); p, q = grid.domain, grid.tensor
    model = jr.JigsawMixer(cfg, g["tensor"], g["domain"], dtype=torch.float64).train()
    opt = model.guard(torch.optim.Adam(model.parameters(), lr=1e-3))
    vw, b0, b1 = var_w[model.out_slice], d * B // grid.dp, (d + 1) * B // grid.dp  # my channels' weights, my samples
    losses = []
    for step, (x, y) in enumerate(batches):
        opt.zero_grad()
        pred = model(jr.block_of(cfg, x[b0:b1], p, q, i, j), key=step, sample0=b0)
        share = jr.loss_share(pred, jr.block_of(cfg, y[b0:b1], p, q, i, j), lat_w, vw, jr.loss_count(model, b1 - b0, grid.dp))
        share.backward()
        jr.complete_grads(model, g, clip=1.0)
        opt.step()
        losses.append(float(g["world"].all_reduce(share.detach().reshape(1))[0]))  # the global loss, on every rank
    return losses, jr.gather_state(model, g["model"])

# %% [markdown]
# The one-process model, trained on the same batches with torch's own clipping, is the reference:

# %%
ref = jr.WeatherMixer(cfg, dtype=torch.float64).train()
opt = torch.optim.Adam(ref.parameters(), lr=1e-3)
ref_losses = []
for step, (x, y) in enumerate(batches):
    opt.zero_grad()
    loss = jr.loss_share(ref(x, key=step), y, lat_w, var_w, y.numel())
    loss.backward(); torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0); opt.step()
    ref_losses.append(float(loss.detach()))

# %% [markdown]
# 2-way on 2 ranks, 4-way on 4 ranks, and 2-way with data parallelism on 4 ranks (two model groups, one sample
# each): the losses and every parameter after the steps equal the one-process run.

# %%
for way, ranks in (("2", 2), ("4", 4), ("2", 4)):
    for losses, state in jr.run_ranks(ranks, train, way):
        worst = max(float((state[n] - t.detach()).abs().max()) for n, t in ref.state().items() if not n.endswith("tok2.b"))
        assert worst < 1e-10 and max(abs(a - b) for a, b in zip(losses, ref_losses)) < 1e-10
    print(f"way {way} on {ranks} ranks: losses {[round(l, 6) for l in losses]}, largest parameter difference {worst:.1e}")

# %% [markdown]
# (`tok2.b` is left out of the comparison: it adds a constant across the channels of each token, which every
# LayerNorm downstream removes, so its gradient is zero up to round-off, and Adam divides that round-off by its
# own tiny second moment.)
#
# ## Forgetting to complete the gradients
#
# The guard turns the silent mistake into an error on every rank:

# %%
def forgetful(comm):
    g = jr.make_groups(jr.Grid.named("4", 4), comm=comm)
    model = jr.JigsawMixer(cfg, g["tensor"], g["domain"], dtype=torch.float64)
    opt = model.guard(torch.optim.Adam(model.parameters()))
    x = jr.block_of(cfg, batches[0][0], 2, 2, model.i, model.j)
    model(x).square().sum().backward()
    opt.step()  # no complete_grads: refused

try: jr.run_ranks(4, forgetful)
except Exception as e: print(str(e).splitlines()[0])

# %% [markdown]
# ## The same loop under MPI
#
# Nothing changes but the communicator. Save the function (and the data set-up) in a script that ends with
#
# ```python
# from mpi4py import MPI
# losses, state = train(MPI.COMM_WORLD, way="4")
# ```
#
# and launch it with `mpiexec -n 4 python my_loop.py` (or `srun`); on GPUs create the model with
# `device=jr.local_device("cuda", MPI.COMM_WORLD)` and move each block there.
