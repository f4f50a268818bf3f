# %%
#| default_exp grid

# %%
#| export
from __future__ import annotations
from dataclasses import dataclass
from fastcore.basics import patch
from jigsaw_ref.config import ConfigError

# %%
#| hide
from fastcore.test import test_eq, test_fail

# %% [markdown]
# # Process grid
#
# > Data-parallel x domain x tensor degrees, rank coordinates, and the sub-communicators, split from a communicator passed in explicitly.

# %% [markdown]
# Jigsaw arranges ranks in a three-level grid. A **model group** of $p \cdot q$ consecutive ranks holds one
# copy of the model: $p$ **domain** shards (token blocks: bands of longitude) times $q$ **tensor** shards
# (channel blocks). The paper's layouts are
#
# | name | dp | p (domain) | q (tensor) |
# |---|---|---|---|
# | 1-way | $N$ | 1 | 1 |
# | 2-way | $N/2$ | 1 | 2 |
# | 4-way | $N/4$ | 2 | 2 |
#
# and any $p \times q$ is allowed here. Within a group, rank $r$ sits at domain index $i = r \div q$ and tensor
# index $j = r \bmod q$, so for 4-way rank $r$ holds token half $r \div 2$ and channel half $r \bmod 2$, as in the
# paper. Four kinds of sub-communicator follow:
#
# - `model`: the $pq$ ranks of one model group;
# - `tensor`: the $q$ ranks of a model group that share a token block (same $i$), splitting the channels;
# - `domain`: the $p$ ranks of a model group that share a channel block (same $j$), splitting the tokens;
# - `dp`: the ranks at the same position in every model group, which hold the same block of every weight
#   (data parallelism averages gradients here).

# %%
#| export
@dataclass(frozen=True)
class Grid:
    "Layout of `dp` model groups of `domain` x `tensor` ranks each."
    dp: int = 1  # data-parallel replicas
    domain: int = 1  # p: token (longitude) shards per model group
    tensor: int = 1  # q: channel shards per model group

    def __post_init__(self):
        for f in ("dp", "domain", "tensor"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"Grid.{f}={v!r}: must be a positive integer")

    @property
    def group_size(self): return self.domain * self.tensor
    @property
    def world(self): return self.dp * self.group_size

# %% [markdown]
# The paper's layouts by name (or any `PxQ`), with data parallelism filling the ranks of the job:

