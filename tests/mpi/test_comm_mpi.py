"""Every communication primitive against its one-process meaning, float64, forward and backward.

Runs as one process (groups of one) and under `mpiexec -n 2/4/8` (see tests/test_mpi.py), on the backend
JIGSAW_TEST_BACKEND chooses (`mpi_util.make_group`); the algorithm is a parameter here. Also: the
sub-communicators `split_comms` makes have exactly the members `groups()` lists."""
import pytest
import torch

from jigsaw_ref.comm import Group, all_gather, all_reduce, expected_bytes, make_groups, reduce_scatter
from jigsaw_ref.config import split_sizes
from jigsaw_ref.grid import Grid, groups, split_comms
from jigsaw_ref.ranks import run_ranks
from mpi_util import COMM, RANK, WORLD, agree, layouts, lid, make_group

ALGOS = ["p2p", "coll"]


def _full(n, seed=0, cols=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, cols, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("extra", [0, 1], ids=["even", "uneven"])
def test_all_gather_forward_backward_bytes(algo, extra):
    def check():
        g = make_group(COMM, algo)
        n = 2 * WORLD + extra
        sizes = split_sizes(n, WORLD)
        X = _full(n)
        mine = X.split(sizes)[RANK].clone().requires_grad_(True)
        y = all_gather(mine, g, 0, sizes)
        assert torch.equal(y, X)
        # each rank's loss share uses the replicated y with its own upstream gradient G_r
        G = [_full(n, seed=100 + r) for r in range(WORLD)]
        (y * G[RANK]).sum().backward()
        want = sum(G).split(sizes)[RANK]
        assert torch.allclose(mine.grad, want, rtol=1e-13, atol=1e-13)
        if extra == 0:  # forward all-gather + backward reduce-scatter
            assert g.sent == 2 * expected_bytes("all_gather", WORLD, X.numel(), 8), g.sent
    agree(check)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("extra", [0, 1], ids=["even", "uneven"])
def test_reduce_scatter_forward_backward(algo, extra):
    def check():
        g = make_group(COMM, algo)
        n = 2 * WORLD + extra
        sizes = split_sizes(n, WORLD)
        parts = [_full(n, seed=10 + r) for r in range(WORLD)]  # rank r holds the summand parts[r]
        mine = parts[RANK].clone().requires_grad_(True)
        y = reduce_scatter(mine, g, 0, sizes)
        assert torch.allclose(y, sum(parts).split(sizes)[RANK], rtol=1e-13, atol=1e-13)
        G = _full(n, seed=200).split(sizes)[RANK]  # upstream gradient of my block
        (y * G).sum().backward()
        assert torch.equal(mine.grad, _full(n, seed=200))  # every summand's gradient is the whole upstream
        if extra == 0:
            assert g.sent == 2 * expected_bytes("reduce_scatter", WORLD, n * 3, 8), g.sent
    agree(check)


@pytest.mark.parametrize("algo", ALGOS)
def test_all_reduce_forward_backward(algo):
    def check():
        g = make_group(COMM, algo)
        parts = [_full(5, seed=20 + r) for r in range(WORLD)]
        mine = parts[RANK].clone().requires_grad_(True)
        y = all_reduce(mine, g)
        assert torch.allclose(y, sum(parts), rtol=1e-13, atol=1e-13)
        G = [_full(5, seed=300 + r) for r in range(WORLD)]
        (y * G[RANK]).sum().backward()
        assert torch.allclose(mine.grad, sum(G), rtol=1e-13, atol=1e-13)
    agree(check)


def test_gradcheck_all_gather_in_a_chain():
    "torch.autograd.gradcheck through gather -> nonlinearity -> reduce-scatter, every rank differentiating its share."
    def check():
        g = make_group(COMM, "p2p")
        n = 2 * WORLD
        mine = _full(n, seed=1).split(split_sizes(n, WORLD))[RANK].clone().requires_grad_(True)
        w = _full(3, seed=2, cols=3)

        def f(x):
            return reduce_scatter(torch.tanh(all_gather(x, g, 0) @ w), g, 0)
        # gradcheck perturbs my input only; other ranks take part in the same collectives each time
        return torch.autograd.gradcheck(f, (mine,), eps=1e-6, atol=1e-7, nondet_tol=0.0)
    assert agree(check)


@pytest.mark.parametrize("algo", ALGOS)
def test_torch_distributed_gloo_matches_mpi(algo):
    "The same collectives over torch.distributed (gloo on CPU), set up from the MPI communicator: p2p bit for bit."
    from jigsaw_ref.comm import TorchGroup, init_torch_distributed
    if WORLD == 1:
        pytest.skip("torch.distributed needs more than one rank to be interesting")

    def check():
        init_torch_distributed(COMM)
        tg, mg = TorchGroup(None, algo), Group(COMM, algo)
        n = 2 * WORLD + 1
        sizes = split_sizes(n, WORLD)
        X = _full(n)
        assert torch.equal(tg.all_gather(X.split(sizes)[RANK], 0, sizes), mg.all_gather(X.split(sizes)[RANK], 0, sizes))
        part = _full(n, seed=40 + RANK)
        same = torch.equal if algo == "p2p" else (lambda a, b: torch.allclose(a, b, rtol=1e-13))
        assert same(tg.reduce_scatter(part, 0, sizes), mg.reduce_scatter(part, 0, sizes))
        assert same(tg.all_reduce(part), mg.all_reduce(part))
        if algo == "p2p":
            assert tg.sent == mg.sent, (tg.sent, mg.sent)
    agree(check)


# split_comms (colours computed per rank) against groups() (member lists): the two descriptions of a grid
GRIDS = [(1, 1, 2), (1, 2, 1), (2, 1, 1), (1, 2, 2), (2, 1, 2), (2, 2, 1), (4, 1, 1), (1, 1, 4), (1, 4, 1),
         (1, 3, 2), (3, 1, 2), (2, 1, 3), (2, 2, 2), (1, 2, 4), (1, 4, 2), (2, 1, 4), (2, 4, 1), (4, 2, 1), (8, 1, 1)]


def _members(comm, grid):
    "Per kind: (this rank's sub-communicator members as world ranks in sub-rank order, its rank there)."
    c = split_comms(grid, comm)
    me = comm.Get_rank()
    out = {k: (getattr(c, k).allgather(me), getattr(c, k).Get_rank()) for k in ("model", "tensor", "domain", "dp")}
    g = make_groups(grid, comm=comm)  # the MPI path of make_groups splits the same way
    out["make_groups"] = {k: (g[k].rank, g[k].size) for k in ("model", "tensor", "domain", "dp")}
    return out


def _check_members(grid, per_rank):
    listed = groups(grid)
    for r, got in enumerate(per_rank):
        for kind in ("model", "tensor", "domain", "dp"):
            mine = [m for m in listed[kind] if r in m]
            assert len(mine) == 1, (grid, kind, r, mine)  # groups() partitions the ranks
            members, sub_rank = got[kind]
            assert members == mine[0], (grid, kind, r, members, mine[0])
            assert sub_rank == mine[0].index(r), (grid, kind, r, sub_rank)
            assert got["make_groups"][kind] == (sub_rank, len(members)), (grid, kind, r, got["make_groups"][kind])
    assert sorted(r for m in listed["model"] for r in m) == list(range(grid.world))


@pytest.mark.parametrize("dims", GRIDS, ids=lid)
def test_split_comms_matches_groups_thread_ranks(dims):
    "On in-process ranks (every grid up to 8 ranks, one process): each sub-communicator holds its `groups()` list."
    if WORLD > 1:
        pytest.skip("one-process test (thread ranks); the MPI variant below runs under mpiexec")
    grid = Grid(*dims)
    _check_members(grid, run_ranks(grid.world, _members, grid, timeout=60))


@pytest.mark.parametrize("dims", layouts(), ids=lid)
def test_split_comms_matches_groups_mpi(dims):
    "The same on the real MPI communicator, every layout of this world."
    grid = Grid(*dims)
    agree(lambda: _check_members(grid, COMM.allgather(_members(COMM, grid))))