# %%
#| export
@patch(cls_method=True)
def named(cls: Grid, way: int | str, world: int) -> Grid:
    "The paper's 1-, 2- or 4-way layout (or 'PxQ') on `world` ranks, dp filling the rest."
    w = str(way).strip().lower()
    parts = w.split("x")
    if w in ("1", "2", "4"): p, q = {"1": (1, 1), "2": (1, 2), "4": (2, 2)}[w]
    elif len(parts) == 2 and all(v.isdigit() and int(v) > 0 for v in parts): p, q = int(parts[0]), int(parts[1])
    else: raise ConfigError(f"way={way!r}: choose 1, 2, 4 or a 'PxQ' layout such as '2x4'")
    if world % (p * q):
        raise ConfigError(f"world size {world} is not a multiple of the model group size {p}x{q}={p*q}: "
                          f"launch a multiple of {p*q} ranks (mpiexec -n {p*q*max(1, world//(p*q))}) or choose another layout")
    return cls(world // (p * q), p, q)

# %% [markdown]
# Rank coordinates: within a model group of $pq$ consecutive ranks, rank $r$ sits at $(i, j) = (r \div q, r \bmod q)$.

# %%
#| export
@patch
def coords(self: Grid, rank: int) -> tuple[int, int, int]:
    "(dp index, domain index i, tensor index j) of `rank`."
    g, r = divmod(rank, self.group_size)
    return g, r // self.tensor, r % self.tensor

# %%
#| export
@patch
def rank_of(self: Grid, d: int, i: int, j: int) -> int:
    "Global rank at dp index `d`, domain index `i`, tensor index `j`."
    return d * self.group_size + i * self.tensor + j

# %%
#| export
@patch
def check(self: Grid, world: int):
    "Raise a clear error if this grid does not fill `world` ranks exactly."
    if world != self.world:
        raise ConfigError(f"grid dp={self.dp} x domain={self.domain} x tensor={self.tensor} needs {self.world} "
                          f"ranks but the job has {world}: launch with mpiexec -n {self.world} or change the grid")

# %%
g4 = Grid.named(4, world=8)
test_eq(g4, Grid(dp=2, domain=2, tensor=2))
test_eq(g4.coords(5), (1, 0, 1))
test_eq(g4.rank_of(1, 0, 1), 5)
test_fail(lambda: Grid.named(4, world=6), contains="not a multiple of the model group size 2x2=4")
test_fail(lambda: Grid(2, 2, 2).check(4), contains="needs 8 ranks but the job has 4")
test_eq(Grid.named("2x3", 12), Grid(2, 2, 3))
for bad in ("3", "2x", "2x2x2", "-1", "2x0"): test_fail(lambda: Grid.named(bad, 8), contains="choose 1, 2, 4")

# %% [markdown]
# ## The groups, as a table
#
# Every group is a list of global ranks; `groups` enumerates them so a reader (and a test) can see exactly
# who talks to whom.

# %%
#| export
def groups(g: Grid) -> dict[str, list[list[int]]]:
    "Every `model`, `tensor`, `domain` and `dp` group of `g` as lists of global ranks."
    R = g.rank_of
    return {
        "model": [[R(d, i, j) for i in range(g.domain) for j in range(g.tensor)] for d in range(g.dp)],
        "tensor": [[R(d, i, j) for j in range(g.tensor)] for d in range(g.dp) for i in range(g.domain)],
        "domain": [[R(d, i, j) for i in range(g.domain)] for d in range(g.dp) for j in range(g.tensor)],
        "dp": [[R(d, i, j) for d in range(g.dp)] for i in range(g.domain) for j in range(g.tensor)],
    }

# %%
#| export
def group_table(g: Grid) -> str:
    "A printable table: one row per rank with its coordinates and the members of each of its groups."
    gs = groups(g)
    find = lambda kind, r: next(m for m in gs[kind] if r in m)
    rows = [f"{'rank':>4} {'dp':>3} {'i':>3} {'j':>3}  {'model':<16} {'tensor':<10} {'domain':<10} {'dp group':<10}"]
    for r in range(g.world):
        d, i, j = g.coords(r)
        rows.append(f"{r:>4} {d:>3} {i:>3} {j:>3}  " + " ".join(f"{str(find(k, r)):<{w}}" for k, w in
                    (("model", 16), ("tensor", 10), ("domain", 10), ("dp", 10))))
    return "\n".join(rows)

# %%
print(group_table(Grid.named(4, world=4)))

# %%
print(group_table(Grid.named(4, world=8)))

# %%
_gs = groups(Grid(2, 2, 2))
test_eq(_gs["tensor"], [[0, 1], [2, 3], [4, 5], [6, 7]])
test_eq(_gs["domain"], [[0, 2], [1, 3], [4, 6], [5, 7]])
test_eq(_gs["dp"], [[0, 4], [1, 5], [2, 6], [3, 7]])

# %% [markdown]
# ## Communicators
#
# `split_comms` splits an mpi4py communicator that the caller passes in; nothing is stored in a module
# global, so two grids (or two tests) can live in one process. Every rank calls it (it is collective), and
# it checks the world size first, on every rank, before any collective, so a mismatch raises the same clear
# error everywhere instead of hanging.

# %%
#| export
@dataclass
class Comms:
    "This rank's coordinates and its sub-communicators (mpi4py `Comm` objects or wrappers)."
    grid: Grid
    rank: int
    world: object  # the communicator everything was split from
    model: object
    tensor: object
    domain: object
    dp: object

    @property
    def coords(self): return self.grid.coords(self.rank)

# %%
#| export
def split_comms(grid: Grid, comm) -> Comms:
    "Split the mpi4py communicator `comm` into the groups of `grid` (collective over `comm`)."
    grid.check(comm.Get_size())
    r = comm.Get_rank()
    d, i, j = grid.coords(r)
    key = r
    model = comm.Split(d, key)
    tensor = comm.Split(d * grid.domain + i, key)
    domain = comm.Split(d * grid.tensor + j, key)
    dp = comm.Split(i * grid.tensor + j, key)
    return Comms(grid, r, comm, model, tensor, domain, dp)

